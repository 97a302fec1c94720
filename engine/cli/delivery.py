"""The operator's delivery tools: ``outbox`` and ``replay``."""

from __future__ import annotations

import json
import sys

import click

from .base import (CONTEXT, EXIT_NOT_ACCEPTED, Failure, cli, config_option, journal_option, json_option, load_project,
                   login_name, open_journal)
from .output import format_table


@cli.command(context_settings=CONTEXT)
@journal_option
@click.option("--destination", help="Only this destination; lists its deliveries.")
@click.option("--state", type=click.Choice(["pending", "in_flight", "retrying", "delivered", "dead"]),
              help="List deliveries in this state (with --destination or alone).")
@click.option("--limit", default=50, show_default=True, help="Most deliveries to list, newest first.")
@json_option
def outbox(journal_path, destination, state, limit, as_json):
    """What is pending, retrying, dead and delivered, per destination; or the deliveries themselves.

    Per destination, also how many messages waiting for conversion will be delivered there
    (unconverted) and how many pending deliveries wait for them (held: an earlier message with
    their ordering key is not converted yet). A listed delivery that something holds back says
    what in waits_for: such a message, or an earlier delivery with its key that is not delivered.

    Example: hl7bridge outbox --destination fhir-main --state dead
    """
    from ..delivery.outbox import deliveries, summary

    with_journal = open_journal(journal_path)
    try:
        if destination or state:
            rows = deliveries(with_journal, destination, state, limit)
            columns = ["id", "message_id", "control_id", "destination", "state", "attempts", "next_attempt_at",
                       "last_error", "waits_for"]
        else:
            rows = summary(with_journal)
            columns = ["destination", "pending", "in_flight", "retrying", "dead", "delivered", "oldest_open",
                       "unconverted", "held"]
    finally:
        with_journal.close()
    if as_json:
        click.echo(json.dumps(rows, indent=2))
    else:
        click.echo(format_table(rows, columns) if rows else "(no deliveries)")


@cli.command(context_settings=CONTEXT)
@journal_option
@click.option("--message", "message_ids", type=int, multiple=True, help="A message ID (repeatable).")
@click.option("--control-id", help="Every message with this control ID (MSH-10).")
@click.option("--dead", "dead_of", metavar="DESTINATION", help="Every message with a dead delivery to DESTINATION.")
@click.option("--to", "destinations", multiple=True, help="Only to this destination (repeatable; default: all of the route's).")
@click.option("--remap", is_flag=True, help="Map the message again with the routes and mappings as they are now.")
@config_option(help="Directory with routes/ and mappings/, for --remap.")
@click.option("--who", default=login_name, show_default="$USER, else the login name, else the user ID",
              help="Who asks (recorded).")
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
    from ..transform.replay import ReplayError, replay_messages

    with_journal = open_journal(journal_path)
    try:
        ids = list(message_ids)
        if messages_from is not None:
            ids += [int(line) for line in messages_from.read().split() if line.strip().isdigit()]
        if control_id:
            ids += with_journal.messages_with_control_id(control_id)
        if dead_of:
            ids += with_journal.messages_with_dead_deliveries(dead_of)
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
