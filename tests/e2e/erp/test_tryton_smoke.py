"""The test Tryton ERP (tests/tryton.py) takes a patient charge as a posted customer invoice.

Every Tryton call here is plain JSON-RPC, the calls tests/e2e/erp/README.md lists for the adapter.
The first run builds the cached template database (about 15-20 s); later runs start in about 1 s.
"""

from __future__ import annotations

import datetime as dt
from decimal import Decimal

import pytest
import tryton

tryton_template = tryton.tryton_template  # the fixtures (a conftest.py may import them instead)
tryton_server = tryton.tryton_server  # both skip when Tryton is not installed


def find_or_create_party(server: tryton.TrytonServer, code: str, name: str) -> int:
    """party.code is unique: search it first. The party needs an address for an invoice."""
    found = server.call("party.party", "search", [("code", "=", code)], 0, 1, None)
    if found:
        return found[0]
    party, = server.call("party.party", "create", [{
        "code": code, "name": name, "addresses": [["create", [{}]]]}])
    return party


def invoice_defaults(server: tryton.TrytonServer) -> dict:
    """What a plain ``create`` does not fill in: journal, receivable account, product and its
    revenue account (through the category, not the computed ``*_used`` fields), unit, currency."""
    config, = server.call("account.configuration", "read", [1],
                          ["default_account_receivable", "default_customer_payment_term"])
    journal, = server.call("account.journal", "search", [("type", "=", "revenue")], 0, 1, None)
    product, = server.call("product.product", "search_read",
                           [("code", "=", tryton.PRODUCT_CODE)], 0, 1, None,
                           ["default_uom", "account_category.account_revenue"])
    company = server.context["company"]
    currency, = server.call("company.company", "read", [company], ["currency"])
    return {
        "company": company,
        "currency": currency["currency"],
        "journal": journal,
        "account": config["default_account_receivable"],
        "payment_term": config["default_customer_payment_term"],
        "product": product["id"],
        "unit": product["default_uom"],
        "revenue": product["account_category."]["account_revenue"],
    }


def create_invoice(server, defaults: dict, party: int, reference: str,
                   lines: list[tuple[str, Decimal, float, str]]) -> int:
    address, = server.call("party.party", "read", [party], ["addresses"])
    invoice, = server.call("account.invoice", "create", [{
        "type": "out",
        "company": defaults["company"],
        "currency": defaults["currency"],
        "journal": defaults["journal"],
        "account": defaults["account"],
        "payment_term": defaults["payment_term"],
        "party": party,
        "invoice_address": address["addresses"][0],
        "reference": reference,
        "lines": [["create", [{
            "type": "line",
            "product": defaults["product"],
            "account": defaults["revenue"],
            "unit": defaults["unit"],
            "description": description,
            "unit_price": unit_price,
            "quantity": quantity,
            "note": note,
        } for description, unit_price, quantity, note in lines]]],
    }])
    return invoice


def test_patient_charge_becomes_a_posted_customer_invoice(tryton_server):
    server = tryton_server
    party = find_or_create_party(server, "MRN-100234", "DOE, JANE")
    assert find_or_create_party(server, "MRN-100234", "DOE, JANE") == party  # found, not created
    defaults = invoice_defaults(server)

    assert server.call("account.invoice", "search", [("reference", "=", "TX-1")], 0, 1, None) == []
    invoice = create_invoice(server, defaults, party, "TX-1",
                             [("99214 Office visit", Decimal("185.00"), 1.0, "FT1 charge 4711")])
    server.call("account.invoice", "post", [invoice])

    found, = server.invoices("TX-1")
    assert found["id"] == invoice
    assert found["state"] == "posted"
    assert found["number"] == f"INV/{dt.date.today().year}/00001"
    assert found["invoice_date"] == dt.date.today()
    assert (found["party_code"], found["party_name"]) == ("MRN-100234", "DOE, JANE")
    assert found["total_amount"] == found["untaxed_amount"] == "185.00"
    line, = found["lines"]
    assert line["description"] == "99214 Office visit"
    assert line["product"] == tryton.PRODUCT_NAME
    assert (line["quantity"], line["unit_price"], line["amount"]) == (1.0, "185.00", "185.00")
    assert line["note"] == "FT1 charge 4711"
    assert [p["code"] for p in server.parties("MRN-100234")] == ["MRN-100234"]

    # Sending TX-1 again: the reference is the idempotency key, found before any create.
    assert server.call("account.invoice", "search", [("reference", "=", "TX-1")], 0, 1, None) \
        == [invoice]
    assert len(server.invoices()) == 1


def test_tryton_errors_come_back_as_TrytonError(tryton_server):
    server = tryton_server
    find_or_create_party(server, "MRN-1", "ROE, RICHARD")
    with pytest.raises(tryton.TrytonError) as raised:  # party.code is unique
        server.call("party.party", "create", [{"code": "MRN-1", "name": "OTHER"}])
    assert raised.value.kind == "UserError"
    assert "unique" in raised.value.message.lower()


def test_each_server_starts_from_the_clean_template(tryton_server):
    assert tryton_server.invoices() == []
    assert tryton_server.parties("MRN-100234") == []
    assert tryton_server.url.startswith("http://127.0.0.1:")
    assert tryton_server.url.endswith(f"/{tryton_server.database}/rpc/")
