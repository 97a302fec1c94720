"""The durable outbox: one delivery per (message, destination), in the journal. Plain SQL.

States: ``pending`` -> ``in_flight`` -> ``delivered``; a transient failure makes it ``retrying``
with a next attempt time (exponential backoff with jitter, or the server's Retry-After); a
permanent failure, or too many attempts, or too old, makes it ``dead`` until it is replayed.

Ordering: deliveries with the same key (the same patient, or appointment, or account, as the
destination says) to the same destination go out in the order they were created; a delivery that
is not yet delivered (retrying or dead) holds back later ones with its key, and only those.

Everything here runs inside the journal's writer (one connection); nothing touches the network.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from .destinations import Destination
from ..store.journal import Journal

PENDING, IN_FLIGHT, DELIVERED, RETRYING, DEAD = "pending", "in_flight", "delivered", "retrying", "dead"
STATES = (PENDING, IN_FLIGHT, RETRYING, DELIVERED, DEAD)
OK, TRANSIENT, PERMANENT = "ok", "transient", "permanent"
RESPONSE_KEPT = 2000  # characters of a response body kept with an attempt (the journal, not the log)


def iso(moment: datetime) -> str:
    m = moment.astimezone(timezone.utc)
    return f"{m.year:04d}-{m.month:02d}-{m.day:02d}T{m.hour:02d}:{m.minute:02d}:{m.second:02d}.{m.microsecond:06d}Z"


def parse_iso(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


@dataclass
class Delivery:
    id: int
    message_id: int
    destination: str
    key: str
    state: str
    attempts: int
    created_at: str
    control_id: str = ""
    bundle: str | None = None
    # The message reused an earlier message's control ID with different content: its finance
    # event IDs carry this (its message ID) so the ERP does not take them for the earlier ones.
    discriminator: str = ""
    resumed: bool = False  # it was in flight when the engine stopped: its send may have happened


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


def create_deliveries(journal: Journal, message_id: int, destinations: list[Destination], now: datetime):
    """Queue a message's Bundle for each destination (inside the caller's transaction)."""
    if not destinations:
        return
    ids = [{"kind": k, "value": v, "authority": a} for k, v, a in journal.conn.execute(
        "SELECT kind, value, authority FROM message_ids WHERE message_id = ?", (message_id,))]
    stamp = iso(now)
    journal.conn.executemany(
        "INSERT INTO deliveries (message_id, destination, key, state, created_at, next_attempt_at, updated_at) "
        "VALUES (?, ?, ?, 'pending', ?, ?, ?)",
        [(message_id, d.name, ordering_key(d, ids, message_id), stamp, stamp, stamp) for d in destinations],
    )


def due(journal: Journal, destination: str, now: datetime, limit: int) -> list[Delivery]:
    """Deliveries of ``destination`` whose time has come and whose key nothing earlier holds back."""
    rows = journal.conn.execute(
        "SELECT d.id, d.message_id, d.destination, d.key, d.state, d.attempts, d.created_at, m.control_id, c.bundle, "
        "CASE WHEN m.duplicate_of IS NOT NULL THEN CAST(m.id AS TEXT) ELSE '' END "
        "FROM deliveries d JOIN messages m ON m.id = d.message_id "
        "LEFT JOIN conversions c ON c.message_id = d.message_id "
        "WHERE d.destination = ? AND d.state IN ('pending', 'retrying') AND d.next_attempt_at <= ? "
        "AND NOT EXISTS (SELECT 1 FROM deliveries e WHERE e.destination = d.destination AND e.key = d.key "
        "                AND e.id < d.id AND e.state != 'delivered') "
        "ORDER BY d.next_attempt_at, d.id LIMIT ?",
        (destination, iso(now), limit),
    ).fetchall()
    return [Delivery(*row) for row in rows]


def claim(journal: Journal, deliveries: list[Delivery], now: datetime):
    """Mark deliveries in flight (committed before anything is sent)."""
    with journal.transaction():
        journal.conn.executemany(
            "UPDATE deliveries SET state = 'in_flight', updated_at = ? WHERE id = ?",
            [(iso(now), d.id) for d in deliveries],
        )


@dataclass
class Result:
    """What one attempt came to."""

    outcome: str  # OK, TRANSIENT or PERMANENT
    status: int | None = None  # HTTP status, when there was one
    response: str = ""  # the start of the response body, or the error
    retry_after: float | None = None  # seconds, from a 429/503 Retry-After
    error: str = ""  # a short reason, for the journal and the log (no message content)
    notice: str = ""  # something the operator should know even though it worked (logged; no content)


def finish(journal: Journal, delivery: Delivery, destination: Destination, result: Result,
           started: datetime, finished: datetime, rand=random.random) -> str:
    """Record an attempt and move the delivery to its next state; returns that state."""
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
    with journal.transaction():
        journal.conn.execute(
            "INSERT INTO attempts (delivery_id, started_at, duration_ms, outcome, status, response) VALUES (?, ?, ?, ?, ?, ?)",
            (delivery.id, iso(started), round((finished - started).total_seconds() * 1000, 3), result.outcome,
             result.status, (result.response or "")[:RESPONSE_KEPT]),
        )
        journal.conn.execute(
            "UPDATE deliveries SET state = ?, attempts = ?, next_attempt_at = ?, updated_at = ?, last_error = ?, "
            "delivered_at = CASE WHEN ? = 'delivered' THEN ? ELSE delivered_at END WHERE id = ?",
            (state, attempts, iso(next_at), iso(finished), reason, state, iso(finished), delivery.id),
        )
    return state


def recover(journal: Journal, now: datetime) -> list[int]:
    """After a crash, deliveries left in flight are retried at once; returns their IDs.

    Their send may or may not have happened: FHIR and ERP writes are idempotent, and the file
    destination looks for its own record first (``Delivery.resumed``).
    """
    with journal.transaction():
        ids = [row[0] for row in journal.conn.execute("SELECT id FROM deliveries WHERE state = 'in_flight'")]
        journal.conn.execute(
            "UPDATE deliveries SET state = 'retrying', next_attempt_at = ?, updated_at = ? WHERE state = 'in_flight'",
            (iso(now), iso(now)),
        )
    return ids


def summary(journal: Journal) -> list[dict]:
    """Per destination: how many deliveries in each state, and the oldest undelivered."""
    rows = journal.conn.execute(
        "SELECT destination, state, count(*), min(created_at) FROM deliveries GROUP BY destination, state"
    ).fetchall()
    table: dict[str, dict] = {}
    for destination, state, count, oldest in rows:
        entry = table.setdefault(destination, {"destination": destination, **{s: 0 for s in STATES}, "oldest_open": None})
        entry[state] = count
        if state != DELIVERED and oldest and (entry["oldest_open"] is None or oldest < entry["oldest_open"]):
            entry["oldest_open"] = oldest
    return [table[name] for name in sorted(table)]


def list_deliveries(journal: Journal, destination: str | None = None, state: str | None = None,
                    limit: int = 50) -> list[dict]:
    where, params = [], []
    if destination:
        where.append("d.destination = ?")
        params.append(destination)
    if state:
        where.append("d.state = ?")
        params.append(state)
    sql = ("SELECT d.id, d.message_id, m.control_id, d.destination, d.key, d.state, d.attempts, d.created_at, "
           "d.next_attempt_at, d.last_error FROM deliveries d JOIN messages m ON m.id = d.message_id")
    if where:
        sql += " WHERE " + " AND ".join(where)
    sql += " ORDER BY d.id DESC LIMIT ?"
    cursor = journal.conn.execute(sql, (*params, limit))
    names = [c[0] for c in cursor.description]
    return [dict(zip(names, row)) for row in cursor]


def replay(journal: Journal, message_ids: list[int], destinations: list[str] | None, who: str, why: str,
           now: datetime, only_dead: bool = False, remapped: bool = False) -> int:
    """Send messages again: their deliveries (to all or the named destinations) start over as pending.

    Every replay is recorded (who, when, why). Returns how many deliveries were reset.
    """
    stamp = iso(now)
    count = 0
    with journal.transaction():
        for message_id in message_ids:
            where = "message_id = ?"
            params: list = [message_id]
            if destinations:
                where += f" AND destination IN ({', '.join('?' for _ in destinations)})"
                params += destinations
            if only_dead:
                where += " AND state = 'dead'"
            cursor = journal.conn.execute(
                f"UPDATE deliveries SET state = 'pending', attempts = 0, created_at = ?, next_attempt_at = ?, "
                f"updated_at = ?, last_error = NULL WHERE {where} AND state != 'in_flight'",
                (stamp, stamp, stamp, *params),
            )
            count += cursor.rowcount
            journal.conn.execute(
                "INSERT INTO replays (message_id, destination, requested_at, who, why, remapped) VALUES (?, ?, ?, ?, ?, ?)",
                (message_id, json.dumps(destinations) if destinations else None, stamp, who, why, int(remapped)),
            )
    return count
