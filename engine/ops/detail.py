"""A journal row made readable: summary, identifiers, every field with its HL7 name, the ACK,
its conversion, and each delivery's story (attempts with what the server said, and replays).

``journal show`` prints it and the dashboard shows it; both read the same plain data from here.
"""

from __future__ import annotations

import json
import re

from ..hl7.charset import decode
from ..hl7.er7 import parse, unescape
from ..errors import ParseError
from ..hl7.standard import field_info, validate as validate_structure
from ..delivery.outbox import waits_for
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
        detail["deliveries"] = delivery_stories(record["history"])
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



def describe_ack(ack: str | None, version: str | None = None) -> list[dict]:
    """The ACK's segments with each field by name, like the message's (``segments``)."""
    if not ack:
        return []
    try:
        message = parse(ack)
    except ParseError:
        return []
    segments = []
    for segment in message.segments:
        fields = []
        for number, value in enumerate(segment.fields[1:], start=1):
            if value == "":
                continue
            info = field_info(segment.name, number, version or "2.5")
            shown = value if segment.name == "MSH" and number <= 2 else unescape(value, message.seps)
            fields.append({"path": f"{segment.name}-{number}", "name": info.name if info else None, "value": shown})
        segments.append({"segment": segment.name, "fields": fields})
    return segments


_DIAGNOSTICS = re.compile(r'"diagnostics"\s*:\s*"((?:[^"\\]|\\.)*)"')


def server_said(response: str | None, most: int = 5) -> list[str]:
    """What a server's answer says, for people, from the response body the journal kept: the
    issues of a FHIR OperationOutcome (severity, code, diagnostics, where), the failed entries of
    a transaction-response Bundle with their outcomes, or the first lines of any other body."""
    text = (response or "").strip()
    if not text:
        return []
    try:
        body = json.loads(text)
    except ValueError:
        body = None
    if isinstance(body, dict) and body.get("resourceType") == "OperationOutcome":
        return _issues(body)[:most]
    if isinstance(body, dict) and body.get("resourceType") == "Bundle":
        found = []
        for index, entry in enumerate(body.get("entry") or []):
            answer = (entry or {}).get("response") or {}
            status = str(answer.get("status", ""))
            if status[:1] in ("2", ""):
                continue
            issues = _issues(answer.get("outcome")) if isinstance(answer.get("outcome"), dict) else []
            found += [f"entry {index}: {status}" + (f": {issue}" if issue else "") for issue in issues or [""]]
        return found[:most]
    if body is None and text.startswith("{") and '"diagnostics"' in text:
        # Cut off at the journal's limit: the diagnostics are still worth reading.
        return [json.loads(f'"{m}"') for m in _DIAGNOSTICS.findall(text)][:most] + ["(the response was cut off)"]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return [line[:300] for line in lines[:most]]


def _issues(outcome) -> list[str]:
    found = []
    for issue in (outcome or {}).get("issue") or []:
        if not isinstance(issue, dict):
            continue
        words = issue.get("diagnostics") or ((issue.get("details") or {}).get("text")) or ""
        where = issue.get("expression") or issue.get("location") or []
        line = " ".join(part for part in (issue.get("severity"), issue.get("code")) if part)
        line += f": {words}" if words else ""
        line += f" [{', '.join(where)}]" if where else ""
        found.append(line)
    return found


def _replay_applies(replay: dict, destination: str) -> bool:
    if not replay.get("destination"):
        return True
    try:
        return destination in json.loads(replay["destination"])
    except ValueError:
        return replay["destination"] == destination


def delivery_stories(history: dict) -> list[dict]:
    """Each delivery with its attempts and the replays that concern it, in time order.

    ``attempts`` counts every attempt listed; ``attempts_since_replay`` the ones since the
    delivery was last queued again (what its retry limit counts); ``reason`` is its last error
    with what the server said about it (an OperationOutcome's diagnostics, not only "HTTP 422");
    ``waits_for`` what holds it back, if anything (an earlier message or delivery with its key).
    """
    stories = []
    replays = history.get("replays") or []
    for delivery in history.get("deliveries") or []:
        events = []
        for attempt in delivery.get("tries") or []:
            said = server_said(attempt.get("response")) if attempt.get("outcome") != "ok" else []
            events.append({"at": attempt["started_at"], "kind": "attempt", "outcome": attempt["outcome"],
                           "status": attempt.get("status"), "duration_ms": attempt.get("duration_ms"),
                           "server_said": said, "response": attempt.get("response") or ""})
        for replay in replays:
            if _replay_applies(replay, delivery["destination"]):
                events.append({"at": replay["requested_at"], "kind": "replay", "who": replay["who"],
                               "why": replay["why"], "remapped": bool(replay.get("remapped"))})
        events.sort(key=lambda event: event["at"])  # stable: on a tie the attempt (listed first) came first
        tried = [event for event in events if event["kind"] == "attempt"]
        reason = delivery.get("last_error")
        if reason and tried and tried[-1]["server_said"]:
            reason = f"{reason}: {tried[-1]['server_said'][0]}"
        stories.append({
            "id": delivery["id"], "destination": delivery["destination"], "state": delivery["state"],
            "attempts": len(tried), "attempts_since_replay": delivery["attempts"],
            "replayed": any(event["kind"] == "replay" for event in events),
            "next_attempt_at": delivery.get("next_attempt_at"), "delivered_at": delivery.get("delivered_at"),
            "last_error": delivery.get("last_error"), "reason": reason, "events": events,
            "waits_for": waits_for(delivery),
        })
    return stories
