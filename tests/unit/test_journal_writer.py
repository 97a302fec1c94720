"""The journal writer's thread (engine.serve.writer): ingest commits (``write_first``) go ahead of
waiting bookkeeping writes, each kind in its own order, and every result reaches the reactor."""

import threading

from engine.serve.writer import WriterThread


class RecordingReactor:
    """Only what WriterThread uses: callFromThread, run here by hand afterwards."""

    def __init__(self):
        self.calls = []

    def callFromThread(self, fn, *args):
        self.calls.append((fn, args))

    def run_calls(self):
        for fn, args in self.calls:
            fn(*args)


def test_ingest_commits_jump_the_queue_of_bookkeeping_writes_and_each_kind_keeps_its_order():
    reactor = RecordingReactor()
    thread = WriterThread(reactor, "test-writer")
    ran, busy, release = [], threading.Event(), threading.Event()

    def work(name):
        ran.append(name)
        return name.upper()

    def occupy():
        busy.set()
        release.wait()
        ran.append("occupied")

    thread.start()
    thread.call(False, occupy)
    busy.wait()  # the thread is inside a write: everything below queues behind it
    results = {}
    for name, first in (("claim", False), ("attempt", False), ("batch 1", True), ("batch 2", True), ("state", False)):
        thread.call(first, work, name).addCallback(results.__setitem__, name)
    assert thread.waiting() == (2, 3)
    release.set()
    thread.stop()  # runs what is queued, then ends
    assert ran == ["occupied", "batch 1", "batch 2", "claim", "attempt", "state"]
    assert not thread.started and thread.waiting() == (0, 0)
    reactor.run_calls()
    assert results == {"BATCH 1": "batch 1", "BATCH 2": "batch 2", "CLAIM": "claim", "ATTEMPT": "attempt",
                       "STATE": "state"}


def test_a_write_that_raises_fails_its_deferred_and_the_thread_goes_on():
    reactor = RecordingReactor()
    thread = WriterThread(reactor, "test-writer")
    failures, results = [], []

    def broken():
        raise RuntimeError("database is locked")

    thread.start()
    thread.call(True, broken).addErrback(failures.append)
    thread.call(True, lambda: "next").addCallback(results.append)
    thread.stop()
    reactor.run_calls()
    assert [f.getErrorMessage() for f in failures] == ["database is locked"] and results == ["next"]
