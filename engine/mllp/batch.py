"""Splitting files of HL7 messages: one message, many, or FHS/BHS batches.

Works on bytes, because the character set of each message is only known from its own MSH-18.
Envelope segments (FHS, BHS, BTS, FTS) are checked and removed: messages are sent one per frame.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import BatchError

_LINE = re.compile(rb"[^\r\n]*(?:\r\n|\r|\n|$)")
_ENVELOPE = (b"FHS", b"BHS", b"BTS", b"FTS")


@dataclass(frozen=True)
class FileMessage:
    """One message found in a file: the line it starts on and its bytes."""

    line: int
    data: bytes


def _lines(data: bytes):
    """(line number, text without terminator, text with terminator) for each non-blank line."""
    number = 0
    for match in _LINE.finditer(data):
        chunk = match.group(0)
        if not chunk:
            break
        number += 1
        body = chunk.rstrip(b"\r\n")
        if body.strip():
            yield number, body, chunk


def split_messages(data: bytes, keep_line_endings: bool = False) -> list[FileMessage]:
    """The messages in ``data``, in order.

    By default each message is rebuilt with CR segment terminators, as the standard and MLLP
    expect, whatever the file used. With ``keep_line_endings`` the bytes are the file's own.
    Raises ``BatchError`` (with the line) for a malformed batch: a segment outside a message, a
    BHS inside a message, or a BTS/FTS count that does not match.
    """
    messages: list[FileMessage] = []
    current: list[bytes] | None = None
    start_line = 0
    in_batch = False
    batch_count = 0
    batches = 0

    def close():
        nonlocal current
        if current is not None:
            joined = b"".join(current) if keep_line_endings else b"\r".join(current) + b"\r"
            messages.append(FileMessage(start_line, joined))
            current = None

    for number, body, chunk in _lines(data):
        body = body.lstrip(b"\x00\t ")
        kind = body[:3]
        if kind == b"MSH":
            close()
            current, start_line = [], number
            batch_count += 1
        elif kind in _ENVELOPE:
            if kind == b"BHS":
                if current is not None:
                    raise BatchError("BHS inside a message (a batch starts only after BTS)", number)
                if in_batch:
                    raise BatchError("BHS before the previous batch's BTS", number)
                in_batch, batch_count = True, 0
                batches += 1
            elif kind == b"BTS":
                close()
                if not in_batch:
                    raise BatchError("BTS without a BHS", number)
                _check_count(body, batch_count, "BTS-1 message count", number)
                in_batch = False
            elif kind == b"FTS":
                close()
                if in_batch:
                    raise BatchError("FTS before the batch's BTS", number)
                _check_count(body, batches, "FTS-1 batch count", number)
            else:  # FHS
                if messages or current is not None or batches:
                    raise BatchError("FHS must be the first segment of the file", number)
            continue
        else:
            if current is None:
                raise BatchError(f"segment {kind.decode('latin-1')!r} is outside any message (no MSH before it)", number)
        current.append(chunk if keep_line_endings else body)
    close()
    if in_batch:
        raise BatchError("batch has no BTS at the end of the file")
    return messages


def _check_count(segment: bytes, actual: int, what: str, line: int):
    fields = segment.split(segment[3:4]) if len(segment) > 3 else [segment]
    declared = fields[1].strip() if len(fields) > 1 else b""
    if declared and declared.isdigit() and int(declared) != actual:
        raise BatchError(f"{what} says {int(declared)} but {actual} found", line)
