"""The dashboard's sign-in and JSON API over a fake engine Status and a real journal: named users
and their roles, the shared token, the message list's filters and pages, the exception lists,
replays recorded under the signed-in name, and requests that are refused, with their reasons."""

import io
import itertools
import json
from datetime import datetime, timedelta, timezone

import pytest
from twisted.web.test.requesthelper import DummyRequest

from backends import backend, journal, journal_location  # noqa: F401 (these tests run on both backends)
from conftest import EXAMPLES, ROOT
from engine.config import DashboardSettings, DashboardUser
from engine.delivery.outbox import PERMANENT, Result, finish
from engine.mllp.ingest import Frame, Ingestor
from engine.ops.dashboard import COOKIE, SESSION_IDLE, Auth
from engine.ops.webapi import site_root
from engine.transform.project import Project
from test_webapi import FakeStatus

NOW = datetime(2026, 11, 24, 6, 0, tzinfo=timezone.utc)
USERS = DashboardSettings(users=(DashboardUser("alice", "alice-0123456789"),
                                 DashboardUser("victor", "victor-0123456789", "viewer")))
ADT = (b"MSH|^~\\&|ADT|NORTHCLINIC|HL7BRIDGE|FINANCE|20261201093000||ADT^A01^ADT_A01|NC000777|P|2.5.1\r"
       b"EVN|A01|20261201093000\rPID|1||100234^^^EASTCLINIC^MR||DOE^JOHN\r")
OUTCOME = json.dumps({"resourceType": "OperationOutcome", "issue": [
    {"severity": "error", "code": "required", "diagnostics": "Appointment.participant: minimum 1",
     "expression": ["Appointment.participant"]}]})


class Request(DummyRequest):
    """A DummyRequest with cookies in and out, form arguments, and a body."""

    def __init__(self, path, method=b"GET", body=b"", headers=None, cookies=None, args=None):
        super().__init__([part.encode() for part in path.strip("/").split("/")])
        self.method, self.path = method, path.encode()
        self.content = io.BytesIO(body)
        self.cookies_in = cookies or {}
        self.cookies_out = {}
        self.args = {k.encode(): [v.encode()] for k, v in (args or {}).items()}
        for name, value in (headers or {}).items():
            self.requestHeaders.setRawHeaders(name.encode(), [value.encode()])

    def getCookie(self, name):
        return self.cookies_in.get(name)

    def addCookie(self, name, value, **_):
        self.cookies_out[name] = value


def send(root, request):
    resource = root
    while request.postpath and not getattr(resource, "isLeaf", False):
        resource = resource.getChildWithDefault(request.postpath.pop(0), request)
    result = resource.render(request)
    if isinstance(result, bytes):
        request.write(result)
        request.finish()
    return request.responseCode or 200, b"".join(request.written).decode()


def call(root, name, body=None, token="alice-0123456789", cookie=None):
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    code, text = send(root, Request(f"/api/{name}", b"POST", json.dumps(body or {}).encode(), headers,
                                    {COOKIE: cookie} if cookie else None))
    return code, json.loads(text)


@pytest.fixture
def filled(journal):
    """A booking whose fhir-main delivery died with an OperationOutcome, a bad MSH, an unrouted ADT
    (the same patient ID from EASTCLINIC), a DFT, and a dozen ADTs from WESTCLINIC: 16 messages."""
    project = Project.load(ROOT)
    clock = iter(NOW + timedelta(seconds=s) for s in range(1000))
    counter = itertools.count(1)
    ingestor = Ingestor(journal, clock=lambda: next(clock), next_control_id=lambda: f"A{next(counter)}", project=project)
    frames = [(EXAMPLES / "siu_s12.hl7").read_bytes(), (EXAMPLES / "bad_msh.hl7").read_bytes(), ADT,
              (EXAMPLES / "dft_p03.hl7").read_bytes()]
    frames += [ADT.replace(b"NORTHCLINIC", b"WESTCLINIC").replace(b"NC000777", b"WC%06d" % n)
               .replace(b"100234^^^EASTCLINIC", b"5%05d^^^WESTCLINIC" % n) for n in range(1, 13)]
    for raw in frames:
        ingestor.ingest([Frame(raw, listener="mllp", peer="127.0.0.1:5000")])
    # The booking was routed ack-after-commit: convert it as the converter would.
    from engine.transform import pipeline

    for message_id, raw, charset, route in journal.waiting_for_conversion():
        converted = pipeline.convert(project, pipeline.read(raw, charset), route_name=route)
        with journal.transaction():
            pipeline.record(journal, message_id, converted, NOW.isoformat(), NOW, update_status=True)
    [delivery] = journal.due_deliveries("fhir-main", NOW + timedelta(hours=1), 1)
    finish(journal, delivery, project.destinations["fhir-main"], Result(PERMANENT, 422, OUTCOME, error="HTTP 422"),
           NOW, NOW)
    return journal


