"""``hl7bridge reconcile`` and ``hl7bridge reconcile-ack``: the scheduling-to-cash work queues."""

from __future__ import annotations

import json
import sys
from datetime import datetime

import click

from ..errors import ConfigError
from ..stamps import parse_iso, parse_moment, utc_now
from .base import (CONTEXT, EXIT_NOT_ACCEPTED, Failure, cli, config_option, journal_option, json_option, load_project,
                   login_name, open_journal)
from .output import format_table

KIND_CHOICES = ("missed_charge", "late_charge", "charge_without_appointment", "erp_not_posted")


def _moment(value: str, now: datetime, name: str) -> datetime:
    try:
        return parse_iso(parse_moment(value, now))
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint=name) from None


def _hours(lag: dict | None) -> str:
    return f"{lag['p50_hours']}/{lag['p90_hours']}" if lag else "-"


def kpi_rows(kpis: dict) -> list[dict]:
    rows = []
    for facility, item in kpis.items():
        rate = lambda value: "-" if value is None else f"{value * 100:.1f}%"  # noqa: E731
        rows.append({
            "facility": facility, "appointments": item["appointments"],
            "missed": f"{item['missed_charges']} ({rate(item['missed_charge_rate'])})",
            "no_show": rate(item["no_show_rate"]), "same_day_cancel": item["same_day_cancellations"],
            "charges": item["charges"], "not_posted": item["charges_not_posted"],
            "lag_h_service_charge": _hours(item["lag"]["service_to_charge"]),
            "lag_h_charge_posted": _hours(item["lag"]["charge_to_posted"]),
        })
    return rows


@cli.command("reconcile", context_settings=CONTEXT)
@journal_option
@config_option(help="Directory with hl7bridge.yaml (its reconcile: section) and destinations/ (default: this one).")
@click.option("--since", default="30d", show_default=True, help="Window start: 30d, 12h, or an ISO time (before --as-of).")
@click.option("--as-of", "as_of", help="Look as at this time (ISO, or 2d for two days ago); default: now.")
@click.option("--facility", help="One sending facility (MSH-4).")
@click.option("--kind", "kinds", multiple=True, type=click.Choice(KIND_CHOICES), help="Only this kind (repeatable).")
@click.option("--all", "show_all", is_flag=True, help="Show acknowledged exceptions too.")
@click.option("--rebuild", is_flag=True, help="Build the record again from every journaled message first (in batches: "
              "a running engine goes on, and the queues show what was read so far until it ends).")
@click.option("--report", "report_dir", type=click.Path(file_okay=False), metavar="DIR",
              help="Write the report (reconcile-DATE.json and .csv) into DIR instead of printing.")
@click.option("--csv", "as_csv", is_flag=True, help="Print the exceptions as CSV.")
@json_option
def reconcile(journal_path, config_dir, since, as_of, facility, kinds, show_all, rebuild, report_dir, as_csv, as_json):
    """Appointments without charges, late charges, charges without appointments, charges the ERP
    has not posted; then the KPIs per facility.

    Exit status 0 when the queue is empty, 1 when it has open exceptions.
    --json prints {"exceptions": [...], "kpis": {...}, "window": {...}}.

    Example: hl7bridge reconcile --since 30d --facility NORTHCLINIC --kind missed_charge
    """
    from ..reconcile import queue, record, report
    from ..transform.pipeline import read

    if as_csv and as_json:
        raise Failure("choose one of --csv and --json")
    now = utc_now()
    moment = _moment(as_of, now, "--as-of") if as_of else now
    start = _moment(since, moment, "--since")
    if start >= moment:
        raise Failure(f"--since {since} is not before --as-of {as_of or 'now'}")
    if rebuild:  # the routes say each message's time zone
        project = load_project(config_dir)
        settings, erp = project.reconcile, project.erp_destinations()
    else:
        from ..transform.project import reconcile_context

        try:
            settings, erp = reconcile_context(config_dir)
        except ConfigError as exc:
            raise Failure(str(exc), EXIT_NOT_ACCEPTED) from None
    journal = open_journal(journal_path)
    try:
        if rebuild:
            timezones = {route.name: route.timezone for route in project.routes}
            count = record.rebuild(journal, settings, timezones, read)
            click.echo(f"rebuilt the record from {count} message(s)", err=True)
        if report_dir:
            files = report.write(journal, settings, erp, report_dir, moment, (moment - start).total_seconds())
            click.echo("\n".join(str(f) for f in files))
            return
        result = queue.run(journal, settings, erp, start, moment, facility, list(kinds), show_all)
    finally:
        journal.close()
    open_items = [e for e in result["exceptions"] if "acknowledged" not in e]
    if as_json:
        click.echo(json.dumps(result, indent=2))
    elif as_csv:
        click.echo(queue.csv_text(result["exceptions"]), nl=False)
    else:
        rows = [{**e, "messages": " ".join(str(i) for i in e["message_ids"]),
                 "ack": (e.get("acknowledged") or {}).get("who")} for e in result["exceptions"]]
        columns = ["kind", "facility", "appointment_id", "transaction_id", "patient_id", "reason", "messages"]
        click.echo(format_table(rows, columns + (["ack"] if show_all else [])).replace("(no messages)", "(no exceptions)"))
        click.echo("")
        click.echo(format_table(kpi_rows(result["kpis"]), [
            "facility", "appointments", "missed", "no_show", "same_day_cancel", "charges", "not_posted",
            "lag_h_service_charge", "lag_h_charge_posted"]).replace("(no messages)", "(no appointments or charges)"))
    if open_items:
        sys.exit(EXIT_NOT_ACCEPTED)


@cli.command("reconcile-ack", context_settings=CONTEXT)
@journal_option
@click.argument("exception_id")
@click.option("--note", required=True, help="What was done about it (kept with the acknowledgement).")
@click.option("--by", "who", help="Who resolved it (default: your login name).")
def reconcile_ack(journal_path, exception_id, note, who):
    """Acknowledge an exception: it leaves the queue (reconcile --all still shows it, with the note).

    Example: hl7bridge reconcile-ack missed_charge:NORTHCLINIC:90001 --note "charge entered by hand"
    """
    from ..reconcile import queue

    journal = open_journal(journal_path)
    try:
        queue.acknowledge(journal, exception_id, who or login_name(), note, utc_now())
    except ValueError as exc:
        raise Failure(str(exc)) from None
    finally:
        journal.close()
    click.echo(f"acknowledged {exception_id}")
