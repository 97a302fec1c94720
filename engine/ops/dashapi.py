"""The dashboard's JSON API: one function per call, registered by name in ``CALLS``.

``POST /api/NAME`` with a JSON body runs ``CALLS[NAME](status, body, user)``, which returns a dict
or a Deferred of one (``engine.ops.dashboard.Api`` does the HTTP). Journal reads run in the
engine's reader threads (``Status.read``), replays in its writer thread (``Status.replay``):
never on the reactor. Patient data travels only in these POST bodies and answers, never in a URL.

Adding a page to the dashboard: its calls here (``@call("name")``; ``operator=True`` for one that
changes something), its script in ``static/pages/`` and one line in ``static/app.js``'s PAGES.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from datetime import datetime, timedelta, timezone

from twisted.internet import defer

from ..delivery.outbox import summarize
from ..hl7.identifiers import patient_filter
from ..stamps import parse_moment
from ..store.base import DELIVERY_STATES, STATUSES, SearchQuery, decode_notes
from ..transform.replay import ReplayError
from .detail import delivery_stories, describe_ack, describe_message
from .status import Status

PAGE_MOST = 200  # rows a page of the message list may ask for
REPLAY_MOST = 500  # messages one replay request may name


@dataclass(frozen=True)
class User:
    """Who is signed in: a name (replays are recorded under it) and a role (operator or viewer)."""

    name: str
    role: str = "operator"


class CallError(Exception):
    """A bad request: answered 400 (or ``code``) with the message, in words."""

    def __init__(self, message: str, code: int = 400):
        super().__init__(message)
        self.code = code


CALLS: dict = {}


def call(name: str, operator: bool = False):
    """Register ``fn(status, body, user)`` as ``POST /api/NAME``; ``operator``: viewers may not."""

    def register(fn):
        fn.operator_only = operator
        CALLS[name] = fn
        return fn

    return register


def _text(body: dict, key: str, most: int = 200) -> str | None:
    value = body.get(key)
    if value in (None, ""):
        return None
    if not isinstance(value, (str, int)) or isinstance(value, bool):
        raise CallError(f"{key} must be text")
    value = str(value).strip()
    if len(value) > most:
        raise CallError(f"{key} is longer than {most} characters")
    return value or None


def _moment(body: dict, key: str) -> str | None:
    value = _text(body, key, 40)
    if value is None:
        return None
    try:
        return parse_moment(value)
    except ValueError as exc:
        raise CallError(f"{key}: {exc}") from None


def message_query(body: dict) -> SearchQuery:
    """The message list's filters (all optional) as a ``SearchQuery``: since/until ('2h' or ISO),
    facility, type (SIU or SIU^S12), route, status, destination and delivery_state, patient
    (ID or ID^^^AUTHORITY), control_id, appointment, text, oldest_first, limit, after."""
    status = _text(body, "status", 20)
    if status is not None and status not in STATUSES:
        raise CallError(f"status must be one of {', '.join(STATUSES)}")
    destination, state = _text(body, "destination", 100), _text(body, "delivery_state", 20)
    if state is not None and state not in DELIVERY_STATES:
        raise CallError(f"delivery_state must be one of {', '.join(DELIVERY_STATES)}")
    if destination and not state:
        raise CallError("choose the delivery state to look for at that destination (e.g. dead)")
    patient, authority = patient_filter(_text(body, "patient") or "")
    try:
        limit = int(body.get("limit") or 50)
    except (TypeError, ValueError):
        raise CallError("limit must be a number") from None
    if not 1 <= limit <= PAGE_MOST:
        raise CallError(f"limit must be between 1 and {PAGE_MOST}")
    after = body.get("after")
    if after is not None:
        if not (isinstance(after, list) and len(after) == 2 and isinstance(after[0], str) and isinstance(after[1], int)):
            raise CallError("after must be [received_at, id] of the last row of the page before")
        after = (after[0], after[1])
    return SearchQuery(
        patient=patient or None, patient_authority=authority if patient else None,
        control_id=_text(body, "control_id"), appointment=_text(body, "appointment"),
        message_type=_text(body, "type", 20), sending_facility=_text(body, "facility"),
        route=_text(body, "route"), status=status,
        delivery=(f"{destination}:{state}" if destination else state),
        since=_moment(body, "since"), until=_moment(body, "until"), text=_text(body, "text"),
        oldest_first=bool(body.get("oldest_first")), limit=limit, after=after,
    )


def patient_cx(row: dict) -> str:
    """A row's patient as ID^^^AUTHORITY (the same ID of two authorities is two patients)."""
    if not row.get("patient_id"):
        return ""
    return f"{row['patient_id']}^^^{row['patient_authority']}" if row.get("patient_authority") else row["patient_id"]


