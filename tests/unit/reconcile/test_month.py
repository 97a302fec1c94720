"""A month of traffic with planted gaps: ``reconcile`` finds exactly the planted ones, through the
real ingest path, pipeline, outbox and journal (each test on SQLite, then PostgreSQL); the record
survives replays, resends and a rebuild; acknowledging takes an exception off the queue."""

import json
from datetime import timedelta

import pytest
from click.testing import CliRunner

from backends import backend, journal, journal_location  # noqa: F401 (each test runs on both backends)
from reconcile_traffic import AS_OF, Month
from engine.cli import cli
from engine.reconcile import queue
from engine.stamps import iso
from engine.transform.pipeline import read
from engine.reconcile import record
from engine.transform.replay import replay_messages


@pytest.fixture
def month(journal, tmp_path):
    traffic = Month(journal, tmp_path / "config")
    traffic.run()
    return traffic


def found(journal, traffic, **options):
    result = queue.run(journal, traffic.project.reconcile, traffic.project.erp_destinations(),
                       AS_OF - timedelta(days=30), AS_OF, **options)
    return result, {(e["kind"], e["facility"], e["appointment_id"] if e["kind"] == "missed_charge" else e["transaction_id"])
                    for e in result["exceptions"]}


def test_reconcile_finds_exactly_the_planted_gaps(journal, month):
    result, got = found(journal, month)
    assert got == month.planted
    assert len(result["exceptions"]) == len(month.planted)  # each once
    by_id = {(e["kind"], e["transaction_id"] or e["appointment_id"]): e for e in result["exceptions"]}
    late = by_id[("late_charge", "TN00960")]
    assert late["appointment_id"] == "N00960" and late["link_rule"] == "visit"
    assert late["reason"].startswith("charge made 5.0 days after the appointment of 2026-10-05")
    assert len(late["message_ids"]) == 2  # the booking and the charge
    east_late = by_id[("late_charge", "TE00961")]
    assert east_late["link_rule"] == "patient_date"
    dead = by_id[("erp_not_posted", "TN00980")]
    assert dead["reason"] == "the ERP delivery to erp-finance is dead: ERP refused it"
    pending = by_id[("erp_not_posted", "TN00982")]
    assert "not posted to erp-finance after" in pending["reason"] and "(pending, 0 attempts" in pending["reason"]
    missed = by_id[("missed_charge", "E00972")]
    assert missed["patient_id"] == "EP00972" and "no charge after" in missed["reason"]
    walk_in = by_id[("charge_without_appointment", "TE00972")]
    assert walk_in["reason"] == "charge TE00972 matches no appointment by patient EP99999 on 2026-10-20"


def test_the_links_and_their_rules(journal, month):
    resched = journal.appointment_record("EASTCLINIC", "E00901")
    assert [e["event"] for e in resched["history"]] == ["booked", "rescheduled"]
    assert resched["status"] == "booked" and resched["start_day"] == "2026-10-08"
    assert [(c["charge_key"], c["link_rule"]) for c in resched["charges"]] == [("TE00901", "patient_date")]
    late_booking = journal.appointment_record("NORTHCLINIC", "N00907")
    assert [(c["charge_key"], c["link_rule"]) for c in late_booking["charges"]] == [("TN00907", "visit")]
    statuses = {number: journal.appointment_record("NORTHCLINIC", f"N00{number}")["status"]
                for number in (902, 903, 904, 905, 906)}
    assert statuses == {902: "booked", 903: "cancelled", 904: "cancelled", 905: "noshow", 906: "deleted"}
    resent = journal.charge_record("EASTCLINIC", "TE00909")
    assert len(resent["message_ids"]) == 2 and resent["appointment_id"] == "E00909"
    duplicate = journal.charge_record("NORTHCLINIC", "TN00908")
    assert len(duplicate["message_ids"]) == 1  # the exact resend is a journal duplicate, never mapped


def test_kpis(journal, month):
    result, _ = found(journal, month)
    north, east = result["kpis"]["NORTHCLINIC"], result["kpis"]["EASTCLINIC"]
    assert north["missed_charges"] == 2 and east["missed_charges"] == 2
    assert north["no_shows"] == 1 and north["same_day_cancellations"] == 1
    assert north["charges_not_posted"] == 5 and east["charges_not_posted"] == 1
    assert 0 < north["missed_charge_rate"] < 0.05
    lag = north["lag"]["service_to_charge"]
    assert lag["p50_hours"] == 8.0 and lag["p90_hours"] == 8.0
    assert north["lag"]["charge_to_posted"]["p50_hours"] == pytest.approx(1.08, abs=0.01)


def test_replays_and_a_rebuild_change_nothing(journal, month):
    before = found(journal, month)[0]
    ids = list(range(1, journal.count() + 1))
    replay_messages(journal, month.project, ids[:200], None, "test", "remap a few days", remapped=True,
                    now=AS_OF - timedelta(days=1))
    assert found(journal, month)[0]["exceptions"] == before["exceptions"]
    timezones = {route.name: route.timezone for route in month.project.routes}
    count = record.rebuild(journal, month.project.reconcile, timezones, read, batch=97)
    assert count == journal.count("mapped")
    after = found(journal, month)[0]
    assert after["exceptions"] == before["exceptions"]


