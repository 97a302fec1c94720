"""What a message says about the scheduling-to-cash workflow: appointment and charge-line facts.

``extract(message, received_at, timezone)`` reads a parsed message (``engine.hl7.er7.Message``)
and returns the facts it carries: one ``AppointmentFact`` for an SIU message (keyed by sending
facility + filler appointment ID SCH-2, else placer SCH-1), one ``ChargeFact`` per FT1 segment
(keyed by facility + FT1-2 transaction ID, else message + set ID). Plain Python: no I/O; it runs
for every message mapped, so it reads fields directly.

Times are kept as ISO 8601 UTC text (``engine.stamps.iso``); HL7 times without an offset are read
in the route's time zone. Dates used for linking (an appointment's day, a charge's service date)
are the sender's local calendar day, as written in the message.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from datetime import datetime, timedelta, timezone as dt_timezone
from zoneinfo import ZoneInfo

from ..hl7.er7 import Message, unescape
from ..stamps import iso

# SIU triggers and the appointment status each leaves (None: the trigger changes details only, the
# status comes from SCH-25 or stays as it was).
TRIGGER_STATUS = {
    "S12": "booked", "S13": "booked", "S14": None, "S15": "cancelled", "S16": "cancelled",
    "S17": "deleted", "S26": "noshow",
}
TRIGGER_EVENT = {
    "S12": "booked", "S13": "rescheduled", "S14": "modified", "S15": "cancelled", "S16": "discontinued",
    "S17": "deleted", "S26": "no-show",
}
# SCH-25 filler status codes (HL7 table 0278) and the status they mean.
FILLER_STATUS = {
    "booked": "booked", "overbook": "booked", "pending": "pending", "waitlist": "pending",
    "started": "arrived", "complete": "fulfilled", "cancelled": "cancelled", "dc": "cancelled",
    "deleted": "deleted", "noshow": "noshow", "blocked": "pending",
}
# Statuses of an appointment that still expects a charge.
ACTIVE_STATUSES = ("booked", "arrived", "fulfilled")
# FT1-6 transaction types (HL7 table 0017) and the kind of line each is.
CHARGE_TYPES = {"CG": "charge", "CD": "credit", "PY": "payment", "CO": "payment", "AJ": "adjustment"}

_TS = re.compile(r"^(\d{4})(\d{2})?(\d{2})?(\d{2})?(\d{2})?(\d{2})?(?:\.\d+)?(?:([+-])(\d{2})(\d{2}))?$")


@dataclass(frozen=True)
class Moment:
    """An HL7 time read: ``at`` (ISO UTC text) and ``day`` (the sender's calendar day, YYYY-MM-DD)."""

    at: str
    day: str


@lru_cache(maxsize=4096)
def read_time(value: str, zone) -> Moment | None:
    """An HL7 DTM (``YYYY[MM[DD[HH[MM[SS[.S]]]]]][+/-ZZZZ]``) read in ``zone`` when it carries no
    offset; None when it is empty or not a time (an impossible date or offset, such as ``-3000``,
    or a moment that falls outside the years 1 to 9999 in UTC)."""
    match = _TS.match(value.strip()) if value else None
    if not match:
        return None
    year, month, day, hour, minute, second, sign, oh, om = match.groups()
    try:
        local = datetime(int(year), int(month or 1), int(day or 1), int(hour or 0), int(minute or 0), int(second or 0))
        if sign:
            offset = timedelta(hours=int(oh), minutes=int(om)) * (1 if sign == "+" else -1)
            moment = local.replace(tzinfo=dt_timezone(offset))
        else:
            moment = local.replace(tzinfo=zone)
        return Moment(iso(moment), local.date().isoformat())
    except (ValueError, OverflowError):
        return None


@dataclass(frozen=True)
class AppointmentFact:
    """One SIU message's word on one appointment."""

    facility: str
    appointment_id: str  # SCH-2.1, else SCH-1.1
    placer_id: str
    filler_id: str
    trigger: str  # S12 ...
    event: str  # booked, rescheduled, modified, cancelled, ... (what the trigger did)
    status: str | None  # the status it leaves (None: unchanged)
    filler_status: str  # SCH-25.1 as sent
    start_at: str | None
    start_day: str | None
    patient_id: str
    visit_id: str
    location: str
    provider: str
    occurred_at: str  # EVN-2, else MSH-7, else the time received


@dataclass(frozen=True)
class ChargeFact:
    """One FT1 line."""

    facility: str
    charge_key: str  # FT1-2.1, else "message <id> line <set ID>" (filled in by the caller: see key_for)
    transaction_id: str | None
    set_id: str
    type_code: str  # FT1-6 as sent
    kind: str  # charge, credit, payment, adjustment
    code: str  # FT1-7.1
    service_at: str | None
    service_day: str | None
    made_at: str  # FT1-5, else EVN-2, else MSH-7, else received
    amount: float | None
    currency: str
    patient_id: str
    visit_id: str


@dataclass(frozen=True)
class Facts:
    appointment: AppointmentFact | None
    charges: tuple


NO_FACTS = Facts(None, ())


@lru_cache(maxsize=64)
def zone_of(name: str | None):
    """The time zone HL7 times without an offset are read in (a route's ``timezone``; else UTC)."""
    return ZoneInfo(name) if name else dt_timezone.utc


def extract(message: Message, received_at: str, zone=dt_timezone.utc) -> Facts:
    """The workflow facts of a message (none for a message that is neither SIU nor carries FT1)."""
    seps = message.seps
    comp = seps.component

    def first(segment, number, component=1):
        if segment is None:
            return ""
        reps = segment.repetitions(number)
        if not reps:
            return ""
        parts = reps[0].split(comp)
        value = parts[component - 1] if component - 1 < len(parts) else ""
        return unescape(value.split(seps.subcomponent, 1)[0], seps).strip() if value else ""

    msh = message.segment("MSH")
    facility = first(msh, 4)
    message_type, trigger = first(msh, 9, 1), first(msh, 9, 2)
    evn = message.segment("EVN")
    pid, pv1 = message.segment("PID"), message.segment("PV1")
    event_time = read_time(first(evn, 2), zone) or read_time(first(msh, 7), zone)
    occurred_at = event_time.at if event_time else received_at
    patient_id = first(pid, 3)
    visit_id = first(pv1, 19)
    appointment = None
    sch = message.segment("SCH")
    if message_type == "SIU" and sch is not None:
        placer, filler = first(sch, 1), first(sch, 2)
        if filler or placer:
            start = (read_time(first(sch, 11, 4), zone) or read_time(first(message.segment("TQ1"), 7), zone)
                     or read_time(first(message.segment("AIS"), 4), zone))
            filler_status = first(sch, 25)
            status = TRIGGER_STATUS.get(trigger)
            if status is None and trigger not in ("S15", "S16", "S17", "S26"):
                status = FILLER_STATUS.get(filler_status.lower()) if filler_status else None
            if trigger in ("S12", "S13") and status is None:
                status = "booked"
            appointment = AppointmentFact(
                facility=facility, appointment_id=filler or placer, placer_id=placer, filler_id=filler,
                trigger=trigger, event=TRIGGER_EVENT.get(trigger, trigger.lower() or "message"), status=status,
                filler_status=filler_status, start_at=start.at if start else None, start_day=start.day if start else None,
                patient_id=patient_id, visit_id=visit_id,
                location=first(message.segment("AIL"), 3) or first(pv1, 3),
                provider=first(message.segment("AIP"), 3) or first(pv1, 7),
                occurred_at=occurred_at,
            )
    charges = []
    for ft1 in message.all("FT1"):
        transaction_id = first(ft1, 2) or None
        service = read_time(first(ft1, 4), zone)
        made = read_time(first(ft1, 5), zone)
        type_code = first(ft1, 6).upper()
        amount_text = first(ft1, 11) or first(ft1, 12)
        try:
            amount = float(amount_text) if amount_text else None
        except ValueError:
            amount = None
        price = (ft1.repetitions(11) or ft1.repetitions(12) or [""])[0].split(comp, 1)[0].split(seps.subcomponent)
        currency = price[1].strip() if len(price) > 1 else ""
        charges.append(ChargeFact(
            facility=facility, charge_key=transaction_id or "", transaction_id=transaction_id,
            set_id=first(ft1, 1) or str(len(charges) + 1), type_code=type_code,
            kind=CHARGE_TYPES.get(type_code, "charge"), code=first(ft1, 7),
            service_at=service.at if service else None, service_day=service.day if service else None,
            made_at=made.at if made else occurred_at, amount=amount, currency=currency,
            patient_id=patient_id, visit_id=visit_id,
        ))
    return Facts(appointment, tuple(charges))


def key_for(charge: ChargeFact, message_id: int) -> str:
    """A charge line's key: its transaction ID, else the message and set ID (a replay of the same
    message gives the same key)."""
    return charge.transaction_id or f"message {message_id} line {charge.set_id}"
