"""The dispatcher with task.Clock, fake senders and a real SQLite journal: no sockets, no threads."""

import itertools
from datetime import datetime, timedelta, timezone

import pytest
from twisted.internet import defer, task

from backends import backend, journal, journal_location  # noqa: F401 (these tests run on both backends)
from conftest import EXAMPLES, ROOT
from engine.delivery.destinations import Destination, RetryPolicy
from engine.delivery.dispatcher import POLL_INTERVAL, Dispatcher
from engine.delivery.outbox import DEAD, DELIVERED, OK, PERMANENT, RETRYING, TRANSIENT, Result
from engine.mllp.ingest import Frame, Ingestor
from engine.transform.project import Project

T0 = datetime(2026, 11, 24, 6, 0, tzinfo=timezone.utc)
DFT = (EXAMPLES / "dft_p03.hl7").read_bytes()


class FakeSender:
    """Answers each send with the next scripted result, or holds it until ``release``."""

    def __init__(self, destination, script=(), hold=False):
        self.destination = destination
        self.script = list(script)
        self.hold = hold
        self.sent = []  # deliveries, in the order they were sent
        self.waiting: list[defer.Deferred] = []
        self.closed = False

    def send(self, delivery):
        self.sent.append(delivery)
        if self.hold:
            d = defer.Deferred()
            self.waiting.append(d)
            return d
        outcome = self.script.pop(0) if self.script else Result(OK, 200)
        if isinstance(outcome, Exception):
            return defer.fail(outcome)
        return defer.succeed(outcome)

    def release(self, result=Result(OK, 200)):
        self.waiting.pop(0).callback(result)

    def close(self):
        self.closed = True
        return defer.succeed(None)


class Harness:
    def __init__(self, journal, destinations, senders):
        self.clock = task.Clock()
        self.journal = journal
        self.senders = senders
        self.dispatcher = Dispatcher(
            self.clock, journal, destinations, write=lambda fn, *args: defer.maybeDeferred(fn, *args),
            clock=lambda: T0 + timedelta(seconds=self.clock.seconds()),
            senders=lambda destination, reactor, run_blocking: senders[destination.name],
        )

    def start(self):
        self.dispatcher.start()

    def advance(self, seconds):
        self.clock.advance(seconds)

    def states(self, destination):
        return [r["state"] for r in reversed(self.journal.list_deliveries(destination))]


def destination(name, **kw):
    return Destination(name, "fhir", f"{name}.yaml", url="http://x", order_by="account",
                       retry=RetryPolicy(max_attempts=3, initial_delay=2, jitter=0), **kw)


@pytest.fixture
def ingest(journal):
    project = Project.load(ROOT)
    counter = itertools.count(1)
    ingestor = Ingestor(journal, clock=lambda: T0, next_control_id=lambda: f"A{next(counter)}", project=project)

    def send(control_id, account=b"A2026120877"):
        raw = DFT.replace(b"EC000501", control_id.encode(), 1).replace(b"A2026120877", account, 1)
        [outcome] = ingestor.ingest([Frame(raw)])
        return outcome

    return send


def only_erp(journal):
    """Keep the tests to one destination: the fhir-main deliveries are delivered already."""
    journal._run("UPDATE deliveries SET state = 'delivered' WHERE destination = 'fhir-main'")


def test_due_deliveries_are_sent_and_recorded(journal, ingest):
    ingest("C1")
    ingest("C2", account=b"OTHER")
    only_erp(journal)
    sender = FakeSender(destination("erp-finance"))
    h = Harness(journal, {"erp-finance": destination("erp-finance")}, {"erp-finance": sender})
    h.start()
    assert [d.control_id for d in sender.sent] == ["C1", "C2"]
    assert h.states("erp-finance") == [DELIVERED, DELIVERED]
    assert h.dispatcher.outcomes == {("erp-finance", DELIVERED): 2}
    assert all(d.bundle and d.bundle.startswith('{"resourceType":"Bundle"') for d in sender.sent)


def test_concurrency_per_destination_and_the_next_goes_when_one_finishes(journal, ingest):
    for n in range(3):
        ingest(f"C{n}", account=f"ACC{n}".encode())
    only_erp(journal)
    dest = destination("erp-finance", concurrency=2)
    sender = FakeSender(dest, hold=True)
    h = Harness(journal, {"erp-finance": dest}, {"erp-finance": sender})
    h.start()
    assert len(sender.sent) == 2 and len(h.dispatcher.in_flight["erp-finance"]) == 2
    assert h.states("erp-finance").count("in_flight") == 2
    sender.release()
    assert len(sender.sent) == 3  # room again: the next one at once, without waiting for the poll
    sender.release()
    sender.release()
    assert h.states("erp-finance") == [DELIVERED] * 3


