"""Delivery end to end: SIU and DFT over MLLP arrive in a real FHIR server (Medplum's router on
127.0.0.1); the server goes away and comes back; a poison message dead-letters without holding up
the others; a replay delivers it; a crash during delivery duplicates nothing."""

import json
import sqlite3
import time

import pytest

from conftest import EXAMPLES, EngineProcess, run_cli, shipped_config
from engine.mllp.client import MLLPClient


pytestmark = pytest.mark.slow

SIU_FILES = ["siu_s12.hl7", "siu_s13.hl7", "siu_s15.hl7", "siu_s26.hl7", "siu_s19.hl7"]
DFT_FILES = ["dft_p03.hl7", "dft_p11.hl7"]


@pytest.fixture
def server(fhir_server):
    return fhir_server


def configure(tmp_path, server, **retry):
    """The shipped routes and mappings, with fhir-main pointing at the test server."""
    config = shipped_config(tmp_path / "config")
    policy = {"max_attempts": 50, "initial_delay": "100ms", "max_delay": "500ms", **retry}
    (config / "destinations/fhir-main.yaml").write_text(
        "name: fhir-main\ntype: fhir\n"
        f"url: {server.base_url}\n"
        "mode: resources      # Medplum refuses conditional transactions of more than 8 entries\n"
        "timeout: 5s\nconcurrency: 4\n"
        f"retry: {json.dumps(policy)}\n"
    )
    return config


def send_all(port, names):
    with MLLPClient("127.0.0.1", port) as client:
        for name in names:
            assert b"MSA|AA|" in client.send((EXAMPLES / name).read_bytes()), name


def states(journal, destination="fhir-main"):
    conn = sqlite3.connect(journal)
    try:
        return dict(conn.execute(
            "SELECT state, count(*) FROM deliveries WHERE destination = ? GROUP BY state", (destination,)).fetchall())
    finally:
        conn.close()


def wait_until(predicate, seconds=30, interval=0.1):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def distinct_appointments(names):
    """Messages about the same appointment (same SCH-2) update one Appointment."""
    from engine.hl7.er7 import parse

    return len({parse((EXAMPLES / n).read_bytes().decode()).value("SCH-2.1") for n in names})


def identifiers(resources):
    return sorted(i["value"] for r in resources for i in r.get("identifier", []))


def test_siu_and_dft_arrive_in_the_fhir_server_once(tmp_path, server):
    engine = EngineProcess(tmp_path, config=configure(tmp_path, server))
    try:
        send_all(engine.port, SIU_FILES + DFT_FILES)
        assert wait_until(lambda: states(engine.journal).get("delivered") == len(SIU_FILES + DFT_FILES)), states(engine.journal)
        appointments = server.resources("Appointment")
        assert len(appointments) == distinct_appointments(SIU_FILES)
        # Several messages about one appointment (same SCH-2) update it in place.
        by_filler = {next(i["value"] for i in a["identifier"] if i["type"]["coding"][0]["code"] == "FILL"): a
                     for a in appointments}
        assert len(appointments) == len(by_filler)
        statuses = sorted(a["status"] for a in appointments)
        assert "cancelled" in statuses and "noshow" in statuses
        charges = server.resources("ChargeItem")
        assert len(charges) == 6  # four FT1 in dft_p03, two in dft_p11
        assert sorted(c["extension"][0]["valueCoding"]["code"] for c in charges) == ["AJ", "CD", "CG", "CG", "CG", "PY"]
        patient_refs = {c["subject"]["reference"] for c in charges}
        patients = server.resources("Patient")
        assert all(ref.split("/")[1] in {p["id"] for p in patients} for ref in patient_refs)
        # Sending a message again changes nothing: a duplicate is not delivered twice.
        send_all(engine.port, SIU_FILES[:1])
        assert len(server.resources("Appointment")) == len(appointments)
        assert identifiers(server.resources("Patient")) == identifiers(patients)
        # The erp-finance file destination got one finance event per FT1, as NDJSON.
        lines = [json.loads(line) for path in (engine.config / "var/outbox/erp-finance").glob("*.ndjson")
                 for line in path.read_text().splitlines()]
        assert sorted((e["source"]["control_id"], e["event"], e["transaction"]["amount"]) for e in lines) == [
            ("EC000501", "adjustment.posted", -40.0), ("EC000501", "charge.posted", 185.0),
            ("EC000501", "credit.posted", -25.0), ("EC000501", "payment.received", -30.0),
            ("NC000502", "charge.posted", 310.0), ("NC000502", "charge.posted", 1450.0),
        ]
        assert all(e["schema"] == "hl7bridge.finance/v1" and e["account"]["number"] for e in lines)
    finally:
        engine.stop()


def test_the_server_goes_away_and_comes_back(tmp_path, server):
    engine = EngineProcess(tmp_path, config=configure(tmp_path, server))
    try:
        server.stop()
        send_all(engine.port, SIU_FILES)  # ACKed: delivery does not hold up the sender
        assert wait_until(lambda: states(engine.journal).get("retrying", 0) >= 1)
        assert "will retry" in engine.log()
        server.start()  # same port, empty store
        assert wait_until(lambda: states(engine.journal).get("delivered") == len(SIU_FILES)), states(engine.journal)
        assert len(server.resources("Appointment")) == distinct_appointments(SIU_FILES)
        conn = sqlite3.connect(engine.journal)
        attempts = conn.execute("SELECT count(*) FROM attempts WHERE outcome = 'transient'").fetchone()[0]
        conn.close()
        assert attempts >= 1
    finally:
        engine.stop()


