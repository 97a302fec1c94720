"""The Tryton adapter: finance events become posted documents in Tryton, over its JSON-RPC API.

Charges, credits and adjustments become customer invoices (module ``account_invoice``), one line
each, on the patient's account: the party is found (or created) by the account number (PID-18,
else the patient ID) as its code; the invoice's ``reference`` is the event ID, so a retried
delivery finds the invoice it already made instead of making another (a draft left by an
interrupted attempt is posted). Credits and adjustments carry the negative amounts the sender
gave, which Tryton books as credit notes.

Payments and co-payments become account moves (module ``account``) in the cash journal: the
amount debited to the destination's ``cash_account`` and credited to the receivable account with
the patient's party, so it stands against what the patient owes. The move's ``description`` is
the event ID (the same idempotency key as the invoice reference).

Every document is read back after posting: the delivery is delivered only when Tryton says the
document is posted, and the attempt records its number. Appointment events are not financial
postings: they are recorded in the attempt as not posted.

Tryton wants one writer per database, so an erp-tryton destination runs one delivery at a time.
The JSON-RPC calls are listed in tests/e2e/erp/README.md, where they were measured.
"""

from __future__ import annotations

import base64
import json
from datetime import date, datetime, timezone
from decimal import Decimal

from twisted.internet import defer

from .destinations import Destination
from .finance import events
from .http import NETWORK_ERRORS, HttpClient, network_error, transient_status
from .outbox import OK, PERMANENT, TRANSIENT, Result

INVOICED_EVENTS = ("charge.posted", "credit.posted", "adjustment.posted")
PAYMENT_EVENTS = ("payment.received", "copay.posted")


class TrytonError(Exception):
    """An error answer from Tryton: ``kind`` is UserError, UserWarning or ServerError."""

    def __init__(self, kind: str, message: str, detail=None):
        super().__init__(f"{kind}: {message}")
        self.kind, self.message, self.detail = kind, message, detail


class SessionExpired(Exception):
    pass


def decimal(value) -> dict:
    return {"__class__": "Decimal", "decimal": str(Decimal(str(value)).quantize(Decimal("0.01")))}


def tryton_date(day: date) -> dict:
    return {"__class__": "date", "year": day.year, "month": day.month, "day": day.day}


def party_of(event: dict) -> tuple[str, str | None]:
    """The party's code (the account number, else the patient ID) and name."""
    account = event["account"]
    code = account.get("number") or account.get("patient_id")
    if not code:
        raise TrytonError("UserError", "the event has no account number or patient ID for the party")
    return code, account.get("patient_name")


