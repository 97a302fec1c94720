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
"""

from __future__ import annotations

from twisted.internet import defer, task, threads
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

from ..profiling import ThreadProfile, write_figures
from ..store import Journal, open_journal

log = Logger(namespace="hl7bridge.serve")
CHECKPOINTER_INTERVAL = 0.5  # the background checkpoint that does the bulk of the copying


class JournalWriter:
    def __init__(self, reactor, journal: Journal):
        self.reactor = reactor
        self.journal = journal
        self.bookkeeping = open_journal(journal.location, "normal", create=False, manual_checkpoints=True)
        self._thread = ThreadPool(minthreads=1, maxthreads=1, name="hl7bridge-journal-writer")
        self.checkpointer = journal.background_checkpointer()
        self._checkpoint_thread = ThreadPool(minthreads=1, maxthreads=1, name="hl7bridge-checkpointer")
        self._checkpointing = None
        self._checkpoint_loop = task.LoopingCall(self._checkpoint)
        self._checkpoint_loop.clock = reactor
        self._profile = ThreadProfile("writer")  # HL7BRIDGE_PROFILE: the writer thread's own profile

    def write(self, fn, *args):
        """Run ``fn(*args)`` in the writer thread; a Deferred fires with its result."""
        return threads.deferToThreadPool(self.reactor, self._thread, fn, *args)

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