def test_users_sign_in_with_their_own_name_and_token(journal):
    auth = Auth(USERS)
    assert auth.login("alice", "alice-0123456789") is not None
    assert auth.login("alice", "victor-0123456789") is None  # another user's token
    assert auth.login("mallory", "alice-0123456789") is None
    assert auth.login("", "alice-0123456789") is None
    root = site_root(FakeStatus(journal, dashboard=USERS))
    request = Request("/login", b"POST", args={"name": "victor", "token": "victor-0123456789"})
    assert send(root, request)[0] == 302 and request.responseHeaders.getRawHeaders(b"location") == [b"/dashboard"]
    session = request.cookies_out[COOKIE]
    assert call(root, "options", token=None, cookie=session)[1]["user"] == "victor"
    code, page = send(root, Request("/login", b"POST", args={"name": "victor", "token": "alice-0123456789"}))
    assert code == 401 and "Wrong name or token." in page
    assert "Your user name" in send(root, Request("/login"))[1]


def test_the_shared_token_takes_the_name_given(journal):
    status = FakeStatus(journal, token="a-shared-token-123")
    root = site_root(status)
    request = Request("/login", b"POST", args={"name": "night-operator", "token": "a-shared-token-123"})
    send(root, request)
    session = request.cookies_out[COOKIE]
    assert call(root, "replay", {"items": [{"message_id": 1}], "why": "x"}, token=None, cookie=session)[0] == 200
    assert status.replays == [([1], None, "dashboard:night-operator", "x")]
    assert "Your name (replays are recorded under it)" in send(root, Request("/login"))[1]


def test_a_session_ends_after_a_day_of_no_use_and_at_sign_out(journal):
    now = [1000.0]
    auth = Auth(USERS, clock=lambda: now[0])
    session = auth.login("alice", "alice-0123456789")
    request = Request("/api/options", cookies={COOKIE: session.encode()})
    assert auth.user(request).name == "alice"
    now[0] += SESSION_IDLE + 1
    assert auth.user(request) is None
    session = auth.login("alice", "alice-0123456789")
    auth.logout(Request("/logout", cookies={COOKIE: session.encode()}))
    assert auth.user(Request("/api/options", cookies={COOKIE: session.encode()})) is None


def test_viewers_read_and_may_not_replay(filled):
    status = FakeStatus(filled, dashboard=USERS)
    root = site_root(status)
    assert call(root, "messages", token="victor-0123456789")[0] == 200
    assert call(root, "replay", {"items": [{"message_id": 1}]}, token="victor-0123456789") == (
        403, {"error": "victor is a viewer: this needs the operator role"})
    assert status.replays == []


def test_a_signed_in_browser_must_send_json(journal):
    auth_root = site_root(FakeStatus(journal, dashboard=USERS))
    request = Request("/login", b"POST", args={"name": "alice", "token": "alice-0123456789"})
    send(auth_root, request)
    form = Request("/api/replay", b"POST", b"items=1", {"Content-Type": "application/x-www-form-urlencoded"},
                   {COOKIE: request.cookies_out[COOKIE]})
    assert send(auth_root, form) == (415, '{"error": "send a JSON body (Content-Type: application/json)"}')


