"""Conversions per second: SIU -> Appointment Bundle and DFT -> ChargeItem Bundle, with full
FHIR validation, on one core (run by hand).

    .venv/bin/python bench/convert.py [--seconds 5]

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
import os
import platform
import time
from datetime import date
from pathlib import Path

from engine.hl7.charset import decode
from engine.hl7.er7 import parse
from engine.hl7.identifiers import identifiers
from engine.transform import pipeline
from engine.transform.project import Project


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

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = [
    ("SIU^S12 (examples/siu_s12.hl7)", ROOT / "examples/siu_s12.hl7"),
    ("SIU^S15 (examples/siu_s15.hl7)", ROOT / "examples/siu_s15.hl7"),
    ("DFT^P03, 4 FT1 (examples/dft_p03.hl7)", ROOT / "examples/dft_p03.hl7"),
    ("SIU^S12, corpus 3.5 KB", ROOT.parent / "shared/corpus/microsoft-FHIR-Converter/SIU-S12-01.hl7"),
]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--same", action="store_true", help="convert the very same message every time")
    args = parser.parse_args()
    os.sched_setaffinity(0, {max(os.sched_getaffinity(0))})  # one core, as the target says
    project = Project.load(ROOT)
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    print(f"{cpu}, one core, Python {platform.python_version()}, {date.today()}")
    print(f"{'message':42} {'resources':>9} {'conversions/s':>14} {'ms each':>8}")
    for label, path in SAMPLES:
        if not path.exists():
            continue
        raw = path.read_bytes()
        bundle = pipeline.convert(project, pipeline.read(raw)).bundle
        stream = variants(raw)
        count, start = 0, time.perf_counter()
        while time.perf_counter() - start < args.seconds:
            # The full path a message takes (engine.transform.pipeline): read it, route it, map it,
            # validate every resource.
            pipeline.convert(project, pipeline.read(raw if args.same else next(stream)))
            count += 1
        elapsed = time.perf_counter() - start
        print(f"{label:42} {len(bundle['entry']):>9} {count / elapsed:>14,.0f} {elapsed / count * 1000:>8.2f}")


if __name__ == "__main__":
    main()
