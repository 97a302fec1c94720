"""The ``hl7bridge`` command: thin commands over the library, in the manner of sqlite-utils.

Exit codes mean the same everywhere:
  0  everything asked for was done (every message sent was accepted)
  1  the command ran but something was not accepted or not found
  2  bad usage or a bad input file (click's own usage errors are 2 as well)
  3  a connection or I/O failure (the engine is not reachable, the journal cannot be opened)
"""

from __future__ import annotations

import json
import os
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import click

from .. import __version__
from ..errors import BatchError, ConfigError, FramingError, ParseError

EXIT_OK, EXIT_NOT_ACCEPTED, EXIT_USAGE, EXIT_CONNECTION = 0, 1, 2, 3
CONTEXT = {"help_option_names": ["-h", "--help"]}


class Failure(click.ClickException):
    """An error with an exit code of our choosing."""

    def __init__(self, message, exit_code=EXIT_USAGE):
        super().__init__(message)
        self.exit_code = exit_code


def json_option(fn):
    return click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts instead of text.")(fn)


@click.group(context_settings=CONTEXT)
@click.version_option(__version__, prog_name="hl7bridge")
def cli():
    """hl7bridge: HL7 v2 (MLLP) in, SQLite journal, FHIR and ERP out.

    Example: hl7bridge serve
    """


# -- serve ------------------------------------------------------------------------------------


@cli.command(context_settings=CONTEXT)
@click.option("--listen", "listen", multiple=True, metavar="ENDPOINT",
              help="Twisted endpoint to listen on, repeatable (default tcp:2575:interface=127.0.0.1). "
                   "TLS: ssl:PORT:privateKey=KEY:certKey=CERT.")
@click.option("--config", "config_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Directory with hl7bridge.yaml, routes/ and mappings/ (default: embedded defaults).")
@click.option("--journal", "journal_path", type=click.Path(dir_okay=False), help="Journal file (default var/journal.db).")
@click.option("--log-level", type=click.Choice(["debug", "info", "warn", "error"]), help="Log level (default info).")
@click.option("--metrics", "metrics_endpoint", metavar="ENDPOINT",
              help="Where /metrics, /healthz and /readyz listen (default tcp:9102:interface=127.0.0.1), or 'off'.")
def serve(listen, config_dir, journal_path, log_level, metrics_endpoint):
    """Run the engine: listen for MLLP, journal every message, ACK after the commit.

    Example: hl7bridge serve --listen tcp:2575:interface=127.0.0.1 --journal var/journal.db
    """
    from dataclasses import replace

    from ..config import load_settings, with_overrides
    from ..transform.project import Project
    from ..serve import run

    try:
        settings = with_overrides(load_settings(config_dir), listen, journal_path)
        project = Project.load(settings.config_dir)
    except ConfigError as exc:
        raise Failure(str(exc), EXIT_USAGE) from None
    if log_level:
        settings = replace(settings, log_level=log_level)
    if metrics_endpoint:
        settings = replace(settings, metrics_endpoint=None if metrics_endpoint == "off" else metrics_endpoint)
    sys.exit(run(settings, project))


@cli.command(context_settings=CONTEXT)
@click.option("--journal", "journal_path", default="var/journal.db", show_default=True,
              type=click.Path(dir_okay=False), help="The journal of the engine to reload.")
def reload(journal_path):
    """Ask the running engine to load its routes and mappings again (SIGHUP), without a restart.

    A file that fails to load leaves the running configuration in place; the engine's log says
    which file and line. Run 'hl7bridge check' first to see problems before they reach the engine.

    Example: hl7bridge reload --journal var/journal.db
    """
    import os
    import signal

    from ..serve import pid_file

    path = pid_file(journal_path)
    try:
        pid = int(path.read_text().strip())
        os.kill(pid, signal.SIGHUP)
    except (OSError, ValueError):
        raise Failure(f"no running engine for {journal_path} (no usable {path})", EXIT_CONNECTION) from None
    click.echo(f"reload signalled to the engine (pid {pid}); its log says whether the new files took")


# -- send -------------------------------------------------------------------------------------


@cli.command(context_settings=CONTEXT)
@click.argument("address", metavar="HOST:PORT")
@click.argument("files", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--keep-line-endings", is_flag=True,
              help="Send each message's bytes exactly as in the file (default: segments end with CR).")
@click.option("--whole-file", is_flag=True,
              help="Send each file as one frame, unsplit and unchecked (to test how the engine rejects it).")
