"""The journal on PostgreSQL: what a cluster of engines shares (docs/cluster.md).

Chosen by a URL (``open_journal("postgresql://user@host/db")``); the tables and columns are the
same as on SQLite (``engine.store.sql`` holds the queries both run), so operators and scripts see
one schema. What is PostgreSQL's own:

- Connections come from a ``psycopg_pool.ConnectionPool`` per URL and durability (shared by
  every journal object of the process: the writer's two, the status readers', the CLI's). A
  journal object holds one connection while it lives and trades it for a fresh one when the
  server dropped it (a restart, a failover), so the next call works again without a restart.
- Durability: ``synchronous`` full (or extra) is ``synchronous_commit=on``, every commit is
  flushed to the WAL before it returns, so an ACK never promises a message the database could
  lose; normal is ``off`` for bookkeeping (claims, attempts, conversions: a server crash may lose
  the last few, which only means work is done again). Group commit: each node commits a batch of
  frames from all its connections in one transaction (``engine.mllp.listener.GroupCommit``), and
  PostgreSQL itself flushes the commits of several nodes' backends together.
- Atomicity across nodes: claims use ``FOR UPDATE ... SKIP LOCKED`` so workers pass over rows
  another is claiming, and ``ON CONFLICT ... WHERE`` so a claim is taken once whatever the
  timing; duplicate keys and a destination's cluster-wide count are held with transaction-level
  advisory locks (``lock_keys``, ``_lock_destination``), released at commit.
- Free text: a ``tsvector`` per message in ``messages_text`` (GIN index), written in the same
  statement as the message (the ``simple`` configuration: identifiers and codes are not words of
  a language), searched with ``plainto_tsquery``.
- Schema versions: ``schema_version`` holds the version; migrations run under an advisory lock, so
  nodes starting together migrate once.
"""

from __future__ import annotations

import hashlib
import threading
from contextlib import contextmanager
from datetime import datetime, timedelta
from urllib.parse import urlsplit, urlunsplit

import psycopg
from psycopg_pool import ConnectionPool, PoolTimeout

from ..stamps import iso
from .base import RESPONSE_KEPT, SCHEMA_VERSION, SYNCHRONOUS_MODES, Attempt, ConversionRecord, Delivery, Entry, NextState
from .sql import EXPECTED_DELIVERIES, HELD_FOR_CONVERSION, INSERT_COLUMNS, SqlJournal
from .sql_reconcile import create_tables as create_reconcile_tables
from .sqlite_text import searchable_text

CONNECT_TIMEOUT = 10  # seconds to reach the server before an operation fails (and /readyz says so)
POOL_SIZE = 8  # connections per URL and durability, per process
# Advisory lock namespaces (the first of the two int4 keys): duplicate keys, destinations, migrations.
LOCK_DUPLICATE_KEY, LOCK_DESTINATION, LOCK_MIGRATION = 0x4C370001, 0x4C370002, 0x4C370003
TEXT_CONFIG = "simple"

_pools: dict[tuple, ConnectionPool] = {}
_pools_lock = threading.Lock()


def redacted(url: str) -> str:
    """The URL without its password, for messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


def _key32(text: str) -> int:
    """A signed 32-bit key for an advisory lock (collisions only make two keys wait for each other)."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=4).digest(), "big", signed=True)


def _pool(url: str, synchronous: str, readonly: bool) -> ConnectionPool:
    key = (url, synchronous, readonly)
    with _pools_lock:
        pool = _pools.get(key)
        if pool is None:
            options = f"-c synchronous_commit={'off' if synchronous == 'normal' else 'on'}"
            if readonly:
                options += " -c default_transaction_read_only=on"
            pool = ConnectionPool(
                url, min_size=0, max_size=POOL_SIZE, open=True, name=f"hl7bridge-{len(_pools)}",
                kwargs={"autocommit": True, "options": options, "application_name": "hl7bridge",
                        "connect_timeout": CONNECT_TIMEOUT},
                check=ConnectionPool.check_connection, timeout=CONNECT_TIMEOUT, num_workers=1)
            _pools[key] = pool
        return pool


