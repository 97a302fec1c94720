"""Text output shared by the commands: aligned tables and the ``journal show`` page."""

from __future__ import annotations


def format_table(rows: list[dict], columns: list[str]) -> str:
    """A plain aligned text table, like sqlite-utils' default output."""
    if not rows:
        return "(no messages)"
    cells = [[("" if row.get(c) is None else str(row.get(c))) for c in columns] for row in rows]
    widths = [max(len(c), *(len(line[i]) for line in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths)).rstrip(),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(v.ljust(w) for v, w in zip(line, widths)).rstrip() for line in cells]
    return "\n".join(lines)


def delivery_state(delivery: dict) -> str:
    """'dead after 2 attempt(s)', and after a replay how many of them came since it."""
    text = f"{delivery['state']} after {delivery['attempts']} attempt(s)"
    if delivery["replayed"] and delivery["attempts_since_replay"] != delivery["attempts"]:
        text += f", {delivery['attempts_since_replay']} since it was replayed"
    return text


def detail_text(detail: dict) -> str:
    lines = []
    summary = detail["summary"]
    for key, value in summary.items():
        if value not in (None, "", []):
            lines.append(f"{key + ':':24}{value}")
    if detail["identifiers"]:
        lines.append("identifiers:")
        for ident in detail["identifiers"]:
            authority = f" ({ident['authority']})" if ident.get("authority") else ""
            lines.append(f"  {ident['kind']:22}{ident['value']}{authority}")
    lines.append("")
    lines.append("message:")
    for segment in detail["segments"]:
        lines.append(f"  {segment['segment']}")
        for fld in segment["fields"]:
            name = f" {fld['name']}" if fld["name"] else ""
            lines.append(f"    {fld['path']:10}{name}: {fld['value']}")
    if detail.get("validation"):
        report = detail["validation"]
        lines.append("")
        lines.append(f"validation: {len(report['errors'])} errors, {len(report['warnings'])} warnings")
        lines += [f"  error: {e}" for e in report["errors"]]
        lines += [f"  warning: {w}" for w in report["warnings"]]
    lines.append("")
    lines.append("ack:")
    lines += [f"  {segment}" for segment in (detail["ack"] or "(none)").split("\r") if segment]
    conversion = detail.get("conversion")
    if conversion:
        lines.append("")
        lines.append(f"conversion: {conversion['status']} by route {conversion['route']} at {conversion['converted_at']}")
        for problem in conversion.get("problems") or []:
            lines.append(f"  problem: {problem}")
        for warning in conversion.get("warnings") or []:
            lines.append(f"  warning: {warning}")
        if conversion.get("bundle"):
            entries = conversion["bundle"].get("entry", [])
            lines.append(f"  bundle: {len(entries)} entries")
            for entry in entries:
                lines.append(f"    {entry['request']['method']} {entry['request']['url']}")
    for delivery in detail.get("deliveries") or []:
        lines.append("")
        lines.append(f"delivery to {delivery['destination']}: {delivery_state(delivery)}"
                     + (f" ({delivery['reason']})" if delivery["reason"] else ""))
        if delivery.get("waits_for"):
            lines.append(f"  waits for {delivery['waits_for']}")
        for event in delivery["events"]:
            if event["kind"] == "replay":
                lines.append(f"  {event['at']}  replayed by {event['who']}: {event['why']}"
                             + (" (mapped again)" if event["remapped"] else ""))
                continue
            status = f" HTTP {event['status']}" if event["status"] else ""
            lines.append(f"  {event['at']}  {event['outcome']}{status}  {event['duration_ms'] or 0:.0f} ms")
            lines += [f"      {said}" for said in event["server_said"]]
    history = detail.get("history") or {}
    if not detail.get("deliveries"):
        for replay in history.get("replays", []):
            lines.append(f"replayed {replay['requested_at']} by {replay['who']}: {replay['why']}"
                         + (" (mapped again)" if replay["remapped"] else ""))
    return "\n".join(lines)
