"""The MLLP server protocol with StringTransport, task.Clock and a real SQLite journal."""

import sqlite3
from dataclasses import replace

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from conftest import EXAMPLES
from engine.config import ListenerSettings, Settings
from engine.mllp.framing import frame
from engine.mllp.listener import GroupCommit, MLLPServerFactory
from listening import acks, connect, ingestor_for

SIU = (EXAMPLES / "siu_s12.hl7").read_bytes()
DFT = (EXAMPLES / "dft_p03.hl7").read_bytes()


class ListenerTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.ingestor = ingestor_for(self)
        self.journal = self.ingestor.journal
        self.committer = GroupCommit(self.ingestor, self.clock)
        self.settings = ListenerSettings(name="test", idle_timeout=30, max_connections=2, max_frame_bytes=64 * 1024)
        self.factory = self.make_factory(self.settings)

    def make_factory(self, settings):
        return MLLPServerFactory(settings, self.committer, Settings().policy(settings))

    def connect(self, factory=None, host="127.0.0.1", port=40000):
        return connect(factory or self.factory, host, port)

    def test_ack_is_sent_only_after_the_commit(self):
        proto, transport = self.connect()
        proto.dataReceived(frame(SIU))
        self.assertEqual(transport.value(), b"")
        self.assertEqual(self.journal.count(), 0)
        self.clock.advance(0)
        self.assertEqual(self.journal.count(), 1)
        [ack] = acks(transport)
        self.assertIn(b"MSA|AA|NC000123\r", ack)

    def test_one_message_in_flight_and_acks_in_order(self):
        proto, transport = self.connect()
        proto.dataReceived(frame(SIU) + frame(DFT))
        self.assertEqual(len(self.committer._pending), 1)  # the second waits for the first's ACK
        self.clock.advance(0)
        first, second = acks(transport)
        self.assertIn(b"MSA|AA|NC000123", first)
        self.assertIn(b"MSA|AA|EC000501", second)
        rows = self.journal.conn.execute("SELECT control_id FROM messages ORDER BY id").fetchall()
        self.assertEqual(rows, [("NC000123",), ("EC000501",)])

    def test_frames_from_several_connections_share_one_commit(self):
        (p1, t1), (p2, t2) = self.connect(port=1), self.connect(port=2)
        p1.dataReceived(frame(SIU))
        p2.dataReceived(frame(DFT))
        commits = []
        self.journal.conn.set_trace_callback(lambda sql: commits.append(sql) if sql == "COMMIT" else None)
        self.clock.advance(0)
        self.assertEqual(len(commits), 1)
        self.assertEqual((len(acks(t1)), len(acks(t2))), (1, 1))

    def test_the_accepted_line_is_logged_only_when_asked_for(self):
        """serve asks for it at log level debug only: building and filtering the event cost
        reactor time on every message."""
        from twisted.logger import globalLogPublisher

        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        accepted = lambda: [e for e in events if "accepted {message_code}" in e.get("log_format", "")]  # noqa: E731
        proto, _ = self.connect(port=1)
        proto.dataReceived(frame(SIU))
        self.clock.advance(0)
        self.assertEqual(len(accepted()), 1)
        self.factory.log_accepted = False
        proto.dataReceived(frame(DFT))
        self.clock.advance(0)
        self.assertEqual(len(accepted()), 1)
        self.assertEqual(self.journal.count(), 2)

    def test_garbage_frame_gets_a_reject_and_a_row(self):
        proto, transport = self.connect()
        proto.dataReceived(frame(b"\x00\x01 not hl7 \xff"))
        self.clock.advance(0)
        [ack] = acks(transport)
        self.assertIn(b"MSA|AR||", ack)
        self.assertEqual(self.journal.count("rejected"), 1)

    def test_oversize_frame_is_journaled_cut_off_and_the_peer_disconnected(self):
        factory = self.make_factory(replace(self.settings, max_frame_bytes=100))
        proto, transport = self.connect(factory)
        proto.dataReceived(frame(SIU))
        self.assertTrue(transport.disconnecting)
        self.clock.advance(0)
        row = self.journal.conn.execute("SELECT status, truncated, length(raw) FROM messages").fetchone()
        self.assertEqual(row, ("rejected", 1, 100))
        self.assertEqual(transport.value(), b"")

    def test_idle_connection_is_closed(self):
        proto, transport = self.connect()
        self.clock.advance(29)
        self.assertFalse(transport.disconnecting)
        proto.dataReceived(b"\r\n")
        self.clock.advance(29)
        self.assertFalse(transport.disconnecting)
        self.clock.advance(2)
        self.assertTrue(transport.disconnecting)

    def test_connection_limit(self):
        self.connect(port=1)
        _, t2 = self.connect(port=2)
        proto3, t3 = self.connect(port=3)
        self.assertFalse(t2.disconnecting)
        self.assertTrue(t3.disconnecting)
        self.assertEqual(self.factory.counters.refused_connections, 1)
        proto3.dataReceived(frame(SIU))
        self.clock.advance(0)
        self.assertEqual(self.journal.count(), 0)

    def test_closed_connections_free_their_slot(self):
        proto, _ = self.connect(port=1)
        self.connect(port=2)
        proto.connectionLost(None)
        _, t3 = self.connect(port=3)
        self.assertFalse(t3.disconnecting)

    def test_allowlist(self):
        settings = replace(self.settings, allow_peers=(__import__("ipaddress").ip_network("10.0.0.0/8"),))
        factory = self.make_factory(settings)
        _, refused = self.connect(factory, host="127.0.0.1")
        _, allowed = self.connect(factory, host="10.1.2.3")
        self.assertTrue(refused.disconnecting)
        self.assertFalse(allowed.disconnecting)

    def test_journal_failure_answers_error_ack_and_keeps_serving(self):
        proto, transport = self.connect()
        self.journal.conn.execute("CREATE TRIGGER fail BEFORE INSERT ON messages BEGIN SELECT RAISE(ABORT, 'disk full'); END")
        proto.dataReceived(frame(SIU))
        self.clock.advance(0)
        [ack] = acks(transport)
        self.assertIn(b"MSA|AE|NC000123|message could not be stored; send it again\r", ack)
        self.assertIn(b"207^Application internal error^HL70357", ack)
        self.assertEqual(len(self.flushLoggedErrors(sqlite3.IntegrityError)), 1)
        self.journal.conn.execute("DROP TRIGGER fail")
        proto.dataReceived(frame(SIU))
        self.clock.advance(0)
        self.assertIn(b"MSA|AA|NC000123", acks(transport)[1])
        self.assertEqual(self.journal.count(), 1)

    def test_duplicate_resend_gets_the_same_ack_bytes(self):
        proto, transport = self.connect()
        proto.dataReceived(frame(SIU))
        self.clock.advance(0)
        proto.dataReceived(frame(SIU))
        self.clock.advance(0)
        first, second = acks(transport)
        self.assertEqual(first, second)
        self.assertEqual(self.journal.count("duplicate"), 1)

    def test_frames_fed_byte_by_byte_all_reach_the_journal(self):
        # Found by the fuzz test: a commit that finishes synchronously starts the next one from
        # its own callback; the outer flush must not then mistake itself for the running commit.
        proto, transport = self.connect()
        stream = frame(b"") + frame(b"") + frame(SIU)
        for i in range(len(stream)):
            proto.dataReceived(stream[i : i + 1])
            self.clock.advance(0)
        self.assertEqual(self.journal.count(), 3)
        self.assertEqual(len(acks(transport)), 3)


