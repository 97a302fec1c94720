"""MLLP framing with StringTransport: no sockets, no reactor."""

from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from engine.mllp.framing import MLLPFraming, frame


class Collector(MLLPFraming):
    def __init__(self):
        self.frames = []
        self.exceeded = []

    def frameReceived(self, payload):
        self.frames.append(payload)

    def frameLengthExceeded(self, partial):
        self.exceeded.append(partial)
        MLLPFraming.frameLengthExceeded(self, partial)


def connect(proto_class=Collector):
    proto = proto_class()
    transport = StringTransport()
    proto.makeConnection(transport)
    return proto, transport


MESSAGES = [b"MSH|^~\\&|A|B|C|D|1||SIU^S12|1|P|2.5\rPID|1", b"MSH|^~\\&|X\rZZZ|\xe9\xff", b""]


class FramingTests(SynchronousTestCase):
    def test_frames_split_across_packets_of_every_size(self):
        stream = b"".join(frame(m) for m in MESSAGES)
        for size in range(1, 10):
            proto, _ = connect()
            for i in range(0, len(stream), size):
                proto.dataReceived(stream[i : i + size])
            self.assertEqual(proto.frames, MESSAGES, f"packet size {size}")
            self.assertEqual(proto.discardedBytes, 0)

    def test_several_frames_in_one_packet(self):
        proto, _ = connect()
        proto.dataReceived(b"".join(frame(m) for m in MESSAGES))
        self.assertEqual(proto.frames, MESSAGES)

    def test_bytes_outside_frames_are_discarded_and_counted(self):
        proto, _ = connect()
        proto.dataReceived(b"noise\r\n" + frame(b"one") + b"\r\n" + frame(b"two") + b"tail")
        self.assertEqual(proto.frames, [b"one", b"two"])
        self.assertEqual(proto.discardedBytes, len(b"noise\r\n") + 2 + 4)

    def test_a_new_start_block_abandons_the_unfinished_frame(self):
        proto, _ = connect()
        proto.dataReceived(b"\x0bhalf a mess" + frame(b"whole"))
        self.assertEqual(proto.frames, [b"whole"])
        self.assertEqual(proto.discardedBytes, len(b"\x0bhalf a mess"))

    def test_end_block_without_carriage_return_is_not_an_end(self):
        proto, _ = connect()
        proto.dataReceived(b"\x0bab\x1cc\x1c\r")
        self.assertEqual(proto.frames, [b"ab\x1cc"])

    def test_oversize_frame_disconnects(self):
        proto, transport = connect()
        proto.MAX_LENGTH = 10
        proto.dataReceived(frame(b"x" * 11))
        self.assertEqual(proto.frames, [])
        self.assertEqual(proto.exceeded, [b"x" * 10])
        self.assertTrue(transport.disconnecting)

    def test_unterminated_frame_is_limited_before_the_end_arrives(self):
        proto, transport = connect()
        proto.MAX_LENGTH = 10
        for _ in range(5):
            proto.dataReceived(b"\x0b" if not proto._buffer and not proto.exceeded else b"yyy")
        self.assertEqual(len(proto.exceeded), 1)
        self.assertTrue(transport.disconnecting)
        self.assertLessEqual(len(proto._buffer), 11)

    def test_frame_of_exactly_the_limit_is_accepted(self):
        proto, transport = connect()
        proto.MAX_LENGTH = 10
        proto.dataReceived(frame(b"z" * 10))
        self.assertEqual(proto.frames, [b"z" * 10])
        self.assertFalse(transport.disconnecting)

    def test_paused_framing_holds_frames_until_resumed(self):
        class PauseEach(Collector):
            def frameReceived(self, payload):
                Collector.frameReceived(self, payload)
                self.pauseFraming()

        proto, transport = connect(PauseEach)
        proto.dataReceived(frame(b"1") + frame(b"2") + frame(b"3"))
        self.assertEqual(proto.frames, [b"1"])
        self.assertEqual(transport.producerState, "producing")  # little is held: keep reading
        proto.resumeFraming()
        self.assertEqual(proto.frames, [b"1", b"2"])
        proto.resumeFraming()
        proto.resumeFraming()
        self.assertEqual(proto.frames, [b"1", b"2", b"3"])
        self.assertEqual(transport.producerState, "producing")

    def test_nothing_is_delivered_after_disconnect(self):
        class CloseAfterFirst(Collector):
            def frameReceived(self, payload):
                Collector.frameReceived(self, payload)
                self.transport.loseConnection()

        proto, _ = connect(CloseAfterFirst)
        proto.dataReceived(frame(b"1") + frame(b"2"))
        self.assertEqual(proto.frames, [b"1"])

    def test_reading_stops_when_held_frames_exceed_the_limit(self):
        class PauseEach(Collector):
            def frameReceived(self, payload):
                Collector.frameReceived(self, payload)
                self.pauseFraming()

        proto, transport = connect(PauseEach)
        proto.MAX_LENGTH = 10
        proto.dataReceived(frame(b"first"))
        proto.dataReceived(frame(b"second") + frame(b"third"))
        self.assertEqual(transport.producerState, "paused")
        proto.resumeFraming()
        self.assertEqual(transport.producerState, "producing")
        self.assertEqual(proto.frames, [b"first", b"second"])