def close_pools():
    """Close every pool of this process (at exit; tests that stop their server)."""
    with _pools_lock:
        for pool in _pools.values():
            pool.close()
        _pools.clear()


class JournalUnreachable(OSError):
    """The database cannot be reached (or refused us): said with the URL, without its password."""


class PostgresJournal(SqlJournal):
    """The journal in a PostgreSQL database. ``create`` makes the tables and migrates them when
    needed (``False``: they must be there); ``readonly``: every transaction is read-only."""

    SKIP_LOCKED = " FOR UPDATE OF {table} SKIP LOCKED"
    SECONDS_BETWEEN = ("EXTRACT(EPOCH FROM (CAST({b} AS timestamptz) - CAST(m.received_at AS timestamptz)))"
                       "::double precision")
    SECONDS_SPAN = "EXTRACT(EPOCH FROM (CAST({b} AS timestamptz) - CAST({a} AS timestamptz)))::double precision"
    indexes_text_apart = False

    def __init__(self, url: str, synchronous: str = "full", create: bool = True, manual_checkpoints: bool = False,
                 readonly: bool = False):
        if synchronous not in SYNCHRONOUS_MODES:
            raise ValueError(f"synchronous must be one of {', '.join(SYNCHRONOUS_MODES)}")
        self.location = url
        self.name = redacted(url)
        self.path = None
        self.readonly = readonly
        self._pool = _pool(url, synchronous, readonly)
        self._conn: psycopg.Connection | None = None
        self._statements: dict[str, str] = {}
        self._depth = 0
        if create and not readonly:
            self._migrate()
        elif self._version() == 0:
            self.close()
            raise FileNotFoundError(f"no journal in {self.name}: 'hl7bridge serve --journal URL' creates one, "
                                    "'hl7bridge journal migrate' fills one from SQLite")

    # -- connections ----------------------------------------------------------------------------------

    def _connection(self) -> psycopg.Connection:
        conn = self._conn
        if conn is not None and (conn.closed or conn.broken):
            self._release()
            conn = None
        if conn is None:
            try:
                conn = self._pool.getconn()
            except PoolTimeout:
                raise JournalUnreachable(f"cannot reach {self.name}: {self._why_not()}") from None
            self._conn = conn
        return conn

    def _why_not(self) -> str:
        """The server's or the network's own words for why no connection came (the pool only says
        it waited): one direct attempt."""
        try:
            psycopg.connect(self.location, connect_timeout=2).close()
        except psycopg.Error as exc:
            return redacted(_reason(exc)) if self.location in str(exc) else _reason(exc)
        return f"no connection within {CONNECT_TIMEOUT} s (the pool's {POOL_SIZE} are in use)"

    def _release(self):
        if self._conn is not None:
            conn, self._conn = self._conn, None
            try:
                self._pool.putconn(conn)
            except Exception:  # noqa: BLE001 - a pool closed meanwhile (process exit)
                conn.close()

    def close(self):
        self._release()

    def _sql(self, sql: str) -> str:
        found = self._statements.get(sql)
        if found is None:
            found = self._statements[sql] = sql.replace("%", "%%").replace("?", "%s")
        return found

    def _execute(self, sql: str, params):
        conn = self._connection()
        try:
            return conn.execute(self._sql(sql), params)
        except psycopg.OperationalError:
            if self._depth == 0 and conn.broken:
                self._release()  # the next call gets a fresh connection
            raise

    def _all(self, sql: str, *params) -> list[tuple]:
        return self._execute(sql, params).fetchall()

    def _rows(self, sql: str, *params) -> list[dict]:
        cursor = self._execute(sql, params)
        names = [d.name for d in cursor.description]
        return [dict(zip(names, row)) for row in cursor.fetchall()]

    def _run(self, sql: str, *params) -> int:
        return self._execute(sql, params).rowcount

    def _many(self, sql: str, rows: list[tuple]):
        with self._connection().cursor() as cursor:
            cursor.executemany(self._sql(sql), rows)  # pipelined: one round trip

    @contextmanager
    def transaction(self):
        """One transaction: committed when the block exits (with synchronous full, flushed to
        the WAL first), rolled back if it raises. Nested, it is part of the outer one."""
        if self._depth:
            self._depth += 1
            try:
                yield self
            finally:
                self._depth -= 1
            return
        conn = self._connection()
        self._depth = 1
        try:
            with conn.transaction():
                yield self
        except psycopg.OperationalError:
            if conn.broken:
                self._release()
            raise
        finally:
            self._depth = 0

    def checkpoint(self):
        """Nothing: PostgreSQL checkpoints on its own."""

    def background_checkpointer(self):
        return None

    # -- schema ---------------------------------------------------------------------------------------

    def _version(self) -> int:
        found = self._one("SELECT to_regclass('schema_version') IS NOT NULL")[0]
        if not found:
            return 0
        row = self._one("SELECT max(version) FROM schema_version")
        return row[0] or 0

    def _migrate(self):
        steps = {6: self._create_v6, 7: self._create_v7, 8: self._create_v8}
        with self.transaction():
            self._run("SELECT pg_advisory_xact_lock(?, 0)", LOCK_MIGRATION)  # nodes starting together migrate once
            version = self._version()
            if version > SCHEMA_VERSION:
                raise RuntimeError(f"{self.name} was written by a newer hl7bridge (schema {version}); upgrade hl7bridge")
            for target in range(max(version + 1, min(steps)), SCHEMA_VERSION + 1):
                steps[target]()
                self._run("DELETE FROM schema_version")
                self._run("INSERT INTO schema_version (version) VALUES (?)", target)

    def _create_v6(self):
        """Schema 6, the first on PostgreSQL: the tables of SQLite's schema 6, column for column."""
        for statement in SCHEMA_V6:
            self._run(statement)

    def _create_v7(self):
        """Schema 7: the scheduling-to-cash record (engine.store.sql_reconcile), as on SQLite."""
        create_reconcile_tables(self._run, sqlite=False)

    def _create_v8(self):
        """Schema 8: the expected deliveries of messages waiting for conversion, as on SQLite."""
        for statement in EXPECTED_DELIVERIES:
            self._run(statement)

    # -- ingest ---------------------------------------------------------------------------------------

    def lock_keys(self, keys: list[tuple[str, str]]):
        if keys:
            hashed = sorted({_key32(f"{facility}\x1f{control_id}") for facility, control_id in keys})
            self._all("SELECT pg_advisory_xact_lock(?, k) FROM unnest(?::int[]) AS k", LOCK_DUPLICATE_KEY, hashed)

    def insert(self, entry: Entry) -> int:
        """The message, its free-text document, its identifiers and its expected deliveries in one
        statement: one round trip, where SQLite takes one per identifier."""
        text = searchable_text(entry.raw, entry.charset).replace("\x00", " ")
        kinds, values, authorities = (list(column) for column in zip(*entry.ids)) if entry.ids else ([], [], [])
        destinations, keys = (list(column) for column in zip(*entry.expected)) if entry.expected else ([], [])
        message_id = self._all(INSERT_MESSAGE_SQL, *self._entry_row(entry), text, kinds, values, authorities,
                               destinations, keys)[0][0]
        if entry.conversion is not None:
            self.record_conversion(message_id, entry.conversion)
        return message_id

    def record_conversion(self, message_id: int, record: ConversionRecord, update_status: bool = False,
                          route: str | None = None):
        """The conversion, the message's new status and route, and (with ``update_status``) the
        end of its expected deliveries, in one statement."""
        self._all(RECORD_CONVERSION_SQL, message_id, record.route, record.status, record.converted_at, record.bundle,
                  record.problems, route, record.status if update_status else None, message_id, message_id,
                  update_status)

    def claim_deliveries(self, destination: str, worker: str, now: datetime, limit: int, lease: float,
                         cluster_limit: int | None = None) -> list[Delivery]:
        """Without a cluster limit, one statement (its own transaction): pick the due ones
        (skipping rows another node is claiming) and mark them in flight."""
        if cluster_limit is not None:
            return super().claim_deliveries(destination, worker, now, limit, lease, cluster_limit)
        rows = self._all(CLAIM_DELIVERIES_SQL, destination, iso(now), limit, worker,
                         iso(now + timedelta(seconds=lease)), iso(now))
        return [Delivery(*row, claimed_by=worker) for row in rows]

    def finish_attempt(self, delivery: Delivery, attempt: Attempt, next_state: NextState) -> bool:
        """The attempt and the delivery's next state in one statement (its own transaction)."""
        finished = iso(attempt.finished)
        return self._one(
            FINISH_ATTEMPT_SQL, delivery.id, iso(attempt.started),
            round((attempt.finished - attempt.started).total_seconds() * 1000, 3), attempt.outcome, attempt.status,
            (attempt.response or "")[:RESPONSE_KEPT], next_state.state, next_state.attempts,
            iso(next_state.next_attempt_at), finished, next_state.last_error, next_state.state, finished,
            delivery.id, delivery.claimed_by, delivery.claimed_by)[0] > 0

    def _lock_destination(self, destination: str):
        self._all("SELECT pg_advisory_xact_lock(?, ?)", LOCK_DESTINATION, _key32(destination))

    # -- free text ------------------------------------------------------------------------------------

    def _text_condition(self, text: str) -> tuple[str, list]:
        return (f"m.id IN (SELECT message_id FROM messages_text WHERE document @@ plainto_tsquery('{TEXT_CONFIG}', ?))",
                [text])

    def _forget_text(self, ids: list[int]):
        self._run(f"DELETE FROM messages_text WHERE message_id IN ({', '.join('?' for _ in ids)})", *ids)

    # -- retention ------------------------------------------------------------------------------------

    def reclaim(self):
        """VACUUM the journal's tables: the space of deleted rows is reused by new ones (it goes
        back to the file system only with VACUUM FULL, which locks the tables: an operator's call)."""
        if self._depth:
            raise RuntimeError("reclaim runs outside a transaction")
        for table in ("attempts", "deliveries", "expected_deliveries", "replays", "conversions", "conversion_claims",
                      "message_ids", "messages_text", "messages"):
            self._run(f"VACUUM {table}")

    def size(self) -> int:
        return self._one("SELECT pg_database_size(current_database())")[0]


