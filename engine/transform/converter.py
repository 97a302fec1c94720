"""The converter: a small process that ``serve`` runs beside the engine to map routed messages.

Routes that ACK right after the journal commit (``ack.after: commit``, the fastest ACK) leave the
mapping to this process: it picks up routed messages in the order they arrived, converts each with
its route's mapping, and journals the result (status ``mapped`` or ``mapping_error``, and the
Bundle or the problems). A process and not a thread for the same reason as the text indexer:
mapping is CPU work that must not take the GIL from the reactor. SIGHUP reloads the routes and
mappings (``hl7bridge reload`` sends it to the engine, which passes it on).

    python -m engine.transform.converter JOURNAL [--config DIR] [--interval SECONDS]
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


def convert_pending(journal: Journal, project: Project, batch: int = BATCH) -> int:
    """Convert up to ``batch`` waiting messages; returns how many were journaled."""
    waiting = journal.waiting_for_conversion(batch)
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
    if converted:
        now = utc_now()
        with journal.transaction():
            for message_id, route_name, result, converted_at in converted:
                pipeline.record(journal, message_id, result, converted_at, now, update_status=True, route_name=route_name)
    return len(converted)


def run(journal_path: str, config: str | None, interval: float, parent: int) -> int:
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
            done = convert_pending(journal, project)
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
    parser.add_argument("--interval", type=float, default=0.2)
    args = parser.parse_args(argv)
    return run(args.journal, args.config, args.interval, args.parent or os.getppid())


if __name__ == "__main__":
    sys.exit(main())
