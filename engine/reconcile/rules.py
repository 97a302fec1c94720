"""The reconcile decisions, as plain functions: an appointment's current state from its history,
which appointment a charge links to (and by which rule), the exceptions and the KPIs.

Nothing here reads or writes: ``engine.reconcile.record`` hands these functions what the store
found and stores what they decide; ``engine.reconcile.queue`` asks the store for a window's
candidates and decides here what is an exception.
"""

from __future__ import annotations

from datetime import date, datetime, timedelta

from ..stamps import parse_iso
from ..store.base import Candidates
from .facts import ACTIVE_STATUSES
from .settings import ReconcileSettings, Rules

KINDS = ("missed_charge", "late_charge", "charge_without_appointment", "erp_not_posted")
# Charge lines that belong to a visit (payments and adjustments come later, on the account).
VISIT_LINES = ("charge", "credit")


def exception_id(kind: str, facility: str, subject: str) -> str:
    """The stable name of an exception (what an acknowledgement refers to)."""
    return f"{kind}:{facility}:{subject}"


def current_state(events: list[dict]) -> dict:
    """An appointment as its events leave it: events are dicts with the AppointmentFact fields
    and ``message_id``; they are applied in the order they happened (then the order received),
    so a replayed or late message never undoes a later one. Returns the appointment row."""
    ordered = sorted(events, key=lambda e: (e["occurred_at"] or "", e["message_id"]))
    state = {"status": "booked", "filler_status": "", "start_at": None, "start_day": None, "patient_id": "",
             "visit_id": "", "location": "", "provider": "", "placer_id": "", "filler_id": "", "cancelled_at": None}
    for event in ordered:
        if event["status"]:
            state["status"] = event["status"]
            if event["status"] == "cancelled":
                state["cancelled_at"] = event["occurred_at"]
            elif event["status"] in ACTIVE_STATUSES:
                state["cancelled_at"] = None
        for key in ("filler_status", "start_at", "start_day", "patient_id", "visit_id", "location", "provider",
                    "placer_id", "filler_id"):
            if event.get(key):
                state[key] = event[key]
    state["first_message_id"] = min(e["message_id"] for e in events)
    state["last_message_id"] = ordered[-1]["message_id"]
    state["updated_at"] = ordered[-1]["occurred_at"]
    state["same_day_cancel"] = int(
        state["status"] == "cancelled" and bool(state["cancelled_at"]) and bool(state["start_at"])
        and state["cancelled_at"][:10] == state["start_at"][:10])
    return state


def _days_apart(a: str | None, b: str | None) -> int | None:
    if not a or not b:
        return None
    return abs((date.fromisoformat(a) - date.fromisoformat(b)).days)


def choose_link(charge: dict, candidates: list[dict], rules: Rules) -> tuple[str, str] | None:
    """The appointment a charge line belongs to, and the rule that says so, or None.

    ``candidates`` are the facility's appointments sharing the charge's visit number or patient
    (rows with appointment_id, status, start_day, patient_id, visit_id). Rules in the facility's
    order: ``visit`` (PV1-19 on both sides), ``patient_date`` (same patient, service date within
    ``date_window`` days of the appointment's day). Among several, an appointment that still
    expects a charge comes first, then the nearest day, then the earliest booked."""
    day = charge.get("service_day") or (charge.get("made_at") or "")[:10] or None

    def rank(appointment):
        apart = _days_apart(day, appointment.get("start_day"))
        return (appointment["status"] not in ACTIVE_STATUSES, apart if apart is not None else 10**6,
                appointment.get("start_at") or "", appointment["appointment_id"])

    for rule in rules.link:
        if rule == "visit":
            if not charge.get("visit_id"):
                continue
            found = [a for a in candidates if a.get("visit_id") == charge["visit_id"]]
        else:
            if not charge.get("patient_id") or not day:
                continue
            found = [a for a in candidates if a.get("patient_id") == charge["patient_id"]
                     and (_days_apart(day, a.get("start_day")) or 0) <= rules.date_window
                     and a.get("start_day")]
        if found:
            return min(found, key=rank)["appointment_id"], rule
    return None


def lag_seconds(start: str | None, end: str | None) -> float | None:
    if not start or not end:
        return None
    return (parse_iso(end) - parse_iso(start)).total_seconds()


def _appointment_ref(row: dict) -> dict:
    return {"appointment_id": row["appointment_id"], "visit_id": row.get("visit_id") or None,
            "patient_id": row.get("patient_id") or None, "facility": row["facility"]}


def _human(seconds: float) -> str:
    days = seconds / 86400
    return f"{days:.1f} days" if days >= 1 else f"{seconds / 3600:.1f} hours"


