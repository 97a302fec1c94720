"""The running engine applies the retention policy of hl7bridge.yaml on its own schedule."""

import itertools
import time
from datetime import datetime, timedelta, timezone

from conftest import EXAMPLES, EngineProcess, shipped_config
from engine.mllp.ingest import Frame, Ingestor
from engine.store.sqlite import SqliteJournal as Journal

OLD = datetime(2026, 1, 1, tzinfo=timezone.utc)
SIU = (EXAMPLES / "siu_s12.hl7").read_bytes()


def fill(journal, count, start):
    clock = itertools.count()
    ingestor = Ingestor(journal, clock=lambda: start + timedelta(seconds=next(clock)))
    for n in range(count):
        ingestor.ingest([Frame(SIU.replace(b"NC000123", f"P{start:%m}{n}".encode(), 1)
                               .replace(b"|100234^", f"|{start:%m}{n:05d}^".encode(), 1))])


def test_the_engine_applies_the_retention_policy(tmp_path):
    journal = Journal(tmp_path / "journal.db")
    fill(journal, 10, OLD)  # unrouted: no project, nothing owed
    journal.close()
    config = shipped_config(tmp_path / "config")
    (config / "hl7bridge.yaml").write_text("journal:\n  retention: {older_than: 30d, every: 1s}\n")
    engine = EngineProcess(tmp_path, config=config)
    try:
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and "retention: pruned 10 messages" not in engine.log():
            time.sleep(0.1)
        assert "retention: pruned 10 messages" in engine.log()
    finally:
        engine.stop()
    reopened = Journal(tmp_path / "journal.db", create=False)
    assert reopened.count() == 0
    reopened.close()
