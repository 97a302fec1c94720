"""The expression language of mappings and routes: HL7 paths, fallbacks, functions, conditions.

    SCH-11.4 | TQ1-7                 first non-empty of the two
    dateTime(AIS-4)                  HL7 DTM to FHIR dateTime, in the mapping's time zone
    map(MSH-9.2, 'siu-trigger-status')   a code looked up in mappings/codesystem/
    AIP-3.1                          inside $each: AIP[*], field 3 of the AIP at hand
    $                                the value the template is applied to
    $.2                              its component 2
    'booked'                         text
    PV1-2 != 'P'                     a condition (routes' where, mappings' $when)

``$`` means one thing: the value a template is applied to (a datatype's field, a referenced
resource's ``$from``, one repetition of ``$each: PID-3[*]``). The segment a template is at (one
AIP of ``$each: AIP[*]``, the FT1 a ChargeItem is built from) is named with its own name:
``AIP-3`` there reads that AIP, ``AIP[1]-3`` always the first. The old ``$-3`` is refused.

Expressions are compiled once, when a file is loaded, into plain Python functions of a context;
nothing is parsed per message. Values are text with HL7 escapes decoded, or None when empty.
"""

from __future__ import annotations

import re
from urllib.parse import quote
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from decimal import Decimal, InvalidOperation
from typing import Callable
from zoneinfo import ZoneInfo

from ..hl7.er7 import Message, Segment, component, unescape
from ..errors import PathError
from ..hl7.paths import parse_path
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


@dataclass
class Context:
    """What an expression sees: the message, the current segment and field value, and helpers."""

    message: Message
    segment: Segment | None = None
    value: str | None = None  # a raw (escaped) field, repetition or component
    tz: ZoneInfo | timezone = timezone.utc
    tables: dict = field(default_factory=dict)  # code maps by name

    def at(self, segment=None, value=None) -> "Context":
        return Context(self.message, segment if segment is not None else self.segment, value, self.tz, self.tables)


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


def relative_raw(text: str) -> Callable[[Context], list[str]]:
    """``$``, ``$.2``, ``$.2.1``: the value the template is applied to, or its components."""
    match = re.fullmatch(r"\$((?:\.\d+){0,2})", text)
    if not match:
        old = re.match(r"\$-\d+(?:\[(?:\d+|\*)\])?(?:\.\d+){0,2}", text)
        if old:
            raise OldSegmentNotation(old.group(0), text)
        raise ExpressionError(f"{text!r} is not a path of the current value; write $, $.2 or $.2.1")
    parts = [int(p) for p in match.group(1).split(".")[1:]] if match.group(1) else []

    def get(ctx: Context) -> list[str]:
        raw = ctx.value or ""
        if parts:
            seps = ctx.message.seps
            raw = component(raw, parts[0], seps.component)
            if len(parts) > 1:
                raw = component(raw, parts[1], seps.subcomponent)
        return [raw] if raw != "" else []

    return get


def absolute_raw(text: str) -> Callable[[Context], list[str]]:
    """A path: ``SCH-1.1``; one without a segment index reads the current segment when it names
    that segment's kind (``AIP-3`` inside ``$each: AIP[*]``)."""
    try:
        path = parse_path(text)
    except PathError as exc:
        raise ExpressionError(str(exc)) from None
    return lambda ctx: [v for v in ctx.message.raw_values(path, ctx.segment) if v != ""]


def raw_selector(text: str) -> Callable[[Context], list[str]]:
    """A path (or ``a | b`` of paths) selecting raw values: for ``$each`` and ``$from``."""
    getters = []
    for part in text.split("|"):
        part = part.strip()
        if not part:
            raise ExpressionError(f"empty alternative in {text!r}")
        getters.append(relative_raw(part) if part.startswith("$") else absolute_raw(part))

    def select(ctx: Context) -> list[str]:
        for get in getters:
            values = get(ctx)
            if values:
                return values
        return []

    return select


# -- functions ------------------------------------------------------------------------------------

_DTM = re.compile(r"^(\d{4})(\d{2})?(\d{2})?(\d{2})?(\d{2})?(\d{2})?(?:\.(\d{1,6}))?([+-]\d{4})?$")


def parse_dtm(value: str, tz) -> tuple[datetime | None, int, str]:
    """An HL7 DTM as (datetime or None, precision in digits, original offset text)."""
    match = _DTM.match(value.strip())
    if not match:
        raise ValueError(f"{value!r} is not an HL7 date/time (YYYYMMDDHHMMSS[.S][+ZZZZ])")
    year, month, day, hour, minute, second, fraction, offset = match.groups()
    precision = len(value.split(".")[0].split("+")[0].split("-")[0])
    if hour is None:
        return None, precision, offset or ""
    if offset:
        sign = 1 if offset[0] == "+" else -1
        zone = timezone(sign * timedelta(hours=int(offset[1:3]), minutes=int(offset[3:5])))
    else:
        zone = tz
    moment = datetime(
        int(year), int(month or 1), int(day or 1), int(hour), int(minute or 0), int(second or 0),
        int((fraction or "0").ljust(6, "0")), tzinfo=zone,
    )
    return moment, precision, offset or ""


def fhir_date(value: str) -> str:
    digits = value.strip()[:8]
    if not re.fullmatch(r"\d{4}(\d{2}(\d{2})?)?", digits):
        raise ValueError(f"{value!r} is not an HL7 date (YYYY[MM[DD]])")
    parts = [digits[:4], digits[4:6], digits[6:8]]
    return "-".join(p for p in parts if p)


