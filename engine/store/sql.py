"""The journal in SQL, once for both backends: ``SqlJournal`` holds every query SQLite and
PostgreSQL share; ``engine.store.sqlite`` and ``engine.store.postgres`` add their connections,
schema and migrations, durability, free text and the few expressions that differ.

The schema is the same on both (the same tables and columns, so operators and scripts see one
journal): ``messages`` (one row per received frame, the exact bytes and the fields operators
search by), ``message_ids`` (every identifier, for keyed search and ordering keys),
``conversions``, the outbox (``deliveries`` and their ``attempts``, and the
``expected_deliveries`` of messages waiting for conversion), ``replays``, and the multi-worker
tables: ``conversion_claims`` and ``jobs`` (see ``engine.store.base``). Times are
ISO 8601 text in UTC (``engine.stamps.iso``) on both, so text order is time order and one query
compares them on either.

Statements are written with ``?`` placeholders; a backend runs them through five helpers
(``_all``, ``_one``, ``_rows``, ``_run``, ``_many``) that take the parameters as arguments.
"""

from __future__ import annotations

import json
from abc import abstractmethod
from datetime import datetime, timedelta

from ..hl7.identifiers import ID_KINDS
from ..stamps import iso
from .base import (
    RESPONSE_KEPT,
    SUMMARY_COLUMNS,
    Attempt,
    ConversionRecord,
    Delivery,
    Entry,
    Journal,
    NextState,
    PruneResult,
    SearchQuery,
    Waiting,
)
from .retention import BATCH, ERROR_STATUSES
from .sql_reconcile import ReconcileQueries

INSERT_COLUMNS = (
    "received_at", "listener", "peer", "control_id", "message_type", "trigger_event",
    "message_structure", "version", "processing_id", "sending_application", "sending_facility",
    "receiving_application", "receiving_facility", "patient_id", "placer_appointment_id",
    "filler_appointment_id", "transaction_id", "status", "error", "error_code", "error_location",
    "warning", "duplicate_of", "charset", "size", "truncated", "ack_code", "ack", "ack_sent", "raw", "route", "acked_at",
)
INSERT_SQL = (
    f"INSERT INTO messages ({', '.join(INSERT_COLUMNS)}) "
    f"VALUES ({', '.join('?' for _ in INSERT_COLUMNS)}) RETURNING id"
)

# Claim waiting messages in one statement: (worker, lease end, now, worker, limit, now, worker).
# A claim is taken when there is none, when its lease expired, or when it is the worker's own;
# the ON CONFLICT ... WHERE makes that check and the claim one atomic step on either backend.
CLAIM_CONVERSIONS_SQL = (
    "INSERT INTO conversion_claims (message_id, worker, lease_expires_at) "
    "SELECT m.id, ?, ? FROM messages m WHERE m.status = 'accepted' AND m.route IS NOT NULL "
    "AND NOT EXISTS (SELECT 1 FROM conversion_claims c WHERE c.message_id = m.id AND c.lease_expires_at > ? "
    "AND c.worker != ?) ORDER BY m.id LIMIT ?{lock} "
    "ON CONFLICT (message_id) DO UPDATE SET worker = excluded.worker, lease_expires_at = excluded.lease_expires_at "
    "WHERE conversion_claims.lease_expires_at <= ? OR conversion_claims.worker = ? "
    "RETURNING message_id"
)

# What holds back delivery d: an earlier message with its key that waits for conversion (its
# expected delivery to d's destination). Probes the (destination, key, message_id) index of a table
# as small as the converters' backlog; the message's status is checked too, so a row left behind by
# any path that converted a message without removing it could never hold a key for good.
HELD_FOR_CONVERSION = (
    "SELECT 1 FROM expected_deliveries x JOIN messages w ON w.id = x.message_id "
    "WHERE x.destination = d.destination AND x.key = d.key AND x.message_id < d.message_id "
    "AND w.status = 'accepted'"
)

# Due deliveries of a destination, in order: (destination, now, limit). A delivery waits while one
# with its key for an earlier message is not delivered (pending, in flight on any node, retrying or
# dead), and while an earlier message with its key is not converted yet. Earlier by message, not
# by delivery: a later message may be mapped (and its delivery created) before an earlier one, by
# another converter or before its ACK (``ack.after: mapping``).
DUE_SQL = (
    "SELECT d.id, d.message_id, d.destination, d.key, d.state, d.attempts, d.created_at, m.control_id, c.bundle, "
    "CASE WHEN m.duplicate_of IS NOT NULL THEN CAST(m.id AS TEXT) ELSE '' END, d.resumed != 0 "
    "FROM deliveries d JOIN messages m ON m.id = d.message_id "
    "LEFT JOIN conversions c ON c.message_id = d.message_id "
    "WHERE d.destination = ? AND d.state IN ('pending', 'retrying') AND d.next_attempt_at <= ? "
    "AND NOT EXISTS (SELECT 1 FROM deliveries e WHERE e.destination = d.destination AND e.key = d.key "
    "                AND e.message_id < d.message_id AND e.state != 'delivered') "
    f"AND NOT EXISTS ({HELD_FOR_CONVERSION}) "
    "ORDER BY d.next_attempt_at, d.id LIMIT ?{lock}"
)

