"""Scheduling to cash at scale: a year of traffic for 20 clinics (about 2 million messages), then
what keeping the record current costs per mapped message, and how fast ``reconcile --since 30d``
answers (run by hand).

    .venv/bin/python bench/reconcile.py [--clinics 20] [--per-day 120] [--days 365] [--keep DIR]

1. Fill. The year's workflow goes into a fresh SQLite journal through the storage interface, not
   over MLLP (mapping two million messages would take hours): per clinic and day, ``--per-day``
   appointments booked (S12) a week ahead; 10% rescheduled (S13), 5% cancelled (S15, some on the
   day), 3% no-shows (S26), 1% deleted (S17); a DFT for each visit that happened with a charge and
   a co-payment line, made 2 to 30 hours after the visit (1% more than the charge window late, 2% of
   visits never charged), plus walk-in DFTs. Each message is a journal row (a short stand-in for
   its text) and its facts go through ``engine.reconcile.record.apply``, as mapping does; each DFT
   gets its fhir-main and erp-finance deliveries, delivered 5 to 90 minutes later (0.3% dead), by
   ``claim_deliveries`` and ``finish_attempt``.
2. Mapping cost. On the full journal, real messages (examples/siu_s12.hl7 and dft_p03.hl7 with
   fresh identifiers) are read, mapped, validated and journaled with their deliveries, ten to a
   transaction, as the converter does: alternately with the record kept (the engine as it is) and
   without it (``pipeline.extract`` replaced by one that finds no facts), in the same run.
3. ``queue.run`` for the last 30 days (what ``hl7bridge reconcile --since 30d`` runs), and the
   command itself in a subprocess, start to exit.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date, datetime, timedelta, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.convert import variants  # noqa: E402 (fresh identifiers, as bench/convert.py makes them)
from engine.delivery.outbox import OK, Result, finish  # noqa: E402
from engine.reconcile import queue, record  # noqa: E402
from engine.reconcile.facts import AppointmentFact, ChargeFact, Facts  # noqa: E402
from engine.stamps import iso  # noqa: E402
from engine.store import open_journal  # noqa: E402
from engine.store.base import MAPPED, ConversionRecord, Entry  # noqa: E402
from engine.transform import pipeline  # noqa: E402
from engine.transform.project import Project  # noqa: E402

END = datetime(2026, 11, 1, tzinfo=timezone.utc)
TRIGGER_STATUS = {"S12": "booked", "S13": "booked", "S15": "cancelled", "S26": "noshow", "S17": "deleted"}
EVENTS = {"S12": "booked", "S13": "rescheduled", "S15": "cancelled", "S26": "no-show", "S17": "deleted"}


class Filler:
    def __init__(self, journal, project, clinics: int, per_day: int, days: int, seed: int = 7):
        self.journal, self.project = journal, project
        self.settings = project.reconcile
        self.random = random.Random(seed)
        self.clinics, self.per_day, self.days = clinics, per_day, days
        self.messages = 0
        self.pending: list[tuple[int, datetime]] = []  # DFT message IDs and when they were received

    def message(self, facility: str, kind: str, trigger: str, at: datetime) -> int:
        """A journal row standing in for one message (its text shortened to the header)."""
        self.messages += 1
        control = f"B{self.messages:09d}"
        raw = f"MSH|^~\\&|SCHED|{facility}|HL7BRIDGE|FIN|{at:%Y%m%d%H%M%S}||{kind}^{trigger}|{control}|P|2.5.1\r".encode()
        entry = Entry(received_at=iso(at), raw=raw, status=MAPPED, control_id=control, message_type=kind,
                      trigger_event=trigger, sending_facility=facility, route="bench",
                      conversion=ConversionRecord("bench", MAPPED, iso(at), "{}"), acked_at=iso(at))
        return self.journal.insert(entry)

    def siu(self, facility, trigger, at, appointment, start, patient, visit):
        message_id = self.message(facility, "SIU", trigger, at)
        fact = AppointmentFact(facility, appointment, "P" + appointment, appointment, trigger, EVENTS[trigger],
                               TRIGGER_STATUS[trigger], "", iso(start), start.date().isoformat(), patient, visit,
                               "ROOM1", "DOC1", iso(at))
        record.apply(self.journal, message_id, iso(at), Facts(fact, ()), self.settings)

    def dft(self, facility, at, lines, patient, visit):
        message_id = self.message(facility, "DFT", "P03", at)
        charges = tuple(ChargeFact(facility, txn, txn, str(n), code, kind, "99213", iso(service),
                                   service.date().isoformat(), iso(made), amount, "USD", patient, visit)
                        for n, (txn, code, kind, service, made, amount) in enumerate(lines, 1))
        record.apply(self.journal, message_id, iso(at), Facts(None, charges), self.settings)
        self.journal.create_deliveries(message_id, [("fhir-main", f"m{message_id}"), ("erp-finance", f"m{message_id}")], at)
        self.pending.append((message_id, at))

    def day(self, number: int):
        rnd = self.random
        first = END - timedelta(days=self.days)
        today = first + timedelta(days=number)
        for clinic in range(self.clinics):
            facility = f"CLINIC{clinic:02d}"
            for n in range(self.per_day):
                key = f"{number:03d}{clinic:02d}{n:03d}"
                appointment, patient, visit = f"A{key}", f"P{rnd.randrange(40000)}-{clinic}", f"V{key}"
                start = today + timedelta(hours=14 + rnd.randrange(10), minutes=15 * rnd.randrange(4))
                booked = start - timedelta(days=rnd.randint(1, 14), hours=rnd.randrange(8))
                self.siu(facility, "S12", booked, appointment, start, patient, visit)
                roll = rnd.random()
                if roll < 0.10:
                    moved = start + timedelta(days=rnd.randint(1, 3))
                    self.siu(facility, "S13", start - timedelta(hours=20), appointment, moved, patient, visit)
                    start = moved
                elif roll < 0.15:
                    self.siu(facility, "S15", start - timedelta(hours=rnd.choice((1, 30))), appointment, start, patient, visit)
                    continue
                elif roll < 0.18:
                    self.siu(facility, "S26", start + timedelta(hours=1), appointment, start, patient, visit)
                    continue
                elif roll < 0.19:
                    self.siu(facility, "S17", start - timedelta(days=1), appointment, start, patient, visit)
                    continue
                if rnd.random() < 0.02:
                    continue  # a missed charge
                made = start + timedelta(hours=rnd.randint(2, 30) if rnd.random() > 0.01 else rnd.randint(80, 200))
                self.dft(facility, made + timedelta(minutes=5),
                         [(f"T{key}", "CG", "charge", start, made, 110.0), (f"C{key}", "CO", "payment", start, made, -20.0)],
                         patient, visit)
            for n in range(self.per_day // 20):  # walk-ins: charges with no appointment
                made = today + timedelta(hours=15 + n % 8)
                self.dft(facility, made, [(f"W{number:03d}{clinic:02d}{n:03d}", "CG", "charge", made, made, 80.0)],
                         f"WALK{clinic}-{number}-{n}", "")

    def deliver(self):
        """Deliver what is queued: 5 to 90 minutes after receipt, 0.3% refused for good."""
        rnd = self.random
        due = {message_id: at for message_id, at in self.pending}
        self.pending.clear()
        far = END + timedelta(days=400)
        for destination in ("fhir-main", "erp-finance"):
            settings = self.project.destinations[destination]
            while True:
                claimed = self.journal.claim_deliveries(destination, "bench", far, 2000, 3600.0)
                if not claimed:
                    break
                for delivery in claimed:
                    at = due.get(delivery.message_id, END) + timedelta(minutes=rnd.randint(5, 90))
                    if destination == "erp-finance" and rnd.random() < 0.003:
                        result = Result("permanent", 422, "refused", error="ERP refused it")
                    else:
                        result = Result(OK, 200, "ok")
                    finish(self.journal, delivery, settings, result, at, at)


def fill(journal, project, args) -> float:
    filler = Filler(journal, project, args.clinics, args.per_day, args.days)
    start = time.perf_counter()
    for number in range(args.days):
        with journal.transaction():
            filler.day(number)
        filler.deliver()
        if number % 30 == 29:
            elapsed = time.perf_counter() - start
            print(f"  day {number + 1}: {filler.messages:,} messages, {filler.messages / elapsed:,.0f} msg/s", flush=True)
    elapsed = time.perf_counter() - start
    print(f"filled {filler.messages:,} messages in {elapsed:.0f} s ({filler.messages / elapsed:,.0f} msg/s, "
          "facts applied and deliveries settled)")
    return filler.messages


def mapping_cost(journal, project, seconds: float) -> dict:
    """ms per message mapped and journaled, with and without the record, alternating rounds."""
    samples = {"SIU": (ROOT / "examples/siu_s12.hl7").read_bytes(), "DFT": (ROOT / "examples/dft_p03.hl7").read_bytes()}
    keep = pipeline.extract
    results = {}
    for label, raw in samples.items():
        times = {"with": [], "without": []}
        streams = {"with": variants(raw, "w"), "without": variants(raw, "o")}
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            for mode in ("with", "without"):
                pipeline.extract = keep if mode == "with" else (lambda *a, **k: pipeline.NO_FACTS)
                batch = [next(streams[mode]) for _ in range(10)]
                ids = []
                with journal.transaction():
                    for text in batch:
                        ids.append(journal.insert(Entry(received_at=iso(END), raw=text, status="accepted",
                                                        route="clinic", acked_at=iso(END))))
                started = time.perf_counter()
                converted = [pipeline.convert(project, pipeline.read(text)) for text in batch]
                now = datetime.now(timezone.utc)
                with journal.transaction():
                    for message_id, result in zip(ids, converted):
                        pipeline.record(journal, message_id, result, iso(now), now, update_status=True)
                times[mode].append((time.perf_counter() - started) / len(batch) * 1000)
        pipeline.extract = keep
        results[label] = {mode: statistics.median(values) for mode, values in times.items()}
        results[label]["rounds"] = len(times["with"])
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clinics", type=int, default=20)
    parser.add_argument("--per-day", type=int, default=120)
    parser.add_argument("--days", type=int, default=365)
    parser.add_argument("--seconds", type=float, default=20.0, help="per message type, for the mapping cost")
    parser.add_argument("--keep", help="keep the journal in this directory (and reuse it when it is there)")
    args = parser.parse_args()
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    print(f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}, {date.today()}")
    directory = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="hl7bridge-reconcile-"))
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "journal.db"
    project = Project.load(ROOT)
    fresh = not path.exists()
    journal = open_journal(path, "normal")
    try:
        if fresh:
            fill(journal, project, args)
        print(f"journal: {journal.count():,} messages, {path.stat().st_size / 1e6:,.0f} MB")
        cost = mapping_cost(journal, project, args.seconds)
        for label, found in cost.items():
            extra = (found["with"] - found["without"]) / found["without"] * 100
            print(f"mapping {label}: {found['without']:.3f} ms without the record, {found['with']:.3f} ms with it "
                  f"(+{extra:.1f}%), median of {found['rounds']} alternating rounds of 10")
        as_of = END
        runs = []
        for _ in range(5):
            started = time.perf_counter()
            result = queue.run(journal, project.reconcile, project.erp_destinations(), as_of - timedelta(days=30), as_of)
            runs.append(time.perf_counter() - started)
        kinds = {}
        for item in result["exceptions"]:
            kinds[item["kind"]] = kinds.get(item["kind"], 0) + 1
        print(f"queue.run, 30 days: {min(runs) * 1000:.0f} ms best, {statistics.median(runs) * 1000:.0f} ms median "
              f"of 5; {len(result['exceptions']):,} exceptions {kinds}")
        journal.close()
        started = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "engine.cli", "reconcile", "--journal", str(path), "--config",
                               str(ROOT), "--since", "30d", "--as-of", iso(as_of), "--json"],
                              cwd=ROOT, capture_output=True)
        print(f"hl7bridge reconcile --since 30d --json: {time.perf_counter() - started:.2f} s start to exit "
              f"(exit {done.returncode}, {len(done.stdout):,} bytes)")
    finally:
        try:
            journal.close()
        except Exception:  # noqa: BLE001 - closed already
            pass
        if not args.keep:
            shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    main()
