"""``hl7bridge journal``: search, read, count and prune the message journal."""

from __future__ import annotations

import json
import sys
from datetime import datetime, timedelta

import click

from ..stamps import iso, parse_moment, utc_now
from ..store.base import STATUSES, SearchQuery
from .base import (CONTEXT, EXIT_CONNECTION, EXIT_NOT_ACCEPTED, EXIT_USAGE, Failure, cli, journal_option, json_option,
                   open_journal)
from .output import detail_text, format_table


@cli.group(context_settings=CONTEXT)
def journal():
    """Search and read the message journal.

    Example: hl7bridge journal search --patient 100234
    """


def parse_since(value: str, now: datetime | None = None) -> str:
    """'2h', '30m', '7d' ago, or an ISO date/time, as a journal timestamp (``engine.stamps.parse_moment``)."""
    try:
        return parse_moment(value, now)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


@journal.command("search", context_settings=CONTEXT)
@journal_option
@click.option("--patient", metavar="ID[^^^AUTHORITY]",
              help="Patient identifier (any repetition of PID-3); ID^^^AUTHORITY for one assigning authority's "
                   "(PID-3.4), e.g. 100234^^^NORTHCLINIC.")
@click.option("--control-id", help="Message control ID (MSH-10).")
@click.option("--appointment", help="Appointment ID (SCH-1 placer or SCH-2 filler).")
@click.option("--transaction", help="Financial transaction ID (FT1-2).")
@click.option("--type", "message_type", help="Message type, optionally with trigger: SIU or SIU^S12.")
@click.option("--facility", help="Sending facility (MSH-4), e.g. NORTHCLINIC.")
@click.option("--route", help="The route that took the message.")
@click.option("--status", type=click.Choice(STATUSES), help="Status: ingest, routing or mapping outcome.")
@click.option("--delivery", metavar="[DESTINATION:]STATE",
              help="Delivery state: dead, retrying, pending, delivered; fhir-main:dead for one destination.")
@click.option("--duplicate", type=click.Choice(["exact", "differing", "any"]),
              help="Resends: exact (same content, answered with the original ACK), differing (a control ID "
                   "reused with different content), or any.")
@click.option("--since", "--from", "since", help="Received at or after: 30m, 2h, 7d, or an ISO time.")
@click.option("--until", "--to", "until", help="Received before: an ISO time, or 30m, 2h, 7d ago.")
@click.option("--oldest-first", is_flag=True, help="Sort oldest first (default: newest first).")
@click.option("--text", help="Free text anywhere in the message.")
@click.option("--limit", default=50, show_default=True, help="Most rows to show, newest first.")
@click.option("--raw", is_flag=True, help="Print the messages themselves (one per line block), for piping.")
@json_option
def journal_search(journal_path, patient, control_id, appointment, transaction, message_type, facility,
                   route, status, delivery, duplicate, since, until, oldest_first, text, limit, raw, as_json):
    """Find messages by identifier, type, status, time or free text.

    Example: hl7bridge journal search --type SIU^S12 --since 2h --status rejected
    """
    from ..hl7.identifiers import patient_filter

    patient, authority = patient_filter(patient) if patient else (None, None)
    if patient == "":
        raise Failure("--patient needs an ID: 100234, or 100234^^^NORTHCLINIC for one assigning authority's")
    query = SearchQuery(
        patient=patient, patient_authority=authority, control_id=control_id, appointment=appointment, transaction=transaction,
        message_type=message_type, sending_facility=facility, route=route, status=status, delivery=delivery,
        duplicate=duplicate, oldest_first=oldest_first,
        since=parse_since(since) if since else None, until=parse_since(until) if until else None,
        text=text, limit=limit,
    )
    with_journal = open_journal(journal_path)
    try:
        rows = with_journal.search(query)
        if raw:
            for row in rows:
                record = with_journal.get(row["id"])
                sys.stdout.buffer.write(record["raw"].rstrip(b"\r\n") + b"\r\n")
            sys.stdout.flush()
        elif as_json:
            click.echo(json.dumps(rows, indent=2))
        else:
            for row in rows:
                row["patient"] = patient_text(row)
            click.echo(format_table(rows, ["id", "received_at", "control_id", "message_type", "trigger_event",
                                           "sending_facility", "patient", "status", "ack_code"]))
    finally:
        with_journal.close()
    if patient and authority is None:
        authorities = sorted({row.get("patient_authority") or "" for row in rows if row.get("patient_id") == patient})
        if len(authorities) > 1:
            named = ", ".join(a or "(none)" for a in authorities)
            click.echo(f"note: patient ID {patient} is used by {len(authorities)} assigning authorities here ({named}); "
                       f"--patient {patient}^^^{authorities[-1] or 'AUTHORITY'} shows one's", err=True)
    if not rows:
        sys.exit(EXIT_NOT_ACCEPTED)


