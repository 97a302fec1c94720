"""Several workers on one journal: claims with leases, one delivery per (message, destination),
per-key order and cluster-wide concurrency across workers, job leases, duplicate detection that
two nodes cannot both get wrong. Each worker has its own connection, as nodes do."""

import threading
from datetime import datetime, timedelta, timezone

import pytest

from backends import backend, journal, journal_location  # noqa: F401 (every test here runs on both backends)
from conftest import EXAMPLES, ROOT
from engine.delivery.outbox import OK, RETRYING, TRANSIENT, Result, finish
from engine.delivery.destinations import Destination, RetryPolicy
from engine.mllp.ingest import Frame, Ingestor
from engine.store import open_journal
from engine.store.base import DUPLICATE, IN_FLIGHT
from engine.transform.project import Project

T0 = datetime(2026, 11, 24, 6, 0, tzinfo=timezone.utc)
SIU = (EXAMPLES / "siu_s12.hl7").read_bytes()
DFT = (EXAMPLES / "dft_p03.hl7").read_bytes()
DEST = Destination("erp-finance", "file", "x", retry=RetryPolicy(max_attempts=3, initial_delay=2, jitter=0),
                   order_by="account")


@pytest.fixture
def other(journal):
    """A second connection to the same journal: another node."""
    second = open_journal(journal.location)
    yield second
    second.close()


@pytest.fixture
def project():
    return Project.load(ROOT)


def siu(n: int) -> bytes:
    return SIU.replace(b"NC000123", f"NC{n:06d}".encode(), 1)


def dft(control_id: str, account: bytes = b"A2026120877") -> bytes:
    return DFT.replace(b"EC000501", control_id.encode(), 1).replace(b"A2026120877", account, 1)


def receive(journal, project, frames):
    ingestor = Ingestor(journal, clock=lambda: T0, project=project)
    return [ingestor.ingest([Frame(raw)])[0] for raw in frames]


def test_two_converters_never_claim_the_same_message_while_a_claim_lasts(journal, other, project):
    ids = [o.message_id for o in receive(journal, project, [siu(n) for n in range(5)])]
    first = journal.claim_conversions("a/converter", 3, 60, T0)
    second = other.claim_conversions("b/converter", 3, 60, T0)
    assert [w.id for w in first] == ids[:3] and [w.id for w in second] == ids[3:]
    assert first[0].raw == siu(0) and first[0].route == "clinic-scheduling"
    assert other.claim_conversions("c/converter", 3, 60, T0 + timedelta(seconds=59)) == []
    # b restarted: its own claims come back at once; a's only when their lease expired.
    assert [w.id for w in other.claim_conversions("b/converter", 5, 60, T0 + timedelta(seconds=1))] == ids[3:]
    taken = other.claim_conversions("c/converter", 5, 60, T0 + timedelta(seconds=60))
    assert [w.id for w in taken] == ids[:3]
    # a comes back too late: only what it still holds is its to record.
    assert journal.finish_conversions("a/converter", ids[:3]) == []
    assert other.renew_conversions("c/converter", ids, 60, T0 + timedelta(seconds=61)) == ids[:3]
    assert other.finish_conversions("c/converter", ids) == ids[:3]


def test_converting_a_message_twice_queues_it_once(journal, project):
    from engine.transform.converter import convert_pending

    [outcome] = receive(journal, project, [siu(1)])
    assert convert_pending(journal, project, worker="a/converter") == 1
    # Another converter that mapped the same message (its claim expired meanwhile) records it again.
    journal.create_deliveries(outcome.message_id, [("fhir-main", "patient:other")], T0)
    [row] = journal.deliveries_of(outcome.message_id)
    assert row["destination"] == "fhir-main"


