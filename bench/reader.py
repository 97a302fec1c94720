"""How fast the ER7 reader is, against hl7apy, on the same message (run by hand).

    .venv/bin/python bench/reader.py [--count N]

Prints microseconds per message for: our reader (parse + the header + the journal's identifiers),
and hl7apy's parse_message with find_groups=True (what structural validation needs), and whether
each kept the Z-segment. The message is the 3.5 KB SIU^S12 from ../shared/corpus when present,
else examples/siu_s12.hl7, with a Z-segment added.
"""

from __future__ import annotations

import argparse
import platform
import time
from datetime import date
from pathlib import Path

from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.parser import parse_message

from engine.hl7.er7 import parse
from engine.hl7.header import read_header
from engine.hl7.identifiers import identifiers

ROOT = Path(__file__).resolve().parent.parent
CORPUS_SIU = ROOT.parent / "shared/corpus/microsoft-FHIR-Converter/SIU-S12-01.hl7"


def per_message_us(fn, count: int) -> float:
    start = time.perf_counter()
    for _ in range(count):
        fn()
    return (time.perf_counter() - start) / count * 1e6


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=2000)
    args = parser.parse_args()
    source = CORPUS_SIU if CORPUS_SIU.exists() else ROOT / "examples/siu_s12.hl7"
    text = source.read_bytes().decode().replace("\r\n", "\r").replace("\n", "\r").rstrip("\r")
    text += "\rZSC|1|site specific data\r"
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    print(f"{cpu}, Python {platform.python_version()}, {date.today()}; {source.name} ({len(text)} bytes) + a Z-segment")

    def ours():
        message = parse(text)
        read_header(message)
        identifiers(message)
        return message

    def theirs():
        return parse_message(text, find_groups=True, validation_level=VALIDATION_LEVEL.TOLERANT)

    ours_us = per_message_us(ours, args.count)
    theirs_us = per_message_us(theirs, max(20, args.count // 200))
    kept_ours = any(s.name == "ZSC" for s in ours().segments)
    kept_theirs = "ZSC" in theirs().to_er7()
    print(f"hl7bridge er7 reader: {ours_us:8.1f} us per message   Z-segment kept: {kept_ours}")
    print(f"hl7apy find_groups:   {theirs_us:8.1f} us per message   Z-segment kept: {kept_theirs}")
    print(f"ratio: {theirs_us / ours_us:,.0f}x")


if __name__ == "__main__":
    main()
