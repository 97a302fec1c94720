"""Routes and mappings in the running engine: ACK after commit or after mapping, the converter,
unrouted messages, and reload without a restart."""

import json
import shutil
import sqlite3
import time
from datetime import datetime, timedelta, timezone

import pytest

from conftest import EXAMPLES, ROOT, EngineProcess, run_cli
from engine.mllp.client import MLLPClient
from engine.stamps import parse_iso
from engine.transform.project import Project

pytestmark = pytest.mark.slow
SIU = (EXAMPLES / "siu_s12.hl7").read_bytes()
DFT = (EXAMPLES / "dft_p03.hl7").read_bytes()
BAD_DFT = DFT.replace(b"|20261208093000-0600^20261208101500-0600|", b"|2026-12-08^|", 1)


def row(journal, control_id):
    conn = sqlite3.connect(journal)
    try:
        return conn.execute(
            "SELECT m.status, m.route, c.status, c.bundle, c.problems FROM messages m "
            "LEFT JOIN conversions c ON c.message_id = m.id WHERE m.control_id = ? ORDER BY m.id DESC",
            (control_id,),
        ).fetchone()
    finally:
        conn.close()


def wait_for(predicate, seconds=15):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    return predicate()


def send(port, raw):
    with MLLPClient("127.0.0.1", port) as client:
        return client.send(raw)


@pytest.fixture
def config(tmp_path):
    directory = tmp_path / "config"
    directory.mkdir()
    shutil.copytree(ROOT / "routes", directory / "routes")
    shutil.copytree(ROOT / "destinations", directory / "destinations")
    shutil.copytree(ROOT / "mappings", directory / "mappings")
    return directory


def test_ack_after_commit_then_the_converter_maps_it(tmp_path, config):
    engine = EngineProcess(tmp_path, config=config)
    try:
        assert b"MSA|AA|NC000123" in send(engine.port, SIU)
        status, route, _, _, _ = row(engine.journal, "NC000123")
        assert route == "clinic-scheduling" and status in ("accepted", "mapped")
        mapped = wait_for(lambda: (r := row(engine.journal, "NC000123")) and r[0] == "mapped" and r)
        bundle = json.loads(mapped[3])
        expected = json.loads((EXAMPLES / "siu_s12.fhir.json").read_text())
        # What hl7bridge test expects, but for the Provenance's conversion time and mapping version,
        # which the engine writes as they are (hl7bridge test pins them).
        assert bundle["entry"][:-1] == expected["entry"][:-1]
        provenance = bundle["entry"][-1]["resource"]
        version = Project.load(config).mappings.version
        assert provenance["policy"] == ["urn:hl7bridge:route:clinic-scheduling", f"urn:hl7bridge:mapping:{version}"]
        assert abs(parse_iso(provenance["recorded"]) - datetime.now(timezone.utc)) < timedelta(minutes=5)
    finally:
        engine.stop()


def test_ack_after_mapping_says_whether_it_worked(tmp_path, config):
    engine = EngineProcess(tmp_path, config=config)
    try:
        assert b"MSA|AA|EC000501" in send(engine.port, DFT)
        # Mapped before the ACK: the conversion is already in the journal.
        status, route, conversion, bundle, _ = row(engine.journal, "EC000501")
        assert (status, route, conversion) == ("mapped", "clinic-charges", "mapped")
        assert len([e for e in json.loads(bundle)["entry"] if e["resource"]["resourceType"] == "ChargeItem"]) == 4

        ack = send(engine.port, BAD_DFT.replace(b"EC000501", b"EC009999", 1))
        assert b"MSA|AE|EC009999|cannot be mapped: ChargeItem.occurrenceDateTime:" in ack
        assert b"207^Application internal error^HL70357" in ack
        assert b"mappings/" not in ack  # where our files live is not the sender's business
        status, _, conversion, bundle, problems = row(engine.journal, "EC009999")
        assert (status, conversion, bundle) == ("mapping_error", "mapping_error", None)
        assert "FT1-4" in problems or "$-4.1" in problems
        assert "mapping_error DFT^P03 control ID EC009999" in engine.log()
    finally:
        engine.stop()


def test_unrouted_messages_are_accepted_or_rejected_as_configured(tmp_path, config):
    adt = SIU.replace(b"SIU^S12^SIU_S12", b"ADT^A04^ADT_A01", 1)
    (tmp_path / "a").mkdir()
    engine = EngineProcess(tmp_path / "a", config=config)
    try:
        assert b"MSA|AA|NC000123" in send(engine.port, adt)
        assert row(engine.journal, "NC000123")[:2] == ("unrouted", None)
    finally:
        engine.stop()
    (config / "hl7bridge.yaml").write_text("routing:\n  unrouted: reject\n")
    (tmp_path / "b").mkdir()
    engine = EngineProcess(tmp_path / "b", config=config)
    try:
        ack = send(engine.port, adt)
        assert b"MSA|AR|NC000123|no route takes ADT\\S\\A04 from NORTHCLINIC" in ack  # ^ escaped
        assert b"200^Unsupported message type^HL70357" in ack
    finally:
        engine.stop()


def test_reload_takes_new_routes_and_refuses_broken_ones(tmp_path, config):
    engine = EngineProcess(tmp_path, config=config)
    try:
        assert b"MSA|AE|" in send(engine.port, BAD_DFT)
        route = config / "routes/20-finance.yaml"
        route.write_text(route.read_text().replace("mapping_error: AE", "mapping_error: AR"))
        result = run_cli("reload", "--journal", engine.journal)
        assert result.returncode == 0, result.stderr
        assert wait_for(lambda: "reloaded 4 routes" in engine.log())
        assert b"MSA|AR|" in send(engine.port, BAD_DFT.replace(b"EC000501", b"EC000502", 1))

        route.write_text(route.read_text().replace("mapping: DFT", "mapping: NOPE"))
        refused = run_cli("reload", "--journal", engine.journal)
        assert refused.returncode == 1 and f"{route}:8: route.mapping: no message mapping 'NOPE'" in refused.stderr.decode()
        assert wait_for(lambda: "reload refused" in engine.log())
        assert f"{route}:" in engine.log()
        assert b"MSA|AR|" in send(engine.port, BAD_DFT.replace(b"EC000501", b"EC000503", 1))  # still the last good one
    finally:
        engine.stop()
    assert run_cli("reload", "--journal", engine.journal).returncode == 3  # no engine any more
