"""The HTTP senders (FHIR, ERP over REST, Tryton) over one HttpClient, against a fake IAgent that
returns canned answers: what is sent, with which headers, and what each answer comes to. No sockets."""

import base64
import json

import pytest
from twisted.internet import defer, task
from twisted.internet.error import ConnectionRefusedError, DNSLookupError
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent
from zope.interface import implementer

from engine.delivery.destinations import Destination
from engine.delivery.http import HttpClient, classify_status, retry_after
from engine.delivery.outbox import OK, PERMANENT, TRANSIENT
from engine.delivery.senders import ErpHttpSender, FhirSender, resources_in_order
from engine.delivery.tryton import TrytonSender
from engine.store.base import Delivery

PATIENT = "urn:uuid:1111"
BUNDLE = {
    "resourceType": "Bundle", "type": "transaction",
    "entry": [
        {"fullUrl": PATIENT, "resource": {"resourceType": "Patient", "identifier": [{"value": "100234"}]},
         "request": {"method": "PUT", "url": "Patient?identifier=100234"}},
        {"fullUrl": "urn:uuid:2222",
         "resource": {"resourceType": "ChargeItem", "status": "billable", "identifier": [{"value": "TX1"}],
                      "subject": {"reference": PATIENT},
                      "extension": [{"url": "https://hl7bridge.org/fhir/StructureDefinition/transaction-type",
                                     "valueCoding": {"code": "CG"}}],
                      "priceOverride": {"value": 120.5, "currency": "USD"}, "code": {"coding": [{"code": "99213"}]}},
         "request": {"method": "PUT", "url": "ChargeItem?identifier=TX1"}},
    ],
}


class Response:
    def __init__(self, code, body=b"", headers=None):
        self.code, self.phrase, self.body = code, b"", body
        self.headers = Headers({k: [v] for k, v in (headers or {}).items()})

    def deliverBody(self, protocol):
        protocol.dataReceived(self.body)
        protocol.connectionLost(Failure(ResponseDone()))


@implementer(IAgent)
class FakeAgent:
    """Records each request and answers with ``answer(method, url, headers, body)``: a Response or an exception."""

    def __init__(self, answer):
        self.answer = answer
        self.requests = []

    def request(self, method, uri, headers=None, bodyProducer=None):
        body = bodyProducer._inputFile.getvalue() if bodyProducer is not None else b""
        sent = {name.decode().lower(): values[0].decode() for name, values in headers.getAllRawHeaders()}
        self.requests.append((method.decode(), uri.decode(), sent, body))
        try:
            return defer.succeed(self.answer(method.decode(), uri.decode(), sent, body))
        except Exception as exc:
            return defer.fail(exc)


def fired(d):
    """The result of a Deferred that must have fired already (everything here is synchronous)."""
    results = []
    d.addBoth(results.append)
    assert results, "the Deferred has not fired"
    if isinstance(results[0], Failure):
        results[0].raiseException()
    return results[0]


def delivery(bundle=BUNDLE):
    return Delivery(7, 3, "x", "patient:100234", "pending", 0, "2026-11-24T06:00:00.000000Z", "EC000501",
                    json.dumps(bundle))


def destination(kind="fhir", **kw):
    return Destination("x", kind, "x.yaml", url="https://fhir.example.org/R4", **kw)


def sender_with(cls, answer, **kw):
    dest = destination(**kw)
    agent = FakeAgent(answer)
    clock = task.Clock()
    return cls(dest, clock, http=HttpClient(dest, clock, agent=agent)), agent, clock


def test_a_transaction_is_posted_with_fhir_headers_and_bearer_auth():
    sender, agent, _ = sender_with(FhirSender, lambda *a: Response(200, b'{"resourceType": "Bundle"}'), bearer="T0K")
    result = fired(sender.send(delivery()))
    assert (result.outcome, result.status) == (OK, 200)
    [(method, url, headers, body)] = agent.requests
    assert (method, url) == ("POST", "https://fhir.example.org/R4")
    assert headers["content-type"] == headers["accept"] == "application/fhir+json"
    assert headers["authorization"] == "Bearer T0K" and headers["user-agent"] == "hl7bridge"
    assert json.loads(body) == BUNDLE


@pytest.mark.parametrize("status, outcome", [(503, TRANSIENT), (429, TRANSIENT), (408, TRANSIENT), (500, TRANSIENT),
                                             (422, PERMANENT), (400, PERMANENT), (404, PERMANENT)])
def test_answers_are_classified(status, outcome):
    sender, _, _ = sender_with(FhirSender, lambda *a: Response(status, b"{}", {b"Retry-After": b"30"}))
    result = fired(sender.send(delivery()))
    assert (result.outcome, result.status, result.error) == (outcome, status, f"HTTP {status}")
    assert result.retry_after == 30.0 and classify_status(status) == outcome


