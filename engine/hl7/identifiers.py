"""The identifiers a message is searched by: patient, account, visit, appointment, transaction.

``ID_KINDS`` names each kind with the HL7 path it is read from; ``identifiers`` reads them all
from a parsed message, directly and fast (it runs for every message received; a test checks it
against the generic path reader). The journal keeps them in an indexed table.
"""

from __future__ import annotations

from .er7 import Message, unescape

# Kinds of identifier kept in the journal, with the HL7 path each is read from.
ID_KINDS = {
    "patient": "PID-3[*].1",
    "account": "PID-18.1",
    "visit": "PV1-19.1",
    "placer_appointment": "SCH-1.1",
    "filler_appointment": "SCH-2.1",
    "transaction": "FT1[*]-2.1",
}


def identifiers(message: Message) -> list[tuple[str, str, str]]:
    """The searchable identifiers of a message: (kind, value, assigning authority), in message order."""
    seps = message.seps
    comp, sub = seps.component, seps.subcomponent
    found = []

    def first(segment, number):
        reps = segment.repetitions(number) if segment is not None else []
        value = reps[0].split(comp, 1)[0] if reps else ""
        return unescape(value, seps).strip() if value else ""

    pid = message.segment("PID")
    if pid is not None:
        for cx in pid.repetitions(3):
            parts = cx.split(comp)
            value = unescape(parts[0], seps).strip()
            if value:
                authority = parts[3].split(sub, 1)[0] if len(parts) > 3 else ""
                found.append(("patient", value, unescape(authority, seps).strip()))
    for kind, segment, number in (
        ("account", pid, 18),
        ("visit", message.segment("PV1"), 19),
        ("placer_appointment", message.segment("SCH"), 1),
        ("filler_appointment", message.segment("SCH"), 2),
    ):
        value = first(segment, number)
        if value:
            found.append((kind, value, ""))
    for ft1 in message.all("FT1"):
        value = first(ft1, 2)
        if value:
            found.append(("transaction", value, ""))
    return found


def patient_filter(text: str) -> tuple[str, str | None]:
    """A patient as a user types it: ``100234`` (any assigning authority) or in CX form
    ``100234^^^NORTHCLINIC`` (that authority only; ``^MR`` after it and ``&`` sub-components of
    the authority are allowed, as in PID-3). Returns (ID, authority or None)."""
    parts = text.strip().split("^")
    value = parts[0].strip()
    if len(parts) < 4:
        return value, None
    return value, parts[3].split("&", 1)[0].strip()
