"""Loading a mapping directory and converting messages to FHIR transaction Bundles.

    mappings/
      message/SIU.yaml        which resources a message family yields, from which segments
      resource/Appointment.yaml   one template per FHIR resource
      datatype/CX.yaml        reusable pieces: an HL7 data type to a FHIR data type
      codesystem/filler-status.yaml   code maps (HL7 tables to FHIR codes)

Every resource gets an ID derived from its first identifier (or its ``$key``, or the message
itself), so the same message converted twice gives the same Bundle, and every entry is a
conditional update (``PUT Patient?identifier=system|value``): sent twice, it changes nothing
downstream. Every Bundle ends with a Provenance: which message, which route and mapping version,
when. The templates' FHIR structure is checked when the mappings load (``structure``), every
resource's values as it is built (``fhirspec``; fhir.resources R4B as well with ``strict``), and
the FHIR invariants fhir.resources does not check and our mappings could break (Appointment app-2,
app-3, app-4) here, before it leaves; a problem names the FHIR element and the mapping line and
HL7 field it came from, in words.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import orjson
from fhir.resources.R4B import get_fhir_model_class
from pydantic import ValidationError

from ..hl7.er7 import Message
from ..hl7.header import read_header
from ..errors import ConfigError, Hl7BridgeError
from ..yamlconf import Section, load_yaml
from ..stamps import stable_id
from . import fhirspec
from .codegen import RECHECK, compile_mappings, compute_lets
from .expr import (Context, DataError, ExpressionError, Lets, compile_condition, compile_expression, fhir_datetime,
                   plain, raw_selector, tokenize, uri_quote, urn)
from .structure import check_structure
from .templates import Array, Expr, Node, Obj, Origin, Output, compile_template, expression_error
from .templates import _each as each_selector
from .templates import segment_of


class MappingError(Hl7BridgeError):
    """A message could not be converted; ``problems`` lists each with its FHIR and HL7 location."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("; ".join(problems))


_LOOKUPS_KEPT = 4096  # codes a code map remembers the answer for


@dataclass
class CodeMap:
    """A code map: HL7 codes to FHIR codes (or any text), with an optional default.

    A code is looked up as sent, then in upper case; the answer for each code is remembered (the
    same few codes come in every message), so a code is normalised once."""

    name: str
    entries: dict
    default: str | None = None
    _found: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def lookup(self, code: str):
        found = self._found
        if code in found:
            return found[code]
        if code in self.entries:
            value = self.entries[code]
        else:
            value = self.entries.get(code.upper(), self.default)
        if len(found) >= _LOOKUPS_KEPT:
            found.clear()
        found[code] = value
        return value


@dataclass
class ResourceMapping:
    name: str
    resource_type: str
    template: Obj
    key: list = field(default_factory=list)  # getters for the ID when there is no identifier
    path: str = ""
    lets: list = field(default_factory=list)  # [(name, Expr)]: $let, in order
    # The segment kinds its expressions read (datatypes included), None when not known: a resource
    # that reads neither the kind of the segment it is built at nor a group member is the same
    # built at any segment of that kind, so it is built once per value (``Conversion.build``).
    reads: frozenset | None = None
    # Built from its value alone (it reads no segment, references no other resource), so what it
    # gives for a value is kept across messages (``MappingSet.built_cache``): staff, places and
    # equipment come back in message after message.
    cacheable: bool = False
    # The generated builder (``codegen``): function(ctx, out) -> body, checking the values as it
    # goes; raises when something needs the interpreter to say what is wrong.
    compiled: object = None

    def node_at(self, element: tuple) -> Node | None:
        """The template node that builds ``element`` (('code',), ('participant', 'actor')), if any."""
        node = self.template
        for key in element:
            while isinstance(node, Array) and node.items:
                node = node.items[0]
            fields = dict(getattr(node, "fields", []) or [])
            if key not in fields:
                return None
            node = fields[key]
        return node

    def explain(self, node) -> str:
        """Where a node takes its value from: its file, line and expression (and its $let values)."""
        if isinstance(node, Obj) and node.source_text:
            return f"{node.origin.path}:{node.origin.line} ($from: {node.source_text})"
        text = str(node.origin)
        lets = dict(self.lets)
        for name in getattr(node, "uses", ()):
            if name in lets:
                text += f"; {name} from {lets[name].origin}"
        return text


