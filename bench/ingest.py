"""MLLP ingest benchmark: throughput and ACK latency over loopback, printed as a Markdown table.

Run from the repository root, by hand (about a minute with the defaults)::

    .venv/bin/python bench/ingest.py                      # all three servers, 5 s per scenario
    .venv/bin/python bench/ingest.py --seconds 10 --json bench/results.json
    .venv/bin/python bench/ingest.py --only hl7bridge --only ceiling
    .venv/bin/python bench/ingest.py --only hl7bridge --only ceiling --before /tmp/main-worktree
    .venv/bin/python bench/ingest.py --only hl7bridge --profile /tmp/prof --locks-only   # lock waits

It needs python-hl7 (``pip install -e '.[bench]'``, or ``pip install 'hl7>=0.4.5'``) for the third
server. Everything listens on 127.0.0.1, on a free port. Journals and server logs go to a temporary
directory, removed at the end unless ``--keep``; ``--tmpdir`` chooses where, and it should be a
real disk (on tmpfs an fsync costs nothing and the durable servers look faster than they are).

Three servers run one after the other, each in its own process:

``hl7bridge``
    The engine itself, ``hl7bridge serve``: every message is parsed, checked and journaled in
    SQLite (WAL, synchronous=FULL) before its ACK is sent, with group commit across connections.
    After the run the journal's row count is compared with the number of messages sent.
``ceiling``
    ``bench/ceiling_server.py``: a bare Twisted MLLP server that only frames and answers each frame
    with a canned ACK. No Twisted MLLP server can beat it, so it is the yardstick for hl7bridge,
    and it also shows whether the load generator is fast enough to measure anything.
``python-hl7``
    ``bench/python_hl7_server.py``: what a Python user writes by hand with python-hl7's asyncio
    MLLP server: ``hl7.parse``, one SQLite insert and commit per message (WAL, synchronous=FULL),
    ``message.create_ack()``.

``hl7bridge-before`` (with ``--before DIR``)
    The engine of another checkout, run the same way, so that before and after come from one run.

hl7bridge runs from its checkout (``python -m engine.cli`` with that directory as the working
directory), never an installed ``hl7bridge`` script, which may be another checkout's. Without
``--hl7bridge-config`` it runs the shipped routes, mappings and destinations: the whole pipeline
(routing, the converter processes, file deliveries) works while messages arrive.

Scenarios, for each server:

(a) 1 connection, closed loop: send a message, wait for its ACK, send the next, for ``--seconds``.
(b) 8 connections, closed loop, each as in (a).
(c) paced: ``--paced-rate`` messages per second in total (default 1,000), spread evenly over the
    ``--paced-connections`` (default 1 and 4, one row each). Each connection sends on a fixed
    schedule but still waits for each ACK before its next message. Skipped when the closed-loop
    runs show the server cannot sustain the rate (the table says so).

Every message is the same SIU^S12 (``../shared/corpus/microsoft-FHIR-Converter/SIU-S12-01.hl7``,
3.5 KB, or ``examples/siu_s12.hl7`` when the corpus is not beside the clone) with LF line ends
turned into CR segment terminators and MSH-10 rewritten to a unique control ID per message, so
hl7bridge's duplicate detection on (MSH-4, MSH-10) never fires. The same ID goes into SCH-2, the
filler appointment ID, so each message books an appointment of its own, as in a real feed (until
2026-11-29 it did not, and every message was one more event of one appointment, whose
scheduling-to-cash state the converters worked out again from all its events: the converters'
journal writes slowed down as a run went on). Every ACK's MSA-1 must be AA; anything else is
counted and reported.

The load generator drives every connection closed-loop (or on its schedule) from
``--processes`` worker processes (default: one less than the CPUs, at least 1), each multiplexing
its connections over blocking sockets with TCP_NODELAY and ``select``. Latency is taken per message
with ``time.perf_counter_ns`` from just before the send to the moment the whole ACK frame is in.
Each scenario starts with ``--warmup`` seconds that are sent (and journaled) but not measured.

Why not one process per connection: on a 2-core machine eight generator processes compete with
the server for CPU and pay a context switch per ACK. Against the ceiling server, on 8 connections,
one process per connection reached 30,000-39,000 msg/s; one process multiplexing all eight reached
39,000-52,000, about the reference figure below.

``--pin`` runs each server on the last CPU and the generator on the others. It steadies the
ceiling's figures (left to the scheduler, client and server sometimes share a CPU and the
single-connection round trip swings between about 7,000 and 23,000 msg/s), but it is off by
default because hl7bridge indexes text and checkpoints the WAL in a background thread that uses
the second core: pinned to one CPU it managed 570-770 msg/s in the single-connection paced run,
against 865-1,000 unpinned. Expect run-to-run noise of 10-30 % on a VM either way, and run twice
before believing a difference.

Paced rows also report latency from each message's *scheduled* send time. Send-to-ACK latency
alone hides queueing: after a 40 ms stall, the messages that waited behind it are sent late and
then answered quickly. A paced row that did not reach its rate is marked "fell behind".

Reference figures measured on the development machine (2 cores) with the 3.5 KB SIU^S12: the
ceiling server about 11,600 msg/s on 1 connection and 46,000 on 8; the python-hl7 server about 320
and 270. The output says what this generator reached against the ceiling, to compare with them.
hl7bridge's targets: 2,000 msg/s on 1 connection, 5,000 on 8, and p99 ACK latency under 5 ms when
paced at 1,000 msg/s.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import platform
import re
import select
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from array import array
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
MESSAGE_FILES = (
    ROOT.parent / "shared" / "corpus" / "microsoft-FHIR-Converter" / "SIU-S12-01.hl7",
    ROOT / "examples" / "siu_s12.hl7",
)
SERVERS = ("hl7bridge", "ceiling", "python-hl7")
START_BLOCK, FRAME_END = b"\x0b", b"\x1c\x0d"

# Measured on the development machine (see the module docstring); printed beside our own figures.
# Issue 12: the whole pipeline (the shipped routes, mapping and delivery running) as a share of the
# bare Twisted ceiling measured in the same run.
CEILING_SHARE_TARGETS = {1: 0.20, 8: 0.10}
REFERENCE = {"ceiling": {1: 11_600, 8: 46_000}, "python-hl7": {1: 320, 8: 270}}
TARGETS = {"closed": {1: 2_000, 8: 5_000}, "paced_p99_ms": 5.0}

# On Linux perf_counter is CLOCK_MONOTONIC, one clock for every process on the machine, so a start
# time chosen by the parent means the same instant in each worker.
now_ns = time.perf_counter_ns


# -- the message ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Template:
    """The message split around MSH-10, so a unique control ID costs one concatenation per send.

    The control ID also goes into SCH-2 (the filler appointment ID), when the message has one:
    every message is then a new appointment, as in a real feed. With SCH-2 left as it was, every
    message would be one more event of a single appointment, and the scheduling-to-cash record
    (which reads an appointment's events to work out its state) would slow down as the run went
    on, which no feed does to it."""

    source: Path
    head: bytes  # start block + everything before MSH-10
    tail: bytes  # everything after MSH-10 + end block
    original_control_id: str
    appointment_at: int = -1  # where SCH-2 starts in tail (-1: no SCH-2)
    appointment_length: int = 0

    @property
    def size(self) -> int:
        return len(self.head) + len(self.tail) - 3 + len(self.original_control_id)

    def frame(self, control_id: bytes) -> bytes:
        if self.appointment_at < 0:
            return self.head + control_id + self.tail
        at, end = self.appointment_at, self.appointment_at + self.appointment_length
        return self.head + control_id + self.tail[:at] + control_id + self.tail[end:]


def load_template() -> Template:
    source = next((p for p in MESSAGE_FILES if p.is_file()), None)
    if source is None:
        sys.exit(f"no test message: looked for {', '.join(map(str, MESSAGE_FILES))}")
    lines = source.read_bytes().replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n")
    message = b"\r".join(line for line in lines if line.strip()) + b"\r"
    if not message.startswith(b"MSH"):
        sys.exit(f"{source} does not start with MSH")
    field_sep = message[3:4]
    msh_end = message.index(b"\r")
    # Field n of MSH (n >= 2) is element n - 1 when MSH is split on its field separator.
    fields = message[:msh_end].split(field_sep)
    if len(fields) < 11:
        sys.exit(f"{source}: MSH has no MSH-10")
    start = len(field_sep.join(fields[:9])) + 1
    end = start + len(fields[9])
    tail = message[end:] + FRAME_END
    appointment_at, appointment_length = -1, 0
    sch = tail.find(b"\rSCH" + field_sep)
    if sch >= 0:
        sch_fields = tail[sch + 1 : tail.index(b"\r", sch + 1)].split(field_sep)
        if len(sch_fields) > 2 and sch_fields[2]:
            appointment_at = sch + 1 + len(field_sep.join(sch_fields[:2])) + 1
            appointment_length = len(sch_fields[2])
    return Template(source, START_BLOCK + message[:start], tail, fields[9].decode(), appointment_at, appointment_length)


def ack_code(ack: bytes) -> str:
    """MSA-1 of an ACK payload (without the MLLP blocks), or a description of what is wrong."""
    if not ack.startswith(b"MSH") or len(ack) < 4:
        return "no MSH"
    sep = ack[3:4]
    for segment in ack.split(b"\r"):
        if segment[:4] == b"MSA" + sep:
            return segment.split(sep)[1].decode("ascii", "replace")
    return "no MSA"


# -- the load generator -----------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """One scenario, as each worker process sees it. Times are perf_counter nanoseconds."""

    name: str
    tag: str  # goes into every control ID so scenarios never reuse one
    connections: int
    seconds: float
    warmup: float
    paced_rate: float | None = None  # messages per second over all connections; None is closed loop


class Connection:
    """One MLLP client connection and where it stands in its schedule."""

    def __init__(self, index: int, port: int, plan: Plan):
        self.index = index
        # The socket stays blocking: sends of one 3.5 KB frame into an idle socket complete at
        # once, and recv is only called once select says there is something to read.
        self.sock = socket.create_connection(("127.0.0.1", port))
        # Without it Nagle's algorithm can hold a small send back for a delayed ACK (~40 ms).
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.prefix = f"B{plan.tag}{index}-"  # the scenario tag keeps control IDs unique per server
        self.buffer = b""
        self.seq = 0  # messages sent so far
        self.sent_at = 0
        self.scheduled = 0  # when the message in flight was due
        self.due = 0  # when the next message may be sent; None while its ACK is awaited
        self.done = False
        self.first = 0  # paced: when message 0 is due
        self.interval = 0  # paced: nanoseconds between two messages of this connection

    def send(self, template: Template):
        self.seq += 1
        frame = template.frame(f"{self.prefix}{self.seq}".encode())
        self.scheduled, self.due = self.due, None
        self.sent_at = now_ns()
        self.sock.sendall(frame)

    def read_ack(self) -> bytes | None:
        """Read what is there; the ACK payload once a whole frame is in, else None."""
        chunk = self.sock.recv(65536)
        if not chunk:
            raise ConnectionError("server closed the connection")
        buffer = self.buffer + chunk
        end = buffer.find(FRAME_END)
        if end < 0:
            self.buffer = buffer
            return None
        self.buffer = buffer[end + 2 :]
        start = buffer.find(START_BLOCK, 0, end)
        return buffer[start + 1 : end] if start >= 0 else buffer[:end]

    def close(self):
        self.sock.close()


def worker(pipe, indexes: list[int], port: int, plan: Plan, template: Template):
    """Child process: open its connections, say ready, wait for the start time, drive them, report.

    Closed loop, a connection sends its next message as soon as the ACK of the last one is in.
    Paced, connection i sends message k at ``start + offset_i + k * interval`` (offsets stagger
    the connections so that together they make an even stream); a late ACK makes the next send
    late too, which ``from_schedule`` records and plain send-to-ACK latency would hide.
    """
    try:
        conns = [Connection(index, port, plan) for index in indexes]
    except OSError as exc:
        pipe.send(("error", f"cannot connect: {exc}"))
        return
    pipe.send(("ready", None))
    start = pipe.recv()
    measure_from = start + int(plan.warmup * 1e9)
    stop_at = measure_from + int(plan.seconds * 1e9)
    paced = plan.paced_rate is not None
    for conn in conns:
        if paced:
            conn.interval = int(plan.connections / plan.paced_rate * 1e9)
            conn.first = conn.due = start + conn.index * conn.interval // plan.connections
        else:
            conn.due = start
    # select(), not epoll: its timeout has microsecond resolution, epoll's only millisecond, and
    # a paced send must not be up to a millisecond late. A process has few sockets, so it is cheap.
    by_fd = {conn.sock.fileno(): conn for conn in conns}
    latency, from_schedule = array("q"), array("q")
    not_aa, error, late_sends, last_ack = {}, None, 0, 0
    active = len(conns)
    cpu_start = time.process_time_ns()
    try:
        while active:
            now = now_ns()
            wait = None
            for conn in conns:
                if conn.done or conn.due is None:
                    continue  # finished, or awaiting an ACK
                if conn.due <= now:
                    if paced and now - conn.due > 1_000_000 and conn.due >= measure_from:
                        late_sends += 1
                    conn.send(template)
                else:
                    wait = conn.due - now if wait is None else min(wait, conn.due - now)
            readable, _, _ = select.select(
                [c.sock for c in conns if c.due is None], [], [], None if wait is None else wait / 1e9
            )
            for sock in readable:
                conn = by_fd[sock.fileno()]
                ack = conn.read_ack()
                if ack is None:
                    continue
                acked_at = now_ns()
                code = ack_code(ack)
                if code != "AA":
                    not_aa[code] = not_aa.get(code, 0) + 1
                # A paced message belongs to the window it was scheduled in, even if sent late.
                if (conn.scheduled if paced else conn.sent_at) >= measure_from:
                    latency.append(acked_at - conn.sent_at)
                    if paced:
                        from_schedule.append(acked_at - conn.scheduled)
                    last_ack = max(last_ack, acked_at)
                conn.due = conn.first + conn.seq * conn.interval if paced else acked_at
                if conn.due >= stop_at:  # nothing is sent at or after the end of the window
                    conn.done = True
                    active -= 1
    except OSError as exc:  # ConnectionError included: the server went away mid-run
        error = f"connections {indexes[0]}-{indexes[-1]}: {exc}"
    finally:
        for conn in conns:
            conn.close()
    pipe.send(("done", {
        "sent": sum(c.seq for c in conns), "not_aa": not_aa, "error": error, "late_sends": late_sends,
        "latency": latency.tobytes(), "from_schedule": from_schedule.tobytes(), "last_ack_ns": last_ack,
        "cpu_ns": time.process_time_ns() - cpu_start,
    }))


def percentile(ordered: list[int], q: float) -> float:
    """Nearest-rank percentile of sorted nanoseconds, in milliseconds."""
    if not ordered:
        return float("nan")
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)] / 1e6


def process_cpu_ns(pid: int) -> int:
    """User + system CPU time of a process so far, from /proc (utime, stime are fields 14, 15)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) * 1_000_000_000 // os.sysconf("SC_CLK_TCK")