def test_message_list_filters_and_pages(filled):
    root = site_root(FakeStatus(filled, dashboard=USERS))
    ids = lambda answer: [row["id"] for row in answer["rows"]]  # noqa: E731
    code, page = call(root, "messages", {"facility": "WESTCLINIC", "limit": 5})
    assert code == 200 and ids(page) == [16, 15, 14, 13, 12] and page["next"] == [page["rows"][-1]["received_at"], 12]
    page = call(root, "messages", {"facility": "WESTCLINIC", "limit": 5, "after": page["next"]})[1]
    assert ids(page) == [11, 10, 9, 8, 7]
    page = call(root, "messages", {"facility": "WESTCLINIC", "limit": 5, "after": page["next"]})[1]
    assert ids(page) == [6, 5] and page["next"] is None
    assert ids(call(root, "messages", {"facility": "WESTCLINIC", "limit": 3, "oldest_first": True})[1]) == [5, 6, 7]
    assert ids(call(root, "messages", {"patient": "100234^^^NORTHCLINIC"})[1]) == [1]
    found = call(root, "messages", {"patient": "100234"})[1]
    assert [(r["id"], r["patient"]) for r in found["rows"]] == [(3, "100234^^^EASTCLINIC"), (1, "100234^^^NORTHCLINIC")]
    assert ids(call(root, "messages", {"type": "ADT^A01", "facility": "NORTHCLINIC"})[1]) == [3]
    assert ids(call(root, "messages", {"status": "rejected"})[1]) == [2]
    assert ids(call(root, "messages", {"route": "clinic-charges"})[1]) == [4]
    dead = call(root, "messages", {"destination": "fhir-main", "delivery_state": "dead"})[1]
    assert ids(dead) == [1] and dead["rows"][0]["deliveries"] == [{"destination": "fhir-main", "state": "dead"}]
    third, fifth = (filled.get(n)["received_at"] for n in (3, 5))
    assert ids(call(root, "messages", {"since": third, "until": fifth})[1]) == [4, 3]
    assert ids(call(root, "messages", {"text": "BADHEADER"})[1]) == [2]


@pytest.mark.parametrize("body, error", [
    ({"status": "lost"}, "status must be one of accepted, mapped, mapping_error, unrouted, rejected, duplicate, held, error"),
    ({"delivery_state": "gone"}, "delivery_state must be one of pending, in_flight, retrying, delivered, dead"),
    ({"destination": "fhir-main"}, "choose the delivery state to look for at that destination (e.g. dead)"),
    ({"since": "yesterday"}, "since: 'yesterday': use 30m, 2h, 7d or an ISO time like 2026-11-24T06:00"),
    ({"limit": 500}, "limit must be between 1 and 200"),
    ({"after": "page 2"}, "after must be [received_at, id] of the last row of the page before"),
])
def test_message_list_refuses_bad_filters_in_words(journal, body, error):
    assert call(site_root(FakeStatus(journal, dashboard=USERS)), "messages", body) == (400, {"error": error})


def test_one_message_with_its_tabs(filled):
    root = site_root(FakeStatus(filled, dashboard=USERS))
    detail = call(root, "message", {"id": 1})[1]
    assert detail["raw"].startswith("MSH|^~\\&|NORTHSCHED|NORTHCLINIC|") and "\rPID|1||100234^^^NORTHCLINIC^MR" in detail["raw"]
    pid = next(s for s in detail["segments"] if s["segment"] == "PID")
    assert {"path": "PID-3", "name": "Patient Identifier List", "datatype": "CX",
            "value": "100234^^^NORTHCLINIC^MR~E55501234^^^EPICADT^PI"} in pid["fields"]
    assert detail["summary"]["patient"] == "100234^^^NORTHCLINIC"
    assert detail["conversion"]["bundle"]["resourceType"] == "Bundle"
    [fhir] = [d for d in detail["deliveries"] if d["destination"] == "fhir-main"]
    assert fhir["reason"] == ("HTTP 422: error required: Appointment.participant: minimum 1 "
                              "[Appointment.participant]")
    assert fhir["events"][0]["response"] == OUTCOME
    [msa] = [s for s in detail["ack_segments"] if s["segment"] == "MSA"]
    assert msa["fields"][0] == {"path": "MSA-1", "name": "Acknowledgment Code", "value": "AA"}
    assert call(root, "message", {"id": 99}) == (404, {"error": "no message 99"})


def test_exceptions_list_dead_deliveries_with_the_servers_words_and_unrouted_messages(filled):
    root = site_root(FakeStatus(filled, dashboard=USERS))
    found = call(root, "exceptions")[1]
    [dead] = found["dead"]
    assert (dead["message_id"], dead["reason"], dead["attempts_total"]) == (
        1, "HTTP 422: error required: Appointment.participant: minimum 1 [Appointment.participant]", 1)
    assert [m["control_id"] for m in found["messages"]] == ["NC000999"]
    assert [m["control_id"] for m in found["unrouted"]][-1] == "NC000777" and len(found["unrouted"]) == 13


def test_listeners_and_options_come_from_the_status(journal):
    root = site_root(FakeStatus(journal, dashboard=USERS))
    [listener] = call(root, "listeners")[1]["listeners"]
    assert listener["open"][0]["peer"] == "127.0.0.1:5000"
    options = call(root, "options")[1]
    assert (options["destinations"], options["user"], options["role"]) == (["erp-finance", "fhir-main"], "alice", "operator")


