"""FHIR's structure, read from fhir.resources' own models, and the fast check of a resource's values.

Mappings are checked against this at load (``engine.transform.structure``): element names,
cardinality, choice types, datatypes and required elements, so a template that cannot give valid
FHIR is refused by ``hl7bridge check`` with its file and line. What is left for run time is what
only the message decides, and ``problems`` checks exactly that on every resource a conversion
builds, in a few microseconds an element: primitive formats (instant, dateTime, date, code, id,
uri, decimal, the integers, boolean), required elements that came out empty, lists where FHIR
wants lists, at most one of a choice, and nothing FHIR does not define (a ``$const`` or a datatype
mapping could still give it). It is never more lenient than fhir.resources (a differential test
runs both over every example, the corpus and thousands of generated variants); ``validate: strict``
on a route runs fhir.resources as well.

The definitions come from the installed fhir.resources (``fhir.resources.R4B``, the models the
strict check uses), derived on first use and kept for the life of the process, rather than from a
JSON file shipped beside this module: the reference validator and the fast one then read one
source and cannot drift apart when fhir.resources is upgraded, and nothing has to be regenerated.
Deriving a type costs well under a millisecond, once.
"""

from __future__ import annotations

import re
import typing
from dataclasses import dataclass
from datetime import date
from functools import lru_cache

from fhir.resources.R4B import get_fhir_model_class

PRIMITIVES = {"boolean", "string", "code", "id", "uri", "url", "canonical", "oid", "uuid", "markdown", "xhtml",
              "base64Binary", "date", "dateTime", "instant", "time", "decimal", "integer", "integer64",
              "unsignedInt", "positiveInt"}
ANY_RESOURCE = "Resource"


@dataclass(frozen=True)
class Element:
    """One element of a FHIR type: its JSON name, its type, list or not, required or not, and the
    choice (``value[x]``: ``value``) it is one of."""

    name: str
    type: str  # a primitive ('dateTime'), a datatype or backbone element ('AppointmentParticipant'), 'Resource'
    many: bool
    required: bool
    choice: str | None = None

    @property
    def primitive(self) -> bool:
        return self.type in PRIMITIVES

    @property
    def check(self):
        """The check of one value of a primitive element (None for an object)."""
        return VALUE_CHECKS.get(self.type)


@dataclass(frozen=True)
class Definition:
    """A FHIR type: its elements by name, the required ones, and its choices (name -> (elements, required))."""

    name: str
    elements: dict
    required: tuple
    choices: dict
    resource: bool


def is_resource(name: str) -> bool:
    try:
        return get_fhir_model_class(name).has_resource_base()
    except (KeyError, ValueError, AttributeError, ImportError):
        return False


@lru_cache(maxsize=None)
def definition(name: str) -> Definition | None:
    """The definition of a FHIR type (``Appointment``, ``CodeableConcept``,
    ``AppointmentParticipant``), None when fhir.resources knows no such type."""
    try:
        model = get_fhir_model_class(name)
    except (KeyError, ValueError, AttributeError, ImportError):
        return None
    return _from_model(model)


@lru_cache(maxsize=None)
def _from_model(model) -> Definition:
    elements, choices = {}, {}
    for field_name, info in model.model_fields.items():
        extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
        if not extra.get("element_property"):
            continue
        kind, many = _type_of(info.annotation)
        required = info.is_required() or bool(extra.get("element_required"))
        choice = extra.get("one_of_many")
        name = info.alias or field_name
        elements[name] = Element(name, kind, many, required and not choice, choice)
        if choice:
            names, needed = choices.get(choice, ((), False))
            choices[choice] = ((*names, name), needed or bool(extra.get("one_of_many_required")))
    required = tuple(name for name, element in elements.items() if element.required)
    return Definition(model.__name__, elements, required, choices, bool(model.has_resource_base()))


def _type_of(annotation) -> tuple[str, bool]:
    """(type name, is a list) of a pydantic field annotation of a fhir.resources model."""
    many = False
    while True:
        origin = typing.get_origin(annotation)
        if origin is typing.Union or str(origin) == "<class 'types.UnionType'>":
            annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
        elif origin in (list, typing.List):
            many, annotation = True, typing.get_args(annotation)[0]
        else:
            break
    if annotation is bool:
        return "boolean", many
    for meta in getattr(annotation, "__metadata__", ()):
        visit = getattr(meta, "__visit_name__", None)
        if visit:
            return visit, many
    if getattr(annotation, "__metadata__", None) is not None:
        base = typing.get_args(annotation)[0]
        return ("base64Binary" if base is bytes else "uuid"), many
    model = getattr(annotation, "get_model_klass", None)
    if model is not None:
        klass = model()
        return (ANY_RESOURCE if klass.__name__ == "Resource" else klass.__name__), many
    return "string", many  # not reached with fhir.resources 8: every element is one of the above