def fhir_datetime(value: str, tz) -> str:
    moment, precision, _ = parse_dtm(value, tz)
    if moment is None:
        return fhir_date(value)
    text = moment.isoformat(timespec="microseconds" if moment.microsecond else "seconds")
    return text.replace("+00:00", "Z") if moment.utcoffset() == timedelta(0) and tz is timezone.utc else text


def fhir_instant(value: str, tz) -> str:
    moment, _, _ = parse_dtm(value, tz)
    if moment is None:
        raise ValueError(f"{value!r} has no time of day; an instant needs one")
    return moment.isoformat(timespec="microseconds" if moment.microsecond else "seconds")


def to_decimal(value: str):
    try:
        number = Decimal(value.strip())
    except InvalidOperation:
        raise ValueError(f"{value!r} is not a number") from None
    return int(number) if number == number.to_integral_value() and "." not in value else float(number)


_MINUTES = {"s": 1 / 60, "sec": 1 / 60, "min": 1, "m": 1, "h": 60, "hr": 60, "hour": 60, "d": 1440, "day": 1440}


def minutes(amount: str, unit: str | None):
    """SCH-9 duration with SCH-10 units (ANSI+/ISO: s, min, h, d) in whole minutes."""
    factor = _MINUTES.get((unit or "min").strip().lower())
    if factor is None:
        raise ValueError(f"duration unit {unit!r} is not s, min, h or d")
    value = Decimal(amount.strip()) * Decimal(str(factor))
    return max(1, int(value.to_integral_value()))


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
    return f"urn:hl7bridge:assigner:{quote(name, safe='')}" if name else None


FUNCTIONS = {
    # name: (number of arguments, function of (ctx, *values)); None comes out when the first is empty
    "dateTime": (1, lambda ctx, v: fhir_datetime(v, ctx.tz)),
    "instant": (1, lambda ctx, v: fhir_instant(v, ctx.tz)),
    "date": (1, lambda ctx, v: fhir_date(v)),
    "decimal": (1, lambda ctx, v: to_decimal(v)),
    "integer": (1, lambda ctx, v: int(Decimal(v.strip()))),
    "upper": (1, lambda ctx, v: v.upper()),
    "lower": (1, lambda ctx, v: v.lower()),
    "minutes": (2, lambda ctx, amount, unit: minutes(amount, unit)),
    "negate": (1, lambda ctx, v: -to_decimal(v)),
}


# -- compiling ------------------------------------------------------------------------------------


class _Parser:
    def __init__(self, text: str, tables: set[str] | None):
        self.text = text
        self.tokens = tokenize(text)
        self.pos = 0
        self.tables = tables  # known code maps, to check map() at load time (None: do not check)

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
            select = relative_raw(text) if kind == "rel" else absolute_raw(text)

            def value(ctx):
                values = select(ctx)
                return unescape(values[0], ctx.message.seps) if values else None

            return value
        if kind == "name":
            if self.peek(1) != ("punct", "("):
                raise ExpressionError(
                    f"{text!r} is neither an HL7 path nor a function; text must be quoted: write '{text}'"
                )
            return self.call()
        raise ExpressionError(f"expected a path, 'text', a number or a function at {self.rest()!r} in {self.text!r}")

    def call(self) -> Getter:
        _, name = self.take("name")
        self.take("punct", "(")
        args = []
        if self.peek() != ("punct", ")"):
            args.append(self.expression())
            while self.peek() == ("punct", ","):
                self.take()
                args.append(self.expression())
        self.take("punct", ")")
        if name == "map":
            return self._map(args)
        if name == "concat":
            return self._concat(args)
        if name == "join":
            return self._join(args)
        if name == "words":
            return lambda ctx: " ".join(str(v) for a in args if (v := a(ctx)) not in (None, "")) or None
        if name == "id":
            return lambda ctx: stable_id(*(str(a(ctx) or "") for a in args))
        if name == "system":
            if len(args) != 3:
                raise ExpressionError(f"system() takes namespace, universal ID and its type, in {self.text!r}")
            return lambda ctx: identifier_system(*(a(ctx) for a in args))
        if name not in FUNCTIONS:
            known = ", ".join(sorted([*FUNCTIONS, "map", "concat", "id", "system", "join", "words"]))
            raise ExpressionError(f"unknown function {name}() in {self.text!r}; known: {known}")
        arity, function = FUNCTIONS[name]
        if arity is not None and len(args) != arity:
            raise ExpressionError(f"{name}() takes {arity} argument(s), not {len(args)}, in {self.text!r}")

        def apply(ctx):
            values = [a(ctx) for a in args]
            if values and values[0] in (None, ""):
                return None
            return function(ctx, *values)

        return apply

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
            if value in (None, ""):
                return None
            return ctx.tables[table_name].lookup(str(value))

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
        left = self.expression_for_condition()
        kind, op = self.peek()
        if kind != "op":
            raise ExpressionError(f"expected ==, !=, in, not in, matches, exists or missing after {self.text!r}")
        self.take()
        op = " ".join(op.split())
        if op == "exists":
            return lambda ctx: bool(left(ctx))
        if op == "missing":
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


def compile_expression(text: str, tables: set[str] | None = None) -> Getter:
    """Compile an expression into a function of a ``Context``; raises ``ExpressionError``."""
    if not isinstance(text, str) or not text.strip():
        raise ExpressionError("an expression cannot be empty")
    parser = _Parser(text, tables)
    getter = parser.expression()
    parser.done()
    return getter


def compile_condition(text: str, tables: set[str] | None = None) -> Callable[[Context], bool]:
    """Compile ``PATH OP VALUE`` (==, !=, in [..], not in [..], matches '..', exists, missing)."""
    if not isinstance(text, str) or not text.strip():
        raise ExpressionError("a condition cannot be empty")
    parser = _Parser(text, tables)
    test = parser.condition()
    parser.done()
    return test
