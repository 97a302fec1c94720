"""The journal writer: one thread owns the journal's write connections; everything that writes
runs there through ``write(fn, *args)``, in order, so ingest, outbox bookkeeping, the dashboard's
replays and retention never race each other for the write lock.

Two connections to the same journal live on that thread: ``journal`` (synchronous=full, for
ingest commits: an ACK promises the message is on disk) and ``bookkeeping`` (synchronous=normal,
for claims, attempts, states, replays and retention: a power cut may lose the last few of those,
which only means a delivery is sent again, and every send is idempotent). Both are opened with
manual checkpoints: the group committer checkpoints between batches through ``write``, and a
background checkpointer (its own connection and thread, twice a second) does the bulk of the
copying, so no commit an ACK waits for pays for it.

Ingest commits go first: ``write_first`` jumps the queue of bookkeeping writes (``write``), so an
ACK never waits behind the dispatcher's claims and attempts, each of which may itself have waited
for a converter's transaction. Bench/ingest.py --profile showed 4,000 bookkeeping transactions in
a 20-second run, a hundred of them waiting 5-60 ms for the lock, with ingest batches queued
behind them in arrival order.
"""

from __future__ import annotations

import threading
from collections import deque

from twisted.internet import defer, task, threads
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from ..profiling import ThreadProfile, write_figures
from ..store import Journal, open_journal

log = Logger(namespace="hl7bridge.serve")
CHECKPOINTER_INTERVAL = 0.5  # the background checkpoint that does the bulk of the copying


class WriterThread:
    """One thread that runs calls in order, those given with ``first=True`` before every other
    waiting call (each kind in its own order); a Deferred fires in the reactor with each result.
    ``stop`` runs what is queued, then ends the thread."""

    def __init__(self, reactor, name: str):
        self.reactor = reactor
        self.name = name
        self._first: deque = deque()
        self._rest: deque = deque()
        self._ready = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None

    @property
    def started(self) -> bool:
        return self._thread is not None

    def start(self):
        if self._thread is None:
            self._stopping = False
            self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
            self._thread.start()

    def call(self, first: bool, fn, *args) -> defer.Deferred:
        d = defer.Deferred()
        with self._ready:
            (self._first if first else self._rest).append((d, fn, args))
            self._ready.notify()
        return d

    def waiting(self) -> tuple[int, int]:
        """How many calls wait: (first, the rest)."""
        return len(self._first), len(self._rest)

    def _run(self):
        while True:
            with self._ready:
                while not self._first and not self._rest and not self._stopping:
                    self._ready.wait()
                if self._first:
                    d, fn, args = self._first.popleft()
                elif self._rest:
                    d, fn, args = self._rest.popleft()
                else:
                    return  # stopping, and nothing left
            try:
                result = fn(*args)
            except BaseException:
                self.reactor.callFromThread(d.errback, Failure())
            else:
                self.reactor.callFromThread(d.callback, result)

    def stop(self):
        """Run what is queued, then end the thread (blocking until it has)."""
        thread, self._thread = self._thread, None
        if thread is None:
            return
        with self._ready:
            self._stopping = True
            self._ready.notify()
        thread.join()


class JournalWriter:
    def __init__(self, reactor, journal: Journal):
        self.reactor = reactor
        self.journal = journal
        self.bookkeeping = open_journal(journal.location, "normal", create=False, manual_checkpoints=True)
        self._thread = WriterThread(reactor, "hl7bridge-journal-writer")
        self.checkpointer = journal.background_checkpointer()
        self._checkpoint_thread = ThreadPool(minthreads=1, maxthreads=1, name="hl7bridge-checkpointer")
        self._checkpointing = None
        self._checkpoint_loop = task.LoopingCall(self._checkpoint)
        self._checkpoint_loop.clock = reactor
        self._profile = ThreadProfile("writer")  # HL7BRIDGE_PROFILE: the writer thread's own profile

    def write(self, fn, *args):
        """Run ``fn(*args)`` in the writer thread; a Deferred fires with its result."""
        return self._thread.call(False, fn, *args)

    def write_first(self, fn, *args):
        """``write``, ahead of every waiting ``write``: the group commit, on which ACKs wait."""
        return self._thread.call(True, fn, *args)

    def start(self):
        self._checkpoint_thread.start()
        self._thread.start()
        if self._profile.profile is not None:
            self.write(self._profile.start)
        if self.checkpointer is not None:
            self._checkpoint_loop.start(CHECKPOINTER_INTERVAL, now=False)

    def _checkpoint(self):
        """The bulk WAL checkpoint, in the background thread, one run at a time."""
        if self._checkpointing is not None:
            return
        d = threads.deferToThreadPool(self.reactor, self._checkpoint_thread, self.checkpointer.run_once)

        def done(result):
            self._checkpointing = None
            return result

        d.addBoth(done)
        d.addErrback(lambda failure: log.failure("journal checkpoint failed; will try again", failure))
        self._checkpointing = d

    def stop_checkpoints(self):
        if self._checkpoint_loop.running:
            self._checkpoint_loop.stop()

    @defer.inlineCallbacks
    def stop(self):
        """After everything pending was written: stop the threads, close the connections."""
        self.stop_checkpoints()
        if self._thread.started:
            if self._profile.profile is not None:
                yield self.write(self._profile.stop)
            self._thread.stop()
        write_figures("writer-locks", {name: journal.lock_stats.as_dict() for name, journal in
                                       (("journal", self.journal), ("bookkeeping", self.bookkeeping))
                                       if getattr(journal, "lock_stats", None) is not None})
        if self._checkpointing is not None:
            yield self._checkpointing
        self.close()

    def close(self):
        """Stop the threads at once and close the connections (start-up failed, or stop is done)."""
        self.stop_checkpoints()
        for pool in (self._thread, self._checkpoint_thread):
            if pool.started:
                pool.stop()
        if self.checkpointer is not None:
            self.checkpointer.close()
        self.bookkeeping.close()
        self.journal.close()
