"""The engine's HTTP side: /metrics (Prometheus), /healthz and /readyz. Twisted web, in serve.

Bound to 127.0.0.1 by default (``metrics.endpoint`` in hl7bridge.yaml). Nothing here shows
message content. Journal reads run in the engine's reader threads (``Status.read``), never on
the reactor.
"""

from __future__ import annotations

from datetime import datetime, timezone

from twisted.internet import defer
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from ..reconcile.queue import gauges
from .metrics import render

RECONCILE_EVERY = 60.0  # seconds the reconcile gauges of /metrics are reused (each read scans 30 days)
from .status import Status


class Text(Resource):
    """A text page whose ``produce()`` gives (status, body), or a Deferred of it."""

    isLeaf = True

    def __init__(self, produce, content_type=b"text/plain; charset=utf-8"):
        super().__init__()
        self.produce = produce
        self.content_type = content_type

    def render_GET(self, request):
        def write(result):
            status, body = result
            request.setResponseCode(status)
            request.setHeader(b"Content-Type", self.content_type)
            request.setHeader(b"Cache-Control", b"no-store")
            request.write(body.encode())
            request.finish()

        def failed(failure: Failure):
            request.setResponseCode(500)
            request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
            request.write(f"error: {failure.getErrorMessage()}\n".encode())
            request.finish()

        defer.maybeDeferred(self.produce).addCallbacks(write, failed)
        return NOT_DONE_YET


def site_root(status: Status) -> Resource:
    """The resource tree for a running engine's ``Status``."""

    reconciled = {"at": None, "gauges": None}  # the reconcile gauges, read at most once a minute

    def metrics():
        now = datetime.now(timezone.utc)
        settings, erp = status.reconcile_settings()

        def read(journal):
            if reconciled["at"] is None or (now - reconciled["at"]).total_seconds() >= RECONCILE_EVERY:
                reconciled["gauges"], reconciled["at"] = gauges(journal, settings, erp, now), now
            return journal.outbox_counts(open_only=True), reconciled["gauges"], journal.outbox_holds()

        def page(found):
            open_outbox, reconcile, holds = found
            text = render(status.counters, status.frames_by_listener, status.ack_latency,
                          status.delivery_outcomes(), open_outbox, now,
                          status.sender_counters(), status.listeners(), status.configuration(), reconcile, holds)
            return 200, text

        return status.read(read).addCallback(page)

    def healthz():
        return 200, "ok\n"

    def readyz():
        problems = status.not_ready()

        def answer(unreadable):
            found = problems + ([f"journal unreadable: {unreadable}"] if unreadable else [])
            return (503, "not ready: " + "; ".join(found) + "\n") if found else (200, "ready\n")

        d = status.read(lambda journal: journal.check_readable())
        d.addCallbacks(lambda _: None, lambda failure: failure.getErrorMessage())
        return d.addCallback(answer)

    root = Resource()
    root.putChild(b"metrics", Text(metrics, b"text/plain; version=0.0.4; charset=utf-8"))
    root.putChild(b"healthz", Text(healthz))
    root.putChild(b"readyz", Text(readyz))
    if status.dashboard is not None:
        from .dashboard import mount

        mount(root, status, status.dashboard)
    return root
