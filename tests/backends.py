"""Fixtures that run a test against both journal backends: ``journal`` is a fresh SQLite file,
then a fresh PostgreSQL database (tests/pgserver.py; skipped without PostgreSQL unless
HL7BRIDGE_REQUIRE_POSTGRES=1). A module imports them (``from backends import backend, journal,
journal_location  # noqa: F401``) and each of its tests that asks for ``journal`` runs twice."""

import pytest

from engine.store import open_journal

BACKENDS = ("sqlite", "postgresql")


@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.param


@pytest.fixture
def journal_location(backend, tmp_path, request):
    """Where a fresh journal of the test's backend goes: a file path, or a new database's URL
    (the connection pools this process opened to it are closed after the test)."""
    if backend == "sqlite":
        yield str(tmp_path / "journal.db")
        return
    from engine.store import postgres

    yield request.getfixturevalue("postgres_url")
    postgres.close_pools()


@pytest.fixture
def journal(journal_location):
    j = open_journal(journal_location)
    yield j
    j.close()


@pytest.fixture
def sqlite_journal(tmp_path):
    j = open_journal(tmp_path / "journal.db")
    yield j
    j.close()