NO_TYPE = "(no MSH-9)"


def patient_text(row: dict) -> str:
    """A row's patient in CX form, ID^^^AUTHORITY, so two authorities' same ID are told apart."""
    if not row.get("patient_id"):
        return ""
    authority = row.get("patient_authority")
    return f"{row['patient_id']}^^^{authority}" if authority else row["patient_id"]


@journal.command("stats", context_settings=CONTEXT)
@journal_option
@click.option("--since", "--from", "since", default="24h", show_default=True, help="Window start: 24h, 7d, or an ISO time.")
@click.option("--until", "--to", "until", help="Window end (default: now).")
@json_option
def journal_stats(journal_path, since, until, as_json):
    """Counts per route, message type and status, and latency from receipt to ACK, conversion and delivery.

    Example: hl7bridge journal stats --since 7d
    """
    with_journal = open_journal(journal_path)
    try:
        stats = with_journal.stats(parse_since(since), parse_since(until) if until else None)
    finally:
        with_journal.close()
    for row in stats["by_type"]:
        # Rejected frames with no readable MSH-9 (no MSH at all, or MSH-9 empty) have no type.
        row["value"] = row["value"] if row["value"] not in ("", "-", None) else NO_TYPE
    if as_json:
        click.echo(json.dumps(stats, indent=2))
        return
    click.echo(f"{stats['messages']} messages received since {stats['since']}")
    for title, key in (("route", "by_route"), ("type", "by_type"), ("status", "by_status")):
        click.echo(f"by {title}:")
        for row in stats[key]:
            click.echo(f"  {row['value']:24} {row['count']:>8}")
    latency = [("ACK", stats["seconds_to_ack"]), ("conversion", stats["seconds_to_conversion"])]
    latency += [(f"delivery to {d}", p) for d, p in stats["seconds_to_delivery"].items()]
    click.echo("seconds from receipt to:")
    for label, p in latency:
        if p:
            click.echo(f"  {label:28} p50 {p['p50']:>8}  p90 {p['p90']:>8}  p99 {p['p99']:>8}  max {p['max']:>8}  ({p['count']})")


@journal.command("prune", context_settings=CONTEXT)
@journal_option
@click.option("--older-than", required=True, metavar="AGE",
              help="Prune messages received longer ago than this, with a unit: 30min, 12h, 90d, 2w, 6mo (30 days), 1y (365 days).")
@click.option("--keep-errors", is_flag=True, help="Keep rejected, error and mapping_error messages whatever their age.")
@click.option("--dry-run", is_flag=True, help="Only count what would be pruned.")
@json_option
def journal_prune(journal_path, older_than, keep_errors, dry_run, as_json):
    """Delete old messages and give the space back to the file system.

    Messages with a delivery still owed (pending, retrying, dead) are never pruned. Works in
    small batches, so it can run beside the engine. Shows progress on a terminal. On PostgreSQL
    the space is VACUUMed for new rows, not given back (VACUUM FULL does that, locking the tables).

    Example: hl7bridge journal prune --older-than 90d --keep-errors --dry-run
    """
    from ..yamlconf import age

    try:
        cutoff = utc_now() - timedelta(seconds=age(older_than, "--older-than"))
    except ValueError as exc:
        raise Failure(str(exc)) from None
    before = f"received before {cutoff:%Y-%m-%d %H:%M} UTC ({older_than} ago)"
    with_journal = open_journal(journal_path)
    try:
        if dry_run or not sys.stderr.isatty():
            result = with_journal.prune(cutoff, keep_errors, dry_run)
        else:
            total = with_journal.count_prunable(cutoff, keep_errors)
            with click.progressbar(length=total, label="pruning", file=sys.stderr) as bar:
                result = with_journal.prune(cutoff, keep_errors, progress=bar.update)
    finally:
        with_journal.close()
    if as_json:
        click.echo(json.dumps({"messages": result.messages, "dry_run": result.dry_run, "cutoff": iso(cutoff),
                               "bytes_before": result.bytes_before, "bytes_after": result.bytes_after}))
    elif dry_run:
        click.echo(f"would prune {result.messages} messages {before}")
    else:
        click.echo(f"pruned {result.messages} messages {before}; {what_size(journal_path)} "
                   f"{result.bytes_before / 1e6:.1f} MB -> {result.bytes_after / 1e6:.1f} MB")


