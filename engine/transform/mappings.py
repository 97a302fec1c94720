"""Loading a mapping directory and converting messages to FHIR transaction Bundles.

    mappings/
      message/SIU.yaml        which resources a message family yields, from which segments
      resource/Appointment.yaml   one template per FHIR resource
      datatype/CX.yaml        reusable pieces: an HL7 data type to a FHIR data type
      codesystem/filler-status.yaml   code maps (HL7 tables to FHIR codes)

Every resource gets an ID derived from its first identifier (or its ``$key``), so the same message
converted twice gives the same Bundle, and every entry is a conditional update
(``PUT Patient?identifier=system|value``): sent twice, it changes nothing downstream.
Every resource is validated with fhir.resources (R4, ``fhir.resources.R4B``) before it leaves;
a problem names the FHIR element and the mapping line and HL7 field it came from.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import timezone
from pathlib import Path
from urllib.parse import quote
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from fhir.resources.R4B import get_fhir_model_class
from pydantic import ValidationError

from ..hl7.er7 import Message
from ..errors import ConfigError, Hl7BridgeError
from ..yamlconf import Section, load_yaml
from ..stamps import stable_id
from .expr import Context, ExpressionError, compile_condition, compile_expression, raw_selector
from .templates import Obj, Output, compile_template, expression_error
from .templates import _each as each_selector
from .templates import segment_of


class MappingError(Hl7BridgeError):
    """A message could not be converted; ``problems`` lists each with its FHIR and HL7 location."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("; ".join(problems))


@dataclass
class CodeMap:
    """A code map: HL7 codes to FHIR codes (or any text), with an optional default."""

    name: str
    entries: dict
    default: str | None = None

    def lookup(self, code: str):
        if code in self.entries:
            return self.entries[code]
        upper = code.upper()
        return self.entries.get(upper, self.default)


@dataclass
class ResourceMapping:
    name: str
    resource_type: str
    template: Obj
    key: list = field(default_factory=list)  # getters for the ID when there is no identifier
    path: str = ""


@dataclass
class ResourceRule:
    """One line of a message mapping: which resource, from which segment(s), when."""

    resource: str
    source: object  # selector of segments (each one is the context) or values
    each: bool
    when: object
    line: int


@dataclass
class MessageMapping:
    name: str
    description: str
    rules: list
    timezone: str | None
    path: str


