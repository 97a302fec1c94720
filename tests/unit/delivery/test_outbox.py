"""The outbox state machine, ordering per key, backoff and replay, on a real SQLite journal."""

from datetime import datetime, timedelta, timezone

import pytest

from backends import backend, journal, journal_location  # noqa: F401 (these tests run on both backends)
from conftest import EXAMPLES, ROOT
from engine.delivery.destinations import Destination, RetryPolicy
from engine.delivery.outbox import DEAD, DELIVERED, PERMANENT, RETRYING, TRANSIENT, OK, Result, finish, summary
from engine.mllp.ingest import Frame, Ingestor
from engine.transform.project import Project
from engine.yamlconf import seconds

T0 = datetime(2026, 11, 24, 6, 0, tzinfo=timezone.utc)
DFT = (EXAMPLES / "dft_p03.hl7").read_bytes()


@pytest.fixture
def ingest(journal):
    project = Project.load(ROOT)
    ingestor = Ingestor(journal, clock=lambda: T0, next_control_id=lambda: "A", project=project)

    def send(raw):
        [outcome] = ingestor.ingest([Frame(raw)])
        return outcome

    return send


def dft(control_id, account=b"A2026120877"):
    return DFT.replace(b"EC000501", control_id.encode(), 1).replace(b"A2026120877", account, 1)


DEST = Destination("erp-finance", "file", "x", retry=RetryPolicy(max_attempts=3, initial_delay=2, jitter=0), order_by="account")


def test_a_mapped_message_is_queued_for_each_destination_of_its_route(journal, ingest):
    outcome = ingest(dft("C1"))
    assert outcome.status == "mapped"
    rows = journal._all("SELECT destination, key, state FROM deliveries ORDER BY destination")
    assert rows == [
        ("erp-finance", "account:A2026120877", "pending"),
        ("fhir-main", "patient:EASTCLINIC|300612", "pending"),
    ]


def test_same_key_goes_out_in_order_and_a_failure_holds_back_only_its_key(journal, ingest):
    ingest(dft("C1"))
    ingest(dft("C2"))
    ingest(dft("C3", account=b"OTHER-ACCOUNT"))
    first = journal.due_deliveries("erp-finance", T0, 10)
    assert [d.control_id for d in first] == ["C1", "C3"]  # C2 waits behind C1 (same account)
    first = journal.claim_deliveries("erp-finance", "node-a", T0, 10, 30)
    assert journal.due_deliveries("erp-finance", T0, 10) == []  # in flight holds the key too
    c1, c3 = first
    assert finish(journal, c1, DEST, Result(TRANSIENT, 503, "busy", error="HTTP 503"), T0, T0, rand=lambda: 0.5) == RETRYING
    assert finish(journal, c3, DEST, Result(OK, 200), T0, T0) == DELIVERED
    assert journal.due_deliveries("erp-finance", T0 + timedelta(seconds=1), 10) == []  # C1 retries at +2 s; C2 still waits
    again = journal.claim_deliveries("erp-finance", "node-a", T0 + timedelta(seconds=2), 10, 30)
    assert [d.control_id for d in again] == ["C1"]
    finish(journal, again[0], DEST, Result(OK, 200), T0, T0 + timedelta(seconds=2))
    assert [d.control_id for d in journal.due_deliveries("erp-finance", T0 + timedelta(seconds=2), 10)] == ["C2"]


def test_backoff_grows_and_caps_and_jitters():
    policy = RetryPolicy(initial_delay=2, multiplier=2, max_delay=60, jitter=0.2)
    assert [policy.delay(n, 0.5) for n in (1, 2, 3, 4, 10)] == [2, 4, 8, 16, 60]
    assert policy.delay(1, 0.0) == pytest.approx(1.6) and policy.delay(1, 0.999999) == pytest.approx(2.4, rel=1e-3)


def test_permanent_errors_dead_letter_at_once_and_transient_ones_after_the_limit(journal, ingest):
    ingest(dft("C1"))
    ingest(dft("C2", account=b"B"))
    d1, d2 = journal.claim_deliveries("erp-finance", "node-a", T0, 10, 30)
    assert finish(journal, d1, DEST, Result(PERMANENT, 422, '{"issue": [...]}', error="HTTP 422"), T0, T0) == DEAD
    state = None
    for attempt in range(3):
        now = T0 + timedelta(minutes=attempt)
        [d2] = [d for d in journal.due_deliveries("erp-finance", now, 10)] or [d2]
        state = finish(journal, d2, DEST, Result(TRANSIENT, None, "", error="connection refused"), now, now, rand=lambda: 0.5)
    assert state == DEAD
    rows = {r["control_id"]: r for r in journal.list_deliveries("erp-finance")}
    assert rows["C1"]["last_error"] == "HTTP 422"
    assert rows["C2"]["last_error"] == "gave up after 3 attempts: connection refused"
    attempts = journal._one("SELECT count(*), max(response) FROM attempts")
    assert attempts == (4, '{"issue": [...]}')
    assert summary(journal)[0]["dead"] == 2


def test_retry_after_is_honoured(journal, ingest):
    ingest(dft("C1"))
    [d] = journal.due_deliveries("erp-finance", T0, 10)
    finish(journal, d, DEST, Result(TRANSIENT, 429, retry_after=30, error="HTTP 429"), T0, T0)
    assert journal.due_deliveries("erp-finance", T0 + timedelta(seconds=29), 10) == []
    assert len(journal.due_deliveries("erp-finance", T0 + timedelta(seconds=30), 10)) == 1


def test_in_flight_after_a_crash_is_retried_by_its_node_at_once_and_by_others_when_the_lease_expires(journal, ingest):
    ingest(dft("C1"))
    [claimed] = journal.claim_deliveries("erp-finance", "node-a", T0, 10, 30)
    assert journal.recover_in_flight(T0, "node-b") == []  # node-a's claim is alive: not node-b's to take
    assert journal.recover_in_flight(T0, "node-a") == [claimed.id]  # node-a restarted: its own, at once
    [again] = journal.due_deliveries("erp-finance", T0, 10)
    assert (again.state, again.resumed) == (RETRYING, True)
    journal.claim_deliveries("erp-finance", "node-a", T0, 10, 30)
    assert journal.recover_in_flight(T0 + timedelta(seconds=29)) == []
    assert journal.recover_in_flight(T0 + timedelta(seconds=30)) == [claimed.id]  # node-a died: its lease ran out


def test_replay_restarts_dead_deliveries_and_records_who_and_why(journal, ingest):
    outcome = ingest(dft("C1"))
    [d] = journal.due_deliveries("erp-finance", T0, 10)
    finish(journal, d, DEST, Result(PERMANENT, 400, error="HTTP 400"), T0, T0)
    assert journal.replay([outcome.message_id], ["erp-finance"], "alice", "fixed the product code", T0, only_dead=True) == 1
    assert [x.state for x in journal.due_deliveries("erp-finance", T0, 10)] == ["pending"]
    assert journal._all("SELECT who, why, destination FROM replays") == [
        ("alice", "fixed the product code", '["erp-finance"]')
    ]


def test_durations():
    assert [seconds(t, "x") for t in ("500ms", "2s", "10m", "24h", "1d", 3)] == [0.5, 2, 600, 86400, 86400, 3]
    with pytest.raises(ValueError, match="not a duration"):
        seconds("soon", "retry.max_age")