# Take a scheduled job: (name, worker, lease end, now, now, due before). Taken when nobody holds
# it (or the holder's lease expired) and its last run started a period ago or more.
TAKE_JOB_SQL = (
    "INSERT INTO jobs (name, worker, lease_expires_at, last_started_at) VALUES (?, ?, ?, ?) "
    "ON CONFLICT (name) DO UPDATE SET worker = excluded.worker, lease_expires_at = excluded.lease_expires_at, "
    "last_started_at = excluded.last_started_at "
    "WHERE (jobs.worker IS NULL OR jobs.lease_expires_at <= ?) "
    "AND (jobs.last_started_at IS NULL OR jobs.last_started_at <= ?) RETURNING name"
)


# The expected deliveries of messages waiting for conversion (schema 8, the same on both backends).
EXPECTED_DELIVERIES = (
    "CREATE TABLE expected_deliveries (message_id BIGINT NOT NULL REFERENCES messages(id), destination TEXT NOT NULL, "
    "key TEXT NOT NULL, PRIMARY KEY (message_id, destination))",
    "CREATE INDEX idx_expected_deliveries_key ON expected_deliveries (destination, key, message_id)",
)

# An expected delivery of a message waiting for conversion: (message ID, destination, key).
EXPECT_SQL = "INSERT INTO expected_deliveries (message_id, destination, key) VALUES (?, ?, ?) ON CONFLICT DO NOTHING"

# What holds back a listed delivery d (when pending or retrying): the oldest earlier message with
# its key waiting for conversion; the oldest earlier undelivered delivery with its key, and its state.
_OPEN = "d.state IN ('pending', 'retrying')"
_EARLIER = ("FROM deliveries e WHERE e.destination = d.destination AND e.key = d.key AND e.message_id < d.message_id "
            "AND e.state != 'delivered' ORDER BY e.message_id LIMIT 1")
WAITS_FOR = (
    f"CASE WHEN {_OPEN} THEN ({HELD_FOR_CONVERSION.replace('SELECT 1', 'SELECT x.message_id')} "
    "ORDER BY x.message_id LIMIT 1) END AS waits_for_message, "
    f"CASE WHEN {_OPEN} THEN (SELECT e.id {_EARLIER}) END AS waits_for_delivery, "
    f"CASE WHEN {_OPEN} THEN (SELECT e.state {_EARLIER}) END AS waits_for_state"
)


def marks(values) -> str:
    """``?, ?, ?`` for an IN list of ``values``."""
    return ", ".join("?" for _ in values)


