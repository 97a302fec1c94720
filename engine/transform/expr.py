"""The expression language of mappings and routes: HL7 paths, fallbacks, functions, conditions.

    SCH-11.4 | TQ1-7                 first non-empty of the two
    dateTime(AIS-4)                  HL7 DTM to FHIR dateTime, in the mapping's time zone
    map(MSH-9.2, 'siu-trigger-status')   a code looked up in mappings/codesystem/
    AIP-3.1                          inside $each: AIP[*], field 3 of the AIP at hand
    $                                the value the template is applied to
    $.2                              its component 2
    'booked'                         text
    PV1-2 != 'P'                     a condition (routes' where, mappings' $when)
    begins                           a named value of the resource mapping's $let

``$`` means one thing: the value a template is applied to (a datatype's field, a referenced
resource's ``$from``, one repetition of ``$each: PID-3[*]``). The segment a template is at (one
AIP of ``$each: AIP[*]``, the FT1 a ChargeItem is built from) is named with its own name:
``AIP-3`` there reads that AIP, ``AIP[1]-3`` always the first. The old ``$-3`` is refused.

Expressions are compiled once, when a file is loaded, into plain Python functions of a context;
nothing is parsed per message. Values are text with HL7 escapes decoded, or None when empty.

Functions tolerate the shapes real senders use (a unit in the duration's second component,
``minutes`` spelled out, two-digit years, ``Z`` offsets...) and say what they assumed with
``Context.warn``; what they cannot read raises ``DataError``, whose text names the HL7 field and
the value in words (never a Python exception's own text).
"""

from __future__ import annotations

import re
from functools import lru_cache
from urllib.parse import quote
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from decimal import Decimal, InvalidOperation
from typing import Callable
from zoneinfo import ZoneInfo

from ..hl7.er7 import Message, Segment, unescape
from ..errors import PathError
from ..hl7.paths import Path, parse_path
from ..stamps import stable_id


class ExpressionError(ValueError):
    """An expression that cannot be read; the text says where and how to fix it."""


class OldSegmentNotation(ExpressionError):
    """``$-3`` (field 3 of the current segment), the notation before ``$`` meant one thing."""

    def __init__(self, old: str, text: str):
        self.old = old
        super().__init__(f"{old!r} in {text!r} is the old notation for a field of the current segment")

    def new_form(self, segment: str | None = None) -> str:
        """How to write it now: the segment's own name (``SEG`` when the segment is not known)."""
        return f"{segment or 'SEG'}{self.old[1:]}"

    def hint(self, segment: str | None = None) -> str:
        where = f" (the {segment} at hand)" if segment else ", e.g. AIP-3 inside $each: AIP[*], FT1-7 in a ChargeItem"
        return (f"write {self.new_form(segment)}: a field of the current segment is named with the segment's "
                f"name{where}; $ always means the value the template is applied to")


class DataError(ValueError):
    """A value in the message that a function cannot read; the text says which and why, in words."""


class Sourced(str):
    """Text that remembers the HL7 field it was read from (``AIS-4``), so a later step can say so."""

    def __new__(cls, value: str, source: str):
        obj = super().__new__(cls, value)
        obj.source = source
        return obj


class Minutes(int):
    """A duration in minutes that remembers where it was read (``SCH-9``)."""

    def __new__(cls, value: int, source: str):
        obj = super().__new__(cls, value)
        obj.source = source
        return obj


def plain(value):
    """A value as it goes into FHIR JSON: ``Sourced`` and ``Minutes`` lose their memory."""
    kind = type(value)
    if kind is Sourced:
        return str(value)
    if kind is Minutes:
        return int(value)
    return value


class Lets:
    """The named values (``$let``) of one resource being built: each computed once, in order."""

    __slots__ = ("values",)

    def __init__(self, values: dict):
        self.values = values


@dataclass(slots=True)
class Context:
    """What an expression sees: the message, the current segment and field value, and helpers.

    ``groups`` is the message mapping's group structure (``Message.groups``); ``notes`` collects
    the warnings of one conversion (shared by every context derived from it); ``lets`` holds the
    named values of the resource being built; ``year`` is the year two-digit years are read near.
    """

    message: Message
    segment: Segment | None = None
    value: str | None = None  # a raw (escaped) field, repetition or component
    tz: ZoneInfo | timezone = timezone.utc
    tables: dict = field(default_factory=dict)  # code maps by name
    groups: dict | None = None
    notes: list = field(default_factory=list)
    lets: Lets | None = None
    year: int | None = None
    value_label: str | None = None  # the HL7 field ``value`` is (``FT1-11``), to name it in warnings
    # ``value`` split into components, as (value, components, whether it has escape sequences): a
    # datatype reads $.1, $.2, $.9.1... of one value. Kept with the value it was split from, so a
    # changed ``value`` is split again.
    components: tuple | None = field(default=None, init=False, repr=False, compare=False)

    def at(self, segment=None, value=None, label=None) -> "Context":
        return Context(self.message, segment if segment is not None else self.segment, value, self.tz, self.tables,
                       self.groups, self.notes, self.lets, self.year, label)

    def with_lets(self, lets: Lets | None) -> "Context":
        return Context(self.message, self.segment, self.value, self.tz, self.tables, self.groups, self.notes, lets,
                       self.year, self.value_label)

    def warn(self, text: str):
        """Record what was assumed to read a value (each text once per conversion)."""
        if text not in self.notes:
            self.notes.append(text)

    def var(self, name: str):
        return self.lets.values.get(name) if self.lets is not None else None

    def reference_year(self) -> int:
        """The year two-digit years are read near: the message's own (MSH-7), else this year."""
        if self.year is None:
            stamp = self.message.segments[0].field(7)[:4]
            year = int(stamp) if stamp.isdigit() else 0
            self.year = year if 1900 <= year <= 2200 else datetime.now(timezone.utc).year
        return self.year


# -- tokens --------------------------------------------------------------------------------------

