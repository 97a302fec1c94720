"""Keeping the scheduling-to-cash record current: the I/O edge of ``engine.reconcile``.

``apply`` runs for every message the pipeline journals (``engine.transform.pipeline.record``,
inside its transaction): it stores the message's appointment event and charge lines, brings the
appointment's current state up to date (``rules.current_state`` over all its events, so the order
messages arrive in, replays and resends do not matter) and links charges to appointments
(``rules.choose_link``) in both directions: a charge to the appointment it belongs to, and an
appointment, when it is booked or changed, to the charges that were waiting for it.

``rebuild`` forgets the record and reads every mapped message of the journal again.
"""

from __future__ import annotations

from ..errors import ParseError
from ..store.base import Journal
from . import rules
from .facts import Facts, extract, key_for, zone_of
from .settings import ReconcileSettings


def apply(journal: Journal, message_id: int, received_at: str, facts: Facts, settings: ReconcileSettings):
    """Store one message's facts and relink what they touch, inside the caller's transaction."""
    if facts.appointment is not None:
        _appointment(journal, message_id, facts.appointment, settings)
    if not facts.charges:
        return
    # The lines of one message share its patient and visit: one look for their appointments.
    first = facts.charges[0]
    candidates = journal.link_candidates(first.facility, first.visit_id, first.patient_id)
    charged = set()
    for charge in facts.charges:
        line = dict(vars(charge), charge_key=key_for(charge, message_id))
        line.update(_link_fields(line, candidates, settings))
        journal.record_charge_line(message_id, received_at, line)
        if line["appointment_id"] is not None and charge.kind in rules.VISIT_LINES:
            charged.add(line["appointment_id"])
    for appointment_id in sorted(charged):
        journal.refresh_charged(first.facility, appointment_id, linked=True)


def _link_fields(charge: dict, candidates: list[dict], settings: ReconcileSettings) -> dict:
    """The link columns of a charge line: its appointment, the rule, the appointment's start, and
    the lag from the service (the appointment's start; without one, the service date) to the
    charge being made."""
    choice = rules.choose_link(charge, candidates, settings.rules(charge["facility"])) if candidates else None
    if choice is None:
        return {"appointment_id": None, "link_rule": None, "appointment_start": None,
                "lag_s": rules.lag_seconds(charge["service_at"], charge["made_at"])}
    appointment_id, rule = choice
    start = next(c["start_at"] for c in candidates if c["appointment_id"] == appointment_id)
    return {"appointment_id": appointment_id, "link_rule": rule, "appointment_start": start,
            "lag_s": rules.lag_seconds(start, charge["made_at"])}


def link(journal: Journal, charge: dict, settings: ReconcileSettings):
    """Link one stored charge line again (its appointment was booked or changed): to the
    appointment the facility's rules choose now, or to none."""
    candidates = journal.link_candidates(charge["facility"], charge["visit_id"] or "", charge["patient_id"] or "")
    fields = _link_fields(charge, candidates, settings)
    if any(fields[key] != charge[key] for key in ("appointment_id", "link_rule", "appointment_start")):
        journal.set_charge_link(charge["facility"], charge["charge_key"], fields["appointment_id"], fields["link_rule"],
                                fields["appointment_start"], fields["lag_s"])
        if charge["kind"] in rules.VISIT_LINES:
            for appointment_id in {charge["appointment_id"], fields["appointment_id"]} - {None}:
                journal.refresh_charged(charge["facility"], appointment_id)


def _appointment(journal: Journal, message_id: int, fact, settings: ReconcileSettings):
    journal.record_appointment_event(message_id, vars(fact))
    events = journal.appointment_events(fact.facility, fact.appointment_id)
    state = rules.current_state(events)
    journal.put_appointment(fact.facility, fact.appointment_id, state)
    # A charge waiting for this appointment links now; one linked to it by an earlier event may
    # move (a reschedule changes the day). Nothing is linked to an appointment's first event yet.
    for charge in journal.charges_to_relink(fact.facility, fact.appointment_id, state["visit_id"], state["patient_id"],
                                            linked=len(events) > 1):
        link(journal, charge, settings)


def rebuild(journal: Journal, settings: ReconcileSettings, timezones: dict, read, batch: int = 500,
            progress=None) -> int:
    """Forget the record and build it again from every mapped (or unmappable) message, oldest
    first, in batches of their own transactions. ``read(raw, charset)`` parses a message (the
    pipeline's reader); ``timezones`` maps a route to its time zone name. Returns how many
    messages were read."""
    with journal.transaction():
        journal.clear_reconcile()
    last, total = 0, 0
    while True:
        rows = journal.reconcile_sources(last, batch)
        if not rows:
            return total
        with journal.transaction():
            for message_id, raw, charset, route, received_at in rows:
                try:
                    message = read(raw, charset or "utf-8")
                except ParseError:
                    continue  # not readable: it has no facts (the journal says why)
                apply(journal, message_id, received_at, extract(message, received_at, zone_of(timezones.get(route))),
                      settings)
        last = rows[-1][0]
        total += len(rows)
        if progress is not None:
            progress(len(rows))