def test_a_transaction_response_with_a_failed_entry_is_not_delivered():
    answer = {"resourceType": "Bundle", "entry": [{"response": {"status": "201 Created"}},
                                                 {"response": {"status": "422 Unprocessable"}}]}
    sender, _, _ = sender_with(FhirSender, lambda *a: Response(200, json.dumps(answer).encode()))
    result = fired(sender.send(delivery()))
    assert result.outcome == PERMANENT
    assert result.error == "transaction entries failed: entry 1: 422 Unprocessable"


def test_resources_mode_puts_each_resource_by_its_id_with_references_rewritten():
    sender, agent, _ = sender_with(FhirSender, lambda *a: Response(201), mode="resources", basic=("u", "p"))
    assert fired(sender.send(delivery())).outcome == OK
    urls = [(m, u) for m, u, _, _ in agent.requests]
    assert urls == [("PUT", "https://fhir.example.org/R4/Patient/1111"), ("PUT", "https://fhir.example.org/R4/ChargeItem/2222")]
    charge = json.loads(agent.requests[1][3])
    assert charge["subject"] == {"reference": "Patient/1111"} and charge["id"] == "2222"
    assert agent.requests[0][2]["authorization"] == "Basic " + base64.b64encode(b"u:p").decode()
    assert resources_in_order(BUNDLE)[0][0] == "Patient/1111"


def test_a_failed_put_names_the_resource_type():
    sender, _, _ = sender_with(FhirSender, lambda m, u, h, b: Response(409 if "ChargeItem" in u else 201),
                               mode="resources")
    result = fired(sender.send(delivery()))
    assert (result.outcome, result.error) == (PERMANENT, "HTTP 409 on PUT ChargeItem")


@pytest.mark.parametrize("error, words", [
    (ConnectionRefusedError(111), "cannot connect: connection refused"),
    (ConnectionRefusedError(), "cannot connect: connection was refused by other side"),
    (DNSLookupError(), "the server's host name could not be resolved"),
    (defer.TimeoutError(), "no answer within timeout (30s)"),
])
def test_network_errors_are_transient_and_told_in_words(error, words):
    def refuse(*a):
        raise error

    sender, _, _ = sender_with(FhirSender, refuse)
    result = fired(sender.send(delivery()))
    assert (result.outcome, result.error) == (TRANSIENT, words)


def oauth_server(tokens, fhir_status=200):
    def answer(method, url, headers, body):
        if url.endswith("/token"):
            tokens.append(body.decode())
            return Response(200, json.dumps({"access_token": f"tok{len(tokens)}", "expires_in": 60}).encode())
        revoked = fhir_status == 401 and headers.get("authorization") == "Bearer tok1"
        return Response(401 if revoked else 200)

    return answer


def test_oauth2_token_is_fetched_once_cached_and_refreshed_before_it_expires():
    tokens = []
    sender, agent, clock = sender_with(FhirSender, oauth_server(tokens),
                                       oauth2=("https://auth.example.org/token", "client", "secret", "fhir"))
    assert fired(sender.send(delivery())).outcome == OK
    assert fired(sender.send(delivery())).outcome == OK
    assert len(tokens) == 1 and "grant_type=client_credentials" in tokens[0] and "scope=fhir" in tokens[0]
    assert agent.requests[1][2]["authorization"] == "Bearer tok1"
    clock.advance(31)  # 60 s lifetime, fetched again 30 s early
    assert fired(sender.send(delivery())).outcome == OK
    assert len(tokens) == 2 and agent.requests[-1][2]["authorization"] == "Bearer tok2"


def test_oauth2_a_401_is_transient_and_drops_the_token():
    tokens = []
    sender, agent, _ = sender_with(FhirSender, oauth_server(tokens, fhir_status=401),
                                   oauth2=("https://auth.example.org/token", "client", "secret", ""))
    result = fired(sender.send(delivery()))
    assert (result.outcome, result.status) == (TRANSIENT, 401)
    assert fired(sender.send(delivery())).outcome == OK  # a new token, which the server takes
    assert len(tokens) == 2


@pytest.mark.parametrize("cls", [FhirSender, ErpHttpSender])
def test_a_token_endpoint_that_refuses_the_client_is_permanent_for_every_http_sender(cls):
    def answer(method, url, headers, body):
        return Response(401) if url.endswith("/token") else Response(200)

    sender, agent, _ = sender_with(cls, answer, oauth2=("https://auth.example.org/token", "c", "s", ""),
                                   payload="finance-events")
    result = fired(sender.send(delivery()))
    assert (result.outcome, result.status, result.error) == (PERMANENT, 401, "token endpoint answered HTTP 401")
    assert len(agent.requests) == 1  # nothing sent without a token


