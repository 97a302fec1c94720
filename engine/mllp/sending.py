"""Sending messages and reading their ACKs: the library behind ``hl7bridge send``."""

from __future__ import annotations

import socket
from dataclasses import dataclass

from ..hl7.charset import decode
from ..hl7.er7 import parse
from ..errors import ParseError
from ..hl7.header import read_header


@dataclass
class SendResult:
    """One message sent: where it came from, its control ID, and what came back."""

    source: str
    control_id: str
    ack_code: str | None  # None when no ACK came back
    ack: str | None
    error: str | None = None
    expected_no_ack: bool = False

    @property
    def accepted(self) -> bool:
        if self.ack_code is None:
            return self.expected_no_ack
        return self.ack_code in ("AA", "CA")

    def describe(self, full: bool = True) -> str:
        if self.ack_code is None:
            outcome = "no ACK (as MSH-15 asks)" if self.expected_no_ack else "no ACK"
        else:
            outcome = self.ack_code + (f": {self.error}" if self.error else "")
        line = f"{self.source} {self.control_id or '-'}: {outcome}"
        if full and self.ack:
            line += "\n" + "\n".join(s for s in self.ack.split("\r") if s)
        return line

    def as_dict(self) -> dict:
        return {
            "source": self.source, "control_id": self.control_id, "ack_code": self.ack_code,
            "accepted": self.accepted, "error": self.error, "ack": self.ack,
        }


def ack_condition(message: bytes) -> str:
    """MSH-15 of an outgoing message ('' in original mode), to know whether an ACK will come."""
    try:
        return read_header(parse(decode(message).text)).accept_ack_type
    except ParseError:
        return ""


def read_ack(payload: bytes) -> tuple[str | None, str, str | None]:
    """(MSA-1 code, ACK text, error text from ERR or MSA-3) of an ACK payload."""
    text = decode(payload).text
    try:
        message = parse(text)
    except ParseError:
        return None, text, "the reply is not an HL7 ACK"
    code = message.value("MSA-1") or None
    error = message.value("ERR-7") or message.value("ERR-3.2") or message.value("ERR-1.4.2") or message.value("MSA-3")
    return code, text, error or None


class AckTimeout(Exception):
    """The connection is open but no ACK came within the client's timeout (not a connection failure)."""

    def __init__(self, source: str, control_id: str):
        super().__init__(f"no ACK for {source} {control_id}".rstrip())
        self.source, self.control_id = source, control_id


def send_all(client, messages, conditional_wait: float = 2.0):
    """Send ``(source, bytes)`` pairs in order on one connection; yield a ``SendResult`` each.

    Raises ``AckTimeout`` when an ACK that must come does not come in time, and ``OSError`` or
    ``FramingError`` when the connection fails."""
    for source, data in messages:
        condition = ack_condition(data)
        try:
            header = read_header(parse(decode(data).text))
            control_id = header.control_id.strip()
        except ParseError:
            control_id = ""
        if condition == "NE":
            client.send(data, expect_ack=False)
            yield SendResult(source, control_id, None, None, expected_no_ack=True)
            continue
        if condition in ("ER", "SU"):
            client.send(data, expect_ack=False)
            previous = client.sock.gettimeout()
            client.sock.settimeout(conditional_wait)
            try:
                payload = client.read_frame()
            except socket.timeout:
                # ER: silence means success; SU: silence means it was not accepted.
                yield SendResult(source, control_id, None, None, expected_no_ack=condition == "ER")
                continue
            finally:
                client.sock.settimeout(previous)
        else:
            try:
                payload = client.send(data)
            except socket.timeout:
                raise AckTimeout(source, control_id) from None
        code, text, error = read_ack(payload)
        yield SendResult(source, control_id, code, text, error)
