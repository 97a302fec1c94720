"""What the listener tells the operator, with StringTransport and task.Clock: each connection's
peer, since when, how many messages and the last one's time (no content), and a rejection's log
line with its HL7 error code and field (no content either)."""

from twisted.internet.task import Clock
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from conftest import EXAMPLES
from engine.config import ListenerSettings, Settings
from engine.mllp.framing import frame
from engine.mllp.listener import GroupCommit, MLLPServerFactory
from listening import acks, connect, ingestor_for

SIU = (EXAMPLES / "siu_s12.hl7").read_bytes()
BAD = (EXAMPLES / "bad_msh.hl7").read_bytes()


class PeerTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.clock.advance(1_795_000_000)  # 2026-11-18T10:13:20Z
        self.ingestor = ingestor_for(self)
        settings = ListenerSettings(name="north")
        self.factory = MLLPServerFactory(settings, GroupCommit(self.ingestor, self.clock), Settings().policy(settings))

    def test_open_connections_with_their_counts_then_recently_closed(self):
        first, _ = connect(self.factory, "10.1.2.3", 40001)
        self.clock.advance(5)
        second, transport = connect(self.factory, "10.1.2.4", 40002)
        self.clock.advance(10)
        second.dataReceived(frame(SIU))
        self.clock.advance(0)
        second.dataReceived(frame(SIU))
        self.clock.advance(0)
        self.assertEqual(len(acks(transport)), 2)
        peers = self.factory.peers()
        self.assertEqual([(c.peer, c.since, c.messages, c.last_message_at) for c in peers["open"]], [
            ("10.1.2.3:40001", 1_795_000_000, 0, None),
            ("10.1.2.4:40002", 1_795_000_005, 2, 1_795_000_015),
        ])
        self.assertEqual(peers["recently_closed"], [])
        self.clock.advance(60)
        second.connectionLost(None)
        peers = self.factory.peers()
        self.assertEqual([c.peer for c in peers["open"]], ["10.1.2.3:40001"])
        [closed] = peers["recently_closed"]
        self.assertEqual((closed.peer, closed.messages, closed.closed_at), ("10.1.2.4:40002", 2, 1_795_000_075))

    def test_refused_connections_are_not_listed(self):
        factory = MLLPServerFactory(ListenerSettings(name="x", allow_peers=()), self.factory.committer,
                                    self.factory.policy)
        factory.settings = ListenerSettings(name="x", max_connections=1)
        connect(factory, "10.0.0.1", 1)
        connect(factory, "10.0.0.2", 2)  # over the limit: refused
        self.assertEqual([c.peer for c in factory.peers()["open"]], ["10.0.0.1:1"])
        self.assertEqual(factory.peers()["recently_closed"], [])

    def test_a_rejection_is_logged_with_its_error_code_and_field_and_no_content(self):
        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        proto, transport = connect(self.factory, "10.1.2.3", 40001)
        proto.dataReceived(frame(BAD))
        self.clock.advance(0)
        self.assertIn(b"MSA|AR|NC000999", acks(transport)[0])
        lines = [formatEvent(e) for e in events if e.get("log_namespace") == "hl7bridge.listener"]
        self.assertIn("listener north: rejected - control ID NC000999 from 10.1.2.3:40001: ACK AR, error 101 "
                      "Required field missing at MSH-9 (route -)", lines)
        self.assertFalse([line for line in lines if "100999" in line or "TESTPATIENT" in line])