_TOKEN = re.compile(
    r"""\s*(?:
        (?P<string>'(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*")
      | (?P<op>==|!=|\bnot\s+in\b|\bin\b|\bmatches\b|\bexists\b|\bmissing\b)
      | (?P<old>\$-\d+(?:\[(?:\d+|\*)\])?(?:\.\d+){0,2})
      | (?P<rel>\$(?:\.\d+){0,2})
      | (?P<path>[A-Z][A-Z0-9]{2}(?:\[(?:\d+|\*)\])?(?:-\d+(?:\[(?:\d+|\*)\])?(?:\.\d+){0,2})?)(?![\w(])
      | (?P<number>-?\d+(?:\.\d+)?)
      | (?P<name>[a-zA-Z_][a-zA-Z0-9_]*)
      | (?P<punct>[|(),\[\]])
    )""",
    re.VERBOSE,
)


def tokenize(text: str) -> list[tuple[str, str]]:
    tokens, pos = [], 0
    text = text.strip()
    while pos < len(text):
        match = _TOKEN.match(text, pos)
        if not match or match.end() == pos:
            raise ExpressionError(f"cannot read {text[pos:]!r} in {text!r}")
        kind = match.lastgroup
        if kind == "old":
            raise OldSegmentNotation(match.group(kind), text)
        tokens.append((kind, match.group(kind)))
        pos = match.end()
    return tokens


# -- values --------------------------------------------------------------------------------------

Getter = Callable[[Context], "str | None"]
RawGetter = Callable[[Context], list]


def _relative_parts(text: str) -> tuple[int, ...]:
    """The component (and sub-component) numbers of ``$``, ``$.2``, ``$.2.1``."""
    match = re.fullmatch(r"\$((?:\.\d+){0,2})", text)
    if not match:
        old = re.match(r"\$-\d+(?:\[(?:\d+|\*)\])?(?:\.\d+){0,2}", text)
        if old:
            raise OldSegmentNotation(old.group(0), text)
        raise ExpressionError(f"{text!r} is not a path of the current value; write $, $.2 or $.2.1")
    return tuple(int(p) for p in match.group(1).split(".")[1:]) if match.group(1) else ()


def _absolute_path(text: str) -> Path:
    try:
        return parse_path(text)
    except PathError as exc:
        raise ExpressionError(str(exc)) from None


def relative_raw(text: str) -> Callable[[Context], list[str]]:
    """``$``, ``$.2``, ``$.2.1``: the value the template is applied to, or its components."""
    first = relative_first(text, decode=False)

    def get(ctx: Context) -> list[str]:
        raw = first(ctx)
        return [raw] if raw is not None else []

    return get


def absolute_raw(text: str) -> Callable[[Context], list[str]]:
    """A path: ``SCH-1.1``; one without a segment index reads the current segment when it names
    that segment's kind (``AIP-3`` inside ``$each: AIP[*]``)."""
    path = _absolute_path(text)
    if path.field is not None and not path.every_segment and not path.every_repetition:
        # One segment, one repetition: at most one value.
        first = absolute_first(text, decode=False)

        def get(ctx: Context) -> list[str]:
            raw = first(ctx)
            return [raw] if raw is not None else []

        return get
    return lambda ctx: [v for v in ctx.message.raw_values(path, ctx.segment, ctx.groups) if v != ""]


# The first value of a path, compiled for its shape: what an expression reads most (``$.2``,
# ``AIP-3.1``) costs one closure call, without the lists and the general path walk of
# ``Message.raw_values``. Each gives the same as the first non-empty value of ``relative_raw`` /
# ``absolute_raw`` (decoded with ``decode``), or None.


def relative_first(text: str, decode: bool = True) -> Callable[[Context], "str | None"]:
    """The value ``$``, ``$.2`` or ``$.2.1`` reads (decoded with ``decode``), None when empty."""
    parts = _relative_parts(text)
    if not parts:
        if not decode:
            return lambda ctx: ctx.value or None

        def whole(ctx):
            raw = ctx.value
            if not raw:
                return None
            seps = ctx.message.seps
            return unescape(raw, seps) if seps.escape and seps.escape in raw else raw

        return whole
    number = parts[0]
    index = number - 1
    sub = parts[1] if len(parts) > 1 else None

    def part(ctx):
        # ``$.2``, the most read of all: a datatype's components, split once per value.
        raw = ctx.value
        if not raw:
            return None
        split = ctx.components
        if split is None or split[0] is not raw:
            split = _components(ctx, raw)
        pieces = split[1]
        if len(pieces) < number:
            return None
        raw = pieces[index]
        if sub is not None:
            pieces = raw.split(ctx.message.seps.subcomponent, sub)
            if len(pieces) < sub:
                return None
            raw = pieces[sub - 1]
        if not raw:
            return None
        if decode and split[2]:
            return unescape(raw, ctx.message.seps)
        return raw

    return part


def _components(ctx: Context, raw: str) -> tuple:
    """``ctx.components`` for ``raw``, its value: (raw, its components, whether it has escapes)."""
    seps = ctx.message.seps
    split = ctx.components = (raw, raw.split(seps.component), bool(seps.escape) and seps.escape in raw)
    return split


_UNREPEATED = ("MSH", "FHS", "BHS")  # their fields 1 and 2 are separators, never split


def absolute_first(text: str, decode: bool = True) -> Callable[[Context], "str | None"]:
    """The first non-empty value a path reads (decoded with ``decode``), or None."""
    path = _absolute_path(text)
    if path.field is None or path.every_segment or path.every_repetition:
        # Whole segments, or every occurrence: the general walk, first non-empty value.
        def walk(ctx):
            seps = ctx.message.seps
            for raw in ctx.message.raw_values(path, ctx.segment, ctx.groups):
                if raw != "":
                    return unescape(raw, seps) if decode else raw
            return None

        return walk
    kind, number, index = path.segment, path.field, path.segment_index
    repetition = path.repetition or 1
    split_repetitions = not (kind in _UNREPEATED and number <= 2)
    component_number, sub = path.component, path.subcomponent

    def first(ctx):
        segment = ctx.segment
        if index is not None:
            found = ctx.message.all(kind)
            if not 0 < index <= len(found):
                return None
            segment = found[index - 1]
        elif segment is None or segment.name != kind:
            found = ctx.message.scope(kind, segment, ctx.groups)
            if not found:
                return None
            segment = found[0]
        fields = segment.fields
        if number >= len(fields):
            return None
        raw = fields[number]
        if not raw:
            return None
        seps = ctx.message.seps
        if split_repetitions:
            pieces = raw.split(segment.seps.repetition, repetition)
            if len(pieces) < repetition:
                return None
            raw = pieces[repetition - 1]
        elif repetition != 1:
            return None
        if component_number is not None:
            pieces = raw.split(seps.component, component_number)
            if len(pieces) < component_number:
                return None
            raw = pieces[component_number - 1]
            if sub is not None:
                pieces = raw.split(seps.subcomponent, sub)
                if len(pieces) < sub:
                    return None
                raw = pieces[sub - 1]
        if not raw:
            return None
        if decode and seps.escape and seps.escape in raw:
            return unescape(raw, seps)
        return raw

    return first