@click.option("--timeout", default=30.0, show_default=True, help="Seconds to wait for each ACK.")
@click.option("--conditional-wait", default=2.0, show_default=True,
              help="Seconds to wait for an ACK that MSH-15 ER or SU may not send.")
@click.option("--tls", is_flag=True, help="Connect with TLS.")
@click.option("--ca", type=click.Path(exists=True, dir_okay=False), help="CA certificate(s) to verify the server.")
@click.option("--cert", type=click.Path(exists=True, dir_okay=False), help="Client certificate, for mutual TLS.")
@click.option("--key", type=click.Path(exists=True, dir_okay=False), help="Client private key, for mutual TLS.")
@click.option("--insecure", is_flag=True, help="With --tls, do not verify the server's certificate.")
@click.option("--quiet", "-q", is_flag=True, help="Print one line per message, not the whole ACK.")
@json_option
def send(address, files, keep_line_endings, whole_file, timeout, conditional_wait, tls, ca, cert, key, insecure, quiet, as_json):
    """Send HL7 messages over MLLP and print each ACK.

    A file may hold one message, many, or FHS/BHS batches (sent one message per frame). The exit
    code is 0 when every message was accepted (AA/CA), 1 when any was not, 3 when the engine
    cannot be reached.

    Example: hl7bridge send 127.0.0.1:2575 examples/siu_s12.hl7 examples/dft_p03.hl7
    """
    from ..mllp.batch import split_messages
    from ..mllp.client import MLLPClient, TlsClientOptions, parse_address
    from ..mllp.sending import send_all

    try:
        host, port = parse_address(address)
    except ValueError as exc:
        raise Failure(str(exc)) from None
    messages = []
    for path in files:
        if whole_file:
            messages.append((str(path), path.read_bytes()))
            continue
        try:
            for found in split_messages(path.read_bytes(), keep_line_endings=keep_line_endings):
                messages.append((f"{path}:{found.line}", found.data))
        except BatchError as exc:
            raise Failure(f"{path}: {exc}") from None
    tls_options = None
    if tls or ca or cert:
        tls_options = TlsClientOptions(ca=ca, certificate=cert, key=key, verify=not insecure)
    try:
        client = MLLPClient(host, port, timeout=timeout, tls=tls_options)
    except OSError as exc:
        raise Failure(f"cannot connect to {host}:{port}: {exc.strerror or exc}", EXIT_CONNECTION) from None
    results = []
    with client:
        try:
            for result in send_all(client, messages, conditional_wait):
                results.append(result)
                if not as_json:
                    click.echo(result.describe(full=not quiet))
        except (OSError, FramingError) as exc:
            raise Failure(f"connection to {host}:{port} failed: {exc}", EXIT_CONNECTION) from None
    if as_json:
        click.echo(json.dumps([r.as_dict() for r in results], indent=2))
    if not all(r.accepted for r in results):
        sys.exit(EXIT_NOT_ACCEPTED)


# -- analyst tools ----------------------------------------------------------------------------


def load_project(config_dir):
    from ..transform.project import Project

    try:
        return Project.load(config_dir)
    except ConfigError as exc:
        raise Failure(str(exc), EXIT_NOT_ACCEPTED) from None


@cli.command(context_settings=CONTEXT)
@click.argument("config_dir", required=False, type=click.Path(file_okay=False, path_type=Path))
@json_option
def check(config_dir, as_json):
    """Load every route and mapping and report the first problem with its file, line and a hint.

    Exit code 0 when everything loads, 1 when something does not (for CI).

    Example: hl7bridge check .
    """
    project = load_project(config_dir)
    summary = project.mappings.summary()
    routes = [{"name": r.name, "file": Path(r.path).name, "order": r.order, "match": list(r.messages) or ["any"],
               "mapping": r.mapping, "destinations": list(r.destinations)} for r in project.routes]
    if as_json:
        click.echo(json.dumps({"directory": str(project.directory), "routes": routes, "mappings": summary}, indent=2))
        return
    click.echo(f"ok: {project.directory}")
    click.echo(f"routes ({len(routes)}), tried in this order:")
    for r in routes:
        click.echo(f"  {r['order']:>4}  {r['name']:24} {' '.join(r['match']):24} -> {r['mapping']:6} -> "
                   f"{', '.join(r['destinations']) or '(none)'}   [{r['file']}]")
    for kind, names in summary.items():
        click.echo(f"{kind} mappings ({len(names)}): {', '.join(names)}")