def test_an_acknowledged_exception_leaves_the_queue_with_its_note(journal, journal_location, month, tmp_path):
    runner = CliRunner()
    base = ["--journal", journal_location, "--config", str(tmp_path / "config"), "--as-of", iso(AS_OF)]
    first = runner.invoke(cli, ["reconcile", "--json", *base])
    assert first.exit_code == 1, first.output
    data = json.loads(first.output)
    assert set(data) == {"exceptions", "kpis", "window"}
    item = next(e for e in data["exceptions"] if e["kind"] == "missed_charge" and e["appointment_id"] == "N00950")
    assert {"kind", "appointment_id", "transaction_id", "visit_id", "patient_id", "facility", "reason",
            "message_ids"} <= set(item)
    refused = runner.invoke(cli, ["reconcile-ack", "--journal", journal_location, "nonsense", "--note", "x"])
    assert refused.exit_code == 2 and "is not an exception ID" in refused.output
    done = runner.invoke(cli, ["reconcile-ack", "--journal", journal_location, item["id"], "--note",
                               "charge entered by hand", "--by", "kim"])
    assert done.exit_code == 0 and done.output == f"acknowledged {item['id']}\n"
    after = json.loads(runner.invoke(cli, ["reconcile", "--json", *base]).output)
    assert item["id"] not in {e["id"] for e in after["exceptions"]}
    shown = json.loads(runner.invoke(cli, ["reconcile", "--json", "--all", *base]).output)
    acked = next(e for e in shown["exceptions"] if e["id"] == item["id"])
    assert acked["acknowledged"]["who"] == "kim" and acked["acknowledged"]["note"] == "charge entered by hand"
    only = json.loads(runner.invoke(cli, ["reconcile", "--json", "--kind", "late_charge", "--facility", "EASTCLINIC",
                                          *base]).output)
    assert [(e["kind"], e["transaction_id"]) for e in only["exceptions"]] == [("late_charge", "TE00961")]
    text = runner.invoke(cli, ["reconcile", *base, "--kind", "erp_not_posted"])
    assert text.exit_code == 1 and "erp_not_posted  NORTHCLINIC" in text.output and "lag_h_service_charge" in text.output
    as_csv = runner.invoke(cli, ["reconcile", "--csv", *base, "--kind", "charge_without_appointment"])
    assert as_csv.output.splitlines()[0].startswith("id,kind,facility,appointment_id,transaction_id")
    assert len(as_csv.output.splitlines()) == 4


def test_the_report_files(journal, journal_location, month, tmp_path):
    runner = CliRunner()
    out = runner.invoke(cli, ["reconcile", "--journal", journal_location, "--config", str(tmp_path / "config"),
                              "--as-of", iso(AS_OF), "--report", str(tmp_path / "reports")])
    assert out.exit_code == 0, out.output
    json_file, csv_file = (tmp_path / "reports" / "reconcile-2026-11-03.json"), (tmp_path / "reports" / "reconcile-2026-11-03.csv")
    assert out.output.split() == [str(json_file), str(csv_file)]
    data = json.loads(json_file.read_text())
    assert len(data["exceptions"]) == len(month.planted)
    assert len(csv_file.read_text().splitlines()) == len(month.planted) + 1


def test_prometheus_gauges_and_the_charge_lag_histogram(journal, month):
    import re

    from engine.mllp.listener import Counters
    from engine.ops.metrics import Histogram, render

    found = queue.gauges(journal, month.project.reconcile, month.project.erp_destinations(), AS_OF)
    text = render(Counters(), {}, Histogram(), {}, [], AS_OF, reconcile=found)
    for kind, facility, count in (("missed_charge", "NORTHCLINIC", 2), ("missed_charge", "EASTCLINIC", 2),
                                  ("late_charge", "NORTHCLINIC", 2), ("erp_not_posted", "NORTHCLINIC", 5),
                                  ("charge_without_appointment", "EASTCLINIC", 2), ("erp_not_posted", "EASTCLINIC", 1)):
        assert f'hl7bridge_reconcile_exceptions{{kind="{kind}",facility="{facility}"}} {count}\n' in text
    value = lambda name: int(re.search(re.escape(name) + r" (\d+)", text).group(1))  # noqa: E731
    lag = "hl7bridge_reconcile_charge_lag_seconds"
    total = value(f'{lag}_count{{facility="NORTHCLINIC"}}')
    # Two NORTHCLINIC charges came more than a day after their appointment (5 and 3.5 days).
    assert value(f'{lag}_bucket{{facility="NORTHCLINIC",le="86400.0"}}') == total - 2 > 100
    assert value(f'{lag}_bucket{{facility="NORTHCLINIC",le="+Inf"}}') == total
