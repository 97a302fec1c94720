"""Helpers for the listener's protocol tests: a journal and an ingestor for a trial test case, and
connections over StringTransport (no sockets)."""

from __future__ import annotations

import itertools
import shutil
import tempfile
from datetime import datetime, timezone

from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport

from engine.mllp.ingest import Ingestor
from engine.store.sqlite import SqliteJournal

NOW = datetime(2026, 11, 24, 6, 0, tzinfo=timezone.utc)


def ingestor_for(case, project=None) -> Ingestor:
    """A fresh journal (removed after the test) and an ingestor on it: received at NOW, ACKs A1, A2..."""
    directory = tempfile.mkdtemp(prefix="hl7bridge-test-")
    case.addCleanup(shutil.rmtree, directory)
    journal = SqliteJournal(f"{directory}/journal.db")
    case.addCleanup(journal.close)
    counter = itertools.count(1)
    return Ingestor(journal, clock=lambda: NOW, next_control_id=lambda: f"A{next(counter)}", project=project)


def connect(factory, host="127.0.0.1", port=40000):
    """A connection from host:port to the factory's protocol, over a StringTransport."""
    proto = factory.buildProtocol(IPv4Address("TCP", host, port))
    transport = StringTransport(peerAddress=IPv4Address("TCP", host, port))
    proto.makeConnection(transport)
    return proto, transport


def acks(transport) -> list[bytes]:
    """The ACK payloads written so far."""
    data = transport.value()
    return [chunk.split(b"\x1c\r")[0] for chunk in data.split(b"\x0b")[1:]]
