"""Splitting files of HL7 messages: one message, many, or FHS/BHS batches.

Works on bytes, because the character set of each message is only known from its own MSH-18 (the
bytes are looked at as Latin-1, one character per byte, so nothing is changed by looking).
A file saved as UTF-16 (with its byte-order mark, as some Windows tools write it) is read as such
and its messages are given back in UTF-16 with the mark. Envelope segments (FHS, BHS, BTS, FTS)
are checked and removed: messages are sent one per frame.

Lines are found as the reader finds segments (``engine.hl7.er7.read_lines``): CR, LF or CRLF, and
in a file that uses CR a lone LF that is not followed by a segment is a line break inside a field.
Segment IDs are recognised in any case and with spaces before them, as the reader accepts them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import BatchError
from ..hl7.er7 import XML_NOT_SUPPORTED, looks_like_segment

_ENDS = re.compile(r"(\r\n|\r|\n)")
_ENVELOPE = ("FHS", "BHS", "BTS", "FTS")
_UTF16 = ((b"\xff\xfe", "utf-16-le"), (b"\xfe\xff", "utf-16-be"))


@dataclass(frozen=True)
class FileMessage:
    """One message found in a file: the line it starts on and its bytes."""

    line: int
    data: bytes


def _lines(text: str):
    """(line number, text without its end, text with its end) for each non-blank line.

    A lone LF in text that has CR is a line end only when a segment starts after it."""
    parts = _ENDS.split(text)
    has_cr = "\r" in text
    number = 1
    body, chunk = parts[0], parts[0]
    start = 1
    for index in range(1, len(parts), 2):
        end, after = parts[index], parts[index + 1]
        number += 1
        if end == "\n" and has_cr and after.strip() and body.strip() and not looks_like_segment(after, None):
            body += end + after
            chunk += end + after
            continue
        if body.strip():
            yield start, body, chunk + end
        body, chunk, start = after, after, number
    if body.strip():
        yield start, body, chunk


def split_messages(data: bytes, keep_line_endings: bool = False) -> list[FileMessage]:
    """The messages in ``data``, in order.

    By default each message is rebuilt with CR segment terminators, as the standard and MLLP
    expect, whatever the file used. With ``keep_line_endings`` the bytes are the file's own.
    Raises ``BatchError`` (with the line) for what is not a file of ER7 messages: HL7 v2 XML, a
    segment outside a message, a BHS inside a message, or a BTS/FTS count that does not match.
    """
    codec, mark = "latin-1", b""
    for bom, name in _UTF16:
        if data.startswith(bom):
            codec, mark, data = name, bom, data[len(bom):]
    text = data.decode(codec, errors="replace")
    messages: list[FileMessage] = []
    current: list[str] | None = None
    start_line = 0
    in_batch = False
    batch_count = 0
    batches = 0

    def close():
        nonlocal current
        if current is not None:
            joined = "".join(current) if keep_line_endings else "\r".join(current) + "\r"
            messages.append(FileMessage(start_line, mark + joined.encode(codec)))
            current = None

    for number, body, chunk in _lines(text):
        stripped = body[3:] if body.startswith("\xef\xbb\xbf") else body  # a UTF-8 byte-order mark
        stripped = stripped.lstrip("\ufeff\x0b\x1c\x00\t ")
        if not messages and current is None and stripped.startswith("<"):
            raise BatchError(XML_NOT_SUPPORTED, number)
        kind = stripped[:3].upper()
        if kind == "MSH":
            close()
            current, start_line = [], number
            batch_count += 1
        elif kind in _ENVELOPE and not stripped[3:4].isalnum():
            if kind == "BHS":
                if current is not None:
                    raise BatchError("BHS inside a message (a batch starts only after BTS)", number)
                if in_batch:
                    raise BatchError("BHS before the previous batch's BTS", number)
                in_batch, batch_count = True, 0
                batches += 1
            elif kind == "BTS":
                close()
                if not in_batch:
                    raise BatchError("BTS without a BHS", number)
                _check_count(stripped, batch_count, "BTS-1 message count", number)
                in_batch = False
            elif kind == "FTS":
                close()
                if in_batch:
                    raise BatchError("FTS before the batch's BTS", number)
                _check_count(stripped, batches, "FTS-1 batch count", number)
            else:  # FHS
                if messages or current is not None or batches:
                    raise BatchError("FHS must be the first segment of the file", number)
            continue
        else:
            if current is None:
                raise BatchError(f"segment {body[:3]!r} is outside any message (no MSH before it)", number)
        current.append(chunk if keep_line_endings else body)
    close()
    if in_batch:
        raise BatchError("batch has no BTS at the end of the file")
    return messages


def _check_count(segment: str, actual: int, what: str, line: int):
    fields = segment.split(segment[3:4]) if len(segment) > 3 else [segment]
    declared = fields[1].strip() if len(fields) > 1 else ""
    if declared and declared.isdigit() and int(declared) != actual:
        raise BatchError(f"{what} says {int(declared)} but {actual} found", line)
