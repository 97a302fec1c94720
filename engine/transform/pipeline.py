"""Routing and mapping a journaled message: plain Python, shared by ingest and the converter.

``decide`` picks the route and, when the route wants its ACK after mapping, converts the message
at once so the ACK can say whether it worked. ``convert_record`` turns one message into the
``ConversionRecord`` the journal keeps (a Bundle, or the problems that stopped it).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from ..hl7.ack import ACCEPT, ERROR, REJECT, AckError
from ..hl7.er7 import Message
from ..errors import ParseError
from ..hl7.header import Header
from ..store.journal import ConversionRecord
from .mappings import MappingError
from .project import Project
from .routes import Route
from ..hl7.standard import validate as validate_structure

UNROUTED_POLICIES = ("accept", "reject")
MAPPED, MAPPING_ERROR, UNROUTED = "mapped", "mapping_error", "unrouted"


@dataclass
class Decision:
    """What routing decided for an accepted message."""

    route: Route | None
    status: str  # accepted (to be converted later), mapped, mapping_error, unrouted, rejected
    outcome: str  # ACCEPT, ERROR or REJECT: what the ACK says
    error: AckError | None = None
    conversion: ConversionRecord | None = None


def convert_record(project: Project, route: Route, message: Message, converted_at: str) -> ConversionRecord:
    """Map one message with its route's mapping (and structural validation if the route asks)."""
    problems = []
    if route.validate == "structure":
        report = validate_structure(message.text)
        problems += [f"structure: {error}" for error in report.errors]
    bundle = None
    if not problems:
        try:
            bundle = project.mappings.convert(message, route.mapping, route.timezone)
        except MappingError as exc:
            problems = exc.problems
        except (ParseError, ValueError) as exc:
            problems = [str(exc)]
    if problems:
        return ConversionRecord(route.name, MAPPING_ERROR, converted_at, None, json.dumps(problems))
    return ConversionRecord(route.name, MAPPED, converted_at, json.dumps(bundle, separators=(",", ":")), None)


def decide(project: Project, message: Message, header: Header, unrouted: str, converted_at: str) -> Decision:
    """Route an accepted message; map it now when its route ACKs after mapping."""
    route = project.route_for(message, header)
    if route is None:
        if unrouted == "reject":
            text = f"no route takes {header.message_code} from {header.sending_facility or 'this sender'}"
            return Decision(None, "rejected", REJECT, AckError(200, text, "MSH-9"))
        return Decision(None, UNROUTED, ACCEPT)
    if route.ack_after != "mapping":
        return Decision(route, "accepted", ACCEPT)
    record = convert_record(project, route, message, converted_at)
    if record.status == MAPPED:
        return Decision(route, MAPPED, ACCEPT, conversion=record)
    # The sender learns what failed, not where our mapping files live.
    first = json.loads(record.problems)[0].split(" (from ")[0]
    outcome = {"AE": ERROR, "AR": REJECT, "AA": ACCEPT}[route.mapping_error]
    error = AckError(207, f"cannot be mapped: {first}") if outcome != ACCEPT else None
    return Decision(route, MAPPING_ERROR, outcome, error, record)

