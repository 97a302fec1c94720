"""The SQLite journal's free-text index: a contentless FTS5 index in its own file.

Why apart from the journal (``journal-text.db`` beside ``journal.db``): tokenizing 3.5 KB and
flushing FTS segments cost more than the rest of the commit together, and the ACK must not wait
for a search index. ``TextIndex.catch_up`` indexes, a moment after the commit, the rows committed
since its last call (the text indexer process, ``engine.store.textindexer``, calls it twice a
second). The text index holds no data of its own (it is derived from ``messages.raw``), so it can
be deleted and rebuilt at any time.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path


def text_index_path(journal_path: str | Path) -> Path:
    """``var/journal.db`` -> ``var/journal-text.db``."""
    path = Path(journal_path)
    return path.with_name(f"{path.stem}-text{path.suffix or '.db'}")


def searchable_text(raw: bytes, charset: str | None) -> str:
    """The text that free-text search sees for a message: its bytes decoded as they were at ingest."""
    return raw.decode(charset or "utf-8", errors="replace")


def fts_query(text: str) -> str:
    """Quote each word so user text is matched literally, not read as FTS5 syntax."""
    words = [w.replace('"', '""') for w in text.split()]
    return " ".join(f'"{w}"' for w in words)


class TextIndex:
    """The free-text index of a journal, in its own file, filled from ``messages.raw``.

    ``catch_up`` indexes the rows committed since the last call. It writes only to the text file,
    and reads the journal through its own read-only connection, so it never holds the journal's
    write lock and runs beside the engine (the text indexer process, or a CLI search).
    """

    def __init__(self, journal_path: str | Path):
        self.path = text_index_path(journal_path)
        conn = sqlite3.connect(str(self.path), isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA busy_timeout = 10000")
        conn.execute("PRAGMA auto_vacuum = INCREMENTAL")  # takes effect on a new file: prune gives space back
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = NORMAL")  # derived data: rebuilt after a power cut
        conn.execute("CREATE VIRTUAL TABLE IF NOT EXISTS messages_fts USING fts5(text, content='')")
        conn.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER)")
        self.conn = conn
        # A separate, read-only connection to the journal: a transaction here must never take
        # the journal's write lock (BEGIN IMMEDIATE on a connection with the journal ATTACHed
        # would, and the engine's commits would wait behind it).
        self.source = sqlite3.connect(
            f"file:{Path(journal_path)}?mode=ro", uri=True, isolation_level=None, check_same_thread=False
        )
        self.source.execute("PRAGMA busy_timeout = 10000")

    def indexed_through(self) -> int:
        row = self.conn.execute("SELECT value FROM meta WHERE key = 'indexed_through'").fetchone()
        return row[0] if row else 0

    def catch_up(self, batch: int = 500) -> int:
        """Index up to ``batch`` rows not yet indexed; returns how many were indexed."""
        start = self.indexed_through()
        rows = self.source.execute(
            "SELECT id, raw, charset FROM messages WHERE id > ? ORDER BY id LIMIT ?", (start, batch)
        ).fetchall()
        if not rows:
            return 0
        texts = [(message_id, searchable_text(raw, charset)) for message_id, raw, charset in rows]
        conn = self.conn
        conn.execute("BEGIN IMMEDIATE")  # the text file only
        try:
            if self.indexed_through() != start:  # another process indexed meanwhile
                conn.execute("ROLLBACK")
                return 0
            conn.executemany("INSERT INTO messages_fts (rowid, text) VALUES (?, ?)", texts)
            conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('indexed_through', ?)", (rows[-1][0],))
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
        return len(rows)

    def catch_up_all(self, batch: int = 500) -> int:
        """Index everything committed so far."""
        total = 0
        while True:
            done = self.catch_up(batch)
            total += done
            if done < batch:
                return total

    def forget(self, rows: list[tuple[int, bytes, str]]):
        """Take messages (id, raw, charset) out of the index (before they are deleted from the journal)."""
        indexed = self.indexed_through()
        rows = [row for row in rows if row[0] <= indexed]
        if rows:
            # A contentless FTS5 index forgets a row only when told the text it indexed.
            self.conn.execute("BEGIN IMMEDIATE")
            self.conn.executemany("INSERT INTO messages_fts (messages_fts, rowid, text) VALUES ('delete', ?, ?)",
                                  [(mid, searchable_text(raw, charset)) for mid, raw, charset in rows])
            self.conn.execute("COMMIT")

    def optimize(self):
        """Deleting from FTS5 writes tombstones; merging the segments drops them for good."""
        self.conn.execute("INSERT INTO messages_fts (messages_fts) VALUES ('optimize')")

    def close(self):
        self.conn.close()
        self.source.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
