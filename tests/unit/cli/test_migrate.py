"""``hl7bridge journal migrate``: a single node's SQLite journal into PostgreSQL, nothing lost,
safe to run again, refusing a database with traffic of its own; then the CLI reads the same
answers from both."""

import json
from datetime import datetime, timezone

import pytest
from click.testing import CliRunner

from conftest import EXAMPLES, ROOT
from engine.cli import cli
from engine.delivery.outbox import OK, Result, finish
from engine.mllp.ingest import Frame, Ingestor
from engine.store import SearchQuery, open_journal
from engine.transform.converter import convert_pending
from engine.transform.project import Project

NOW = datetime(2026, 11, 24, 6, 0, tzinfo=timezone.utc)


@pytest.fixture(autouse=True)
def closing_pools():
    """The CLI opened pools to each test's database: close them before it is dropped."""
    from engine.store import postgres

    yield
    postgres.close_pools()


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def node_journal(path, names):
    """A single node's journal: the examples received, the commit-time ones converted, one delivered."""
    journal = open_journal(path)
    project = Project.load(ROOT)
    ingestor = Ingestor(journal, clock=lambda: NOW, project=project)
    for name in names:
        ingestor.ingest([Frame((EXAMPLES / name).read_bytes(), listener="mllp", peer="10.0.0.5:4000")])
    while convert_pending(journal, project):
        pass
    [delivery] = journal.claim_deliveries("erp-finance", "node", NOW, 1, 30)
    finish(journal, delivery, project.destinations["erp-finance"], Result(OK, 201, "{}"), NOW, NOW)
    journal.replay([delivery.message_id], ["erp-finance"], "alice", "check", NOW)
    with journal.transaction():
        journal.acknowledge("charge_without_appointment:EASTCLINIC:TX20261208-0001", "alice", "walk-in", "2026-11-24T06:00:00Z")
    return journal


def test_migrate_copies_everything_and_runs_again(tmp_path, postgres_url):
    source = node_journal(tmp_path / "journal.db", ["siu_s12.hl7", "dft_p03.hl7", "bad_msh.hl7", "siu_s12.hl7"])
    result = invoke("journal", "migrate", "--from", tmp_path / "journal.db", "--to", postgres_url, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["complete"] and report["copied"]["messages"] == 4
    assert all(v["source"] == v["target"] > 0 for t, v in report["verified"].items()
               if t not in ("replays", "expected_deliveries"))  # every message is converted: none expected
    target = open_journal(postgres_url)
    try:
        for message_id in range(1, 5):
            assert target.get(message_id) == source.get(message_id)
            assert target.conversion(message_id) == source.conversion(message_id)
            assert target.history(message_id) == source.history(message_id)
        # The scheduling-to-cash record came along, acknowledgements included.
        assert target.appointment_record("NORTHCLINIC", "90001") == source.appointment_record("NORTHCLINIC", "90001")
        assert target.charge_record("EASTCLINIC", "TX20261208-0003") == source.charge_record("EASTCLINIC", "TX20261208-0003")
        assert target.acknowledgements() == source.acknowledgements() != {}
        assert target.outbox_counts() == source.outbox_counts()
        assert [r["id"] for r in target.search(SearchQuery(text="DOE"))] == \
            [r["id"] for r in source.search(SearchQuery(text="DOE"))]
        # The node went on: a new message (waiting for conversion, with what it holds back) and a
        # delivery's new state come with the second run.
        Ingestor(source, clock=lambda: NOW, project=Project.load(ROOT)).ingest(
            [Frame((EXAMPLES / "siu_s15.hl7").read_bytes())])
        [delivery] = source.claim_deliveries("fhir-main", "node", NOW, 1, 30)
        assert invoke("journal", "migrate", "--from", tmp_path / "journal.db", "--to", postgres_url).exit_code == 0
        assert target.count() == 5 and target.outbox_counts() == source.outbox_counts()
        assert target.outbox_holds() == source.outbox_holds() != []
        # The cluster goes on from there: new IDs come after the copied ones.
        [outcome] = Ingestor(target, clock=lambda: NOW).ingest([Frame((EXAMPLES / "siu_s13.hl7").read_bytes())])
        assert outcome.message_id == 6
    finally:
        target.close()
        source.close()


def test_migrate_refuses_a_database_with_traffic_of_its_own(tmp_path, postgres_url):
    node_journal(tmp_path / "journal.db", ["siu_s12.hl7", "dft_p03.hl7"]).close()
    cluster = open_journal(postgres_url)
    Ingestor(cluster, clock=lambda: NOW).ingest([Frame((EXAMPLES / "siu_s13.hl7").read_bytes())])
    cluster.close()
    result = invoke("journal", "migrate", "--from", tmp_path / "journal.db", "--to", postgres_url)
    assert result.exit_code == 1
    assert "already holds another message with ID 1" in result.output and "nothing of this batch" in result.output


def test_migrate_says_what_it_needs(tmp_path):
    result = invoke("journal", "migrate", "--from", tmp_path / "journal.db", "--to", tmp_path / "other.db")
    assert (result.exit_code, result.output) == (2, f"Error: --to must be a postgresql:// URL, not "
                                                    f"'{tmp_path / 'other.db'}'\n")
