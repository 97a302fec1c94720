"""The journal at scale: fill a year of messages, index their text, search, prune (run by hand).

Run from the repository root::

    .venv/bin/python bench/journal.py                        # 1,000,000 messages
    .venv/bin/python bench/journal.py --messages 200000      # a quicker check
    .venv/bin/python bench/journal.py --dir /data/bench --keep

It needs a few GB of free disk where the journal goes (about 5.5 KB a message, journal and text
index together, so 5.5 GB for a million; it checks for 7 KB a message before it starts). ``--dir`` chooses where (default: a new directory under
the system's temporary directory); it should be a real disk, not tmpfs, to mean anything.

What it does, in order, and prints as a Markdown table at the end:

1. Fills a fresh journal (``synchronous=normal``: filling speed is not what is measured here) with
   ``--messages`` messages spread over one year of ``received_at`` timestamps, through the
   engine's own ingest path (``Ingestor.prepare`` then ``Ingestor.record``, one transaction per
   2,000 messages), with an injected clock. The messages are our examples (``examples/*.hl7``,
   SIU and DFT) with fresh identifiers each time: MSH-7, MSH-10, PID-3, PID-5 (about 130 family
   names), PID-18, PV1-19, SCH-1/SCH-2, FT1-2, and the guarantor and insured names of a DFT.
   About 200,000 distinct patients for a million messages (a pool of ``--messages`` / 4), of whom
   1 % are "frequent" and get a tenth of all messages. Appointments are booked by S12s, and later
   messages (S13-S26, and most DFTs) come back to a recently booked one, as a real feed does. About 1 % of the frames
   have a bad MSH (``examples/bad_msh.hl7``: no MSH-9, no MSH-12) and are rejected, and 0.2 % are
   resends of the message before (duplicates).
2. Builds the free-text index (``TextIndex.catch_up_all``).
3. Times the searches operators run, each ``--repeat`` times with different values (median and
   max in ms; the max is usually the first run, on a cold SQLite page cache), and shows each
   query's ``EXPLAIN QUERY PLAN``, flagging a full scan of ``messages`` or ``message_ids``.
4. Times ``retention.prune`` with the cutoff in the middle of the year (about half the messages
   go) and compares the files' sizes before and after. If the prune is projected to take longer
   than ``--prune-budget`` seconds (judged after each batch of 500, from 30 s on), it is stopped,
   and the rest is pruned after adding an index on ``messages(duplicate_of)`` to this journal, so
   the space given back can still be measured; the table says so. (Without that index, the
   foreign key ``duplicate_of REFERENCES messages`` makes SQLite scan the whole messages table
   once for every message deleted.)
5. Prints the results as a Markdown table, with the query plans below it.

Targets: keyed searches under 50 ms, free text under 500 ms, and after pruning half the messages
the files (journal and text index with their WALs) at most 60 % of their former size.

The operating system's page cache is warm throughout (the journal was just written), so the
searches measure SQLite, not the disk. The directory is removed at the end unless ``--keep``
(when ``--dir`` already existed, only the files this script made are removed).
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import re
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from bisect import bisect
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path

from engine.hl7 import charset as charsets
from engine.mllp.ingest import Frame, Ingestor
from engine.stamps import iso
from engine.store import PruneResult, SearchQuery
from engine.store.sql import prunable_sql, search_sql
from engine.store.sqlite import SqliteJournal as Journal
from engine.store.sqlite_text import TextIndex, text_index_path

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"

BATCH = 2000  # frames per record() call, i.e. per transaction
# Disk needed a message at the peak: journal (about 4.5 KB: a 2-3 KB row mostly alone in its 4 KB
# page, plus indexes), text index (about 0.8 KB) and the WALs, with a margin.
BYTES_PER_MESSAGE = 7_000
YEAR_START = datetime(2025, 1, 1, tzinfo=timezone.utc)
YEAR = timedelta(days=365)

# The accepted part of the feed: example file -> share (percent). Bookings and modifications
# dominate a scheduling feed; charges come once a visit is done.
FEED = {
    "siu_s12.hl7": 24, "siu_s12_utf8.hl7": 3, "siu_s13.hl7": 8, "siu_s14.hl7": 10,
    "siu_s15.hl7": 6, "siu_s16.hl7": 1, "siu_s17.hl7": 1, "siu_s18.hl7": 2, "siu_s19.hl7": 2,
    "siu_s20.hl7": 1, "siu_s21.hl7": 1, "siu_s22.hl7": 1, "siu_s23.hl7": 1, "siu_s24.hl7": 1,
    "siu_s26.hl7": 3,
    "dft_p03.hl7": 24, "dft_p11.hl7": 8, "dft_p03_latin1.hl7": 3,
}
REJECTED_FILE = "bad_msh.hl7"
REJECTED_SHARE = 0.01
RESEND_SHARE = 0.002
FREQUENT_PATIENTS = 0.01  # share of the patients...
FREQUENT_SHARE = 0.10  # ...who get this share of the messages
RECENT_APPOINTMENTS = 20_000  # how far back a modification or a charge looks for its appointment

# Made-up names (ASCII, plus a few Latin-1 letters so the Latin-1 and UTF-8 examples keep
# carrying non-ASCII bytes). Family names are what the free-text search looks for.
FAMILIES = """
SMITH JOHNSON WILLIAMS BROWN JONES MILLER DAVIS GARCIA RODRIGUEZ WILSON MARTINEZ ANDERSON TAYLOR
THOMAS HERNANDEZ MOORE MARTIN JACKSON THOMPSON WHITE LOPEZ LEE GONZALEZ HARRIS CLARK LEWIS
ROBINSON WALKER PEREZ HALL YOUNG ALLEN SANCHEZ WRIGHT KING SCOTT GREEN BAKER ADAMS NELSON HILL
RAMIREZ CAMPBELL MITCHELL ROBERTS CARTER PHILLIPS EVANS TURNER TORRES PARKER COLLINS EDWARDS
STEWART FLORES MORRIS NGUYEN MURPHY RIVERA COOK ROGERS MORGAN PETERSON COOPER REED BAILEY BELL
GOMEZ KELLY HOWARD WARD COX DIAZ RICHARDSON WOOD WATSON BROOKS BENNETT GRAY JAMES REYES CRUZ
HUGHES PRICE MYERS LONG FOSTER SANDERS ROSS MORALES POWELL SULLIVAN RUSSELL ORTIZ JENKINS
GUTIERREZ PERRY BUTLER BARNES FISHER HENDERSON COLEMAN SIMMONS PATTERSON JORDAN REYNOLDS HAMILTON
GRAHAM KIM GONZALES ALEXANDER RAMOS WALLACE GRIFFIN WEST COLE HAYES CHAVEZ GIBSON BRYANT ELLIS
STEVENS MURRAY FORD MARSHALL OWENS MCDONALD HARRISON RUIZ KENNEDY WELLS ALVAREZ WOODS
NÚÑEZ MÜLLER GARCÍA JOSÉ
""".split()
GIVEN = """
JAMES MARY ROBERT PATRICIA JOHN JENNIFER MICHAEL LINDA DAVID ELIZABETH WILLIAM BARBARA RICHARD
SUSAN JOSEPH JESSICA THOMAS SARAH CHARLES KAREN CHRISTOPHER LISA DANIEL NANCY MATTHEW BETTY ANTHONY
MARGARET MARK SANDRA DONALD ASHLEY STEVEN KIMBERLY PAUL EMILY ANDREW DONNA JOSHUA MICHELLE KENNETH
CAROL KEVIN AMANDA BRIAN DOROTHY GEORGE MELISSA TIMOTHY DEBORAH RENÉE JÜRGEN ZOË
""".split()

# Where the varied values go: segment -> (field, repetition, component, placeholder).
# For MSH the field index is one less than the HL7 field number: MSH-1 is the separator itself.
SLOTS = {
    "MSH": [(6, 0, 0, "sent_at"), (9, 0, 0, "control_id")],
    "PID": [(3, 0, 0, "mrn"), (3, 1, 0, "enterprise_id"), (5, 0, 0, "family"), (5, 0, 1, "given"),
            (18, 0, 0, "account")],
    "PV1": [(19, 0, 0, "visit")],
    "SCH": [(1, 0, 0, "placer"), (2, 0, 0, "filler")],
    "GT1": [(2, 0, 0, "guarantor"), (3, 0, 0, "family"), (3, 0, 1, "given")],
    "IN1": [(16, 0, 0, "family"), (16, 0, 1, "given")],
}


# -- the feed ------------------------------------------------------------------------------------


@dataclass
class Template:
    """An example message turned into a ``str.format`` template for the fields that vary."""

    name: str
    text: str
    codec: str
    role: str  # "book", "follow" (an SIU about a booked appointment), "block", "charge", "reject"
    listener: str
    control_prefix: str
    sent_offset: str | None  # MSH-7's UTC offset ("-0600"), or None when the example has none
    transactions: int  # how many FT1 segments

    def render(self, values: dict) -> bytes:
        return self.text.format_map(values).encode(self.codec, errors="replace")


def _put(segment: str, slots, ft1_number: int | None) -> str:
    fields = segment.split("|")
    if ft1_number is not None:
        slots = [(2, 0, 0, f"transaction{ft1_number}")]
    for index, rep, comp, name in slots:
        if index >= len(fields):
            continue
        reps = fields[index].split("~")
        if rep >= len(reps):
            continue
        comps = reps[rep].split("^")
        # An empty component stays empty: an example without a patient name keeps none.
        if comp >= len(comps) or not comps[comp]:
            continue
        comps[comp] = "{" + name + "}"
        reps[rep] = "^".join(comps)
        fields[index] = "~".join(reps)
    return "|".join(fields)


def load_template(name: str, role: str) -> Template:
    decoded = charsets.decode((EXAMPLES / name).read_bytes())
    text = decoded.text.replace("{", "{{").replace("}", "}}")
    segments, ft1s, msh = [], 0, None
    for segment in text.split("\r"):
        kind = segment[:3]
        if kind == "MSH":
            msh = segment.split("|")
        if kind == "FT1":
            segments.append(_put(segment, None, ft1s))
            ft1s += 1
        else:
            segments.append(_put(segment, SLOTS.get(kind, []), None))
    sent = msh[6]
    offset = sent[-5:] if len(sent) > 14 and sent[-5] in "+-" else None
    if role == "reject":
        listener = "scheduling"
    else:
        listener = "finance" if name.startswith("dft") else "scheduling"
    return Template(name, "\r".join(segments), decoded.charset, role, listener,
                    re.match(r"[A-Z]*", msh[9]).group(), offset, ft1s)


def load_feed_templates() -> tuple[list[Template], list[float], Template]:
    templates = []
    for name in FEED:
        if name.startswith("dft"):
            role = "charge"
        elif name in ("siu_s23.hl7", "siu_s24.hl7"):
            role = "block"  # schedule blocks: no patient, their own IDs
        elif name.startswith("siu_s12"):
            role = "book"
        else:
            role = "follow"
        templates.append(load_template(name, role))
    total, cumulative = 0, []
    for share in FEED.values():
        total += share
        cumulative.append(total)
    return templates, cumulative, load_template(REJECTED_FILE, "reject")


def patient_pool(count: int) -> tuple[int, int]:
    """How many patients a feed of ``count`` messages has, and how many of them are frequent."""
    # About 40 % of the messages start an encounter with a newly drawn patient (bookings, blocks,
    # rejects and charges without a booking), the rest come back to a booked one; drawing 0.4 n
    # times from n / 4 patients touches about n / 5 of them (1 - e^-1.6 = 80 %).
    patients = max(100, count // 4)
    return patients, max(1, int(patients * FREQUENT_PATIENTS))


class Feed:
    """Yields (received_at, listener, raw bytes) for ``count`` messages over one year, in time order."""

    def __init__(self, count: int, seed: int):
        self.count = count
        self.rng = random.Random(seed)
        self.patients, self.frequent = patient_pool(count)
        self.seen_patients: set[int] = set()
        self.templates, self.cumulative, self.rejected = load_feed_templates()
        self.recent: list[tuple[int, int]] = []  # (appointment, patient), a ring
        self.recent_next = 0
        self.appointments = 0
        self.transactions = 0
        self.sequence = 0

    @staticmethod
    def mrn(patient: int) -> str:
        return str(1_000_000 + patient)

    def _patient(self) -> int:
        if self.rng.random() < FREQUENT_SHARE:
            patient = self.rng.randrange(self.frequent)  # the first numbers are the frequent patients
        else:
            patient = self.rng.randrange(self.patients)
        self.seen_patients.add(patient)
        return patient

    def _new_appointment(self) -> tuple[int, int]:
        self.appointments += 1
        booked = (self.appointments, self._patient())
        if len(self.recent) < RECENT_APPOINTMENTS:
            self.recent.append(booked)
        else:
            self.recent[self.recent_next] = booked
            self.recent_next = (self.recent_next + 1) % RECENT_APPOINTMENTS
        return booked

    def _appointment_for(self, role: str) -> tuple[int, int]:
        rng = self.rng
        if role == "follow" and self.recent:
            return rng.choice(self.recent)
        if role == "charge" and self.recent and rng.random() < 0.7:
            return rng.choice(self.recent)  # the charge for a visit that was booked
        return self._new_appointment()

    def _values(self, template: Template, received_at: datetime) -> dict:
        appointment, patient = self._appointment_for(template.role)
        self.sequence += 1
        sent = received_at - timedelta(seconds=1)
        if template.sent_offset:
            hours = int(template.sent_offset[:3])
            sent_at = (sent + timedelta(hours=hours)).strftime("%Y%m%d%H%M%S") + template.sent_offset
        else:
            sent_at = sent.strftime("%Y%m%d%H%M%S")
        values = {
            "sent_at": sent_at,
            "control_id": f"{template.control_prefix}{self.sequence:09d}",
            "mrn": self.mrn(patient),
            "enterprise_id": f"E{20_000_000 + patient}",
            "guarantor": f"G{1_000_000 + patient}",
            "family": FAMILIES[patient % len(FAMILIES)],
            "given": GIVEN[(patient // len(FAMILIES)) % len(GIVEN)],
            "account": f"A{appointment:09d}",
            "visit": f"V{appointment:09d}",
            "placer": f"{'BLK' if template.role == 'block' else 'P'}{appointment:09d}",
            "filler": f"F{appointment:09d}",
        }
        for number in range(template.transactions):
            self.transactions += 1
            values[f"transaction{number}"] = f"TX{self.transactions:010d}"
        return values

    def __iter__(self):
        rng = self.rng
        # Sorted uniform times: the journal's IDs follow received_at, as they do in the engine.
        seconds = YEAR.total_seconds()
        moments = sorted(rng.random() * seconds for _ in range(self.count))
        previous = None
        for moment in moments:
            received_at = YEAR_START + timedelta(seconds=moment)
            draw = rng.random()
            if draw < RESEND_SHARE and previous is not None:
                yield received_at, previous[0], previous[1]  # the sender missed our ACK and resends
                continue
            if draw < RESEND_SHARE + REJECTED_SHARE:
                template = self.rejected
            else:
                template = self.templates[bisect(self.cumulative, rng.random() * self.cumulative[-1])]
            raw = template.render(self._values(template, received_at))
            previous = (template.listener, raw)
            yield received_at, template.listener, raw


class Clock:
    """The ingestor's clock, set to each message's received_at before it is prepared."""

    def __init__(self):
        self.now = YEAR_START

    def __call__(self) -> datetime:
        return self.now


# -- measuring -----------------------------------------------------------------------------------


@dataclass
class Row:
    """One line of the results table."""

    what: str
    result: str
    target: str = ""
    ok: bool | None = None


@dataclass
class Search:
    label: str
    queries: list[SearchQuery]
    target_ms: float
    times_ms: list[float] = field(default_factory=list)
    rows: list[int] = field(default_factory=list)
    plan: list[str] = field(default_factory=list)
    full_scans: list[str] = field(default_factory=list)


def files_of(path: Path) -> list[Path]:
    text = text_index_path(path)
    return [path, Path(f"{path}-wal"), text, Path(f"{text}-wal")]


def sizes(path: Path) -> dict[str, int]:
    return {p.name: (p.stat().st_size if p.exists() else 0) for p in files_of(path)}


def mb(size: int) -> str:
    return f"{size / 1e6:,.1f} MB"


def fill(path: Path, count: int, seed: int) -> tuple[float, dict[str, int]]:
    journal = Journal(path, synchronous="normal")
    clock = Clock()
    ingestor = Ingestor(journal, clock=clock)
    feed = Feed(count, seed)
    every = max(BATCH, count // 10 // BATCH * BATCH)
    started = last_time = time.perf_counter()
    batch, done = [], 0
    for received_at, listener, raw in feed:
        clock.now = received_at
        batch.append(ingestor.prepare(Frame(raw, listener=listener, peer="10.20.0.15:40122")))
        if len(batch) == BATCH:
            ingestor.record(batch)
            done += len(batch)
            batch = []
            if done % every == 0:
                now = time.perf_counter()
                print(f"  {done:>11,} / {count:,}  {now - started:7.1f} s  {done / (now - started):7,.0f} msg/s "
                      f"(last {every:,}: {every / (now - last_time):,.0f} msg/s)", flush=True)
                last_time = now
    if batch:
        ingestor.record(batch)
    elapsed = time.perf_counter() - started
    statuses = dict(journal.conn.execute("SELECT status, count(*) FROM messages GROUP BY status").fetchall())
    journal.close()
    print(f"  statuses: {statuses}; {len(feed.seen_patients):,} distinct patients")
    return elapsed, statuses


def print_space(path: Path):
    """Pages per table and index, and how much of them is empty (SQLite's dbstat, when built in)."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        rows = conn.execute("SELECT name, count(*), sum(pgsize), sum(unused) FROM dbstat "
                            "GROUP BY name ORDER BY 3 DESC LIMIT 8").fetchall()
        count = conn.execute("SELECT count(*) FROM messages").fetchone()[0]
    except sqlite3.OperationalError:
        return  # no dbstat in this SQLite
    finally:
        conn.close()
    print(f"  {path.name} by table and index ({count:,} messages):")
    for name, pages, size, unused in rows:
        print(f"    {name:<52} {mb(size):>12} {pages:>10,} pages {unused / size:6.0%} unused")