@call("summary")
def summary(status: Status, body: dict, user: User):
    """Flow per route per hour over 24 hours, deliveries per destination, ACK latency, who is signed in."""
    since = (datetime.now(timezone.utc) - timedelta(hours=24)).strftime("%Y-%m-%dT%H")
    latency = status.ack_latency

    def read(journal):
        return {**journal.traffic(since), "outbox": summarize(journal.outbox_counts(), journal.outbox_holds())}

    def page(found):
        listeners = status.listeners()
        return {"flow": found["flow"], "delivered": found["delivered"], "outbox": found["outbox"],
                "user": user.name, "role": user.role,
                "listeners": [{"name": item["name"], "address": item["address"], "open": len(item["open"])}
                              for item in listeners],
                "ack_latency": {"count": latency.count,
                                "mean_ms": round(1000 * latency.total / latency.count, 3) if latency.count else None}}

    return status.read(read).addCallback(page)


@call("options")
def options(status: Status, body: dict, user: User):
    """What the filters offer: routes, destinations, statuses and delivery states; and who is signed in."""
    configuration = status.configuration()
    return {"routes": configuration["routes"], "destinations": configuration["destinations"],
            "statuses": list(STATUSES), "delivery_states": list(DELIVERY_STATES),
            "user": user.name, "role": user.role}


@call("exceptions")
def exceptions(status: Status, body: dict, user: User):
    """What needs an operator: dead deliveries (with what the server said), rejected messages,
    mapping errors and held messages, unrouted messages, and control IDs reused with different content."""

    def read(journal):
        found = journal.exceptions(limit=50)
        for row in found["messages"]:
            problems = decode_notes(row.pop("problems", None))[0]
            if problems:
                row["error"] = problems[0].split(" (from ")[0]
        dead = journal.list_deliveries(state="dead", limit=50)
        stories = {}
        for delivery in dead:
            if delivery["message_id"] not in stories:
                stories[delivery["message_id"]] = {s["id"]: s for s in delivery_stories(journal.history(delivery["message_id"]))}
            story = stories[delivery["message_id"]].get(delivery["id"])
            delivery["reason"] = story["reason"] if story else delivery["last_error"]
            delivery["attempts_total"] = story["attempts"] if story else delivery["attempts"]
        unrouted = journal.search(SearchQuery(status="unrouted", limit=50))
        for row in unrouted:
            row["patient"] = patient_cx(row)
        return {"dead": dead, "messages": found["messages"], "unrouted": unrouted, "differing": found["differing"]}

    return status.read(read)


@call("messages")
def messages(status: Status, body: dict, user: User):
    """One page of the message list, newest first (or oldest), with each message's deliveries in
    brief; ``next`` is the ``after`` of the page after it (None on the last page)."""
    query = message_query(body)

    def read(journal):
        rows = journal.search(replace(query, limit=query.limit + 1))
        more, rows = len(rows) > query.limit, rows[: query.limit]
        for row in rows:
            row["patient"] = patient_cx(row)
            row["deliveries"] = [{"destination": d["destination"], "state": d["state"]}
                                 for d in journal.deliveries_of(row["id"])]
        return {"rows": rows, "next": [rows[-1]["received_at"], rows[-1]["id"]] if more and rows else None}

    return status.read(read)


