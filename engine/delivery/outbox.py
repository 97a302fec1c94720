"""The outbox rules: delivery states, what an attempt came to, the next state, the ordering key.

Plain Python, no storage and no network: the journal (``engine.store``) keeps the deliveries and
their attempts, the dispatcher sends them, and these functions decide.

States: ``pending`` -> ``in_flight`` -> ``delivered``; a transient failure makes it ``retrying``
with a next attempt time (exponential backoff with jitter, or the server's Retry-After); a
permanent failure, or too many attempts, or too old, makes it ``dead`` until it is replayed.

Ordering: deliveries with the same key (the same patient, or appointment, or account, as the
destination says) to the same destination go out in the order they were created; a delivery that
is not yet delivered (retrying or dead) holds back later ones with its key, and only those.
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


def ordering_key(destination: Destination, ids: list[dict], message_id: int) -> str:
    """The key that orders deliveries for ``destination``: its order_by identifier, else the message."""
    wanted = {"patient": ("patient",), "appointment": ("filler_appointment", "placer_appointment"),
              "account": ("account",)}.get(destination.order_by, ())
    for kind in wanted:
        for ident in ids:
            if ident["kind"] == kind:
                authority = ident.get("authority")
                return f"{kind}:{authority}|{ident['value']}" if authority else f"{kind}:{ident['value']}"
    return f"message:{message_id}"


def queue(journal: Journal, message_id: int, destinations: list[Destination], now: datetime):
    """Queue a message's Bundle for each destination, inside the caller's transaction: the one
    place deliveries are created (ingest, the converter and replay --remap all come here)."""
    if not destinations:
        return
    ids = journal.message_identifiers(message_id)
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


def summarize(counts: list[tuple[str, str, int, str | None]]) -> list[dict]:
    """Per destination: how many deliveries in each state, and the oldest undelivered, from
    ``Journal.outbox_counts()`` rows."""
    table: dict[str, dict] = {}
    for destination, state, count, oldest in counts:
        entry = table.setdefault(destination, {"destination": destination, **{s: 0 for s in STATES}, "oldest_open": None})
        entry[state] = count
        if state != DELIVERED and oldest and (entry["oldest_open"] is None or oldest < entry["oldest_open"]):
            entry["oldest_open"] = oldest
    return [table[name] for name in sorted(table)]


def summary(journal: Journal) -> list[dict]:
    """The outbox per destination (``hl7bridge outbox``, the dashboard)."""
    return summarize(journal.outbox_counts())
