"""The running engine as the web API and the dashboard see it: ``engine.ops.status.Status``.

Journal reads run in a small pool of reader threads, each with its own read-only journal, so a
dashboard search or a /metrics scrape never blocks the reactor and never takes the write lock;
replays go to the journal writer. The listeners (with their peers) and the configuration are read
from the engine's memory, on the reactor thread.
"""

from __future__ import annotations

import threading
from datetime import datetime, timezone

from twisted.internet import threads
from twisted.python.threadpool import ThreadPool

from ..ops.status import Status
from ..reconcile import queue as reconcile_queue
from ..reconcile.settings import ReconcileSettings
from ..stamps import iso
from ..store import open_journal
from ..transform.replay import replay_messages

READER_THREADS = 2


def _moment(seconds: float | None) -> str | None:
    return None if seconds is None else iso(datetime.fromtimestamp(seconds, timezone.utc))


def _connection(connection) -> dict:
    """An open or closed MLLP connection (engine.mllp.listener.Connection) as plain data."""
    found = {"peer": connection.peer, "since": _moment(connection.since), "messages": connection.messages,
             "last_message_at": _moment(connection.last_message_at)}
    if connection.closed_at is not None:
        found["closed_at"] = _moment(connection.closed_at)
    return found


class EngineStatus(Status):
    def __init__(self, engine):
        self._engine = engine
        self.counters = engine.counters
        self.frames_by_listener = engine.frames_by_listener
        self.ack_latency = engine.ack_latency
        self.dashboard = engine.settings.dashboard
        self._pool = ThreadPool(minthreads=0, maxthreads=READER_THREADS, name="hl7bridge-status-reader")
        self._local = threading.local()
        self._journals = []
        self._lock = threading.Lock()

    def start(self):
        self._pool.start()

    def stop(self):
        if self._pool.started:
            self._pool.stop()
        with self._lock:
            for journal in self._journals:
                journal.close()
            self._journals.clear()

    def _journal(self):
        journal = getattr(self._local, "journal", None)
        if journal is None:
            journal = open_journal(self._engine.writer.journal.location, create=False, readonly=True)
            self._local.journal = journal
            with self._lock:
                self._journals.append(journal)
        return journal

    def read(self, fn, *args):
        return threads.deferToThreadPool(self._engine.reactor, self._pool, lambda: fn(self._journal(), *args))

    def replay(self, message_ids, destinations, who, why, remap=False):
        engine = self._engine
        return engine.writer.write(replay_messages, engine.writer.bookkeeping, engine.project, message_ids,
                                   destinations, who, why, remap)

    def reconcile_settings(self) -> tuple:
        project = self._engine.project
        if project is None:
            return ReconcileSettings(), []
        return project.reconcile, project.erp_destinations()

    def acknowledge(self, exception_id, who, note):
        engine = self._engine
        return engine.writer.write(reconcile_queue.acknowledge, engine.writer.bookkeeping, exception_id, who, note,
                                   datetime.now(timezone.utc))

    def delivery_outcomes(self) -> dict:
        return self._engine.dispatcher.outcomes

    def sender_counters(self) -> dict:
        return self._engine.dispatcher.sender_counters()

    def listeners(self) -> list[dict]:
        engine = self._engine
        found = []
        for settings, factory in engine.factories:
            peers = factory.peers()
            tls = settings.tls is not None or settings.endpoint.startswith("ssl:")
            found.append({
                "name": settings.name, "endpoint": settings.endpoint,
                "address": engine.bound.get(settings.name),
                "transport": "mutual TLS" if settings.tls and settings.tls.client_ca else "TLS" if tls else "TCP",
                "max_connections": settings.max_connections,
                "frames": engine.frames_by_listener.get(settings.name, 0),
                "open": [_connection(c) for c in peers["open"]],
                "recently_closed": [_connection(c) for c in peers["recently_closed"]],
            })
        return found

    def configuration(self) -> dict:
        engine = self._engine
        project = engine.project
        return {
            "directory": str(project.directory) if project is not None else None,
            "routes": [route.name for route in project.routes] if project is not None else [],
            "destinations": sorted(project.destinations) if project is not None else [],
            "reloads": dict(engine.reloads), "last_reload": engine.last_reload,
        }

    def not_ready(self) -> list[str]:
        problems = []
        if not self._engine.ports:
            problems.append("no listener is bound")
        if self._engine.stopping:
            problems.append("shutting down")
        return problems
