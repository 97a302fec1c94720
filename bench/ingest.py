"""MLLP ingest benchmark: throughput and ACK latency over loopback, printed as a Markdown table.

Run from the repository root, by hand (it takes about a minute and a half with the defaults)::

    .venv/bin/python bench/ingest.py                      # all three servers, 5 s per scenario
    .venv/bin/python bench/ingest.py --seconds 10 --json bench/results.json
    .venv/bin/python bench/ingest.py --only hl7bridge --only ceiling

It needs python-hl7 (``pip install -e '.[bench]'``, or ``pip install 'hl7>=0.4.5'``) for the third
server. Everything listens on 127.0.0.1, on a free port; journals go to a temporary directory
(``--tmpdir`` chooses where: keep it on a real disk, on tmpfs an fsync costs nothing).

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
hl7bridge's duplicate detection on (MSH-4, MSH-10) never fires. Every ACK's MSA-1 must be AA;
anything else is counted and reported.

The load generator is one process per connection, each driving a blocking socket with TCP_NODELAY,
so that Python's GIL never serialises the connections. Latency is taken per message with
``time.perf_counter_ns`` from just before the send to the moment the whole ACK frame is in. Each
scenario starts with ``--warmup`` seconds that are sent (and journaled) but not measured.

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
REFERENCE = {"ceiling": {1: 11_600, 8: 46_000}, "python-hl7": {1: 320, 8: 270}}
TARGETS = {"closed": {1: 2_000, 8: 5_000}, "paced_p99_ms": 5.0}

# On Linux perf_counter is CLOCK_MONOTONIC, one clock for every process on the machine, so a start
# time chosen by the parent means the same instant in each worker.
now_ns = time.perf_counter_ns


# -- the message ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Template:
    """The message split around MSH-10, so a unique control ID costs one concatenation per send."""

    source: Path
    head: bytes  # start block + everything before MSH-10
    tail: bytes  # everything after MSH-10 + end block
    original_control_id: str

    @property
    def size(self) -> int:
        return len(self.head) + len(self.tail) - 3 + len(self.original_control_id)

    def frame(self, control_id: bytes) -> bytes:
        return self.head + control_id + self.tail


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
    return Template(source, START_BLOCK + message[:start], message[end:] + FRAME_END, fields[9].decode())


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
    """One blocking MLLP client socket."""

    def __init__(self, host: str, port: int):
        self.sock = socket.create_connection((host, port))
        # Without it Nagle's algorithm can hold a small send back for a delayed ACK (~40 ms).
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buffer = b""

    def exchange(self, frame: bytes) -> bytes:
        """Send one frame and return the payload of the next frame received."""
        self.sock.sendall(frame)
        buffer = self.buffer
        while True:
            end = buffer.find(FRAME_END)
            if end >= 0:
                break
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("server closed the connection")
            buffer += chunk
        start = buffer.find(START_BLOCK)
        self.buffer = buffer[end + 2 :]
        return buffer[start + 1 : end] if 0 <= start < end else buffer[:end]

    def close(self):
        self.sock.close()


def worker(pipe, index: int, port: int, plan: Plan, template: Template):
    """Child process: connect, say ready, wait for the start time, drive one connection, report.

    Closed loop sends as fast as ACKs come back. Paced sends message i at
    ``start + offset + i * interval`` (connections staggered by ``offset`` so that the total is an
    even stream); if the ACK is late, the next send is late too, which ``from_schedule_ns`` shows.
    """
    result = {"index": index, "sent": 0, "not_aa": {}, "error": None,
              "latency": b"", "from_schedule": b"", "last_ack_ns": 0, "late_sends": 0, "cpu_ns": 0}
    try:
        conn = Connection("127.0.0.1", port)
    except OSError as exc:
        pipe.send(("error", f"connection {index}: {exc}"))
        return
    pipe.send(("ready", None))
    start = pipe.recv()
    measure_from = start + int(plan.warmup * 1e9)
    stop_at = measure_from + int(plan.seconds * 1e9)
    latency, from_schedule = array("q"), array("q")
    not_aa = result["not_aa"]
    prefix = f"B{plan.tag}{index}-"
    cpu_start = time.process_time_ns()
    paced = plan.paced_rate is not None
    if paced:
        interval = int(plan.connections / plan.paced_rate * 1e9)
        first = start + index * interval // plan.connections
    else:
        time.sleep(max(0, start - now_ns()) / 1e9)
    seq = 0
    last_ack = 0
    try:
        while True:
            if paced:
                scheduled = first + seq * interval
                if scheduled >= stop_at:
                    break
                delay = scheduled - now_ns()
                if delay > 0:
                    time.sleep(delay / 1e9)
                elif delay < -1_000_000:
                    result["late_sends"] += 1
            elif now_ns() >= stop_at:
                break
            seq += 1
            frame = template.frame(f"{prefix}{seq}".encode())
            sent_at = now_ns()
            ack = conn.exchange(frame)
            acked_at = now_ns()
            code = ack_code(ack)
            if code != "AA":
                not_aa[code] = not_aa.get(code, 0) + 1
            if sent_at >= measure_from:
                latency.append(acked_at - sent_at)
                last_ack = acked_at
                if paced:
                    from_schedule.append(acked_at - scheduled)
    except OSError as exc:
        result["error"] = f"connection {index}, message {seq}: {exc}"
    finally:
        conn.close()
    result.update(sent=seq, latency=latency.tobytes(), from_schedule=from_schedule.tobytes(),
                  last_ack_ns=last_ack, cpu_ns=time.process_time_ns() - cpu_start)
    pipe.send(("done", result))


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
    late_sends: int = 0
    not_aa: dict = field(default_factory=dict)
    errors: list = field(default_factory=list)
    server_cpu: float = 0.0  # cores busy during the measured window
    client_cpu: float = 0.0  # cores the load generator used, warmup included
    skipped: str | None = None

    @property
    def failures(self) -> int:
        return sum(self.not_aa.values()) + len(self.errors)


def run_load(server: str, server_pid: int, port: int, plan: Plan, template: Template) -> Result:
    # fork: workers inherit the template and plan, and start in milliseconds, not seconds.
    ctx = multiprocessing.get_context("fork")
    pipes, procs = [], []
    for index in range(plan.connections):
        parent_end, child_end = ctx.Pipe()
        proc = ctx.Process(target=worker, args=(child_end, index, port, plan, template), daemon=True)
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

    def __init__(self, name: str, workdir: Path):
        self.name = name
        self.workdir = workdir
        self.store: Path | None = None  # the SQLite file whose rows are counted afterwards
        python = sys.executable
        if name == "hl7bridge":
            self.store = workdir / "journal.db"
            script = Path(python).parent / "hl7bridge"
            command = [str(script)] if script.exists() else [python, "-m", "engine.cli"]
            self.args = [*command, "serve", "--listen", "tcp:0:interface=127.0.0.1", "--journal", str(self.store)]
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
            self.args, cwd=ROOT, stdout=subprocess.PIPE, stderr=self._stderr,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
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
            match = ready.search(line)
            if match:
                self.port = int(match.group(1))
                return self.port
        self.stop()
        raise RuntimeError(f"{self.name} was not ready within {timeout:.0f} s:\n{self.stderr_tail()}")

    def stop(self, timeout: float = 30.0) -> int | None:
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else None
        self.process.send_signal(signal.SIGTERM)
        try:
            code = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            code = self.process.wait()
        self._stderr.close()
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
    }


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
        return f"  {result.scenario:<28} skipped: {result.skipped}"
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
            rows.append(f"| {r.server} | {conns} | skipped: {r.skipped} | – | – |")
            continue
        flag = f" ({r.failures:,} failed)" if r.failures else ""
        rows.append(f"| {r.server} | {conns} | {r.msg_per_s:,.0f}{flag} | {r.p50_ms:.2f} | {r.p99_ms:.2f} |")
    return "\n".join(rows)


# -- main -------------------------------------------------------------------------------------


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=5.0, help="measured seconds per scenario (default 5)")
    parser.add_argument("--warmup", type=float, default=0.5, help="unmeasured seconds before each scenario (default 0.5)")
    parser.add_argument("--only", action="append", choices=SERVERS, help="run only this server (repeatable)")
    parser.add_argument("--paced-rate", type=float, default=1000.0, help="total msg/s of the paced runs (default 1000)")
    parser.add_argument("--paced-connections", type=int, action="append",
                        help="connections of a paced run (repeatable; default 1 and 4)")
    parser.add_argument("--tmpdir", type=Path, help="where the journals go (default: the system temporary directory)")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the results as JSON")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    servers = [s for s in SERVERS if not args.only or s in args.only]
    paced_connections = args.paced_connections or [1, 4]
    template = load_template()
    if "python-hl7" in servers:
        try:
            import hl7.mllp  # noqa: F401
        except ImportError:
            sys.exit("python-hl7 is not installed: .venv/bin/pip install 'hl7>=0.4.5' (or use --only)")

    info = machine()
    workroot = Path(tempfile.mkdtemp(prefix="hl7bridge-bench-", dir=args.tmpdir))
    print(f"# hl7bridge MLLP ingest benchmark, {info['date']}")
    print(f"machine: {info['cpu']}, {info['cores']} cores, Linux {info['kernel']}, Python {info['python']}")
    print(f"message: {template.source.name}, {template.size:,} bytes, MSH-10 rewritten per message")
    print(f"journals: {workroot} ({filesystem_of(workroot)})")
    print(f"{args.seconds:g} s measured after {args.warmup:g} s warmup per scenario; one load generator "
          f"process per connection")
    print()

    results: list[Result] = []
    stores: dict[str, dict] = {}
    for name in servers:
        workdir = workroot / name
        workdir.mkdir()
        server = ServerProcess(name, workdir)
        port = server.start()
        print(f"{name}: listening on 127.0.0.1:{port} (pid {server.process.pid})", flush=True)
        sent = 0
        try:
            closed = {}
            for tag, connections in (("a", 1), ("b", 8)):
                plan = Plan(f"closed loop, {connections} conn", tag, connections, args.seconds, args.warmup)
                result = run_load(name, server.process.pid, port, plan, template)
                sent += result.sent_total
                closed[connections] = result.msg_per_s
                results.append(result)
                print(describe(result), flush=True)
            for tag, connections in zip("cdefgh", paced_connections):
                plan = Plan(f"paced {args.paced_rate:,.0f}/s, {connections} conn", tag, connections,
                            args.seconds, args.warmup, args.paced_rate)
                # A closed loop is the most a server can do; with fewer connections than the
                # 8-connection run, the 1-connection figure is the honest bound.
                capacity = closed[1] if connections == 1 else max(closed.values())
                if capacity < args.paced_rate:
                    result = Result(name, plan.name, connections, args.paced_rate, args.seconds,
                                    skipped=f"cannot keep up (closed loop reached {capacity:,.0f} msg/s)")
                else:
                    result = run_load(name, server.process.pid, port, plan, template)
                    sent += result.sent_total
                results.append(result)
                print(describe(result), flush=True)
        finally:
            code = server.stop()
        if code not in (0, -signal.SIGTERM):
            print(f"  {name} exited with {code}:\n{server.stderr_tail()}")
        rows = server.stored_rows()
        if rows is not None:
            stores[name] = {"sent": sent, **rows}
            verdict = "every message stored" if rows["total"] == sent else "MISMATCH"
            statuses = ", ".join(f"{count:,} {status}" for status, count in sorted(rows["by_status"].items()))
            print(f"  store: {rows['total']:,} rows for {sent:,} messages sent ({verdict})"
                  + (f"; {statuses}" if statuses else ""))
        print(flush=True)

    # What the generator reached against the ceiling, beside the reference figures.
    check = {}
    for r in results:
        if r.server == "ceiling" and r.paced_rate is None:
            check[r.connections] = r.msg_per_s
    if check:
        reached = " and ".join(f"{check[c]:,.0f} msg/s on {c} conn" for c in sorted(check))
        reference = " and ".join(f"{REFERENCE['ceiling'][c]:,} on {c}" for c in sorted(check))
        generator_check = f"Load generator check: against the ceiling server it reached {reached} (reference: {reference})."
    else:
        generator_check = "Load generator check: not done (the ceiling server was not run)."

    total_acks = sum(r.sent_total for r in results)
    failures = sum(r.failures for r in results)
    print("## Results\n")
    print(f"{info['cpu']}, {info['cores']} cores, Python {info['python']}, {info['date'][:10]}; "
          f"{template.size:,}-byte SIU^S12, loopback, {args.seconds:g} s per row.\n")
    print(markdown_table(results))
    print()
    print(generator_check)
    print(f"ACKs: {total_acks:,} received, "
          + ("every MSA-1 was AA." if not failures else f"{failures:,} were not AA or failed (see above)."))
    for name, store in stores.items():
        print(f"{name} store: {store['total']:,} rows for {store['sent']:,} messages sent.")
    if "hl7bridge" in servers:
        misses = []
        for r in results:
            if r.server != "hl7bridge" or r.skipped:
                continue
            if r.paced_rate is None and r.msg_per_s < TARGETS["closed"][r.connections]:
                misses.append(f"{r.msg_per_s:,.0f} msg/s on {r.connections} conn (target {TARGETS['closed'][r.connections]:,})")
            if r.paced_rate is not None and r.p99_ms >= TARGETS["paced_p99_ms"]:
                misses.append(f"p99 {r.p99_ms:.2f} ms paced over {r.connections} conn (target < {TARGETS['paced_p99_ms']:g} ms)")
        print("hl7bridge targets: " + ("all met." if not misses else "missed: " + "; ".join(misses) + "."))

    if args.json:
        payload = {
            "machine": info, "message": {"file": str(template.source), "bytes": template.size},
            "settings": {"seconds": args.seconds, "warmup": args.warmup, "paced_rate": args.paced_rate,
                         "paced_connections": paced_connections, "journals": filesystem_of(workroot)},
            "reference": REFERENCE, "targets": TARGETS, "generator_check": generator_check,
            "results": [asdict(r) for r in results], "stores": stores,
        }
        args.json.write_text(json.dumps(payload, indent=2, default=str) + "\n")
        print(f"\nJSON written to {args.json}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
