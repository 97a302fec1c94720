"""Routes: which messages go through which mapping to which destinations, and how to ACK them.

One route per file in ``routes/``. Routes are tried in order of ``order`` (then file name); the
first whose ``match`` holds takes the message. Every key is documented in docs/routes.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ConfigError
from ..hl7.header import Header
from .expr import Context, ExpressionError, compile_condition
from .mappings import MappingSet, check_timezone
from ..yamlconf import Section, load_yaml

ROUTE_KEYS = {"name", "description", "order", "match", "mapping", "timezone", "validate", "ack", "destinations",
              "duplicates"}
DUPLICATES_KEYS = {"differing"}
# A message that reuses an earlier message's (sending facility, control ID) with different content:
# process it as a new message (flagged), reject it (AR), or hold it for an operator (AA, not mapped).
DIFFERING_POLICIES = ("process", "reject", "hold")
MATCH_KEYS = {"message", "version", "sending_application", "sending_facility", "receiving_application",
              "receiving_facility", "processing_id", "where"}
ACK_KEYS = {"after", "mapping_error"}
ACK_AFTER = ("commit", "mapping")
MAPPING_ERROR_CODES = ("AE", "AR", "AA")
VALIDATE = ("structure", "strict")  # a word or a list of them; none: neither


@dataclass
class Route:
    """A loaded route. ``matches`` is plain Python, fast enough for every message."""

    name: str
    path: str
    order: int = 100
    description: str = ""
    messages: tuple = ()  # ("SIU", "SIU^S12", ...); empty matches any
    versions: tuple = ()
    sending_applications: tuple = ()
    sending_facilities: tuple = ()
    receiving_applications: tuple = ()
    receiving_facilities: tuple = ()
    processing_ids: tuple = ()
    where: list = field(default_factory=list)  # compiled conditions, all must hold
    where_text: list = field(default_factory=list)
    mapping: str = ""
    timezone: str | None = None
    validate: tuple = ()  # "structure" (hl7apy before mapping), "strict" (fhir.resources after it)
    ack_after: str = "commit"
    mapping_error: str = "AE"
    destinations: tuple = ()
    destinations_line: int = 0
    differing_duplicates: str = "process"

    @property
    def strict(self) -> bool:
        """Whether every resource is validated with fhir.resources too (``validate: strict``)."""
        return "strict" in self.validate

    def matches(self, header: Header, ctx: Context) -> bool:
        if self.messages and header.message_type not in self.messages and header.message_code not in self.messages:
            return False
        for filter_name, header_name in _HEADER_FILTERS:
            wanted = getattr(self, filter_name)
            # The MSH value is read only when the route asks for it.
            if wanted and getattr(header, header_name) not in wanted:
                return False
        return all(condition(ctx) for condition in self.where)


# A route's filters on the MSH (``match`` keys) and the Header values they compare.
_HEADER_FILTERS = (
    ("versions", "version"),
    ("sending_applications", "sending_application"),
    ("sending_facilities", "sending_facility"),
    ("receiving_applications", "receiving_application"),
    ("receiving_facilities", "receiving_facility"),
    ("processing_ids", "processing_id"),
)


class RouteTable:
    """All routes of a config directory, in the order they are tried."""

    def __init__(self, routes: list[Route]):
        self.routes = sorted(routes, key=lambda r: (r.order, Path(r.path).name))

    def match(self, header: Header, ctx: Context) -> Route | None:
        for route in self.routes:
            if route.matches(header, ctx):
                return route
        return None

    def __iter__(self):
        return iter(self.routes)

    def __len__(self):
        return len(self.routes)

    def get(self, name: str) -> Route | None:
        return next((r for r in self.routes if r.name == name), None)


def load_routes(directory: str | Path, mappings: MappingSet) -> RouteTable:
    """Load ``directory/*.yaml``; every problem is a ``ConfigError`` with file, line and a hint."""
    directory = Path(directory)
    if not directory.is_dir():
        return RouteTable([])
    routes = [load_route(path, mappings) for path in sorted(directory.glob("*.yaml"))]
    seen: dict[str, str] = {}
    for route in routes:
        if route.name in seen:
            raise ConfigError(f"route name {route.name!r} is also used in {seen[route.name]}", route.path, 1,
                              "give every route its own name")
        seen[route.name] = route.path
    return RouteTable(routes)


def load_route(path: Path, mappings: MappingSet) -> Route:
    data = load_yaml(path)
    top = Section(data, path, "route", ROUTE_KEYS)
    name = top.get("name", str, None)
    if not name:
        raise top.error("name", "is required", "a short unique name, e.g. clinic-scheduling")
    match = Section(top.data.get("match"), path, "match", MATCH_KEYS, top.line("match"))
    ack = Section(top.data.get("ack"), path, "ack", ACK_KEYS, top.line("ack"))
    duplicates = Section(top.data.get("duplicates"), path, "duplicates", DUPLICATES_KEYS, top.line("duplicates"))
    mapping = top.get("mapping", str, None)
    if not mapping:
        raise top.error("mapping", "is required", f"one of: {', '.join(sorted(mappings.messages))}")
    if mapping not in mappings.messages:
        raise top.error("mapping", f"no message mapping {mapping!r} (mappings/message/{mapping}.yaml)",
                        f"one of: {', '.join(sorted(mappings.messages))}")
    timezone_name = top.get("timezone", str, None)
    if timezone_name is not None:
        check_timezone(timezone_name, top, "timezone")
    where_text = match.data.get("where")
    if isinstance(where_text, str):
        where_text = [where_text]
    conditions = []
    for text in where_text or []:
        if not isinstance(text, str):
            raise match.error("where", "must be a condition or a list of them, such as PV1-2 != P")
        try:
            conditions.append(compile_condition(text, set(mappings.tables)))
        except ExpressionError as exc:
            raise match.error("where", str(exc)) from None
    messages = tuple(match.strings("message", []))
    for code in messages:
        kind, _, trigger = code.partition("^")
        if not (len(kind) == 3 and kind.isalnum() and (not trigger or trigger.isalnum())):
            raise match.error("message", f"{code!r} is not a message type", "write SIU or SIU^S12")
    destinations = top.strings("destinations", [])
    return Route(
        name=name,
        path=str(path),
        order=top.get("order", int, 100),
        description=top.get("description", str, ""),
        messages=messages,
        versions=tuple(match.strings("version", [])),
        sending_applications=tuple(match.strings("sending_application", [])),
        sending_facilities=tuple(match.strings("sending_facility", [])),
        receiving_applications=tuple(match.strings("receiving_application", [])),
        receiving_facilities=tuple(match.strings("receiving_facility", [])),
        processing_ids=tuple(match.strings("processing_id", [])),
        where=conditions,
        where_text=list(where_text or []),
        mapping=mapping,
        timezone=timezone_name,
        validate=validations(top),
        ack_after=ack.choice("after", ACK_AFTER, "commit"),
        mapping_error=ack.choice("mapping_error", MAPPING_ERROR_CODES, "AE"),
        destinations=tuple(destinations),
        destinations_line=top.line("destinations"),
        differing_duplicates=duplicates.choice("differing", DIFFERING_POLICIES, "process"),
    )


def validations(top: Section) -> tuple:
    """``validate``: none, one of ``VALIDATE`` or a list of them."""
    given = top.data.get("validate", "none")
    words = [given] if isinstance(given, str) else given
    if not isinstance(words, list) or not all(isinstance(w, str) for w in words):
        raise top.error("validate", "is a word or a list of words", "validate: [structure, strict]")
    if words == ["none"]:
        return ()
    for word in words:
        if word not in VALIDATE:
            raise top.error("validate", f"{word!r} is not one of none, {', '.join(VALIDATE)}",
                            "validate: strict, or validate: [structure, strict]")
    return tuple(dict.fromkeys(words))