def test_bulk_replay_groups_by_destination_and_records_the_user(journal):
    status = FakeStatus(journal, dashboard=USERS)
    root = site_root(status)
    code, answer = call(root, "replay", {"items": [{"message_id": 3, "destination": "fhir-main"},
                                                  {"message_id": 1, "destination": "fhir-main"},
                                                  {"message_id": 2}], "why": "server back"})
    assert code == 200 and answer == {"messages": 3, "deliveries": 2, "remapped": {}}
    assert status.replays == [([1, 3], ["fhir-main"], "dashboard:alice", "server back"),
                              ([2], None, "dashboard:alice", "server back")]
    assert call(root, "replay", {"items": []}) == (400, {"error": "choose at least one message to replay"})
    assert call(root, "nothing") == (404, {"error": "no call 'nothing'"})


def test_the_reconcile_calls(filled):
    """The queues as at New Year's Eve (the booking of 1 December has no charge; the DFT's charge and
    credit match no appointment, and none of its lines was posted), an exception's details with its messages and deliveries, acknowledging (operators
    only, with a note), and the charts."""
    status = FakeStatus(filled, dashboard=USERS)
    root = site_root(status)
    code, found = call(root, "reconcile", {"since": "2026-11-01T00:00", "as_of": "2026-12-31T00:00"})
    assert code == 200 and found["role"] == "operator"
    assert [(e["kind"], e["appointment_id"] or e["transaction_id"]) for e in found["exceptions"]] == [
        ("missed_charge", "90001"), ("charge_without_appointment", "TX20261208-0001"),
        ("charge_without_appointment", "TX20261208-0002")] + [
        ("erp_not_posted", f"TX20261208-000{n}") for n in (1, 2, 3, 4)]
    ident = found["exceptions"][1]["id"]
    assert call(root, "reconcile", {"kind": "nonsense"}) == (
        400, {"error": "kind must be one of missed_charge, late_charge, charge_without_appointment, erp_not_posted"})
    code, detail = call(root, "reconcile_detail", {"id": ident})
    assert code == 200 and detail["charge"]["message_ids"] == [4] and detail["appointment"] is None
    assert {(d["destination"], d["state"]) for d in detail["charge"]["deliveries"]} == {
        ("fhir-main", "pending"), ("erp-finance", "pending")}
    assert call(root, "reconcile_ack", {"id": ident, "note": "walk-in"}, token="victor-0123456789")[0] == 403
    assert call(root, "reconcile_ack", {"id": ident}) == (
        400, {"error": "acknowledging needs the exception and a note saying what was done"})
    assert call(root, "reconcile_ack", {"id": "x:y", "note": "n"}) == (
        200, {"error": "'x:y' is not an exception ID (KIND:FACILITY:ID, as reconcile lists them)"})
    assert call(root, "reconcile_ack", {"id": ident, "note": "walk-in"}) == (200, {"acknowledged": ident})
    after = call(root, "reconcile", {"since": "2026-11-01T00:00", "as_of": "2026-12-31T00:00",
                                     "kind": "charge_without_appointment"})[1]["exceptions"]
    assert [e["transaction_id"] for e in after] == ["TX20261208-0002"]
    shown = call(root, "reconcile", {"since": "2026-11-01T00:00", "as_of": "2026-12-31T00:00", "acknowledged": True,
                                     "kind": "charge_without_appointment"})[1]["exceptions"]
    assert shown[0]["acknowledged"]["who"] == "alice" and shown[0]["acknowledged"]["note"] == "walk-in"
    code, charts = call(root, "charts", {"hours": 3})
    assert code == 200 and len(charts["hours"]) == 3 and charts["destinations"] == ["erp-finance", "fhir-main"]
    assert set(charts) >= {"messages", "ack_mean_ms", "ack_max_ms", "delivered", "delivery_mean_s", "outbox_depth"}
    assert call(root, "charts", {"hours": 500})[0] == 400


def test_outbox_depth_is_worked_back_from_what_is_open_now():
    from engine.ops.dashapi import outbox_depth

    hours = ["2026-11-24T04", "2026-11-24T05", "2026-11-24T06"]
    queued = [{"hour": "2026-11-24T05", "destination": "erp", "queued": 5}, {"hour": "2026-11-24T06", "destination": "erp", "queued": 2}]
    delivered = [{"hour": "2026-11-24T06", "destination": "erp", "delivered": 4}]
    assert outbox_depth(hours, queued, delivered, [{"destination": "erp", "open": 3}]) == {"erp": [0, 5, 3]}