@dataclass
class ResourceRule:
    """One line of a message mapping: which resource, from which segment(s), when."""

    resource: str
    source: object  # selector of segments (each one is the context) or values
    each: bool
    when: object
    line: int
    source_text: str = ""
    required: bool = False


@dataclass
class MessageMapping:
    name: str
    description: str
    rules: list
    timezone: str | None
    path: str
    groups: dict = field(default_factory=dict)  # head segment -> the segment kinds that belong to it

    @property
    def group_members(self) -> frozenset:
        """Every segment kind that belongs to some group (read in a group, it depends on which)."""
        return frozenset().union(*self.groups.values())


@dataclass
class Result:
    """A conversion: the Bundle and what was assumed to map it (warnings, in words)."""

    bundle: dict
    warnings: list = field(default_factory=list)


BUILT_CACHE_LIMIT = 20_000  # resources built from a value alone kept across messages (a few MB)


class MappingSet:
    """Every mapping in a directory, compiled and cross-checked."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self.tables: dict[str, CodeMap] = {}
        self.datatypes: dict = {}
        self.resources: dict[str, ResourceMapping] = {}
        self.messages: dict[str, MessageMapping] = {}
        self.version = ""
        # (resource mapping, value, its field, separators, time zone, year two-digit years are read
        # near) -> (body as JSON, ID and URL, warnings), for ``cacheable`` resource mappings.
        self.built_cache: dict = {}
        self._load()

    # -- loading --------------------------------------------------------------------------------

    def _files(self, kind):
        folder = self.directory / kind
        return sorted(folder.glob("*.yaml")) if folder.is_dir() else []

    def _load(self):
        if not self.directory.is_dir():
            raise ConfigError(f"mapping directory {self.directory} does not exist")
        for path in self._files("codesystem"):
            self.tables[path.stem] = self._codemap(path)
        names = set(self.tables)
        for path in self._files("datatype"):
            data = load_yaml(path, keep_quotes=True)
            if not isinstance(data, dict):
                raise ConfigError("a datatype mapping is a mapping of FHIR elements", path, 1)
            self.datatypes[path.stem] = compile_template(data, path, 1, names, path.stem)
        segments = self._segments_by_resource()
        for path in self._files("resource"):
            self.resources[path.stem] = self._resource(path, names, segments.get(path.stem))
        for path in self._files("message"):
            self.messages[path.stem] = self._message(path, names)
        # Per message mapping, worked out once here rather than for every conversion.
        self.group_members = {name: mapping.group_members for name, mapping in self.messages.items()}
        self._check_names()
        check_structure(self)
        for name, function in compile_mappings(self).items():
            self.resources[name].compiled = function
        self.version = self._version()

    def _version(self) -> str:
        """The mapping version: the first 12 hex digits of a SHA-256 over every file of the mapping
        directory (names and bytes), as loaded. Any change to any mapping file changes it; it is
        computed when the mappings load (at start, at each reload, by check/convert/test)."""
        digest = hashlib.sha256()
        for kind in ("message", "resource", "datatype", "codesystem"):
            for path in self._files(kind):
                digest.update(f"{kind}/{path.name}\0".encode())
                digest.update(path.read_bytes())
                digest.update(b"\0")
        return digest.hexdigest()[:12]

    def _codemap(self, path) -> CodeMap:
        data = load_yaml(path)
        section = Section(data, path, "code map", {"description", "map", "default"})
        entries = section.get("map", dict, None)
        if entries is None:
            raise section.error("map", "is required", "a mapping of codes: {BOOKED: booked}")
        return CodeMap(path.stem, {str(k): v for k, v in entries.items()}, section.get("default", str, None))

    def _segments_by_resource(self) -> dict[str, str]:
        """The segment each resource mapping is built from, where the message mappings say one
        (``from: FT1[*]``): only to say how an old ``$-3`` is written now."""
        found: dict[str, set] = {}
        for path in self._files("message"):
            try:
                data = load_yaml(path)
                for item in data.get("resources", []) or []:
                    found.setdefault(item["resource"], set()).add(segment_of(item["from"]))
            except (ConfigError, ExpressionError, AttributeError, KeyError, TypeError, ValueError):
                continue  # the message mapping itself reports its problems when it is loaded
        return {name: next(iter(kinds)) for name, kinds in found.items() if len(kinds) == 1 and None not in kinds}

    def _resource(self, path, names, segment: str | None = None) -> ResourceMapping:
        data = load_yaml(path, keep_quotes=True)
        if not isinstance(data, dict) or "resourceType" not in data:
            raise ConfigError("a resource mapping starts with resourceType", path, getattr(data, "line", 1))
        resource_type = data["resourceType"]
        try:
            get_fhir_model_class(resource_type)
        except (KeyError, ValueError, AttributeError):
            raise ConfigError(f"{resource_type!r} is not a FHIR R4 resource", path, data.line_of("resourceType")) from None
        lets = []
        given = data.get("$let")
        if given is not None:
            if not isinstance(given, dict):
                raise ConfigError("$let: a mapping of names to expressions", path, data.line_of("$let"),
                                  "e.g. $let: {begins: precise(TQ1-7.1, SCH-11.4)}, used as begins")
            for name, text in given.items():
                line = given.line_of(name) if hasattr(given, "line_of") else data.line_of("$let")
                if not isinstance(name, str) or not re.fullmatch(r"[a-z_][A-Za-z0-9_]*", name):
                    raise ConfigError(f"$let: {name!r} is not a name", path, line,
                                      "a name starts with a lower-case letter (upper-case reads as a segment)")
                if not isinstance(text, str):
                    raise ConfigError(f"$let.{name}: an expression is needed", path, line)
                uses = set()
                try:
                    getter = compile_expression(text, names, {n for n, _ in lets}, uses)
                except ExpressionError as exc:
                    error = expression_error(exc, f"$let.{name}", path, line, segment)
                    later = [n for n in given if f"{n!r} is neither" in str(exc)]
                    if later:
                        raise ConfigError(f"$let.{name}: uses {later[0]!r}, which is defined below it", path, line,
                                          "a $let uses only the names defined above it") from None
                    raise error from None
                lets.append((name, Expr(getter, Origin(str(path), line, f"{name}: {text}"), uses, text)))
        known = frozenset(n for n, _ in lets)
        key = []
        for text in data.get("$key", []) or []:
            try:
                key.append(compile_expression(text, names, known))
            except ExpressionError as exc:
                raise expression_error(exc, "$key", path, data.line_of("$key"), segment) from None
        body = type(data)({k: v for k, v in data.items() if k not in ("resourceType", "$key", "$let")})
        body.line, body.key_lines = data.line, data.key_lines
        template = compile_template(body, path, data.line, names, resource_type, segment, known)
        texts = [*template.texts_read(self.datatypes), *(node.text for _, node in lets),
                 *(data.get("$key", []) or [])]
        reads = segment_kinds(texts)
        return ResourceMapping(path.stem, resource_type, template, key, str(path), lets, reads=reads,
                               cacheable=reads == frozenset() and not references(template, self.datatypes))

    def _message(self, path, names) -> MessageMapping:
        data = load_yaml(path)
        section = Section(data, path, "message mapping", {"description", "resources", "timezone", "groups"})
        groups = {}
        given = section.get("groups", dict, {}) or {}
        for head, members in given.items():
            kinds = members if isinstance(members, list) else None
            if not isinstance(head, str) or not re.fullmatch(r"[A-Z][A-Z0-9]{2}", head) or kinds is None or \
                    not all(isinstance(k, str) and re.fullmatch(r"[A-Z][A-Z0-9]{2}", k) for k in kinds):
                line = given.line_of(head) if hasattr(given, "line_of") else section.line("groups")
                raise ConfigError(f"groups.{head}: a segment and the list of segments that belong to it", path, line,
                                  "e.g. RGS: [AIS, AIG, AIL, AIP, NTE]")
            groups[head] = frozenset(kinds)
        rules = []
        for index, item in enumerate(section.get("resources", list, []), 1):
            rule = Section(item, path, f"resources[{index}]", {"resource", "from", "each", "when", "required"},
                           getattr(item, "line", section.line("resources")))
            resource = rule.get("resource", str, None)
            if resource is None:
                raise rule.error("resource", "is required", "the name of a file in mappings/resource/")
            source_text = rule.get("from", str, None)
            if source_text is None:
                raise rule.error("from", "is required", "the segment the resource is built from, e.g. SCH or FT1[*]")
            try:
                source = each_selector(raw_selector(source_text), source_text)
                when = compile_condition(rule.get("when", str, ""), names) if rule.data.get("when") else None
            except ExpressionError as exc:
                key = "from" if "when" not in rule.data else "when"
                raise expression_error(exc, f"resources[{index}].{key}", path, rule.line(key)) from None
            rules.append(ResourceRule(resource, source, rule.get("each", bool, "[*]" in source_text), when, rule.line(),
                                      source_text, rule.get("required", bool, False)))
        timezone_name = section.get("timezone", str, None)
        if timezone_name is not None:
            check_timezone(timezone_name, section, "timezone")
        return MessageMapping(path.stem, section.get("description", str, ""), rules, timezone_name, str(path), groups)

    def _check_names(self):
        for mapping in self.messages.values():
            for rule in mapping.rules:
                if rule.resource not in self.resources:
                    raise ConfigError(f"no resource mapping {rule.resource!r} (mappings/resource/{rule.resource}.yaml)",
                                      mapping.path, rule.line)
        for node, path in self._all_nodes():
            if isinstance(node, Obj):
                if node.datatype is not None and node.datatype not in self.datatypes:
                    raise ConfigError(f"no datatype mapping {node.datatype!r} (mappings/datatype/{node.datatype}.yaml)",
                                      path, node.origin.line)
                if node.reference is not None and node.reference not in self.resources:
                    raise ConfigError(f"no resource mapping {node.reference!r} (mappings/resource/{node.reference}.yaml)",
                                      path, node.origin.line)

    def _all_nodes(self):
        roots = [(t, f"{self.directory}/datatype/{n}.yaml") for n, t in self.datatypes.items()]
        roots += [(r.template, r.path) for r in self.resources.values()]
        stack = list(roots)
        while stack:
            node, path = stack.pop()
            yield node, path
            stack.extend((child, path) for child in node.children())

    # -- using ----------------------------------------------------------------------------------

    def datatype(self, name):
        return self.datatypes[name]

    def remember(self, key: tuple, built: tuple):
        """Keep a resource built from a value alone; the oldest goes beyond ``BUILT_CACHE_LIMIT``."""
        if len(self.built_cache) >= BUILT_CACHE_LIMIT:
            self.built_cache.pop(next(iter(self.built_cache)))
        self.built_cache[key] = built

    def summary(self) -> dict:
        return {kind: sorted(getattr(self, attr)) for kind, attr in
                (("message", "messages"), ("resource", "resources"), ("datatype", "datatypes"), ("codesystem", "tables"))}

    def convert(self, message: Message, mapping: str, tz: str | None = None, *, route: str = "",
                now: datetime | None = None, version: str | None = None, strict: bool = False) -> Result:
        """Convert one message with ``mappings/message/<mapping>.yaml``: the Bundle and its warnings.

        ``route`` names the route in the Provenance; ``now`` is when the conversion happens (its
        ``recorded`` time; the clock when not given); ``version`` stands in for the mapping version.
        Every resource's values are checked (``fhirspec``); ``strict`` validates each with
        fhir.resources as well (a route's ``validate: strict``). Raises ``MappingError`` listing
        every problem (evaluation, FHIR values and invariants), each in words.
        """
        if mapping not in self.messages:
            raise MappingError([f"no message mapping {mapping!r} (mappings/message/{mapping}.yaml)"])
        message_mapping = self.messages[mapping]
        zone = zone_of(tz or message_mapping.timezone)
        now = now or datetime.now(timezone.utc)
        try:
            return Conversion(self, message, zone, route=route, now=now, version=version,
                              strict=strict).run(message_mapping)
        except MappingError:
            # Again, recording where every value came from, so each problem can name its origin.
            return Conversion(self, message, zone, tracking=True, route=route, now=now, version=version,
                              strict=strict).run(message_mapping)


def references(node: Node, datatypes: dict) -> bool:
    """Whether a template (with the datatypes it uses) builds a ``$reference`` to another resource."""
    return any(getattr(one, "reference", None) is not None for one in node.nodes(datatypes))


def segment_kinds(texts) -> frozenset | None:
    """The segment kinds a set of expressions reads (``PV1-19``, ``NTE[*]``), None when one cannot
    be read (then nothing is assumed)."""
    kinds = set()
    for text in texts:
        try:
            tokens = tokenize(str(text))
        except ExpressionError:
            return None
        kinds.update(token[:3] for kind, token in tokens if kind == "path")
    return frozenset(kinds)


def zone_of(name: str | None):
    if not name or name in ("UTC", "Z"):
        return timezone.utc
    return ZoneInfo(name)


def check_timezone(name, section, key):
    try:
        zone_of(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise section.error(key, f"{name!r} is not a time zone", "use an IANA name such as America/Chicago") from None


# Resources that passed validation, by their canonical JSON. Practitioners, locations and devices
# come back in message after message; validating an identical resource again proves nothing.
_VALID: dict[str, None] = {}
_VALID_LIMIT = 20_000


def validate_resource(resource: dict):
    """Validate with fhir.resources (R4B); raises pydantic's ValidationError. Remembers successes."""
    key = json.dumps(resource, sort_keys=True, separators=(",", ":"))
    if key in _VALID:
        return
    get_fhir_model_class(resource["resourceType"]).model_validate(resource)
    if len(_VALID) >= _VALID_LIMIT:
        _VALID.pop(next(iter(_VALID)))
    _VALID[key] = None


# Appointment statuses that may go without start and end (FHIR invariant app-3).
UNTIMED_STATUSES = ("proposed", "cancelled", "waitlist")
# Appointment statuses that may carry a cancelationReason (FHIR invariant app-4).
CANCELLED_STATUSES = ("cancelled", "noshow")
V2_EVENTS = "http://terminology.hl7.org/CodeSystem/v2-0003"


def message_fingerprint(message: Message) -> str:
    """What identifies a message's content for IDs made from the message itself: every segment as
    read (line ends do not matter), without MSH-7. A resend (even restamped) gives the same; any
    other message, however alike, gives another."""
    lines = [seg.line for seg in message.segments]
    msh = message.segments[0]
    fields = msh.fields
    if len(fields) > 7:
        head = list(fields)
        head[7] = ""
        del head[1]  # MSH-1 is the separator itself
        lines[0] = message.seps.field.join(head)
    return hashlib.sha256("\r".join(lines).encode("utf-8", errors="replace")).hexdigest()


class Conversion:
    """One message being converted: the resources built so far, by type and ID."""

    def __init__(self, mappings: MappingSet, message: Message, tz, tracking: bool = False, route: str = "",
                 now: datetime | None = None, version: str | None = None, strict: bool = False):
        self.mappings = mappings
        self.strict = strict
        self.version = version or mappings.version
        self.message = message
        self.tracking = tracking
        self.route = route
        self.now = now or datetime.now(timezone.utc)
        self.ctx = Context(message, None, None, tz, mappings.tables)
        self.entries: dict[tuple[str, str], dict] = {}
        self.outputs: dict[tuple[str, str], Output] = {}
        self.built: dict[tuple, dict | None] = {}  # (mapping, segment, value) -> reference, each built once
        # (mapping, segment kind, value, its field) -> reference, for resources that do not depend on
        # which segment of that kind they are built at (the practitioner of every FT1) and whose ID
        # comes from the data: built again they would give the same resource.
        self.built_from_value: dict[tuple, dict] = {}
        self.group_members: frozenset = frozenset()
        self.errors: list[str] = []
        self._fingerprint = None

    @property
    def fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = message_fingerprint(self.message)
        return self._fingerprint

    def run(self, mapping: MessageMapping) -> Result:
        self.ctx.groups = mapping.groups or None
        self.group_members = self.mappings.group_members[mapping.name]
        self.ctx.reference_year()  # once, before contexts are derived from this one
        header = read_header(self.message)
        for rule in mapping.rules:
            contexts = rule.source(self.ctx)
            if not rule.each:
                contexts = contexts[:1]
            if rule.required and not contexts:
                segment = rule.source_text.split("[")[0]
                self.errors.append(f"{header.message_code or 'the message'} has no {segment} segment: no "
                                   f"{rule.resource} can be built (from {mapping.path}:{rule.line} (required: true))")
                continue
            for item in contexts:
                ctx = item if isinstance(item, Context) else self.ctx.at(value=item)
                try:
                    if rule.when is not None and not rule.when(ctx):
                        continue
                except DataError as exc:
                    self.errors.append(f"{rule.resource}: {exc} (from {mapping.path}:{rule.line} (when))")
                    continue
                errors_before = len(self.errors)
                reference = self.build(rule.resource, ctx)
                if rule.required and reference is None and len(self.errors) == errors_before:
                    self.errors.append(f"the {rule.source_text.split('[')[0]} segment has nothing to build a "
                                       f"{rule.resource} from: every field the mapping reads is empty")
        if self.entries:
            self.provenance(header)
        self.validate()
        if self.errors:
            raise MappingError(list(dict.fromkeys(self.errors)))
        if not self.entries:
            raise MappingError([f"{header.message_code or 'the message'} gives no FHIR resource: nothing the "
                                f"mapping {mapping.name} reads is in it"])
        return Result({
            "resourceType": "Bundle",
            "type": "transaction",
            "entry": [entry for entry in self.entries.values()],
        }, list(self.ctx.notes))

    def build(self, name: str, ctx: Context) -> dict | None:
        memo = (name, id(ctx.segment), ctx.value)
        if memo in self.built:
            return self.built[memo]
        resource_mapping = self.mappings.resources[name]
        by_value = None
        segment, reads = ctx.segment, resource_mapping.reads
        if segment is not None and reads is not None and segment.name not in reads and \
                reads.isdisjoint(self.group_members):
            by_value = (name, segment.name, ctx.value, ctx.value_label)
            if by_value in self.built_from_value:
                self.built[memo] = reference = self.built_from_value[by_value]
                return reference
        out = Output(self.mappings, self, self.tracking)
        body, checked, found = None, False, None
        cache_key = None
        if resource_mapping.cacheable and not self.tracking and ctx.value is not None:
            cache_key = (name, ctx.value, ctx.value_label, self.message.seps, ctx.tz, ctx.year)
            cached = self.mappings.built_cache.get(cache_key)
            if cached is not None:
                body_json, found, notes = cached
                body, checked = orjson.loads(body_json), True  # a copy of its own for this Bundle
                for note in notes:
                    ctx.warn(note)
            else:
                # Its warnings on a list of their own, to be kept with it (then added in order).
                ctx = Context(ctx.message, ctx.segment, ctx.value, ctx.tz, ctx.tables, ctx.groups, [], ctx.lets,
                              ctx.year, ctx.value_label)
        if body is None and not self.tracking and resource_mapping.compiled is not None:
            # The generated builder checks every value as it goes; when it gives up, the
            # interpreter builds the resource again and fhirspec says what is wrong, and where.
            try:
                scoped = compute_lets(resource_mapping, ctx) if resource_mapping.lets else \
                    (ctx.with_lets(None) if ctx.lets is not None else ctx)
                body = resource_mapping.compiled(scoped, out) or {}
                checked = True
            except RECHECK:
                body, out = None, Output(self.mappings, self, self.tracking)
        if body is None:
            where = (None, resource_mapping.resource_type)
            if resource_mapping.lets:
                ctx = ctx.with_lets(self.lets(resource_mapping, ctx, out))
            elif ctx.lets is not None:
                ctx = ctx.with_lets(None)
            body = resource_mapping.template.build(ctx, out, where) or {}
        self.errors.extend(out.errors)
        if cache_key is not None and cached is None:
            for note in ctx.notes:
                self.ctx.warn(note)
        if not body:
            self.built[memo] = None
            return None
        resource = {"resourceType": resource_mapping.resource_type, **body}
        if found is None:
            found = self.data_identity(resource_mapping, resource, ctx)
            if cache_key is not None and found is not None and checked and not out.errors:
                self.mappings.remember(cache_key, (orjson.dumps(body), found, tuple(ctx.notes)))
        resource_id, url = found if found is not None else self.position_identity(resource_mapping)
        key = (resource_mapping.resource_type, resource_id)
        if key not in self.entries:
            if url.startswith(resource_mapping.resource_type + "/"):
                resource = {"resourceType": resource_mapping.resource_type, "id": resource_id, **body}
            self.entries[key] = {
                "fullUrl": f"urn:uuid:{resource_id}",
                "resource": resource,
                "request": {"method": "PUT", "url": url},
            }
            self.outputs[key] = (out, resource_mapping, checked)
        reference = {"reference": f"urn:uuid:{resource_id}"}
        self.built[memo] = reference
        if by_value is not None and found is not None:
            self.built_from_value[by_value] = reference
        return reference

    def lets(self, mapping: ResourceMapping, ctx: Context, out: Output) -> Lets:
        """The $let values of a resource, each computed once, in order (a later one may use an
        earlier one). One that fails is reported once, as ``Resource.%name``."""
        lets = Lets({})
        scoped = ctx.with_lets(lets)
        for name, node in mapping.lets:
            lets.values[name] = node.evaluate(scoped, out, (((None, mapping.resource_type), "$let"), name))
        return lets

    def referenced(self, name, ctx, out, origin):
        if name not in self.mappings.resources:
            out.errors.append(f"no resource mapping {name!r} (from {origin})")
            return None
        return self.build(name, ctx)

    def data_identity(self, mapping: ResourceMapping, resource: dict, ctx: Context) -> tuple[str, str] | None:
        """The resource's stable ID and its conditional-update URL from its data (its first
        identifier, else its ``$key``); None when the data gives none (``position_identity``)."""
        kind = mapping.resource_type
        for identifier in resource.get("identifier", []) or []:
            value = identifier.get("value")
            if value:
                system = identifier.get("system", "")
                # Without a system, '|value' (FHIR token search: "no system"), so that a resource
                # with the same value under some system is not taken for this one.
                token = f"{system}|{value}"
                return stable_id(kind, system, value), f"{kind}?identifier={uri_quote(token, safe='|:/')}"
        if mapping.key:
            try:
                parts = [str(plain(getter(ctx)) or "") for getter in mapping.key]
            except DataError as exc:
                self.errors.append(f"{kind} ($key): {exc} (from {mapping.path})")
                parts = []
            if any(parts):
                resource_id = stable_id(kind, *parts)
                return resource_id, f"{kind}/{resource_id}"
        return None

    def position_identity(self, mapping: ResourceMapping) -> tuple[str, str]:
        kind = mapping.resource_type
        # No identity in the data: from the message's content and the resource's place in it, so
        # a resend or a replay updates in place, and no two different messages share an ID (not
        # even with the same sender and control ID, which senders do reuse).
        position = sum(1 for key in self.entries if key[0] == kind)
        resource_id = stable_id(kind, self.fingerprint, str(position))
        return resource_id, f"{kind}/{resource_id}"

    def provenance(self, header):
        """The Provenance of the Bundle: the message it was made from (source), the sender
        (author) and hl7bridge (assembler), the route and mapping version (policy), when."""
        message = self.message
        seps = message.seps
        facility = header.sending_facility
        described = f"{header.message_code or 'HL7 v2'} message {header.control_id.strip()}" + \
            (f" from {facility}" if facility else "")
        targets = [{"reference": entry["fullUrl"]} for entry in self.entries.values()]
        provenance = {
            "resourceType": "Provenance",
            "target": targets,
            "recorded": self.now.astimezone(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z"),
            "policy": [urn("route", self.route or "none"),
                       urn("mapping", self.version)],
            "activity": {"coding": [{"system": V2_EVENTS, "code": header.trigger_event}]} if header.trigger_event
            else None,
            "agent": [
                {"type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/provenance-participant-type",
                                      "code": "author", "display": "Author"}]},
                 "who": {"display": " ".join(p for p in (header.sending_application, facility and f"({facility})")
                                             if p) or "the sender"}},
                {"type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/provenance-participant-type",
                                      "code": "assembler", "display": "Assembler"}]},
                 "who": {"display": "hl7bridge"}},
            ],
            "entity": [{"role": "source", "what": {
                "identifier": {"system": urn("message", facility or "unknown"), "value": header.control_id.strip()},
                "display": described}}],
        }
        moment = message.segments[0].field(7)
        if moment:
            try:
                provenance["occurredDateTime"] = fhir_datetime(moment.split(seps.component)[0], self.ctx.tz, self.ctx)
            except DataError as exc:
                self.ctx.warn(f"MSH-7 cannot be read ({exc}): Provenance.occurredDateTime left out")
        provenance = {k: v for k, v in provenance.items() if v not in (None, [], {})}
        if not header.control_id.strip():
            del provenance["entity"]
        resource_id = stable_id("Provenance", self.fingerprint)
        provenance = {"resourceType": "Provenance", "id": resource_id,
                      **{k: v for k, v in provenance.items() if k != "resourceType"}}
        key = ("Provenance", resource_id)
        self.entries[key] = {"fullUrl": f"urn:uuid:{resource_id}", "resource": provenance,
                             "request": {"method": "PUT", "url": f"Provenance/{resource_id}"}}
        # Its shape is ours and fixed; only the values taken from the message need checking.
        self.outputs[key] = (None, None, provenance_values_valid(provenance))

    def validate(self):
        """Check every resource's values (``fhirspec.problems``; the structure was checked when the
        mappings loaded), and with ``strict`` validate each with fhir.resources as well."""
        for key, entry in self.entries.items():
            resource = entry["resource"]
            out, mapping, checked = self.outputs[key]
            # A resource the generated builder made had its values checked as they were made.
            found = [] if checked else \
                [{"type": kind, "loc": loc, "msg": words} for loc, kind, words in fhirspec.problems(resource)]
            if self.strict and not found:
                checked = resource
                if resource["resourceType"] == "Provenance" and len(resource.get("target", [])) > 1:
                    # Its targets are the Bundle's own urn:uuid fullUrls, all alike: one stands for all.
                    checked = {**resource, "target": resource["target"][:1]}
                try:
                    validate_resource(checked)
                except ValidationError as exc:
                    found = exc.errors()
            for problem in found:
                where = (resource["resourceType"], *problem["loc"])
                element = ".".join(str(p) for p in where)
                self.errors.append(f"{element}: {self.explain(problem, where, out, mapping)}")
            for problem in invariant_problems(resource):
                located = ""
                if mapping is not None:
                    node = mapping.node_at((getattr(problem, "element", "start"),))
                    located = f" (from {mapping.explain(node)})" if node is not None else ""
                self.errors.append(f"{resource['resourceType']}: {problem}{located}")

    def explain(self, problem: dict, where: tuple, out: Output | None, mapping: ResourceMapping | None) -> str:
        """A fhir.resources (pydantic) complaint in words, with the mapping line it came from."""
        kind = problem.get("type", "")
        origin = out.origin_of(where) if out is not None else None
        if kind == "missing":
            node = mapping.node_at(tuple(str(p) for p in problem["loc"] if not isinstance(p, int))) \
                if mapping is not None else None
            if node is not None:
                return (f"FHIR requires it, but nothing came from the message for it: the fields it is read "
                        f"from are empty (from {mapping.explain(node)})")
            return "FHIR requires it, and the mapping gives it nothing"
        words = {
            "less_than_equal": "the value is too large for this FHIR element",
            "greater_than_equal": "the value is too small for this FHIR element",
            "int_parsing": "a whole number is needed",
            "int_from_float": "a whole number is needed",
            "decimal_parsing": "a number is needed",
            "string_type": "text is needed",
            "extra_forbidden": "this element does not exist in FHIR R4",
        }.get(kind)
        message = words or problem["msg"].replace("Value error, ", "")
        return message + (f" (from {origin})" if origin else "")


