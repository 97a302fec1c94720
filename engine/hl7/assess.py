"""Is this frame acceptable HL7 v2? Reading a frame and checking its header: plain Python.

``assess`` decodes the bytes (MSH-18), reads the message and checks MSH against the listener's
``AcceptPolicy``; what it cannot accept comes back with the HL7 table 0357 code and location the
ACK will carry. It never raises for bad input: real feeds are messy.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ParseError
from . import charset as charsets
from .ack import ACCEPT, REJECT, AckError, Identity
from .er7 import Message, parse
from .header import Header, read_header
from .versions import SUPPORTED_VERSIONS, version_tuple


@dataclass(frozen=True)
class AcceptPolicy:
    """What the engine accepts at ingest. Everything else is answered AR/CR with the reason."""

    processing_ids: frozenset = frozenset({"P", "T", "D"})
    versions: tuple = SUPPORTED_VERSIONS
    message_types: frozenset | None = None  # None accepts any type; routes decide later
    default_charset: str = charsets.DEFAULT_CHARSET
    identity: Identity = Identity()


@dataclass
class Assessment:
    """What ``assess`` found: the outcome, the error if any, and what could be read."""

    outcome: str  # ACCEPT, ERROR or REJECT (see engine.hl7.ack)
    decoded: charsets.Decoded
    header: Header | None = None
    message: Message | None = None
    error: AckError | None = None

    @property
    def warnings(self) -> list[str]:
        """Everything assumed to read the frame, in the order it was met: decoding, the reader,
        MSH-9. The journal keeps them (joined with '; ') with the message."""
        found = [self.decoded.warning] if self.decoded.warning else []
        if self.message is not None:
            found += self.message.warnings
        if self.header is not None:
            found += list(self.header.warnings)
        return found

    @property
    def warning(self) -> str | None:
        return join_warnings(self.warnings)


def join_warnings(warnings) -> str | None:
    """Warnings as the journal's one text column keeps them: joined with '; ', None when none."""
    return "; ".join(w for w in warnings if w) or None


def assess(raw: bytes, policy: AcceptPolicy = AcceptPolicy()) -> Assessment:
    """Read a frame and decide whether it is acceptable HL7 v2. Never raises for bad input."""
    decoded = charsets.decode(raw, policy.default_charset)
    try:
        message = parse(decoded.text)
    except ParseError as exc:
        code = 100 if str(exc.location or "").startswith("segment") else 102
        # With a readable MSH line the reject can still be addressed to the sender.
        header = _header_only(decoded.text)
        return Assessment(REJECT, decoded, header, None, AckError(code, str(exc), exc.location))
    header = read_header(message)
    error = _check_header(header, policy)
    if error is not None:
        return Assessment(REJECT, decoded, header, message, error)
    return Assessment(ACCEPT, decoded, header, message)


def _header_only(text: str) -> Header | None:
    text = text.lstrip("\ufeff\x0b\x1c\x00\t\r\n ")
    first = text.split("\r", 1)[0].split("\n", 1)[0]
    try:
        return read_header(parse(first))
    except ParseError:
        return None


def _check_header(header: Header, policy: AcceptPolicy) -> AckError | None:
    if not header.message_type:
        return AckError(101, "MSH-9 message type is missing", "MSH-9")
    if not header.control_id.strip():
        return AckError(101, "MSH-10 message control ID is missing", "MSH-10")
    if not header.processing_id:
        return AckError(101, "MSH-11 processing ID is missing", "MSH-11")
    if not header.version:
        return AckError(101, "MSH-12 version ID is missing", "MSH-12")
    if header.version not in policy.versions:
        return AckError(203, f"HL7 version {header.version} is not supported", "MSH-12")
    if header.processing_id not in policy.processing_ids:
        return AckError(
            202, f"processing ID {header.processing_id} is not accepted by this listener", "MSH-11"
        )
    if policy.message_types is not None and header.message_type not in policy.message_types:
        return AckError(200, f"message type {header.message_type} is not accepted", "MSH-9")
    if header.message_type not in ("ACK",) and not header.trigger_event and version_tuple(header.version) >= (2, 3):
        return AckError(201, header.trigger_missing or "MSH-9 has no trigger event (MSH-9.2)", "MSH-9.2")
    if header.accept_ack_type and header.accept_ack_type not in ("AL", "NE", "ER", "SU"):
        return AckError(103, f"MSH-15 {header.accept_ack_type} is not in HL7 table 0155", "MSH-15")
    return None
