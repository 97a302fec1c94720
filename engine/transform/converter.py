"""The converter: a small process that ``serve`` runs beside the engine to map routed messages.

Routes that ACK right after the journal commit (``ack.after: commit``, the fastest ACK) leave the
mapping to this process: it claims routed messages in the order they arrived (a lease of
``LEASE`` seconds, so any number of converters, on any number of nodes, share the work and none
maps a message another holds: ``Journal.claim_conversions``), converts each with its route's
mapping, and journals the result (status ``mapped`` or ``mapping_error``, and the
Bundle or the problems). A process and not a thread for the same reason as the text indexer:
mapping is CPU work that must not take the GIL from the reactor. SIGHUP reloads the routes and
mappings (``hl7bridge reload`` sends it to the engine, which passes it on).

    python -m engine.transform.converter JOURNAL [--config DIR] [--worker NAME] [--interval SECONDS]

JOURNAL ``-`` reads the journal's location from ``$HL7BRIDGE_JOURNAL`` (how ``serve`` passes a
PostgreSQL URL, so its password never shows in the process list). ``--worker`` names it in its claims (unique in a cluster: ``NODE/converter``); a converter
started again under the same name takes its own claims back at once.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from ..errors import ConfigError, ParseError
from ..stamps import iso, utc_now
from ..store import open_journal
from ..store.base import MAPPING_ERROR, Journal
from ..worker import WorkerSignals, parent_gone
from . import pipeline
from .project import Project

BATCH = 10  # a short write transaction, so the engine's own commits never wait long
LEASE = 60.0  # seconds a claimed batch is this converter's; mapping 10 messages takes well under one
DEFAULT_WORKER = "converter"
JOURNAL_VARIABLE = "HL7BRIDGE_JOURNAL"


def convert_pending(journal: Journal, project: Project, batch: int = BATCH, worker: str = DEFAULT_WORKER,
                    lease: float = LEASE) -> int:
    """Claim up to ``batch`` waiting messages, convert them and journal the results (those whose
    claim was still ``worker``'s); returns how many were journaled."""
    waiting = journal.claim_conversions(worker, batch, lease, utc_now())
    converted = []
    for message_id, raw, charset, route_name in waiting:
        now = iso(utc_now())
        try:
            message = pipeline.read(raw, charset or "utf-8")
            result = pipeline.convert(project, message, route_name=route_name)
        except pipeline.RouteNotFound:
            result = pipeline.Converted(None, None, MAPPING_ERROR, problems=[
                f"route {route_name!r} is no longer configured; replay the message to route it again"])
        except ParseError as exc:
            result = pipeline.Converted(None, None, MAPPING_ERROR, problems=[str(exc)])
        converted.append((message_id, route_name, result, now))
    if not converted:
        return 0
    now = utc_now()
    with journal.transaction():
        held = set(journal.finish_conversions(worker, [message_id for message_id, *_ in converted]))
        for message_id, route_name, result, converted_at in converted:
            if message_id in held:
                pipeline.record(journal, message_id, result, converted_at, now, update_status=True, route_name=route_name)
    return len(held)


def run(journal_path: str, config: str | None, interval: float, parent: int, worker: str = DEFAULT_WORKER) -> int:
    signals = WorkerSignals(parent)
    project = Project.load(config)
    # Not synchronous: if a power cut loses the last conversions, those messages are still
    # 'accepted' with a route, so they are simply converted again.
    journal = open_journal(journal_path, "normal", create=False)
    try:
        while not signals.stop:
            if signals.take_reload():
                try:
                    project = Project.load(config)
                except ConfigError as exc:
                    print(f"hl7bridge converter: reload refused, keeping the running routes: {exc}", file=sys.stderr, flush=True)
            done = convert_pending(journal, project, worker=worker)
            if parent_gone(parent):
                break
            if done < BATCH:
                time.sleep(interval)
    finally:
        journal.close()
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Map routed messages that were ACKed before mapping.")
    parser.add_argument("journal")
    parser.add_argument("--config")
    parser.add_argument("--parent", type=int, help="the engine's process ID (the worker exits when it is gone)")
    parser.add_argument("--worker", default=DEFAULT_WORKER, help="its name in its claims, unique in a cluster")
    parser.add_argument("--interval", type=float, default=0.2)
    args = parser.parse_args(argv)
    journal = os.environ.get(JOURNAL_VARIABLE, "") if args.journal == "-" else args.journal
    if not journal:
        parser.error(f"JOURNAL is - but ${JOURNAL_VARIABLE} is not set")
    return run(journal, args.config, args.interval, args.parent or os.getppid(), args.worker)


if __name__ == "__main__":
    sys.exit(main())
