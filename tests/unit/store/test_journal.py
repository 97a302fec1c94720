"""The journal behind the storage interface, on both backends (SQLite and PostgreSQL): search,
reopening, read-only connections, one schema, and the retention rule as a query agreeing with the
rule in Python; then what is one backend's own (SQLite's WAL and query plans, PostgreSQL's
schema versions and reconnecting)."""

import itertools
import sqlite3
from datetime import datetime, timedelta, timezone

import pytest

from backends import backend, journal, journal_location, sqlite_journal  # noqa: F401 (tests asking for journal run on both)
from conftest import EXAMPLES, NOW, ROOT
from engine.delivery.outbox import queue
from engine.mllp.ingest import Frame, Ingestor
from engine.stamps import iso
from engine.store import ConversionRecord, Journal, SearchQuery, open_journal
from engine.store.base import SCHEMA_VERSION
from engine.store.retention import prunable
from engine.store.sql import prunable_sql, search_sql
from engine.store.postgres import PostgresJournal
from engine.store.sqlite import SqliteJournal
from engine.transform.project import Project
from pgserver import PostgresServer, free_port

SIU = (EXAMPLES / "siu_s12.hl7").read_bytes()


@pytest.fixture
def ingestor(journal):
    counter = itertools.count(1)
    return Ingestor(journal, clock=lambda: NOW, next_control_id=lambda: f"ACK{next(counter)}")


@pytest.mark.parametrize("implementation", [SqliteJournal, PostgresJournal])
def test_open_journal_gives_the_interface(implementation):
    assert issubclass(implementation, Journal)
    missing = [name for name in implementation.__abstractmethods__]
    assert missing == []


def test_both_backends_have_the_same_tables_and_columns(sqlite_journal, postgres_url):
    pg = open_journal(postgres_url)
    try:
        on_sqlite = {table: [c[1] for c in sqlite_journal.conn.execute(f"PRAGMA table_info({table})")]
                     for (table,) in sqlite_journal.conn.execute(
                         "SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")}
        on_postgres = {}
        for table, column in pg._all("SELECT table_name, column_name FROM information_schema.columns "
                                     "WHERE table_schema = 'public' ORDER BY table_name, ordinal_position"):
            on_postgres.setdefault(table, []).append(column)
    finally:
        pg.close()
    # What differs is each backend's own bookkeeping: the schema version and free text.
    assert on_postgres.pop("schema_version") == ["version"] and on_postgres.pop("messages_text") == [
        "message_id", "document"]
    assert on_postgres == on_sqlite and "deliveries" in on_sqlite


def test_reopening_and_a_journal_that_is_not_there(journal, journal_location, backend, tmp_path, postgres_server):
    Ingestor(journal).ingest([Frame(SIU)])
    reopened = open_journal(journal_location, create=False)
    assert reopened.count() == 1
    reopened.close()
    missing = str(tmp_path / "none.db") if backend == "sqlite" else postgres_server.create_database()
    with pytest.raises(FileNotFoundError):
        open_journal(missing, create=False)


def test_free_text_search_and_keyed_filters(ingestor, journal):
    outcomes = ingestor.ingest([Frame((EXAMPLES / name).read_bytes()) for name in ("siu_s12.hl7", "siu_s15.hl7", "dft_p03.hl7")])
    ids = [o.message_id for o in outcomes]
    assert [r["id"] for r in journal.search(SearchQuery(message_type="SIU"))] == [ids[1], ids[0]]
    assert [r["id"] for r in journal.search(SearchQuery(message_type="SIU^S15"))] == [ids[1]]
    assert [r["id"] for r in journal.search(SearchQuery(control_id="NC000123"))] == [ids[0]]
    assert journal.search(SearchQuery(text='no"such OR word')) == []


def test_free_text_finds_what_was_just_received_and_forgets_what_was_pruned(ingestor, journal):
    [siu, dft] = ingestor.ingest([Frame(SIU), Frame((EXAMPLES / "dft_p03.hl7").read_bytes())])
    assert [r["id"] for r in journal.search(SearchQuery(text="DOE"))] == [siu.message_id]
    assert [r["id"] for r in journal.search(SearchQuery(text="doe jane"))] == [siu.message_id]
    assert journal.search(SearchQuery(text="DOE nosuchword")) == []
    assert journal.prune(NOW + timedelta(days=1)).messages == 2
    assert journal.search(SearchQuery(text="DOE")) == [] and journal.count() == 0