class MappingSet:
    """Every mapping in a directory, compiled and cross-checked."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self.tables: dict[str, CodeMap] = {}
        self.datatypes: dict = {}
        self.resources: dict[str, ResourceMapping] = {}
        self.messages: dict[str, MessageMapping] = {}
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
        self._check_names()

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
        key = []
        for text in data.get("$key", []) or []:
            try:
                key.append(compile_expression(text, names))
            except ExpressionError as exc:
                raise expression_error(exc, "$key", path, data.line_of("$key"), segment) from None
        body = type(data)({k: v for k, v in data.items() if k not in ("resourceType", "$key")})
        body.line, body.key_lines = data.line, data.key_lines
        template = compile_template(body, path, data.line, names, resource_type, segment)
        return ResourceMapping(path.stem, resource_type, template, key, str(path))

    def _message(self, path, names) -> MessageMapping:
        data = load_yaml(path)
        section = Section(data, path, "message mapping", {"description", "resources", "timezone"})
        rules = []
        for index, item in enumerate(section.get("resources", list, []), 1):
            rule = Section(item, path, f"resources[{index}]", {"resource", "from", "each", "when"},
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
            rules.append(ResourceRule(resource, source, rule.get("each", bool, "[*]" in source_text), when, rule.line()))
        timezone_name = section.get("timezone", str, None)
        if timezone_name is not None:
            check_timezone(timezone_name, section, "timezone")
        return MessageMapping(path.stem, section.get("description", str, ""), rules, timezone_name, str(path))

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
            for child in getattr(node, "items", None) or []:
                stack.append((child, path))
            for _, child in getattr(node, "fields", None) or []:
                stack.append((child, path))

    # -- using ----------------------------------------------------------------------------------

    def datatype(self, name):
        return self.datatypes[name]

    def summary(self) -> dict:
        return {kind: sorted(getattr(self, attr)) for kind, attr in
                (("message", "messages"), ("resource", "resources"), ("datatype", "datatypes"), ("codesystem", "tables"))}

    def convert(self, message: Message, mapping: str, tz: str | None = None) -> dict:
        """Convert one message with ``mappings/message/<mapping>.yaml``; returns a FHIR Bundle dict.

        Raises ``MappingError`` listing every problem (evaluation and FHIR validation).
        """
        if mapping not in self.messages:
            raise MappingError([f"no message mapping {mapping!r} (mappings/message/{mapping}.yaml)"])
        message_mapping = self.messages[mapping]
        zone = zone_of(tz or message_mapping.timezone)
        try:
            return Conversion(self, message, zone).run(message_mapping)
        except MappingError:
            # Again, recording where every value came from, so each problem can name its origin.
            return Conversion(self, message, zone, tracking=True).run(message_mapping)


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


class Conversion:
    """One message being converted: the resources built so far, by type and ID."""

    def __init__(self, mappings: MappingSet, message: Message, tz, tracking: bool = False):
        self.mappings = mappings
        self.message = message
        self.tracking = tracking
        self.ctx = Context(message, None, None, tz, mappings.tables)
        self.entries: dict[tuple[str, str], dict] = {}
        self.outputs: dict[tuple[str, str], Output] = {}
        self.errors: list[str] = []

    def run(self, mapping: MessageMapping) -> dict:
        for rule in mapping.rules:
            contexts = rule.source(self.ctx)
            if not rule.each:
                contexts = contexts[:1]
            for item in contexts:
                ctx = item if isinstance(item, Context) else self.ctx.at(value=item)
                if rule.when is not None and not rule.when(ctx):
                    continue
                self.build(rule.resource, ctx)
        self.validate()
        if self.errors:
            raise MappingError(self.errors)
        return {
            "resourceType": "Bundle",
            "type": "transaction",
            "entry": [entry for entry in self.entries.values()],
        }

    def build(self, name: str, ctx: Context) -> dict | None:
        resource_mapping = self.mappings.resources[name]
        out = Output(self.mappings, self, self.tracking)
        body = resource_mapping.template.build(ctx, out, (resource_mapping.resource_type,)) or {}
        self.errors.extend(out.errors)
        if not body:
            return None
        resource = {"resourceType": resource_mapping.resource_type, **body}
        resource_id, url = self.identity(resource_mapping, resource, ctx)
        key = (resource_mapping.resource_type, resource_id)
        if key not in self.entries:
            if url.startswith(resource_mapping.resource_type + "/"):
                resource = {"resourceType": resource_mapping.resource_type, "id": resource_id, **body}
            self.entries[key] = {
                "fullUrl": f"urn:uuid:{resource_id}",
                "resource": resource,
                "request": {"method": "PUT", "url": url},
            }
            self.outputs[key] = out
        return {"reference": f"urn:uuid:{resource_id}"}

    def referenced(self, name, ctx, out, origin):
        if name not in self.mappings.resources:
            out.errors.append(f"no resource mapping {name!r} (from {origin})")
            return None
        return self.build(name, ctx)

    def identity(self, mapping: ResourceMapping, resource: dict, ctx: Context) -> tuple[str, str]:
        """The resource's stable ID and its conditional-update URL."""
        kind = mapping.resource_type
        for identifier in resource.get("identifier", []) or []:
            value = identifier.get("value")
            if value:
                system = identifier.get("system", "")
                token = f"{system}|{value}" if system else value
                return stable_id(kind, system, value), f"{kind}?identifier={quote(token, safe='|:/')}"
        if mapping.key:
            parts = [str(getter(ctx) or "") for getter in mapping.key]
            if any(parts):
                resource_id = stable_id(kind, *parts)
                return resource_id, f"{kind}/{resource_id}"
        # No identity in the data: stable for this message (a replay updates in place).
        msh = self.message.segments[0]
        position = sum(1 for key in self.entries if key[0] == kind)
        resource_id = stable_id(kind, msh.field(4), msh.field(10), str(position))
        return resource_id, f"{kind}/{resource_id}"

    def validate(self):
        for key, entry in self.entries.items():
            resource = entry["resource"]
            try:
                validate_resource(resource)
            except ValidationError as exc:
                out = self.outputs[key]
                for problem in exc.errors():
                    where = (resource["resourceType"], *problem["loc"])
                    origin = out.origin_of(where)
                    located = f" (from {origin})" if origin else ""
                    element = ".".join(str(p) for p in where)
                    self.errors.append(f"{element}: {problem['msg']}{located}")