def _presence(kind: str, text: str) -> Callable[[Context], "str | None"]:
    """The path's first raw value (``kind``: path or rel), or None when it has none."""
    return relative_first(text, decode=False) if kind == "rel" else absolute_first(text, decode=False)


def raw_selector(text: str) -> Callable[[Context], list[str]]:
    """A path (or ``a | b`` of paths) selecting raw values: for ``$each`` and ``$from``."""
    getters = []
    for part in text.split("|"):
        part = part.strip()
        if not part:
            raise ExpressionError(f"empty alternative in {text!r}")
        getters.append(relative_raw(part) if part.startswith("$") else absolute_raw(part))
    if len(getters) == 1:
        return getters[0]

    def select(ctx: Context) -> list[str]:
        for get in getters:
            values = get(ctx)
            if values:
                return values
        return []

    return select


# -- functions ------------------------------------------------------------------------------------

_DTM = re.compile(r"^(\d+)(?:\.(\d+))?(Z|[+-]\d{2}(?:\d{2})?)?$")
_DAYS = (31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)
DTM_FORMAT = "YYYY[MM[DD[HH[MM[SS[.S]]]]]][+/-ZZZZ]"


@dataclass(frozen=True)
class Dtm:
    """An HL7 date/time as read: its parts, how many digits it gave (4 to 14) and its offset."""

    year: int
    month: int | None
    day: int | None
    hour: int | None
    minute: int | None
    second: int | None
    microsecond: int
    offset: timedelta | None
    digits: int

    @property
    def has_time(self) -> bool:
        return self.hour is not None

    def moment(self, tz) -> datetime:
        """The instant (a time of day is needed); without an offset, in ``tz``."""
        zone = timezone(self.offset) if self.offset is not None else tz
        return datetime(self.year, self.month or 1, self.day or 1, self.hour or 0, self.minute or 0,
                        self.second or 0, self.microsecond, tzinfo=zone)

    def date_text(self) -> str:
        parts = [f"{self.year:04d}"] + [f"{p:02d}" for p in (self.month, self.day) if p is not None]
        return "-".join(parts)


def _check_parts(year, month, day, hour, minute, second) -> str | None:
    """What is out of range in a date/time, in words (None when it is a real date and time)."""
    if month is not None and not 1 <= month <= 12:
        return f"month {month:02d} is not 01 to 12"
    if day is not None:
        leap = year % 4 == 0 and (year % 100 != 0 or year % 400 == 0)
        last = 29 if month == 2 and leap else (28 if month == 2 else _DAYS[(month or 1) - 1])
        if not 1 <= day <= last:
            return f"day {day:02d} is not 01 to {last}"
    if hour is not None and not 0 <= hour <= 23:
        return f"hour {hour:02d} is not 00 to 23"
    if minute is not None and not 0 <= minute <= 59:
        return f"minute {minute:02d} is not 00 to 59"
    if second is not None and not 0 <= second <= 59:
        return f"second {second:02d} is not 00 to 59"
    return None


def _split(digits: str, year_digits: int) -> tuple:
    numbers = [int(digits[:year_digits])]
    rest = digits[year_digits:]
    numbers += [int(rest[i : i + 2]) for i in range(0, len(rest), 2)]
    return tuple(numbers + [None] * (6 - len(numbers)))