def test_a_poison_message_dead_letters_without_delaying_others_and_replay_delivers_it(tmp_path, server):
    engine = EngineProcess(tmp_path, config=configure(tmp_path, server))
    try:
        server.fail_next(status=422, count=1)  # the server refuses the next write, once
        send_all(engine.port, ["siu_s26.hl7"])
        assert wait_until(lambda: states(engine.journal).get("dead") == 1)
        send_all(engine.port, ["dft_p03.hl7", "siu_s19.hl7"])  # other patients: not held back
        assert wait_until(lambda: states(engine.journal).get("delivered") == 2)
        assert "is dead: HTTP 422" in engine.log()

        result = run_cli("outbox", "--journal", engine.journal, "--state", "dead", "--json")
        [dead] = json.loads(result.stdout)
        assert (dead["control_id"], dead["last_error"]) == ("EC000263", "HTTP 422 on PUT Patient")

        result = run_cli("replay", "--journal", engine.journal, "--dead", "fhir-main", "--who", "ops", "--why", "server fixed")
        assert result.returncode == 0, result.stderr
        assert result.stdout.decode().startswith("replayed 1 message(s): 1 deliveries queued again")
        assert wait_until(lambda: states(engine.journal).get("delivered") == 3)
        noshow = [a for a in server.resources("Appointment") if a["status"] == "noshow"]
        assert len(noshow) == 1
        conn = sqlite3.connect(engine.journal)
        assert conn.execute("SELECT who, why FROM replays").fetchall() == [("ops", "server fixed")]
        conn.close()
    finally:
        engine.stop()


def test_sigkill_during_delivery_loses_and_duplicates_nothing(tmp_path, server):
    config = configure(tmp_path, server)
    engine = EngineProcess(tmp_path, config=config)
    siu = (EXAMPLES / "siu_s12.hl7").read_bytes()
    sent = []
    with MLLPClient("127.0.0.1", engine.port) as client:
        for n in range(60):
            raw = (siu.replace(b"NC000123", f"K{n}".encode(), 1)
                      .replace(b"|80001^", f"|8{n:04d}^".encode(), 1).replace(b"|90001^", f"|9{n:04d}^".encode(), 1))
            assert b"MSA|AA|" in client.send(raw)
            sent.append(f"9{n:04d}")
    wait_until(lambda: states(engine.journal).get("delivered", 0) >= 5, seconds=10, interval=0.01)
    engine.kill()  # with deliveries in flight
    engine.start()
    try:
        assert wait_until(lambda: states(engine.journal).get("delivered") == 60, seconds=60), states(engine.journal)
        appointments = server.resources("Appointment", _count=1000)
        fillers = sorted(i["value"] for a in appointments for i in a["identifier"] if i["type"]["coding"][0]["code"] == "FILL")
        assert fillers == sorted(sent)  # every one there, none twice
    finally:
        engine.stop()


def test_oauth2_client_credentials_with_a_cached_token(tmp_path, fhir_server_factory):
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    from urllib.parse import parse_qs

    server = fhir_server_factory(token="issued-token")
    requests = []

    class TokenEndpoint(BaseHTTPRequestHandler):
        def do_POST(self):
            form = parse_qs(self.rfile.read(int(self.headers["Content-Length"])).decode())
            requests.append(form)
            ok = form.get("client_secret") == ["right"]
            body = json.dumps({"access_token": "issued-token", "expires_in": 3600} if ok else {"error": "invalid_client"})
            self.send_response(200 if ok else 401)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body.encode())

        def log_message(self, *args):
            pass

    endpoint = ThreadingHTTPServer(("127.0.0.1", 0), TokenEndpoint)
    threading.Thread(target=endpoint.serve_forever, daemon=True).start()
    try:
        config = configure(tmp_path, server)
        path = config / "destinations/fhir-main.yaml"
        path.write_text(path.read_text() + "auth:\n  oauth2:\n"
                        f"    token_url: http://127.0.0.1:{endpoint.server_address[1]}/token\n"
                        "    client_id: hl7bridge\n    client_secret: right\n    scope: system/*.write\n")
        engine = EngineProcess(tmp_path, config=config)
        try:
            send_all(engine.port, SIU_FILES)
            assert wait_until(lambda: states(engine.journal).get("delivered") == len(SIU_FILES)), states(engine.journal)
            assert len(requests) == 1  # one token for every delivery
            assert requests[0]["grant_type"] == ["client_credentials"] and requests[0]["scope"] == ["system/*.write"]
        finally:
            engine.stop()
    finally:
        endpoint.shutdown()


def test_transaction_mode_and_a_server_that_refuses_the_bundle(tmp_path, server):
    """A transaction of conditional updates is accepted when small; Medplum refuses one of more
    than 8 entries (its own limit): that is permanent, dead at once, the OperationOutcome kept."""
    config = configure(tmp_path, server)
    path = config / "destinations/fhir-main.yaml"
    path.write_text(path.read_text().replace("mode: resources", "mode: transaction"))
    engine = EngineProcess(tmp_path, config=config)
    try:
        send_all(engine.port, ["siu_s19.hl7"])  # 7 entries
        assert wait_until(lambda: states(engine.journal).get("delivered") == 1), states(engine.journal)
        assert len(server.resources("Appointment")) == 1
        send_all(engine.port, ["siu_s12.hl7"])  # 10 entries: more than Medplum takes in one transaction
        assert wait_until(lambda: states(engine.journal).get("dead") == 1)
        conn = sqlite3.connect(engine.journal)
        status, response = conn.execute("SELECT status, response FROM attempts ORDER BY id DESC LIMIT 1").fetchone()
        conn.close()
        assert status == 400 and json.loads(response)["resourceType"] == "OperationOutcome"
    finally:
        engine.stop()
