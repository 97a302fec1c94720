"""The daily reconcile report: the open exceptions and the KPIs of a window, as CSV and JSON files.

``write(journal, settings, erp, directory, as_of)`` writes ``reconcile-YYYY-MM-DD.json`` (the same
object as ``hl7bridge reconcile --json``) and ``reconcile-YYYY-MM-DD.csv`` (the exceptions) into
``directory``, each through a temporary file renamed into place, so a reader never sees half a
report. ``hl7bridge reconcile --report DIR`` runs it by hand; ``serve`` runs ``write_due`` as a
scheduled job (``Engine.schedule``: one node of a cluster at a time) every quarter of an hour,
which writes the report of the last ``reconcile.report.at`` (UTC) unless it is there already: so
a report missed while the engine was down is written when it starts, for the window it should
have had.
"""

from __future__ import annotations

import json
import os
from datetime import datetime, timedelta
from pathlib import Path

from ..store.base import Journal
from . import queue
from .settings import ReconcileSettings


def _write(path: Path, text: str):
    temporary = path.with_name(path.name + ".tmp")
    with open(temporary, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def write(journal: Journal, settings: ReconcileSettings, erp: list[str], directory: str | Path, as_of: datetime,
          since: float | None = None) -> list[Path]:
    """Write the report for the window ending ``as_of`` (``since`` seconds long; the report
    settings', else 30 days); returns the two files."""
    window = since or (settings.report.since if settings.report else 30 * 86400.0)
    result = queue.run(journal, settings, erp, as_of - timedelta(seconds=window), as_of)
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    json_path, csv_path = files_for(folder, as_of.date())
    _write(json_path, json.dumps(result, indent=2, sort_keys=True) + "\n")
    _write(csv_path, queue.csv_text(result["exceptions"]))
    return [json_path, csv_path]


def last_due(now: datetime, at: str) -> datetime:
    """The last time of day ``at`` (HH:MM, UTC) at or before ``now``."""
    hour, minute = (int(part) for part in at.split(":"))
    run = now.replace(hour=hour, minute=minute, second=0, microsecond=0)
    return run if run <= now else run - timedelta(days=1)


def files_for(directory: str | Path, day) -> tuple[Path, Path]:
    stem = f"reconcile-{day.isoformat()}"
    return Path(directory) / f"{stem}.json", Path(directory) / f"{stem}.csv"


def write_due(journal: Journal, settings: ReconcileSettings, erp: list[str], now: datetime) -> list[Path]:
    """The daily report of ``settings.report``, when the last one due is not written yet; returns
    the files written (none when it was there already, or no report is configured)."""
    report = settings.report
    if report is None:
        return []
    moment = last_due(now, report.at)
    if all(path.exists() for path in files_for(report.directory, moment.date())):
        return []
    return write(journal, settings, erp, report.directory, moment, report.since)
