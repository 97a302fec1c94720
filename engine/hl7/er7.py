"""A fast, tolerant reader of HL7 v2 ER7 ("pipe and hat") messages.

Why our own reader and not hl7apy on the hot path: hl7apy builds a full object tree against the
standard's structure definitions (about 16 ms for a 10-segment SIU^S12 here) and, with
``find_groups=True``, drops Z-segments and segments it does not expect. Ingest must read any feed
a hospital really sends, keep every segment, and answer within milliseconds, so this reader only
splits text: segments on any of ``\\r``, ``\\n`` or ``\\r\\n``; fields, repetitions, components and
sub-components on the separators declared in MSH-1 and MSH-2; and it splits lazily, a segment at
the moment somebody asks for one of its fields. hl7apy is used where knowing the standard pays
(``engine.hl7.standard``): field names, data types and structural validation.

Values are addressed with paths (``engine.hl7.paths``): ``PID-3``, ``PID-3[2].1``, ``FT1[2]-11.1``.
Returned values have escape sequences decoded; ``raw_value`` keeps them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import ParseError
from .paths import Path, parse_path

SEGMENT_ID = re.compile(r"^[A-Z][A-Z0-9]{2}$")
_LINE_BREAKS = re.compile(r"\r\n|\r|\n")


@dataclass(frozen=True)
class Separators:
    """The five delimiters a message declares in MSH-1 and MSH-2."""

    field: str = "|"
    component: str = "^"
    repetition: str = "~"
    escape: str = "\\"
    subcomponent: str = "&"

    @property
    def encoding_characters(self) -> str:
        """MSH-2 as it is written: component, repetition, escape, sub-component."""
        return self.component + self.repetition + self.escape + self.subcomponent

    @classmethod
    def from_msh(cls, header_line: str) -> "Separators":
        """Read the separators from the first line of a message (``MSH|^~\\&|…``).

        Short MSH-2 values (some senders omit the escape or sub-component character) fall back to
        the defaults for what is missing, as most engines do.
        """
        if len(header_line) < 4 or header_line[:3] not in ("MSH", "FHS", "BHS"):
            raise ParseError("message does not start with an MSH segment", "segment 1")
        field = header_line[3]
        if field.isalnum() or field in "\r\n ":
            raise ParseError(f"MSH-1 field separator {field!r} is not usable", "MSH-1")
        encoding = header_line[4:].split(field, 1)[0]
        defaults = "^~\\&"
        chars = list(encoding[:4]) + list(defaults[len(encoding[:4]):])
        seps = cls(field, chars[0], chars[1], chars[2], chars[3])
        if len({seps.field, seps.component, seps.repetition, seps.escape, seps.subcomponent}) < 5:
            raise ParseError(f"MSH-2 encoding characters {encoding!r} repeat a separator", "MSH-2")
        return seps


DEFAULT_SEPARATORS = Separators()


def unescape(value: str, seps: Separators = DEFAULT_SEPARATORS) -> str:
    """Decode HL7 escape sequences in one leaf value.

    ``\\F\\ \\S\\ \\T\\ \\R\\ \\E\\`` become the separator characters, ``\\Xhh…\\`` becomes the
    characters of those bytes (read as Latin-1, so one byte is one character), ``\\.br\\`` a line
    break, and the highlighting escapes ``\\H\\ \\N\\`` are dropped. Anything unrecognised, and a
    lone escape character, is kept as it was, so nothing a sender wrote is lost.
    """
    esc = seps.escape
    if esc not in value:
        return value
    out = []
    i = 0
    n = len(value)
    while i < n:
        ch = value[i]
        if ch != esc:
            j = value.find(esc, i)
            if j < 0:
                out.append(value[i:])
                break
            out.append(value[i:j])
            i = j
            continue
        end = value.find(esc, i + 1)
        if end < 0:
            out.append(value[i:])
            break
        code = value[i + 1 : end]
        decoded = _decode_escape(code, seps)
        if decoded is None:
            out.append(value[i : end + 1])
        else:
            out.append(decoded)
        i = end + 1
    return "".join(out)


def _decode_escape(code: str, seps: Separators) -> str | None:
    if code == "F":
        return seps.field
    if code == "S":
        return seps.component
    if code == "T":
        return seps.subcomponent
    if code == "R":
        return seps.repetition
    if code == "E":
        return seps.escape
    if code in ("H", "N"):
        return ""
    if code == ".br":
        return "\n"
    if code[:1] == "X" and len(code) > 1 and len(code) % 2 == 1:
        try:
            return bytes.fromhex(code[1:]).decode("latin-1")
        except ValueError:
            return None
    return None


def escape(value: str, seps: Separators = DEFAULT_SEPARATORS) -> str:
    """Escape the separator characters in ``value`` so it can be written into a field."""
    esc = seps.escape
    if not any(c in value for c in (seps.field, seps.component, seps.repetition, esc, seps.subcomponent)):
        return value
    value = value.replace(esc, f"{esc}E{esc}")
    value = value.replace(seps.field, f"{esc}F{esc}")
    value = value.replace(seps.component, f"{esc}S{esc}")
    value = value.replace(seps.repetition, f"{esc}R{esc}")
    return value.replace(seps.subcomponent, f"{esc}T{esc}")


class Segment:
    """One segment. Fields are split on first access; ``fields[n]`` is field n (MSH too)."""

    __slots__ = ("line", "seps", "name", "_fields")

    def __init__(self, line: str, seps: Separators):
        self.line = line
        self.seps = seps
        self.name = line[:3]
        self._fields = None

    @property
    def fields(self) -> list[str]:
        """Raw field strings, indexed by field number (index 0 is the segment ID)."""
        if self._fields is None:
            parts = self.line.split(self.seps.field)
            if parts[0] == "MSH" or parts[0] in ("FHS", "BHS"):
                # MSH-1 is the field separator itself, so MSH-n sits at index n after inserting it.
                parts.insert(1, self.seps.field)
            self._fields = parts
        return self._fields

    def field(self, number: int) -> str:
        """The raw text of field ``number`` ('' when absent)."""
        fields = self.fields
        return fields[number] if number < len(fields) else ""

    def repetitions(self, number: int) -> list[str]:
        """The raw repetitions of a field (MSH-1 and MSH-2 never repeat)."""
        raw = self.field(number)
        if raw == "":
            return []
        if self.name in ("MSH", "FHS", "BHS") and number <= 2:
            return [raw]
        return raw.split(self.seps.repetition)

    def __repr__(self):
        return f"<Segment {self.name} ({len(self.fields) - 1} fields)>"


def component(raw: str, index: int, sep: str) -> str:
    """Part ``index`` (1-based) of ``raw`` split on ``sep``; '' when there is no such part."""
    parts = raw.split(sep)
    return parts[index - 1] if index - 1 < len(parts) else ""


class Message:
    """A parsed ER7 message: its separators and its segments, in order, Z-segments included."""

    __slots__ = ("text", "seps", "segments", "_by_name")

    def __init__(self, text: str, seps: Separators, segments: list[Segment]):
        self.text = text
        self.seps = seps
        self.segments = segments
        self._by_name = None

    def all(self, name: str) -> list[Segment]:
        """Every segment named ``name``, in order."""
        if self._by_name is None:
            index: dict[str, list[Segment]] = {}
            for seg in self.segments:
                index.setdefault(seg.name, []).append(seg)
            self._by_name = index
        return self._by_name.get(name, [])

    def segment(self, name: str, occurrence: int = 1) -> Segment | None:
        """The ``occurrence``-th segment named ``name`` (1-based), or None."""
        found = self.all(name)
        return found[occurrence - 1] if 0 < occurrence <= len(found) else None

    def raw_values(self, path: str | Path, current: Segment | None = None) -> list[str]:
        """Every raw (still escaped) value the path selects, in message order.

        A path without indexes selects the first segment and the first repetition; ``[*]`` selects
        them all: ``FT1[*]-2`` is the transaction ID of every FT1, ``PID-3[*].1`` every patient ID.
        With ``current`` (the segment a mapping is at), a path naming that segment's kind without
        an index reads that segment: ``FT1-2`` of the FT1 a ChargeItem is built from.
        """
        p = path if isinstance(path, Path) else parse_path(path)
        if current is not None and current.name == p.segment and p.segment_index is None and not p.every_segment:
            segments = [current]
        else:
            segments = self.all(p.segment)
        if p.segment_index is not None:
            segments = segments[p.segment_index - 1 : p.segment_index] if p.segment_index > 0 else []
        elif segments and not p.every_segment:
            segments = segments[:1]
        if p.field is None:
            return [seg.line for seg in segments]
        out = []
        seps = self.seps
        for seg in segments:
            reps = seg.repetitions(p.field)
            if p.every_repetition:
                chosen = reps
            else:
                idx = (p.repetition or 1) - 1
                chosen = reps[idx : idx + 1]
            for rep in chosen:
                if p.component is None:
                    out.append(rep)
                    continue
                value = component(rep, p.component, seps.component)
                if p.subcomponent is not None:
                    value = component(value, p.subcomponent, seps.subcomponent)
                out.append(value)
        return out

    def values(self, path: str | Path) -> list[str]:
        """Like ``raw_values`` but with escape sequences decoded; empty values are left out."""
        seps = self.seps
        return [unescape(v, seps) for v in self.raw_values(path) if v != ""]

    def value(self, path: str | Path, default: str = "") -> str:
        """The first non-empty decoded value the path selects, or ``default``."""
        for raw in self.raw_values(path):
            if raw != "":
                return unescape(raw, self.seps)
        return default

    def __getitem__(self, path: str) -> str:
        return self.value(path)

    def __repr__(self):
        return f"<Message {' '.join(s.name for s in self.segments)}>"


def split_segments(text: str) -> list[str]:
    """Split message text into segment lines, accepting CR, LF or CRLF and skipping blank lines."""
    lines = text.split("\r") if "\n" not in text else _LINE_BREAKS.split(text)
    return [line for line in lines if line and not line.isspace()]


def parse(text: str) -> Message:
    """Read one ER7 message. Raises ``ParseError`` with a location when it is not HL7 v2.

    Tolerant on purpose: blank lines, LF or CRLF segment ends, unknown and Z-segments are kept.
    Only what prevents reading the message at all is an error: no MSH first, unusable separators,
    or a segment whose ID is not three upper-case letters or digits.
    """
    lines = split_segments(text)
    if not lines:
        raise ParseError("message is empty", "segment 1")
    first = lines[0].lstrip("\x00\t ")
    if not first.startswith("MSH"):
        raise ParseError("message does not start with an MSH segment", "segment 1")
    lines[0] = first
    seps = Separators.from_msh(first)
    field_sep = seps.field
    segments = []
    for number, line in enumerate(lines, start=1):
        # A segment ID is three upper-case letters or digits, then the field separator or the end.
        if not (line[3:4] in (field_sep, "") and SEGMENT_ID.match(line[:3])):
            # The offending text is not quoted: a broken line may hold patient data.
            raise ParseError(f"segment {number} does not start with a valid segment ID", f"segment {number}")
        segments.append(Segment(line, seps))
    return Message(text, seps, segments)