class SqlJournal(ReconcileQueries, Journal):
    """Every query both backends share. A backend provides the helpers and ``transaction``, and
    sets the few differences: ``SKIP_LOCKED`` (what a claim's SELECT adds so workers pass over
    rows another is claiming), ``SECONDS_BETWEEN`` (seconds from ``m.received_at`` to ``{b}``)."""

    SKIP_LOCKED = ""
    SECONDS_BETWEEN = "({b} - m.received_at)"
    SECONDS_SPAN = "({b} - {a})"  # seconds from {a} to {b}, both ISO text

    # -- the helpers a backend provides ---------------------------------------------------------------

    @abstractmethod
    def _all(self, sql: str, *params) -> list[tuple]:
        """Every row of a statement."""

    def _one(self, sql: str, *params) -> tuple | None:
        rows = self._all(sql, *params)
        return rows[0] if rows else None

    @abstractmethod
    def _rows(self, sql: str, *params) -> list[dict]:
        """Every row, as dicts by column name."""

    @abstractmethod
    def _run(self, sql: str, *params) -> int:
        """Run a statement that returns no rows; how many rows it changed."""

    @abstractmethod
    def _many(self, sql: str, rows: list[tuple]):
        """Run one statement for each parameter tuple (in one round trip where the backend can)."""

    def _lock_destination(self, destination: str):
        """Inside a transaction: hold ``destination`` for counting and claiming its deliveries.
        Nothing by default (SQLite's write lock holds everything)."""

    def _forget_text(self, ids: list[int]):
        """Inside the prune transaction: take these messages out of the free-text index."""

    # -- ingest ---------------------------------------------------------------------------------------

    def accepted_with_key(self, sending_facility: str, control_id: str) -> list[tuple]:
        return self._all(
            "SELECT id, ack, ack_code, raw FROM messages WHERE sending_facility = ? AND control_id = ? "
            "AND ack_code IN ('AA', 'CA') AND status != 'duplicate' ORDER BY id", sending_facility, control_id)

    def accepted_with_keys(self, keys: list[tuple[str, str]]) -> dict[tuple[str, str], list[tuple]]:
        wanted = set(keys)
        control_ids = sorted({control_id for _, control_id in wanted})
        found: dict[tuple[str, str], list[tuple]] = {}
        for start in range(0, len(control_ids), 500):
            chunk = control_ids[start : start + 500]
            # By control ID alone: the leading column of the (control_id, sending_facility) index.
            for facility, control_id, *row in self._all(
                    "SELECT sending_facility, control_id, id, ack, ack_code, raw FROM messages "
                    f"WHERE control_id IN ({marks(chunk)}) AND ack_code IN ('AA', 'CA') AND status != 'duplicate' "
                    "ORDER BY id", *chunk):
                if (facility, control_id) in wanted:
                    found.setdefault((facility, control_id), []).append(tuple(row))
        return found

    def _entry_row(self, entry: Entry) -> tuple:
        return (
            entry.received_at, entry.listener, entry.peer, entry.control_id, entry.message_type,
            entry.trigger_event, entry.message_structure, entry.version, entry.processing_id,
            entry.sending_application, entry.sending_facility, entry.receiving_application,
            entry.receiving_facility, entry.patient_id, entry.first_id("placer_appointment"),
            entry.first_id("filler_appointment"), entry.first_id("transaction"), entry.status,
            entry.error, entry.error_code, entry.error_location, entry.warning, entry.duplicate_of,
            entry.charset, len(entry.raw), int(entry.truncated), entry.ack_code, entry.ack,
            int(entry.ack_sent), entry.raw, entry.route, entry.acked_at,
        )

    def insert(self, entry: Entry) -> int:
        message_id = self._all(INSERT_SQL, *self._entry_row(entry))[0][0]
        if entry.conversion is not None:
            self.record_conversion(message_id, entry.conversion)
        if entry.ids:
            self._many(
                "INSERT INTO message_ids (message_id, kind, value, authority) VALUES (?, ?, ?, ?) ON CONFLICT DO NOTHING",
                [(message_id, kind, value, authority) for kind, value, authority in entry.ids])
        if entry.expected:
            self._many(EXPECT_SQL, [(message_id, destination, key) for destination, key in entry.expected])
        return message_id

    # -- conversion -----------------------------------------------------------------------------------

    def waiting_for_conversion(self, limit: int = 100) -> list[tuple[int, bytes, str, str]]:
        return self._all("SELECT id, raw, charset, route FROM messages WHERE status = 'accepted' AND route IS NOT NULL "
                         "ORDER BY id LIMIT ?", limit)

    def waiting_ids(self, limit: int) -> list[int]:
        return [row[0] for row in self._all("SELECT id FROM messages WHERE status = 'accepted' AND route IS NOT NULL "
                                            "ORDER BY id LIMIT ?", limit)]

    def claim_conversions(self, worker: str, limit: int, lease: float, now: datetime) -> list[Waiting]:
        stamp, until = iso(now), iso(now + timedelta(seconds=lease))
        with self.transaction():
            claimed = [row[0] for row in self._all(CLAIM_CONVERSIONS_SQL.format(lock=self.SKIP_LOCKED.format(table="m")),
                                                   worker, until, stamp, worker, limit, stamp, worker)]
            if not claimed:
                return []
            rows = self._all(f"SELECT id, raw, charset, route FROM messages WHERE id IN ({marks(claimed)}) ORDER BY id",
                             *claimed)
        return [Waiting(*row) for row in rows]

    def _renew(self, sql: str, worker: str, ids: list[int], lease: float, now: datetime) -> list[int]:
        """Extend a worker's leases: ``sql`` takes (lease end, worker, *ids) with {ids} for their marks."""
        if not ids:
            return []
        with self.transaction():
            return sorted(r[0] for r in self._all(sql.format(ids=marks(ids)), iso(now + timedelta(seconds=lease)),
                                                  worker, *ids))

    def renew_conversions(self, worker: str, ids: list[int], lease: float, now: datetime) -> list[int]:
        return self._renew("UPDATE conversion_claims SET lease_expires_at = ? WHERE worker = ? "
                           "AND message_id IN ({ids}) RETURNING message_id", worker, ids, lease, now)

    def finish_conversions(self, worker: str, ids: list[int]) -> list[int]:
        if not ids:
            return []
        return sorted(r[0] for r in self._all(
            f"DELETE FROM conversion_claims WHERE worker = ? AND message_id IN ({marks(ids)}) RETURNING message_id",
            worker, *ids))

    def message_source(self, message_id: int) -> tuple[bytes, str, str | None] | None:
        return self._one("SELECT raw, charset, route FROM messages WHERE id = ?", message_id)

    def record_conversion(self, message_id: int, record: ConversionRecord, update_status: bool = False,
                          route: str | None = None):
        if route is not None or update_status:
            self._run("UPDATE messages SET route = coalesce(?, route), status = coalesce(?, status) WHERE id = ?",
                      route, record.status if update_status else None, message_id)
        if update_status:
            self._run("DELETE FROM expected_deliveries WHERE message_id = ?", message_id)
        self._run(
            "INSERT INTO conversions (message_id, route, status, converted_at, bundle, problems) VALUES (?, ?, ?, ?, ?, ?) "
            "ON CONFLICT (message_id) DO UPDATE SET route = excluded.route, status = excluded.status, "
            "converted_at = excluded.converted_at, bundle = excluded.bundle, problems = excluded.problems",
            message_id, record.route, record.status, record.converted_at, record.bundle, record.problems)

    def waiting_without_expected(self, after_id: int, limit: int) -> list[tuple[int, str]]:
        return [tuple(row) for row in self._all(
            "SELECT m.id, m.route FROM messages m WHERE m.status = 'accepted' AND m.route IS NOT NULL AND m.id > ? "
            "AND NOT EXISTS (SELECT 1 FROM expected_deliveries x WHERE x.message_id = m.id) ORDER BY m.id LIMIT ?",
            after_id, limit)]

    def expect_deliveries(self, message_id: int, expected: list[tuple[str, str]]) -> int:
        if not expected:
            return 0
        with self.transaction():
            return sum(self._run(
                "INSERT INTO expected_deliveries (message_id, destination, key) SELECT id, ?, ? FROM messages "
                "WHERE id = ? AND status = 'accepted' AND route IS NOT NULL ON CONFLICT DO NOTHING",
                destination, key, message_id) for destination, key in expected)

    # -- the outbox -----------------------------------------------------------------------------------

    def message_identifiers(self, message_id: int) -> list[dict]:
        return [{"kind": k, "value": v, "authority": a} for k, v, a in self._all(
            "SELECT kind, value, authority FROM message_ids WHERE message_id = ? ORDER BY kind, value, authority",
            message_id)]

    def delivery_destinations(self, message_id: int) -> set[str]:
        return {r[0] for r in self._all("SELECT destination FROM deliveries WHERE message_id = ?", message_id)}

    def create_deliveries(self, message_id: int, deliveries: list[tuple[str, str]], now: datetime):
        if not deliveries:
            return
        stamp = iso(now)
        self._many(
            "INSERT INTO deliveries (message_id, destination, key, state, created_at, next_attempt_at, updated_at) "
            "VALUES (?, ?, ?, 'pending', ?, ?, ?) ON CONFLICT (message_id, destination) DO NOTHING",
            [(message_id, destination, key, stamp, stamp, stamp) for destination, key in deliveries])

    def due_deliveries(self, destination: str, now: datetime, limit: int) -> list[Delivery]:
        return [Delivery(*row) for row in self._all(DUE_SQL.format(lock=""), destination, iso(now), limit)]

    def claim_deliveries(self, destination: str, worker: str, now: datetime, limit: int, lease: float,
                         cluster_limit: int | None = None) -> list[Delivery]:
        stamp, until = iso(now), iso(now + timedelta(seconds=lease))
        with self.transaction():
            if cluster_limit is not None:
                self._lock_destination(destination)  # the count and the claim are one step for every node
                busy = self._one("SELECT count(*) FROM deliveries WHERE destination = ? AND state = 'in_flight'",
                                 destination)[0]
                limit = min(limit, cluster_limit - busy)
            if limit <= 0:
                return []
            found = [Delivery(*row) for row in self._all(DUE_SQL.format(lock=self.SKIP_LOCKED.format(table="d")),
                                                         destination, stamp, limit)]
            if not found:
                return []
            taken = {r[0] for r in self._all(
                "UPDATE deliveries SET state = 'in_flight', claimed_by = ?, lease_expires_at = ?, updated_at = ? "
                f"WHERE id IN ({marks(found)}) AND state IN ('pending', 'retrying') RETURNING id",
                worker, until, stamp, *(d.id for d in found))}
        for delivery in found:
            delivery.claimed_by = worker
        return [d for d in found if d.id in taken]

    def renew_deliveries(self, worker: str, ids: list[int], lease: float, now: datetime) -> list[int]:
        return self._renew("UPDATE deliveries SET lease_expires_at = ? WHERE claimed_by = ? AND state = 'in_flight' "
                           "AND id IN ({ids}) RETURNING id", worker, ids, lease, now)

    def finish_attempt(self, delivery: Delivery, attempt: Attempt, next_state: NextState) -> bool:
        finished = iso(attempt.finished)
        with self.transaction():
            self._run(
                "INSERT INTO attempts (delivery_id, started_at, duration_ms, outcome, status, response) VALUES (?, ?, ?, ?, ?, ?)",
                delivery.id, iso(attempt.started), round((attempt.finished - attempt.started).total_seconds() * 1000, 3),
                attempt.outcome, attempt.status, (attempt.response or "")[:RESPONSE_KEPT])
            moved = self._run(
                "UPDATE deliveries SET state = ?, attempts = ?, next_attempt_at = ?, updated_at = ?, last_error = ?, "
                "delivered_at = CASE WHEN ? = 'delivered' THEN ? ELSE delivered_at END, "
                "claimed_by = NULL, lease_expires_at = NULL, resumed = 0 WHERE id = ? AND (? = '' OR claimed_by = ?)",
                next_state.state, next_state.attempts, iso(next_state.next_attempt_at), finished, next_state.last_error,
                next_state.state, finished, delivery.id, delivery.claimed_by, delivery.claimed_by)
        return moved > 0

    def recover_in_flight(self, now: datetime, worker: str | None = None) -> list[int]:
        stamp = iso(now)
        with self.transaction():
            return sorted(r[0] for r in self._all(
                "UPDATE deliveries SET state = 'retrying', next_attempt_at = ?, updated_at = ?, resumed = 1, "
                "claimed_by = NULL, lease_expires_at = NULL WHERE state = 'in_flight' "
                "AND (lease_expires_at IS NULL OR lease_expires_at <= ? OR claimed_by = ?) RETURNING id",
                stamp, stamp, stamp, worker))

    # -- scheduled jobs -------------------------------------------------------------------------------

    def take_job(self, name: str, worker: str, every: float, lease: float, now: datetime) -> bool:
        with self.transaction():
            return self._one(TAKE_JOB_SQL, name, worker, iso(now + timedelta(seconds=lease)), iso(now), iso(now),
                             iso(now - timedelta(seconds=every))) is not None

    def renew_job(self, name: str, worker: str, lease: float, now: datetime) -> bool:
        with self.transaction():
            return self._one("UPDATE jobs SET lease_expires_at = ? WHERE name = ? AND worker = ? RETURNING name",
                             iso(now + timedelta(seconds=lease)), name, worker) is not None

    def finish_job(self, name: str, worker: str, now: datetime, outcome: str):
        with self.transaction():
            self._run("UPDATE jobs SET worker = NULL, lease_expires_at = NULL, last_finished_at = ?, last_outcome = ? "
                      "WHERE name = ? AND worker = ?", iso(now), outcome[:RESPONSE_KEPT], name, worker)

    def jobs(self) -> list[dict]:
        return self._rows("SELECT name, worker, lease_expires_at, last_started_at, last_finished_at, last_outcome "
                          "FROM jobs ORDER BY name")

    # -- the outbox, for operators --------------------------------------------------------------------

    def outbox_counts(self, open_only: bool = False) -> list[tuple[str, str, int, str | None]]:
        where = "WHERE state != 'delivered' " if open_only else ""
        return [tuple(row) for row in self._all(
            f"SELECT destination, state, count(*), min(created_at) FROM deliveries {where}"
            "GROUP BY destination, state ORDER BY destination, state")]

    def outbox_holds(self) -> list[tuple[str, int, str | None, int]]:
        waiting = {destination: (count, oldest) for destination, count, oldest in self._all(
            "SELECT x.destination, count(*), min(w.received_at) FROM expected_deliveries x "
            "JOIN messages w ON w.id = x.message_id WHERE w.status = 'accepted' GROUP BY x.destination")}
        if not waiting:
            return []
        # From the few keys held (each from its oldest waiting message) to the open deliveries with
        # them, through the open-keys index: never a walk of every pending delivery.
        held = dict(self._all(
            "SELECT k.destination, CAST(sum((SELECT count(*) FROM deliveries d "
            "WHERE d.destination = k.destination AND d.key = k.key AND d.message_id > k.first "
            "AND d.state != 'delivered' AND d.state IN ('pending', 'retrying'))) AS INTEGER) "
            "FROM (SELECT x.destination, x.key, min(x.message_id) AS first FROM expected_deliveries x "
            "JOIN messages w ON w.id = x.message_id WHERE w.status = 'accepted' GROUP BY x.destination, x.key) k "
            "GROUP BY k.destination"))
        return [(destination, count, oldest, held.get(destination, 0))
                for destination, (count, oldest) in sorted(waiting.items())]

    def list_deliveries(self, destination: str | None = None, state: str | None = None,
                        limit: int = 50) -> list[dict]:
        where, params = [], []
        if destination:
            where.append("d.destination = ?")
            params.append(destination)
        if state:
            where.append("d.state = ?")
            params.append(state)
        sql = ("SELECT d.id, d.message_id, m.control_id, d.destination, d.key, d.state, d.attempts, d.created_at, "
               f"d.next_attempt_at, d.last_error, {WAITS_FOR} FROM deliveries d JOIN messages m ON m.id = d.message_id")
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY d.id DESC LIMIT ?"
        return self._rows(sql, *params, limit)

    def replay(self, message_ids: list[int], destinations: list[str] | None, who: str, why: str,
               now: datetime, only_dead: bool = False, remapped: bool = False) -> int:
        stamp = iso(now)
        count = 0
        with self.transaction():
            for message_id in message_ids:
                where = "message_id = ?"
                params: list = [message_id]
                if destinations:
                    where += f" AND destination IN ({marks(destinations)})"
                    params += destinations
                if only_dead:
                    where += " AND state = 'dead'"
                count += self._run(
                    f"UPDATE deliveries SET state = 'pending', attempts = 0, created_at = ?, next_attempt_at = ?, "
                    f"updated_at = ?, last_error = NULL WHERE {where} AND state != 'in_flight'",
                    stamp, stamp, stamp, *params)
                self._run("INSERT INTO replays (message_id, destination, requested_at, who, why, remapped) "
                          "VALUES (?, ?, ?, ?, ?, ?)",
                          message_id, json.dumps(destinations) if destinations else None, stamp, who, why, int(remapped))
        return count

    def held_among(self, message_ids: list[int]) -> list[int]:
        held = []
        for start in range(0, len(message_ids), 500):
            chunk = message_ids[start : start + 500]
            held += [row[0] for row in self._all(
                f"SELECT id FROM messages WHERE status = 'held' AND id IN ({marks(chunk)})", *chunk)]
        return held

    def messages_with_dead_deliveries(self, destination: str) -> list[int]:
        return [r[0] for r in self._all(
            "SELECT DISTINCT message_id FROM deliveries WHERE destination = ? AND state = 'dead' ORDER BY message_id",
            destination)]

    def messages_with_control_id(self, control_id: str) -> list[int]:
        return [r[0] for r in self._all("SELECT id FROM messages WHERE control_id = ? ORDER BY id", control_id)]

    # -- reading --------------------------------------------------------------------------------------

    def check_readable(self):
        self._all("SELECT 1 FROM messages LIMIT 1")

    def get(self, message_id: int) -> dict | None:
        found = self._rows("SELECT * FROM messages WHERE id = ?", message_id)
        if not found:
            return None
        record = found[0]
        rows = self._all("SELECT kind, value, authority FROM message_ids WHERE message_id = ? "
                         "ORDER BY kind, value, authority", message_id)
        order = list(ID_KINDS)
        rows.sort(key=lambda row: order.index(row[0]) if row[0] in order else len(order))
        record["ids"] = [{"kind": kind, "value": value, "authority": authority} for kind, value, authority in rows]
        return record

    def conversion(self, message_id: int) -> dict | None:
        rows = self._rows("SELECT * FROM conversions WHERE message_id = ?", message_id)
        return rows[0] if rows else None

    def history(self, message_id: int) -> dict:
        deliveries = self._rows(
            "SELECT d.id, d.destination, d.key, d.state, d.attempts, d.created_at, d.next_attempt_at, d.delivered_at, "
            f"d.last_error, {WAITS_FOR} FROM deliveries d WHERE d.message_id = ? ORDER BY d.id", message_id)
        for delivery in deliveries:
            delivery["tries"] = self._rows("SELECT started_at, duration_ms, outcome, status, response FROM attempts "
                                           "WHERE delivery_id = ? ORDER BY id", delivery["id"])
        replays = self._rows("SELECT requested_at, who, why, destination, remapped FROM replays WHERE message_id = ? "
                             "ORDER BY id", message_id)
        return {"deliveries": deliveries, "replays": replays}

    def deliveries_of(self, message_id: int) -> list[dict]:
        return self._rows("SELECT id, destination, state, attempts, last_error FROM deliveries WHERE message_id = ? "
                          "ORDER BY id", message_id)

    def count(self, status: str | None = None) -> int:
        if status is None:
            return self._one("SELECT count(*) FROM messages")[0]
        return self._one("SELECT count(*) FROM messages WHERE status = ?", status)[0]

    @abstractmethod
    def _text_condition(self, text: str) -> tuple[str, list]:
        """The search condition on ``m.id`` for free text, with its parameters (the index is
        brought up to date first)."""

    def search(self, query: SearchQuery) -> list[dict]:
        text = self._text_condition(query.text) if query.text else None
        sql, params = search_sql(query, text)
        return self._rows(sql, *params)

    def stats(self, since: str, until: str | None = None) -> dict:
        until = until or "9999"
        window = "m.received_at >= ? AND m.received_at < ?"

        def grouped(column):
            return [{"value": v, "count": n} for v, n in self._all(
                f"SELECT coalesce({column}, '-'), count(*) FROM messages m WHERE {window} "
                f"GROUP BY 1 ORDER BY 2 DESC, 1", since, until)]

        def percentiles(sql, *params):
            values = sorted(v for (v,) in self._all(sql, since, until, *params) if v is not None)
            if not values:
                return None
            pick = lambda q: values[min(len(values) - 1, int(q * len(values)))]  # noqa: E731
            return {"count": len(values), "p50": round(pick(0.5), 3), "p90": round(pick(0.9), 3),
                    "p99": round(pick(0.99), 3), "max": round(values[-1], 3)}

        between = self.SECONDS_BETWEEN
        delivery = {}
        for (destination,) in self._all("SELECT DISTINCT destination FROM deliveries ORDER BY 1"):
            delivery[destination] = percentiles(
                f"SELECT {between.format(b='d.delivered_at')} FROM deliveries d JOIN messages m ON m.id = d.message_id "
                f"WHERE {window} AND d.state = 'delivered' AND d.destination = ?", destination)
        return {
            "seconds_to_ack": percentiles(
                f"SELECT {between.format(b='m.acked_at')} FROM messages m WHERE {window} AND m.acked_at IS NOT NULL"),
            "since": since, "until": None if until == "9999" else until,
            "messages": self._one(f"SELECT count(*) FROM messages m WHERE {window}", since, until)[0],
            "by_route": grouped("m.route"),
            "by_type": grouped("m.message_type || coalesce('^' || nullif(m.trigger_event, ''), '')"),
            "by_status": grouped("m.status"),
            "seconds_to_conversion": percentiles(
                f"SELECT {between.format(b='c.converted_at')} FROM conversions c "
                f"JOIN messages m ON m.id = c.message_id WHERE {window}"),
            "seconds_to_delivery": delivery,
        }

    def traffic(self, since: str) -> dict:
        flow = self._rows(
            "SELECT substr(received_at, 1, 13) AS hour, coalesce(route, '(no route)') AS route, count(*) AS messages "
            "FROM messages WHERE received_at >= ? GROUP BY 1, 2 ORDER BY 1, 2", since)
        delivered = self._rows(
            "SELECT substr(delivered_at, 1, 13) AS hour, destination, count(*) AS deliveries FROM deliveries "
            "WHERE state = 'delivered' AND delivered_at >= ? GROUP BY 1, 2 ORDER BY 1, 2", since)
        return {"flow": flow, "delivered": delivered}

    def timeline(self, since: str) -> dict:
        ack = self.SECONDS_BETWEEN.format(b="m.acked_at")
        delivery = self.SECONDS_BETWEEN.format(b="d.delivered_at")
        return {
            "messages": self._rows(
                f"SELECT substr(m.received_at, 1, 13) AS hour, count(*) AS messages, avg({ack}) AS ack_mean_s, "
                f"max({ack}) AS ack_max_s FROM messages m WHERE m.received_at >= ? GROUP BY 1 ORDER BY 1", since),
            "deliveries": self._rows(
                f"SELECT substr(d.delivered_at, 1, 13) AS hour, d.destination, count(*) AS delivered, "
                f"avg({delivery}) AS mean_s, max({delivery}) AS max_s FROM deliveries d "
                "JOIN messages m ON m.id = d.message_id WHERE d.state = 'delivered' AND d.delivered_at >= ? "
                "GROUP BY 1, 2 ORDER BY 1, 2", since),
            "queued": self._rows(
                "SELECT substr(created_at, 1, 13) AS hour, destination, count(*) AS queued FROM deliveries "
                "WHERE created_at >= ? GROUP BY 1, 2 ORDER BY 1, 2", since),
            "open": self._rows("SELECT destination, count(*) AS open FROM deliveries WHERE state != 'delivered' "
                               "GROUP BY 1 ORDER BY 1"),
        }

    def exceptions(self, limit: int = 50) -> dict:
        messages = self._rows(
            "SELECT id, received_at, control_id, message_type, trigger_event, route, status, coalesce(error, warning) AS error "
            "FROM messages WHERE status IN ('rejected', 'error', 'mapping_error', 'held') ORDER BY id DESC LIMIT ?", limit)
        for row in messages:
            if row["status"] == "mapping_error":
                found = self._one("SELECT problems FROM conversions WHERE message_id = ?", row["id"])
                row["problems"] = found[0] if found else None
        differing = self._rows(
            "SELECT id, received_at, control_id, sending_facility, message_type, trigger_event, status, duplicate_of, "
            "warning FROM messages WHERE duplicate_of IS NOT NULL AND status != 'duplicate' ORDER BY id DESC LIMIT ?",
            limit)
        return {"messages": messages, "differing": differing}

    # -- retention ------------------------------------------------------------------------------------

    def count_prunable(self, cutoff: datetime, keep_errors: bool) -> int:
        sql = prunable_sql(keep_errors).replace("SELECT id", "SELECT count(*)").replace(" ORDER BY id LIMIT ?", "")
        return self._one(sql, iso(cutoff), 0)[0]

    def prune_step(self, cutoff: datetime, keep_errors: bool, after_id: int, batch: int = BATCH) -> tuple[int, int]:
        ids = [r[0] for r in self._all(prunable_sql(keep_errors), iso(cutoff), after_id, batch)]
        if not ids:
            return 0, after_id
        with self.transaction():
            self._forget_text(ids)
            self._run(f"DELETE FROM attempts WHERE delivery_id IN (SELECT id FROM deliveries WHERE message_id IN "
                      f"({marks(ids)}))", *ids)
            for table in ("deliveries", "expected_deliveries", "replays", "conversions", "conversion_claims",
                          "message_ids"):
                self._run(f"DELETE FROM {table} WHERE message_id IN ({marks(ids)})", *ids)
            self._run(f"UPDATE messages SET duplicate_of = NULL WHERE duplicate_of IN ({marks(ids)})", *ids)
            self._run(f"DELETE FROM messages WHERE id IN ({marks(ids)})", *ids)
        return len(ids), ids[-1]

    @abstractmethod
    def size(self) -> int:
        """Bytes the journal takes on disk."""

    def prune(self, cutoff: datetime, keep_errors: bool = False, dry_run: bool = False, progress=None,
              batch: int = BATCH) -> PruneResult:
        before = self.size()
        if dry_run:
            return PruneResult(self.count_prunable(cutoff, keep_errors), before, before, True)
        total, last = 0, 0
        while True:
            done, last = self.prune_step(cutoff, keep_errors, last, batch)
            if not done:
                break
            total += done
            if progress is not None:
                progress(done)
        self.reclaim()
        return PruneResult(total, before, self.size(), False)


