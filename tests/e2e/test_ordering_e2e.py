"""Per-key order in the running engine, whichever way messages are mapped: the shipped routes map
SIU in the converters (``ack.after: commit``) and DFT before their ACK (``ack.after: mapping``). With
the converters stopped (SIGSTOP: a converter that hangs), a patient's DFT waits at fhir-main for the
earlier SIU of that patient, and the operator sees why; another patient's DFT, and the DFT's
erp-finance delivery (no SIU goes there), are not held. Once the converters go on, the SIU is
written first; an SIU that cannot be mapped releases the DFT."""

import json
import os
import signal
import sqlite3
import subprocess

import pytest

from conftest import EXAMPLES, EngineProcess, run_cli, shipped_config, wait_for
from engine.mllp.client import MLLPClient

pytestmark = pytest.mark.slow
SIU = (EXAMPLES / "siu_s12.hl7").read_bytes()
DFT = (EXAMPLES / "dft_p03.hl7").read_bytes()
DFT_PATIENT = b"300612^^^EASTCLINIC^MR~E77703090^^^EPICADT^PI"  # PID-3 of the example DFT


def siu(control_id: str) -> bytes:
    """The example SIU, for the example DFT's patient."""
    return SIU.replace(b"NC000123", control_id.encode(), 1).replace(
        b"100234^^^NORTHCLINIC^MR~E55501234^^^EPICADT^PI", DFT_PATIENT, 1)


def dft(control_id: str, patient: bytes = DFT_PATIENT, account: bytes = b"A2026120877") -> bytes:
    return DFT.replace(b"EC000501", control_id.encode(), 1).replace(DFT_PATIENT, patient, 1).replace(
        b"A2026120877", account, 1)


def send(port: int, raw: bytes):
    with MLLPClient("127.0.0.1", port) as client:
        assert b"MSA|AA|" in client.send(raw)


def converters(engine) -> list[int]:
    found = subprocess.run(["pgrep", "-P", str(engine.process.pid), "-f", "engine.transform.converter"],
                           capture_output=True, text=True).stdout.split()
    return [int(pid) for pid in found]


def signal_all(pids, number):
    for pid in pids:
        os.kill(pid, number)


def states(engine, destination) -> dict[str, str]:
    """control ID -> state of its delivery to ``destination``."""
    conn = sqlite3.connect(engine.journal)
    try:
        return dict(conn.execute("SELECT m.control_id, d.state FROM deliveries d JOIN messages m ON m.id = d.message_id "
                                 "WHERE d.destination = ?", (destination,)).fetchall())
    finally:
        conn.close()


def written(config, destination) -> list[str]:
    """The control IDs of the records written to a file destination, in the order written."""
    lines = [line for path in sorted((config / "var/outbox" / destination).glob("*.ndjson"))
             for line in path.read_text().splitlines() if line]
    return [json.loads(line)["control_id"] for line in lines]


@pytest.fixture
def stopped_engine(tmp_path):
    """The engine with the shipped routes, its two converters stopped."""
    config = shipped_config(tmp_path / "config")
    (config / "hl7bridge.yaml").write_text("conversion:\n  workers: 2\n")
    engine = EngineProcess(tmp_path, config=config)
    pids = wait_for(lambda: (found := converters(engine)) and len(found) == 2 and found)
    signal_all(pids, signal.SIGSTOP)
    yield engine, config, pids
    signal_all(pids, signal.SIGCONT)
    engine.stop()


def test_a_charge_mapped_before_its_ack_waits_for_the_patients_earlier_appointment(stopped_engine):
    engine, config, pids = stopped_engine
    send(engine.port, siu("S1"))  # waits for a converter
    send(engine.port, dft("D1"))  # the same patient: mapped before its ACK, queued at once
    send(engine.port, dft("D2", patient=b"555^^^EASTCLINIC^MR", account=b"ACC2"))  # another patient
    wait_for(lambda: "D2" in written(config, "fhir-main"))
    wait_for(lambda: states(engine, "erp-finance") == {"D1": "delivered", "D2": "delivered"})
    assert states(engine, "fhir-main") == {"D1": "pending", "D2": "delivered"}
    assert written(config, "fhir-main") == ["D2"]

    summary = json.loads(run_cli("outbox", "--journal", engine.journal, "--json").stdout)
    fhir = next(row for row in summary if row["destination"] == "fhir-main")
    assert (fhir["pending"], fhir["unconverted"], fhir["held"]) == (1, 1, 1)
    listed = json.loads(run_cli("outbox", "--journal", engine.journal, "--destination", "fhir-main", "--state",
                                "pending", "--json").stdout)
    assert [row["control_id"] for row in listed] == ["D1"]
    assert listed[0]["waits_for"] == "message 1 (same key, not converted yet)"
    table = run_cli("outbox", "--journal", engine.journal).stdout.decode()
    assert "unconverted  held" in table.splitlines()[0]
    shown = run_cli("journal", "show", "--journal", engine.journal, str(listed[0]["message_id"])).stdout.decode()
    assert ("delivery to fhir-main: pending after 0 attempt(s)\n"
            "  waits for message 1 (same key, not converted yet)\n") in shown

    signal_all(pids, signal.SIGCONT)
    wait_for(lambda: states(engine, "fhir-main") == {"S1": "delivered", "D1": "delivered", "D2": "delivered"},
             seconds=30)
    assert written(config, "fhir-main") == ["D2", "S1", "D1"]  # the patient's two in arrival order


def test_an_appointment_that_cannot_be_mapped_releases_the_charge(stopped_engine):
    engine, config, pids = stopped_engine
    send(engine.port, siu("S1").replace(b"|19840312|", b"|1984-03-12|", 1))  # PID-7 is no HL7 date
    send(engine.port, dft("D1"))
    wait_for(lambda: states(engine, "erp-finance") == {"D1": "delivered"})
    assert states(engine, "fhir-main") == {"D1": "pending"}
    signal_all(pids, signal.SIGCONT)
    wait_for(lambda: states(engine, "fhir-main") == {"D1": "delivered"}, seconds=30)
    conn = sqlite3.connect(engine.journal)
    try:
        assert conn.execute("SELECT status FROM messages WHERE control_id = 'S1'").fetchone() == ("mapping_error",)
    finally:
        conn.close()
    assert written(config, "fhir-main") == ["D1"]