@cli.command(context_settings=CONTEXT)
@click.argument("files", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--route", "route_name", help="Use this route instead of the one the message matches.")
@click.option("--config", "config_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Directory with routes/ and mappings/ (default: this one, else the shipped ones).")
def convert(files, route_name, config_dir):
    """Dry run: print the FHIR Bundle each message converts to, or why it cannot. Sends nothing.

    Files may hold one message or many (also FHS/BHS batches). Bundles go to standard output as
    JSON (one per message, a list when there are several); problems go to standard error, each
    with the FHIR element, the mapping file and line, and the HL7 field. Exit code 1 when any
    message could not be converted.

    Example: hl7bridge convert examples/siu_s12.hl7 --route clinic-scheduling
    """
    from ..mllp.batch import split_messages

    project = load_project(config_dir)
    bundles, failed = [], False
    for path in files:
        try:
            found = split_messages(path.read_bytes())
        except BatchError as exc:
            raise Failure(f"{path}: {exc}") from None
        for item in found:
            try:
                converted = project.convert(item.data, route_name)
            except ConfigError as exc:
                raise Failure(str(exc)) from None
            except ParseError as exc:
                click.echo(f"{path}:{item.line}: not HL7: {exc}", err=True)
                failed = True
                continue
            if converted.ok:
                bundles.append(converted.bundle)
                continue
            failed = True
            route = f" (route {converted.route.name})" if converted.route else ""
            click.echo(f"{path}:{item.line} {converted.header.control_id.strip()}{route}: cannot convert", err=True)
            for problem in converted.problems:
                click.echo(f"  {problem}", err=True)
    if bundles:
        click.echo(json.dumps(bundles[0] if len(bundles) == 1 else bundles, indent=2, ensure_ascii=False))
    if failed:
        sys.exit(EXIT_NOT_ACCEPTED)


@cli.command("test", context_settings=CONTEXT)
@click.argument("directory", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--config", "config_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Directory with routes/ and mappings/ (default: this one, else the shipped ones).")
@click.option("--update", is_flag=True, help="Write each NAME.fhir.json from the current conversion (review the diff in git).")
def regression_test(directory, config_dir, update):
    """Convert every NAME.hl7 in DIRECTORY and compare it with NAME.fhir.json beside it.

    Shows a unified diff for each difference. Exit code 0 when all pass, 1 otherwise.

    Example: hl7bridge test examples
    """
    from ..transform.regression import run_directory

    project = load_project(config_dir)
    results = run_directory(project, directory, update)
    if not results:
        raise Failure(f"no cases in {directory}: a case is NAME.hl7 with NAME.fhir.json beside it "
                      "(hl7bridge test --update writes them)", EXIT_NOT_ACCEPTED)
    for result in results:
        click.echo(f"{'PASS' if result.passed else 'FAIL'}  {result.name}" + (" (written)" if update else ""))
        if not result.passed:
            click.echo("\n".join(f"      {line}" for line in result.detail.splitlines()))
    failed = sum(not r.passed for r in results)
    click.echo(f"{len(results) - failed} passed, {failed} failed")
    if failed:
        sys.exit(EXIT_NOT_ACCEPTED)


# -- delivery ---------------------------------------------------------------------------------


@cli.command(context_settings=CONTEXT)
@click.option("--journal", "journal_path", default="var/journal.db", show_default=True,
              type=click.Path(dir_okay=False), help="Journal file.")
@click.option("--destination", help="Only this destination; lists its deliveries.")
@click.option("--state", type=click.Choice(["pending", "in_flight", "retrying", "delivered", "dead"]),
              help="List deliveries in this state (with --destination or alone).")
@click.option("--limit", default=50, show_default=True, help="Most deliveries to list, newest first.")
@json_option
def outbox(journal_path, destination, state, limit, as_json):
    """What is pending, retrying, dead and delivered, per destination; or the deliveries themselves.

    Example: hl7bridge outbox --destination fhir-main --state dead
    """
    from ..delivery import outbox as outbox_lib

    with_journal = open_journal(journal_path)
    try:
        if destination or state:
            rows = outbox_lib.list_deliveries(with_journal, destination, state, limit)
            columns = ["id", "message_id", "control_id", "destination", "state", "attempts", "next_attempt_at", "last_error"]
        else:
            rows = outbox_lib.summary(with_journal)
            columns = ["destination", "pending", "in_flight", "retrying", "dead", "delivered", "oldest_open"]
    finally:
        with_journal.close()
    if as_json:
        click.echo(json.dumps(rows, indent=2))
    else:
        click.echo(format_table(rows, columns) if rows else "(no deliveries)")


@cli.command(context_settings=CONTEXT)
@click.option("--journal", "journal_path", default="var/journal.db", show_default=True,
              type=click.Path(dir_okay=False), help="Journal file.")
@click.option("--message", "message_ids", type=int, multiple=True, help="A message ID (repeatable).")
@click.option("--control-id", help="Every message with this control ID (MSH-10).")
@click.option("--dead", "dead_of", metavar="DESTINATION", help="Every message with a dead delivery to DESTINATION.")
@click.option("--to", "destinations", multiple=True, help="Only to this destination (repeatable; default: all of the route's).")
@click.option("--remap", is_flag=True, help="Map the message again with the routes and mappings as they are now.")
@click.option("--config", "config_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Directory with routes/ and mappings/, for --remap.")
@click.option("--who", default=lambda: os.environ.get("USER", "unknown"), show_default="$USER", help="Who asks (recorded).")
@click.option("--why", required=True, help="Why (recorded with the replay).")
@click.option("--messages-from", type=click.File("r"), metavar="FILE",
              help="Message IDs, one per line (e.g. from 'journal search --json' piped through jq).")
@json_option
def replay(journal_path, message_ids, control_id, dead_of, destinations, remap, config_dir, who, why,
           messages_from, as_json):
    """Send messages again: one, several, a search result, or every dead delivery of a destination.

    By default the stored Bundle is resent; with --remap the message is mapped again first (after
    a mapping fix). The running engine picks the deliveries up within a second. Every replay is
    recorded with who, when and why. Exit code 1 when nothing matched.

    Example: hl7bridge replay --dead fhir-main --why "server was down for maintenance"
    """
    from ..transform.replay import ReplayError, dead_message_ids, replay_messages

    with_journal = open_journal(journal_path)
    try:
        ids = list(message_ids)
        if messages_from is not None:
            ids += [int(line) for line in messages_from.read().split() if line.strip().isdigit()]
        if control_id:
            ids += [r[0] for r in with_journal.conn.execute("SELECT id FROM messages WHERE control_id = ?", (control_id,))]
        if dead_of:
            ids += dead_message_ids(with_journal, dead_of)
        ids = sorted(set(ids))
        if not ids:
            raise Failure("nothing to replay: no message matched", EXIT_NOT_ACCEPTED)
        project = load_project(config_dir) if remap else None
        options = dict(remapped=remap, only_dead=bool(dead_of) and not remap)
        try:
            if len(ids) > 200 and sys.stderr.isatty() and not as_json:
                with click.progressbar(length=len(ids), label="replaying", file=sys.stderr) as bar:
                    result = replay_messages(with_journal, project, ids, list(destinations) or None, who, why,
                                             progress=bar.update, **options)
            else:
                result = replay_messages(with_journal, project, ids, list(destinations) or None, who, why, **options)
        except ReplayError as exc:
            raise Failure(str(exc), EXIT_NOT_ACCEPTED) from None
    finally:
        with_journal.close()
    if as_json:
        click.echo(json.dumps(result, indent=2))
    else:
        remapped = ", ".join(f"{n} {status}" for status, n in sorted(result["remapped"].items()))
        click.echo(f"replayed {result['messages']} message(s): {result['deliveries']} deliveries queued again"
                   + (f"; remapped: {remapped}" if remapped else ""))


# -- journal ----------------------------------------------------------------------------------


@cli.group(context_settings=CONTEXT)
def journal():
    """Search and read the message journal.

    Example: hl7bridge journal search --patient 100234
    """


def journal_option(fn):
    return click.option(
        "--journal", "journal_path", default="var/journal.db", show_default=True,
        type=click.Path(dir_okay=False), help="Journal file.",
    )(fn)


def open_journal(path):
    from ..store.journal import Journal

    try:
        return Journal(path, create=False)
    except (FileNotFoundError, OSError) as exc:
        raise Failure(f"cannot open journal {path}: {exc}", EXIT_CONNECTION) from None


def parse_since(value: str, now: datetime | None = None) -> str:
    """'2h', '30m', '7d', '45s' ago, or an ISO date/time, as a journal timestamp."""
    from ..mllp.ingest import iso

    now = now or datetime.now(timezone.utc)
    units = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}
    if value and value[-1] in units and value[:-1].isdigit():
        return iso(now - timedelta(**{units[value[-1]]: int(value[:-1])}))
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise click.BadParameter(f"{value!r}: use 30m, 2h, 7d or an ISO time like 2026-11-24T06:00") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return iso(moment)


STATUSES = ("accepted", "mapped", "mapping_error", "unrouted", "rejected", "duplicate", "held", "error")


@journal.command("search", context_settings=CONTEXT)
@journal_option
@click.option("--patient", help="Patient identifier (any repetition of PID-3).")
@click.option("--control-id", help="Message control ID (MSH-10).")
@click.option("--appointment", help="Appointment ID (SCH-1 placer or SCH-2 filler).")
@click.option("--transaction", help="Financial transaction ID (FT1-2).")
@click.option("--type", "message_type", help="Message type, optionally with trigger: SIU or SIU^S12.")
@click.option("--facility", help="Sending facility (MSH-4).")
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
    from ..store.journal import SearchQuery

    query = SearchQuery(
        patient=patient, control_id=control_id, appointment=appointment, transaction=transaction,
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
            click.echo(format_table(rows, ["id", "received_at", "control_id", "message_type", "trigger_event",
                                           "sending_facility", "patient_id", "status", "ack_code"]))
    finally:
        with_journal.close()
    if not rows:
        sys.exit(EXIT_NOT_ACCEPTED)


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
@click.option("--older-than", required=True, metavar="AGE", help="Prune messages received longer ago than this: 90d, 12h, 30m.")
@click.option("--keep-errors", is_flag=True, help="Keep rejected, error and mapping_error messages whatever their age.")
@click.option("--dry-run", is_flag=True, help="Only count what would be pruned.")
@json_option
def journal_prune(journal_path, older_than, keep_errors, dry_run, as_json):
    """Delete old messages and give the space back to the file system.

    Messages with a delivery still owed (pending, retrying, dead) are never pruned. Works in
    small batches, so it can run beside the engine. Shows progress on a terminal.

    Example: hl7bridge journal prune --older-than 90d --keep-errors --dry-run
    """
    from ..delivery.destinations import seconds
    from ..store.retention import count_candidates, prune

    try:
        age = seconds(older_than, "--older-than")
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    cutoff = datetime.now(timezone.utc) - timedelta(seconds=age)
    with_journal = open_journal(journal_path)
    try:
        if dry_run or not sys.stderr.isatty():
            result = prune(with_journal, cutoff, keep_errors, dry_run)
        else:
            total = count_candidates(with_journal, cutoff, keep_errors)
            with click.progressbar(length=total, label="pruning", file=sys.stderr) as bar:
                result = prune(with_journal, cutoff, keep_errors, progress=bar.update)
    finally:
        with_journal.close()
    if as_json:
        click.echo(json.dumps({"messages": result.messages, "dry_run": result.dry_run,
                               "bytes_before": result.bytes_before, "bytes_after": result.bytes_after}))
    elif dry_run:
        click.echo(f"would prune {result.messages} messages received before {cutoff:%Y-%m-%d %H:%M} UTC")
    else:
        click.echo(f"pruned {result.messages} messages; journal and text index "
                   f"{result.bytes_before / 1e6:.1f} MB -> {result.bytes_after / 1e6:.1f} MB")


@journal.command("show", context_settings=CONTEXT)
@journal_option
@click.argument("message_id", type=int)
@click.option("--raw", is_flag=True, help="Print only the message bytes as received.")
@click.option("--validate", is_flag=True, help="Also check the structure against the standard (hl7apy).")
@json_option
def journal_show(journal_path, message_id, raw, validate, as_json):
    """Show one message: what was received, its fields by name, and the ACK sent.

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
        if conversion.get("bundle"):
            entries = conversion["bundle"].get("entry", [])
            lines.append(f"  bundle: {len(entries)} entries")
            for entry in entries:
                lines.append(f"    {entry['request']['method']} {entry['request']['url']}")
    history = detail.get("history") or {}
    for delivery in history.get("deliveries", []):
        lines.append("")
        lines.append(f"delivery to {delivery['destination']}: {delivery['state']} after {delivery['attempts']} attempt(s)"
                     + (f" ({delivery['last_error']})" if delivery["last_error"] else ""))
        for attempt in delivery["tries"]:
            status = f" HTTP {attempt['status']}" if attempt["status"] else ""
            lines.append(f"  {attempt['started_at']}  {attempt['outcome']}{status}  {attempt['duration_ms']:.0f} ms")
    for replay in history.get("replays", []):
        lines.append(f"replayed {replay['requested_at']} by {replay['who']}: {replay['why']}"
                     + (" (mapped again)" if replay["remapped"] else ""))
    return "\n".join(lines)


def main():
    cli(prog_name="hl7bridge")


if __name__ == "__main__":  # python -m engine.cli, as the tests run it
    main()

