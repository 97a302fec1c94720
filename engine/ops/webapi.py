"""The engine's HTTP side: /metrics (Prometheus), /healthz and /readyz. Twisted web, in serve.

Bound to 127.0.0.1 by default (``metrics.endpoint`` in hl7bridge.yaml). Nothing here shows
message content.
"""

from __future__ import annotations

import sqlite3
from datetime import datetime, timezone

from twisted.web.resource import Resource

from .metrics import render


class Text(Resource):
    isLeaf = True

    def __init__(self, produce, content_type=b"text/plain; charset=utf-8"):
        super().__init__()
        self.produce = produce
        self.content_type = content_type

    def render_GET(self, request):
        status, body = self.produce()
        request.setResponseCode(status)
        request.setHeader(b"Content-Type", self.content_type)
        request.setHeader(b"Cache-Control", b"no-store")
        return body.encode()


def open_outbox(conn: sqlite3.Connection) -> list:
    """(destination, state, count, oldest created_at) for deliveries not yet delivered."""
    return conn.execute(
        "SELECT destination, state, count(*), min(created_at) FROM deliveries WHERE state != 'delivered' "
        "GROUP BY destination, state ORDER BY destination, state"
    ).fetchall()


def site_root(engine) -> Resource:
    """The resource tree for a running ``serve.Engine``."""
    reader = sqlite3.connect(f"file:{engine.journal.path}?mode=ro", uri=True, check_same_thread=False)
    reader.execute("PRAGMA busy_timeout = 2000")

    def metrics():
        dispatcher = engine.dispatcher
        text = render(engine.counters, engine.frames_by_listener, engine.ack_latency,
                      dispatcher.outcomes, open_outbox(reader), datetime.now(timezone.utc),
                      dispatcher.sender_counters())
        return 200, text

    def healthz():
        return 200, "ok\n"

    def readyz():
        problems = []
        if not engine.ports:
            problems.append("no listener is bound")
        if engine.stopping:
            problems.append("shutting down")
        try:
            reader.execute("SELECT 1 FROM messages LIMIT 1").fetchall()
        except sqlite3.Error as exc:
            problems.append(f"journal unreadable: {exc}")
        return (503, "not ready: " + "; ".join(problems) + "\n") if problems else (200, "ready\n")

    root = Resource()
    root.putChild(b"metrics", Text(metrics, b"text/plain; version=0.0.4; charset=utf-8"))
    root.putChild(b"healthz", Text(healthz))
    root.putChild(b"readyz", Text(readyz))
    root.reader = reader
    if engine.settings.dashboard_token:
        from .dashboard import mount

        mount(root, engine, reader, engine.settings.dashboard_token)
    return root