def test_deliveries_are_claimed_once_in_key_order_across_nodes(journal, other, project):
    receive(journal, project, [dft("C1"), dft("C2"), dft("C3", account=b"OTHER")])
    a = journal.claim_deliveries("erp-finance", "node-a", T0, 1, 30)
    b = other.claim_deliveries("erp-finance", "node-b", T0, 10, 30)
    assert [d.control_id for d in a] == ["C1"] and [d.control_id for d in b] == ["C3"]  # C2 waits behind C1
    assert (a[0].claimed_by, b[0].claimed_by) == ("node-a", "node-b")
    assert other.claim_deliveries("erp-finance", "node-b", T0, 10, 30) == []
    assert finish(journal, a[0], DEST, Result(OK, 200), T0, T0) == "delivered"
    assert [d.control_id for d in other.claim_deliveries("erp-finance", "node-b", T0, 10, 30)] == ["C2"]


def test_cluster_concurrency_counts_every_node(journal, other, project):
    receive(journal, project, [dft(f"C{n}", account=f"ACC{n}".encode()) for n in range(4)])
    assert len(journal.claim_deliveries("erp-finance", "node-a", T0, 4, 30, cluster_limit=2)) == 2
    assert other.claim_deliveries("erp-finance", "node-b", T0, 4, 30, cluster_limit=2) == []
    assert len(other.claim_deliveries("erp-finance", "node-b", T0, 4, 30)) == 2  # no cap: its own concurrency


def test_a_lost_lease_records_the_attempt_but_leaves_the_state_to_the_new_holder(journal, other, project):
    receive(journal, project, [dft("C1")])
    [mine] = journal.claim_deliveries("erp-finance", "node-a", T0, 1, 30)
    assert journal.renew_deliveries("node-a", [mine.id], 30, T0 + timedelta(seconds=20)) == [mine.id]
    assert other.recover_in_flight(T0 + timedelta(seconds=49)) == []  # renewed until +50 s
    assert other.recover_in_flight(T0 + timedelta(seconds=50)) == [mine.id]  # node-a stopped renewing
    [theirs] = other.claim_deliveries("erp-finance", "node-b", T0 + timedelta(seconds=50), 1, 30)
    assert (theirs.id, theirs.resumed) == (mine.id, True)
    assert journal.renew_deliveries("node-a", [mine.id], 30, T0 + timedelta(seconds=51)) == []
    # node-a's late answer: a transient failure; the delivery stays node-b's, in flight.
    assert finish(journal, mine, DEST, Result(TRANSIENT, 503, error="HTTP 503"), T0, T0, rand=lambda: 0.5) == RETRYING
    [row] = [r for r in journal.list_deliveries("erp-finance")]
    assert row["state"] == IN_FLIGHT and row["attempts"] == 0
    assert finish(other, theirs, DEST, Result(OK, 200), T0, T0 + timedelta(seconds=51)) == "delivered"
    [story] = journal.history(mine.message_id)["deliveries"][-1:]
    assert story["state"] == "delivered" and [t["outcome"] for t in story["tries"]] == ["transient", "ok"]


def test_a_job_runs_on_one_node_once_per_period(journal, other):
    assert journal.take_job("retention", "node-a", 3600, 60, T0)
    assert not other.take_job("retention", "node-b", 3600, 60, T0 + timedelta(seconds=1))  # node-a runs it
    assert journal.renew_job("retention", "node-a", 60, T0 + timedelta(seconds=40))
    assert not other.take_job("retention", "node-b", 3600, 60, T0 + timedelta(seconds=90))
    journal.finish_job("retention", "node-a", T0 + timedelta(seconds=95), "ok")
    assert not other.take_job("retention", "node-b", 3600, 60, T0 + timedelta(seconds=96))  # ran this hour
    assert other.take_job("retention", "node-b", 3600, 60, T0 + timedelta(hours=1))
    assert not journal.renew_job("retention", "node-a", 60, T0 + timedelta(hours=1))
    # node-b dies while running it: after its lease, at the next period, node-a takes it.
    assert not journal.take_job("retention", "node-a", 3600, 60, T0 + timedelta(hours=1, seconds=59))
    assert journal.take_job("retention", "node-a", 3600, 60, T0 + timedelta(hours=2))
    [row] = journal.jobs()
    assert (row["name"], row["worker"], row["last_outcome"]) == ("retention", "node-a", "ok")


