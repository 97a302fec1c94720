"""A journal row made readable: summary, identifiers, every field with its HL7 name, the ACK."""

from __future__ import annotations

import json

from ..hl7.charset import decode
from ..hl7.er7 import parse, unescape
from ..errors import ParseError
from ..hl7.standard import field_info, validate as validate_structure
from ..store.base import decode_notes

SUMMARY_FIELDS = (
    "id", "received_at", "listener", "peer", "route", "status", "error", "error_code", "error_location",
    "warning", "duplicate_of", "control_id", "message_type", "trigger_event", "message_structure",
    "version", "processing_id", "sending_application", "sending_facility", "receiving_application",
    "receiving_facility", "charset", "size", "truncated", "ack_code",
)


def describe_message(record: dict, validate: bool = False) -> dict:
    """What ``journal show`` prints, as plain data (also its ``--json`` output)."""
    charset = record.get("charset") or "utf-8"
    text = record["raw"].decode(charset, errors="replace")
    segments = []
    try:
        message = parse(text)
    except ParseError as exc:
        message = None
        segments.append({"segment": f"(not readable as HL7: {exc})", "fields": []})
    version = record.get("version") or "2.5"
    if message is not None:
        counts: dict[str, int] = {}
        for segment in message.segments:
            counts[segment.name] = counts.get(segment.name, 0) + 1
            occurrence = counts[segment.name]
            label = segment.name if occurrence == 1 else f"{segment.name}[{occurrence}]"
            fields = []
            for number, value in enumerate(segment.fields[1:], start=1):
                if value == "":
                    continue
                info = field_info(segment.name, number, version)
                shown = value if segment.name == "MSH" and number <= 2 else unescape(value, message.seps)
                fields.append({"path": f"{label}-{number}", "name": info.name if info else None,
                               "datatype": info.datatype if info else None, "value": shown})
            segments.append({"segment": label, "fields": fields})
    ack = record.get("ack")
    detail = {
        "summary": {key: record.get(key) for key in SUMMARY_FIELDS},
        "identifiers": record.get("ids", []),
        "segments": segments,
        "ack": decode(ack).text if ack else None,
    }
    detail["summary"]["truncated"] = bool(record.get("truncated"))
    if record.get("history") is not None:
        detail["history"] = record["history"]
    conversion = record.get("conversion")
    if conversion:
        problems, warnings = decode_notes(conversion["problems"])
        detail["conversion"] = {
            "route": conversion["route"],
            "status": conversion["status"],
            "converted_at": conversion["converted_at"],
            "bundle": json.loads(conversion["bundle"]) if conversion["bundle"] else None,
            "problems": problems,
            "warnings": warnings,
        }
    if validate and message is not None:
        report = validate_structure(text)
        detail["validation"] = {"errors": report.errors, "warnings": report.warnings}
    return detail