def sample_ids(conn: sqlite3.Connection, kinds: tuple[str, ...], count: int, rng: random.Random) -> list[str]:
    """Identifiers of randomly chosen messages, so every search looks for something that is there."""
    top = conn.execute("SELECT max(id) FROM messages").fetchone()[0]
    marks = ", ".join("?" for _ in kinds)
    found = []
    while len(found) < count:
        row = conn.execute(f"SELECT value FROM message_ids WHERE message_id = ? AND kind IN ({marks}) LIMIT 1",
                           (rng.randint(1, top), *kinds)).fetchone()
        if row:
            found.append(row[0])
    return found


def sample_control_ids(conn: sqlite3.Connection, count: int, rng: random.Random) -> list[str]:
    top = conn.execute("SELECT max(id) FROM messages").fetchone()[0]
    return [conn.execute("SELECT control_id FROM messages WHERE id = ?", (rng.randint(1, top),)).fetchone()[0]
            for _ in range(count)]


def week(number: int) -> dict:
    since = YEAR_START + timedelta(weeks=number)
    return {"since": iso(since), "until": iso(since + timedelta(weeks=1))}


def build_searches(journal: Journal, repeat: int, seed: int) -> list[Search]:
    rng = random.Random(seed + 1)
    conn = journal.conn
    weeks = [rng.randrange(18, 34) for _ in range(repeat)]  # around the middle of the year
    frequent = [Feed.mrn(rng.randrange(patient_pool(journal.count())[1])) for _ in range(repeat)]
    # A family name of average frequency, with a procedure word that is in many messages and one
    # that is in few (venipuncture: SIU^S12 and DFT^P03; colonoscopy: DFT^P11 only).
    family = FAMILIES[rng.randrange(len(FAMILIES) - 4)]
    keyed, text = 50.0, 500.0
    return [
        Search("patient (PID-3)", [SearchQuery(patient=v) for v in sample_ids(conn, ("patient",), repeat, rng)], keyed),
        Search("patient, a frequent one", [SearchQuery(patient=v) for v in frequent], keyed),
        Search("control ID (MSH-10)", [SearchQuery(control_id=v) for v in sample_control_ids(conn, repeat, rng)], keyed),
        Search("appointment (SCH-1/SCH-2)",
               [SearchQuery(appointment=v)
                for v in sample_ids(conn, ("placer_appointment", "filler_appointment"), repeat, rng)], keyed),
        Search("transaction (FT1-2)",
               [SearchQuery(transaction=v) for v in sample_ids(conn, ("transaction",), repeat, rng)], keyed),
        Search("status rejected, one week", [SearchQuery(status="rejected", **week(w)) for w in weeks], keyed),
        Search("type DFT^P03, one week", [SearchQuery(message_type="DFT^P03", **week(w)) for w in weeks], keyed),
        Search("type SIU, one week", [SearchQuery(message_type="SIU", **week(w)) for w in weeks], keyed),
        Search("status accepted, one week", [SearchQuery(status="accepted", **week(w)) for w in weeks], keyed),
        # The newest of a kind, with no time window: what an operator opens first.
        Search("status rejected, newest", [SearchQuery(status="rejected")] * repeat, keyed),
        Search("type SIU, newest", [SearchQuery(message_type="SIU")] * repeat, keyed),
        Search(f"text \"{family} venipuncture\"", [SearchQuery(text=f"{family} venipuncture")] * repeat, text),
        Search(f"text \"{family} colonoscopy\"", [SearchQuery(text=f"{family} colonoscopy")] * repeat, text),
    ]