class TrytonSender:
    """Posts finance events to Tryton as invoices, over its JSON-RPC API with a session of its own
    (the destination's basic credentials log in; they are not sent with every request)."""

    def __init__(self, destination: Destination, reactor, http: HttpClient | None = None):
        self.destination = destination
        self.http = http or HttpClient(destination, reactor)
        self.endpoint = f"{destination.url}/{destination.database}/rpc/"
        self.session = None  # (header value, context)
        self.lookups = None  # receivable account, journal, product, unit, revenue account, currency, company
        self.cash = None  # (cash journal, cash account), looked up at the first payment
        self.today = lambda: datetime.now(timezone.utc).date()  # the posting date of payments
        self.ids = 0

    def headers(self) -> dict:
        headers = {b"Content-Type": b"application/json", b"Accept": b"application/json"}
        if self.session:
            headers[b"Authorization"] = self.session[0]
        return headers

    def close(self):
        return self.http.close()

    @defer.inlineCallbacks
    def rpc(self, method: str, params: list):
        self.ids += 1
        status, body, _ = yield self.http.request(b"POST", self.endpoint, json.dumps(
            {"id": self.ids, "method": method, "params": params}).encode(), self.headers(), authorize=False)
        if status == 401:
            self.session = None
            raise SessionExpired()
        if transient_status(status):
            raise TrytonError("ServerError", f"Tryton answered HTTP {status}")
        answer = json.loads(body)
        if answer.get("error"):
            error = answer["error"]
            kind = error[0] if isinstance(error, list) and error and error[0] in ("UserError", "UserWarning") else "ServerError"
            detail = error[1] if isinstance(error, list) and len(error) > 1 else None
            message = detail[0] if kind != "ServerError" and isinstance(detail, list) and detail else str(error[0])[:300]
            raise TrytonError(kind, message, detail)
        return answer.get("result")

    @defer.inlineCallbacks
    def call(self, model: str, method: str, *args):
        """A model method with the session's context as the last parameter; logs in when needed."""
        for attempt in (1, 2):
            if self.session is None:
                yield self.login()
            try:
                result = yield self.rpc(f"model.{model}.{method}", [*args, self.session[1]])
                return result
            except SessionExpired:
                if attempt == 2:
                    raise
            except TrytonError as exc:
                if exc.kind == "UserWarning" and isinstance(exc.detail, list) and exc.detail:
                    # A warning (e.g. a date the user should confirm): acknowledged, then repeated.
                    yield self.rpc("model.res.user.warning.skip", [exc.detail[0], False, self.session[1]])
                    continue
                raise

    @defer.inlineCallbacks
    def login(self):
        user, password = self.destination.basic
        self.session = None
        uid, token = (yield self.rpc("common.db.login", [user, {"password": password}, "en"]))[:2]
        header = b"Session " + base64.b64encode(f"{user}:{uid}:{token}".encode())
        self.session = (header, {})
        preferences = yield self.rpc("model.res.user.get_preferences", [True, {}])
        self.session = (header, {"company": preferences.get("company"), "language": preferences.get("language", "en")})

    @defer.inlineCallbacks
    def setup(self):
        """What every invoice needs, looked up once: accounts, journal, product, currency."""
        if self.lookups is not None:
            return self.lookups
        config = (yield self.call("account.configuration", "read", [1], ["default_account_receivable"]))[0]
        journal = yield self.call("account.journal", "search", [["type", "=", "revenue"]], 0, 1, None)
        product_name = self.destination.product
        products = yield self.call("product.product", "search_read",
                                   ["OR", [["code", "=", product_name]], [["name", "=", product_name]]], 0, 1, None,
                                   ["default_uom", "account_category.account_revenue"])
        if not products or not journal:
            raise TrytonError("UserError", f"Tryton has no product {product_name!r} or no revenue journal")
        product = products[0]
        company = self.session[1]["company"]
        currency = (yield self.call("company.company", "read", [company], ["currency"]))[0]["currency"]
        self.lookups = {
            "receivable": config["default_account_receivable"], "journal": journal[0], "product": product["id"],
            "unit": product["default_uom"], "revenue": product["account_category."]["account_revenue"],
            "currency": currency, "company": company,
        }
        return self.lookups

    @defer.inlineCallbacks
    def party(self, code: str, name: str | None):
        found = yield self.call("party.party", "search", [["code", "=", code]], 0, 1, None)
        if found:
            party_id = found[0]
        else:
            party_id = (yield self.call("party.party", "create", [
                {"code": code, "name": name or code, "addresses": [["create", [{}]]]}]))[0]
        addresses = (yield self.call("party.party", "read", [party_id], ["addresses"]))[0]["addresses"]
        return party_id, addresses[0]

    @defer.inlineCallbacks
    def post_event(self, event: dict):
        """One money event as one posted invoice; returns what was done, for the attempt record."""
        lookups = yield self.setup()
        reference = event["event_id"]
        done = yield self.earlier("account.invoice", [["reference", "=", reference], ["type", "=", "out"]], reference)
        if done:
            return done
        party_id, address = yield self.party(*party_of(event))
        transaction = event["transaction"]
        quantity = transaction.get("quantity") or 1
        amount = transaction.get("amount")
        if amount is None:
            raise TrytonError("UserError", "the charge has no amount (FT1-11)")
        unit_price = Decimal(str(amount)) / Decimal(str(quantity))
        description = " ".join(str(p) for p in (transaction.get("code"), transaction.get("description")) if p)
        line = {
            "type": "line", "product": lookups["product"], "account": lookups["revenue"], "unit": lookups["unit"],
            "quantity": float(quantity), "unit_price": decimal(unit_price), "description": description or event["event"],
            "note": f"{event['event']} {transaction.get('id') or ''} service {event.get('occurred_at') or ''}".strip(),
        }
        invoice = (yield self.call("account.invoice", "create", [{
            "type": "out", "company": lookups["company"], "currency": lookups["currency"], "party": party_id,
            "invoice_address": address, "account": lookups["receivable"], "journal": lookups["journal"],
            "reference": reference, "lines": [["create", [line]]],
        }]))[0]
        yield self.call("account.invoice", "post", [invoice])
        number = yield self.read_back("account.invoice", invoice)
        return f"{reference}: invoice {number} posted"

    @defer.inlineCallbacks
    def earlier(self, model: str, domain: list, reference: str):
        """What an earlier attempt left of this event (its idempotency key in ``domain``): a draft
        is posted; either way the document is read back. None when there is nothing."""
        existing = yield self.call(model, "search_read", domain, 0, 1, None, ["state"])
        if not existing:
            return None
        drafted = existing[0]["state"] == "draft"
        if drafted:
            yield self.call(model, "post", [existing[0]["id"]])
        number = yield self.read_back(model, existing[0]["id"])
        kind = model.split(".")[-1]
        if drafted:
            return f"{reference}: posted the draft left by an earlier attempt as {kind} {number}"
        return f"{reference}: already in Tryton as {kind} {number}"

    @defer.inlineCallbacks
    def read_back(self, model: str, record: int):
        """The number of a posted invoice or move, read back from Tryton; a document Tryton does
        not show as posted is a failure to retry (ServerError), never a delivery."""
        found = yield self.call(model, "read", [record], ["state", "number"])
        if not found or found[0]["state"] != "posted":
            state = found[0]["state"] if found else "missing"
            raise TrytonError("ServerError", f"{model} {record} reads back as {state}, not posted")
        return found[0]["number"]

    @defer.inlineCallbacks
    def cash_lookups(self):
        """The cash journal and the cash account payments go to (looked up once)."""
        if self.cash is not None:
            return self.cash
        code = self.destination.cash_account
        if not code:
            raise TrytonError("UserError", f"destination {self.destination.name} has no cash_account: payments need "
                                           "the code of the account they are received into")
        journal = yield self.call("account.journal", "search", [["type", "=", "cash"]], 0, 1, None)
        company = self.session[1]["company"]
        account = yield self.call("account.account", "search", [["code", "=", code], ["company", "=", company]],
                                  0, 1, None)
        if not journal or not account:
            raise TrytonError("UserError", f"Tryton has no cash journal or no account with code {code!r}")
        self.cash = (journal[0], account[0])
        return self.cash

    @defer.inlineCallbacks
    def post_payment(self, event: dict):
        """A payment or co-payment as one posted move: cash debited, the patient's receivable
        credited (a positive amount from the sender, a refund, the other way round)."""
        lookups = yield self.setup()
        journal, cash_account = yield self.cash_lookups()
        reference = event["event_id"]
        done = yield self.earlier("account.move", [["description", "=", reference], ["journal", "=", journal]], reference)
        if done:
            return done
        amount = event["transaction"].get("amount")
        if amount is None:
            raise TrytonError("UserError", "the payment has no amount (FT1-11)")
        received = -Decimal(str(amount))  # payments come negative: what the patient's account is credited
        if received == 0:
            return f"{reference}: a payment of 0.00, nothing to post"
        party_id, _ = yield self.party(*party_of(event))
        today = self.today()
        periods = yield self.call("account.period", "search", [
            ["start_date", "<=", tryton_date(today)], ["end_date", ">=", tryton_date(today)],
            ["type", "=", "standard"], ["fiscalyear.company", "=", lookups["company"]]], 0, 1, None)
        if not periods:
            raise TrytonError("UserError", f"Tryton has no open accounting period for {today.isoformat()}")
        transaction = event["transaction"]
        text = f"{event['event']} {transaction.get('id') or ''} {transaction.get('description') or ''}".strip()
        size = decimal(abs(received))
        zero = decimal(0)
        cash_line = {"account": cash_account, "debit": size if received > 0 else zero,
                     "credit": zero if received > 0 else size, "description": text}
        receivable_line = {"account": lookups["receivable"], "party": party_id, "debit": zero if received > 0 else size,
                           "credit": size if received > 0 else zero, "description": text}
        move = (yield self.call("account.move", "create", [{
            "company": lookups["company"], "journal": journal, "period": periods[0], "date": tryton_date(today),
            "description": reference, "lines": [["create", [cash_line, receivable_line]]],
        }]))[0]
        yield self.call("account.move", "post", [move])
        number = yield self.read_back("account.move", move)
        return f"{reference}: payment move {number} posted"

    @defer.inlineCallbacks
    def send(self, delivery):
        done = []
        try:
            for event in events(json.loads(delivery.bundle), delivery.message_id, delivery.control_id,
                                delivery.discriminator):
                if event["event"] in INVOICED_EVENTS:
                    done.append((yield self.post_event(event)))
                elif event["event"] in PAYMENT_EVENTS:
                    done.append((yield self.post_payment(event)))
                else:
                    done.append(f"{event['event_id']}: {event['event']} is not a posting")
        except TrytonError as exc:
            outcome = TRANSIENT if exc.kind == "ServerError" else PERMANENT
            # Tryton's message can name the party (a patient): it goes to the journal, not the log.
            done.append(f"Tryton {exc.kind}: {exc.message}")
            return Result(outcome, None, "\n".join(done), error=f"Tryton {exc.kind} (details in the journal)")
        except SessionExpired:
            return Result(TRANSIENT, 401, "\n".join(done), error="Tryton session expired twice")
        except NETWORK_ERRORS as exc:
            return Result(TRANSIENT, None, "\n".join(done + [str(exc)[:300]]), error=network_error(exc, self.destination))
        return Result(OK, 200, "\n".join(done))
