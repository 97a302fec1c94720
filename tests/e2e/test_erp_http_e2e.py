"""The generic HTTP ERP adapter: finance events POSTed as JSON, shaped by a template, with an
idempotency key, to a real HTTP server the test runs on 127.0.0.1."""

import json
import sqlite3
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from conftest import EXAMPLES, EngineProcess, shipped_config
from engine.mllp.client import MLLPClient

pytestmark = pytest.mark.slow


class Erp:
    """A REST 'ERP' that records what it receives; it can fail the first N requests with 503."""

    def __init__(self, fail_first=0):
        self.received = []
        self.fail_first = fail_first
        erp = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if erp.fail_first > 0:
                    erp.fail_first -= 1
                    self.send_response(503)
                    self.send_header("Retry-After", "0")
                    self.end_headers()
                    return
                erp.received.append((self.headers["Idempotency-Key"], self.headers["Authorization"], json.loads(body)))
                self.send_response(201)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(b'{"ok": true}')

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/api/postings"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()


@pytest.fixture
def erp():
    server = Erp(fail_first=1)
    yield server
    server.close()


def test_finance_events_reach_a_rest_erp_in_its_own_shape(tmp_path, erp, monkeypatch):
    config = shipped_config(tmp_path / "config")
    monkeypatch.setenv("ERP_TOKEN", "s3cret")
    (config / "destinations/erp-finance.yaml").write_text(
        "name: erp-finance\ntype: erp-http\n"
        f"url: {erp.url}\n"
        "auth: {bearer: '${ERP_TOKEN}'}\n"
        "order_by: account\n"
        "retry: {initial_delay: 100ms, max_delay: 200ms}\n"
        "body:\n"
        "  kind: =event\n"
        "  reference: =event_id\n"
        "  customer: =account.number\n"
        "  lines:\n"
        "    - item: =transaction.code\n"
        "      amount: =transaction.amount\n"
        "      currency: =transaction.currency\n"
        "  origin: hl7bridge\n"
    )
    engine = EngineProcess(tmp_path, config=config)
    try:
        with MLLPClient("127.0.0.1", engine.port) as client:
            assert b"MSA|AA|" in client.send((EXAMPLES / "dft_p03.hl7").read_bytes())
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and len(erp.received) < 4:
            time.sleep(0.1)
        assert [body["kind"] for _, _, body in erp.received] == [
            "charge.posted", "credit.posted", "payment.received", "adjustment.posted"]
        key, auth, first = erp.received[0]
        assert auth == "Bearer s3cret" and key == first["reference"]
        assert first == {"kind": "charge.posted", "reference": key, "customer": "A2026120877",
                         "lines": [{"item": "99214", "amount": 185.0, "currency": "USD"}], "origin": "hl7bridge"}
        def attempts():
            conn = sqlite3.connect(engine.journal)
            try:
                return conn.execute("SELECT outcome, status FROM attempts a JOIN deliveries d ON d.id = a.delivery_id "
                                    "WHERE d.destination = 'erp-finance' ORDER BY a.id").fetchall()
            finally:
                conn.close()

        # The ERP has everything a moment before the engine records the attempt: wait for the record.
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and len(attempts()) < 2:
            time.sleep(0.05)
        assert attempts() == [("transient", 503), ("ok", 201)]
    finally:
        engine.stop()
