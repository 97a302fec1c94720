"""Mapping templates: YAML that looks like the FHIR JSON it produces, compiled once at load time.

A template is a YAML value:

- quoted text is text, taken as it is: ``'booked'``, ``"http://terminology.hl7.org/CodeSystem/v2-0203"``;
- unquoted text is an expression (``engine.transform.expr``): ``SCH-1.1``, ``dateTime(AIS-4)``,
  ``map(SCH-25.1, 'filler-status') | 'booked'``;
- a number or true/false is itself;
- a list gives a FHIR array (items that come out empty are dropped; ``$each`` items are spread);
- a mapping gives a FHIR object (elements that come out empty are dropped; an object with
  nothing in it is dropped too), and may carry directives, the keys that start with ``$``:

  ``$each: SEL``        one object per value (or segment) the selector picks: ``AIP[*]`` (inside,
                        ``AIP-3`` is field 3 of the AIP at hand), ``PID-3[*]`` (inside, ``$`` is
                        the repetition at hand)
  ``$when: CONDITION``  the object only when the condition holds: ``PV1-2 != P``
  ``$datatype: NAME``   the object is ``mappings/datatype/NAME.yaml`` applied to ``$from``
  ``$reference: TYPE``  a reference to a ``TYPE`` resource built from ``$from``
                        with ``mappings/resource/TYPE.yaml`` and added to the Bundle
  ``$from: SEL``        the field (or component) the datatype or resource is built from; inside
                        that template it is ``$``
  ``$const: VALUE``     a value taken as it is (any YAML: a number, a list, an object)
  ``$value: EXPR``      with ``$when``: one value (not an object), only when the condition holds

Other keys next to ``$datatype`` or ``$reference`` are added to (or override) what they give.

Refused at load, with the new way to write it: text quoted twice (``"'booked'"``, from before a
quoted value was text), quoted text that reads as an expression (``"SCH-1.1"``: drop the quotes),
and ``$-3`` (now the segment's own name, ``AIP-3``).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConfigError
from ..yamlconf import Quoted
from .expr import (
    Context,
    DataError,
    ExpressionError,
    OldSegmentNotation,
    compile_condition,
    compile_expression,
    plain,
    raw_selector,
    tokenize,
)

DIRECTIVES = {"$each", "$when", "$datatype", "$reference", "$from", "$const", "$value"}


@dataclass
class Origin:
    """Where a template node came from, for error messages: file, line and the expression."""

    path: str
    line: int
    source: str

    def __str__(self):
        return f"{self.path}:{self.line} ({self.source})"


# Values that count as nothing in FHIR JSON when they are empty (False and 0 are values).
_EMPTY = {str: True, dict: True, list: True}
_CONTAINERS = (dict, list)


class Node:
    origin: Origin
    spreads = False  # an $each object: its items join the list it is in

    def children(self) -> list:
        """The nodes directly under this one: list items, elements, a ``$value``."""
        found = list(getattr(self, "items", None) or []) + [c for _, c in getattr(self, "fields", None) or []]
        value = getattr(self, "value", None)
        if isinstance(value, Node):
            found.append(value)
        return found

    def nodes(self, datatypes: dict, seen: frozenset = frozenset()):
        """This node and every node under it, through the datatype mappings it uses."""
        yield self
        name = getattr(self, "datatype", None)
        if name is not None and name in datatypes and name not in seen:
            yield from datatypes[name].nodes(datatypes, seen | {name})
        for child in self.children():
            yield from child.nodes(datatypes, seen)

    def texts_read(self, datatypes: dict):
        """Every expression, condition and selector text of this node and what it holds (the
        datatype mappings it uses included), to tell which segments it reads."""
        for node in self.nodes(datatypes):
            if isinstance(node, Expr):
                yield node.text
            yield from getattr(node, "texts", ())

    def build(self, ctx: Context, out: "Output", where: tuple):
        raise NotImplementedError


class Const(Node):
    def __init__(self, value, origin):
        self.value, self.origin = value, origin

    def build(self, ctx, out, where):
        return self.value


class Expr(Node):
    def __init__(self, getter, origin, uses=(), text: str | None = None):
        self.getter, self.origin = getter, origin
        self.uses = tuple(sorted(uses))  # the $let names it reads
        self.text = text if text is not None else origin.source  # the expression as written

    def build(self, ctx, out, where):
        return plain(self.evaluate(ctx, out, where))

    def evaluate(self, ctx, out, where):
        """The value as computed (a ``$let`` keeps where it was read), None when it fails (the
        failure is recorded in ``out``)."""
        try:
            value = self.getter(ctx)
        except DataError as exc:
            out.fail(where, self.origin, str(exc))
            return None
        except (ValueError, ArithmeticError, TypeError, OverflowError):
            # Not one of our worded errors: never show Python's own text (it names classes).
            out.fail(where, self.origin, "a value in the message could not be read for this element")
            return None
        if value is not None and out.tracking:
            out.note(where, self.origin)
        return value


class Array(Node):
    def __init__(self, items, origin):
        self.items, self.origin = items, origin

    def build(self, ctx, out, where):
        result = []
        for item in self.items:
            value = item.build(ctx, out, (where, len(result)))
            if item.spreads:
                for v in value or ():
                    if v is not None and (v or type(v) not in _CONTAINERS) and not (type(v) is dict and v in result):
                        result.append(v)
            elif value is not None and (value or not _EMPTY.get(type(value), False)) and \
                    not (type(value) is dict and value in result):
                # An object equal to one already there says nothing new (the same room in every
                # resource group); equal texts are kept (a given name may repeat as a middle name).
                result.append(value)
        return result or None


class Obj(Node):
    """An object template, with optional $each, $when, $datatype or $reference."""

    def __init__(self, fields, origin, each=None, when=None, datatype=None, reference=None, source=None):
        self.fields = fields  # [(key, Node)]
        self.origin = origin
        self.each = each  # raw selector
        self.when = when  # condition
        self.datatype = datatype  # name, resolved at build time through the mapping set
        self.reference = reference  # resource type name
        self.source = source  # raw selector for $from
        self.source_text = None  # the $from as written, to explain where a value comes from
        self.each_text = None  # the $each as written (the field each value is)
        self.value = None  # $value: the node of an object that gives one value (with $when)
        self.texts: tuple = ()  # its $each, $when and $from as written (what they read)

    @property
    def simple(self) -> bool:
        """Only elements: built without the checks for directives."""
        return self.when is None and self.value is None and self.datatype is None and self.reference is None

    def build(self, ctx, out, where):
        if self.each is None:
            if self.simple:
                return self._fields(ctx, out, where)
            return self._one(ctx, out, where)
        results = []
        for item in self.each(ctx):
            item_ctx = item if isinstance(item, Context) else ctx.at(value=item, label=self.each_text)
            value = self._one(item_ctx, out, where)
            if value not in (None, {}, []):
                results.append(value)
        return results

    def _label(self, ctx) -> str | None:
        """The HL7 field the value built from is: ``$from`` as written (``$.2`` inside another
        value is that value's field)."""
        text = self.source_text
        if not isinstance(text, str):
            return ctx.value_label
        if text.startswith("$"):
            return ctx.value_label + text[1:] if ctx.value_label else None
        return text

    @property
    def spreads(self):
        return self.each is not None

    def _fields(self, ctx, out, where):
        """An object that is only its elements (no $when, $value, $datatype, $reference)."""
        result = {}
        for key, node in self.fields:
            value = node.build(ctx, out, (where, key))
            if value is not None and (value or not _EMPTY.get(type(value), False)):
                result[key] = value
        return result or None

    def _one(self, ctx, out, where):
        if self.when is not None:
            try:
                holds = self.when(ctx)
            except DataError as exc:
                out.fail(where, self.origin, str(exc))
                return None
            if not holds:
                return None
        if self.value is not None:
            return self.value.build(ctx, out, where)
        base = {}
        if self.datatype is not None or self.reference is not None:
            values = self.source(ctx) if self.source is not None else ([ctx.value] if ctx.value else [])
            if not values:
                return None
            inner = values[0] if isinstance(values[0], Context) else ctx.at(value=values[0], label=self._label(ctx))
            if self.datatype is not None:
                base = out.mappings.datatype(self.datatype).build(inner, out, where) or {}
                if not base:
                    return None
            else:
                base = out.reference(self.reference, inner, self.origin)
                if base is None:
                    return None
        result = dict(base) if base else {}
        for key, node in self.fields:
            value = node.build(ctx, out, (where, key))
            if value is not None and (value or not _EMPTY.get(type(value), False)):
                result[key] = value
        return result or None


class Output:
    """What a build collects besides the value: provenance, errors, referenced resources."""

    def __init__(self, mappings, converter, tracking: bool = False):
        self.mappings = mappings
        self.converter = converter
        # Recording where each value came from costs time on every value; it is only needed to
        # explain a validation error, so a conversion that fails validation is built again with it.
        self.tracking = tracking
        self.origins: dict[tuple, Origin] = {}
        self.errors: list[str] = []

    def note(self, where, origin):
        self.origins[element_path(where)] = origin

    def origin_of(self, location: tuple) -> Origin | None:
        """The template node that produced the FHIR element at ``location`` (element names and
        list indexes, flat) or its nearest parent."""
        key = tuple(str(part) for part in location if not isinstance(part, int))
        while key:
            if key in self.origins:
                return self.origins[key]
            key = key[:-1]
        return None

    def fail(self, where, origin, message):
        self.errors.append(f"{'.'.join(element_path(where)) or '(resource)'}: {message} (from {origin})")

    def reference(self, resource_type, ctx, origin):
        return self.converter.referenced(resource_type, ctx, self, origin)


def element_path(where) -> tuple:
    """A FHIR element path without array indexes: ('Appointment', 'participant', 'status'), from
    the ``where`` a build passes down: pairs (parent, key), a list index as the key, the resource
    type at the root (``(None, 'Appointment')``). Pairs cost less than copying the whole path at
    every element, and the flat path is only needed when something went wrong (or is tracked)."""
    parts = []
    while where is not None:
        where, part = where
        if not isinstance(part, int):
            parts.append(str(part))
    return tuple(reversed(parts))


def compile_template(value, path, line, tables: set[str], what: str, segment: str | None = None,
                     lets: frozenset = frozenset()) -> Node:
    """Compile a YAML template value into nodes; raises ``ConfigError`` with file and line.

    ``segment`` is the kind of segment the template is at, when known (inside ``$each: AIP[*]``),
    to say exactly how an old ``$-3`` is written now. ``lets`` are the ``$let`` names it may use."""
    line = getattr(value, "line", line)
    origin = Origin(str(path), line, what)
    if isinstance(value, bool) or isinstance(value, (int, float)):
        return Const(value, origin)
    if value is None:
        raise ConfigError(f"{what}: empty value", path, line, "remove the key or give it an expression")
    if isinstance(value, Quoted):
        return _text(value, path, line, what)
    if isinstance(value, str):
        uses = set()
        try:
            return Expr(compile_expression(value, tables, lets, uses), Origin(str(path), line, value), uses)
        except ExpressionError as exc:
            raise expression_error(exc, what, path, line, segment) from None
    if isinstance(value, list):
        return Array([compile_template(item, path, line, tables, f"{what}[{i}]", segment, lets)
                      for i, item in enumerate(value)], origin)
    if isinstance(value, dict):
        return _compile_object(value, path, line, tables, what, segment, lets)
    raise ConfigError(f"{what}: {value!r} is not a template value", path, line)


def expression_error(exc: ExpressionError, what: str, path, line, segment: str | None = None) -> ConfigError:
    """The ConfigError for an expression that cannot be compiled (with the new way to write an old $-3)."""
    hint = exc.hint(segment) if isinstance(exc, OldSegmentNotation) else None
    return ConfigError(f"{what}: {exc}", path, line, hint)


def _text(value: Quoted, path, line, what) -> Node:
    """Quoted text: itself, unless it is the old doubly quoted form or reads as an expression."""
    text = str(value)
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        raise ConfigError(f"{what}: text is quoted twice ({value!r})", path, line,
                          f"quoted text is taken as it is now: write {text}")
    if _reads_as_expression(text):
        raise ConfigError(f"{what}: {text!r} is quoted, so it would be taken as text, but it reads as an expression",
                          path, line, f"to compute it, drop the quotes: {text}; to keep the text, write "
                          f"{{$const: {text}}}")
    return Const(text, Origin(str(path), line, repr(text)))


def _reads_as_expression(text: str) -> bool:
    """Whether quoted text is, as a whole, an expression that computes something (``SCH-1.1``,
    ``map(PV1-2, 'patient-class')``, ``$.1``): quoting it would silently turn it into text.
    Text that merely contains such pieces ('Ward ABC-3', 'see note (2)') is text."""
    try:
        tokens = tokenize(text)
        compile_expression(text)
    except ExpressionError:
        return False
    # A field path, $, or a function (a name that compiles is one); a bare segment name is a code: 'AMB'.
    return any(kind in ("rel", "name") or (kind == "path" and "-" in token) for kind, token in tokens)


def _compile_object(value, path, line, tables, what, segment=None, lets=frozenset()) -> Node:
    line_of = getattr(value, "line_of", lambda key: line)
    unknown = [k for k in value if isinstance(k, str) and k.startswith("$") and k not in DIRECTIVES]
    if unknown:
        raise ConfigError(f"{what}: unknown directive {unknown[0]!r}", path, line_of(unknown[0]),
                          f"known: {', '.join(sorted(DIRECTIVES))}")
    if "$const" in value:
        if len(value) > 1:
            raise ConfigError(f"{what}: $const stands alone", path, line_of("$const"))
        return Const(value["$const"], Origin(str(path), line_of("$const"), repr(value["$const"])))

    def selector(key):
        text = value.get(key)
        if text is None:
            return None
        if not isinstance(text, str):
            raise ConfigError(f"{what}.{key}: must be a path such as AIP[*] or PID-3[*]", path, line_of(key))
        try:
            return raw_selector(text)
        except ExpressionError as exc:
            raise expression_error(exc, f"{what}.{key}", path, line_of(key), segment) from None

    each = selector("$each")
    if each is not None:
        each = _each(each, value["$each"])
        segment = segment_of(value["$each"]) or segment
    when = None
    if "$when" in value:
        try:
            when = compile_condition(value["$when"], tables, lets)
        except ExpressionError as exc:
            raise expression_error(exc, f"{what}.$when", path, line_of("$when"), segment) from None
    datatype, reference = value.get("$datatype"), value.get("$reference")
    if datatype is not None and reference is not None:
        raise ConfigError(f"{what}: use $datatype or $reference, not both", path, line_of("$reference"))
    source = selector("$from")
    if source is not None and segment_of(value["$from"]) is not None:
        source = _each(source, value["$from"])  # a whole segment: it becomes the segment at hand
    if source is not None and datatype is None and reference is None:
        raise ConfigError(f"{what}.$from goes with $datatype or $reference", path, line_of("$from"))
    fields = [
        (key, compile_template(item, path, line_of(key), tables, f"{what}.{key}", segment, lets))
        for key, item in value.items()
        if not (isinstance(key, str) and key.startswith("$"))
    ]
    origin = Origin(str(path), line, what)
    obj = Obj(fields, origin, each=each, when=when, datatype=datatype, reference=reference, source=source)
    obj.source_text = value.get("$from")
    obj.each_text = value["$each"].split("[")[0] if isinstance(value.get("$each"), str) else None
    obj.texts = tuple(value[key] for key in ("$each", "$when", "$from") if isinstance(value.get(key), str))
    if "$value" in value:
        others = [k for k in value if k not in ("$value", "$when")]
        if others:
            raise ConfigError(f"{what}: $value goes only with $when (not {others[0]})", path, line_of("$value"),
                              "$value gives one value, not an object")
        obj.value = compile_template(value["$value"], path, line_of("$value"), tables, what, segment, lets)
    return obj


def segment_of(text: str) -> str | None:
    """The segment kind a ``$each`` over whole segments is at (``AIP[*]`` -> AIP), else None."""
    from ..hl7.paths import parse_path

    first = text.split("|")[0].strip()
    if first.startswith("$"):
        return None
    path = parse_path(first)
    return path.segment if path.field is None else None


def _each(select, text):
    """$each over segments (``AIP[*]``: each becomes the current segment, ``AIP-3`` reads it) or
    values (``PID-3[*]``: each becomes ``$``)."""
    from ..hl7.paths import parse_path

    if segment_of(text) is None:
        return select
    path = parse_path(text.split("|")[0].strip())

    def segments(ctx):
        return [ctx.at(segment=seg, value=None) for seg in ctx.message.select(path, ctx.segment, ctx.groups)]

    return segments
