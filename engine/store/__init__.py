"""Storage: the journal behind one interface.

Owns everything that is kept: received messages (verbatim), their identifiers, conversions,
outbox deliveries, attempts and replays, the free-text index, and retention. ``base.Journal`` is
the interface every other package uses (documented method by method); ``sqlite.SqliteJournal``
(with ``sqlite_text`` for free text) is the embedded default implementation, and the only place
that holds SQL or imports sqlite3/sqlite_utils. A second backend is an added ``store`` module
implementing ``Journal``, chosen in ``open_journal``.

May import: ``engine.errors``, ``engine.stamps``, ``engine.worker``, ``engine.hl7`` (identifier
kinds). Nothing above it: the store decides nothing about delivery or mapping, its callers hand it
their decisions (``engine.delivery.outbox``, ``engine.store.retention``).
"""

from __future__ import annotations

from pathlib import Path

from .base import ConversionRecord, Journal, PruneResult, SearchQuery  # noqa: F401 (the interface; the rest in .base)


def open_journal(path: str | Path, synchronous: str = "full", create: bool = True,
                 manual_checkpoints: bool = False, readonly: bool = False) -> Journal:
    """Open the journal at ``path`` (SQLite, the embedded default).

    ``create`` makes the file and migrates its schema when needed; without it the journal must
    exist (FileNotFoundError otherwise). ``synchronous`` is how durable each commit is (full: on
    disk before it returns). ``manual_checkpoints``: the caller runs ``checkpoint()`` itself,
    between batches. ``readonly``: reads only (the engine's status pages).
    """
    from .sqlite import SqliteJournal

    return SqliteJournal(path, synchronous, create=create, manual_checkpoints=manual_checkpoints, readonly=readonly)