def test_a_transient_failure_retries_after_the_backoff_and_holds_back_its_key_only(journal, ingest):
    ingest("C1")
    ingest("C2")  # same account: waits behind C1
    ingest("C3", account=b"OTHER")
    only_erp(journal)
    dest = destination("erp-finance")
    sender = FakeSender(dest, [Result(TRANSIENT, 503, error="HTTP 503"), Result(OK, 200), Result(OK, 200),
                               Result(OK, 200)])
    h = Harness(journal, {"erp-finance": dest}, {"erp-finance": sender})
    h.start()
    assert [d.control_id for d in sender.sent] == ["C1", "C3"]
    assert h.states("erp-finance") == [RETRYING, "pending", DELIVERED]
    h.advance(POLL_INTERVAL)
    assert len(sender.sent) == 2  # C1 is due again at +2 s; C2 waits behind it
    h.advance(2)
    h.advance(POLL_INTERVAL)  # C2, released by C1's delivery, goes out on the next poll
    assert [d.control_id for d in sender.sent] == ["C1", "C3", "C1", "C2"]
    assert sender.sent[2].attempts == 1
    assert h.states("erp-finance") == [DELIVERED] * 3


def test_permanent_failures_and_exhausted_retries_are_dead(journal, ingest):
    ingest("C1")
    ingest("C2", account=b"OTHER")
    only_erp(journal)
    dest = destination("erp-finance")
    sender = FakeSender(dest, [Result(PERMANENT, 422, "{}", error="HTTP 422")] + [Result(TRANSIENT, error="refused")] * 3)
    h = Harness(journal, {"erp-finance": dest}, {"erp-finance": sender})
    h.start()
    for _ in range(10):
        h.advance(5)
    rows = {r["control_id"]: r for r in journal.list_deliveries("erp-finance")}
    assert (rows["C1"]["state"], rows["C1"]["last_error"]) == (DEAD, "HTTP 422")
    assert (rows["C2"]["state"], rows["C2"]["last_error"]) == (DEAD, "gave up after 3 attempts: refused")
    assert h.dispatcher.outcomes == {("erp-finance", DEAD): 2, ("erp-finance", RETRYING): 2}


def test_a_sender_that_raises_does_not_lose_the_delivery(journal, ingest):
    ingest("C1")
    only_erp(journal)
    dest = destination("erp-finance")
    sender = FakeSender(dest, [ValueError("a bug in a sender")])
    h = Harness(journal, {"erp-finance": dest}, {"erp-finance": sender})
    h.start()
    [row] = journal.list_deliveries("erp-finance")
    assert (row["state"], row["last_error"]) == (RETRYING, "internal error: ValueError")


def test_deliveries_in_flight_at_start_are_resumed_and_flagged(journal, ingest):
    ingest("C1")
    only_erp(journal)
    [claimed] = journal.claim_deliveries("erp-finance", "local", T0, 10, 30)  # the engine stopped while sending it
    dest = destination("erp-finance")
    sender = FakeSender(dest)
    h = Harness(journal, {"erp-finance": dest}, {"erp-finance": sender})
    h.start()
    [sent] = sender.sent
    assert (sent.id, sent.resumed) == (claimed.id, True)
    assert h.states("erp-finance") == [DELIVERED]


def test_a_delivery_without_a_bundle_is_dead_at_once(journal, ingest):
    outcome = ingest("C1")
    only_erp(journal)
    journal._run("DELETE FROM conversions WHERE message_id = ?", outcome.message_id)
    dest = destination("erp-finance")
    sender = FakeSender(dest)
    h = Harness(journal, {"erp-finance": dest}, {"erp-finance": sender})
    h.start()
    assert sender.sent == []
    [row] = journal.list_deliveries("erp-finance")
    assert (row["state"], row["last_error"]) == (DEAD, "no converted Bundle for this message")


def test_a_reload_rebuilds_only_the_senders_of_changed_destinations_and_stop_closes_them(journal):
    old, same = destination("a"), destination("b")
    senders = {"a": FakeSender(old), "b": FakeSender(same)}
    h = Harness(journal, {"a": old, "b": same}, senders)
    h.start()
    first_a, first_b = h.dispatcher.senders["a"], h.dispatcher.senders["b"]
    changed = destination("a", timeout=5.0)
    senders["a"] = FakeSender(changed)
    h.dispatcher.update({"a": changed, "b": same})
    assert first_a.closed and h.dispatcher.senders["a"] is senders["a"]
    assert h.dispatcher.senders["b"] is first_b and not first_b.closed
    h.dispatcher.stop()
    assert senders["a"].closed and first_b.closed


def test_a_slow_send_keeps_its_lease_and_a_dead_nodes_delivery_is_taken_over(journal, ingest):
    ingest("C1")
    ingest("C2", account=b"OTHER")
    only_erp(journal)
    # Another node claimed C1 and died: its lease (30 s) runs out while this node works.
    [theirs] = journal.claim_deliveries("erp-finance", "node-b", T0, 1, 30)
    dest = destination("erp-finance")
    sender = FakeSender(dest, hold=True)
    h = Harness(journal, {"erp-finance": dest}, {"erp-finance": sender})
    h.start()
    [mine] = sender.sent
    assert (theirs.control_id, mine.control_id, mine.claimed_by) == ("C1", "C2", "local")
    for _ in range(6):  # a minute: renewed every 10 s, so never taken from this node
        h.advance(10)
    [row] = journal._all("SELECT lease_expires_at FROM deliveries WHERE id = ?", mine.id)
    assert row[0] == "2026-11-24T06:01:30.000000Z"  # renewed at +60 s for another 30 s
    assert [d.id for d in sender.sent] == [mine.id, theirs.id]  # node-b's, taken over at +30 s
    assert sender.sent[1].resumed
    sender.release()
    sender.release()
    assert h.states("erp-finance") == [DELIVERED, DELIVERED]