@dataclass
class Result:
    server: str
    scenario: str
    connections: int
    paced_rate: float | None
    seconds: float
    messages: int = 0  # ACKed within the measured window
    sent_total: int = 0  # including warmup: what the server should have stored
    msg_per_s: float = 0.0
    p50_ms: float = float("nan")
    p90_ms: float = float("nan")
    p99_ms: float = float("nan")
    p999_ms: float = float("nan")
    max_ms: float = float("nan")
    schedule_p99_ms: float | None = None  # paced only: from the scheduled send time to the ACK
    late_sends: int = 0  # paced only: measured messages sent more than 1 ms after their time
    not_aa: dict = field(default_factory=dict)
    errors: list = field(default_factory=list)
    server_cpu: float = 0.0  # cores busy during the measured window
    client_cpu: float = 0.0  # cores the load generator used, warmup included
    skipped: str | None = None  # why the row was not measured: "skipped: ..." or "failed: ..."

    @property
    def failures(self) -> int:
        return sum(self.not_aa.values()) + len(self.errors)


def run_load(server: str, server_pid: int, port: int, plan: Plan, template: Template, processes: int) -> Result:
    """One scenario: start the workers, give them one start time, merge their reports.

    Throughput is the messages sent inside the measured window divided by the time from the start
    of the window to the last of their ACKs; the server's CPU use is sampled over the same window.
    """
    # fork: workers inherit the template and plan, and start in milliseconds, not seconds.
    ctx = multiprocessing.get_context("fork")
    processes = max(1, min(processes, plan.connections))
    pipes, procs = [], []
    for first in range(processes):
        parent_end, child_end = ctx.Pipe()
        indexes = list(range(first, plan.connections, processes))
        proc = ctx.Process(target=worker, args=(child_end, indexes, port, plan, template), daemon=True)
        proc.start()
        pipes.append(parent_end)
        procs.append(proc)
    result = Result(server, plan.name, plan.connections, plan.paced_rate, plan.seconds)
    try:
        for pipe in pipes:
            if not pipe.poll(30):
                raise RuntimeError("a load generator process did not connect within 30 s")
            kind, detail = pipe.recv()
            if kind == "error":
                raise RuntimeError(detail)
        # Every connection is open before the clock starts, so setup never counts.
        start = now_ns() + 50_000_000
        for pipe in pipes:
            pipe.send(start)
        measure_from = start + int(plan.warmup * 1e9)
        time.sleep(max(0, measure_from - now_ns()) / 1e9)
        cpu_before, wall_before = process_cpu_ns(server_pid), now_ns()
        reports = []
        deadline = time.monotonic() + plan.warmup + plan.seconds + 60
        for pipe in pipes:
            if not pipe.poll(max(0.0, deadline - time.monotonic())):
                raise RuntimeError("a load generator process did not finish: is the server stuck?")
            reports.append(pipe.recv()[1])
            if len(reports) == 1:  # the first worker is done: the measured window is over
                cpu_after, wall_after = process_cpu_ns(server_pid), now_ns()
        result.server_cpu = (cpu_after - cpu_before) / max(1, wall_after - wall_before)
    finally:
        for proc in procs:
            proc.join(5)
            if proc.is_alive():
                proc.kill()
    latency, from_schedule = [], []
    last_ack, client_cpu = measure_from, 0
    for report in reports:
        result.sent_total += report["sent"]
        result.late_sends += report["late_sends"]
        for code, count in report["not_aa"].items():
            result.not_aa[code] = result.not_aa.get(code, 0) + count
        if report["error"]:
            result.errors.append(report["error"])
        latency.extend(array("q", report["latency"]))
        from_schedule.extend(array("q", report["from_schedule"]))
        last_ack = max(last_ack, report["last_ack_ns"])
        client_cpu += report["cpu_ns"]
    latency.sort()
    result.messages = len(latency)
    result.msg_per_s = len(latency) / max(1e-9, (last_ack - measure_from) / 1e9)
    result.p50_ms, result.p90_ms = percentile(latency, 0.50), percentile(latency, 0.90)
    result.p99_ms, result.p999_ms = percentile(latency, 0.99), percentile(latency, 0.999)
    result.max_ms = latency[-1] / 1e6 if latency else float("nan")
    if plan.paced_rate is not None:
        from_schedule.sort()
        result.schedule_p99_ms = percentile(from_schedule, 0.99)
    result.client_cpu = client_cpu / max(1, last_ack - start)
    return result