def exceptions(found: Candidates, settings: ReconcileSettings, as_of: datetime, erp: set[str],
               acknowledged: dict | None = None) -> list[dict]:
    """The open exceptions (acknowledged ones carry ``acknowledged``), oldest first per kind."""
    acknowledged = acknowledged or {}
    out = []

    def add(kind, facility, subject, row, reason, message_ids, **extra):
        ident = exception_id(kind, facility, subject)
        item = {"id": ident, "kind": kind, "facility": facility, "appointment_id": None, "transaction_id": None,
                "visit_id": row.get("visit_id") or None, "patient_id": row.get("patient_id") or None,
                "reason": reason, "message_ids": sorted(set(message_ids)), **extra}
        if ident in acknowledged:
            item["acknowledged"] = acknowledged[ident]
        out.append(item)

    for row in found.missed:
        rules = settings.rules(row["facility"])
        start = parse_iso(row["start_at"])
        if as_of - start <= timedelta(seconds=rules.charge_window):
            continue
        add("missed_charge", row["facility"], row["appointment_id"], row,
            f"appointment {row['status']} for {row['start_at'][:16].replace('T', ' ')} UTC, no charge after "
            f"{_human((as_of - start).total_seconds())} (charge window {_human(rules.charge_window)})",
            row["message_ids"], appointment_id=row["appointment_id"], at=row["start_at"], status=row["status"],
            location=row.get("location") or None, provider=row.get("provider") or None)
    for row in found.late:
        rules = settings.rules(row["facility"])
        if row["lag_s"] is None or row["lag_s"] <= rules.charge_window:
            continue
        add("late_charge", row["facility"], row["charge_key"], row,
            f"charge made {_human(row['lag_s'])} after the appointment of {row['appointment_start'][:10]} "
            f"(charge window {_human(rules.charge_window)})",
            row["message_ids"] + row["appointment_message_ids"], appointment_id=row["appointment_id"],
            transaction_id=row["transaction_id"], at=row["made_at"], amount=row["amount"], link_rule=row["link_rule"])
    for row in found.unlinked:
        if row["kind"] not in VISIT_LINES:
            continue
        rules = settings.rules(row["facility"])
        tried = " or ".join({"visit": f"visit {row.get('visit_id') or '(none)'}",
                             "patient_date": f"patient {row.get('patient_id') or '(none)'} on "
                                             f"{row.get('service_day') or '(no service date)'}"}[r] for r in rules.link)
        add("charge_without_appointment", row["facility"], row["charge_key"], row,
            f"{row['kind']} {row['transaction_id'] or row['charge_key']} matches no appointment by {tried}",
            row["message_ids"], transaction_id=row["transaction_id"], at=row["made_at"], amount=row["amount"])
    for row in found.unposted:
        rules = settings.rules(row["facility"])
        to_erp = [d for d in row["deliveries"] if d["destination"] in erp]
        dead = [d for d in to_erp if d["state"] == "dead"]
        waited = (as_of - parse_iso(row["received_at"])).total_seconds()
        if dead:
            reason = f"the ERP delivery to {dead[0]['destination']} is dead: {dead[0].get('last_error') or 'refused'}"
        elif waited <= rules.posting_window:
            continue
        elif not to_erp:
            reason = f"never queued for the ERP ({row['message_status']}) after {_human(waited)}"
        else:
            pending = to_erp[0]
            reason = (f"not posted to {pending['destination']} after {_human(waited)} ({pending['state']}, "
                      f"{pending['attempts']} attempts{': ' + pending['last_error'] if pending.get('last_error') else ''}; "
                      f"posting window {_human(rules.posting_window)})")
        add("erp_not_posted", row["facility"], row["charge_key"], row, reason, row["message_ids"],
            transaction_id=row["transaction_id"], at=row["made_at"], amount=row["amount"],
            appointment_id=row.get("appointment_id"))
    return out


def percentiles(values: list) -> dict | None:
    values = sorted(v for v in values if v is not None)
    if not values:
        return None

    def pick(q):
        return round(values[min(len(values) - 1, int(q * len(values)))] / 3600, 2)

    return {"count": len(values), "p50_hours": pick(0.5), "p90_hours": pick(0.9)}


def kpis(appointments: list[tuple], lines: list[tuple], found: list[dict]) -> dict:
    """Per facility over the window: charge lag (service -> made -> ERP posted, p50/p90 in hours),
    missed charges (count, and rate among the appointments past their charge window), no-show
    rate, same-day cancellations and charges not posted, from ``Journal.reconcile_kpi_rows``,
    ``Candidates.lines`` and the exceptions ``found``."""
    out: dict[str, dict] = {}

    def facility(name):
        item = out.get(name)
        if item is None:
            item = out[name] = {"appointments": 0, "due": 0, "missed_charges": 0, "missed_charge_rate": None,
                                "no_shows": 0, "no_show_rate": None, "same_day_cancellations": 0, "charges": 0,
                                "charges_not_posted": 0, "late_charges": 0, "charges_without_appointment": 0, "lag": {}}
        return item

    for name, status, count, same_day, started in appointments:
        item = facility(name)
        item["appointments"] += count
        item["no_shows"] += count if status == "noshow" else 0
        item["due"] += started if status in ACTIVE_STATUSES else 0
        item["same_day_cancellations"] += same_day or 0
    series: dict[str, tuple[list, list, list]] = {}
    counts: dict[str, int] = {}
    read = datetime.fromisoformat
    for name, kind, lag, made_at, posted_at in lines:
        counts[name] = counts.get(name, 0) + 1
        if kind not in VISIT_LINES:
            continue
        made, to_post, whole = series.get(name) or series.setdefault(name, ([], [], []))
        # Journal times are ISO 8601 in UTC with a Z: read without it, the difference is the same.
        posted = (read(posted_at[:-1]) - read(made_at[:-1])).total_seconds() if posted_at else None
        made.append(lag)
        to_post.append(posted)
        whole.append(lag + posted if lag is not None and posted is not None else None)
    for name, count in counts.items():
        facility(name)["charges"] += count
    counters = {"missed_charge": "missed_charges", "erp_not_posted": "charges_not_posted",
                "late_charge": "late_charges", "charge_without_appointment": "charges_without_appointment"}
    for item in found:  # acknowledged or not: a KPI counts what happened
        facility(item["facility"])[counters[item["kind"]]] += 1
    for name, item in out.items():
        if item["due"]:
            item["missed_charge_rate"] = round(item["missed_charges"] / item["due"], 4)
        if item["appointments"]:
            item["no_show_rate"] = round(item["no_shows"] / item["appointments"], 4)
        made, to_post, whole = series.get(name, ([], [], []))
        item["lag"] = {"service_to_charge": percentiles(made), "charge_to_posted": percentiles(to_post),
                       "service_to_posted": percentiles(whole)}
    return dict(sorted(out.items()))
