"""The SQLite journal's write lock between its connections (the engine's writer, the converters):
taken as soon as it is free, and SQLite's own error once the busy timeout has passed."""

import sqlite3

import pytest

from engine.store import open_journal


def test_a_writer_gets_the_lock_as_soon_as_the_other_lets_go_and_gives_up_after_the_busy_timeout(tmp_path, monkeypatch):
    """Two connections (the engine's writer and a converter): the second's transaction starts
    right after the first commits (it asks again every half millisecond, not in SQLite's growing
    sleeps), and a lock never let go ends in SQLite's own 'database is locked' error."""
    import threading

    import engine.store.sqlite as sqlite_module

    first = open_journal(tmp_path / "j.db")
    second = open_journal(tmp_path / "j.db", "normal", create=False)
    order = []
    holding, release = threading.Event(), threading.Event()

    def hold():
        with first.transaction():
            order.append("first begins")
            holding.set()
            release.wait()
            order.append("first commits")

    thread = threading.Thread(target=hold)
    thread.start()
    holding.wait()
    def wait_for_it():
        with second.transaction():
            order.append("second begins")

    waiter = threading.Thread(target=wait_for_it)
    waiter.start()
    waiter.join(0.05)
    assert waiter.is_alive() and order == ["first begins"]  # still waiting for the lock
    release.set()
    thread.join()
    waiter.join()
    assert order == ["first begins", "first commits", "second begins"]
    assert second.conn.execute("PRAGMA busy_timeout").fetchone()[0] == sqlite_module.BUSY_TIMEOUT_MS

    monkeypatch.setattr(sqlite_module, "BUSY_TIMEOUT_MS", 30)
    with first.transaction():
        with pytest.raises(sqlite3.OperationalError, match="locked"):
            with second.transaction():
                pass
    first.close()
    second.close()
