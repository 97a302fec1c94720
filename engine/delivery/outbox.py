"""The outbox rules: delivery states, what an attempt came to, the next state, the ordering key.

Plain Python, no storage and no network: the journal (``engine.store``) keeps the deliveries and
their attempts, the dispatcher sends them, and these functions decide.

States: ``pending`` -> ``in_flight`` -> ``delivered``; a transient failure makes it ``retrying``
with a next attempt time (exponential backoff with jitter, or the server's Retry-After); a
permanent failure, or too many attempts, or too old, makes it ``dead`` until it is replayed.

Ordering: deliveries with the same key (the same patient, or appointment, or account, as the
destination says) to the same destination go out in the order their messages arrived (journal
order), whichever way the messages were mapped. A delivery that is not yet delivered (retrying or
dead) holds back later ones with its key, and only those; so does a message still waiting for a
converter: it is journaled with its *expected* deliveries (``expected``: the destinations its
route sends to, with their keys), which hold back later messages' deliveries with those keys
until its conversion is recorded (mapped, or a mapping error: either releases them).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import datetime, timedelta

from ..stamps import parse_iso
from ..store.base import (  # noqa: F401 (the states are the journal's; re-exported for the delivery side)
    DEAD,
    DELIVERED,
    DELIVERY_STATES as STATES,
    IN_FLIGHT,
    PENDING,
    RETRYING,
    Attempt,
    Delivery,
    Journal,
    NextState,
)
from .destinations import Destination

OK, TRANSIENT, PERMANENT = "ok", "transient", "permanent"


@dataclass
class Result:
    """What one attempt came to."""

    outcome: str  # OK, TRANSIENT or PERMANENT
    status: int | None = None  # HTTP status, when there was one
    response: str = ""  # the start of the response body, or the error
    retry_after: float | None = None  # seconds, from a 429/503 Retry-After
    error: str = ""  # a short reason, for the journal and the log (no message content)
    notice: str = ""  # something the operator should know even though it worked (logged; no content)


ORDER_KINDS = {"patient": ("patient",), "appointment": ("filler_appointment", "placer_appointment"),
               "account": ("account",)}


def identifier_key(destination: Destination, ids: list[tuple[str, str, str]]) -> str | None:
    """The key that orders deliveries for ``destination`` among messages: its ``order_by``
    identifier (SCH-2 before SCH-1 for ``appointment``), or None when the destination orders no
    messages together (``message``, ``none``) or the message has no such identifier. ``ids`` are
    (kind, value, authority) in any order: with several of a kind (PID-3 repeats), the one that
    sorts first by value and authority, so the key is the same whichever order they come in and
    whether they are read from the message or from the journal."""
    for kind in ORDER_KINDS.get(destination.order_by, ()):
        found = [(value, authority or "") for k, value, authority in ids if k == kind]
        if found:
            value, authority = min(found)
            return f"{kind}:{authority}|{value}" if authority else f"{kind}:{value}"
    return None


def ordering_key(destination: Destination, ids: list[tuple[str, str, str]], message_id: int) -> str:
    """The key that orders deliveries for ``destination``: its order_by identifier, else the message."""
    return identifier_key(destination, ids) or f"message:{message_id}"


def expected(destinations: list[Destination], ids: list[tuple[str, str, str]]) -> list[tuple[str, str]]:
    """(destination, key) of the deliveries a message waiting for conversion will be queued with,
    for the destinations that order it with others (by its ``ids``): journaled with the message
    (``Entry.expected``), they hold back later messages' deliveries with those keys until it is
    converted. The same keys ``queue`` gives its deliveries then."""
    keyed = [(d.name, identifier_key(d, ids)) for d in destinations]
    return [(name, key) for name, key in keyed if key is not None]


def queue(journal: Journal, message_id: int, destinations: list[Destination], now: datetime):
    """Queue a message's Bundle for each destination, inside the caller's transaction: the one
    place deliveries are created (ingest, the converter and replay --remap all come here)."""
    if not destinations:
        return
    ids = [(i["kind"], i["value"], i["authority"]) for i in journal.message_identifiers(message_id)]
    journal.create_deliveries(message_id, [(d.name, ordering_key(d, ids, message_id)) for d in destinations], now)


def next_state(delivery: Delivery, destination: Destination, result: Result, finished: datetime,
               rand=random.random) -> NextState:
    """Where a delivery goes after an attempt that came to ``result``."""
    attempts = delivery.attempts + 1
    if result.outcome == OK:
        state, next_at = DELIVERED, finished
    elif result.outcome == PERMANENT:
        state, next_at = DEAD, finished
    else:
        age = (finished - parse_iso(delivery.created_at)).total_seconds()
        if attempts >= destination.retry.max_attempts or age >= destination.retry.max_age:
            state, next_at = DEAD, finished
        else:
            wait = result.retry_after if result.retry_after is not None else destination.retry.delay(attempts, rand())
            state, next_at = RETRYING, finished + timedelta(seconds=wait)
    reason = None if state == DELIVERED else result.error or f"HTTP {result.status}"
    if state == DEAD and result.outcome == TRANSIENT:
        reason = f"gave up after {attempts} attempts: {reason}"
    return NextState(state, attempts, next_at, reason)


def finish(journal: Journal, delivery: Delivery, destination: Destination, result: Result,
           started: datetime, finished: datetime, rand=random.random) -> str:
    """Record an attempt and move the delivery to its next state; returns that state."""
    decided = next_state(delivery, destination, result, finished, rand)
    attempt = Attempt(started, finished, result.outcome, result.status, result.response)
    journal.finish_attempt(delivery, attempt, decided)
    return decided.state


def summarize(counts: list[tuple[str, str, int, str | None]],
              holds: list[tuple[str, int, str | None, int]] = ()) -> list[dict]:
    """Per destination: how many deliveries in each state, and the oldest undelivered, from
    ``Journal.outbox_counts()`` rows; and from ``Journal.outbox_holds()`` rows, how many messages
    waiting for conversion will be delivered there (``unconverted``, the oldest received at
    ``oldest_unconverted``) and how many pending deliveries wait for them (``held``: an earlier
    message with their key is not converted yet)."""
    table: dict[str, dict] = {}

    def row(destination):
        return table.setdefault(destination, {"destination": destination, **{s: 0 for s in STATES}, "oldest_open": None,
                                              "unconverted": 0, "held": 0, "oldest_unconverted": None})

    for destination, state, count, oldest in counts:
        entry = row(destination)
        entry[state] = count
        if state != DELIVERED and oldest and (entry["oldest_open"] is None or oldest < entry["oldest_open"]):
            entry["oldest_open"] = oldest
    for destination, unconverted, oldest, held in holds:
        entry = row(destination)
        entry["unconverted"], entry["oldest_unconverted"], entry["held"] = unconverted, oldest, held
    return [table[name] for name in sorted(table)]


def summary(journal: Journal) -> list[dict]:
    """The outbox per destination (``hl7bridge outbox``, the dashboard)."""
    return summarize(journal.outbox_counts(), journal.outbox_holds())


def waits_for(delivery: dict) -> str:
    """What holds a listed delivery (``Journal.list_deliveries``) back, in words; "" when nothing
    does (it is due, or not pending)."""
    if delivery.get("waits_for_message") is not None:
        return f"message {delivery['waits_for_message']} (same key, not converted yet)"
    if delivery.get("waits_for_delivery") is not None:
        return f"delivery {delivery['waits_for_delivery']} (same key, {delivery['waits_for_state']})"
    return ""


def deliveries(journal: Journal, destination: str | None = None, state: str | None = None,
               limit: int = 50) -> list[dict]:
    """Deliveries, newest first (``Journal.list_deliveries``), each with ``waits_for``: what holds
    it back, in words (``hl7bridge outbox --destination``)."""
    rows = journal.list_deliveries(destination, state, limit)
    for row in rows:
        row["waits_for"] = waits_for(row)
    return rows
