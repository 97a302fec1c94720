"""Character sets: turn the exact bytes received into text, as MSH-18 declares.

The journal always keeps the bytes as received; the text is what routes, mappings and free-text
search read. Decoding never fails: when the bytes do not fit the declared character set, the bad
bytes are replaced and the decision is reported so it can be journaled.
"""

from __future__ import annotations

from dataclasses import dataclass

# HL7 table 0211 (alternate character sets) to Python codecs. Values are compared upper-case with
# spaces, '-' and '_' squeezed out, because senders write "UNICODE UTF-8", "UTF-8" and "ISO IR192".
_TABLE_0211 = {
    "ASCII": "ascii",
    "ISOIR6": "ascii",
    "88591": "latin-1",
    "ISOIR100": "latin-1",
    "88592": "iso8859-2",
    "ISOIR101": "iso8859-2",
    "88593": "iso8859-3",
    "88594": "iso8859-4",
    "88595": "iso8859-5",
    "ISOIR144": "iso8859-5",
    "88596": "iso8859-6",
    "ISOIR127": "iso8859-6",
    "88597": "iso8859-7",
    "ISOIR126": "iso8859-7",
    "88598": "iso8859-8",
    "ISOIR138": "iso8859-8",
    "88599": "iso8859-9",
    "ISOIR148": "iso8859-9",
    "885915": "iso8859-15",
    "UNICODEUTF8": "utf-8",
    "UTF8": "utf-8",
    "ISOIR192": "utf-8",
    "UNICODE": "utf-8",
    "GB180302000": "gb18030",
    "BIG5": "big5",
    "KSX1001": "euc-kr",
    "ISOIR149": "euc-kr",
    "CNS116431992": "big5",
    "JISX0208": "iso2022_jp",
    "ISOIR87": "iso2022_jp",
    "WINDOWS1252": "cp1252",
    "CP1252": "cp1252",
}

DEFAULT_CHARSET = "utf-8"
FALLBACK_CHARSET = "latin-1"


@dataclass(frozen=True)
class Decoded:
    """Text decoded from a frame, the codec used, and a warning when the bytes did not fit it."""

    text: str
    charset: str
    warning: str | None = None


def codec_for(declared: str) -> str | None:
    """The Python codec for an MSH-18 value, or None when we do not know it."""
    key = declared.upper().replace(" ", "").replace("-", "").replace("_", "").replace("/", "")
    return _TABLE_0211.get(key)


_BOMS = ((b"\xef\xbb\xbf", "utf-8", "UTF-8"), (b"\xff\xfe", "utf-16-le", "UTF-16LE"),
         (b"\xfe\xff", "utf-16-be", "UTF-16BE"))


def _start(raw: bytes) -> bytes:
    """The bytes from MSH on: without what may stand before it (framing, NUL, blank lines)."""
    return raw.lstrip(b"\x0b\x1c\x00\t\r\n ")


def declared_charset(raw: bytes) -> str:
    """MSH-18 (first repetition) read from the raw bytes, '' when absent or unreadable."""
    raw = _start(raw[3:] if raw.startswith(b"\xef\xbb\xbf") else raw)
    end = len(raw)
    for terminator in (b"\r", b"\n"):
        pos = raw.find(terminator)
        if 0 <= pos < end:
            end = pos
    header = raw[:end]
    if len(header) < 4 or not header.startswith(b"MSH"):
        return ""
    fields = header.split(header[3:4])
    # fields[0] is 'MSH' and fields[1] is MSH-2, so MSH-n is fields[n - 1].
    if len(fields) < 18:
        return ""
    repetition = fields[1][1:2] or b"~"
    return fields[17].split(repetition)[0].decode("latin-1").strip()


def decode(raw: bytes, default: str = DEFAULT_CHARSET) -> Decoded:
    """Decode a frame per its MSH-18; undeclared text is tried as ``default``, then Latin-1.

    A byte-order mark says the encoding better than MSH-18 can (some Windows tools write one):
    UTF-16 text is decoded as such, and UTF-8 with a mark is read as UTF-8, with a warning when
    MSH-18 says otherwise. The reader removes the UTF-8 mark itself (and says so).
    """
    for bom, codec, name in _BOMS:
        if raw.startswith(bom):
            return _decode_marked(raw, bom, codec, name)
    declared = declared_charset(raw)
    if declared:
        codec = codec_for(declared)
        if codec is None:
            text, charset, _ = _decode_undeclared(raw, default)
            return Decoded(text, charset, f"MSH-18 character set {declared!r} is not supported; read as {charset}")
        try:
            return Decoded(raw.decode(codec), codec)
        except UnicodeDecodeError as exc:
            return Decoded(
                raw.decode(codec, errors="replace"),
                codec,
                f"bytes do not match MSH-18 {declared!r} at offset {exc.start}; undecodable bytes replaced",
            )
    text, charset, warning = _decode_undeclared(raw, default)
    return Decoded(text, charset, warning)


def _decode_marked(raw: bytes, bom: bytes, codec: str, name: str) -> Decoded:
    warnings = []
    body = raw[len(bom):]
    try:
        text = body.decode(codec)
    except UnicodeDecodeError as exc:
        text = body.decode(codec, errors="replace")
        warnings.append(f"bytes do not match the byte-order mark ({name}) at offset {exc.start + len(bom)}; "
                        "undecodable bytes replaced")
    declared = declared_charset(text.encode("utf-8"))
    if declared and codec_for(declared) not in (None, "utf-8", codec):
        warnings.append(f"MSH-18 says {declared!r} but a byte-order mark says {name}: read as {name}")
    if codec == "utf-8":
        text = "\ufeff" + text  # the reader removes the mark itself, and says so
    else:
        warnings.insert(0, f"byte-order mark ({name}) before MSH: read as {name}")
    return Decoded(text, codec, "; ".join(warnings) or None)


def _decode_undeclared(raw: bytes, default: str):
    try:
        return raw.decode(default), default, None
    except UnicodeDecodeError:
        return raw.decode(FALLBACK_CHARSET), FALLBACK_CHARSET, f"bytes are not {default}; read as {FALLBACK_CHARSET}"


def encode(text: str, charset: str) -> bytes:
    """Encode text (an ACK) in the charset of the message it answers; unencodable characters become '?'."""
    return text.encode(charset, errors="replace")
