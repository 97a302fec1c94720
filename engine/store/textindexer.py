"""The free-text indexer: a small process that ``serve`` runs beside the engine.

It keeps ``journal-text.db`` up to date with the journal. Why a process and not a thread:
tokenizing every message is real CPU work, and in a thread of the engine it competed for the GIL
with the reactor; measured with bench/ingest.py at 1,000 msg/s, p99 ACK latency went from 2.3 ms
to 7.8 ms. As a process, at a lower priority, it uses the CPU the engine leaves over.

    python -m engine.store.textindexer JOURNAL [--interval SECONDS]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from ..worker import WorkerSignals, parent_gone
from .sqlite_text import TextIndex


def run(journal_path: str, interval: float, parent: int) -> int:
    signals = WorkerSignals(parent)
    with TextIndex(journal_path) as index:
        while not signals.stop:
            index.catch_up_all()
            if parent_gone(parent):
                break
            time.sleep(interval)
        index.catch_up_all()
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Keep a journal's free-text index up to date.")
    parser.add_argument("journal")
    parser.add_argument("--parent", type=int, help="the engine's process ID (the worker exits when it is gone)")
    parser.add_argument("--interval", type=float, default=0.5)
    args = parser.parse_args(argv)
    return run(args.journal, args.interval, args.parent or os.getppid())


if __name__ == "__main__":
    sys.exit(main())
