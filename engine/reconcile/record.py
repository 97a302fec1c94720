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

from dataclasses import asdict

from ..errors import ParseError
from ..store.base import Journal
from . import rules
from .facts import Facts, extract, key_for, zone_of
from .settings import ReconcileSettings


def apply(journal: Journal, message_id: int, received_at: str, facts: Facts, settings: ReconcileSettings):
    """Store one message's facts and relink what they touch, inside the caller's transaction."""
    if facts.appointment is not None:
        _appointment(journal, message_id, facts.appointment, settings)
    for charge in facts.charges:
        line = asdict(charge)
        line["charge_key"] = key_for(charge, message_id)
        row = journal.record_charge_line(message_id, received_at, line)
        if row["appointment_id"] is None:
            link(journal, row, settings)


def link(journal: Journal, charge: dict, settings: ReconcileSettings):
    """Link one charge line to its appointment (or to none) by the facility's rules."""
    candidates = journal.link_candidates(charge["facility"], charge["visit_id"] or "", charge["patient_id"] or "")
    choice = rules.choose_link(charge, candidates, settings.rules(charge["facility"]))
    if choice is None:
        if charge["appointment_id"] is not None:
            journal.set_charge_link(charge["facility"], charge["charge_key"], None, None, None, None)
        return
    appointment_id, rule = choice
    start = next(c["start_at"] for c in candidates if c["appointment_id"] == appointment_id)
    if (appointment_id, rule, start) != (charge["appointment_id"], charge["link_rule"], charge["appointment_start"]):
        journal.set_charge_link(charge["facility"], charge["charge_key"], appointment_id, rule, start,
                                rules.lag_seconds(start, charge["made_at"]))


def _appointment(journal: Journal, message_id: int, fact, settings: ReconcileSettings):
    journal.record_appointment_event(message_id, asdict(fact))
    state = rules.current_state(journal.appointment_events(fact.facility, fact.appointment_id))
    journal.put_appointment(fact.facility, fact.appointment_id, state)
    for charge in journal.charges_to_relink(fact.facility, fact.appointment_id, state["visit_id"], state["patient_id"]):
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
