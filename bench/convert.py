"""Conversions per second: SIU -> Appointment Bundle and DFT -> ChargeItem Bundle, with full
FHIR checking, on one core (run by hand).

    .venv/bin/python bench/convert.py [--seconds 5] [--strict] [--before DIR] [--rounds 3]

Full checking is what every conversion gets: the mappings' structure was checked when they
loaded, and every value of every resource is checked as it is mapped (engine.transform.fhirspec).
``--strict`` adds fhir.resources on every resource, as a route with ``validate: strict`` does.
``--before DIR`` first measures the same messages with the engine of another checkout (say, the
main branch in a temporary git worktree) in a process of its own, on the same core, and prints
both in one table: before and after from one run. The two take turns ``--rounds`` times and the
medians are printed, as conversions per second of wall time and per second of the process's own
CPU time: on a machine shared with other work the wall-time rate falls with the load, the CPU-time
rate much less (it is what the conversions do with a core to themselves).

Uses the shipped routes and mappings and our own examples (examples/siu_s12.hl7, a 2 KB SIU with
two resource groups -> 10 resources; examples/dft_p03.hl7, four FT1 -> 13 resources), and the
3.5 KB Microsoft SIU^S12 from ../shared/corpus when it is there. The target: 1,000 SIU
conversions per second or more on one core.

Each conversion gets new patient, visit, account, appointment and transaction identifiers, as a
real feed does, so those resources are new every time; staff, places and equipment repeat from
message to message, as they do in a real feed (and a resource identical to one validated before is
not validated again). ``--same`` converts the very same message every time instead.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

# This checkout's engine, not whichever one is installed (HL7BRIDGE_BENCH_ROOT: another checkout's,
# for --before).
ROOT = Path(os.environ.get("HL7BRIDGE_BENCH_ROOT") or Path(__file__).resolve().parent.parent)
sys.path.insert(0, str(ROOT))
HERE = Path(__file__).resolve().parent.parent  # the samples: always this checkout's

from engine.hl7.charset import decode  # noqa: E402
from engine.hl7.er7 import parse  # noqa: E402
from engine.hl7.identifiers import identifiers  # noqa: E402
from engine.transform import pipeline  # noqa: E402
from engine.transform.project import Project  # noqa: E402


def variants(raw: bytes, tag: str = ""):
    """The message again and again with fresh identifiers (patient, visit, account, appointment,
    FT1), each suffixed ``-TAGn``."""
    values = sorted({value for _, value, _ in identifiers(parse(decode(raw).text))}, key=len, reverse=True)
    number = 0
    while True:
        number += 1
        text = raw
        for value in values:
            text = text.replace(value.encode(), f"{value}-{tag}{number}".encode())
        yield text

SAMPLES = [
    ("SIU^S12 (examples/siu_s12.hl7)", HERE / "examples/siu_s12.hl7"),
    ("SIU^S15 (examples/siu_s15.hl7)", HERE / "examples/siu_s15.hl7"),
    ("DFT^P03, 4 FT1 (examples/dft_p03.hl7)", HERE / "examples/dft_p03.hl7"),
    ("SIU^S12, corpus 3.5 KB", HERE.parent / "shared/corpus/microsoft-FHIR-Converter/SIU-S12-01.hl7"),
]


def measure(seconds: float, same: bool, strict: bool) -> list[dict]:
    """Conversions a second of each sample with this process's engine."""
    project = Project.load(ROOT)
    if strict:
        for route in project.routes:
            route.validate = tuple(dict.fromkeys((*route.validate, "strict")))
    rows = []
    for label, path in SAMPLES:
        if not path.exists():
            continue
        raw = path.read_bytes()
        bundle = pipeline.convert(project, pipeline.read(raw)).bundle
        stream = variants(raw)
        count, start, cpu_start = 0, time.perf_counter(), time.process_time()
        while time.perf_counter() - start < seconds:
            # The full path a message takes (engine.transform.pipeline): read it, route it, map it,
            # check every resource.
            pipeline.convert(project, pipeline.read(raw if same else next(stream)))
            count += 1
        elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
        rows.append({"message": label, "resources": len(bundle["entry"]), "rate": count / elapsed,
                     "ms": elapsed / count * 1000, "cpu_rate": count / cpu, "cpu_ms": cpu / count * 1000})
    return rows


