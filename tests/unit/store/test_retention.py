"""Pruning by age: what goes, what stays, and the space given back to the file system."""

import itertools
import json
from datetime import datetime, timedelta, timezone

from click.testing import CliRunner

from backends import backend, journal, journal_location  # noqa: F401 (tests asking for journal run on both)
from conftest import EXAMPLES, ROOT
from engine.cli import cli
from engine.mllp.ingest import Frame, Ingestor
from engine.store import SearchQuery
from engine.store.sqlite import SqliteJournal as Journal
from engine.transform.project import Project

OLD = datetime(2026, 1, 1, tzinfo=timezone.utc)
NEW = datetime(2026, 11, 1, tzinfo=timezone.utc)
SIU = (EXAMPLES / "siu_s12.hl7").read_bytes()


def fill(journal, count, start, project=None):
    clock = itertools.count()
    ingestor = Ingestor(journal, clock=lambda: start + timedelta(seconds=next(clock)), project=project)
    for n in range(count):
        ingestor.ingest([Frame(SIU.replace(b"NC000123", f"P{start:%m}{n}".encode(), 1)
                               .replace(b"|100234^", f"|{start:%m}{n:05d}^".encode(), 1))])


def test_prune_half_gives_the_space_back(tmp_path):
    journal = Journal(tmp_path / "journal.db")
    fill(journal, 1500, OLD)
    fill(journal, 1500, NEW)
    journal.search(SearchQuery(text="DOE"))  # builds the free-text index too
    result = journal.prune(datetime(2026, 6, 1, tzinfo=timezone.utc))
    assert result.messages == 1500
    assert journal.count() == 1500
    assert result.bytes_after <= 0.6 * result.bytes_before, (result.bytes_before, result.bytes_after)
    # What is left is intact and searchable; what went is gone from the text index too.
    assert len(journal.search(SearchQuery(text="DOE", limit=5000))) == 1500
    assert journal.search(SearchQuery(patient="0100000")) == []
    assert len(journal.search(SearchQuery(patient="1100000"))) == 1
    assert journal.conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    journal.close()


def test_keep_errors_and_owed_deliveries_stay(journal):
    project = Project.load(ROOT)
    fill(journal, 3, OLD, project)  # routed, waiting for the converter
    assert journal.prune(NEW).messages == 0
    journal._run("UPDATE messages SET status = 'mapped' WHERE route IS NOT NULL")
    from engine.delivery.outbox import queue

    for (message_id,) in journal._all("SELECT id FROM messages"):
        queue(journal, message_id, list(project.destinations.values()), OLD)
    Ingestor(journal, clock=lambda: OLD).ingest([Frame((EXAMPLES / "bad_msh.hl7").read_bytes())])
    assert journal.prune(NEW, keep_errors=True).messages == 0  # deliveries still owed, and an error
    journal._run("UPDATE deliveries SET state = 'delivered'")
    assert journal.prune(NEW, keep_errors=True).messages == 3
    assert journal.count() == 1 and journal.count("rejected") == 1
    assert journal._one("SELECT count(*) FROM deliveries") == (0,)
    assert journal.prune(NEW).messages == 1


def test_cli_dry_run_and_prune(journal, journal_location, backend):
    fill(journal, 20, OLD)
    fill(journal, 5, datetime.now(timezone.utc) - timedelta(hours=1))
    journal.close()
    path = journal_location
    result = CliRunner().invoke(cli, ["journal", "prune", "--journal", path, "--older-than", "30d", "--dry-run"])
    assert result.exit_code == 0 and result.output.startswith("would prune 20 messages received before ")
    result = CliRunner().invoke(cli, ["journal", "prune", "--journal", path, "--older-than", "30d", "--json"])
    data = json.loads(result.output)
    assert data["messages"] == 20 and data["bytes_after"] > 0
    # SQLite gives the space back to the file system; PostgreSQL's VACUUM keeps it for new rows.
    assert data["bytes_after"] < data["bytes_before"] or backend == "postgresql"
    result = CliRunner().invoke(cli, ["journal", "prune", "--journal", path, "--older-than", "soon"])
    assert result.exit_code == 2 and "is not an age" in result.output
