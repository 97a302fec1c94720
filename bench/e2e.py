"""End to end with the shipped routes: ACKed rate against delivered rate (run by hand).

    .venv/bin/python bench/e2e.py [--messages 4000] [--connections 4] [--message siu|dft]
                                  [--json FILE] [--keep] [--tmpdir DIR] [--before DIR]

``--before DIR`` runs the same load against the engine of another checkout first (say, the main
branch in a temporary git worktree), then against this one, and prints the two side by side.

About 10 s with the defaults on two idle cores (7 s for ``--message dft --messages 1000``).

Copies the shipped routes, mappings and destinations into a temporary config directory (the
shipped destinations are file destinations: NDJSON under var/outbox/<name>/ of that directory,
each append fsynced), starts ``hl7bridge serve`` on a free port with a fresh journal, and sends
``--messages`` unique messages over ``--connections`` MLLP connections, closed loop (each
connection waits for its ACK before the next send). ``--message siu`` (the default) is
examples/siu_s12.hl7, ACKed at commit, mapped by the converter process, delivered to fhir-main;
``--message dft`` is examples/dft_p03.hl7 (four FT1), ACKed after mapping, delivered to fhir-main
and erp-finance. Each message gets its own MSH-10 control ID and fresh patient, visit, account,
appointment and FT1-2 transaction identifiers, as a real feed does. All messages are built before
the clock starts. First ``--warmup`` messages (default 1) go through alone and are waited for
until delivered, so the converter process has started and loaded its mappings, as in an engine
that has been running; they are left out of every figure.

Then it polls the journal (read only) until every message is converted and every delivery is
delivered or dead, and reports, from the journal's own timestamps:

- ACKed rate: messages / (last ACK - first send);
- delivered rate: messages / (last delivered_at - first send), and its ratio to the ACKed rate;
- converter rate: messages / (last converted_at - first converted_at);
- backlog when the last ACK went out: messages with a delivery not yet delivered at that moment;
- lag from receipt to the message's last delivery, p50 / p99 / max;
- CPU seconds of the engine, its worker processes and this load generator, until the last ACK
  and after it, and of everything else on the machine ("others", from /proc/stat: if that is
  more than a few percent of the cores, something else was running and the rates are low).

And checks the outcome: every NDJSON line in the outbox parses, and there is exactly one record
per (message, destination), or per finance event for a finance-events destination; otherwise it
prints how many lines are bad, duplicated, missing or unexpected (and exits 1).

The journal and outbox go to a temporary directory (``--tmpdir``; make it a real disk, as on tmpfs
an fsync costs nothing), removed at the end unless ``--keep``. Everything runs on this machine:
the load generator's threads share the cores with the engine and its converter.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from engine.hl7.charset import decode  # noqa: E402
from engine.mllp.client import MLLPClient  # noqa: E402
from engine.hl7.er7 import parse  # noqa: E402
from engine.delivery.finance import events  # noqa: E402
from engine.hl7.identifiers import identifiers  # noqa: E402
from engine.transform.project import Project  # noqa: E402

MESSAGES = {"siu": ("SIU^S12", ROOT / "examples/siu_s12.hl7"), "dft": ("DFT^P03", ROOT / "examples/dft_p03.hl7")}


# -- the messages -------------------------------------------------------------------------------


def variants(raw: bytes, count: int, tag: str) -> list[bytes]:
    """``count`` copies of the message, each with its own control ID and identifiers.

    MSH-10 becomes ``<tag><n>``; every identifier the journal indexes (patient, visit, account,
    appointment, FT1-2 transaction) gets ``-<tag><n>`` appended, only where it is a whole
    component, so a value that happens to be inside a longer one is left alone.
    """
    text = raw.replace(b"\r\n", b"\r").replace(b"\n", b"\r")
    message = parse(decode(text).text)
    values = sorted({value for _, value, _ in identifiers(message)}, key=len, reverse=True)
    field_sep = text[3:4]
    msh = text[: text.index(b"\r")].split(field_sep)
    control_id = msh[9]
    head = field_sep.join(msh[:9]) + field_sep
    rest = text[len(head) + len(control_id):]
    pattern = re.compile(rb"(?<=[|^~&])(" + b"|".join(re.escape(v.encode()) for v in values) + rb")(?=[|^~&\r])")
    out = []
    for n in range(count):
        suffix = f"-{tag}{n}".encode()
        out.append(head + f"{tag}{n}".encode() + pattern.sub(lambda m: m.group(1) + suffix, rest))
    return out


# -- the engine ---------------------------------------------------------------------------------


def start_engine(work: Path, config: Path, journal: Path, engine_root: Path = ROOT):
    """``hl7bridge serve`` with the MLLP listener and metrics on free ports; (process, ports)."""
    args = [sys.executable, "-m", "engine.cli", "serve", "--listen", "tcp:0:interface=127.0.0.1",
            "--journal", str(journal), "--config", str(config), "--metrics", "tcp:0:interface=127.0.0.1"]
    process = subprocess.Popen(args, cwd=engine_root, stdout=subprocess.PIPE, stderr=open(work / "engine.log", "wb"),
                               env={**os.environ, "PYTHONUNBUFFERED": "1"})
    ports, deadline = {}, time.monotonic() + 20
    while time.monotonic() < deadline and "metrics" not in ports:
        line = process.stdout.readline().decode()
        if not line:
            sys.exit(f"the engine exited: {(work / 'engine.log').read_text(errors='replace')}")
        found = re.search(r"(metrics|listener \S+) ready on [\d.]+:(\d+)", line)
        if found:
            ports["metrics" if found.group(1) == "metrics" else "mllp"] = int(found.group(2))
    if "mllp" not in ports:
        process.kill()
        sys.exit("the engine did not start in 20 s")
    return process, ports


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (fields 14 and 15 of /proc/PID/stat)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_busy() -> float:
    """CPU seconds the whole machine has spent busy (not idle, not waiting for I/O), every process
    included: with ``cpu_seconds`` it tells whether something else was taking the cores."""
    with open("/proc/stat") as f:
        ticks = [int(value) for value in f.readline().split()[1:]]
    return (sum(ticks[:8]) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")


def family(pid: int) -> dict[str, list[int]]:
    """The engine and its worker processes (converters, text indexer, mapping processes), by a
    short name: several processes of one kind (the converters) under one name."""
    found = {"engine": [pid]}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if int(stat[1]) == pid:
            module = next((part.decode() for part in cmdline if part.startswith(b"engine.")), None)
            if module is None:
                text = b" ".join(cmdline)
                module = ("serve.mapping" if b"multiprocessing.spawn" in text else
                          "resource tracker" if b"resource_tracker" in text else entry.name)
            found.setdefault(module.removeprefix("engine."), []).append(int(entry.name))
    return found


def parse_time(stamp: str) -> float:
    """A journal timestamp (ISO 8601 UTC, microseconds, 'Z') as seconds since the epoch."""
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


def wait_settled(db: sqlite3.Connection, engine: subprocess.Popen, messages: int, timeout: float) -> bool:
    """Wait until the journal holds ``messages`` messages, none waiting for the converter, and
    every delivery is delivered or dead; False after ``timeout`` seconds or if the engine exits."""
    # Each query is answered from an index (the last row ID, then the partial indexes the engine
    # itself uses), so that polling takes next to no CPU from the engine: a count(*) over every
    # row twenty times a second cost about 10 % of a core here.
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and engine.poll() is None:
        stored = db.execute("SELECT coalesce(max(id), 0) FROM messages").fetchone()[0]
        unconverted = db.execute("SELECT EXISTS (SELECT 1 FROM messages WHERE status = 'accepted' "
                                 "AND route IS NOT NULL)").fetchone()[0]
        open_deliveries = db.execute("SELECT EXISTS (SELECT 1 FROM deliveries WHERE state IN "
                                     "('pending', 'in_flight', 'retrying'))").fetchone()[0]
        if stored >= messages and not unconverted and not open_deliveries:
            return True
        time.sleep(0.1)
    return False


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


# -- the checks ---------------------------------------------------------------------------------


def check_outbox(conn: sqlite3.Connection, project: Project, after: int) -> dict:
    """Every NDJSON line parses, and each expected record is there exactly once (messages after
    the warm-up: journal IDs above ``after``)."""
    expected: Counter = Counter()
    rows = conn.execute("SELECT d.message_id, d.destination, m.control_id, c.bundle FROM deliveries d "
                        "JOIN messages m ON m.id = d.message_id JOIN conversions c ON c.message_id = d.message_id "
                        "WHERE d.state = 'delivered' AND d.message_id > ?", (after,))
    for message_id, name, control_id, bundle in rows:
        destination = project.destinations[name]
        if destination.payload == "finance-events":
            for event in events(json.loads(bundle), message_id, control_id):
                expected[(name, message_id, event["event_id"])] += 1
        else:
            expected[(name, message_id, None)] += 1
    found: Counter = Counter()
    lines = bad = warmup = 0
    for name, destination in project.destinations.items():
        if destination.type != "file" or destination.directory is None or not destination.directory.is_dir():
            continue
        for path in sorted(destination.directory.glob("*.ndjson")):
            for line in path.read_text(encoding="utf-8").splitlines():
                lines += 1
                try:
                    record = json.loads(line)
                    if "event_id" in record:
                        key = (name, record["source"]["message_id"], record["event_id"])
                    else:
                        key = (name, record["message_id"], None)
                        if record["bundle"]["resourceType"] != "Bundle":
                            raise ValueError("not a Bundle")
                except (ValueError, KeyError, TypeError):
                    bad += 1
                    continue
                if key[1] > after:
                    found[key] += 1
                else:
                    warmup += 1
    return {
        "lines": lines, "warm-up lines": warmup, "records expected": sum(expected.values()), "bad lines": bad,
        "duplicates": sum(n - 1 for n in found.values() if n > 1),
        "missing": sum(1 for key in expected if key not in found),
        "unexpected": sum(1 for key in found if key not in expected),
        "per destination": dict(Counter(name for name, _, _ in found.elements())),
    }


# -- the run ------------------------------------------------------------------------------------


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=4000, help="how many messages in all (default 4000)")
    parser.add_argument("--connections", type=int, default=4, help="MLLP connections, closed loop (default 4)")
    parser.add_argument("--message", choices=sorted(MESSAGES), default="siu", help="siu (SIU^S12) or dft (DFT^P03)")
    parser.add_argument("--warmup", type=int, default=1, help="messages sent and delivered before the clock starts")
    parser.add_argument("--timeout", type=float, default=600, help="give up waiting for deliveries after this many seconds")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (journal, outbox, engine log)")
    parser.add_argument("--tmpdir", help="where the temporary directory goes (a real disk, not tmpfs)")
    parser.add_argument("--engine", type=Path, default=ROOT,
                        help="the checkout whose engine and shipped routes, mappings and destinations run (default: this one)")
    parser.add_argument("--before", type=Path, metavar="DIR",
                        help="first run the same load against DIR's engine, then this one's, and compare them")
    args = parser.parse_args(argv)
    if args.before is not None:
        return before_and_after(args, argv if argv is not None else sys.argv[1:])
    engine_root = args.engine.resolve()

    kind, source = MESSAGES[args.message]
    work = Path(tempfile.mkdtemp(prefix="hl7bridge-e2e-", dir=args.tmpdir))
    config = work / "config"
    for part in ("routes", "mappings", "destinations"):
        shutil.copytree(engine_root / part, config / part)
    journal = work / "journal.db"
    tag = f"E{int(time.time()) % 100000}x"
    messages = variants(source.read_bytes(), args.messages, tag)
    warmup = variants(source.read_bytes(), args.warmup, tag + "w")
    shares = [messages[i::args.connections] for i in range(args.connections)]

    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    started_on = datetime.now(timezone.utc)
    revision = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=engine_root, capture_output=True,
                              text=True).stdout.strip()
    print(f"# hl7bridge end to end, {started_on:%Y-%m-%d %H:%M} UTC, commit {revision or '?'}")
    print(f"machine: {cpu}, {os.cpu_count()} cores, Python {platform.python_version()}")
    print(f"load: {len(messages):,} {kind} ({source.relative_to(ROOT)}, {len(messages[0]):,} bytes) over "
          f"{args.connections} connections, closed loop; shipped routes, file destinations")
    print(f"work directory: {work}", flush=True)

    engine, ports = start_engine(work, config, journal, engine_root)
    db = sqlite3.connect(f"file:{journal}?mode=ro", uri=True)
    db.execute("PRAGMA busy_timeout = 10000")
    if warmup:
        with MLLPClient("127.0.0.1", ports["mllp"]) as client:
            for raw in warmup:
                client.send(raw)
        if not wait_settled(db, engine, len(warmup), 60):
            sys.exit(f"the warm-up messages were not delivered in 60 s; see {work / 'engine.log'}")
    # Every figure below is about the messages after the warm-up (the journal is fresh).
    after = db.execute("SELECT coalesce(max(id), 0) FROM messages").fetchone()[0]
    processes = family(engine.pid)

    def cpu_now():
        return {**{name: sum(cpu_seconds(pid) for pid in pids) for name, pids in processes.items()},
                "load generator": time.process_time(),
                "machine": machine_busy()}

    cpu_start = cpu_now()
    failures: list[str] = []
    first_send = [None]
    last_ack = [0.0]
    lock = threading.Lock()
    barrier = threading.Barrier(args.connections)

    def sender(share):
        try:
            with MLLPClient("127.0.0.1", ports["mllp"]) as client:
                barrier.wait()
                with lock:
                    if first_send[0] is None:
                        first_send[0] = time.time()
                for raw in share:
                    ack = client.send(raw)
                    if b"MSA|AA|" not in ack:
                        with lock:
                            failures.append(ack.decode(errors="replace")[:200])
                done = time.time()
                with lock:
                    last_ack[0] = max(last_ack[0], done)
        except Exception as exc:  # noqa: BLE001 (reported, and the run fails)
            with lock:
                failures.append(f"{type(exc).__name__}: {exc}")
            barrier.abort()

    threads = [threading.Thread(target=sender, args=(share,)) for share in shares]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    first, acked = first_send[0] or time.time(), last_ack[0]
    cpu_acked = cpu_now()
    print(f"all ACKs in after {acked - first:.2f} s; waiting for deliveries", flush=True)

    if not wait_settled(db, engine, after + len(messages) - len(failures), args.timeout):
        failures.append("the engine exited" if engine.poll() is not None else
                        f"gave up after {args.timeout:g} s: messages still not converted or not delivered")
    settled = time.time()
    cpu_end = cpu_now()
    # CPU seconds per process: while the messages were sent, and after (converting and delivering).
    cpu_used = {name: [cpu_acked[name] - cpu_start[name], cpu_end[name] - cpu_acked[name]] for name in cpu_start}
    machine = cpu_used.pop("machine")
    cpu_used["others"] = [max(0.0, machine[phase] - sum(used[phase] for used in cpu_used.values())) for phase in (0, 1)]
    cpu_used = {name: [round(seconds, 1) for seconds in phases] for name, phases in cpu_used.items()}
    others_share = sum(cpu_used["others"]) / ((settled - first) * (os.cpu_count() or 1))

    statuses = dict(db.execute("SELECT status, count(*) FROM messages WHERE id > ? GROUP BY status", (after,)))
    states = dict(db.execute("SELECT state, count(*) FROM deliveries WHERE message_id > ? GROUP BY state", (after,)))
    by_destination = dict(db.execute("SELECT destination, count(*) FROM deliveries WHERE state = 'delivered' "
                                     "AND message_id > ? GROUP BY destination", (after,)))
    converted = [parse_time(t) for (t,) in db.execute("SELECT converted_at FROM conversions WHERE message_id > ?", (after,))]
    # A message is delivered when the last of its deliveries is; dead ones count separately.
    per_message = db.execute(
        "SELECT m.received_at, max(d.delivered_at), sum(d.state = 'dead') FROM messages m "
        "JOIN deliveries d ON d.message_id = m.id WHERE m.id > ? GROUP BY m.id", (after,)).fetchall()
    delivered_at = [(parse_time(r), parse_time(d)) for r, d, dead in per_message if not dead and d]
    dead_messages = sum(1 for _, _, dead in per_message if dead)
    lags = [d - r for r, d in delivered_at]
    last_delivery = max((d for _, d in delivered_at), default=float("nan"))
    backlog = len(messages) - sum(1 for _, d in delivered_at if d <= acked)

    engine.terminate()
    try:
        engine.wait(30)
    except subprocess.TimeoutExpired:
        engine.kill()
        engine.wait(10)
    outbox = check_outbox(db, Project.load(config), after)
    db.close()

    total = len(messages)
    ack_rate = total / (acked - first)
    delivered_rate = len(delivered_at) / (last_delivery - first) if delivered_at else 0.0
    convert_span = max(converted) - min(converted) if len(converted) > 1 else float("nan")
    figures = {
        "messages": total, "message": kind, "connections": args.connections,
        "acked msg/s": round(ack_rate), "acked after s": round(acked - first, 2),
        "delivered msg/s": round(delivered_rate), "delivered after s": round(last_delivery - first, 2),
        "ratio delivered/acked": round(delivered_rate / ack_rate, 2),
        "converter msg/s": round(len(converted) / convert_span) if convert_span > 0 else None,
        "converted between s": [round(min(converted) - first, 2), round(max(converted) - first, 2)] if converted else None,
        "backlog at last ACK": backlog,
        "lag p50 s": round(percentile(lags, 0.5), 3), "lag p99 s": round(percentile(lags, 0.99), 3),
        "lag max s": round(max(lags, default=float("nan")), 3),
        "messages delivered": len(delivered_at), "messages with a dead delivery": dead_messages,
        "message statuses": statuses, "delivery states": states, "delivered per destination": by_destination,
        "cpu s until last ACK / after": cpu_used, "others share of the cores": round(others_share, 3), "wall s": round(settled - first, 1), "outbox": outbox,
        "not AA or errors": len(failures),
    }

    rows = [
        ("ACKed", f"{ack_rate:,.0f} msg/s", f"last ACK at {acked - first:.2f} s"),
        ("delivered", f"{delivered_rate:,.0f} msg/s", f"last delivery at {last_delivery - first:.2f} s"),
        ("delivered / ACKed", f"{delivered_rate / ack_rate:.2f}", "the issue's target: 0.50 or more"),
        ("converter", f"{figures['converter msg/s'] or 0:,} msg/s",
         f"from {figures['converted between s'][0]:.2f} s to {figures['converted between s'][1]:.2f} s" if converted else ""),
        ("backlog at last ACK", f"{backlog:,} messages", f"{backlog / total:.0%} not yet delivered"),
        ("lag receipt -> delivered", f"p50 {figures['lag p50 s']:.2f} s", f"p99 {figures['lag p99 s']:.2f} s, max {figures['lag max s']:.2f} s"),
        ("CPU s until last ACK", ", ".join(f"{name} {ingest:g}" for name, (ingest, _) in cpu_used.items()),
         f"of {(acked - first) * (os.cpu_count() or 1):.1f} core-seconds"),
        ("CPU s after", ", ".join(f"{name} {rest:g}" for name, (_, rest) in cpu_used.items()),
         f"of {(settled - acked) * (os.cpu_count() or 1):.1f} core-seconds"),
    ]
    print()
    print("| what | figure | note |")
    print("|---|--:|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    print()
    print(f"journal: {statuses}; deliveries {states}; dead: {dead_messages} message(s)")
    if others_share > 0.05:
        print(f"warning: other processes took {others_share:.0%} of the cores during the run; the rates are low")
    clean = not (outbox["bad lines"] or outbox["duplicates"] or outbox["missing"] or outbox["unexpected"])
    if clean:
        print(f"outbox: {outbox['lines']:,} NDJSON lines ({outbox['warm-up lines']} from the warm-up), all parse, "
              f"exactly one record per (message, destination){' or finance event' if outbox['records expected'] != sum(by_destination.values()) else ''} "
              f"({', '.join(f'{n} {c:,}' for n, c in outbox['per destination'].items())})")
    else:
        print(f"outbox: {outbox['lines']:,} NDJSON lines for {outbox['records expected']:,} expected records: "
              f"{outbox['bad lines']} bad, {outbox['duplicates']} duplicate, {outbox['missing']} missing, "
              f"{outbox['unexpected']} unexpected")
    if failures:
        print(f"{len(failures)} ACK(s) not AA or connection errors, the first: {failures[0]}")
    if args.json:
        payload = {"date": started_on.isoformat(), "commit": revision, "machine": {
            "cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version()}, **figures}
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
        print(f"JSON written to {args.json}")
    if args.keep:
        print(f"kept: {work} (journal.db, engine.log, config/var/outbox/)")
    else:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if clean and not failures and not dead_messages else 1


def before_and_after(args, argv: list[str]) -> int:
    """The same load against ``--before``'s engine, then this checkout's, one after the other on
    the same machine; each run's own report, then the two side by side."""
    rest, skip = [], False
    for item in argv:  # the same options, less --before and --json
        if skip:
            skip = False
        elif item in ("--before", "--json"):
            skip = True
        elif not item.startswith(("--before=", "--json=")):
            rest.append(item)
    results, codes = {}, []
    with tempfile.TemporaryDirectory() as scratch:
        for label, root in (("before", args.before.resolve()), ("after", ROOT)):
            out = Path(scratch) / f"{label}.json"
            print(f"## {label}: {root}", flush=True)
            codes.append(subprocess.run([sys.executable, str(Path(__file__).resolve()), *rest, "--engine", str(root),
                                         "--json", str(out)]).returncode)
            results[label] = json.loads(out.read_text()) if out.exists() else None
    if None in results.values():
        print("a run gave no figures; see its report above")
        return 1
    before, after = results["before"], results["after"]
    print(f"\n## before ({before['commit']}) and after ({after['commit']})\n")
    print("| what | before | after |")
    print("|---|--:|--:|")
    for key, unit in (("acked msg/s", ""), ("delivered msg/s", ""), ("ratio delivered/acked", ""),
                      ("converter msg/s", ""), ("backlog at last ACK", ""), ("lag p50 s", " s"), ("lag p99 s", " s"),
                      ("others share of the cores", "")):
        print(f"| {key} | {before[key]}{unit} | {after[key]}{unit} |")
    if args.json:
        args.json.write_text(json.dumps({"before": before, "after": after}, indent=2) + "\n")
    return max(codes)


if __name__ == "__main__":
    sys.exit(main())