def median_rows(rounds: list[list[dict]]) -> list[dict]:
    """Each sample's median over the rounds (rate, ms, and their CPU-time forms)."""
    merged = []
    for index, row in enumerate(rounds[0]):
        picks = [one[index] for one in rounds]
        merged.append({**row, **{key: statistics.median(p[key] for p in picks)
                                 for key in ("rate", "ms", "cpu_rate", "cpu_ms")}})
    return merged


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--same", action="store_true", help="convert the very same message every time")
    parser.add_argument("--strict", action="store_true", help="validate every resource with fhir.resources too")
    parser.add_argument("--before", type=Path, metavar="DIR", help="also measure the engine of this checkout, first")
    parser.add_argument("--rounds", type=int, default=3, help="before and after take turns this many times; "
                                                               "the medians are printed (default 3)")
    parser.add_argument("--rows-json", action="store_true", help=argparse.SUPPRESS)  # a --before child's output
    args = parser.parse_args()
    os.sched_setaffinity(0, {max(os.sched_getaffinity(0))})  # one core, as the target says
    if args.rows_json:
        print(json.dumps(measure(args.seconds, args.same, args.strict)))
        return
    before_rounds, after_rounds = [], []
    for _ in range(args.rounds):
        # Before and after take turns, round by round, so that a change in the machine's load
        # during the run falls on both (the medians are compared).
        if args.before is not None:
            # The other checkout's engine, with this script (its own bench may be older): its own
            # routes and mappings, the same samples (ours, from this checkout's examples/).
            command = [sys.executable, str(Path(__file__).resolve()), "--rows-json", "--seconds", str(args.seconds)]
            command += ["--same"] if args.same else []
            done = subprocess.run(command, cwd=args.before, capture_output=True, text=True, check=True,
                                  env={**os.environ, "HL7BRIDGE_BENCH_ROOT": str(args.before.resolve())})
            before_rounds.append(json.loads(done.stdout.splitlines()[-1]))
        after_rounds.append(measure(args.seconds, args.same, args.strict))
    before = {row["message"]: row for row in median_rows(before_rounds)} if before_rounds else {}
    rows = median_rows(after_rounds)
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    checking = "values checked, and fhir.resources (--strict)" if args.strict else "values checked (fhirspec)"
    print(f"{cpu}, one core, Python {platform.python_version()}, {date.today()}; after: {checking}; "
          f"median of {args.rounds} round(s) of {args.seconds:g} s")
    print("per s: conversions a second of wall time; per CPU s: a second of this process's CPU time (the same "
          "on an idle core; on a shared one, what the conversions would do with the core to themselves)")
    if before:
        print(f"before: {args.before}")
        print(f"{'message':42} {'resources':>9} {'before/s':>9} {'after/s':>9} {'x':>5} {'before/CPU s':>12} "
              f"{'after/CPU s':>11} {'x':>5}")
        for row in rows:
            old = before.get(row["message"])
            if old is None:
                continue
            print(f"{row['message']:42} {row['resources']:>9} {old['rate']:>9,.0f} {row['rate']:>9,.0f} "
                  f"{row['rate'] / old['rate']:>5.2f} {old['cpu_rate']:>12,.0f} {row['cpu_rate']:>11,.0f} "
                  f"{row['cpu_rate'] / old['cpu_rate']:>5.2f}")
        return
    print(f"{'message':42} {'resources':>9} {'conversions/s':>14} {'ms each':>8} {'per CPU s':>10}")
    for row in rows:
        print(f"{row['message']:42} {row['resources']:>9} {row['rate']:>14,.0f} {row['ms']:>8.2f} "
              f"{row['cpu_rate']:>10,.0f}")


if __name__ == "__main__":
    main()
