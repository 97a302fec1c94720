"""Fuzzing with hypothesis: random bytes and mutated messages through framing, reader and journal.

Properties: nothing raises; every complete frame gets exactly one journal row holding its exact
bytes; an ACK goes back for every row that asks for one, in order; connections are released.
"""

import itertools
import tempfile
from datetime import datetime, timezone
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from conftest import CORPUS, EXAMPLES
from engine.config import ListenerSettings, Settings
from engine.hl7.er7 import parse
from engine.errors import ParseError
from engine.mllp.framing import frame
from engine.hl7.assess import assess
from engine.mllp.ingest import Ingestor
from engine.store.sqlite import SqliteJournal as Journal
from engine.mllp.listener import GroupCommit, MLLPServerFactory

SEEDS = [p.read_bytes() for p in sorted(EXAMPLES.glob("*.hl7"))]
if CORPUS.is_dir():
    SEEDS += [p.read_bytes() for p in sorted(CORPUS.rglob("*.hl7"))]
SPECIALS = [b"|", b"^", b"~", b"\\", b"&", b"\r", b"\n", b"MSH", b"\\X", b"\xff", b"\x00", b"\xc3"]


@st.composite
def mutated(draw):
    """A real message with a few random edits: cuts, inserted separators and bytes, flipped bytes."""
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(0, 6))):
        if not data:
            break
        pos = draw(st.integers(0, len(data) - 1))
        action = draw(st.sampled_from(["cut", "insert", "flip", "delete"]))
        if action == "cut":
            del data[pos:]
        elif action == "insert":
            data[pos:pos] = draw(st.sampled_from(SPECIALS))
        elif action == "flip":
            data[pos] = draw(st.integers(0, 255))
        else:
            del data[pos : pos + draw(st.integers(1, 20))]
    return bytes(data)


def clean(payload: bytes) -> bytes:
    """Payloads cannot hold the MLLP markers; the framing tests cover those separately."""
    return payload.replace(b"\x0b", b"?").replace(b"\x1c", b"?")


payloads = st.one_of(st.binary(max_size=400), mutated())


@settings(max_examples=300, deadline=None)
@given(payloads)
def test_reader_never_fails_unexpectedly(raw):
    assessment = assess(raw)
    assert assessment.outcome in ("accept", "reject")
    try:
        message = parse(raw.decode("latin-1"))
    except ParseError:
        return
    for segment in message.segments:
        segment.fields  # splitting any segment must work


class Harness:
    def __init__(self, path: Path):
        self.clock = Clock()
        self.journal = Journal(path)
        counter = itertools.count(1)
        ingestor = Ingestor(self.journal, clock=lambda: datetime(2026, 1, 1, tzinfo=timezone.utc),
                            next_control_id=lambda: f"F{next(counter)}")
        listener = ListenerSettings(name="fuzz", max_frame_bytes=8192)
        self.factory = MLLPServerFactory(listener, GroupCommit(ingestor, self.clock), Settings().policy(listener))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    frames=st.lists(payloads.map(clean), min_size=1, max_size=6),
    noise=st.lists(st.binary(max_size=8).map(clean), min_size=7, max_size=7),
    chunk=st.integers(1, 700),
)
def test_every_frame_gets_a_row_and_its_ack_in_order(frames, noise, chunk):
    with tempfile.TemporaryDirectory() as directory:
        harness = Harness(Path(directory) / "fuzz.db")
        factory = harness.factory
        proto = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1))
        transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 1))
        proto.makeConnection(transport)
        stream = b"".join(n + frame(f) for n, f in zip(noise, frames)) + noise[-1]
        for i in range(0, len(stream), chunk):
            proto.dataReceived(stream[i : i + chunk])
            harness.clock.advance(0)
        harness.clock.advance(0)

        rows = harness.journal.conn.execute("SELECT raw, ack, ack_sent FROM messages ORDER BY id").fetchall()
        assert [row[0] for row in rows] == frames
        sent = [row[1] for row in rows if row[2]]
        replies = [part.split(b"\x1c\r")[0] for part in transport.value().split(b"\x0b")[1:]]
        assert replies == sent
        assert transport.producerState == "producing"
        assert not transport.disconnecting
        proto.connectionLost(None)
        assert factory.open_connections == 0
        harness.journal.close()