@journal.command("migrate", context_settings=CONTEXT)
@click.option("--from", "source", required=True, type=click.Path(dir_okay=False), metavar="JOURNAL_FILE",
              help="The single node's SQLite journal (var/journal.db).")
@click.option("--to", "target", required=True, metavar="URL",
              help="The cluster's PostgreSQL journal: postgresql://USER:PASSWORD@HOST:PORT/DATABASE.")
@json_option
def journal_migrate(source, target, as_json):
    """Copy a single node's SQLite journal into a cluster's PostgreSQL journal, losing nothing.

    Every message (its exact bytes and IDs), identifier, conversion, delivery with its state and
    attempts, and replay is copied, and free text indexed. Safe to run again: a second run brings
    what the node received since and every delivery's latest state. Run it once while the node
    still runs, stop the node, run it again, then start the cluster's nodes on the URL. Refuses
    (exit 1) a database that holds other messages. Exit codes: 0 copied and every row counted in
    the target; 1 a conflict, or rows missing after the copy; 3 a journal cannot be opened.

    Example: hl7bridge journal migrate --from var/journal.db --to postgresql://hl7bridge@db/hl7bridge
    """
    from ..store import migrate_journal
    from ..store.postgres import redacted
    from ..store.postgres_import import MigrationConflict

    done: dict[str, int] = {}

    def progress(table, rows):
        done[table] = done.get(table, 0) + rows
        if not as_json and sys.stderr.isatty():
            click.echo(f"\r{table}: {done[table]} rows", nl=False, err=True)

    try:
        result = migrate_journal(source, target, progress)
    except ValueError as exc:
        raise Failure(str(exc), EXIT_USAGE) from None
    except MigrationConflict as exc:
        raise Failure(str(exc), EXIT_NOT_ACCEPTED) from None
    except (FileNotFoundError, OSError) as exc:
        raise Failure(f"cannot migrate: {exc}", EXIT_CONNECTION) from None
    verified = result.pop("verified")
    missing = {table: source_rows - found for table, (source_rows, found) in verified.items() if found < source_rows}
    if as_json:
        click.echo(json.dumps({"copied": result, "verified": {t: {"source": s, "target": f}
                                                              for t, (s, f) in verified.items()},
                               "complete": not missing}, indent=2))
    else:
        click.echo(f"{source} -> {redacted(target)}")
        for table, (source_rows, found) in verified.items():
            click.echo(f"  {table:12} {source_rows:>9} in the source, {found:>9} in the target")
    if missing:
        raise Failure(f"rows missing in the target: {missing}; run it again", EXIT_NOT_ACCEPTED)


def what_size(location) -> str:
    """What prune's sizes are of: the files, or the database."""
    from ..store import is_database_url

    return "database" if is_database_url(location) else "journal and text index"


@journal.command("show", context_settings=CONTEXT)
@journal_option
@click.argument("message_id", type=int)
@click.option("--raw", is_flag=True, help="Print only the message bytes as received.")
@click.option("--validate", is_flag=True, help="Also check the structure against the standard (hl7apy).")
@json_option
def journal_show(journal_path, message_id, raw, validate, as_json):
    """Show one message: what was received, its fields by name, and the ACK sent.

    Also what the reader assumed to read it (warning), and its FHIR conversion: the Bundle's
    entries, or the problems, and what mapping assumed (its warnings).

    Example: hl7bridge journal show 42
    """
    from ..ops.detail import describe_message

    with_journal = open_journal(journal_path)
    try:
        record = with_journal.get(message_id)
        if record is not None:
            record["conversion"] = with_journal.conversion(message_id)
            record["history"] = with_journal.history(message_id)
    finally:
        with_journal.close()
    if record is None:
        raise Failure(f"no message {message_id} in {journal_path}", EXIT_NOT_ACCEPTED)
    if raw:
        sys.stdout.buffer.write(record["raw"])
        sys.stdout.flush()
        return
    detail = describe_message(record, validate=validate)
    if as_json:
        click.echo(json.dumps(detail, indent=2, ensure_ascii=False))
    else:
        click.echo(detail_text(detail))