def read_dtm(value: str, year: int | None = None, warn=None, label: str | None = None) -> Dtm:
    """Read an HL7 DTM/DT/TS: ``YYYY[MM[DD[HH[MM[SS[.S...]]]]]][+/-ZZZZ]``.

    Tolerated, with a warning through ``warn``: ``Z`` for UTC; ``+HH`` offsets; fractions of more
    than six digits (cut to microseconds); two-digit years (``YYMMDD...``), read within 50 years of
    ``year`` (the message's own), when the value cannot be a four-digit year: its month, day or
    time would be out of range, or the year more than 50 years after ``year``. Anything else that
    is not a real date raises ``DataError`` saying what is wrong.
    """
    text = value.strip()
    where = f"{label} " if label else ""
    match = _DTM.match(text)
    if not match or len(match.group(1)) % 2 == 1 or not 4 <= len(match.group(1)) <= 14:
        raise DataError(f"{where}{value!r} is not an HL7 date/time ({DTM_FORMAT})")
    digits, fraction, zone = match.groups()
    if year is None:
        year = datetime.now(timezone.utc).year
    four = _split(digits, 4)
    problem = _check_parts(*four)
    if problem is None and four[0] <= year + 50:
        parts = four
    else:
        parts = None
        if 6 <= len(digits) <= 12:
            short = _split(digits, 2)
            full = (year // 100) * 100 + short[0]
            if full > year + 50:
                full -= 100
            elif full < year - 50:
                full += 100
            if _check_parts(full, *short[1:]) is None:
                parts = (full, *short[1:])
                if warn is not None:
                    warn(f"{where}{value!r} has a two-digit year: read as {full}")
        if parts is None:
            if problem is not None:
                raise DataError(f"{where}{value!r} is not a date/time: {problem}")
            raise DataError(f"{where}{value!r}: the year {four[0]} is more than 50 years after the message's "
                            f"({year}), and it is not a date with a two-digit year either")
    micro = 0
    if fraction:
        if parts[5] is None:
            raise DataError(f"{where}{value!r} is not an HL7 date/time ({DTM_FORMAT}): a fraction needs seconds")
        if len(fraction) > 6 and warn is not None:
            warn(f"{where}{value!r} has {len(fraction)} digits of fractional seconds: cut to microseconds")
        micro = int(fraction[:6].ljust(6, "0"))
    offset = None
    if zone:
        if zone == "Z":
            if warn is not None:
                warn(f"{where}{value!r} ends in Z: read as UTC (+0000)")
            offset = timedelta(0)
        else:
            sign = 1 if zone[0] == "+" else -1
            hours, minutes_ = int(zone[1:3]), int(zone[3:5] or 0)
            if len(zone) == 3 and warn is not None:
                warn(f"{where}{value!r} has an offset of hours only: read as {zone}00")
            if hours > 23 or minutes_ > 59:
                raise DataError(f"{where}{value!r} has the offset {zone}, which is not a time zone offset "
                                "(+/-HHMM, hours 00 to 23)")
            offset = sign * timedelta(hours=hours, minutes=minutes_)
    return Dtm(*parts, micro, offset, len(digits))


def field_label(ctx, label: str) -> str:
    """An argument's text as the HL7 field it reads: ``$.2`` inside a datatype built from FT1-11
    is FT1-11.2."""
    if label.startswith("$") and ctx.value_label:
        return ctx.value_label + label[1:]
    return label


@lru_cache(maxsize=1024)
def _read_dtm_cached(value: str, year: int, label: str | None):
    """read_dtm without side effects: (Dtm, warnings) or (None, what is wrong); appointment timing
    reads the same few values several times per message."""
    warnings = []
    try:
        return read_dtm(value, year, warnings.append, label), tuple(warnings)
    except DataError as exc:
        return None, str(exc)


def _dtm(ctx, value: str, label: str | None = None) -> Dtm:
    if ctx is None:
        return read_dtm(value, None, None, label or getattr(value, "source", None))
    dtm, notes = _read_dtm_cached(str(value), ctx.reference_year(), label or getattr(value, "source", None))
    if dtm is None:
        raise DataError(str(notes))
    for note in notes:
        ctx.warn(note)
    return dtm


def format_datetime(moment: datetime, tz) -> str:
    text = moment.isoformat(timespec="microseconds" if moment.microsecond else "seconds")
    return text.replace("+00:00", "Z") if moment.utcoffset() == timedelta(0) and tz is timezone.utc else text


class _Noting:
    """What reading a date/time needs of a context (the reference year, somewhere to warn), for
    ``_converted``: the warnings are kept with the result."""

    __slots__ = ("year", "notes")

    def __init__(self, year: int):
        self.year, self.notes = year, []

    def reference_year(self) -> int:
        return self.year

    def warn(self, text: str):
        if text not in self.notes:
            self.notes.append(text)


@lru_cache(maxsize=4096)
def _converted(convert, text: str, source: str | None, tz, utc: bool, year: int):
    """``convert`` (``_fhir_datetime``...) of a text read from ``source``: (FHIR text, warnings,
    None), or (None, warnings, what is wrong). A message reads the same few times (AIS-4 in every
    participant, the start in start, requestedPeriod and the extension); each is worked out once.
    ``utc`` is part of the key because UTC is written Z only for the ``timezone.utc`` object."""
    noting = _Noting(year)
    value = Sourced(text, source) if source is not None else text
    try:
        return convert(value, tz, noting), tuple(noting.notes), None
    except DataError as exc:
        return None, tuple(noting.notes), str(exc)


def _remembered(convert, value, tz, ctx):
    """``convert(value, tz, ctx)``, from ``_converted`` for text (warnings replayed into ``ctx``)."""
    kind = type(value)
    if ctx is None or (kind is not str and kind is not Sourced):
        return convert(value, tz, ctx)
    result, notes, error = _converted(convert, str(value), getattr(value, "source", None), tz, tz is timezone.utc,
                                      ctx.reference_year())
    for note in notes:
        ctx.warn(note)
    if error is not None:
        raise DataError(error)
    return result


def fhir_date(value: str, ctx=None) -> str:
    """HL7 date (or the date of a date/time) to FHIR date, keeping its precision."""
    return _remembered(_fhir_date, value, None, ctx)


def fhir_datetime(value: str, tz, ctx=None) -> str:
    """HL7 date/time to FHIR dateTime, keeping its precision; without an offset, in ``tz``."""
    return _remembered(_fhir_datetime, value, tz, ctx)


def fhir_instant(value: str, tz, ctx=None) -> str:
    """HL7 date/time to FHIR instant (a time of day is needed); without an offset, in ``tz``."""
    return _remembered(_fhir_instant, value, tz, ctx)


def _fhir_date(value, tz, ctx) -> str:
    return _dtm(ctx, value).date_text()


def _fhir_datetime(value, tz, ctx) -> str:
    dtm = _dtm(ctx, value)
    if not dtm.has_time:
        return dtm.date_text()
    return format_datetime(dtm.moment(tz), tz)


def _fhir_instant(value, tz, ctx) -> str:
    dtm = _dtm(ctx, value)
    if not dtm.has_time:
        where = f"{value.source} " if getattr(value, "source", None) else ""
        raise DataError(f"{where}{value!r} has no time of day; an instant needs one")
    moment = dtm.moment(tz)
    return moment.isoformat(timespec="microseconds" if moment.microsecond else "seconds")


def to_decimal(value: str, label: str | None = None):
    label = label or getattr(value, "source", None)
    text = value.strip()
    try:
        number = Decimal(text)
    except InvalidOperation:
        number = None
    if number is None or not number.is_finite():
        raise DataError(f"{label + ' ' if label else ''}{value!r} is not a number")
    return int(number) if number == number.to_integral_value() and "." not in text else float(number)


def to_integer(value: str, label: str | None = None) -> int:
    label = label or getattr(value, "source", None)
    number = to_decimal(value, label)
    if number != int(number):
        raise DataError(f"{label + ' ' if label else ''}{value!r} is not a whole number")
    return int(number)


# Duration units as senders spell them (ISO+/ANSI+ codes, UCUM, words), in minutes. Compared in
# lower case. 'm' is left out on purpose: see minutes().
_UNITS = {
    **dict.fromkeys(("s", "sec", "secs", "second", "seconds"), Decimal(1) / 60),
    **dict.fromkeys(("min", "mins", "minute", "minutes", "mn"), Decimal(1)),
    **dict.fromkeys(("h", "hr", "hrs", "hour", "hours"), Decimal(60)),
    **dict.fromkeys(("d", "day", "days"), Decimal(1440)),
    **dict.fromkeys(("wk", "week", "weeks"), Decimal(10080)),
}
MAX_MINUTES = 2147483647  # FHIR's positiveInt


def minutes(amount: str, unit: str | None, seps, warn, labels=("the duration", "its unit")) -> Minutes:
    """A duration (``SCH-9`` with its unit ``SCH-10``, or a CQ such as ``TQ1-13``) in whole minutes.

    Reads the unit from the unit field's first component (``min^minutes^ANS+``), else from the
    amount's second component (``30^MIN``, a CQ, or a sender that puts it there); any case and the
    usual spellings (``min``, ``minutes``, ``h``, ``hrs``, ``s``, ``d``, ``wk``). ``M`` and ``m`` are
    read as minutes with a warning (in UCUM ``m`` is a metre, and ``M`` may be a month); no unit at
    all means minutes, with a warning. A value that is not a number, or that no unit makes a fixed
    length of time (``mo``), raises ``DataError``.
    """
    amount_label, unit_label = labels
    number_text, _, carried = amount.partition(seps.component)
    carried = carried.split(seps.component)[0].split(seps.subcomponent)[0].strip()
    given = (unit or "").split(seps.component)[0].strip()
    if not given and carried:
        given = carried
        if unit_label is not None:
            warn(f"{amount_label} carries its unit in component 2 ({carried!r}); {unit_label} is empty")
    try:
        number = Decimal(number_text.strip())
    except InvalidOperation:
        number = None
    if number is None or not number.is_finite():
        raise DataError(f"{amount_label} duration {amount!r} is not a number")
    if number < 0:
        raise DataError(f"{amount_label} duration {amount!r} is negative")
    if not given:
        warn(f"{unit_label or amount_label + ' unit'} is empty: {amount_label} read as minutes")
        factor = Decimal(1)
    elif given in ("m", "M"):
        warn(f"{unit_label or amount_label} unit {given!r} read as minutes")
        factor = Decimal(1)
    else:
        factor = _UNITS.get(given.lower())
        if factor is None:
            raise DataError(f"{unit_label or amount_label} duration unit {given!r} is not a unit of time we know "
                            "(s, min, h, d, wk, or these spelled out)")
    value = max(1, int((number * factor).to_integral_value()))
    if value > MAX_MINUTES:
        raise DataError(f"{amount_label} duration {amount!r} is too long")
    return Minutes(value, amount_label)


def precise(ctx, labels, *values):
    """The most precise of the values, preferring the first: the first with a time of day, else the
    first with a date. A warning names where the time came from when an earlier value had only a
    date. The result remembers its field (``Sourced``)."""
    first_date = None
    for label, value in zip(labels, values):
        if value in (None, ""):
            continue
        source = getattr(value, "source", None) or label
        dtm = _dtm(ctx, value, source)
        if dtm.has_time:
            if first_date is not None:
                ctx.warn(f"{first_date[0]} has only a date ({first_date[1]!r}); the time of day comes from {source}")
            return Sourced(str(value), source)
        if first_date is None:
            first_date = (source, str(value))
    return Sourced(first_date[1], first_date[0]) if first_date else None


def later(ctx, start: str, length) -> str | None:
    """``start`` plus ``length`` minutes, as an HL7 date/time (with the offset it then has). Only
    for a start with a time of day; the warning says where both came from."""
    if start in (None, "") or length in (None, ""):
        return None
    dtm = _dtm(ctx, start)
    if not dtm.has_time:
        return None
    begin = dtm.moment(ctx.tz)
    try:
        moment = (begin.astimezone(timezone.utc) + timedelta(minutes=int(length))).astimezone(begin.tzinfo)
    except OverflowError:
        raise DataError(f"the duration ({int(length)} min) puts the end after the year 9999") from None
    offset = moment.utcoffset()
    sign = "-" if offset < timedelta(0) else "+"
    total = abs(int(offset.total_seconds())) // 60
    start_source = getattr(start, "source", None)
    length_source = getattr(length, "source", None)
    ctx.warn(f"end computed from the start{f' ({start_source})' if start_source else ''} and the duration"
             f"{f' ({length_source}: {int(length)} min)' if length_source else f' ({int(length)} min)'}")
    text = moment.strftime("%Y%m%d%H%M%S") + f"{sign}{total // 60:02d}{total % 60:02d}"
    return Sourced(text, "computed")


TIME_UNKNOWN = "https://hl7bridge.org/fhir/StructureDefinition/appointment-time-unknown"


def exact(ctx, start, end) -> bool:
    """Whether a start and an end are both known to the time of day."""
    if start in (None, "") or end in (None, ""):
        return False
    return _dtm(ctx, start).has_time and _dtm(ctx, end).has_time


def start_or_day(ctx, start, end):
    """The start as an instant when start and end are known to the time of day; otherwise the
    start of its day in the route's time zone (see ``time_unknown``)."""
    if start in (None, ""):
        return None
    if exact(ctx, start, end):
        return fhir_instant(start, ctx.tz, ctx)
    dtm = _dtm(ctx, start)
    source = getattr(start, "source", None) or "the start"
    if not dtm.has_time:
        ctx.warn(f"the start time is unknown: {source} has only a date ({dtm.date_text()}): start and end "
                 "cover the whole day, marked appointment-time-unknown, and the date is kept in requestedPeriod")
    else:
        ctx.warn(f"the end is unknown (no end time and no duration): start and end cover the day of the start "
                 f"({source}), marked appointment-time-unknown, and the start time is kept in requestedPeriod")
    day = datetime(dtm.year, dtm.month or 1, dtm.day or 1, tzinfo=ctx.tz)
    return day.isoformat(timespec="seconds")


def end_or_next_day(ctx, start, end):
    """The end as an instant when start and end are known to the time of day; otherwise the start
    of the day after the start's."""
    if start in (None, ""):
        return None
    if exact(ctx, start, end):
        return fhir_instant(end, ctx.tz, ctx)
    dtm = _dtm(ctx, start)
    day = datetime(dtm.year, dtm.month or 1, dtm.day or 1) + timedelta(days=1)
    return day.replace(tzinfo=ctx.tz).isoformat(timespec="seconds")


def time_unknown(ctx, start, end):
    """True when there is a start but start and end are not both known to the time of day."""
    if start in (None, ""):
        return None
    return None if exact(ctx, start, end) else True


def date_only(ctx, value):
    """The FHIR date of a value that has only a date; nothing for one with a time of day."""
    dtm = _dtm(ctx, value)
    return None if dtm.has_time else dtm.date_text()


# HL7 table 0205 (price type, CP.2): what belongs in CP.2, so anything else there is looked at.
PRICE_TYPES = frozenset({"AP", "DC", "IC", "PF", "TF", "TP", "UP"})


def currency(ctx, label: str, value):
    """A currency a sender put where the price type belongs (CP.2, ``100.00^USD``): three letters
    that are not an HL7 0205 price type are read as the ISO 4217 currency, with a warning."""
    code = str(value).strip()
    if len(code) == 3 and code.isalpha() and code.upper() not in PRICE_TYPES:
        ctx.warn(f"{label} {code!r} is a currency, not a price type (HL7 0205): read as the currency")
        return code.upper()
    return None


_NEEDS_NO_QUOTING = {}


_QUOTED: dict = {}  # (text, safe) -> quoted: route names, facilities, assigners repeat
_QUOTED_KEPT = 4096


def uri_quote(text: str, safe: str = "") -> str:
    """``urllib.parse.quote(text, safe=safe)``, without its encoding work for the text it leaves
    as it is (letters, digits, ``_.-~`` and ``safe``: most codes and identifiers), and remembered
    for text seen before."""
    key = (text, safe)
    quoted = _QUOTED.get(key)
    if quoted is not None:
        return quoted
    plain = _NEEDS_NO_QUOTING.get(safe)
    if plain is None:
        plain = _NEEDS_NO_QUOTING[safe] = re.compile(f"[A-Za-z0-9_.~{re.escape(safe)}-]*")
    quoted = text if plain.fullmatch(text) else quote(text, safe=safe)
    if len(_QUOTED) >= _QUOTED_KEPT:
        _QUOTED.clear()
    _QUOTED[key] = quoted
    return quoted


def identifier_system(namespace, universal_id, universal_id_type):
    """A URI for an HD assigning authority: urn:oid: for ISO OIDs, the URI itself, else a URN of its name."""
    uid_type = (universal_id_type or "").upper()
    if universal_id and uid_type == "ISO":
        return f"urn:oid:{universal_id}"
    if universal_id and uid_type in ("URI", "URL"):
        return universal_id
    if universal_id and uid_type == "UUID":
        return f"urn:uuid:{universal_id}"
    name = namespace or universal_id
    return f"urn:hl7bridge:assigner:{uri_quote(name)}" if name else None


def urn(kind: str, name) -> str | None:
    """``urn:hl7bridge:KIND:NAME`` with NAME percent-encoded, so spaces and the like keep it a URI."""
    if name in (None, ""):
        return None
    return f"urn:hl7bridge:{uri_quote(str(kind))}:{uri_quote(str(name).strip())}"


def notes(ctx, segments: list) -> list[str]:
    """The text of NTE segments: NTE-3 (its repetitions are lines), else NTE-2 when a sender put the
    text in the source-of-comment field (HL7 0105: L, P, O), with a warning."""
    found = []
    seps = ctx.message.seps
    for seg in segments:
        text = "\n".join(unescape(rep, seps) for rep in seg.repetitions(3) if rep)
        if not text:
            source = unescape(seg.field(2), seps).strip()
            if source and source.upper() not in ("L", "P", "O"):
                ctx.warn("NTE-2 (source of comment) holds text, not an HL7 0105 code: read as the comment")
                text = source
        if text.strip():
            found.append(text)
    return found


FUNCTIONS = {
    # name: (number of arguments, function of (ctx, *values)); None comes out when the first is empty
    "dateTime": (1, lambda ctx, v: fhir_datetime(v, ctx.tz, ctx)),
    "instant": (1, lambda ctx, v: fhir_instant(v, ctx.tz, ctx)),
    "date": (1, lambda ctx, v: fhir_date(v, ctx)),
    "decimal": (1, lambda ctx, v: to_decimal(v)),
    "integer": (1, lambda ctx, v: to_integer(v)),
    "upper": (1, lambda ctx, v: v.upper()),
    "lower": (1, lambda ctx, v: v.lower()),
    "negate": (1, lambda ctx, v: -to_decimal(v)),
    "later": (2, later),
    "startOrDay": (2, start_or_day),
    "endOrNextDay": (2, end_or_next_day),
    "timeUnknown": (2, time_unknown),
    "dateOnly": (1, date_only),
}


# -- compiling ------------------------------------------------------------------------------------


_PATHLIKE = re.compile(r"^(?:[A-Z][A-Z0-9]{2}[-\[]|\$)")
SPECIAL = ("map", "concat", "id", "system", "join", "words", "precise", "minutes", "urn", "notes", "currency")


class _Parser:
    def __init__(self, text: str, tables: set[str] | None, lets: set[str] | None = None):
        self.text = text
        self.tokens = tokenize(text)
        self.pos = 0
        self.tables = tables  # known code maps, to check map() at load time (None: do not check)
        self.lets = lets  # the $let names this expression may use (None: do not check)
        self.uses: set[str] = set()  # the $let names it uses

    def peek(self, offset=0):
        index = self.pos + offset
        return self.tokens[index] if index < len(self.tokens) else (None, None)

    def take(self, kind=None, value=None):
        token = self.peek()
        if token[0] is None or (kind and token[0] != kind) or (value and token[1] != value):
            expected = value or kind or "more"
            raise ExpressionError(f"expected {expected} at {self.rest()!r} in {self.text!r}")
        self.pos += 1
        return token

    def rest(self):
        return " ".join(t[1] for t in self.tokens[self.pos:]) or "the end"

    def expression(self) -> Getter:
        alternatives = [self.term()]
        while self.peek() == ("punct", "|"):
            self.take()
            alternatives.append(self.term())
        if len(alternatives) == 1:
            return alternatives[0]
        if len(alternatives) == 2:
            one, other = alternatives

            def either(ctx):
                value = one(ctx)
                if value is None or value == "":
                    value = other(ctx)
                    if value is None or value == "":
                        return None
                return value

            return either

        def first(ctx):
            for get in alternatives:
                value = get(ctx)
                if value not in (None, ""):
                    return value
            return None

        return first

    def term(self) -> Getter:
        kind, text = self.peek()
        if kind == "string":
            self.take()
            literal = bytes(text[1:-1], "utf-8").decode("unicode_escape")
            if len(literal) >= 2 and literal[0] == literal[-1] and literal[0] in "'\"":
                raise ExpressionError(f"{text} is quoted twice in {self.text!r}; inside an expression write {literal}")
            return lambda ctx: literal
        if kind == "number":
            self.take()
            number = to_decimal(text)
            return lambda ctx: number
        if kind in ("path", "rel"):
            self.take()
            return relative_first(text) if kind == "rel" else absolute_first(text)
        if kind == "name":
            if self.peek(1) == ("punct", "("):
                return self.call()
            self.take()
            if self.lets and text in self.lets:
                self.uses.add(text)
                return lambda ctx: ctx.var(text)
            defined = f" nor a name defined under $let ({', '.join(sorted(self.lets))})" if self.lets else ""
            raise ExpressionError(
                f"{text!r} is neither an HL7 path nor a function{defined}; text must be quoted: write '{text}'"
            )
        raise ExpressionError(f"expected a path, 'text', a number or a function at {self.rest()!r} in {self.text!r}")

    def call(self) -> Getter:
        _, name = self.take("name")
        self.take("punct", "(")
        args, labels = [], []
        if self.peek() != ("punct", ")"):
            while True:
                start = self.pos
                args.append(self.expression())
                labels.append(" ".join(t[1] for t in self.tokens[start:self.pos]))
                if self.peek() != ("punct", ","):
                    break
                self.take()
        self.take("punct", ")")
        if name == "precise":
            return self._precise(args, labels)
        if name == "minutes":
            return self._minutes(args, labels)
        if name == "notes":
            return self._notes(args)
        if name == "currency":
            if len(args) != 1:
                raise ExpressionError(f"currency() takes one value, in {self.text!r}")
            value_of, label = args[0], labels[0]

            def get_currency(ctx):
                value = value_of(ctx)
                return currency(ctx, field_label(ctx, label), value) if value not in (None, "") else None

            return get_currency
        if name == "urn":
            if len(args) != 2:
                raise ExpressionError(f"urn() takes a kind and a name, in {self.text!r}")
            kind_of, name_of = args
            return lambda ctx: urn(kind_of(ctx), name_of(ctx))
        if name == "map":
            return self._map(args)
        if name == "concat":
            return self._concat(args)
        if name == "join":
            return self._join(args)
        if name == "words":
            def words(ctx):
                found = []
                for get in args:
                    value = get(ctx)
                    if value is not None and value != "":
                        found.append(str(value))
                return " ".join(found) or None

            return words
        if name == "id":
            return lambda ctx: stable_id(*[str(a(ctx) or "") for a in args])
        if name == "system":
            if len(args) != 3:
                raise ExpressionError(f"system() takes namespace, universal ID and its type, in {self.text!r}")
            namespace_of, universal_id_of, type_of = args
            return lambda ctx: identifier_system(namespace_of(ctx), universal_id_of(ctx), type_of(ctx))
        if name not in FUNCTIONS:
            known = ", ".join(sorted([*FUNCTIONS, *SPECIAL]))
            raise ExpressionError(f"unknown function {name}() in {self.text!r}; known: {known}")
        arity, function = FUNCTIONS[name]
        if arity is not None and len(args) != arity:
            raise ExpressionError(f"{name}() takes {arity} argument(s), not {len(args)}, in {self.text!r}")

        first_label = labels[0] if labels and _PATHLIKE.match(labels[0]) else None
        if len(args) == 1:
            return self._apply_one(function, args[0], first_label)

        def apply(ctx):
            values = [a(ctx) for a in args]
            if values and values[0] in (None, ""):
                return None
            if first_label is not None and type(values[0]) is str:
                # The field it was read from, so a warning or an error can name it.
                values[0] = Sourced(values[0], field_label(ctx, first_label))
            return function(ctx, *values)

        return apply

    @staticmethod
    def _apply_one(function, argument, label) -> Getter:
        """A function of one value (``dateTime(AIS-4)``): what ``apply`` does, for one argument."""
        if label is None:
            def apply_one(ctx):
                value = argument(ctx)
                if value is None or value == "":
                    return None
                return function(ctx, value)

            return apply_one
        relative = label.startswith("$")

        def apply_sourced(ctx):
            value = argument(ctx)
            if value is None or value == "":
                return None
            if type(value) is str:
                # The field it was read from, so a warning or an error can name it.
                value = Sourced(value, ctx.value_label + label[1:] if relative and ctx.value_label else label)
            return function(ctx, value)

        return apply_sourced

    def _precise(self, args, labels) -> Getter:
        if not args:
            raise ExpressionError(f"precise() needs the date/times to choose from, in {self.text!r}")
        return lambda ctx: precise(ctx, labels, *(a(ctx) for a in args))

    def _minutes(self, args, labels) -> Getter:
        """minutes(SCH-9, SCH-10): a duration and its unit; minutes(TQ1-13): a CQ (amount^unit)."""
        if len(args) not in (1, 2):
            raise ExpressionError(f"minutes() takes a duration and its unit, or one quantity with its unit, in "
                                  f"{self.text!r}")
        amount_of = args[0]
        unit_of = args[1] if len(args) == 2 else None
        names = (labels[0], labels[1] if len(args) == 2 else None)

        def get(ctx):
            amount = amount_of(ctx)
            if amount in (None, ""):
                return None
            unit = unit_of(ctx) if unit_of is not None else None
            labels_here = tuple(field_label(ctx, n) if n else n for n in names)
            return minutes(str(amount), unit, ctx.message.seps, ctx.warn, labels_here)

        return get

    def _notes(self, args) -> Getter:
        """notes(' ', NTE[*]): the text of the NTE segments (of the segment at hand's group), joined."""
        path_token = self.tokens[self.pos - 2]
        if len(args) != 2 or path_token[0] != "path" or "-" in path_token[1]:
            raise ExpressionError(f"notes() takes a separator and segments such as NTE[*], in {self.text!r}")
        separator = args[0]
        path = parse_path(path_token[1])

        def get(ctx):
            found = notes(ctx, ctx.message.select(path, ctx.segment, ctx.groups))
            return str(separator(ctx) or "").join(found) or None

        return get

    def _map(self, args) -> Getter:
        if len(args) != 2:
            raise ExpressionError(f"map() takes a value and a table name, in {self.text!r}")
        table_token = self.tokens[self.pos - 2]
        if table_token[0] != "string":
            raise ExpressionError(f"map()'s table must be quoted text like 'filler-status', in {self.text!r}")
        table_name = table_token[1][1:-1]
        if self.tables is not None and table_name not in self.tables:
            raise ExpressionError(f"no code map {table_name!r} (mappings/codesystem/{table_name}.yaml)")
        value_of = args[0]

        def lookup(ctx):
            value = value_of(ctx)
            if value is None or value == "":
                return None
            return ctx.tables[table_name].lookup(value if type(value) is str else str(value))

        return lookup

    def _join(self, args) -> Getter:
        """join('; ', NTE[*]-3): every value of a [*] path, joined."""
        path_token = self.tokens[self.pos - 2]
        if len(args) != 2 or path_token[0] not in ("path", "rel"):
            raise ExpressionError(f"join() takes a separator and a path such as NTE[*]-3, in {self.text!r}")
        separator = args[0]
        select = relative_raw(path_token[1]) if path_token[0] == "rel" else absolute_raw(path_token[1])

        def join(ctx):
            values = [unescape(v, ctx.message.seps) for v in select(ctx)]
            return str(separator(ctx) or "").join(values) or None

        return join

    def _concat(self, args) -> Getter:
        if not args:
            raise ExpressionError(f"concat() needs arguments, in {self.text!r}")

        def join(ctx):
            parts = [a(ctx) for a in args]
            text = "".join(str(p) for p in parts if p not in (None, ""))
            return text or None

        return join

    def condition(self) -> Callable[[Context], bool]:
        path_kind, path_text = self.peek()
        if path_kind not in ("path", "rel") or self.peek(1)[0] != "op":
            path_kind = None  # not a path alone
        left = self.expression_for_condition()
        kind, op = self.peek()
        if kind != "op":
            raise ExpressionError(f"expected ==, !=, in, not in, matches, exists or missing after {self.text!r}")
        self.take()
        op = " ".join(op.split())
        if op in ("exists", "missing"):
            if path_kind is not None:
                # Whether a path has a value needs no decoding: a value is there, decoded or not.
                present = _presence(path_kind, path_text)
                if op == "exists":
                    return lambda ctx: present(ctx) is not None
                return lambda ctx: present(ctx) is None
            if op == "exists":
                return lambda ctx: bool(left(ctx))
            return lambda ctx: not left(ctx)
        if op in ("in", "not in"):
            wanted = self.literal_list()
            if op == "in":
                return lambda ctx: any(v in wanted for v in left(ctx))
            return lambda ctx: not any(v in wanted for v in left(ctx))
        right = self.comparand()
        if op == "matches":
            pattern_token = self.tokens[self.pos - 1]
            if pattern_token[0] != "string":
                raise ExpressionError(f"matches needs a quoted pattern, in {self.text!r}")
            try:
                pattern = re.compile(pattern_token[1][1:-1])
            except re.error as exc:
                raise ExpressionError(f"bad pattern in {self.text!r}: {exc}") from None
            return lambda ctx: any(pattern.search(v) for v in left(ctx))
        if op == "==":
            return lambda ctx: str(right(ctx) or "") in (left(ctx) or [""])
        return lambda ctx: str(right(ctx) or "") not in (left(ctx) or [""])

    def comparand(self) -> Getter:
        """The right side of ==, != or matches: an unquoted word is text (``PV1-2 == P``)."""
        kind, text = self.peek()
        bare_word = kind == "name" and self.peek(1) != ("punct", "(")
        if bare_word or (kind == "path" and "-" not in text):
            self.take()
            self.tokens[self.pos - 1] = ("string", f"'{text}'")
            return lambda ctx: text
        return self.expression()

    def literal_list(self) -> frozenset:
        """``[S12, 'S13', 2]``: inside a list every item is text, quoted or not."""
        self.take("punct", "[")
        items = []
        while True:
            kind, text = self.take()
            if kind == "string":
                items.append(bytes(text[1:-1], "utf-8").decode("unicode_escape"))
            elif kind in ("path", "name", "number"):
                items.append(text)
            else:
                raise ExpressionError(f"expected a value in the list at {text!r} in {self.text!r}")
            if self.peek() == ("punct", ","):
                self.take()
                continue
            self.take("punct", "]")
            return frozenset(items)

    def expression_for_condition(self):
        """The left side of a condition: every value it selects (for [*] paths), decoded."""
        kind, text = self.peek()
        if kind in ("path", "rel") and self.peek(1)[0] == "op":
            self.take()
            select = relative_raw(text) if kind == "rel" else absolute_raw(text)
            return lambda ctx: [unescape(v, ctx.message.seps) for v in select(ctx)]
        value = self.expression()
        return lambda ctx: [str(v)] if (v := value(ctx)) not in (None, "") else []

    def done(self):
        if self.pos != len(self.tokens):
            raise ExpressionError(f"unexpected {self.rest()!r} in {self.text!r}")


def compile_expression(text: str, tables: set[str] | None = None, lets: set[str] | None = None,
                       uses: set | None = None) -> Getter:
    """Compile an expression into a function of a ``Context``; raises ``ExpressionError``.

    ``lets``: the ``$let`` names it may use (``%name``); ``uses`` collects those it does use."""
    if not isinstance(text, str) or not text.strip():
        raise ExpressionError("an expression cannot be empty")
    parser = _Parser(text, tables, lets)
    getter = parser.expression()
    parser.done()
    if uses is not None:
        uses.update(parser.uses)
    return getter


def compile_condition(text: str, tables: set[str] | None = None, lets: set[str] | None = None) -> Callable[[Context], bool]:
    """Compile ``PATH OP VALUE`` (==, !=, in [..], not in [..], matches '..', exists, missing)."""
    if not isinstance(text, str) or not text.strip():
        raise ExpressionError("a condition cannot be empty")
    parser = _Parser(text, tables, lets)
    test = parser.condition()
    parser.done()
    return test
