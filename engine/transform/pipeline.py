"""The pipeline: parse -> route -> (structure check) -> map -> validate -> deliveries to create.

``convert`` is the one function every path through the engine converts a message with: the
listener (for routes that ACK after mapping), the converter process (the others), ``hl7bridge
convert`` and ``hl7bridge test`` (dry runs), and ``hl7bridge replay --remap``. ``record`` then
journals what it came to, queues the deliveries and keeps the scheduling-to-cash record current
(``engine.reconcile.record.apply``), inside the caller's transaction. Plain Python:
no sockets, no reactor; the caller decides which thread it runs in.
"""

from __future__ import annotations

import logging
import traceback
from dataclasses import dataclass, field
from datetime import datetime

import orjson

from ..delivery import outbox
from ..errors import ConfigError, ParseError
from ..hl7.charset import decode
from ..hl7.er7 import Message, parse
from ..hl7.header import Header, read_header
from ..hl7.standard import validate as validate_structure
from ..reconcile import record as reconcile_record
from ..reconcile.facts import NO_FACTS, Facts, extract, zone_of
from ..reconcile.settings import ReconcileSettings
from ..stamps import iso, utc_now
from ..store.base import MAPPED, MAPPING_ERROR, UNROUTED, ConversionRecord, Journal, encode_notes
from .mappings import MappingError
from .project import Project
from .routes import Route

log = logging.getLogger("hl7bridge.pipeline")

class RouteNotFound(ConfigError):
    """A route asked for by name (``--route``, or the one a journaled message took) is not configured."""

    def __init__(self, name: str, project: Project):
        self.name = name
        super().__init__(f"no route named {name!r}",
                         hint=f"routes: {', '.join(r.name for r in project.routes) or 'none'}")


@dataclass
class Converted:
    """What the pipeline made of one message."""

    header: Header | None  # None when the message could not be read
    route: Route | None
    status: str  # MAPPED, MAPPING_ERROR or UNROUTED
    bundle: dict | None = None
    problems: list = field(default_factory=list)
    destinations: list = field(default_factory=list)  # where its deliveries go (when mapped)
    warnings: list = field(default_factory=list)  # what mapping assumed (the reader's are the message's)
    # What the message says about the scheduling-to-cash workflow, and the rules to link it by
    # (engine.reconcile): kept by ``record`` whether or not the message could be mapped.
    facts: Facts = NO_FACTS
    reconcile: ReconcileSettings | None = None

    @property
    def ok(self) -> bool:
        return self.bundle is not None and not self.problems

    def record(self, converted_at: str, route_name: str | None = None) -> ConversionRecord:
        """The conversion as the journal keeps it: the Bundle as compact JSON (orjson: a fifth of
        the standard library's time for a 10 KB Bundle, and characters kept as they are, not as
        \\u escapes), and in ``problems``
        a JSON list of texts: the problems, then the warnings (``notes``)."""
        name = self.route.name if self.route is not None else route_name
        notes = encode_notes(self.problems, self.warnings)
        if self.status == MAPPED:
            return ConversionRecord(name, MAPPED, converted_at, orjson.dumps(self.bundle).decode(), notes)
        return ConversionRecord(name, MAPPING_ERROR, converted_at, None, notes)


def read(raw: bytes, charset: str | None = None) -> Message:
    """Parse: bytes to a message. ``charset`` is the one the journal recorded for them; without it
    MSH-18 (or the default) says. Raises ``ParseError``."""
    text = raw.decode(charset or "utf-8", errors="replace") if charset is not None else decode(raw).text
    return parse(text)


def route_of(project: Project, message: Message, header: Header | None = None,
             route_name: str | None = None) -> Route | None:
    """Route: the named route (``RouteNotFound`` when it is not configured), else the first that matches."""
    if route_name is not None:
        found = project.routes.get(route_name)
        if found is None:
            raise RouteNotFound(route_name, project)
        return found
    return project.route_for(message, header)


def convert(project: Project, message: Message, *, header: Header | None = None, route: Route | None = None,
            route_name: str | None = None, now: datetime | None = None,
            mapping_version: str | None = None) -> Converted:
    """The whole pipeline for one message: route it (unless ``route`` is given), check its
    structure when the route says ``validate: structure``, map it, check every resource's values
    (with fhir.resources as well when the route says ``validate: strict``), and
    say which destinations its deliveries go to. Never raises for a message that cannot be
    mapped: ``problems`` says why (each with the FHIR element, mapping file and line, HL7 field).
    ``now`` is the conversion's time (the Provenance's ``recorded``; the clock when not given);
    ``mapping_version`` stands in for the mappings' own in the Provenance (``hl7bridge test``)."""
    header = header or read_header(message)
    if route is None:
        route = route_of(project, message, header, route_name)
    if route is None:
        return Converted(header, None, UNROUTED,
                         problems=[f"no route matches {header.message_code} from {header.sending_facility or '-'}"])
    facts = extract(message, iso(now or utc_now()), zone_of(route.timezone))
    problems = []
    if "structure" in route.validate:
        report = validate_structure(message.normalized)
        problems += [f"structure: {error}" for error in report.errors]
    result = None
    if not problems:
        try:
            result = project.mappings.convert(message, route.mapping, route.timezone, route=route.name, now=now,
                                              version=mapping_version, strict=route.strict)
        except MappingError as exc:
            problems = exc.problems
        except ParseError as exc:
            problems = [str(exc)]
        except Exception as exc:  # noqa: BLE001 - one message must never stop the engine's mapping
            # A bug of ours, not the sender's: said in words (never Python's own text, which may
            # quote message content); the log gets where in the code, without content.
            frame = traceback.extract_tb(exc.__traceback__)[-1]
            log.error("internal error mapping message %s from %s: %s:%s in %s", header.control_id.strip(),
                      header.sending_facility or "-", frame.filename, frame.lineno, frame.name)
            problems = ["hl7bridge could not map this message because of an internal error (a bug); the message "
                        "is kept in the journal: report it with its control ID, and replay it once fixed"]
    if problems:
        return Converted(header, route, MAPPING_ERROR, problems=problems, facts=facts, reconcile=project.reconcile)
    return Converted(header, route, MAPPED, result.bundle, destinations=project.destinations_of(route),
                     warnings=result.warnings, facts=facts, reconcile=project.reconcile)


def record(journal: Journal, message_id: int, converted: Converted, converted_at: str, now: datetime, *,
           update_status: bool = False, set_route: bool = False, only_missing: bool = False,
           route_name: str | None = None):
    """Journal a message's conversion and queue its deliveries, inside the caller's transaction.

    ``update_status``: the message takes the conversion's status (it was journaled before it was
    mapped); ``set_route``: and its route; ``only_missing``: queue only destinations the message
    has no delivery for yet (a replay with --remap)."""
    conversion = converted.record(converted_at, route_name)
    journal.record_conversion(message_id, conversion, update_status=update_status,
                              route=conversion.route if set_route else None)
    if converted.facts is not NO_FACTS:
        reconcile_record.apply(journal, message_id, converted_at, converted.facts, converted.reconcile or ReconcileSettings())
    if converted.status != MAPPED:
        return
    destinations = converted.destinations
    if only_missing:
        existing = journal.delivery_destinations(message_id)
        destinations = [d for d in destinations if d.name not in existing]
    outbox.queue(journal, message_id, destinations, now)
