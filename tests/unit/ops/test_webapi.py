"""The web API and the dashboard's JSON calls over a fake engine Status: every journal read goes
through ``Status.read`` (the engine runs it in a reader thread), nothing reads on the reactor."""

import io
import json

from twisted.internet import defer
from twisted.web.test.requesthelper import DummyRequest

from backends import backend, journal, journal_location  # noqa: F401 (these tests run on both backends)
from conftest import EXAMPLES, ROOT
from engine.config import DashboardSettings
from engine.mllp.ingest import Frame, Ingestor
from engine.mllp.listener import Counters
from engine.ops.metrics import Histogram
from engine.ops.status import Status
from engine.ops.webapi import site_root
from engine.transform.project import Project


class FakeStatus(Status):
    def __init__(self, journal, token=None, ready=True, dashboard=None):
        self.journal = journal
        self.reads = 0
        self.replays = []
        self.counters = Counters(frames=1, accepted=1)
        self.frames_by_listener = {"mllp": 1}
        self.ack_latency = Histogram()
        self.dashboard = dashboard or (DashboardSettings(token=token) if token else None)
        self.ready = ready

    def read(self, fn, *args):
        self.reads += 1
        return defer.maybeDeferred(fn, self.journal, *args)

    def replay(self, message_ids, destinations, who, why, remap=False):
        self.replays.append((message_ids, destinations, who, why))
        return defer.succeed({"messages": len(message_ids), "deliveries": 1, "remapped": {}})

    def listeners(self):
        return [{"name": "mllp", "endpoint": "tcp:2575", "address": "127.0.0.1:2575", "transport": "TCP",
                 "max_connections": 64, "frames": 1,
                 "open": [{"peer": "127.0.0.1:5000", "since": "2026-11-24T06:00:00.000000Z", "messages": 1,
                           "last_message_at": "2026-11-24T06:00:01.000000Z"}], "recently_closed": []}]

    def configuration(self):
        return {"directory": str(ROOT), "routes": ["clinic-scheduling"], "destinations": ["erp-finance", "fhir-main"],
                "reloads": {"ok": 1, "refused": 1},
                "last_reload": {"pid": 1, "sequence": 2, "at": "2026-11-24T06:00:00Z", "ok": False, "message": "x"}}

    def delivery_outcomes(self):
        return {}

    def reconcile_settings(self):
        from engine.reconcile.settings import ReconcileSettings

        return getattr(self, "reconcile", ReconcileSettings()), getattr(self, "erp", ["erp-finance"])

    def acknowledge(self, exception_id, who, note):
        from datetime import datetime, timezone

        from engine.reconcile.queue import acknowledge

        return defer.maybeDeferred(acknowledge, self.journal, exception_id, who, note, datetime.now(timezone.utc))

    def sender_counters(self):
        return {}

    def not_ready(self):
        return [] if self.ready else ["shutting down"]


class Request(DummyRequest):
    def getCookie(self, name):
        return None


def get(root, path, method=b"GET", body=b"", token=None):
    request = Request([part.encode() for part in path.strip("/").split("/")])
    request.method = method
    request.path = path.encode()
    if token:
        request.requestHeaders.setRawHeaders(b"authorization", [b"Bearer " + token.encode()])
    request.content = io.BytesIO(body)
    resource = root
    while request.postpath and not getattr(resource, "isLeaf", False):
        resource = resource.getChildWithDefault(request.postpath.pop(0), request)
    result = resource.render(request)
    if isinstance(result, bytes):
        request.write(result)
        request.finish()
    return request.responseCode or 200, b"".join(request.written).decode()


def test_metrics_and_readiness_read_through_the_status(journal):
    Ingestor(journal, project=Project.load(ROOT)).ingest([Frame((EXAMPLES / "dft_p03.hl7").read_bytes())])
    status = FakeStatus(journal)
    root = site_root(status)
    code, text = get(root, "/metrics")
    assert code == 200 and status.reads == 1
    assert 'hl7bridge_outbox_depth{destination="erp-finance",state="pending"} 1' in text
    lines = text.splitlines()
    assert 'hl7bridge_open_connections{listener="mllp"} 1' in lines
    assert 'hl7bridge_config_reloads_total{outcome="refused"} 1' in lines
    assert "hl7bridge_config_last_reload_successful 0" in lines
    assert get(root, "/readyz") == (200, "ready\n") and status.reads == 2
    assert get(root, "/healthz") == (200, "ok\n")
    status.ready = False
    assert get(root, "/readyz") == (503, "not ready: shutting down\n")


def test_the_dashboard_api_reads_and_replays_through_the_status(journal):
    [outcome] = Ingestor(journal, project=Project.load(ROOT)).ingest([Frame((EXAMPLES / "dft_p03.hl7").read_bytes())])
    status = FakeStatus(journal, token="a-long-enough-token")
    root = site_root(status)
    assert get(root, "/api/summary", b"POST")[0] == 401
    code, text = get(root, "/api/summary", b"POST", token="a-long-enough-token")
    summary = json.loads(text)
    assert code == 200 and [o["destination"] for o in summary["outbox"]] == ["erp-finance", "fhir-main"]
    found = json.loads(get(root, "/api/messages", b"POST", b'{"control_id": "EC000501"}', "a-long-enough-token")[1])
    assert [r["id"] for r in found["rows"]] == [outcome.message_id]
    detail = json.loads(get(root, "/api/message", b"POST", json.dumps({"id": outcome.message_id}).encode(),
                            "a-long-enough-token")[1])
    assert detail["summary"]["control_id"] == "EC000501" and len(detail["deliveries"]) == 2
    replayed = json.loads(get(root, "/api/replay", b"POST", json.dumps({"items": [{"message_id": outcome.message_id,
                                                                                  "destination": "fhir-main"}]}).encode(),
                              "a-long-enough-token")[1])
    assert replayed["deliveries"] == 1
    assert status.replays == [([outcome.message_id], ["fhir-main"], "dashboard:api", "replayed from the dashboard")]
    assert status.reads == 3