def test_keyed_searches_use_indexes(sqlite_journal):
    Ingestor(sqlite_journal).ingest([Frame(SIU)])
    for query in (SearchQuery(patient="100234"), SearchQuery(control_id="X"), SearchQuery(transaction="T")):
        sql, params = search_sql(query)
        plan = " ".join(row[3] for row in sqlite_journal.conn.execute("EXPLAIN QUERY PLAN " + sql, params))
        assert "SCAN m" not in plan.replace("SCAN m USING INTEGER PRIMARY KEY", ""), plan


def test_the_claim_probes_indexes_for_what_holds_a_key_back_on_sqlite(sqlite_journal):
    from engine.store.sql import DUE_SQL

    plan = [row[3] for row in sqlite_journal.conn.execute(
        "EXPLAIN QUERY PLAN " + DUE_SQL.format(lock=""), ("fhir-main", "9999", 10))]
    assert plan[0] == "SEARCH d USING INDEX idx_deliveries_due (destination=? AND next_attempt_at<?)"
    assert "SEARCH e USING INDEX idx_deliveries_open_keys (destination=? AND key=? AND message_id<?)" in plan
    assert ("SEARCH x USING COVERING INDEX idx_expected_deliveries_key (destination=? AND key=? AND message_id<?)"
            in plan)
    assert not [step for step in plan if step.startswith("SCAN")], plan


def test_the_claim_probes_indexes_for_what_holds_a_key_back_on_postgresql(postgres_url):
    """With a converters' backlog of 10,000 messages (analysed): each candidate probes the expected
    deliveries' index, never scans them. (A small table is scanned: two pages cost less.)"""
    from engine.store.postgres import CLAIM_DELIVERIES_SQL

    pg = open_journal(postgres_url)
    try:
        with pg.transaction():
            pg._run("INSERT INTO messages (id, received_at, status, raw, route) SELECT g, '2026', "
                    "CASE WHEN g > 2000 THEN 'accepted' ELSE 'mapped' END, '', 'r' FROM generate_series(1, 12000) g")
            pg._run("INSERT INTO deliveries (message_id, destination, key, state, created_at, next_attempt_at, updated_at) "
                    "SELECT g, 'fhir-main', 'patient:' || (g % 500), 'pending', '2026', '2026', '2026' "
                    "FROM generate_series(1, 2000) g")
            pg._run("INSERT INTO expected_deliveries (message_id, destination, key) "
                    "SELECT g, 'fhir-main', 'patient:' || (g % 500) FROM generate_series(2001, 12000) g")
        pg._run("ANALYZE")
        plan = "\n".join(row[0] for row in pg._all("EXPLAIN " + CLAIM_DELIVERIES_SQL, "fhir-main", "9999", 10, "node",
                                                    "9999", "9999"))
    finally:
        pg.close()
    assert "Index Only Scan using idx_expected_deliveries_key on expected_deliveries x" in plan, plan
    assert "Index Only Scan using idx_deliveries_open_keys on deliveries e" in plan, plan
    assert "Seq Scan on expected_deliveries" not in plan, plan


