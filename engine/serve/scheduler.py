"""Scheduled jobs: each runs on one node of a cluster at a time, once per period across the cluster.

    engine.schedule("retention", every=3600, job=prune)      # job() -> a Deferred, or a value

Every node checks each of its jobs every ``min(every, CHECK)`` seconds and tries to *take* it
(``Journal.take_job``): one atomic upsert of the job's row in the ``jobs`` table, which succeeds
only when nobody holds the job (or the holder's lease expired) and its last run started ``every``
seconds ago or more. The node that took it runs it, renews its lease every third of ``lease``
while it runs, and releases it with its outcome (``Journal.finish_job``); the others see the row
and wait for the next period.

Why a lease row and not a PostgreSQL advisory lock: an advisory lock says "one at a time" but
not "once per period" (another node would run the job again the moment the first one finished),
it lives on one connection that must stay open and out of the pool for the whole run, and it
exists only on PostgreSQL. The row works the same on SQLite and PostgreSQL, spaces the runs
cluster-wide, and shows operators when each job last ran, where, and how it ended. A node that
dies mid-run leaves the row held until its lease expires; the job then runs again at its next
period on whichever node takes it first.
"""

from __future__ import annotations

from dataclasses import dataclass

from twisted.internet import defer, task
from twisted.logger import Logger

from ..stamps import utc_now

log = Logger(namespace="hl7bridge.serve")
CHECK = 60.0  # at most this many seconds between a node's tries at a due job
LEASE = 60.0  # a running job's lease, renewed every third of it


@dataclass
class Job:
    name: str
    every: float
    run: object  # () -> Deferred or value
    lease: float
    loop: task.LoopingCall | None = None
    running: bool = False
    runs: int = 0  # runs on this node since start (/metrics)


class Scheduler:
    """Runs scheduled jobs through the journal's job leases. ``write`` runs a journal call in the
    journal writer's thread (a Deferred), ``journal`` is the connection it runs on, ``worker`` the
    node's name."""

    def __init__(self, reactor, journal, write, worker: str, clock=utc_now):
        self.reactor = reactor
        self.journal = journal
        self.write = write
        self.worker = worker
        self.clock = clock
        self.jobs: dict[str, Job] = {}
        self.started = False

    def schedule(self, name: str, every: float, job, lease: float = LEASE) -> Job:
        """Run ``job()`` every ``every`` seconds on one node of the cluster (this one when it takes
        it first). ``job`` returns a Deferred (or a plain value); its failure is logged and recorded
        as the run's outcome, and the job runs again at its next period."""
        if name in self.jobs:
            raise ValueError(f"a job named {name!r} is scheduled already")
        if every <= 0 or lease <= 0:
            raise ValueError("every and lease must be greater than 0")
        entry = Job(name, float(every), job, float(lease))
        self.jobs[name] = entry
        if self.started:
            self._start(entry)
        return entry

    def start(self):
        self.started = True
        for entry in self.jobs.values():
            self._start(entry)

    def _start(self, entry: Job):
        entry.loop = task.LoopingCall(self.try_run, entry.name)
        entry.loop.clock = self.reactor
        entry.loop.start(min(entry.every, CHECK), now=False)

    @defer.inlineCallbacks
    def try_run(self, name: str):
        """Take the job if it is due and free, run it, release it. Fires with True when it ran here."""
        entry = self.jobs[name]
        if entry.running:
            return False
        entry.running = True
        try:
            try:
                taken = yield self.write(self.journal.take_job, name, self.worker, entry.every, entry.lease, self.clock())
            except Exception:  # noqa: BLE001 - the database may be away for a moment; try next time
                log.failure("cannot take scheduled job {name}; will try again", name=name)
                return False
            if not taken:
                return False
            renewing = task.LoopingCall(self._renew, entry)
            renewing.clock = self.reactor
            renewing.start(entry.lease / 3, now=False)
            outcome = "ok"
            try:
                yield defer.maybeDeferred(entry.run)
            except Exception as exc:  # noqa: BLE001 - a failed run is recorded, the schedule goes on
                log.failure("scheduled job {name} failed", name=name)
                outcome = f"failed: {type(exc).__name__}"
            finally:
                renewing.stop()
            entry.runs += 1
            try:
                yield self.write(self.journal.finish_job, name, self.worker, self.clock(), outcome)
            except Exception:  # noqa: BLE001 - the lease expires by itself
                log.failure("cannot release scheduled job {name}", name=name)
            return True
        finally:
            entry.running = False

    def _renew(self, entry: Job):
        d = self.write(self.journal.renew_job, entry.name, self.worker, entry.lease, self.clock())

        def check(held):
            if not held:
                log.warn("scheduled job {name} ran past its lease and another node may have taken it", name=entry.name)

        d.addCallbacks(check, lambda failure: log.failure("renewing the lease of {name} failed", failure,
                                                          name=entry.name))
        return d

    def stop(self):
        self.started = False
        for entry in self.jobs.values():
            if entry.loop is not None and entry.loop.running:
                entry.loop.stop()
