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
        'cash_account: "1.1.1"\n'
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
        # CG, CD and AJ are invoices (the credit and the adjustment credit notes); the payment is a move.
        assert sorted(i["total_amount"] for i in invoices) == ["-25.00", "-40.00", "185.00"]
        assert {i["state"] for i in invoices} == {"posted"}
        assert {i["party_code"] for i in invoices} == {"A2026120877"}
        assert tryton_server.parties("A2026120877")[0]["name"] == "TESTPATIENT, JORDAN L"
        charge = next(i for i in invoices if i["total_amount"] == "185.00")
        assert charge["lines"][0]["description"].startswith("99214 ")
        assert "TX20261208-0001" in charge["lines"][0]["note"]
        [payment] = payment_moves(tryton_server)
        assert payment["state"] == "posted" and payment["journal.code"] == "CASH"
        assert payment["lines"] == [("1.1.1", None, "30.00", "0.00"), ("1.2.1", "A2026120877", "0.00", "30.00")]
        # Each posting was read back: the attempt names the documents by their Tryton numbers.
        response = attempts_text(engine.journal)
        assert f"invoice {charge['number']} posted" in response
        assert f"payment move {payment['number']} posted" in response

        # Sent again, replayed again: Tryton gets nothing twice (the event ID is the reference).
        result = run_cli("replay", "--journal", engine.journal, "--control-id", "EC000501", "--to", "erp-finance",
                         "--who", "test", "--why", "resend")
        assert result.returncode == 0, result.stderr
        assert wait_for(lambda: deliveries(engine.journal).get("delivered") == 1
                        and "already in Tryton" in attempts_text(engine.journal))
        assert len(tryton_server.invoices()) == 3 and len(payment_moves(tryton_server)) == 1
    finally:
        engine.stop()


def payment_moves(tryton):
    """The moves of the cash journal, with their lines as (account code, party code, debit, credit)."""
    moves = tryton.call("account.move", "search_read", [("journal.type", "=", "cash")], 0, None, [("id", "ASC")],
                        ["number", "state", "description", "journal.code", "lines"])
    for move in moves:
        lines = tryton.call("account.move.line", "read", move["lines"],
                            ["account.code", "party.code", "debit", "credit"])
        move["journal.code"] = move["journal."]["code"]
        move["lines"] = sorted((line["account."]["code"], (line.get("party.") or {}).get("code"),
                                f"{line['debit']:.2f}", f"{line['credit']:.2f}") for line in lines)
    return moves


def test_postings_the_erp_refuses_are_erp_not_posted(tmp_path, tryton_server):
    """The period is closed in Tryton: it refuses the invoice, the delivery is dead, and reconcile
    puts every line of the message in the erp_not_posted queue with Tryton's reason."""
    import datetime as dt
    import json

    today = dt.datetime.now(dt.timezone.utc).date()
    day = {"__class__": "date", "year": today.year, "month": today.month, "day": today.day}
    periods = tryton_server.call("account.period", "search", [("start_date", "<=", day), ("end_date", ">=", day),
                                                               ("type", "=", "standard")], 0, 1, None)
    tryton_server.call("account.period", "close", periods)
    config = configure(tmp_path, tryton_server)
    engine = EngineProcess(tmp_path, config=config)
    try:
        with MLLPClient("127.0.0.1", engine.port) as client:
            assert b"MSA|AA|EC000501" in client.send((EXAMPLES / "dft_p03.hl7").read_bytes())
        assert wait_for(lambda: deliveries(engine.journal).get("dead") == 1), deliveries(engine.journal)
    finally:
        engine.stop()
    # Tryton refused to post: the first invoice stays a draft, nothing else was made.
    assert [i["state"] for i in tryton_server.invoices()] == ["draft"] and payment_moves(tryton_server) == []
    result = run_cli("reconcile", "--journal", engine.journal, "--config", config, "--as-of", "2026-12-31", "--since", "60d",
                     "--kind", "erp_not_posted", "--json")
    assert result.returncode == 1, result.stderr
    found = json.loads(result.stdout)["exceptions"]
    assert sorted(e["transaction_id"] for e in found) == [f"TX20261208-000{n}" for n in (1, 2, 3, 4)]
    assert all(e["kind"] == "erp_not_posted" and e["facility"] == "EASTCLINIC" for e in found)
    assert all(e["reason"].startswith("the ERP delivery to erp-finance is dead: Tryton UserError") for e in found)


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