def test_a_journal_of_schema_7_gains_the_expected_deliveries(tmp_path):
    path = tmp_path / "j.db"
    open_journal(path).close()
    conn = sqlite3.connect(path)
    conn.execute("DROP TABLE expected_deliveries")
    conn.execute("PRAGMA user_version = 7")
    conn.close()
    journal = open_journal(path)
    try:
        assert journal.conn.execute("PRAGMA user_version").fetchone()[0] == 8
        assert journal.waiting_without_expected(0, 10) == [] and journal.outbox_holds() == []
        assert "idx_expected_deliveries_key" in {r[0] for r in journal.conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'index'")}
    finally:
        journal.close()


def test_sqlite_journal_is_wal_and_survives_reopen(tmp_path):
    path = tmp_path / "j.db"
    j = open_journal(path)
    Ingestor(j).ingest([Frame(SIU)])
    j.close()
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("SELECT count(*) FROM messages").fetchone()[0] == 1
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 8
    reopened = open_journal(path, create=False)
    assert reopened.count() == 1
    reopened.close()
    with pytest.raises(FileNotFoundError):
        open_journal(tmp_path / "none.db", create=False)


def test_a_read_only_journal_reads_and_never_writes(journal, journal_location):
    [outcome] = Ingestor(journal).ingest([Frame(SIU)])
    reader = open_journal(journal_location, create=False, readonly=True)
    try:
        reader.check_readable()
        assert reader.get(outcome.message_id)["raw"] == SIU
        assert [r["id"] for r in reader.search(SearchQuery(text="DOE"))] == [outcome.message_id]
        with pytest.raises(Exception, match="read-?only"):
            with reader.transaction():
                reader.record_conversion(outcome.message_id, ConversionRecord("r", "mapped", iso(NOW), "{}"))
    finally:
        reader.close()


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
    # Every status and delivery state the rule distinguishes (through the backend's own helper).
    journal._run("UPDATE messages SET status = 'mapped' WHERE id IN (2, 3)")
    journal._run("UPDATE messages SET status = 'held' WHERE id = 5")
    journal._run("UPDATE messages SET status = 'mapping_error' WHERE id = 6")
    for message_id in (2, 3):
        queue(journal, message_id, list(project.destinations.values()), start)
    journal._run("UPDATE deliveries SET state = 'delivered' WHERE message_id = 2")
    rows = {r["id"]: r for r in journal._rows("SELECT id, received_at, status, route FROM messages")}
    open_deliveries = dict(journal._all("SELECT message_id, count(*) FROM deliveries WHERE state != 'delivered' "
                                        "GROUP BY message_id"))
    for hours in (0, 2, 4, 10):
        cutoff = start + timedelta(hours=hours)
        for keep_errors in (False, True):
            by_rule = sorted(i for i, row in rows.items()
                             if prunable(row, open_deliveries.get(i, 0), iso(cutoff), keep_errors))
            by_query = [r[0] for r in journal._all(prunable_sql(keep_errors), iso(cutoff), 0, 100)]
            assert by_query == by_rule, (hours, keep_errors)
            assert journal.count_prunable(cutoff, keep_errors) == len(by_rule)
    assert by_rule  # the last cutoff leaves something to prune


def test_postgresql_keeps_its_schema_version_and_migrates_once(postgres_url):
    first, second = open_journal(postgres_url), open_journal(postgres_url)  # two nodes starting
    try:
        assert first._all("SELECT version FROM schema_version") == [(SCHEMA_VERSION,)]
        first._run("UPDATE schema_version SET version = 99")
        with pytest.raises(RuntimeError, match="newer hl7bridge"):
            open_journal(postgres_url)
    finally:
        first.close()
        second.close()


def test_an_unreachable_database_is_an_os_error_that_names_it_without_the_password(monkeypatch):
    from engine.store import postgres

    monkeypatch.setattr(postgres, "CONNECT_TIMEOUT", 1)
    url = f"postgresql://hl7:s3cret@127.0.0.1:{free_port()}/journal"
    with pytest.raises(OSError) as info:
        open_journal(url)
    assert "postgresql://hl7:***@127.0.0.1" in str(info.value) and "s3cret" not in str(info.value)
    assert "Connection refused" in str(info.value)  # the network's own words, not only "timed out"
    postgres.close_pools()


def test_a_journal_reconnects_after_the_server_restarts():
    from engine.store import postgres

    with PostgresServer() as pg:
        url = pg.create_database()
        journal = open_journal(url)
        Ingestor(journal).ingest([Frame(SIU)])
        pg.restart()  # every connection is cut, as in a failover
        with pytest.raises(Exception):
            journal.count()  # the call that meets the dead connection fails...
        assert journal.count() == 1  # ...and the next one has a fresh connection
        journal.close()
        postgres.close_pools()
