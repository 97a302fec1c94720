"""The delivery claim's cost: the statement the dispatcher runs for every batch it sends (run by hand).

    .venv/bin/python bench/claim.py [--pending 5000] [--waiting 2000] [--claims 300] [--postgres]
                                    [--before DIR] [--tmpdir DIR]

Fills fresh journals through the storage interface (``Journal.insert``, ``record_conversion``,
``create_deliveries``; no mapping), then times ``claim_deliveries("fhir-main", limit=4)`` (a
batch of a destination with ``concurrency: 4``) ``--claims`` times, putting what it claimed back
after each (``recover_in_flight``, not timed: the claimed ones go to the back of the queue, as
sent ones leave it). Two outboxes, each with ``--waiting`` messages waiting for a converter (each
with its expected delivery to fhir-main, ordered by patient) and then ``--pending`` pending
deliveries to fhir-main of later messages (each with a small Bundle):

- **free**: every pending delivery is another patient's than any waiting message: nothing is held,
  the claim pays only for looking (one index probe per candidate);
- **held**: the first half of the pending deliveries are of patients with a message still waiting
  (a converter is down): they are passed over, at the front of the queue, by every claim.

On SQLite (a file in ``--tmpdir``: make it a real disk) and, with ``--postgres``, on a private
PostgreSQL (tests/pgserver.py, fsync on). ``--before DIR`` runs the same first with the engine of
another checkout (say, main exported with ``git archive``): before schema 8 there are no expected
deliveries, so nothing holds a delivery back (the gap per-key order had), and both are printed
side by side. Median and 99th percentile of one claim, in ms.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FILL_AT = datetime(2026, 11, 24, 6, 0, tzinfo=timezone.utc)
BUNDLE = json.dumps({"resourceType": "Bundle", "type": "transaction", "entry": [{"resource": {"x": "y" * 400}}]})


def fill(journal, waiting: int, pending: int, held: bool):
    """``waiting`` messages waiting for conversion, then ``pending`` mapped ones with a pending
    delivery each; with ``held`` the first half of those share a waiting message's patient."""
    from engine.store.base import ConversionRecord, Entry

    stamp = FILL_AT.strftime("%Y-%m-%dT%H:%M:%S.000000Z")
    knows_expected = "expected" in Entry.__dataclass_fields__

    def entry(patient: str, status: str, route: str) -> Entry:
        made = Entry(received_at=stamp, raw=b"MSH|^~\\&|bench", status=status, control_id=patient, route=route,
                     ids=[("patient", patient, "NORTH")])
        if knows_expected and status == "accepted":
            made.expected = [("fhir-main", f"patient:NORTH|{patient}")]
        return made

    for start in range(0, waiting, 500):
        with journal.transaction():
            for n in range(start, min(waiting, start + 500)):
                journal.insert(entry(f"W{n}", "accepted", "clinic-scheduling"))
    for start in range(0, pending, 500):
        with journal.transaction():
            for n in range(start, min(pending, start + 500)):
                patient = f"W{n % max(waiting, 1)}" if held and n < pending // 2 else f"P{n}"
                message_id = journal.insert(entry(patient, "mapped", "clinic-charges"))
                journal.record_conversion(message_id, ConversionRecord("clinic-charges", "mapped", stamp, BUNDLE))
                journal.create_deliveries(message_id, [("fhir-main", f"patient:NORTH|{patient}")], FILL_AT)


def measure(location: str, args, held: bool) -> dict:
    """One outbox in a fresh journal at ``location``: the claims' times."""
    from engine.store import open_journal

    journal = open_journal(location, "normal")
    try:
        fill(journal, args.waiting, args.pending, held)
        now = FILL_AT + timedelta(hours=1)
        times, claimed = [], []
        for _ in range(args.claims):
            started = time.perf_counter()
            found = journal.claim_deliveries("fhir-main", "bench", now, 4, 30.0)
            times.append((time.perf_counter() - started) * 1000)
            claimed.append(len(found))
            journal.recover_in_flight(now, "bench")
        times.sort()
        return {"median_ms": round(statistics.median(times), 3), "p99_ms": round(times[int(0.99 * (len(times) - 1))], 3),
                "claimed_per_call": round(statistics.mean(claimed), 2),
                "held_front": held and args.waiting > 0}
    finally:
        journal.close()


