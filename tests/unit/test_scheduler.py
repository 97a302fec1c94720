"""Scheduled jobs with task.Clock and a real journal: two nodes, one run per period between them."""

from datetime import datetime, timedelta, timezone

from twisted.internet import defer, task

from engine.serve.scheduler import Scheduler
from engine.store import open_journal

T0 = datetime(2026, 11, 24, 6, 0, tzinfo=timezone.utc)


def node(clock, journal, name):
    return Scheduler(clock, journal, lambda fn, *args: defer.maybeDeferred(fn, *args), name,
                     clock=lambda: T0 + timedelta(seconds=clock.seconds()))


def test_two_nodes_run_a_job_once_per_period_and_a_long_run_keeps_its_lease(journal):
    clock = task.Clock()
    other = open_journal(journal.location)
    ran = []
    holding = []

    def job(name):
        def run():
            ran.append((name, clock.seconds()))
            d = defer.Deferred()
            holding.append(d)
            return d
        return run

    a, b = node(clock, journal, "node-a"), node(clock, other, "node-b")
    a.schedule("report", 600, job("node-a"), lease=30)
    b.schedule("report", 600, job("node-b"), lease=30)
    a.start()
    b.start()
    clock.advance(60)  # both check: node-a first, and it runs for a long time
    assert ran == [("node-a", 60)]
    for _ in range(10):  # 5 minutes: the lease (30 s) is renewed every 10 s, so node-b never takes it
        clock.advance(30)
    assert ran == [("node-a", 60)]
    holding.pop().callback(None)
    [row] = journal.jobs()
    assert (row["worker"], row["last_outcome"]) == (None, "ok")
    clock.advance(60)  # 420 s: not yet a period since it started
    assert len(ran) == 1
    for _ in range(5):
        clock.advance(60)
    assert [at for _, at in ran] == [60, 660]  # one run per period, on whichever node checked first
    a.stop()
    b.stop()
    other.close()


def test_a_failed_run_is_recorded_and_the_schedule_goes_on(journal):
    clock = task.Clock()
    calls = []

    def broken():
        calls.append(clock.seconds())
        raise ValueError("boom")

    scheduler = node(clock, journal, "node-a")
    scheduler.schedule("retention", 5, broken)
    scheduler.start()
    clock.advance(5)
    [row] = journal.jobs()
    assert row["last_outcome"] == "failed: ValueError"
    clock.advance(5)
    assert calls == [5, 10]
    scheduler.stop()
