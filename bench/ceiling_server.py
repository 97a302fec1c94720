"""The ceiling for ``bench/ingest.py``: a bare Twisted MLLP server that does nothing but frame.

It splits the byte stream on MLLP blocks (0x0B payload 0x1C 0x0D) and answers every frame with the
same canned ACK. No parsing, no journal, no logging: whatever throughput it reaches is the most any
Twisted MLLP server can do on this machine with this load generator, so hl7bridge's figures are
read against it.

Run by ``bench/ingest.py``; by hand: ``.venv/bin/python bench/ceiling_server.py [PORT]``. It prints
``ceiling: ready on 127.0.0.1:PORT`` once listening (port 0, the default, picks a free one) and
runs until SIGTERM or SIGINT.
"""

from __future__ import annotations

import sys

from twisted.internet import protocol

START_BLOCK, FRAME_END = b"\x0b", b"\x1c\x0d"

# A well-formed original-mode ACK, built once. MSA-2 cannot echo the inbound MSH-10 without
# parsing, which is exactly the work this server must not do.
CANNED_ACK = START_BLOCK + (
    b"MSH|^~\\&|CEILING|BENCH|||20260101000000+0000||ACK^S12^ACK|CEILING1|P|2.8\r"
    b"MSA|AA|CEILING1\r"
) + FRAME_END


class CannedAck(protocol.Protocol):
    _buffer = b""

    def dataReceived(self, data: bytes):
        buffer = self._buffer + data
        # Only count frame ends: the load generator always sends whole, well-formed frames, and
        # closed-loop it never has more than one in flight, so this loop usually runs once.
        acks = 0
        start = 0
        while True:
            end = buffer.find(FRAME_END, start)
            if end < 0:
                break
            acks += 1
            start = end + 2
        self._buffer = buffer[start:]
        if acks:
            self.transport.write(CANNED_ACK * acks)


class CannedAckFactory(protocol.Factory):
    protocol = CannedAck
    noisy = False


def main(argv: list[str]) -> int:
    from twisted.internet import reactor

    port = reactor.listenTCP(int(argv[1]) if len(argv) > 1 else 0, CannedAckFactory(), interface="127.0.0.1")
    address = port.getHost()
    print(f"ceiling: ready on {address.host}:{address.port}", flush=True)
    reactor.run()  # Twisted installs SIGTERM/SIGINT handlers that stop the reactor cleanly
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
