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


def test_a_waiting_ingest_commit_takes_the_lock_before_a_converter_that_asks_at_the_same_time(tmp_path, monkeypatch):
    """SQLite's write lock has no queue: whoever asks first after the holder commits gets it. The
    engine's ingest connection (priority "first") raises the journal's wait flag while it waits,
    and a converter's (priority "yield") does not ask while the flag is up, so the ingest commit,
    which ACKs wait on, always goes first; its flag is down again once it has the lock."""
    import threading
    import time

    import engine.store.sqlite as sqlite_module

    monkeypatch.setattr(sqlite_module, "MAX_YIELD", 30.0)  # a test machine may be slow: never give up here
    path = tmp_path / "j.db"
    engine = open_journal(path, priority="first")
    converter = open_journal(path, "normal", create=False, priority="yield")
    holder = open_journal(path, "normal", create=False)  # another converter, in its transaction
    assert (path.parent / "j.db-waiting").read_bytes() == b"\0"
    order, holding, release = [], threading.Event(), threading.Event()

    def hold():
        with holder.transaction():
            holding.set()
            release.wait()

    def write(journal, name):
        with journal.transaction():
            order.append(name)

    threads = [threading.Thread(target=hold)]
    threads[0].start()
    holding.wait()
    threads.append(threading.Thread(target=write, args=(engine, "ingest commit")))
    threads[1].start()
    while not engine.wait_flag.raised:  # the engine's writer is waiting for the lock now
        time.sleep(0.001)
    threads.append(threading.Thread(target=write, args=(converter, "converter")))
    threads[2].start()
    # Whenever the converter asks, before or after the holder commits, the ingest commit goes
    # first; give it time to be asking already, where (without the flag) it would usually win.
    time.sleep(0.05)
    release.set()
    for thread in threads:
        thread.join()
    assert order == ["ingest commit", "converter"]
    assert not engine.wait_flag.raised and converter.lock_stats.yielded == 1
    for journal in (engine, converter, holder):
        journal.close()


def test_without_an_engine_a_yielding_connection_just_writes(tmp_path):
    path = tmp_path / "j.db"
    open_journal(path).close()  # no priority writer: no flag file
    converter = open_journal(path, "normal", create=False, priority="yield")
    assert converter.wait_flag is None
    with converter.transaction():
        converter.conn.execute("PRAGMA user_version").fetchone()
    converter.close()