@call("message")
def message(status: Status, body: dict, user: User):
    """One message for its tabs: the raw HL7 (text, and each field by name), the FHIR Bundle, each
    delivery's attempts with the server's response bodies and the replays, and the ACK."""
    try:
        message_id = int(body.get("id"))
    except (TypeError, ValueError):
        raise CallError("id must be a message ID") from None

    def read(journal):
        record = journal.get(message_id)
        if record is None:
            raise CallError(f"no message {message_id}", 404)
        record["conversion"] = journal.conversion(message_id)
        record["history"] = journal.history(message_id)
        detail = describe_message(record)
        detail["raw"] = record["raw"].decode(record.get("charset") or "utf-8", errors="replace")
        detail["ack_segments"] = describe_ack(detail["ack"], record.get("version"))
        detail["summary"]["patient"] = patient_cx({"patient_id": record.get("patient_id"),
                                                   "patient_authority": next(
                                                       (i["authority"] for i in record["ids"]
                                                        if i["kind"] == "patient" and i["value"] == record.get("patient_id")),
                                                       None)})
        return detail

    return status.read(read)


@call("listeners")
def listeners(status: Status, body: dict, user: User):
    """Each listener with its open connections (peer, since, messages, last message) and the
    recently closed ones: no journal read, no message content."""
    return {"listeners": status.listeners()}


@call("replay", operator=True)
def replay(status: Status, body: dict, user: User):
    """Queue messages again, recorded under the signed-in operator: ``items`` [{message_id,
    destination (or none: all of the message's)}], ``why``, and ``remap`` to map them again with
    the current mappings first (a held message, or one fixed by a mapping change)."""
    items = body.get("items")
    if items is None and body.get("message_id") is not None:
        items = [{"message_id": body["message_id"], "destination": body.get("destination")}]
    if not isinstance(items, list) or not items:
        raise CallError("choose at least one message to replay")
    if len(items) > REPLAY_MOST:
        raise CallError(f"at most {REPLAY_MOST} messages at a time")
    groups: dict = {}
    for item in items:
        try:
            message_id = int(item["message_id"])
        except (TypeError, ValueError, KeyError):
            raise CallError("each item needs a message_id") from None
        destination = item.get("destination") or None
        if destination is not None and not isinstance(destination, str):
            raise CallError("destination must be text")
        groups.setdefault(destination, []).append(message_id)
    why = (_text(body, "why", 500) or "replayed from the dashboard")
    remap = bool(body.get("remap"))

    @defer.inlineCallbacks
    def run():
        total = {"messages": 0, "deliveries": 0, "remapped": {}}
        for destination, ids in groups.items():
            done = yield status.replay(sorted(set(ids)), [destination] if destination else None,
                                       f"dashboard:{user.name}", why, remap)
            total["messages"] += done["messages"]
            total["deliveries"] += done["deliveries"]
            for state, count in done.get("remapped", {}).items():
                total["remapped"][state] = total["remapped"].get(state, 0) + count
        return total

    return run().addErrback(lambda failure: failure.trap(ReplayError) and {"error": failure.getErrorMessage()})



def _reconcile_kinds(body: dict) -> list[str] | None:
    from ..reconcile.rules import KINDS

    kind = _text(body, "kind", 40)
    if kind is not None and kind not in KINDS:
        raise CallError(f"kind must be one of {', '.join(KINDS)}")
    return [kind] if kind else None


@call("reconcile")
def reconcile(status: Status, body: dict, user: User):
    """The scheduling-to-cash work queues and KPIs (``engine.reconcile.queue.run``) over ``since``
    (default 30d) up to ``as_of`` (default now), for one ``facility`` and one ``kind`` when given;
    ``acknowledged``: the acknowledged exceptions too."""
    from ..reconcile import queue

    as_of = _moment(body, "as_of")
    now = datetime.fromisoformat(as_of.replace("Z", "+00:00")) if as_of else datetime.now(timezone.utc)
    start = _moment(body, "since") or parse_moment("30d", now)
    kinds, facility = _reconcile_kinds(body), _text(body, "facility", 100)
    settings, erp = status.reconcile_settings()
    since = datetime.fromisoformat(start.replace("Z", "+00:00"))
    if since >= now:
        raise CallError("since must be before as_of (now)")

    def read(journal):
        result = queue.run(journal, settings, erp, since, now, facility, kinds, bool(body.get("acknowledged")))
        return {**result, "role": user.role}

    return status.read(read)