# -- the servers ------------------------------------------------------------------------------


class ServerProcess:
    """A server under test in a subprocess: started, its port read from stdout, stopped by SIGTERM."""

    def __init__(self, name: str, workdir: Path, cpus: set[int] | None = None, config: Path | None = None,
                 engine_root: Path = ROOT, profile: Path | None = None, locks_only: bool = False):
        self.name = name
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        if profile is not None and name.startswith("hl7bridge"):
            # engine.profiling: cProfile of the reactor, the writer thread and each converter, and
            # every journal connection's write-lock waits, written when the engine stops.
            self.env["HL7BRIDGE_PROFILE"] = str(profile.resolve() / name)
            self.env["HL7BRIDGE_PROFILE_CPU"] = "0" if locks_only else "1"
        self.cpus = cpus
        self.workdir = workdir
        self.store: Path | None = None  # the SQLite file whose rows are counted afterwards
        python = sys.executable
        self.cwd = ROOT
        if name in ("hl7bridge", "hl7bridge-before"):
            self.store = workdir / "journal.db"
            # The engine of the checkout given (run from it, so it is that one and not whichever
            # is installed): this one, or --before's.
            self.cwd = engine_root
            command = [python, "-m", "engine.cli"]
            self.args = [*command, "serve", "--listen", "tcp:0:interface=127.0.0.1", "--journal", str(self.store),
                         "--metrics", "tcp:0:interface=127.0.0.1"]  # not 9102: another engine may have it
            if config is not None:
                self.args += ["--config", str(config)]
        elif name == "ceiling":
            self.args = [python, str(BENCH / "ceiling_server.py")]
        elif name == "python-hl7":
            self.store = workdir / "python-hl7.db"
            self.args = [python, str(BENCH / "python_hl7_server.py"), str(self.store)]
        else:
            raise ValueError(name)
        self.stderr_path = workdir / f"{name}.stderr"
        self.process: subprocess.Popen | None = None
        self.port = 0

    def start(self, timeout: float = 30.0) -> int:
        self._stderr = open(self.stderr_path, "wb")
        # The servers print only their ready line(s) on stdout (logs go to stderr, kept in a file),
        # so the pipe cannot fill up and block them after we stop reading it.
        self.process = subprocess.Popen(
            self.args, cwd=self.cwd, stdout=subprocess.PIPE, stderr=self._stderr,
            env=self.env,
            preexec_fn=(lambda: os.sched_setaffinity(0, self.cpus)) if self.cpus else None,
        )
        ready = re.compile(rb"ready on 127\.0\.0\.1:(\d+)")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            readable, _, _ = select.select([self.process.stdout], [], [], max(0.0, deadline - time.monotonic()))
            if not readable:
                break
            line = self.process.stdout.readline()
            if not line:
                raise RuntimeError(f"{self.name} exited before it was ready:\n{self.stderr_tail()}")
            match = None if b"metrics" in line else ready.search(line)  # the MLLP port, not /metrics
            if match:
                self.port = int(match.group(1))
                return self.port
        self.stop()
        raise RuntimeError(f"{self.name} was not ready within {timeout:.0f} s:\n{self.stderr_tail()}")

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM, then the exit code (-SIGKILL if it had to be killed); None if never started."""
        if self.process is None:
            return None
        self._stderr.close()  # the child has its own copy of the descriptor
        if self.process.poll() is not None:
            return self.process.returncode  # it died during the run: the caller reports it
        self.process.send_signal(signal.SIGTERM)
        try:
            code = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            code = self.process.wait()
        return code

    def stderr_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.stderr_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stored_rows(self) -> dict | None:
        """Rows in the store after the run (by status where the table has one), or None."""
        if self.store is None or not self.store.exists():
            return None
        db = sqlite3.connect(f"file:{self.store}?mode=ro", uri=True)
        try:
            total = db.execute("SELECT count(*) FROM messages").fetchone()[0]
            columns = {row[1] for row in db.execute("PRAGMA table_info(messages)")}
            by_status = {}
            if "status" in columns:
                by_status = dict(db.execute("SELECT status, count(*) FROM messages GROUP BY status").fetchall())
            return {"total": total, "by_status": by_status}
        finally:
            db.close()


# -- the report -------------------------------------------------------------------------------


def machine() -> dict:
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "kernel": platform.release(),
        "date": datetime.now(timezone.utc).astimezone().isoformat(timespec="seconds"),
        "revision": engine_revision(),
    }


def engine_revision() -> str:
    """The commit the engine was measured at, so a table can be traced to the code it describes."""
    try:
        commit = subprocess.run(["git", "-C", str(ROOT), "log", "-1", "--format=%h %s"],
                                capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--", "engine"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown (no git)"
    return (commit or "unknown") + (" (engine/ has uncommitted changes)" if dirty else "")


def filesystem_of(path: Path) -> str:
    """'ext4 on /dev/vda' for the mount holding path: fsync costs depend on it."""
    best = ("", "?", "?")
    try:
        for line in Path("/proc/mounts").read_text().splitlines():
            device, mount, fstype = line.split()[:3]
            if str(path.resolve()).startswith(mount.rstrip("/") + "/") or str(path.resolve()) == mount:
                if len(mount) > len(best[0]):
                    best = (mount, fstype, device)
    except OSError:
        pass
    return f"{best[1]} on {best[2]}"


def describe(result: Result) -> str:
    if result.skipped:
        return f"  {result.scenario:<28} {result.skipped}"
    text = (
        f"  {result.scenario:<28} {result.msg_per_s:>9,.0f} msg/s  p50 {result.p50_ms:6.2f}  "
        f"p90 {result.p90_ms:6.2f}  p99 {result.p99_ms:6.2f}  p99.9 {result.p999_ms:6.2f}  "
        f"max {result.max_ms:7.2f} ms  server CPU {result.server_cpu:4.0%}  generator CPU {result.client_cpu:4.0%}"
    )
    if result.paced_rate is not None:
        text += f"\n  {'':<28} from schedule p99 {result.schedule_p99_ms:.2f} ms, {result.late_sends} sends >1 ms late"
    if result.not_aa:
        text += f"\n  {'':<28} ACKs not AA: {result.not_aa}"
    for error in result.errors:
        text += f"\n  {'':<28} error: {error}"
    return text


def markdown_table(results: list[Result]) -> str:
    rows = ["| server | connections | msg/s | p50 ms | p99 ms |", "|---|---|--:|--:|--:|"]
    for r in results:
        conns = str(r.connections)
        if r.paced_rate is not None:
            conns += f", paced at {r.paced_rate:,.0f} msg/s"
        if r.skipped:
            rows.append(f"| {r.server} | {conns} | {r.skipped} | – | – |")
            continue
        flag = f" ({r.failures:,} failed)" if r.failures else ""
        if r.paced_rate is not None and r.msg_per_s < 0.98 * r.paced_rate:
            flag += " (fell behind)"
        rows.append(f"| {r.server} | {conns} | {r.msg_per_s:,.0f}{flag} | {r.p50_ms:.2f} | {r.p99_ms:.2f} |")
    return "\n".join(rows)


# -- main -------------------------------------------------------------------------------------


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=5.0, help="measured seconds per scenario (default 5)")
    parser.add_argument("--warmup", type=float, default=0.5,
                        help="unmeasured seconds at the start of each scenario (default 0.5)")
    parser.add_argument("--only", action="append", choices=SERVERS, help="run only this server (repeatable)")
    parser.add_argument("--paced-rate", type=float, default=1000.0, help="total msg/s of the paced runs (default 1000)")
    parser.add_argument("--paced-connections", type=int, action="append",
                        help="connections of a paced run (repeatable; default 1 and 4)")
    parser.add_argument("--processes", type=int, default=max(1, len(os.sched_getaffinity(0)) - 1),
                        help="load generator processes, connections spread over them "
                             "(default: one less than the CPUs, at least 1)")
    parser.add_argument("--pin", action="store_true",
                        help="run each server on the last CPU and the load generator on the others "
                             "(needs at least 2 CPUs; see above for why it is off by default)")
    parser.add_argument("--tmpdir", type=Path, help="where the journals go (default: the system temporary directory)")
    parser.add_argument("--keep", action="store_true", help="keep the journals and server logs afterwards")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the results as JSON")
    parser.add_argument("--before", type=Path, metavar="DIR",
                        help="also run the engine of another checkout (say, main in a temporary git worktree), "
                             "as hl7bridge-before, in the same run")
    parser.add_argument("--profile", type=Path, metavar="DIR",
                        help="profile hl7bridge (HL7BRIDGE_PROFILE): DIR/hl7bridge/ gets cProfile files of its "
                             "reactor, journal writer and converters, and their write-lock waits as JSON. "
                             "Profiling slows it down: take the figures from a run without it, or with --locks-only")
    parser.add_argument("--locks-only", action="store_true",
                        help="with --profile: only the write-lock figures, no cProfile (timings stay true)")
    parser.add_argument("--hl7bridge-config", type=Path, metavar="DIR",
                        help="config directory for hl7bridge (e.g. one whose hl7bridge.yaml sets journal.synchronous: normal)")
    return parser.parse_args(argv)


def bench_server(name: str, args, template: Template, workdir: Path, cpus) -> tuple[list[Result], dict | None]:
    """Every scenario against one server; returns the results and what its store holds.

    A scenario that fails (the server died, a connection was refused) ends this server's runs with
    a failed row, and the results so far are kept.
    """
    server = ServerProcess(name, workdir, cpus, config=args.hl7bridge_config if name.startswith("hl7bridge") else None,
                           engine_root=args.before.resolve() if name == "hl7bridge-before" else ROOT,
                           profile=args.profile, locks_only=args.locks_only)
    port = server.start()
    print(f"{name}: listening on 127.0.0.1:{port} (pid {server.process.pid})", flush=True)
    plans = [Plan(f"closed loop, {n} conn", tag, n, args.seconds, args.warmup) for tag, n in (("a", 1), ("b", 8))]
    plans += [Plan(f"paced {args.paced_rate:,.0f}/s, {n} conn", tag, n, args.seconds, args.warmup, args.paced_rate)
              for tag, n in zip("cdefgh", args.paced_connections or [1, 4])]
    results, sent, closed = [], 0, {}
    try:
        for plan in plans:
            result = None
            if plan.paced_rate is not None:
                # A closed loop is the most a server can do; when the paced run has a single
                # connection, only the single-connection closed loop bounds it.
                capacity = closed[1] if plan.connections == 1 else max(closed.values())
                if capacity < plan.paced_rate:
                    result = Result(name, plan.name, plan.connections, plan.paced_rate, plan.seconds,
                                    skipped=f"skipped: cannot keep up (closed loop reached {capacity:,.0f} msg/s)")
            if result is None:
                try:
                    result = run_load(name, server.process.pid, port, plan, template, args.processes)
                except RuntimeError as exc:
                    result = Result(name, plan.name, plan.connections, plan.paced_rate, plan.seconds,
                                    errors=[str(exc)], skipped=f"failed: {exc}")
                sent += result.sent_total
                if plan.paced_rate is None:
                    closed[plan.connections] = result.msg_per_s
            results.append(result)
            print(describe(result), flush=True)
            if result.errors and server.process.poll() is not None:
                break  # the server is gone: the remaining scenarios could only fail the same way
    finally:
        code = server.stop()
        if code not in (0, -signal.SIGTERM):
            print(f"  {name} exited with {code}; the end of its log:\n{server.stderr_tail()}")
    rows = server.stored_rows()
    if rows is None:
        return results, None
    store = {"sent": sent, **rows}
    verdict = "every message stored" if rows["total"] == sent else "MISMATCH"
    statuses = ", ".join(f"{count:,} {status}" for status, count in sorted(rows["by_status"].items()))
    print(f"  store: {rows['total']:,} rows for {sent:,} messages sent ({verdict})" + (f"; {statuses}" if statuses else ""))
    return results, store


def summary(results: list[Result], stores: dict, template: Template, info: dict, args) -> tuple[str, list[str]]:
    """The Markdown table and the lines that go under it."""
    notes = []
    reached = {r.connections: r.msg_per_s for r in results
               if r.server == "ceiling" and r.paced_rate is None and not r.skipped}
    if reached:
        notes.append(
            "Load generator check: against the ceiling server it reached "
            + " and ".join(f"{reached[c]:,.0f} msg/s on {c} connection{'s' if c > 1 else ''}" for c in sorted(reached))
            + f" (reference on the development machine: {REFERENCE['ceiling'][1]:,} and {REFERENCE['ceiling'][8]:,})."
        )
    else:
        notes.append("Load generator check: not done (the ceiling server was not run).")
    if any(r.server == "python-hl7" for r in results):
        notes.append(f"python-hl7 reference on the development machine: {REFERENCE['python-hl7'][1]:,} msg/s on 1 "
                     f"connection, {REFERENCE['python-hl7'][8]:,} on 8.")
    paced = [r for r in results if r.paced_rate is not None and not r.skipped]
    if paced:
        notes.append(
            "Paced rows, p99 from each message's scheduled send time (this also counts waiting behind a late "
            "ACK on the same connection): "
            + "; ".join(f"{r.server} {r.connections} conn {r.schedule_p99_ms:.2f} ms ({r.late_sends:,} sends "
                        f"over 1 ms late)" for r in paced) + "."
        )
    sent = sum(r.sent_total for r in results)
    not_aa = sum(sum(r.not_aa.values()) for r in results)
    errors = sum(len(r.errors) for r in results)
    if not (not_aa or errors):
        notes.append(f"{sent:,} messages sent (warmup included); every ACK's MSA-1 was AA.")
    else:
        notes.append(f"{sent:,} messages sent (warmup included); {not_aa:,} ACKs were not AA and "
                     f"{errors} load generator failure(s) were reported (see the log above the table).")
    for name, store in stores.items():
        notes.append(f"{name} store after the run: {store['total']:,} rows for {store['sent']:,} messages sent.")
    if any(r.server == "hl7bridge" for r in results):
        misses = []
        for r in results:
            if r.server != "hl7bridge" or r.skipped:
                continue
            target = TARGETS["closed"].get(r.connections)
            if r.paced_rate is None and target and r.msg_per_s < target:
                misses.append(f"{r.msg_per_s:,.0f} msg/s on {r.connections} conn (target {target:,})")
            if r.paced_rate is not None and not r.p99_ms < TARGETS["paced_p99_ms"]:
                misses.append(f"p99 {r.p99_ms:.2f} ms paced over {r.connections} conn "
                              f"(target under {TARGETS['paced_p99_ms']:g} ms)")
        notes.append("hl7bridge targets: " + ("all met." if not misses else "missed: " + "; ".join(misses) + "."))
    if reached:
        shares = []
        for r in results:
            if r.server.startswith("hl7bridge") and r.paced_rate is None and not r.skipped and r.connections in reached:
                target = CEILING_SHARE_TARGETS.get(r.connections)
                shares.append(f"{r.server} {r.connections} conn {r.msg_per_s / reached[r.connections]:.1%}"
                              + (f" (target {target:.0%})" if target and r.server == "hl7bridge" else ""))
        if shares:
            notes.append("Share of the ceiling measured in this run: " + "; ".join(shares) + ".")
    caption = (f"{info['cpu']}, {info['cores']} cores, Python {info['python']}, {info['date'][:10]}; "
               f"{template.size:,}-byte SIU^S12 over loopback, {args.seconds:g} s per row.")
    return caption + "\n\n" + markdown_table(results), notes


def main(argv=None) -> int:
    args = parse_args(argv)
    servers = [s for s in SERVERS if not args.only or s in args.only]
    if args.before is not None:
        servers.insert(servers.index("hl7bridge") if "hl7bridge" in servers else 0, "hl7bridge-before")
    template = load_template()
    if "python-hl7" in servers:
        try:
            import hl7.mllp  # noqa: F401  (only checking that the third server can start)
        except ImportError:
            sys.exit("python-hl7 is not installed: .venv/bin/pip install 'hl7>=0.4.5' (or use --only)")

    info = machine()
    server_cpus = None
    cpus = sorted(os.sched_getaffinity(0))
    if args.pin and len(cpus) >= 2:
        server_cpus = {cpus[-1]}
        os.sched_setaffinity(0, set(cpus[:-1]))  # the forked load generator processes inherit this
    workroot = Path(tempfile.mkdtemp(prefix="hl7bridge-bench-", dir=args.tmpdir))
    print(f"# hl7bridge MLLP ingest benchmark, {info['date']}")
    print(f"machine: {info['cpu']}, {info['cores']} cores, Linux {info['kernel']}, Python {info['python']}")
    print(f"hl7bridge: commit {info['revision']}")
    print(f"message: {template.source}, {template.size:,} bytes with CR segment ends, MSH-10 "
          f"{'and SCH-2 ' if template.appointment_at >= 0 else ''}unique per message")
    print(f"journals: {workroot} ({filesystem_of(workroot)})")
    placement = (f"servers on CPU {min(server_cpus)}, load generator on CPU {','.join(map(str, cpus[:-1]))}"
                 if server_cpus else "not pinned")
    print(f"each scenario: {args.warmup:g} s warmup, then {args.seconds:g} s measured; load generator: up to "
          f"{args.processes} process(es); {placement}")
    print(flush=True)

    results: list[Result] = []
    stores: dict[str, dict] = {}
    failed = False
    for name in servers:
        workdir = workroot / name
        workdir.mkdir()
        try:
            server_results, store = bench_server(name, args, template, workdir, server_cpus)
        except RuntimeError as exc:
            # One broken server should not cost the figures of the others.
            print(f"{name}: FAILED: {exc}\n", flush=True)
            failed = True
            continue
        results += server_results
        if store is not None:
            stores[name] = store
        print(flush=True)

    table, notes = summary(results, stores, template, info, args)
    print("## Results\n")
    print(table)
    print()
    print("\n".join(notes))

    if args.json:
        payload = {
            "machine": info,
            "message": {"file": str(template.source), "bytes": template.size},
            "settings": {"seconds": args.seconds, "warmup": args.warmup, "paced_rate": args.paced_rate,
                         "paced_connections": args.paced_connections or [1, 4], "pinned": bool(args.pin),
                         "journals": filesystem_of(workroot)},
            "reference": REFERENCE,
            "targets": TARGETS,
            # NaN (a row with no latencies) is not JSON: write null.
            "results": [{k: None if isinstance(v, float) and math.isnan(v) else v for k, v in asdict(r).items()}
                        for r in results],
            "stores": stores,
            "notes": notes,
            "table": table,
        }
        args.json.write_text(json.dumps(payload, indent=2, default=str) + "\n")
        print(f"\nJSON written to {args.json}")
    failed = failed or any(r.errors for r in results)
    if args.keep or failed:
        print(f"\njournals and server logs kept in {workroot}")
    else:
        shutil.rmtree(workroot, ignore_errors=True)
    lost = any(store["total"] != store["sent"] for store in stores.values())
    return 1 if failed or lost or any(r.failures for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
