"""The work queues and KPIs of a window: what ``hl7bridge reconcile``, the dashboard, the metrics
and the daily report show. Reads the store once per call (candidates, KPI rows, acknowledgements)
and decides with ``rules``; no SQL here."""

from __future__ import annotations

import csv
import io
from datetime import datetime, timedelta

from ..stamps import iso
from ..store.base import Journal
from . import rules
from .settings import ReconcileSettings

CSV_COLUMNS = ("id", "kind", "facility", "appointment_id", "transaction_id", "visit_id", "patient_id", "at",
               "amount", "reason", "message_ids", "acknowledged_by", "acknowledged_at", "note")


def run(journal: Journal, settings: ReconcileSettings, erp: list[str], since: datetime, as_of: datetime,
        facility: str | None = None, kinds: list[str] | None = None, acknowledged: bool = False) -> dict:
    """{"window": {...}, "exceptions": [...], "kpis": {facility: {...}}} for [since, as_of).

    Exceptions acknowledged are left out unless ``acknowledged`` (then they carry who, when and
    the note); the KPIs count them all. ``erp``: the ERP destinations."""
    return _window(journal, settings, erp, since, as_of, facility, kinds, acknowledged)[0]


def _window(journal, settings, erp, since, as_of, facility, kinds, acknowledged):
    """``run``'s answer, and the store's candidates it came from."""
    cutoff = as_of - timedelta(seconds=settings.shortest_charge_window)
    found = journal.reconcile_candidates(iso(since), iso(as_of), iso(max(cutoff, since)), settings.shortest_charge_window,
                                         facility, list(erp))
    acks = journal.acknowledgements()
    every = rules.exceptions(found, settings, as_of, set(erp), acks)
    cutoffs = {name: iso(as_of - timedelta(seconds=r.charge_window)) for name, r in settings.facilities.items()}
    appointments = journal.reconcile_kpi_rows(iso(since), iso(as_of), facility, cutoffs,
                                              iso(as_of - timedelta(seconds=settings.default.charge_window)))
    kpis = rules.kpis(appointments, found.lines, every)
    shown = [e for e in every if (acknowledged or "acknowledged" not in e) and (not kinds or e["kind"] in kinds)]
    order = {kind: n for n, kind in enumerate(rules.KINDS)}
    shown.sort(key=lambda e: (order[e["kind"]], e["facility"], e.get("at") or "", e["id"]))
    return {"window": {"since": iso(since), "as_of": iso(as_of), "facility": facility, "erp_destinations": list(erp)},
            "exceptions": shown, "kpis": kpis}, found


def csv_text(exceptions: list[dict]) -> str:
    """The exceptions as CSV (one row each, message IDs joined by spaces)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for item in exceptions:
        ack = item.get("acknowledged") or {}
        row = {**item, "message_ids": " ".join(str(i) for i in item["message_ids"]),
               "acknowledged_by": ack.get("who"), "acknowledged_at": ack.get("at"), "note": ack.get("note")}
        writer.writerow(["" if row.get(c) is None else row[c] for c in CSV_COLUMNS])
    return out.getvalue()


def acknowledge(journal: Journal, exception_id: str, who: str, note: str, now: datetime):
    """Resolve an exception with a note (it leaves the queue; the KPIs still count it)."""
    kind = exception_id.split(":", 1)[0]
    if kind not in rules.KINDS or exception_id.count(":") < 2:
        raise ValueError(f"{exception_id!r} is not an exception ID (KIND:FACILITY:ID, as reconcile lists them)")
    if not note.strip():
        raise ValueError("an acknowledgement needs a note: what was done about it")
    with journal.transaction():
        journal.acknowledge(exception_id, who, note.strip(), iso(now))


METRICS_WINDOW = 30 * 86400.0  # what /metrics counts: the exceptions and charge lags of the last 30 days


def gauges(journal: Journal, settings: ReconcileSettings, erp: list[str], now: datetime) -> dict:
    """For /metrics: open (unacknowledged) exceptions per (kind, facility) and each facility's
    service-to-charge lags in seconds, over the last METRICS_WINDOW."""
    since = now - timedelta(seconds=METRICS_WINDOW)
    found, candidates = _window(journal, settings, erp, since, now, None, None, False)
    counts: dict[tuple[str, str], int] = {}
    for facility in found["kpis"]:
        for kind in rules.KINDS:
            counts[(kind, facility)] = 0
    for item in found["exceptions"]:
        counts[(item["kind"], item["facility"])] = counts.get((item["kind"], item["facility"]), 0) + 1
    lags: dict[str, list] = {}
    for facility, kind, lag, _, _ in candidates.lines:
        if lag is not None and kind in rules.VISIT_LINES:
            lags.setdefault(facility, []).append(max(0.0, lag))
    return {"exceptions": counts, "lag": lags}