def _reason(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


# The message, its free-text document, its identifiers (three arrays: kinds, values,
# authorities) and its expected deliveries (two arrays: destinations, keys) in one statement.
INSERT_MESSAGE_SQL = (
    f"WITH m AS (INSERT INTO messages ({', '.join(INSERT_COLUMNS)}) "
    f"VALUES ({', '.join('?' for _ in INSERT_COLUMNS)}) RETURNING id), "
    f"t AS (INSERT INTO messages_text (message_id, document) SELECT id, to_tsvector('{TEXT_CONFIG}', ?) FROM m), "
    "i AS (INSERT INTO message_ids (message_id, kind, value, authority) "
    "SELECT DISTINCT m.id, x.kind, x.value, x.authority FROM m, unnest(?::text[], ?::text[], ?::text[]) "
    "AS x(kind, value, authority) ON CONFLICT DO NOTHING), "
    "e AS (INSERT INTO expected_deliveries (message_id, destination, key) "
    "SELECT m.id, x.destination, x.key FROM m, unnest(?::text[], ?::text[]) AS x(destination, key)) "
    "SELECT id FROM m"
)

# A conversion, and (when given) the message's new route and status, and the end of its expected
# deliveries when it takes its status: (message ID, route, status, converted_at, bundle, problems,
# the message's route or None, its status or None, message ID, message ID, whether it takes it).
RECORD_CONVERSION_SQL = (
    "WITH c AS (INSERT INTO conversions (message_id, route, status, converted_at, bundle, problems) "
    "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (message_id) DO UPDATE SET route = excluded.route, "
    "status = excluded.status, converted_at = excluded.converted_at, bundle = excluded.bundle, "
    "problems = excluded.problems RETURNING message_id), "
    "u AS (UPDATE messages m SET route = coalesce(r.route, m.route), status = coalesce(r.status, m.status) "
    "FROM (SELECT ?::text AS route, ?::text AS status) r WHERE m.id = ? "
    "AND (r.route IS NOT NULL OR r.status IS NOT NULL)), "
    "gone AS (DELETE FROM expected_deliveries WHERE message_id = ? AND ?::boolean) "
    "SELECT message_id FROM c"
)

# Claim due deliveries in one statement: (destination, now, limit, worker, lease end, now). The
# due ones are picked from deliveries alone (the key order checked on the partial index of open
# keys), locked, skipping rows another node is claiming; only those few are then joined with
# their message and Bundle (picking first and joining after: measured with bench/cluster.py, the
# join before the LIMIT made this statement 3.6 ms of the database's time a delivery). OFFSET 0
# keeps the key check a subplan probing the open-keys index by (destination, key, message) for each
# candidate: as an anti-join, with statistics that lag a fast-growing outbox, the planner scanned
# every open delivery of the destination for each candidate (29 ms, 11,000 buffers a claim). The
# hold of messages not converted yet is a subplan the same way, probing the expected deliveries'
# (destination, key, message) index.
CLAIM_DELIVERIES_SQL = (
    "WITH due AS (SELECT d.id, d.state FROM deliveries d "
    "WHERE d.destination = ? AND d.state IN ('pending', 'retrying') AND d.next_attempt_at <= ? "
    "AND NOT EXISTS (SELECT 1 FROM deliveries e WHERE e.destination = d.destination AND e.key = d.key "
    "AND e.message_id < d.message_id AND e.state != 'delivered' OFFSET 0) "
    f"AND NOT EXISTS ({HELD_FOR_CONVERSION} OFFSET 0) "
    "ORDER BY d.next_attempt_at, d.id LIMIT ? FOR UPDATE OF d SKIP LOCKED), "
    "claimed AS (UPDATE deliveries SET state = 'in_flight', claimed_by = ?, lease_expires_at = ?, updated_at = ? "
    "FROM due WHERE deliveries.id = due.id RETURNING deliveries.*) "
    "SELECT cl.id, cl.message_id, cl.destination, cl.key, due.state, cl.attempts, cl.created_at, m.control_id, "
    "c.bundle, CASE WHEN m.duplicate_of IS NOT NULL THEN CAST(m.id AS TEXT) ELSE '' END, cl.resumed != 0 "
    "FROM claimed cl JOIN due ON due.id = cl.id JOIN messages m ON m.id = cl.message_id "
    "LEFT JOIN conversions c ON c.message_id = cl.message_id ORDER BY cl.id"
)

# Record an attempt and move its delivery on, unless another worker holds it now: (delivery ID,
# started, duration, outcome, status, response, state, attempts, next attempt, now, last error,
# state, now, delivery ID, claimed by, claimed by). Returns how many deliveries moved (0 or 1).
FINISH_ATTEMPT_SQL = (
    "WITH a AS (INSERT INTO attempts (delivery_id, started_at, duration_ms, outcome, status, response) "
    "VALUES (?, ?, ?, ?, ?, ?)), "
    "moved AS (UPDATE deliveries SET state = ?, attempts = ?, next_attempt_at = ?, updated_at = ?, last_error = ?, "
    "delivered_at = CASE WHEN ? = 'delivered' THEN ? ELSE delivered_at END, "
    "claimed_by = NULL, lease_expires_at = NULL, resumed = 0 WHERE id = ? AND (? = '' OR claimed_by = ?) RETURNING id) "
    "SELECT count(*) FROM moved"
)

SCHEMA_V6 = (
    "CREATE TABLE schema_version (version INTEGER NOT NULL)",
    "CREATE TABLE messages (id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY, received_at TEXT NOT NULL, "
    "listener TEXT, peer TEXT, control_id TEXT, message_type TEXT, trigger_event TEXT, message_structure TEXT, "
    "version TEXT, processing_id TEXT, sending_application TEXT, sending_facility TEXT, receiving_application TEXT, "
    "receiving_facility TEXT, patient_id TEXT, placer_appointment_id TEXT, filler_appointment_id TEXT, "
    "transaction_id TEXT, status TEXT NOT NULL, error TEXT, error_code INTEGER, error_location TEXT, warning TEXT, "
    "duplicate_of BIGINT REFERENCES messages(id), charset TEXT, size INTEGER, truncated INTEGER, ack_code TEXT, "
    "ack BYTEA, ack_sent INTEGER, raw BYTEA NOT NULL, route TEXT, acked_at TEXT)",
    "CREATE TABLE message_ids (message_id BIGINT NOT NULL REFERENCES messages(id), kind TEXT NOT NULL, "
    "value TEXT NOT NULL, authority TEXT NOT NULL DEFAULT '', PRIMARY KEY (message_id, kind, value, authority))",
    "CREATE INDEX idx_messages_received_at ON messages (received_at)",
    "CREATE INDEX idx_messages_control_id_sending_facility ON messages (control_id, sending_facility)",
    "CREATE INDEX idx_messages_type_received ON messages (message_type, received_at)",
    "CREATE INDEX idx_messages_exceptions ON messages (status, received_at) WHERE status NOT IN ('accepted', 'mapped')",
    "CREATE INDEX idx_messages_to_convert ON messages (id) WHERE status = 'accepted' AND route IS NOT NULL",
    "CREATE INDEX idx_messages_route ON messages (route, received_at)",
    "CREATE INDEX idx_messages_duplicate_of ON messages (duplicate_of) WHERE duplicate_of IS NOT NULL",
    "CREATE INDEX idx_message_ids_kind_value ON message_ids (kind, value)",
    "CREATE TABLE conversions (message_id BIGINT PRIMARY KEY REFERENCES messages(id), route TEXT NOT NULL, "
    "status TEXT NOT NULL, converted_at TEXT NOT NULL, bundle TEXT, problems TEXT)",
    "CREATE TABLE deliveries (id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY, "
    "message_id BIGINT NOT NULL REFERENCES messages(id), destination TEXT NOT NULL, key TEXT NOT NULL, "
    "state TEXT NOT NULL, attempts INTEGER NOT NULL DEFAULT 0, created_at TEXT NOT NULL, next_attempt_at TEXT NOT NULL, "
    "updated_at TEXT NOT NULL, last_error TEXT, delivered_at TEXT, claimed_by TEXT, lease_expires_at TEXT, "
    "resumed INTEGER NOT NULL DEFAULT 0)",
    "CREATE INDEX idx_deliveries_due ON deliveries (destination, next_attempt_at, id) "
    "WHERE state IN ('pending', 'retrying')",
    "CREATE INDEX idx_deliveries_open_keys ON deliveries (destination, key, message_id) WHERE state != 'delivered'",
    "CREATE UNIQUE INDEX idx_deliveries_message ON deliveries (message_id, destination)",
    "CREATE INDEX idx_deliveries_state ON deliveries (state, destination)",
    "CREATE INDEX idx_deliveries_in_flight ON deliveries (destination, lease_expires_at) WHERE state = 'in_flight'",
    "CREATE TABLE attempts (id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY, "
    "delivery_id BIGINT NOT NULL REFERENCES deliveries(id), started_at TEXT NOT NULL, duration_ms DOUBLE PRECISION, "
    "outcome TEXT NOT NULL, status INTEGER, response TEXT)",
    "CREATE INDEX idx_attempts_delivery ON attempts (delivery_id)",
    "CREATE TABLE replays (id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY, "
    "message_id BIGINT NOT NULL REFERENCES messages(id), destination TEXT, requested_at TEXT NOT NULL, "
    "who TEXT NOT NULL, why TEXT NOT NULL, remapped INTEGER NOT NULL)",
    "CREATE INDEX idx_replays_message ON replays (message_id)",
    "CREATE TABLE conversion_claims (message_id BIGINT PRIMARY KEY REFERENCES messages(id), worker TEXT NOT NULL, "
    "lease_expires_at TEXT NOT NULL)",
    "CREATE TABLE jobs (name TEXT PRIMARY KEY, worker TEXT, lease_expires_at TEXT, last_started_at TEXT, "
    "last_finished_at TEXT, last_outcome TEXT)",
    "CREATE TABLE messages_text (message_id BIGINT PRIMARY KEY REFERENCES messages(id), document TSVECTOR NOT NULL)",
    "CREATE INDEX idx_messages_text ON messages_text USING gin (document)",
)