class MappingBeforeTheAckTests(SynchronousTestCase):
    """Routes with ack.after: mapping are mapped off the reactor: a slow mapping delays only its own ACK."""

    def setUp(self):
        from conftest import ROOT
        from engine.transform.project import Project

        self.clock = Clock()
        self.ingestor = ingestor_for(self, Project.load(ROOT))
        self.journal = self.ingestor.journal
        self.mappings = []  # (Deferred, function, args) the test releases by hand

        def run_mapping(fn, *args):
            from twisted.internet import defer

            d = defer.Deferred()
            self.mappings.append((d, fn, args))
            return d

        self.committer = GroupCommit(self.ingestor, self.clock, run_mapping=run_mapping)
        settings = ListenerSettings(name="test", idle_timeout=30, max_connections=4)
        self.factory = MLLPServerFactory(settings, self.committer, Settings().policy(settings))

    def connect(self, port):
        return connect(self.factory, port=port)

    def test_a_commit_route_is_acked_while_another_connection_waits_for_its_mapping(self):
        charges, charges_transport = self.connect(1)  # DFT: clinic-charges maps before its ACK
        scheduling, scheduling_transport = self.connect(2)  # SIU: clinic-scheduling ACKs after the commit
        charges.dataReceived(frame(DFT))
        self.assertEqual(len(self.mappings), 1)  # handed to the mapping pool, not mapped here
        scheduling.dataReceived(frame(SIU))
        self.clock.advance(0)
        [ack] = acks(scheduling_transport)
        self.assertIn(b"MSA|AA|NC000123", ack)
        self.assertEqual(acks(charges_transport), [])  # still mapping
        self.assertEqual(self.journal.count(), 1)
        d, fn, args = self.mappings.pop()
        d.callback(fn(*args))  # the mapping finishes
        self.clock.advance(0)
        [ack] = acks(charges_transport)
        self.assertIn(b"MSA|AA|EC000501", ack)
        self.assertEqual(self.journal.count("mapped"), 1)
        self.assertEqual(self.journal.conn.execute("SELECT count(*) FROM deliveries").fetchone(), (2,))

    def test_drain_waits_for_mappings_in_progress(self):
        charges, transport = self.connect(1)
        charges.dataReceived(frame(DFT))
        drained = self.committer.drain()
        self.assertNoResult(drained)
        d, fn, args = self.mappings.pop()
        d.callback(fn(*args))
        self.clock.advance(0)
        self.successResultOf(drained)
        self.assertEqual(self.journal.count("mapped"), 1)

    def test_a_mapping_that_crashes_closes_only_its_connection(self):
        charges, charges_transport = self.connect(1)
        scheduling, scheduling_transport = self.connect(2)
        charges.dataReceived(frame(DFT))
        d, _, _ = self.mappings.pop()
        d.errback(RuntimeError("a bug"))
        self.assertTrue(charges_transport.disconnecting)
        self.flushLoggedErrors(RuntimeError)
        scheduling.dataReceived(frame(SIU))
        self.clock.advance(0)
        self.assertEqual(len(acks(scheduling_transport)), 1)