@call("reconcile_detail")
def reconcile_detail(status: Status, body: dict, user: User):
    """What is behind one exception (``id``, as the queue gives it): the appointment with its
    history and linked charge lines, or the charge line with its messages and deliveries."""
    from ..reconcile.rules import KINDS

    ident = _text(body, "id", 300) or ""
    parts = ident.split(":", 2)
    if len(parts) != 3 or parts[0] not in KINDS:
        raise CallError("id must be an exception ID (KIND:FACILITY:SUBJECT)")
    kind, facility, subject = parts

    def read(journal):
        if kind == "missed_charge":
            found = journal.appointment_record(facility, subject)
            return {"kind": kind, "appointment": found}
        charge = journal.charge_record(facility, subject)
        appointment = journal.appointment_record(facility, charge["appointment_id"]) if charge and charge["appointment_id"] else None
        if charge is None:
            raise CallError(f"no charge line {subject} from {facility}", 404)
        return {"kind": kind, "charge": charge, "appointment": appointment}

    return status.read(read)


@call("reconcile_ack", operator=True)
def reconcile_ack(status: Status, body: dict, user: User):
    """Acknowledge an exception (``id``) with a ``note``, recorded under the signed-in operator."""
    ident, note = _text(body, "id", 300), _text(body, "note", 1000)
    if not ident or not note:
        raise CallError("acknowledging needs the exception and a note saying what was done")
    return status.acknowledge(ident, user.name, note).addCallbacks(
        lambda _: {"acknowledged": ident}, lambda failure: failure.trap(ValueError) and {"error": failure.getErrorMessage()})


def outbox_depth(hours: list[str], queued: list[dict], delivered: list[dict], open_now: list[dict]) -> dict:
    """Undelivered deliveries per destination at the end of each hour, worked back from the number
    open now: one hour earlier there were as many, less what was queued in the hour, plus what was
    delivered in it."""
    depth = {}
    for row in open_now:
        depth[row["destination"]] = row["open"]
    destinations = sorted({r["destination"] for r in queued + delivered} | set(depth))
    added = {(r["hour"], r["destination"]): r["queued"] for r in queued}
    done = {(r["hour"], r["destination"]): r["delivered"] for r in delivered}
    series = {}
    for destination in destinations:
        level, values = depth.get(destination, 0), []
        for hour in reversed(hours):
            values.append(max(0, level))
            level = level - added.get((hour, destination), 0) + done.get((hour, destination), 0)
        series[destination] = list(reversed(values))
    return series


@call("charts")
def charts(status: Status, body: dict, user: User):
    """Per hour over the last ``hours`` (24 by default, at most 168): messages received and
    deliveries made, ACK latency and receipt-to-delivery latency (mean and max), and the outbox
    depth per destination."""
    try:
        hours = int(body.get("hours") or 24)
    except (TypeError, ValueError):
        raise CallError("hours must be a number") from None
    if not 1 <= hours <= 168:
        raise CallError("hours must be between 1 and 168")
    now = datetime.now(timezone.utc)
    first = (now - timedelta(hours=hours - 1)).replace(minute=0, second=0, microsecond=0)
    labels = [(first + timedelta(hours=n)).strftime("%Y-%m-%dT%H") for n in range(hours)]

    def read(journal):
        found = journal.timeline(first.strftime("%Y-%m-%dT%H"))
        messages = {r["hour"]: r for r in found["messages"]}
        destinations = sorted({r["destination"] for r in found["deliveries"] + found["queued"] + found["open"]})
        delivered = {(r["hour"], r["destination"]): r for r in found["deliveries"]}
        return {
            "hours": labels, "destinations": destinations,
            "messages": [messages.get(h, {}).get("messages", 0) for h in labels],
            "ack_mean_ms": [_ms(messages.get(h, {}).get("ack_mean_s")) for h in labels],
            "ack_max_ms": [_ms(messages.get(h, {}).get("ack_max_s")) for h in labels],
            "delivered": {d: [delivered.get((h, d), {}).get("delivered", 0) for h in labels] for d in destinations},
            "delivery_mean_s": {d: [_round(delivered.get((h, d), {}).get("mean_s")) for h in labels]
                                for d in destinations},
            "outbox_depth": outbox_depth(labels, found["queued"], found["deliveries"], found["open"]),
        }

    return status.read(read)


def _ms(seconds):
    return None if seconds is None else round(seconds * 1000, 3)


def _round(value):
    return None if value is None else round(value, 3)