FULL_SCAN = re.compile(r"^SCAN (m|messages|message_ids)\b")


def explain(conn: sqlite3.Connection, sql: str, params) -> list[str]:
    """EXPLAIN QUERY PLAN as an indented tree."""
    rows = conn.execute("EXPLAIN QUERY PLAN " + sql, params).fetchall()
    depth = {0: -1}
    lines = []
    for node, parent, _, detail in rows:
        depth[node] = depth.get(parent, -1) + 1
        lines.append("  " * depth[node] + detail)
    return lines


def run_searches(journal: Journal, searches: list[Search]):
    for search in searches:
        for query in search.queries:
            started = time.perf_counter()
            found = journal.search(query)
            search.times_ms.append((time.perf_counter() - started) * 1000)
            search.rows.append(len(found))
        # After the search, so a text query finds the text index attached.
        search.plan = explain(journal.conn, *search_sql(search.queries[0]))
        search.full_scans = [line.strip() for line in search.plan if FULL_SCAN.match(line.strip())]
        median, worst = statistics.median(search.times_ms), max(search.times_ms)
        print(f"  {search.label:<40} median {median:8.2f} ms  max {worst:8.2f} ms  rows {search.rows}", flush=True)


class TooSlow(Exception):
    """Raised from prune's progress callback, between two committed batches, to stop it."""


