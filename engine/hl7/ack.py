"""Building HL7 acknowledgements: a pure function, byte for byte testable.

Original mode answers AA (accepted), AE (error) or AR (rejected). Enhanced mode (a value in MSH-15
or MSH-16) answers with commit ACKs CA, CE or CR, and MSH-15 decides whether one is sent at all:
AL always, NE never, ER only on error, SU only on success.

The ACK mirrors the inbound message: same separators and encoding characters, same version and
processing ID, MSH-18 echoed, sender and receiver swapped, MSA-2 echoing MSH-10. Errors add an ERR
segment with a code from HL7 table 0357 and the location, in the layout the inbound version uses
(ERR-1 before v2.5, ERR-2/3/4/7 from v2.5). The clock and the ACK's own control ID are parameters.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from .er7 import DEFAULT_SEPARATORS, escape
from ..errors import PathError
from .header import Header
from .paths import parse_path
from .versions import FALLBACK_VERSION, version_tuple

# HL7 table 0357, message error condition codes.
TABLE_0357 = {
    0: "Message accepted",
    100: "Segment sequence error",
    101: "Required field missing",
    102: "Data type error",
    103: "Table value not found",
    104: "Value too long",
    200: "Unsupported message type",
    201: "Unsupported event code",
    202: "Unsupported processing id",
    203: "Unsupported version id",
    204: "Unknown key identifier",
    205: "Duplicate key identifier",
    206: "Application record locked",
    207: "Application internal error",
}

ACCEPT, ERROR, REJECT = "accept", "error", "reject"
_CODES = {
    (ACCEPT, False): "AA",
    (ERROR, False): "AE",
    (REJECT, False): "AR",
    (ACCEPT, True): "CA",
    (ERROR, True): "CE",
    (REJECT, True): "CR",
}

@dataclass(frozen=True)
class AckError:
    """What went wrong: an HL7 table 0357 code, a text for people, and where (an HL7 path)."""

    code: int
    text: str
    location: str | None = None

    def __post_init__(self):
        if self.code not in TABLE_0357:
            raise ValueError(f"{self.code} is not an HL7 table 0357 code")


@dataclass(frozen=True)
class Identity:
    """How the engine names itself in MSH-3/MSH-4 when the inbound MSH-5/MSH-6 are empty."""

    application: str = "HL7BRIDGE"
    facility: str = "HL7BRIDGE"


def ack_code(outcome: str, header: Header | None) -> str:
    """The MSA-1 code for an outcome (accept, error, reject) in the inbound message's mode."""
    return _CODES[(outcome, bool(header and header.enhanced_mode))]


def ack_wanted(code: str, header: Header | None) -> bool:
    """Whether an ACK goes back at all: in enhanced mode MSH-15 decides, otherwise always."""
    if header is None or not header.enhanced_mode:
        return True
    condition = header.accept_ack_type or "AL"
    if condition == "NE":
        return False
    if condition == "ER":
        return code != "CA"
    if condition == "SU":
        return code == "CA"
    return True


def build_ack(
    header: Header | None,
    code: str,
    *,
    now: datetime,
    control_id: str,
    error: AckError | None = None,
    identity: Identity = Identity(),
) -> str:
    """The ACK for ``header`` as ER7 text, segments ended by CR.

    ``header`` is None when the frame had no readable MSH: the result is a minimal reject that
    uses the default separators and claims version 2.5.1. ``now`` must be timezone-aware.
    """
    seps = header.seps if header else DEFAULT_SEPARATORS
    version = (header.version if header else "") or FALLBACK_VERSION
    vt = version_tuple(version)
    f, c = seps.field, seps.component

    if header is None or not header.trigger_event:
        msh_type = "ACK"
    elif vt < (2, 3):
        msh_type = "ACK"
    elif vt < (2, 3, 1):
        msh_type = f"ACK{c}{escape(header.trigger_event, seps)}"
    else:
        msh_type = f"ACK{c}{escape(header.trigger_event, seps)}{c}ACK"

    sender_app = header.receiving_application_raw if header else ""
    sender_fac = header.receiving_facility_raw if header else ""
    msh = [
        "MSH",
        seps.encoding_characters,
        sender_app or escape(identity.application, seps),
        sender_fac or escape(identity.facility, seps),
        header.sending_application_raw if header else "",
        header.sending_facility_raw if header else "",
        format_ts(now),
        "",
        msh_type,
        escape(control_id, seps),
        escape(header.processing_id, seps) if header and header.processing_id else "P",
        escape(version, seps),
    ]
    if header and header.charset_raw:
        msh += ["", "", "", "", "", header.charset_raw]

    msa = ["MSA", code, escape(header.control_id, seps) if header else ""]
    if error is not None and vt < (2, 7):
        msa.append(escape(error.text, seps))  # MSA-3, read by older systems; withdrawn in v2.7
    segments = [f.join(msh), f.join(msa)]
    if error is not None:
        segments.append(_err_segment(error, vt, seps))
    return "\r".join(segments) + "\r"


def _err_segment(error: AckError, vt: tuple[int, ...], seps) -> str:
    f, c, s = seps.field, seps.component, seps.subcomponent
    loc = _location_parts(error.location)
    label = escape(TABLE_0357[error.code], seps)
    if vt < (2, 5):
        # ERR-1 (ELD): segment ID ^ sequence ^ field position ^ code&text&HL70357
        code = s.join([str(error.code), label, "HL70357"])
        eld = c.join([loc[0], loc[1], loc[2], code]) if loc else c.join(["", "", "", code])
        return f.join(["ERR", eld])
    erl = c.join(part for part in loc).rstrip(c) if loc else ""
    hl7_code = c.join([str(error.code), label, "HL70357"])
    return f.join(["ERR", "", erl, hl7_code, "E", "", "", escape(error.text, seps)])


def _location_parts(location: str | None):
    """An HL7 path as ERL components: segment, sequence, field, repetition, component, sub."""
    if not location:
        return None
    try:
        path = parse_path(location)
    except PathError:
        return None
    parts = [
        path.segment,
        str(path.segment_index or 1),
        str(path.field) if path.field else "",
        str(path.repetition or 1) if path.field else "",
        str(path.component) if path.component else "",
        str(path.subcomponent) if path.subcomponent else "",
    ]
    return parts


def format_ts(moment: datetime) -> str:
    """An HL7 DTM with seconds and UTC offset: 20261124055413+0000."""
    offset = moment.utcoffset()
    minutes = int(offset.total_seconds()) // 60 if offset is not None else 0
    sign = "-" if minutes < 0 else "+"
    hours, mins = divmod(abs(minutes), 60)
    return (f"{moment.year:04d}{moment.month:02d}{moment.day:02d}{moment.hour:02d}{moment.minute:02d}"
            f"{moment.second:02d}{sign}{hours:02d}{mins:02d}")
