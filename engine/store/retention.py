"""Retention: deleting old messages by policy and giving the space back to the file system.

A message is pruned when it was received before the cutoff, when nothing is still owed for it
(not waiting for the converter or held for an operator; no delivery pending, in flight, retrying or dead), and, with ``keep_errors``, when it was not an
error (rejected, error, mapping_error stay for the operator). Its identifiers, conversion,
deliveries, attempts, replays and free-text entry go with it. Then the freed pages are returned
to the file system (``PRAGMA incremental_vacuum``: the journal is created with
``auto_vacuum=INCREMENTAL``), and the WAL is truncated.

Works in batches, each its own short transaction, so a running engine's commits never wait long.
Plain Python over the journal; the CLI and ``serve`` (on a schedule) call it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import datetime

from .journal import Journal, TextIndex, searchable_text, text_index_path
from ..delivery.outbox import iso

ERROR_STATUSES = ("rejected", "error", "mapping_error")
BATCH = 500


@dataclass
class PruneResult:
    messages: int
    bytes_before: int
    bytes_after: int
    dry_run: bool

    @property
    def freed(self) -> int:
        return self.bytes_before - self.bytes_after


def _files_size(path) -> int:
    total = 0
    for suffix in ("", "-wal"):
        for base in (path, text_index_path(path)):
            candidate = f"{base}{suffix}"
            if os.path.exists(candidate):
                total += os.path.getsize(candidate)
    return total


def candidates_sql(keep_errors: bool) -> str:
    sql = ("SELECT id FROM messages m WHERE received_at < ? AND id > ? "
           "AND NOT (status = 'accepted' AND route IS NOT NULL) "  # still to be converted
           "AND status != 'held' "  # waiting for an operator
           "AND NOT EXISTS (SELECT 1 FROM deliveries d WHERE d.message_id = m.id AND d.state != 'delivered')")
    if keep_errors:
        sql += f" AND status NOT IN ({', '.join(repr(s) for s in ERROR_STATUSES)})"
    return sql + " ORDER BY id LIMIT ?"


def count_candidates(journal: Journal, cutoff: datetime, keep_errors: bool) -> int:
    sql = candidates_sql(keep_errors).replace("SELECT id", "SELECT count(*)").replace(" ORDER BY id LIMIT ?", "")
    return journal.conn.execute(sql, (iso(cutoff), 0)).fetchone()[0]


def prune_batch(journal: Journal, text: TextIndex | None, cutoff: datetime, keep_errors: bool, after_id: int,
                batch: int = BATCH) -> tuple[int, int]:
    """Delete one batch; returns (how many, the last ID seen) so the caller can go on after it."""
    ids = [r[0] for r in journal.conn.execute(candidates_sql(keep_errors), (iso(cutoff), after_id, batch))]
    if not ids:
        return 0, after_id
    marks = ", ".join("?" for _ in ids)
    if text is not None:
        indexed = text.indexed_through()
        rows = journal.conn.execute(f"SELECT id, raw, charset FROM messages WHERE id IN ({marks}) AND id <= ?",
                                    (*ids, indexed)).fetchall()
        if rows:
            # A contentless FTS5 index forgets a row only when told the text it indexed.
            text.conn.execute("BEGIN IMMEDIATE")
            text.conn.executemany("INSERT INTO messages_fts (messages_fts, rowid, text) VALUES ('delete', ?, ?)",
                                  [(mid, searchable_text(raw, charset)) for mid, raw, charset in rows])
            text.conn.execute("COMMIT")
    with journal.transaction():
        conn = journal.conn
        conn.execute(f"DELETE FROM attempts WHERE delivery_id IN (SELECT id FROM deliveries WHERE message_id IN ({marks}))", ids)
        for table in ("deliveries", "replays", "conversions", "message_ids"):
            conn.execute(f"DELETE FROM {table} WHERE message_id IN ({marks})", ids)
        conn.execute(f"UPDATE messages SET duplicate_of = NULL WHERE duplicate_of IN ({marks})", ids)
        conn.execute(f"DELETE FROM messages WHERE id IN ({marks})", ids)
    return len(ids), ids[-1]


def _vacuum(conn):
    # sqlite3's execute() steps a statement once, and incremental_vacuum frees one page per step;
    # executescript() runs it to the end.
    conn.executescript("PRAGMA incremental_vacuum;")


def prune_step(journal: Journal, cutoff: datetime, keep_errors: bool, after_id: int) -> tuple[int, int]:
    """One batch, text index included: what ``serve`` runs between ingest commits."""
    if not text_index_path(journal.path).exists():
        return prune_batch(journal, None, cutoff, keep_errors, after_id)
    with TextIndex(journal.path) as text:
        return prune_batch(journal, text, cutoff, keep_errors, after_id)


def reclaim(journal: Journal):
    """Give freed pages back to the file system and shrink the WAL."""
    _vacuum(journal.conn)
    journal.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
    text_path = text_index_path(journal.path)
    if text_path.exists():
        with TextIndex(journal.path) as text:
            # Deleting from FTS5 writes tombstones; merging the segments drops them for good.
            text.conn.execute("INSERT INTO messages_fts (messages_fts) VALUES ('optimize')")
            _vacuum(text.conn)
            text.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()


def prune(journal: Journal, cutoff: datetime, keep_errors: bool = False, dry_run: bool = False,
          progress=None, batch: int = BATCH) -> PruneResult:
    """Prune everything the policy allows; ``progress(n)`` is called after each batch."""
    before = _files_size(journal.path)
    if dry_run:
        return PruneResult(count_candidates(journal, cutoff, keep_errors), before, before, True)
    text = TextIndex(journal.path) if text_index_path(journal.path).exists() else None
    total, last = 0, 0
    try:
        while True:
            done, last = prune_batch(journal, text, cutoff, keep_errors, last, batch)
            if not done:
                break
            total += done
            if progress is not None:
                progress(done)
    finally:
        if text is not None:
            text.close()
    reclaim(journal)
    return PruneResult(total, before, _files_size(journal.path), False)
