"""MLLP framing for Twisted: ``0x0B`` payload ``0x1C 0x0D``. No HL7 knowledge lives here.

Shaped like Twisted's ``basic.LineReceiver``: one byte buffer, a ``MAX_LENGTH`` class attribute
that is checked on the unfinished frame too (a peer that never sends the end marker cannot grow
memory without bound), a ``frameReceived`` hook for subclasses and a ``frameLengthExceeded`` limit
hook that disconnects by default. ``pauseFraming`` holds back complete frames (and, once more than
``MAX_LENGTH`` bytes wait, stops reading from the socket) until ``resumeFraming``, which is how a server keeps one message in flight per
connection and its ACKs in order.
"""

from __future__ import annotations

from twisted.internet import protocol

START_BLOCK = b"\x0b"
END_BLOCK = b"\x1c"
CARRIAGE_RETURN = b"\x0d"
FRAME_END = END_BLOCK + CARRIAGE_RETURN


def frame(payload: bytes) -> bytes:
    """Wrap a payload in MLLP start and end blocks."""
    return START_BLOCK + payload + FRAME_END


class MLLPFraming(protocol.Protocol):
    """Splits a byte stream into MLLP frames.

    Bytes outside a frame (noise before a start block, keep-alive newlines) are discarded and
    counted in ``discardedBytes``. If a start block appears again before an end block, the partial
    frame before it is abandoned (counted as discarded) and the new frame is read.
    """

    MAX_LENGTH = 1024 * 1024

    _buffer = b""
    _scanned = 0  # how much of the open frame has been searched for FRAME_END already
    _framingPaused = False
    _readingPaused = False
    discardedBytes = 0

    def dataReceived(self, data: bytes):
        self._buffer += data
        if not self._framingPaused:
            self._deliverFrames()
        elif not self._readingPaused and len(self._buffer) > self.MAX_LENGTH:
            # Held frames are piling up: stop reading until the ones in the buffer are handled.
            # (Not on every pause: a sender that waits for each ACK never gets here, and pausing
            # the socket costs two system calls per message.)
            self._readingPaused = True
            self.transport.pauseProducing()

    def _deliverFrames(self):
        while not self._framingPaused and not self.transport.disconnecting:
            buffer = self._buffer
            if not buffer:
                return
            if buffer[:1] != START_BLOCK:
                start = buffer.find(START_BLOCK)
                if start < 0:
                    self.discardedBytes += len(buffer)
                    self._buffer = b""
                    return
                self.discardedBytes += start
                buffer = self._buffer = buffer[start:]
                self._scanned = 0
            end = buffer.find(FRAME_END, max(1, self._scanned))
            if end < 0:
                self._scanned = max(1, len(buffer) - 1)
                if len(buffer) - 1 > self.MAX_LENGTH:
                    self._buffer = b""
                    self._scanned = 0
                    self.frameLengthExceeded(buffer[1 : self.MAX_LENGTH + 1])
                return
            payload = buffer[1:end]
            self._buffer = buffer[end + 2 :]
            self._scanned = 0
            restart = payload.rfind(START_BLOCK)
            if restart >= 0:
                self.discardedBytes += restart + 1
                payload = payload[restart + 1 :]
            if len(payload) > self.MAX_LENGTH:
                self.frameLengthExceeded(payload[: self.MAX_LENGTH])
                return
            self.frameReceived(payload)

    def pauseFraming(self):
        """Hold complete frames in the buffer; reading from the peer stops if it grows past MAX_LENGTH."""
        self._framingPaused = True

    def resumeFraming(self):
        """Deliver held frames, and read from the peer again if that was stopped."""
        self._framingPaused = False
        if not self.transport.disconnecting:
            if self._readingPaused:
                self._readingPaused = False
                self.transport.resumeProducing()
            self._deliverFrames()

    def frameReceived(self, payload: bytes):
        """Override: called with the bytes between the start and end blocks."""
        raise NotImplementedError

    def frameLengthExceeded(self, partial: bytes):
        """Called with the first ``MAX_LENGTH`` bytes of a frame that is too long. Disconnects."""
        self.transport.loseConnection()

    def sendFrame(self, payload: bytes):
        """Write one payload wrapped in MLLP blocks."""
        self.transport.write(frame(payload))
