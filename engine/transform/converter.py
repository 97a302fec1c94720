"""The converter: a small process that ``serve`` runs beside the engine to map routed messages.

Routes that ACK right after the journal commit (``ack.after: commit``, the fastest ACK) leave the
mapping to this process: it claims routed messages in the order they arrived (a lease of
``LEASE`` seconds, so any number of converters, on any number of nodes, share the work and none
maps a message another holds: ``Journal.claim_conversions``), converts each with its route's
mapping, and journals the result (status ``mapped`` or ``mapping_error``, and the
Bundle or the problems). A process and not a thread for the same reason as the text indexer:
mapping is CPU work that must not take the GIL from the reactor; ``serve`` runs one per core by
default (``conversion.workers``), each claiming its own batches. They map and journal in parallel,
each batch as soon as it is mapped: per-key delivery order does not depend on the order
conversions are journaled in, as a message waiting for conversion holds back later messages'
deliveries with its keys until its own conversion is recorded (its expected deliveries,
``engine.delivery.outbox``). So a converter that stops holds back only the keys of the messages
it held. SIGHUP reloads the routes and mappings (``hl7bridge reload`` sends it to the engine,
which passes it on).

    python -m engine.transform.converter JOURNAL [--config DIR] [--worker NAME] [--interval SECONDS]

JOURNAL ``-`` reads the journal's location from ``$HL7BRIDGE_JOURNAL`` (how ``serve`` passes a
PostgreSQL URL, so its password never shows in the process list). ``--worker`` names it in its
claims (unique in a cluster: ``NODE/converter-1`` … ``-N``); a converter started again under the
same name takes its own claims back at once.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from ..errors import ConfigError, ParseError
from ..stamps import iso, utc_now
from ..store import open_journal
from ..delivery import outbox
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
    claim was still ``worker``'s) in one transaction; returns how many were journaled."""
    if not journal.waiting_ids(1):
        return 0  # a read: an idle converter does not take the write lock from the engine to find nothing
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


def expect_waiting(journal: Journal, project: Project, batch: int = 500) -> int:
    """Give the messages waiting for conversion that have no expected deliveries theirs (those
    journaled before schema 8 kept none): run by each converter as it
    starts, before it converts anything, so they hold back later deliveries with their keys as
    every message waiting for conversion does. Returns how many expected deliveries were added.
    (One added just as another converter records the message's conversion holds nothing: the
    hold is only ever that of a message still waiting.)"""
    added, after = 0, 0
    while True:
        found = journal.waiting_without_expected(after, batch)
        for message_id, route_name in found:
            route = project.routes.get(route_name)
            if route is not None:
                ids = [(i["kind"], i["value"], i["authority"]) for i in journal.message_identifiers(message_id)]
                added += journal.expect_deliveries(message_id, outbox.expected(project.destinations_of(route), ids))
        if len(found) < batch:
            return added
        after = found[-1][0]


def run(journal_path: str, config: str | None, interval: float, parent: int, worker: str = DEFAULT_WORKER,
        nice: int = 0) -> int:
    if nice:
        # Below the engine: on a busy machine its reactor and journal writer, on which every ACK
        # waits, get a core first, and the converters take what is left.
        os.nice(nice)
    signals = WorkerSignals(parent)
    project = Project.load(config)
    # Not synchronous: if a power cut loses the last conversions, those messages are still
    # 'accepted' with a route, so they are simply converted again.
    journal = open_journal(journal_path, "normal", create=False)
    try:
        expect_waiting(journal, project)
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
    parser.add_argument("--nice", type=int, default=0, help="run at this much lower a priority (conversion.nice)")
    args = parser.parse_args(argv)
    journal = os.environ.get(JOURNAL_VARIABLE, "") if args.journal == "-" else args.journal
    if not journal:
        parser.error(f"JOURNAL is - but ${JOURNAL_VARIABLE} is not set")
    return run(journal, args.config, args.interval, args.parent or os.getppid(), args.worker, args.nice)


if __name__ == "__main__":
    sys.exit(main())
