"""DFT over MLLP to invoices in a real Tryton ERP (trytond on SQLite, started by the test)."""

import sqlite3
import time

import pytest

from conftest import EXAMPLES, EngineProcess, run_cli, shipped_config
from engine.mllp.client import MLLPClient

pytestmark = pytest.mark.slow


def configure(tmp_path, tryton):
    config = shipped_config(tmp_path / "config")
    (config / "destinations/erp-finance.yaml").write_text(
        "name: erp-finance\ntype: erp-tryton\n"
        f"url: {tryton.base_url}\n"
        f"database: {tryton.database}\n"
        f"auth: {{basic: {{username: {tryton.user}, password: {tryton.password}}}}}\n"
        "product: Patient charge\n"
        "timeout: 30s\n"
        "retry: {initial_delay: 200ms, max_delay: 1s}\n"
    )
    return config


def deliveries(journal):
    conn = sqlite3.connect(journal)
    try:
        return dict(conn.execute("SELECT state, count(*) FROM deliveries WHERE destination = 'erp-finance' GROUP BY state"))
    finally:
        conn.close()


def wait_for(predicate, seconds=60):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.2)
    return predicate()


def test_charges_credits_and_adjustments_become_posted_invoices_once(tmp_path, tryton_server):
    engine = EngineProcess(tmp_path, config=configure(tmp_path, tryton_server))
    try:
        with MLLPClient("127.0.0.1", engine.port) as client:
            assert b"MSA|AA|EC000501" in client.send((EXAMPLES / "dft_p03.hl7").read_bytes())
        assert wait_for(lambda: deliveries(engine.journal).get("delivered") == 1), deliveries(engine.journal)
        invoices = tryton_server.invoices()
        # CG, CD and AJ are posted; the payment (PY) is not a Tryton invoice (see engine/tryton.py).
        assert sorted(i["total_amount"] for i in invoices) == ["-25.00", "-40.00", "185.00"]
        assert {i["state"] for i in invoices} == {"posted"}
        assert {i["party_code"] for i in invoices} == {"A2026120877"}
        assert tryton_server.parties("A2026120877")[0]["name"] == "TESTPATIENT, JORDAN L"
        charge = next(i for i in invoices if i["total_amount"] == "185.00")
        assert charge["lines"][0]["description"].startswith("99214 ")
        assert "TX20261208-0001" in charge["lines"][0]["note"]

        # Sent again, replayed again: Tryton gets nothing twice (the event ID is the reference).
        result = run_cli("replay", "--journal", engine.journal, "--control-id", "EC000501", "--to", "erp-finance",
                         "--who", "test", "--why", "resend")
        assert result.returncode == 0, result.stderr
        assert wait_for(lambda: deliveries(engine.journal).get("delivered") == 1
                        and "already in Tryton" in attempts_text(engine.journal))
        assert len(tryton_server.invoices()) == 3
    finally:
        engine.stop()


def attempts_text(journal):
    conn = sqlite3.connect(journal)
    try:
        return "\n".join(r[0] or "" for r in conn.execute("SELECT response FROM attempts"))
    finally:
        conn.close()


def test_tryton_down_then_back(tmp_path, tryton_server):
    engine = EngineProcess(tmp_path, config=configure(tmp_path, tryton_server))
    try:
        tryton_server.stop(cleanup=False)
        with MLLPClient("127.0.0.1", engine.port) as client:
            assert b"MSA|AA|" in client.send((EXAMPLES / "dft_p11.hl7").read_bytes())
        assert wait_for(lambda: deliveries(engine.journal).get("retrying") == 1, seconds=20)
        tryton_server.start()
        assert wait_for(lambda: deliveries(engine.journal).get("delivered") == 1), deliveries(engine.journal)
        # FT1-11 is the extended amount: 2 x 155.00 = 310.00.
        assert sorted(i["total_amount"] for i in tryton_server.invoices()) == ["1450.00", "310.00"]
    finally:
        engine.stop()