@dataclass
class PruneRun:
    result: PruneResult | None  # None when stopped for taking too long
    deleted: int
    batches: int
    elapsed: float
    deleting: float  # seconds until the last batch; the rest of ``elapsed`` is reclaiming space
    projected: float | None = None  # seconds the whole prune would have taken, when stopped


def duration(seconds: float) -> str:
    if seconds >= 5400:
        return f"{seconds / 3600:,.1f} h"
    return f"{seconds / 60:,.1f} min" if seconds >= 120 else f"{seconds:,.1f} s"


def timed_prune(journal: Journal, cutoff: datetime, candidates: int, budget: float | None) -> PruneRun:
    """``retention.prune``, stopped once it is projected to take longer than ``budget`` seconds."""
    started = time.perf_counter()
    state = {"deleted": 0, "batches": 0, "last": 0.0}

    def progress(done: int):
        state["deleted"] += done
        state["batches"] += 1
        state["last"] = time.perf_counter() - started
        if state["batches"] % 100 == 0:
            print(f"  {state['deleted']:>11,} pruned  {state['last']:7.1f} s", flush=True)
        # Judged only after 30 s, so the first batches of a fast prune (cold caches) stop nothing.
        if budget is not None and state["last"] >= min(30, budget):
            projected = state["last"] / state["deleted"] * candidates
            if projected > budget:
                raise TooSlow(projected)

    try:
        result = journal.prune(cutoff, progress=progress)
    except TooSlow as stop:
        return PruneRun(None, state["deleted"], state["batches"], time.perf_counter() - started, state["last"],
                        stop.args[0])
    return PruneRun(result, state["deleted"], state["batches"], time.perf_counter() - started, state["last"])


