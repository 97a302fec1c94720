"""What the web API and the dashboard read of a running engine: the ``Status`` interface.

``serve`` implements it (``engine.serve.status``); ops code sees nothing else of the engine. Every
journal access goes through ``read`` (a thread pool with a read-only journal per thread: the
reactor never waits for SQLite) or ``replay`` (the journal writer's thread); the counters, the
listeners and the configuration are in memory and read on the reactor thread. Nothing here
carries message content: listeners show peers' addresses and counts, never what they sent.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from twisted.internet.defer import Deferred


class Status(ABC):
    """The running engine, as the operator's pages see it."""

    counters: object  # engine.mllp.listener.Counters: frames, accepted, rejected, ...
    frames_by_listener: dict  # listener name -> frames received
    ack_latency: object  # engine.ops.metrics.Histogram: frame received -> ACK written
    dashboard: object  # engine.config.DashboardSettings, or None: no dashboard, nothing guarded

    @abstractmethod
    def read(self, fn, *args) -> Deferred:
        """Run ``fn(journal, *args)`` with a read-only ``engine.store.Journal`` in a reader
        thread; fires with its result."""

    @abstractmethod
    def replay(self, message_ids: list[int], destinations: list[str] | None, who: str, why: str,
               remap: bool = False) -> Deferred:
        """Queue messages again (``engine.transform.replay.replay_messages``; with ``remap``, mapped
        again with the running routes and mappings first) in the journal writer's thread; fires
        with its counts, or fails with a ``ReplayError``."""

    @abstractmethod
    def delivery_outcomes(self) -> dict:
        """(destination, state after an attempt) -> count, since the engine started."""

    @abstractmethod
    def sender_counters(self) -> dict:
        """(destination, counter) -> count, from senders that keep counters (file destinations)."""

    @abstractmethod
    def not_ready(self) -> list[str]:
        """Why the engine cannot take messages (no listener bound, shutting down); empty when it can."""

    @abstractmethod
    def listeners(self) -> list[dict]:
        """Each MLLP listener: ``name``, ``endpoint``, ``address`` (host:port bound), ``transport``
        (TCP, TLS, mutual TLS), ``max_connections``, ``frames`` (since start), ``open`` (open
        connections: ``peer``, ``since``, ``messages``, ``last_message_at``) and
        ``recently_closed`` (the same with ``closed_at``, newest first). Times are ISO text in UTC."""

    @abstractmethod
    def configuration(self) -> dict:
        """What the engine runs: ``routes`` (names, in the order they are tried), ``destinations``
        (names), ``directory`` (where they were read), ``reloads`` ({ok, refused} since start) and
        ``last_reload`` (pid, sequence, at, ok, message; None before the first)."""

    @abstractmethod
    def reconcile_settings(self) -> tuple:
        """(``engine.reconcile.settings.ReconcileSettings``, the ERP destination names) of the
        running configuration."""

    @abstractmethod
    def acknowledge(self, exception_id: str, who: str, note: str) -> Deferred:
        """Acknowledge a reconcile exception (``engine.reconcile.queue.acknowledge``) in the journal
        writer's thread; fails with ValueError for a bad ID or an empty note."""

