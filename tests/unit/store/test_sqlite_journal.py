"""The SQLite journal behind the storage interface: search, indexes, WAL, reopening, read-only
connections, and the retention rule as a query agreeing with the rule in Python."""

import itertools
import sqlite3
from datetime import datetime, timedelta, timezone

import pytest

from conftest import EXAMPLES, NOW, ROOT
from engine.delivery.outbox import queue
from engine.mllp.ingest import Frame, Ingestor
from engine.stamps import iso
from engine.store import ConversionRecord, Journal, SearchQuery, open_journal
from engine.store.base import SCHEMA_VERSION
from engine.store.retention import prunable
from engine.store.sql import prunable_sql, search_sql
from engine.store.sqlite import SqliteJournal
from engine.transform.project import Project

SIU = (EXAMPLES / "siu_s12.hl7").read_bytes()


def test_open_journal_gives_the_interface():
    assert issubclass(SqliteJournal, Journal)
    missing = [name for name in Journal.__abstractmethods__ if getattr(SqliteJournal, name) is getattr(Journal, name)]
    assert missing == []


def test_free_text_search_and_keyed_filters(ingestor, journal):
    outcomes = ingestor.ingest([Frame((EXAMPLES / name).read_bytes()) for name in ("siu_s12.hl7", "siu_s15.hl7", "dft_p03.hl7")])
    ids = [o.message_id for o in outcomes]
    assert [r["id"] for r in journal.search(SearchQuery(message_type="SIU"))] == [ids[1], ids[0]]
    assert [r["id"] for r in journal.search(SearchQuery(message_type="SIU^S15"))] == [ids[1]]
    assert [r["id"] for r in journal.search(SearchQuery(control_id="NC000123"))] == [ids[0]]
    assert journal.search(SearchQuery(text='no"such OR word')) == []


def test_keyed_searches_use_indexes(ingestor, journal):
    ingestor.ingest([Frame(SIU)])
    for query in (SearchQuery(patient="100234"), SearchQuery(control_id="X"), SearchQuery(transaction="T")):
        sql, params = search_sql(query)
        plan = " ".join(row[3] for row in journal.conn.execute("EXPLAIN QUERY PLAN " + sql, params))
        assert "SCAN m" not in plan.replace("SCAN m USING INTEGER PRIMARY KEY", ""), plan


def test_journal_is_wal_and_survives_reopen(tmp_path):
    path = tmp_path / "j.db"
    j = open_journal(path)
    Ingestor(j).ingest([Frame(SIU)])
    j.close()
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("SELECT count(*) FROM messages").fetchone()[0] == 1
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 6
    reopened = open_journal(path, create=False)
    assert reopened.count() == 1
    reopened.close()
    with pytest.raises(FileNotFoundError):
        open_journal(tmp_path / "none.db", create=False)


def test_a_read_only_journal_reads_and_never_writes(tmp_path):
    path = tmp_path / "j.db"
    writer = open_journal(path)
    [outcome] = Ingestor(writer).ingest([Frame(SIU)])
    reader = open_journal(path, create=False, readonly=True)
    try:
        reader.check_readable()
        assert reader.get(outcome.message_id)["raw"] == SIU
        assert [r["id"] for r in reader.search(SearchQuery(text="DOE"))] == [outcome.message_id]
        with pytest.raises(sqlite3.OperationalError, match="readonly"):
            with reader.transaction():
                reader.record_conversion(outcome.message_id, ConversionRecord("r", "mapped", iso(NOW), "{}"))
    finally:
        reader.close()
        writer.close()


def test_synchronous_modes_and_checkpoints(tmp_path):
    with pytest.raises(ValueError, match="synchronous must be one of"):
        open_journal(tmp_path / "j.db", "sometimes")
    journal = open_journal(tmp_path / "j.db", "normal", manual_checkpoints=True)
    assert journal.conn.execute("PRAGMA synchronous").fetchone() == (1,)
    assert journal.conn.execute("PRAGMA wal_autocheckpoint").fetchone() == (0,)
    Ingestor(journal).ingest([Frame(SIU)])
    assert journal.checkpoint()[0] == 0  # not busy: copied back
    background = journal.background_checkpointer()
    assert background.run_once()[0] == 0
    background.close()
    journal.close()


def test_identifiers_come_back_in_storage_order_for_ordering_keys(ingestor, journal):
    # Ordering keys are taken from the stored identifiers (as they were before the interface):
    # clustered by (message, kind, value), not in message order.
    raw = SIU.replace(b"|100234^^^NORTHCLINIC^MR~E55501234^^^EPICADT^PI|", b"|Z9^^^NORTH^MR~A1^^^EPIC^PI|", 1)
    [outcome] = ingestor.ingest([Frame(raw)])
    patients = [i for i in journal.message_identifiers(outcome.message_id) if i["kind"] == "patient"]
    assert [i["value"] for i in patients] == ["A1", "Z9"]
    assert [i["value"] for i in journal.get(outcome.message_id)["ids"] if i["kind"] == "patient"] == ["A1", "Z9"]


def test_the_retention_query_agrees_with_the_retention_rule(journal):
    project = Project.load(ROOT)
    clock = itertools.count()
    start = datetime(2026, 1, 1, tzinfo=timezone.utc)
    ingestor = Ingestor(journal, clock=lambda: start + timedelta(hours=next(clock)), project=project)
    for name in ["siu_s12.hl7", "siu_s15.hl7", "dft_p03.hl7", "bad_msh.hl7", "siu_s13.hl7", "dft_p11.hl7"]:
        ingestor.ingest([Frame((EXAMPLES / name).read_bytes())])
    conn = journal.conn
    # Every status and delivery state the rule distinguishes.
    conn.execute("UPDATE messages SET status = 'mapped' WHERE id IN (2, 3)")
    conn.execute("UPDATE messages SET status = 'held' WHERE id = 5")
    conn.execute("UPDATE messages SET status = 'mapping_error' WHERE id = 6")
    for message_id in (2, 3):
        queue(journal, message_id, list(project.destinations.values()), start)
    conn.execute("UPDATE deliveries SET state = 'delivered' WHERE message_id = 2")
    rows = {r["id"]: r for r in journal._rows("SELECT id, received_at, status, route FROM messages")}
    open_deliveries = dict(conn.execute("SELECT message_id, count(*) FROM deliveries WHERE state != 'delivered' "
                                        "GROUP BY message_id").fetchall())
    for hours in (0, 2, 4, 10):
        cutoff = start + timedelta(hours=hours)
        for keep_errors in (False, True):
            by_rule = sorted(i for i, row in rows.items()
                             if prunable(row, open_deliveries.get(i, 0), iso(cutoff), keep_errors))
            by_query = [r[0] for r in conn.execute(prunable_sql(keep_errors), (iso(cutoff), 0, 100))]
            assert by_query == by_rule, (hours, keep_errors)
            assert journal.count_prunable(cutoff, keep_errors) == len(by_rule)
    assert by_rule  # the last cutoff leaves something to prune