@dataclass
class PruneOutcome:
    rows: list[Row]
    plans: list[tuple[str, list[str]]]


def run_prune(path: Path, cutoff: datetime, budget: float) -> PruneOutcome:
    """Prune everything before ``cutoff`` and compare the files' sizes before and after.

    When the engine's prune would take longer than ``budget`` seconds, it is stopped, and the rest
    is pruned after adding an index on ``messages.duplicate_of`` to this journal (only to this
    one, and said so in the table): without it, deleting a message makes SQLite's foreign-key
    check (``duplicate_of REFERENCES messages``) scan the whole messages table for rows that point
    at it, once for every message deleted.
    """
    journal = Journal(path, create=False)  # with foreign_keys on, as the engine and the CLI run it
    delete_sql = "DELETE FROM messages WHERE id IN (?)"
    clear_sql = "UPDATE messages SET duplicate_of = NULL WHERE duplicate_of IN (?)"
    plans = [
        ("prune: the candidates of one batch (store.sql.prunable_sql)",
         explain(journal.conn, prunable_sql(False), (iso(cutoff), 0, 500))),
        ("prune: deleting messages, foreign-key checks included", explain(journal.conn, delete_sql, (0,))),
        ("prune: clearing duplicate_of", explain(journal.conn, clear_sql, (0,))),
    ]
    candidates = journal.count_prunable(cutoff, False)
    before = sizes(path)
    rows = []
    print(f"  {candidates:,} messages to prune", flush=True)
    run = timed_prune(journal, cutoff, candidates, budget)
    if run.result is None:
        per_batch = run.deleting / run.batches
        print(f"  stopped: {run.deleted:,} pruned in {run.elapsed:.1f} s ({per_batch:.1f} s a batch), "
              f"projected {duration(run.projected)} for all {candidates:,}", flush=True)
        rows.append(Row("prune half, engine as it is",
                        f"**stopped** after {run.batches:,} batch{'es' if run.batches > 1 else ''} ({run.deleted:,} of {candidates:,} messages, "
                        f"{duration(run.elapsed)}): {per_batch:,.1f} s a batch of 500, projected "
                        f"{duration(run.projected)} for all", f"< {duration(budget)} (bench budget)", False))
        started = time.perf_counter()
        journal.conn.execute("CREATE INDEX bench_messages_duplicate_of ON messages (duplicate_of) "
                             "WHERE duplicate_of IS NOT NULL")
        indexing = time.perf_counter() - started
        plans.append(("prune: deleting messages, with the bench's index on duplicate_of",
                      explain(journal.conn, delete_sql, (0,))))
        print(f"  index on duplicate_of built in {indexing:.1f} s; pruning the rest", flush=True)
        rest = timed_prune(journal, cutoff, candidates - run.deleted, None)
        rows.append(Row("prune the rest, with an index on messages(duplicate_of) added by the bench",
                        f"{rest.deleted:,} messages in {duration(rest.elapsed)} (deleting {duration(rest.deleting)}, "
                        f"reclaiming {duration(rest.elapsed - rest.deleting)}; index {indexing:.1f} s)"))
        result = rest.result
    else:
        rows.append(Row("prune half (retention.prune)",
                        f"{run.deleted:,} messages in {duration(run.elapsed)} (deleting {duration(run.deleting)}, "
                        f"reclaiming {duration(run.elapsed - run.deleting)})", f"< {duration(budget)} (bench budget)",
                        True))
        result = run.result
    left = journal.count()
    journal.close()
    after = sizes(path)
    total_before = sum(before.values())  # the same four files as PruneResult.bytes_before
    ratio = result.bytes_after / total_before
    print(f"  {left:,} messages left")
    for name in before:
        print(f"  {name:<22} {mb(before[name]):>12} -> {mb(after[name]):>12}")

    def pair(*names):
        return f"{mb(sum(before[n] for n in names))} -> {mb(sum(after[n] for n in names))}"

    text = text_index_path(path).name
    rows.append(Row("files before -> after prune (PruneResult.bytes_after)",
                    f"{mb(total_before)} -> {mb(result.bytes_after)}, **{ratio:.0%}** (journal "
                    f"{pair(path.name, path.name + '-wal')}, text index {pair(text, text + '-wal')}); "
                    f"{left:,} messages left", "<= 60 %", ratio <= 0.60))
    return PruneOutcome(rows, plans)