def provenance_values_valid(provenance: dict) -> bool:
    """Whether every value of a Provenance built by ``Conversion.provenance`` that comes from the
    message (or could be empty) is a valid FHIR value; False sends it through ``fhirspec.problems``,
    which says what is wrong. The rest (the targets, the agents' types, ``recorded``) is built
    here from values that are valid by construction."""
    checks = fhirspec.VALUE_CHECKS
    values = [("uri", policy) for policy in provenance["policy"]]
    values += [("string", agent["who"]["display"]) for agent in provenance["agent"]]
    for coding in provenance.get("activity", {}).get("coding", ()):
        values.append(("code", coding["code"]))
    for entity in provenance.get("entity", ()):
        identifier = entity["what"]["identifier"]
        values += [("uri", identifier["system"]), ("string", identifier["value"]),
                   ("string", entity["what"]["display"])]
    if "occurredDateTime" in provenance:
        values.append(("dateTime", provenance["occurredDateTime"]))
    return all(checks[kind](value) is None for kind, value in values)


class Invariant(str):
    """A broken invariant, in words, and the element it is about (to name the mapping line)."""

    element = "start"

    def __new__(cls, text: str, element: str = "start"):
        made = super().__new__(cls, text)
        made.element = element
        return made


def invariant_problems(resource: dict) -> list[str]:
    """FHIR invariants fhir.resources does not check and mappings could break, in words
    (``Invariant``: each knows the element it is about)."""
    if resource.get("resourceType") != "Appointment":
        return []
    problems = []
    has_start, has_end = "start" in resource, "end" in resource
    if has_start != has_end:
        problems.append(Invariant("FHIR invariant app-2: an Appointment has both a start and an end, or neither "
                                  f"(it has only {'a start' if has_start else 'an end'})"))
    elif not has_start and resource.get("status") not in UNTIMED_STATUSES:
        problems.append(Invariant(f"FHIR invariant app-3: an Appointment with status {resource.get('status')} needs a "
                                  "start and an end, and the message gives no start time"))
    if "cancelationReason" in resource and resource.get("status") not in CANCELLED_STATUSES:
        problems.append(Invariant(f"FHIR invariant app-4: only a cancelled or no-show Appointment has a cancelation "
                                  f"reason, and this one's status is {resource.get('status')}", "cancelationReason"))
    return problems