def test_two_nodes_receiving_one_message_at_once_take_only_one_for_the_original(journal, other):
    """Node A's transaction journals the message and holds its key; node B's batch with the same
    message waits for A's commit, then sees A's row and answers B's copy as a resend."""
    a = Ingestor(journal, clock=lambda: T0)
    b = Ingestor(other, clock=lambda: T0)
    prepared = a.prepare(Frame(siu(7)))
    results = {}
    with journal.transaction():
        journal.lock_keys([prepared.dedupe_key])
        assert journal.accepted_with_key(*prepared.dedupe_key) == []
        original = journal.insert(prepared.entry)
        thread = threading.Thread(target=lambda: results.setdefault("b", b.ingest([Frame(siu(7))])))
        thread.start()
        thread.join(0.5)
        assert thread.is_alive()  # B waits for A's key (or, on SQLite, its write lock)
    thread.join(15)
    [outcome] = results["b"]
    assert (outcome.status, outcome.entry.duplicate_of) == (DUPLICATE, original)


def test_many_workers_claiming_at_once_send_each_delivery_once(journal, project):
    receive(journal, project, [dft(f"C{n}", account=f"ACC{n}".encode()) for n in range(40)])
    claimed: dict[str, list[int]] = {}

    def work(name):
        mine = open_journal(journal.location)
        try:
            while True:
                found = mine.claim_deliveries("erp-finance", name, T0, 3, 30)
                if not found:
                    return
                claimed.setdefault(name, []).extend(d.id for d in found)
                for delivery in found:
                    finish(mine, delivery, DEST, Result(OK, 200), T0, T0)
        finally:
            mine.close()

    threads = [threading.Thread(target=work, args=(f"node-{n}",)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    every = [i for ids in claimed.values() for i in ids]
    assert len(every) == len(set(every)) == 40


def test_per_key_order_follows_the_messages_even_when_a_later_one_was_converted_first(journal, other, project):
    """Two converters: the later message of a patient is converted (and queued) before the earlier
    one, which another converter still holds; the later delivery waits until the earlier message
    is converted, and then behind its delivery. Another patient's delivery is not held."""
    from engine.stamps import utc_now
    from engine.transform.converter import convert_pending

    first, second = receive(journal, project, [siu(1), siu(2)])  # the same patient
    third = receive(journal, project, [siu(3).replace(b"|100234^^^NORTHCLINIC^MR~", b"|777^^^NORTHCLINIC^MR~", 1)])[0]
    claimed_first = journal.claim_conversions("a/converter", 1, 60, utc_now())  # a has message 1, slowly
    assert [w.id for w in claimed_first] == [first.message_id]
    assert convert_pending(other, project, worker="b/converter") == 2  # b journals 2 and 3 at once
    later = utc_now() + timedelta(seconds=1)
    [due] = journal.claim_deliveries("fhir-main", "node-a", later, 10, 30)
    assert due.message_id == third.message_id  # another patient: not held
    [held] = [d for d in journal.list_deliveries("fhir-main") if d["message_id"] == second.message_id]
    assert (held["state"], held["waits_for_message"], held["waits_for_delivery"]) == ("pending", first.message_id, None)
    assert journal.outbox_holds() == [("fhir-main", 1, journal.get(first.message_id)["received_at"], 1)]
    assert convert_pending(journal, project, worker="a/converter") == 1  # now a records message 1
    assert journal.outbox_holds() == []
    [due] = journal.claim_deliveries("fhir-main", "node-a", later, 10, 30)
    assert due.message_id == first.message_id  # message 2's delivery waits behind message 1's
    [held] = [d for d in journal.list_deliveries("fhir-main") if d["message_id"] == second.message_id]
    assert (held["waits_for_message"], held["waits_for_delivery"], held["waits_for_state"]) == (None, due.id, "in_flight")
    assert finish(journal, due, DEST, Result(OK, 200), later, later) == "delivered"
    assert [d.message_id for d in other.claim_deliveries("fhir-main", "node-b", later, 10, 30)] == [second.message_id]