def machine() -> str:
    model = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            model = next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        commit = subprocess.run(["git", "-C", str(ROOT), "log", "-1", "--format=%h"],
                                check=False, capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--", "engine"],
                               check=False, capture_output=True, text=True, timeout=10).stdout.strip()
        revision = (commit or "?") + (" + uncommitted engine changes" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        revision = "unknown"
    return (f"{model}, {os.cpu_count()} cores, Python {platform.python_version()}, SQLite {sqlite3.sqlite_version}, "
            f"engine at {revision}")


# -- main ------------------------------------------------------------------------------------------


def terminated(signum, frame):
    print("\nterminated (SIGTERM)", file=sys.stderr, flush=True)
    sys.exit(128 + signum)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=1_000_000, help="how many messages (default 1,000,000)")
    parser.add_argument("--dir", type=Path, help="where the journal goes (default: a new temporary directory)")
    parser.add_argument("--keep", action="store_true", help="keep the journal files at the end")
    parser.add_argument("--repeat", type=int, default=5, help="runs of each search (default 5)")
    parser.add_argument("--seed", type=int, default=2025)
    parser.add_argument("--prune-budget", type=float, default=1800,
                        help="give up on the engine's prune as it is when it is projected to take longer "
                             "than this many seconds (default 1800), and finish with the workaround")
    args = parser.parse_args()
    # A kill (SIGTERM) then still runs the clean-up below, as Ctrl-C does.
    signal.signal(signal.SIGTERM, terminated)

    created_dir = args.dir is None or not args.dir.exists()
    directory = Path(tempfile.mkdtemp(prefix="hl7bridge-journal-")) if args.dir is None else args.dir
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "journal.db"
    if any(p.exists() for p in files_of(path)):
        sys.exit(f"{path} already exists: this benchmark needs a fresh journal")
    free = shutil.disk_usage(directory).free
    if free < args.messages * BYTES_PER_MESSAGE:
        if created_dir:
            shutil.rmtree(directory, ignore_errors=True)
        sys.exit(f"{directory} has {mb(free)} free; {args.messages:,} messages need about "
                 f"{mb(args.messages * BYTES_PER_MESSAGE)}")
    # Once, before anything runs: the engine's files may change while a long run goes on.
    setup = machine()
    print(f"# journal benchmark: {args.messages:,} messages in {path}")
    print(setup, flush=True)
    rows: list[Row] = []
    try:
        print("\n## filling", flush=True)
        elapsed, statuses = fill(path, args.messages, args.seed)
        filled = sizes(path)
        print_space(path)
        rows.append(Row("fill (prepare + record, 2,000 a transaction)",
                        f"{elapsed:,.0f} s, {args.messages / elapsed:,.0f} msg/s; journal {mb(sum(filled.values()))}"))
        rows.append(Row("statuses", ", ".join(f"{k} {v:,}" for k, v in sorted(statuses.items()))))

        print("\n## text index", flush=True)
        started = time.perf_counter()
        with TextIndex(path) as index:
            indexed = index.catch_up_all()
        elapsed = time.perf_counter() - started
        text_size = sizes(path)[text_index_path(path).name]
        print(f"  {indexed:,} messages in {elapsed:.1f} s ({indexed / elapsed:,.0f} msg/s), {mb(text_size)}")
        rows.append(Row("text index, from scratch (catch_up_all)",
                        f"{elapsed:,.0f} s, {indexed / elapsed:,.0f} msg/s; {mb(text_size)}"))

        print("\n## searches (newest 50 first, as the CLI does)", flush=True)
        journal = Journal(path, create=False)
        searches = build_searches(journal, args.repeat, args.seed)
        run_searches(journal, searches)
        journal.close()
        for search in searches:
            median, worst = statistics.median(search.times_ms), max(search.times_ms)
            scans = f"; full scan: {', '.join(search.full_scans)}" if search.full_scans else ""
            rows.append(Row(f"search: {search.label}",
                            f"median {median:,.1f} ms, max {worst:,.1f} ms "
                            f"({statistics.median(search.rows):.0f} rows){scans}",
                            f"< {search.target_ms:.0f} ms", worst < search.target_ms and not search.full_scans))

        print("\n## prune (cutoff: the middle of the year)", flush=True)
        outcome = run_prune(path, YEAR_START + YEAR / 2, args.prune_budget)
        rows.extend(outcome.rows)

        print(f"\n## results\n\n{args.messages:,} messages over one year; {setup}; "
              f"{datetime.now().astimezone():%Y-%m-%d %H:%M %Z}\n")
        print("| what | result | target | met |")
        print("|---|---|---|---|")
        for row in rows:
            met = "" if row.ok is None else ("yes" if row.ok else "**no**")
            print(f"| {row.what} | {row.result} | {row.target} | {met} |")
        print("\n## query plans\n")
        for search in searches:
            print(f"{search.label}:\n```\n" + "\n".join(search.plan) + "\n```")
        for label, plan in outcome.plans:
            print(f"{label}:\n```\n" + "\n".join(plan) + "\n```")
    finally:
        if args.keep:
            print(f"\nkept {directory}")
        elif created_dir:
            shutil.rmtree(directory, ignore_errors=True)
        else:
            for p in files_of(path) + [Path(f"{p}-shm") for p in files_of(path)[::2]]:
                p.unlink(missing_ok=True)


if __name__ == "__main__":
    main()
