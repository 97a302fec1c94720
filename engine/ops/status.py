"""What the web API and the dashboard read of a running engine: the ``Status`` interface.

``serve`` implements it (``engine.serve.status``); ops code sees nothing else of the engine. Every
journal access goes through ``read`` (a thread pool with a read-only journal per thread: the
reactor never waits for SQLite) or ``replay`` (the journal writer's thread); the counters are
in-memory and read on the reactor thread.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from twisted.internet.defer import Deferred


class Status(ABC):
    """The running engine, as the operator's pages see it."""

    counters: object  # engine.mllp.listener.Counters: frames, accepted, rejected, ...
    frames_by_listener: dict  # listener name -> frames received
    ack_latency: object  # engine.ops.metrics.Histogram: frame received -> ACK written
    dashboard_token: str | None  # serves the dashboard and guards everything but /healthz

    @abstractmethod
    def read(self, fn, *args) -> Deferred:
        """Run ``fn(journal, *args)`` with a read-only ``engine.store.Journal`` in a reader
        thread; fires with its result."""

    @abstractmethod
    def replay(self, message_ids: list[int], destinations: list[str] | None, who: str, why: str) -> Deferred:
        """Queue messages again (``engine.transform.replay.replay_messages``) in the journal
        writer's thread; fires with its counts, or fails with a ``ReplayError``."""

    @abstractmethod
    def delivery_outcomes(self) -> dict:
        """(destination, state after an attempt) -> count, since the engine started."""

    @abstractmethod
    def sender_counters(self) -> dict:
        """(destination, counter) -> count, from senders that keep counters (file destinations)."""

    @abstractmethod
    def not_ready(self) -> list[str]:
        """Why the engine cannot take messages (no listener bound, shutting down); empty when it can."""