# -- the values -----------------------------------------------------------------------------------

_YEAR = r"([0-9]([0-9]([0-9][1-9]|[1-9]0)|[1-9]00)|[1-9]000)"
_ZONE = r"(Z|[+-]((0[0-9]|1[0-3]):[0-5][0-9]|14:00))"
_TIME = r"([01][0-9]|2[0-3]):[0-5][0-9]:([0-5][0-9]|60)(\.[0-9]{1,6})?"
DATE = re.compile(_YEAR + r"(-(0[1-9]|1[0-2])(-(0[1-9]|[12][0-9]|3[01]))?)?")
DATETIME = re.compile(_YEAR + r"(-(0[1-9]|1[0-2])(-(0[1-9]|[12][0-9]|3[01])(T" + _TIME + _ZONE + r")?)?)?")
INSTANT = re.compile(_YEAR + r"-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])T" + _TIME + _ZONE)
TIME = re.compile(_TIME)
CODE = re.compile(r"[^\s]+( [^\s]+)*")
ID = re.compile(r"[A-Za-z0-9\-.]{1,64}")
URI = re.compile(r"\S+")
OID = re.compile(r"urn:oid:[0-2](\.(0|[1-9][0-9]*))+")
UUID = re.compile(r"urn:uuid:[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
DECIMAL = re.compile(r"-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?")
BASE64 = re.compile(r"(\s*([0-9a-zA-Z+=/]){4}\s*)+")
MAX_STRING = 1024 * 1024  # FHIR: strings SHALL NOT exceed 1,048,576 characters
INT_RANGE = {"integer": (-2**31, 2**31 - 1), "unsignedInt": (0, 2**31 - 1), "positiveInt": (1, 2**31 - 1),
             "integer64": (-2**63 + 1, 2**63 - 1)}


def _real_date(text: str) -> bool:
    """Whether the day of a full date exists (no 30 February); a year or year-month is always real."""
    if len(text) < 10:
        return True
    try:
        date(int(text[:4]), int(text[5:7]), int(text[8:10]))
    except ValueError:
        return False
    return True


def _text(value) -> str | None:
    if type(value) is not str:
        return "text is needed"
    if not value:
        return "the text is empty"
    if len(value) > MAX_STRING:
        return "the text is too long for FHIR (over 1,048,576 characters)"
    return None


_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f]")


def _string(value):
    if type(value) is not str:
        return "text is needed"
    if not value or len(value) > MAX_STRING:
        return _text(value)
    if value.isspace():
        return "the text is only blanks"
    if _CONTROL.search(value) is not None:
        return "the text has control characters FHIR does not allow"
    return None


def _code(value):
    problem = _text(value)
    if problem is not None:
        return problem
    return None if CODE.fullmatch(value) else "a code has no leading, trailing or double blanks"


def _id(value):
    if type(value) is not str:
        return "text is needed"
    return None if ID.fullmatch(value) else "an id is 1 to 64 letters, digits, '-' and '.'"


def _uri(value):
    if type(value) is not str:
        return "text is needed"
    return None if URI.fullmatch(value) else "a URI has no blanks and is not empty"


def _pattern(pattern, words):
    def check(value):
        if type(value) is not str:
            return "text is needed"
        return None if pattern.fullmatch(value) else words
    return check


def _moment(pattern, words, real=_real_date):
    """The check of a date, dateTime, instant or time: the FHIR pattern, and a day that exists."""
    def check(value):
        if type(value) is not str or pattern.fullmatch(value) is None or not real(value):
            return words
        return None
    return check


_date = _moment(DATE, "not a FHIR date (YYYY, YYYY-MM or YYYY-MM-DD, a day that exists)")
_datetime = _moment(DATETIME, "not a FHIR dateTime (a date, or a date and time with seconds and a time zone, "
                              "a day that exists)")
_instant = _moment(INSTANT, "not a FHIR instant (date and time to the second, with a time zone)")
_time = _moment(TIME, "not a FHIR time (hh:mm:ss)", real=lambda value: True)


def _boolean(value):
    return None if type(value) is bool else "true or false is needed"


def _decimal(value):
    if type(value) not in (int, float):
        return "a number is needed"
    text = str(value)
    if DECIMAL.fullmatch(text) is None:
        return "a number is needed"
    if len(text) > 64:
        return "the number has too many digits for FHIR"
    return None