class BusySenderTests(SynchronousTestCase):
    """Group commit waits for busy senders: connections that sent their next frame at once after
    their ACK are awaited, so their frames share one commit (one fsync) instead of settling into
    two half batches; a sender that is not busy is never waited for. Time is a task.Clock and each
    commit lasts 4 ms of it (an fsync on a busy disk)."""

    COMMIT = 0.004

    def setUp(self):
        from twisted.internet import defer

        self.clock = Clock()
        self.ingestor = ingestor_for(self)
        self.batches = []

        def run_commit(fn, *args):
            if args:
                self.batches.append(len(args[0]))
            d = defer.Deferred()
            self.clock.callLater(self.COMMIT, lambda: d.callback(fn(*args)))
            return d

        self.committer = GroupCommit(self.ingestor, self.clock, run_commit=run_commit)
        settings = ListenerSettings(name="test", idle_timeout=30, max_connections=20, max_frame_bytes=64 * 1024)
        self.factory = MLLPServerFactory(settings, self.committer, Settings().policy(settings))
        self.sent = 0

    def send(self, proto):
        self.sent += 1
        proto.dataReceived(frame(SIU.replace(b"NC000123", f"NC{self.sent:06d}".encode(), 1)))

    def test_busy_senders_answered_together_send_again_into_one_commit(self):
        conns = [connect(self.factory, port=port) for port in (1, 2, 3)]
        for proto, _ in conns:
            self.send(proto)
        self.clock.advance(0)  # one batch of three starts
        self.clock.advance(self.COMMIT)  # committed: three ACKs out
        for proto, _ in conns:  # each sends again at once: now known as busy senders
            self.send(proto)
        self.clock.advance(0)
        self.clock.advance(self.COMMIT)
        self.assertEqual(self.batches, [3, 3])
        # Answered again, they are awaited: the first two back do not start a commit of their own.
        self.send(conns[0][0])
        self.clock.advance(0.0001)
        self.send(conns[1][0])
        self.clock.advance(0.0001)
        self.assertEqual(self.batches, [3, 3])
        self.send(conns[2][0])  # the last one awaited: the batch goes at once, all three together
        self.clock.advance(0)
        self.assertEqual(self.batches, [3, 3, 3])
        self.clock.advance(self.COMMIT)
        self.assertEqual([len(acks(t)) for _, t in conns], [3, 3, 3])

    def test_a_busy_sender_that_does_not_come_back_holds_the_batch_only_briefly(self):
        from engine.mllp.listener import HOLD_SHARE, MAX_HOLD

        (p1, t1), (p2, t2) = connect(self.factory, port=1), connect(self.factory, port=2)
        for _ in range(3):  # both answered, both back at once, three times: busy senders
            self.send(p1)
            self.send(p2)
            self.clock.advance(0)
            self.clock.advance(self.COMMIT)
        self.send(p1)  # p2 has nothing more to send
        self.clock.advance(0)
        self.assertEqual(self.batches, [2, 2, 2])
        hold = min(MAX_HOLD, self.committer.commit_seconds * HOLD_SHARE)
        self.assertTrue(0 < hold <= MAX_HOLD)
        self.clock.advance(hold)
        self.assertEqual(self.batches, [2, 2, 2, 1])
        self.clock.advance(self.COMMIT)
        self.assertEqual((len(acks(t1)), len(acks(t2))), (4, 3))

    def test_a_sender_that_takes_its_time_is_never_waited_for(self):
        (p1, t1), (p2, t2) = connect(self.factory, port=1), connect(self.factory, port=2)
        for _ in range(3):  # paced: each sends 10 ms after its ACK
            self.send(p1)
            self.send(p2)
            self.clock.advance(0)
            self.clock.advance(self.COMMIT)
            self.clock.advance(0.010)
        self.send(p1)
        self.clock.advance(0)  # committed at once, without p2
        self.assertEqual(self.batches, [2, 2, 2, 1])
