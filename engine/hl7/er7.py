"""A fast, tolerant reader of HL7 v2 ER7 ("pipe and hat") messages.

Tolerant with a record: what real senders get wrong but can still be read (a short or long MSH-2,
LF or CRLF segment ends, a line break inside a field, blank lines, a byte-order mark or framing
bytes before MSH, lower-case or padded segment IDs) is read, and each repair is described in
``Message.warnings`` so the journal says what was done. What cannot be read raises ``ParseError``.
The same text always gives the same message and the same warnings: the converter reads the
journaled bytes again and must see what ingest saw.

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
# The segment IDs seen to be valid (at most 26 x 36 x 36 of them): most lines are checked by a lookup.
_VALID_IDS: set[str] = set()
_TERMINATORS = re.compile(r"(\r\n|\r|\n)")
# What may stand before MSH and is dropped: a byte-order mark, MLLP framing (VT, FS), NUL, whitespace.
_JUNK_BEFORE_MSH = "\ufeff\x0b\x1c\x00\t\r\n "
_JUNK_AFTER = "\x1c\x0b\x00"
XML_NOT_SUPPORTED = "HL7 v2 XML encoding is not supported: send ER7 (pipe-delimited)"


@dataclass(frozen=True)
class Separators:
    """The delimiters a message declares in MSH-1 and MSH-2.

    ``escape`` is '' when the sender left the escape character out of MSH-2 (``^~&``): then
    nothing is decoded. ``truncation`` is the fifth MSH-2 character of v2.7 and later (``#``),
    kept only so that MSH-2 can be echoed as sent; values are never split on it.
    """

    field: str = "|"
    component: str = "^"
    repetition: str = "~"
    escape: str = "\\"
    subcomponent: str = "&"
    truncation: str = ""

    @property
    def encoding_characters(self) -> str:
        """MSH-2 as the sender wrote it: component, repetition, escape, sub-component (truncation)."""
        return self.component + self.repetition + self.escape + self.subcomponent + self.truncation

    @classmethod
    def from_msh(cls, header_line: str) -> "Separators":
        """Read the separators from the first line of a message (``MSH|^~\\&|…``)."""
        return cls.read(header_line)[0]

    @classmethod
    def read(cls, header_line: str) -> tuple["Separators", list[str]]:
        """The separators of ``MSH|^~\\&|…`` and what was assumed to read them (warnings).

        MSH-2 is read by its length, as the senders that shorten it mean it:

        - 4 characters: the standard ``^~\\&``;
        - 5: v2.7's truncation character follows (``^~\\&#``); it is not a separator;
        - 3: one was left out. ``^~\\`` lost the sub-component character (``&`` is assumed);
          anything else, e.g. ``^~&``, lost the escape character: escape sequences are then not
          decoded, since the sender does not use them;
        - 2 or fewer: the defaults stand in for what is missing;
        - more than 5: the first four are used.
        """
        if len(header_line) < 4 or header_line[:3] not in ("MSH", "FHS", "BHS"):
            raise ParseError("message does not start with an MSH segment", "segment 1")
        field = header_line[3]
        if field.isalnum() or field in "\r\n ":
            raise ParseError(f"MSH-1 field separator {field!r} is not usable", "MSH-1")
        end = header_line.find(field, 4)
        encoding = header_line[4:end] if end >= 0 else header_line[4:]
        warnings = []
        truncation = ""
        if len(encoding) == 3:
            if encoding[2] == "\\":
                chars = [encoding[0], encoding[1], "\\", "&"]
                warnings.append(f"MSH-2 '{encoding}' has 3 encoding characters (the sub-component character left "
                                "out): '&' assumed")
            else:
                chars = [encoding[0], encoding[1], "", encoding[2]]
                warnings.append(f"MSH-2 '{encoding}' has 3 encoding characters (the escape character left out): "
                                f"read as component '{encoding[0]}', repetition '{encoding[1]}', sub-component "
                                f"'{encoding[2]}'; escape sequences are not decoded")
        elif len(encoding) < 3:
            defaults = "^~\\&"
            chars = list(encoding) + list(defaults[len(encoding):])
            warnings.append(f"MSH-2 '{encoding}' has {len(encoding)} encoding character{'' if len(encoding) == 1 else 's'}: "
                            f"'{defaults[len(encoding):]}' assumed for the rest")
        else:
            chars = list(encoding[:4])
            if len(encoding) == 5:
                truncation = encoding[4]
            elif len(encoding) > 5:
                warnings.append(f"MSH-2 has {len(encoding)} encoding characters: the first four are used")
        seps = cls(field, chars[0], chars[1], chars[2], chars[3], truncation)
        used = [seps.field, seps.component, seps.repetition, seps.subcomponent] + ([seps.escape] if seps.escape else [])
        if len(set(used)) < len(used):
            raise ParseError(f"MSH-2 encoding characters {encoding!r} repeat a separator", "MSH-2")
        return seps, warnings


DEFAULT_SEPARATORS = Separators()


def unescape(value: str, seps: Separators = DEFAULT_SEPARATORS) -> str:
    """Decode HL7 escape sequences in one leaf value.

    ``\\F\\ \\S\\ \\T\\ \\R\\ \\E\\`` become the separator characters, ``\\Xhh…\\`` becomes the
    characters of those bytes (read as Latin-1, so one byte is one character), ``\\.br\\`` a line
    break, and the highlighting escapes ``\\H\\ \\N\\`` are dropped. Anything unrecognised, and a
    lone escape character, is kept as it was, so nothing a sender wrote is lost.
    """
    esc = seps.escape
    if not esc or esc not in value:
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
    """Escape the separator characters in ``value`` so it can be written into a field.

    A sender whose MSH-2 has no escape character cannot read escapes: separators become spaces."""
    esc = seps.escape
    if not esc:
        for sep in (seps.field, seps.component, seps.repetition, seps.subcomponent):
            value = value.replace(sep, " ")
        return value
    if not any(c in value for c in (seps.field, seps.component, seps.repetition, esc, seps.subcomponent)):
        return value
    value = value.replace(esc, f"{esc}E{esc}")
    value = value.replace(seps.field, f"{esc}F{esc}")
    value = value.replace(seps.component, f"{esc}S{esc}")
    value = value.replace(seps.repetition, f"{esc}R{esc}")
    return value.replace(seps.subcomponent, f"{esc}T{esc}")


class Segment:
    """One segment. Fields are split on first access; ``fields[n]`` is field n (MSH too)."""

    __slots__ = ("line", "seps", "name", "position", "_fields")

    def __init__(self, line: str, seps: Separators, position: int = 0):
        self.line = line
        self.seps = seps
        self.name = line[:3]
        self.position = position  # its index in the message's segments
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
    """A parsed ER7 message: its separators and its segments, in order, Z-segments included.

    ``text`` is the text as received; ``warnings`` says what the reader repaired to read it (empty
    for a clean message); ``normalized`` is the message as the standard writes it (segments ended
    by CR, IDs repaired), for tools that are not as tolerant, such as structural validation.
    """

    __slots__ = ("text", "seps", "segments", "warnings", "_by_name", "_groups", "_scopes", "_header")

    def __init__(self, text: str, seps: Separators, segments: list[Segment], warnings: list[str] | None = None):
        self.text = text
        self.seps = seps
        self.segments = segments
        self.warnings = warnings or []
        self._by_name = None
        self._groups = None
        self._scopes = None  # (groups spec, {(kind, position): segments}): see ``scope``
        self._header = None  # its Header, kept by engine.hl7.header.read_header: read once

    @property
    def normalized(self) -> str:
        lines = [seg.line.replace("\n", " ") for seg in self.segments]
        if self.seps.escape == "" or self.seps.truncation:
            # Tools that read MSH-2 strictly get the four standard characters.
            f = self.seps.field
            head = lines[0].split(f, 2)
            head[1] = self.seps.component + self.seps.repetition + (self.seps.escape or "\\") + self.seps.subcomponent
            lines[0] = f.join(head)
        return "\r".join(lines) + "\r"

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

    def groups(self, spec: dict) -> list[tuple[int, int, frozenset]]:
        """The groups ``spec`` describes, as (head position, end position, member kinds).

        ``spec`` maps a head segment kind to the kinds that belong to it: ``{"RGS": {"AIS", "AIG",
        "AIL", "AIP", "NTE"}, "AIS": {"NTE"}}``. A head's group is the head and the run of member
        segments right after it: an RGS group ends at the next RGS, an AIS's notes at the first
        segment that is not an NTE. Computed once per message and spec.
        """
        if self._groups is not None and self._groups[0] is spec:
            return self._groups[1]
        found = []
        segments = self.segments
        count = len(segments)
        for head in segments:
            members = spec.get(head.name)
            if members is None:
                continue
            end = head.position + 1
            while end < count and segments[end].name in members:
                end += 1
            found.append((head.position, end, members))
        self._groups = (spec, found)
        return found

    def scope(self, name: str, current: Segment | None = None, groups: dict | None = None) -> list[Segment]:
        """Every segment named ``name`` as seen from ``current`` (see ``select``): with ``groups``,
        those of the innermost group around ``current`` that ``name`` is a member of, else all of
        them. Computed once per message, groups spec, kind and position: templates read the
        same kinds from the same segment again and again."""
        if not groups or current is None:
            return self.all(name)
        scopes = self._scopes
        if scopes is None or scopes[0] is not groups:
            scopes = self._scopes = (groups, {})
        key = (name, current.position)
        found = scopes[1].get(key)
        if found is None:
            segments = self.all(name)
            found = segments
            position = current.position
            for head, end, members in reversed(self.groups(groups)):
                if head <= position < end and name in members:
                    found = [seg for seg in segments if head < seg.position < end]
                    break
            scopes[1][key] = found
        return found

    def select(self, path: Path, current: Segment | None = None, groups: dict | None = None) -> list[Segment]:
        """The segments a path reads (see ``raw_values``).

        With ``groups`` (``Message.groups``), a path inside a segment's context reads the segments
        of the group that segment belongs to: from an AIP, ``AIS-4`` is the AIS of the AIP's own
        RGS group and ``NTE[*]`` the notes that follow the AIP. Kinds that are no member of any
        group around ``current`` are read from the whole message. A segment index (``AIS[2]``)
        counts in the whole message.
        """
        p = path
        index = p.segment_index
        if index is not None:
            return self.all(p.segment)[index - 1 : index] if index > 0 else []
        if current is not None and current.name == p.segment and not p.every_segment:
            return [current]
        segments = self.scope(p.segment, current, groups)
        if segments and not p.every_segment:
            return segments[:1]
        return segments

    def raw_values(self, path: str | Path, current: Segment | None = None, groups: dict | None = None) -> list[str]:
        """Every raw (still escaped) value the path selects, in message order.

        A path without indexes selects the first segment and the first repetition; ``[*]`` selects
        them all: ``FT1[*]-2`` is the transaction ID of every FT1, ``PID-3[*].1`` every patient ID.
        With ``current`` (the segment a mapping is at), a path naming that segment's kind without
        an index reads that segment: ``FT1-2`` of the FT1 a ChargeItem is built from; with
        ``groups`` too, other kinds are read from ``current``'s group (``select``).
        """
        p = path if isinstance(path, Path) else parse_path(path)
        segments = self.select(p, current, groups)
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
    """Split message text into segment lines (see ``read_lines``), skipping blank lines."""
    return read_lines(text)[0]


def looks_like_segment(text: str, field_sep: str | None) -> bool:
    """Whether a line starts like a segment: an ID (any case, maybe indented) and a field separator."""
    body = text.lstrip(" \t")
    if len(body) < 3 or not body[:3].isalnum() or not body[0].isalpha():
        return False
    rest = body[3:].lstrip(" ")
    return rest == "" or (rest[0] == field_sep if field_sep else not rest[0].isalnum())


def read_lines(text: str, field_sep: str | None = None) -> tuple[list[str], list[str]]:
    """Segment lines and what was assumed to find them (warnings).

    CR ends segments, as the standard says. Text without CR uses LF; CRLF is read as one end. In
    text that has CR, a lone LF ends a segment only when a segment starts after it (a sender mixing
    its line ends); otherwise it is a line break inside a field, kept. Blank and whitespace-only
    lines are skipped (a single end after the last segment is normal and not counted).
    """
    warnings = []
    if "\n" not in text:
        pieces = text.split("\r")
        kinds = {"CR"} if len(pieces) > 1 else set()
        joined_at = []
    elif "\r" not in text:
        pieces = text.split("\n")
        kinds = {"LF"}
        joined_at = []
    else:
        parts = _TERMINATORS.split(text)
        pieces, kinds, joined_at = [parts[0]], set(), []
        for index in range(1, len(parts), 2):
            end, after = parts[index], parts[index + 1]
            if end == "\n" and after.strip() and pieces[-1].strip() and not looks_like_segment(after, field_sep):
                pieces[-1] += "\n" + after  # a line break inside a field
                joined_at.append(len(pieces))
                continue
            kinds.add({"\r": "CR", "\n": "LF", "\r\n": "CRLF"}[end])
            pieces.append(after)
    blank = sum(1 for piece in pieces[:-1] if not piece.strip())
    lines = [piece for piece in pieces if piece.strip()]
    if kinds == {"LF"}:
        warnings.append("segments end with LF, not CR")
    elif kinds == {"CRLF"}:
        warnings.append("segments end with CRLF, not CR")
    elif len(kinds) > 1:
        warnings.append(f"mixed segment ends ({', '.join(sorted(kinds))}); each read as the end of a segment")
    if blank:
        warnings.append(f"{blank} empty segment{'s' if blank > 1 else ''} (blank lines) skipped")
    for number in sorted(set(joined_at)):
        position = sum(1 for piece in pieces[:number] if piece.strip())
        warnings.append(f"line break inside segment {position} kept as part of its field")
    return lines, warnings


def _strip_junk(text: str) -> tuple[str, list[str]]:
    """Drop what stands before MSH (and framing after the last segment), with a warning if it was
    more than line ends or spaces."""
    warnings = []
    start = len(text) - len(text.lstrip(_JUNK_BEFORE_MSH))
    junk = text[:start]
    if "\ufeff" in junk:
        warnings.append("byte-order mark before MSH removed")
    if any(c in junk for c in "\x0b\x1c\x00"):
        warnings.append("MLLP framing or NUL characters before MSH removed")
    if any(c in junk for c in "\r\n"):
        warnings.append("blank lines before MSH removed")
    text = text[start:]
    end = len(text.rstrip(_JUNK_AFTER + "\r\n\t "))
    if any(c in text[end:] for c in _JUNK_AFTER):
        warnings.append("MLLP framing or NUL characters after the last segment removed")
        text = text[:end]
    return text, warnings


def parse(text: str) -> Message:
    """Read one ER7 message. Raises ``ParseError`` with a location when it is not HL7 v2.

    Tolerant on purpose (each repair is listed in ``Message.warnings``): a byte-order mark, MLLP
    framing or NUL before MSH; a short or long MSH-2; LF, CRLF or mixed segment ends and line
    breaks inside fields; blank lines and lines of separators only; lower-case, indented or padded
    segment IDs. Unknown and Z-segments are kept. Only what prevents reading the message at all is
    an error: no MSH first (HL7 v2 XML is named as such), unusable separators, or a segment whose
    ID is not three letters or digits.
    """
    original = text
    text, warnings = _strip_junk(text)
    if not text:
        raise ParseError("message is empty", "segment 1")
    if text[:1] == "<":
        raise ParseError(XML_NOT_SUPPORTED, "segment 1")
    head = text[:3]
    if head.upper() == "MSH" and head != "MSH" and len(text) > 3:
        warnings.append(f"segment 1 ID {head!r} read as 'MSH'")
        text = "MSH" + text[3:]
    if not text.startswith("MSH"):
        raise ParseError("message does not start with an MSH segment", "segment 1")
    field_sep = text[3:4]
    lines, line_warnings = read_lines(text, field_sep)
    seps, sep_warnings = Separators.read(lines[0])
    warnings += sep_warnings + line_warnings
    only_separators = set(seps.encoding_characters + seps.field + " \t")
    segments = []
    skipped = 0
    for number, line in enumerate(lines, start=1):
        # A segment ID is three upper-case letters or digits, then the field separator or the end.
        if line[3:4] in (field_sep, "") and _is_segment_id(line[:3]):
            segments.append(Segment(line, seps, len(segments)))
            continue
        if set(line) <= only_separators:
            warnings.append(f"segment {number} has no segment ID (only separators): skipped")
            skipped += 1
            continue
        repaired = _repair_id(line, field_sep)
        if repaired is None:
            # The offending text is not quoted: a broken line may hold patient data.
            raise ParseError(f"segment {number} does not start with a valid segment ID", f"segment {number}")
        line, note = repaired
        warnings.append(f"segment {number} {note}")
        segments.append(Segment(line, seps, len(segments)))
    version = segments[0].field(12).split(seps.component)[0].strip() if seps.truncation else ""
    if seps.truncation and _version(version) < (2, 7):
        warnings.append(f"MSH-2 has a 5th character {seps.truncation!r} (the truncation character of HL7 v2.7 "
                        f"and later) in a v{version or '?'} message: ignored")
    return Message(original, seps, segments, warnings)


def _is_segment_id(text: str) -> bool:
    """Whether ``text`` is a segment ID (``SEGMENT_ID``), by a lookup for the IDs seen before."""
    if text in _VALID_IDS:
        return True
    if SEGMENT_ID.match(text):
        _VALID_IDS.add(text)
        return True
    return False


def _repair_id(line: str, field_sep: str) -> tuple[str, str] | None:
    """A segment whose ID is lower-case, indented or padded (``pid|``, `` PID|``, ``PID |``): the
    line with the ID as the standard writes it, and a note; None when it is not such a segment.
    (The note quotes the ID as sent: three letters, never patient data.)"""
    raw_id, sep, rest = line.partition(field_sep)
    segment_id = raw_id.strip(" \t").upper()
    if not SEGMENT_ID.match(segment_id):
        return None
    return segment_id + sep + rest, f"ID {raw_id!r} read as {segment_id!r}"


def _version(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split("."))
    except ValueError:
        return (0,)