def _integer(kind):
    low, high = INT_RANGE[kind]

    def check(value):
        if type(value) is not int:
            return "a whole number is needed"
        if value < low:
            return "the value is too small for this FHIR element"
        if value > high:
            return "the value is too large for this FHIR element"
        return None
    return check


def _never(value):
    return "hl7bridge does not produce this kind of FHIR value"


VALUE_CHECKS = {
    "boolean": _boolean, "string": _string, "markdown": _string, "code": _code, "id": _id,
    "uri": _uri, "canonical": _uri, "url": _pattern(re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*:\S+"),
                                                     "a URL such as https://host/path is needed"),
    "oid": _pattern(OID, "an OID (urn:oid:1.2.3) is needed"), "uuid": _pattern(UUID, "a urn:uuid: is needed"),
    "base64Binary": _pattern(BASE64, "base64 text is needed"), "xhtml": _never,
    "date": _date, "dateTime": _datetime, "instant": _instant, "time": _time, "decimal": _decimal,
    "integer": _integer("integer"), "integer64": _integer("integer64"), "unsignedInt": _integer("unsignedInt"),
    "positiveInt": _integer("positiveInt"),
}


def value_problem(kind: str, value) -> str | None:
    """What is wrong with one primitive value for a FHIR type (in words), None when it is valid."""
    return VALUE_CHECKS[kind](value)


def problems(resource: dict) -> list[tuple[tuple, str, str]]:
    """Every problem of one resource: (location, kind, words), the location as fhir.resources
    gives it (element names and list indexes), kind ``missing`` for a required element with no
    value. An empty list: the resource is valid FHIR as far as its values go."""
    found: list = []
    kind = resource.get("resourceType") if isinstance(resource, dict) else None
    defined = definition(kind) if isinstance(kind, str) else None
    if defined is None or not defined.resource:
        found.append(((), "invalid", f"{kind!r} is not a FHIR resource"))
        return found
    _object(resource, defined, (), found, True)
    return found


def _object(value: dict, defined: Definition, loc: tuple, found: list, top: bool = False):
    checks = _checks(defined)
    for name, item in value.items():
        entry = checks.get(name)
        if entry is None:
            if not (top and name == "resourceType"):
                found.append(((*loc, name), "extra_forbidden", "this element does not exist in FHIR R4"))
            continue
        many, check, kind = entry
        if many:
            if type(item) is not list or not item:
                found.append(((*loc, name), "list_type", "FHIR wants a list with something in it here"))
                continue
            if check is not None:
                for index, one in enumerate(item):
                    problem = check(one)
                    if problem is not None:
                        found.append(((*loc, name, index), "value", problem))
            else:
                for index, one in enumerate(item):
                    complex_problems(one, kind, (*loc, name, index), found)
        elif check is not None:
            problem = check(item)
            if problem is not None:
                found.append(((*loc, name), "value", problem))
        else:
            complex_problems(item, kind, (*loc, name), found)
    for name in defined.required:
        if name not in value:
            found.append(((*loc, name), "missing", "FHIR requires it"))
    if defined.choices:
        for choice, (names, needed) in defined.choices.items():
            given = [n for n in names if n in value]
            if len(given) > 1:
                found.append(((*loc, given[1]), "choice", f"only one of {choice}[x] may be given ({', '.join(given)})"))
            elif needed and not given:
                found.append(((*loc, f"{choice}[x]"), "missing", "FHIR requires one of them"))


def complex_problems(value, kind: str, loc: tuple, found: list):
    """The problems of one object of FHIR type ``kind`` (a datatype, a backbone element, Resource)."""
    if type(value) is not dict or not value:
        found.append((loc, "model_type", f"a {kind} (an object with something in it) is needed"))
    elif kind == ANY_RESOURCE:
        for location, what, words in problems(value):
            found.append(((*loc, *location), what, words))
    else:
        _object(value, definition_of_element(kind), loc, found)


_CHECKS: dict = {}


def _checks(defined: Definition) -> dict:
    """name -> (is a list, value check or None, type) of a definition's elements, made once."""
    checks = _CHECKS.get(defined.name)
    if checks is None:
        checks = _CHECKS[defined.name] = {name: (e.many, e.check, e.type) for name, e in defined.elements.items()}
    return checks


@lru_cache(maxsize=None)
def definition_of_element(kind: str) -> Definition:
    defined = definition(kind)
    if defined is None:
        raise KeyError(kind)
    return defined