def test_erp_http_posts_each_finance_event_shaped_with_an_idempotency_key():
    sender, agent, _ = sender_with(ErpHttpSender, lambda *a: Response(201), kind="erp-http", payload="finance-events",
                                   body={"ref": "=event_id", "amount": "=transaction.amount", "kind": "charge"})
    assert fired(sender.send(delivery())).outcome == OK
    [(method, url, headers, body)] = agent.requests
    sent = json.loads(body)
    assert sent["amount"] == 120.5 and sent["kind"] == "charge"
    assert headers["idempotency-key"] == sent["ref"] and headers["content-type"] == "application/json"


def test_erp_http_a_refused_event_stops_the_delivery():
    sender, agent, _ = sender_with(ErpHttpSender, lambda *a: Response(429, b"slow down", {b"Retry-After": b"5"}),
                                   kind="erp-http", payload="finance-events")
    result = fired(sender.send(delivery()))
    assert (result.outcome, result.error, result.retry_after, result.response) == (
        TRANSIENT, "HTTP 429 on charge.posted", 5.0, "slow down")


def tryton_server(calls, existing=None, read_back="posted"):
    """Answers Tryton's JSON-RPC by method name, as tests/e2e/erp/README.md lists the calls."""
    answers = {
        "common.db.login": [1, "session"],
        "model.res.user.get_preferences": {"company": 1, "language": "en"},
        "model.account.configuration.read": [{"default_account_receivable": 10}],
        "model.account.journal.search": [2],
        "model.product.product.search_read": [{"id": 3, "default_uom": 1, "account_category.": {"account_revenue": 20}}],
        "model.company.company.read": [{"currency": 1}],
        "model.account.invoice.search_read": existing or [],
        "model.party.party.search": [4],
        "model.party.party.read": [{"addresses": [5]}],
        "model.account.invoice.create": [6],
        "model.account.invoice.post": None,
        "model.account.invoice.read": [{"id": 6, "state": read_back, "number": "INV/2026/00007"}],
    }

    def answer(method, url, headers, body):
        call = json.loads(body)
        calls.append((call["method"], headers.get("authorization")))
        return Response(200, json.dumps({"id": call["id"], "result": answers[call["method"]]}).encode())

    return answer


def test_tryton_logs_in_with_its_own_session_and_posts_an_invoice():
    calls = []
    sender, agent, _ = sender_with(TrytonSender, tryton_server(calls), kind="erp-tryton", payload="finance-events",
                                   basic=("hl7bridge", "secret"), database="clinic")
    result = fired(sender.send(delivery()))
    assert result.outcome == OK and "invoice INV/2026/00007 posted" in result.response
    assert agent.requests[0][1] == "https://fhir.example.org/R4/clinic/rpc/"
    assert calls[0] == ("common.db.login", None)  # the password goes in the login call, never a header
    session = "Session " + base64.b64encode(b"hl7bridge:1:session").decode()
    assert all(auth == session for _, auth in calls[1:])
    assert [m for m, _ in calls][-3:] == ["model.account.invoice.create", "model.account.invoice.post",
                                          "model.account.invoice.read"]


def test_tryton_a_posting_that_does_not_read_back_as_posted_is_retried():
    sender, _, _ = sender_with(TrytonSender, tryton_server([], read_back="draft"), kind="erp-tryton",
                               payload="finance-events", basic=("u", "p"), database="clinic")
    result = fired(sender.send(delivery()))
    assert result.outcome == TRANSIENT and "reads back as draft, not posted" in result.response


def test_tryton_finds_the_invoice_of_an_earlier_attempt():
    calls = []
    sender, _, _ = sender_with(TrytonSender, tryton_server(calls, existing=[{"id": 6, "state": "posted"}]),
                               kind="erp-tryton", payload="finance-events", basic=("u", "p"), database="clinic")
    result = fired(sender.send(delivery()))
    assert result.outcome == OK and result.response.endswith(": already in Tryton as invoice INV/2026/00007")
    assert "model.account.invoice.create" not in [m for m, _ in calls]


def test_tryton_server_errors_are_transient():
    sender, _, _ = sender_with(TrytonSender, lambda *a: Response(503), kind="erp-tryton", payload="finance-events",
                               basic=("u", "p"), database="clinic")
    result = fired(sender.send(delivery()))
    assert (result.outcome, result.error) == (TRANSIENT, "Tryton ServerError (details in the journal)")


def test_retry_after_reads_only_seconds():
    assert (retry_after(b"12"), retry_after(b"Wed, 21 Oct 2026 07:28:00 GMT"), retry_after(None)) == (12.0, None, None)
