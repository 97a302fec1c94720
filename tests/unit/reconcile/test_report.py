"""The daily report: which one is due, written once, in the window it should have had."""

import json
from datetime import datetime, timezone

from engine.reconcile import report
from engine.reconcile.settings import ReconcileSettings, ReportSettings


def test_the_last_report_due_is_written_once(journal, tmp_path):
    settings = ReconcileSettings(report=ReportSettings(tmp_path / "reports", "06:00", 7 * 86400.0))
    assert report.last_due(datetime(2026, 11, 29, 5, 59, tzinfo=timezone.utc), "06:00") == datetime(
        2026, 11, 28, 6, 0, tzinfo=timezone.utc)
    # Started at 09:12 after being down at 06:00: the 06:00 report, for the week ending then.
    files = report.write_due(journal, settings, ["erp-finance"], datetime(2026, 11, 29, 9, 12, tzinfo=timezone.utc))
    assert [f.name for f in files] == ["reconcile-2026-11-29.json", "reconcile-2026-11-29.csv"]
    window = json.loads(files[0].read_text())["window"]
    assert (window["since"], window["as_of"]) == ("2026-11-22T06:00:00.000000Z", "2026-11-29T06:00:00.000000Z")
    assert files[1].read_text().startswith("id,kind,facility,appointment_id,transaction_id,")
    assert report.write_due(journal, settings, [], datetime(2026, 11, 29, 23, 0, tzinfo=timezone.utc)) == []
    assert not list((tmp_path / "reports").glob("*.tmp"))
    assert report.write_due(journal, ReconcileSettings(), [], datetime(2026, 11, 30, tzinfo=timezone.utc)) == []