def prunable_sql(keep_errors: bool) -> str:
    """``engine.store.retention.prunable`` as a query: (cutoff, after ID, limit) -> message IDs."""
    sql = ("SELECT id FROM messages m WHERE received_at < ? AND id > ? "
           "AND NOT (status = 'accepted' AND route IS NOT NULL) "  # still to be converted
           "AND status != 'held' "  # waiting for an operator
           "AND NOT EXISTS (SELECT 1 FROM deliveries d WHERE d.message_id = m.id AND d.state != 'delivered')")
    if keep_errors:
        sql += f" AND status NOT IN ({', '.join(repr(s) for s in ERROR_STATUSES)})"
    return sql + " ORDER BY id LIMIT ?"


def search_sql(query: SearchQuery, text: tuple[str, list] | None = None) -> tuple[str, list]:
    """The SELECT for a ``SearchQuery``, with its parameters; ``text`` is the backend's free-text
    condition on ``m.id`` and its parameters (``SqlJournal._text_condition``)."""
    where, params = [], []

    def add(condition: str, *values):
        where.append(condition)
        params.extend(values)

    def by_id(kinds, value):
        add(f"m.id IN (SELECT message_id FROM message_ids WHERE kind IN ({marks(kinds)}) AND value = ?)", *kinds, value)

    if query.patient and query.patient_authority is not None:
        add("m.id IN (SELECT message_id FROM message_ids WHERE kind = 'patient' AND value = ? AND authority = ?)",
            query.patient, query.patient_authority)
    elif query.patient:
        by_id(["patient"], query.patient)
    if query.appointment:
        by_id(["placer_appointment", "filler_appointment"], query.appointment)
    if query.transaction:
        by_id(["transaction"], query.transaction)
    if query.control_id:
        add("m.control_id = ?", query.control_id)
    if query.message_type:
        mtype, _, trigger = query.message_type.partition("^")
        add("m.message_type = ?", mtype)
        if trigger:
            add("m.trigger_event = ?", trigger)
    if query.sending_facility:
        add("m.sending_facility = ?", query.sending_facility)
    if query.route:
        add("m.route = ?", query.route)
    if query.status:
        add("m.status = ?", query.status)
        if query.status not in ("accepted", "mapped"):
            add("m.status NOT IN ('accepted', 'mapped')")  # lets the planner use the partial exceptions index
    if query.delivery:
        destination, _, state = query.delivery.rpartition(":")
        if destination:
            add("m.id IN (SELECT message_id FROM deliveries WHERE destination = ? AND state = ?)", destination, state)
        else:
            add("m.id IN (SELECT message_id FROM deliveries WHERE state = ?)", state)
    if query.duplicate:
        add("m.duplicate_of IS NOT NULL")  # both use the partial index on duplicate_of
        if query.duplicate == "exact":
            add("m.status = 'duplicate'")
        elif query.duplicate == "differing":
            add("m.status != 'duplicate'")
    if query.since:
        add("m.received_at >= ?", query.since)
    if query.until:
        add("m.received_at < ?", query.until)
    if text is not None:
        add(text[0], *text[1])
    direction = "ASC" if query.oldest_first else "DESC"
    if query.after:
        received_at, last_id = query.after
        add(f"(m.received_at, m.id) {'>' if query.oldest_first else '<'} (?, ?)", received_at, int(last_id))
    columns = ", ".join(f"m.{c}" for c in SUMMARY_COLUMNS)
    # The first patient ID's assigning authority (message_ids is clustered by message: one lookup).
    columns += (", (SELECT i.authority FROM message_ids i WHERE i.message_id = m.id AND i.kind = 'patient' "
                "AND i.value = m.patient_id LIMIT 1) AS patient_authority")
    sql = f"SELECT {columns} FROM messages m"
    if where:
        sql += " WHERE " + " AND ".join(where)
    # By time (then ID): every time-ordered index can then hand over the newest rows directly.
    sql += f" ORDER BY m.received_at {direction}, m.id {direction} LIMIT ?"
    params.append(int(query.limit))
    return sql, params
