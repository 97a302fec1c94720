"""The private PostgreSQL of tests/pgserver.py does what the PostgreSQL backend's tests will rely on."""

from __future__ import annotations

import os
import re
import urllib.parse

import psycopg
import pytest

import pgserver


def database_of(url: str) -> str:
    return urllib.parse.urlsplit(url).path.lstrip("/")


def test_postgres_url_is_a_working_database_of_its_own(postgres_url, postgres_server):
    assert postgres_url.startswith(f"postgresql://postgres@127.0.0.1:{postgres_server.port}/")
    with psycopg.connect(postgres_url) as conn:
        assert conn.execute("SELECT current_database()").fetchone()[0] == database_of(postgres_url)
        conn.execute("CREATE TABLE message (id bigserial PRIMARY KEY, control_id text NOT NULL UNIQUE)")
        conn.execute("INSERT INTO message (control_id) VALUES ('MSG1'), ('MSG2')")
        conn.commit()
    with psycopg.connect(postgres_url) as conn:  # committed: a new connection sees it
        rows = conn.execute("SELECT control_id FROM message ORDER BY id").fetchall()
    assert rows == [("MSG1",), ("MSG2",)]


@pytest.mark.parametrize("run", [1, 2])
def test_each_test_gets_a_fresh_database(postgres_url, postgres_server, run):
    """Run twice: the second run would find the first run's table (or database) if anything leaked."""
    with psycopg.connect(postgres_url) as conn:
        assert conn.execute("SELECT to_regclass('public.leftover')").fetchone()[0] is None
        conn.execute("CREATE TABLE leftover (run int)")
        conn.execute("INSERT INTO leftover VALUES (%s)", (run,))
    # The databases of earlier tests were dropped when they ended.
    test_databases = [name for name in postgres_server.databases() if re.match(r"t\d+_", name)]
    assert test_databases == [database_of(postgres_url)]


def test_two_fresh_databases_are_independent(postgres_server):
    first = postgres_server.create_database()
    second = postgres_server.create_database()
    try:
        assert database_of(first) != database_of(second)
        with psycopg.connect(first, autocommit=True) as conn:
            conn.execute("CREATE TABLE only_here (x int)")
            conn.execute("INSERT INTO only_here VALUES (1)")
        with psycopg.connect(second, autocommit=True) as conn:
            assert conn.execute("SELECT to_regclass('public.only_here')").fetchone()[0] is None
            conn.execute("CREATE TABLE only_here (x int)")  # the same name is free here
            assert conn.execute("SELECT count(*) FROM only_here").fetchone()[0] == 0
    finally:
        postgres_server.drop_database(database_of(first))
        postgres_server.drop_database(database_of(second))
    assert database_of(first) not in postgres_server.databases()


def test_a_template_database_is_copied(postgres_server):
    template = database_of(postgres_server.create_database("smoke_template"))
    try:
        with psycopg.connect(postgres_server.url_for(template), autocommit=True) as conn:
            conn.execute("CREATE TABLE schema_version (version int)")
            conn.execute("INSERT INTO schema_version VALUES (5)")
        copy = postgres_server.create_database("smoke_copy", template=template)
        with psycopg.connect(copy, autocommit=True) as conn:
            assert conn.execute("SELECT version FROM schema_version").fetchall() == [(5,)]
            conn.execute("UPDATE schema_version SET version = 6")
        with psycopg.connect(postgres_server.url_for(template)) as conn:  # the template is untouched
            assert conn.execute("SELECT version FROM schema_version").fetchall() == [(5,)]
    finally:
        postgres_server.drop_database("smoke_copy")
        postgres_server.drop_database(template)
    with pytest.raises(ValueError):
        postgres_server.create_database("Robert'); DROP TABLE students;--")


def test_listens_on_loopback_only_with_its_socket_in_its_own_directory(postgres_server):
    assert postgres_server.sql("SHOW listen_addresses") == "127.0.0.1"
    assert postgres_server.sql("SHOW unix_socket_directories") == str(postgres_server.socket_dir)
    assert postgres_server.sql("SHOW data_directory") == str(postgres_server.data_dir)
    if os.geteuid() == 0:  # initdb refuses root: the cluster belongs to the postgres user
        assert postgres_server.data_dir.owner() == pgserver.SYSTEM_USER


def test_immediate_stop_keeps_committed_rows_and_the_url():
    """stop() is a crash (pg_ctl -m immediate): committed rows come back after recovery, on the same URL."""
    server = pgserver.PostgresServer()
    pgserver.start_or_skip(server)
    try:
        url = server.create_database("crash")
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("CREATE TABLE acked (control_id text)")
            conn.execute("INSERT INTO acked SELECT 'MSG' || g FROM generate_series(1, 500) g")
        server.stop()
        assert not server.running
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(url, connect_timeout=2)
        server.start()
        assert server.url_for("crash") == url
        with psycopg.connect(url) as conn:
            assert conn.execute("SELECT count(*) FROM acked").fetchone()[0] == 500
        assert "database system was interrupted" in server.log_text()  # it did recover from a crash
    finally:
        directory = server.directory
        server.close()
    assert not directory.exists()
