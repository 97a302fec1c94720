"""``hl7bridge journal migrate``: a single node's SQLite journal into a cluster's PostgreSQL one.

Everything a message's story holds is copied with its IDs kept: messages (the exact bytes),
identifiers, conversions, expected deliveries, deliveries, attempts, replays; free text is
indexed on the way in. Each table goes in batches, oldest first, each batch one transaction,
``INSERT ... ON CONFLICT (key) DO UPDATE``: so a run that stops halfway is simply run again, and a second run after the node
went on working brings the later messages and every delivery's latest state. A row already in
the target under the same ID but with another message (the cluster has received traffic of its
own) stops the run before anything of that batch is written: migrate into an empty database, and
stop the single node before the last run. At the end the identity sequences move past the copied
IDs, and every table is counted on both sides.
"""

from __future__ import annotations

from .postgres import PostgresJournal
from .sql import INSERT_COLUMNS
from .sql_reconcile import APPOINTMENT_COLUMNS, CHARGE_COLUMNS, EVENT_COLUMNS, LINK_COLUMNS
from .sqlite_text import searchable_text

BATCH = 500

# (table, key, columns) in the order foreign keys need; messages first.
TABLES = (
    ("messages", "id", ("id",) + INSERT_COLUMNS),
    ("message_ids", "message_id, kind, value, authority", ("message_id", "kind", "value", "authority")),
    ("conversions", "message_id", ("message_id", "route", "status", "converted_at", "bundle", "problems")),
    # Messages still waiting for conversion, and what they hold back (a row a later run finds
    # converted on the source stays behind here, but holds nothing: the message is no longer waiting).
    ("expected_deliveries", "message_id, destination", ("message_id", "destination", "key")),
    ("deliveries", "id", ("id", "message_id", "destination", "key", "state", "attempts", "created_at",
                          "next_attempt_at", "updated_at", "last_error", "delivered_at", "claimed_by",
                          "lease_expires_at", "resumed")),
    ("attempts", "id", ("id", "delivery_id", "started_at", "duration_ms", "outcome", "status", "response")),
    ("replays", "id", ("id", "message_id", "destination", "requested_at", "who", "why", "remapped")),
    # The scheduling-to-cash record (engine.store.sql_reconcile): 'reconcile --rebuild' could make
    # all of it again but the acknowledgements, and copying is faster than rebuilding.
    ("rc_appointment_events", "facility, appointment_id, message_id",
     ("message_id", "facility", "appointment_id") + tuple(f'"{c}"' for c in EVENT_COLUMNS)),
    ("rc_appointments", "facility, appointment_id", ("facility", "appointment_id") + APPOINTMENT_COLUMNS + ("charged",)),
    ("rc_charges", "facility, charge_key",
     ("facility", "charge_key") + CHARGE_COLUMNS + LINK_COLUMNS + ("received_at", "first_message_id")),
    ("rc_charge_messages", "facility, charge_key, message_id", ("facility", "charge_key", "message_id")),
    ("rc_acks", "exception_id", ("exception_id", "who", "note", "at")),
)
SEQUENCED = ("messages", "deliveries", "attempts", "replays")


class MigrationConflict(RuntimeError):
    """The target holds another message under an ID being copied."""


def _upsert_sql(table: str, key: str, columns: tuple) -> str:
    keys = {k.strip() for k in key.split(",")}
    updates = ", ".join(f"{c} = excluded.{c}" for c in columns if c not in keys)
    sql = f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({', '.join('?' for _ in columns)}) ON CONFLICT ({key}) "
    sql += f"DO UPDATE SET {updates}" if updates else "DO NOTHING"
    if table == "messages":
        # The same message (received at the same moment, the same size) may be updated; another one may not.
        sql += " WHERE messages.received_at = excluded.received_at AND messages.size = excluded.size RETURNING id"
    return sql


def migrate(source, target: PostgresJournal, progress=None, batch: int = BATCH) -> dict:
    """Copy ``source`` (a SQLite journal) into ``target``; returns {table: rows copied this run}
    and, under "verified", {table: (rows in the source, the same rows found in the target)}.
    ``progress(table, rows)`` after each batch."""
    copied = {}
    for table, key, columns in TABLES:
        order = key if table != "message_ids" else "message_id, kind, value, authority"
        sql = _upsert_sql(table, key, columns)
        total, offset = 0, 0
        while True:
            rows = source._all(f"SELECT {', '.join(columns)} FROM {table} ORDER BY {order} LIMIT ? OFFSET ?",
                               batch, offset)
            if not rows:
                break
            with target.transaction():
                if table == "messages":
                    _copy_messages(target, sql, rows, columns)
                else:
                    target._many(sql, rows)
            total += len(rows)
            offset += len(rows)
            if progress is not None:
                progress(table, len(rows))
        copied[table] = total
    for table in SEQUENCED:
        target._all(f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), "
                    f"greatest((SELECT max(id) FROM {table}), 1))")
    copied["verified"] = verify(source, target)
    return copied


def _copy_messages(target: PostgresJournal, sql: str, rows: list[tuple], columns: tuple):
    for row in rows:
        if not target._all(sql, *row):
            raise MigrationConflict(
                f"{target.name} already holds another message with ID {row[0]}: it has traffic of its own; "
                "migrate into an empty database (nothing of this batch was written)")
    raw_at, charset_at = columns.index("raw"), columns.index("charset")
    target._many(
        "INSERT INTO messages_text (message_id, document) VALUES (?, to_tsvector('simple', ?)) ON CONFLICT DO NOTHING",
        [(row[0], searchable_text(row[raw_at], row[charset_at]).replace("\x00", " ")) for row in rows])


def verify(source, target: PostgresJournal) -> dict:
    """{table: (rows in the source, those of its keys found in the target)}: equal when nothing was lost."""
    found = {}
    for table, key, _ in TABLES:
        expected = source._one(f"SELECT count(*) FROM {table}")[0]
        if table.startswith("rc_"):  # keyed by text: the target holds no rows of its own but copies
            present = target._one(f"SELECT count(*) FROM {table}")[0]
        elif table in ("message_ids", "conversions", "expected_deliveries"):
            top = source._one(f"SELECT max(message_id) FROM {table}")[0] or 0
            present = target._one(f"SELECT count(*) FROM {table} WHERE message_id <= ?", top)[0]
        else:
            top = source._one(f"SELECT max(id) FROM {table}")[0] or 0
            present = target._one(f"SELECT count(*) FROM {table} WHERE id <= ?", top)[0]
        found[table] = (expected, present)
    return found