def child(args) -> int:
    """Measure with the engine at ``--engine`` (its package first on the path)."""
    sys.path.insert(0, str(args.engine))
    results = {}
    for backend, location in (("sqlite", args.sqlite_dir), ("postgresql", args.pg_urls)):
        if not location:
            continue
        for held in (False, True):
            name = "held" if held else "free"
            target = (str(Path(location) / f"{name}.db") if backend == "sqlite"
                      else json.loads(location)[name])
            results[f"{backend} {name}"] = measure(target, args, held)
    print(json.dumps(results))
    return 0


def revision(root: Path) -> str:
    found = subprocess.run(["git", "-C", str(root), "log", "-1", "--format=%h"], capture_output=True, text=True)
    return found.stdout.strip() if found.returncode == 0 else root.name


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pending", type=int, default=5000, help="pending deliveries to fhir-main (default 5000)")
    parser.add_argument("--waiting", type=int, default=2000, help="messages waiting for conversion (default 2000)")
    parser.add_argument("--claims", type=int, default=300, help="claims timed per outbox (default 300)")
    parser.add_argument("--postgres", action="store_true", help="also on a private PostgreSQL")
    parser.add_argument("--before", type=Path, metavar="DIR", help="also the engine of another checkout, first")
    parser.add_argument("--tmpdir", help="where the journals go (a real disk; default the temp dir)")
    parser.add_argument("--engine", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--sqlite-dir", help=argparse.SUPPRESS)
    parser.add_argument("--pg-urls", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.engine is not None:
        return child(args)
    engines = ([("before", args.before.resolve())] if args.before else []) + [("after" if args.before else "this", ROOT)]
    results = {}
    with tempfile.TemporaryDirectory(dir=args.tmpdir) as scratch, contextlib.ExitStack() as stack:
        server = None
        if args.postgres:
            sys.path.insert(0, str(ROOT / "tests"))
            from pgserver import PostgresServer

            server = stack.enter_context(PostgresServer(settings={"fsync": "on", "synchronous_commit": "on"},
                                                        parent=args.tmpdir or tempfile.gettempdir()))
        for label, root in engines:
            directory = Path(scratch) / label
            directory.mkdir()
            command = [sys.executable, str(Path(__file__).resolve()), "--engine", str(root),
                       "--sqlite-dir", str(directory), "--pending", str(args.pending),
                       "--waiting", str(args.waiting), "--claims", str(args.claims)]
            if server is not None:
                urls = {name: server.create_database(f"claim_{label}_{name}") for name in ("free", "held")}
                command += ["--pg-urls", json.dumps(urls)]
            done = subprocess.run(command, capture_output=True, text=True, cwd=root,
                                  env={**os.environ, "PYTHONPATH": str(root)})
            if done.returncode != 0:
                print(done.stderr, file=sys.stderr)
                return 1
            results[label] = (revision(root), json.loads(done.stdout.splitlines()[-1]))
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), "unknown")
    print(f"# claim_deliveries, {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC: {model}, {os.cpu_count()} cores, "
          f"Python {platform.python_version()}; {args.waiting:,} messages waiting for conversion, "
          f"{args.pending:,} pending deliveries, {args.claims} claims of up to 4\n")
    labels = list(results)
    print("| outbox | " + " | ".join(f"{label} ({results[label][0]}) median / p99 ms, claimed" for label in labels) + " |")
    print("|---|" + "--:|" * len(labels))
    for row in results[labels[-1]][1]:
        cells = []
        for label in labels:
            figures = results[label][1].get(row)
            cells.append(f"{figures['median_ms']} / {figures['p99_ms']}, {figures['claimed_per_call']}" if figures else "-")
        print(f"| {row} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
