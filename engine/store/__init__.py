"""Storage: the journal behind one interface.

Owns everything that is kept: received messages (verbatim), their identifiers, conversions,
outbox deliveries, attempts and replays, the free-text index, and retention. ``base.Journal`` is
the interface every other package uses (documented method by method); ``sqlite.SqliteJournal``
(with ``sqlite_text`` for free text) is the embedded default implementation and
``postgres.PostgresJournal`` the one a cluster shares; the queries both run are in ``sql``. These
are the only modules that hold SQL or import sqlite3, sqlite_utils or psycopg; ``open_journal``
chooses the backend from the location (a file, or a postgresql:// URL).

May import: ``engine.errors``, ``engine.stamps``, ``engine.worker``, ``engine.hl7`` (identifier
kinds). Nothing above it: the store decides nothing about delivery or mapping, its callers hand it
their decisions (``engine.delivery.outbox``, ``engine.store.retention``).
"""

from __future__ import annotations

from pathlib import Path

from .base import ConversionRecord, Journal, PruneResult, SearchQuery  # noqa: F401 (the interface; the rest in .base)


def is_database_url(location) -> bool:
    """Whether a journal location is a PostgreSQL URL (postgresql://...) rather than a file."""
    return isinstance(location, str) and location.startswith(("postgresql://", "postgres://"))


def open_journal(path: str | Path, synchronous: str = "full", create: bool = True,
                 manual_checkpoints: bool = False, readonly: bool = False, priority: str | None = None) -> Journal:
    """Open the journal at ``path``: a SQLite file (the embedded default), or a PostgreSQL
    database when ``path`` is a URL (``postgresql://user:password@host:port/db``, a cluster's
    shared journal: ``engine.store.postgres``).

    ``create`` makes the file and migrates its schema when needed; without it the journal must
    exist (FileNotFoundError otherwise). ``synchronous`` is how durable each commit is (full: on
    disk before it returns). ``manual_checkpoints``: the caller runs ``checkpoint()`` itself,
    between batches. ``readonly``: reads only (the engine's status pages). ``priority``: on
    SQLite, "first" for the connection whose commits ACKs wait on (the engine's), "yield" for
    connections that let it go first when it waits for the write lock (the converters);
    PostgreSQL locks rows, not the database, and ignores it. On PostgreSQL a database that cannot
    be reached raises OSError (``postgres.JournalUnreachable``).
    """
    if is_database_url(path):
        from .postgres import PostgresJournal

        return PostgresJournal(path, synchronous, create=create, manual_checkpoints=manual_checkpoints,
                               readonly=readonly, priority=priority)
    from .sqlite import SqliteJournal

    return SqliteJournal(path, synchronous, create=create, manual_checkpoints=manual_checkpoints, readonly=readonly,
                         priority=priority)


def migrate_journal(source: str | Path, target: str, progress=None) -> dict:
    """Copy the SQLite journal at ``source`` into the PostgreSQL journal at ``target`` (created
    when empty), IDs kept; safe to run again (``engine.store.postgres_import``). Returns
    {table: rows copied, "verified": {table: (rows in the source, found in the target)}}."""
    if not is_database_url(target):
        raise ValueError(f"--to must be a postgresql:// URL, not {target!r}")
    if is_database_url(source):
        raise ValueError("--from is a SQLite journal file (a single node's var/journal.db)")
    from .postgres import PostgresJournal
    from .postgres_import import migrate
    from .sqlite import SqliteJournal

    reader = SqliteJournal(source, create=False, readonly=True)
    try:
        writer = PostgresJournal(target)
        try:
            return migrate(reader, writer, progress)
        finally:
            writer.close()
    finally:
        reader.close()
