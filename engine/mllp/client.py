"""A small blocking MLLP client, for ``hl7bridge send`` and for tests and benchmarks.

Plain sockets on purpose: a command-line sender needs no event loop, and the engine's reactor code
stays in the listener.
"""

from __future__ import annotations

import socket
import ssl
from dataclasses import dataclass

from ..errors import FramingError
from .framing import FRAME_END, START_BLOCK, frame


@dataclass(frozen=True)
class TlsClientOptions:
    """TLS for the client: ``ca`` verifies the server; ``certificate``/``key`` for mutual TLS."""

    ca: str | None = None
    certificate: str | None = None
    key: str | None = None
    verify: bool = True
    server_name: str | None = None

    def context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=self.ca)
        if not self.verify:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        if self.certificate:
            context.load_cert_chain(self.certificate, self.key)
        return context


def parse_address(address: str) -> tuple[str, int]:
    """'HOST:PORT' (or '[v6]:PORT') into (host, port)."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"{address!r} is not HOST:PORT")
    return host.strip("[]") or "127.0.0.1", int(port)


class MLLPClient:
    """One connection to an MLLP server; ``send`` writes a message and waits for its ACK."""

    def __init__(self, host: str, port: int, timeout: float = 30.0, tls: TlsClientOptions | None = None):
        sock = socket.create_connection((host, port), timeout=timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if tls is not None:
            sock = tls.context().wrap_socket(sock, server_hostname=tls.server_name or host)
        self.sock = sock
        self._buffer = b""

    def send(self, message: bytes, expect_ack: bool = True) -> bytes | None:
        """Send one message; return the ACK payload (None when ``expect_ack`` is False)."""
        self.sock.sendall(frame(message))
        return self.read_frame() if expect_ack else None

    def read_frame(self) -> bytes:
        """Read the next frame's payload. Raises ``FramingError`` if the server closes first."""
        while True:
            start = self._buffer.find(START_BLOCK)
            if start >= 0:
                end = self._buffer.find(FRAME_END, start)
                if end >= 0:
                    payload = self._buffer[start + 1 : end]
                    self._buffer = self._buffer[end + len(FRAME_END) :]
                    return payload
            chunk = self.sock.recv(65536)
            if not chunk:
                raise FramingError("the server closed the connection before sending an ACK")
            self._buffer += chunk

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


