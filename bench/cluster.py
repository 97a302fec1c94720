"""Cluster benchmark: 1, 2 and 3 engine nodes on one PostgreSQL journal, on this machine.

Run from the repository root, by hand (about two minutes with the defaults)::

    .venv/bin/python bench/cluster.py                       # 1, 2 and 3 nodes, 10 s each
    .venv/bin/python bench/cluster.py --nodes 1 --nodes 3 --seconds 20 --json bench/cluster.json

A private PostgreSQL 15 is started from the Debian binaries (tests/pgserver.py) on a real disk
(``--tmpdir``; default the system temp dir), with ``fsync`` and ``synchronous_commit`` on, as a
production server has them, and ``pg_stat_statements`` loaded. For each node count, a fresh
database; the nodes are ``hl7bridge serve --journal postgresql://...`` with the shipped routes
and mappings and a file destination (each node its own directory), so delivery costs bookkeeping,
not a remote server. The load generator of bench/ingest.py drives ``--connections`` connections
per node, closed loop (each waits for its ACK), straight to the nodes (a TCP balancer in front
adds a hop, not database work). Every message is examples/siu_s12.hl7 with its own control ID and
its own patient (so per-patient delivery order never serialises the outbox); it is routed, ACKed
at commit, mapped by the node's converter and delivered.

Per row: ACKed msg/s over the window, ACK latency, delivered msg/s (deliveries delivered between
the window's start and the moment the outbox was empty again, over that time), and the database
cost per message, from the server's own counters over the whole run (warm-up and drain included,
so everything a message causes is counted): statements the engine sent (``pg_stat_statements``
calls of top-level statements, BEGIN and COMMIT included; a pipelined ``executemany`` counts each
row but is one round trip),
transactions (``pg_stat_database`` commits), WAL bytes (``pg_current_wal_lsn``), and CPU
milliseconds per message (from /proc) of the nodes' main processes (ingest, journal writer,
dispatcher), of their converters, and of PostgreSQL, which says what bounds the figure on this
machine and what more cores would give.

The machine is shared with other work while this runs: figures are noisy, compare rows of one run.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import tempfile
import time
from array import array
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "tests"))

import ingest  # noqa: E402 (bench/ingest.py: the load generator)
from pgserver import PostgresServer, free_port  # noqa: E402

EXAMPLE = ROOT / "examples" / "siu_s12.hl7"
PATIENT_IDS = (b"|100234^", b"~E55501234^")  # PID-3: both identifiers, the ordering key is the first by value


class PerPatientTemplate(ingest.Template):
    """The example with a unique control ID, and patient IDs made from it (one patient each)."""

    def frame(self, control_id: bytes) -> bytes:
        digits = str(abs(hash(control_id)) % 10**9).encode()
        frame = self.head + control_id + self.tail
        for old in PATIENT_IDS:
            frame = frame.replace(old, old[:1] + b"P" + digits + b"^", 1)
        return frame


def template() -> PerPatientTemplate:
    ingest.MESSAGE_FILES = [EXAMPLE]
    found = ingest.load_template()
    return PerPatientTemplate(found.source, found.head, found.tail, found.original_control_id)


def cpu_seconds(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def descendants(pid: int) -> list[int]:
    """pid and every process below it."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
            children.setdefault(parent, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo += children.get(current, [])
    return found


def cpu_of_tree(pids: list[int]) -> float:
    return sum(cpu_seconds(p) for root in pids for p in descendants(root))


def cpu_split(nodes, pg_pid: int) -> dict:
    """CPU seconds so far: the engines' main processes (reactor, journal writer, dispatcher: one
    GIL each), their helper processes (the converters), and PostgreSQL's processes."""
    main = sum(cpu_seconds(n.process.pid) for n in nodes)
    return {"engine": main, "converter": cpu_of_tree([n.process.pid for n in nodes]) - main,
            "postgresql": cpu_of_tree([pg_pid])}


class Node:
    def __init__(self, name: str, directory: Path, url: str):
        self.name, self.directory, self.url = name, directory, url
        self.port = free_port()
        self.process = None

    def start(self):
        config = self.directory / "config"
        for part in ("routes", "mappings", "destinations"):
            shutil.copytree(ROOT / part, config / part)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "engine.cli", "serve", "--config", str(config), "--journal", self.url,
             "--node", self.name, "--listen", f"tcp:{self.port}:interface=127.0.0.1", "--metrics", "off",
             "--log-level", "warn"],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=open(self.directory / "stderr", "wb"))
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            line = self.process.stdout.readline().decode()
            if not line:
                sys.exit(f"node {self.name} exited: {(self.directory / 'stderr').read_text()[-2000:]}")
            if "ready on" in line:
                return self
        sys.exit(f"node {self.name} did not start")

    def stop(self):
        self.process.terminate()
        self.process.wait(30)


def query(pg: PostgresServer, database: str, sql: str) -> str:
    return pg.sql(sql, database)


def counters(pg: PostgresServer, database: str) -> dict:
    row = query(pg, database,
                "SELECT (SELECT coalesce(sum(calls), 0) FROM pg_stat_statements s JOIN pg_database d "
                "ON d.oid = s.dbid WHERE d.datname = current_database()), "
                "(SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = current_database()), "
                "pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')::bigint").split("|")
    return {"statements": int(row[0]), "transactions": int(row[1]), "wal": int(row[2])}


def outbox_open(pg: PostgresServer, database: str) -> int:
    return int(query(pg, database, "SELECT (SELECT count(*) FROM deliveries WHERE state != 'delivered') + "
                                   "(SELECT count(*) FROM messages WHERE status = 'accepted' AND route IS NOT NULL)"))


def run(pg: PostgresServer, nodes: int, args, work: Path, tpl) -> dict:
    database = f"cluster_{nodes}"
    pg.sql(f'DROP DATABASE IF EXISTS "{database}"')
    url = pg.create_database(database)
    query(pg, database, "CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
    running = [Node(f"node{i}", work / f"{database}-node{i}", url) for i in range(1, nodes + 1)]
    for node in running:
        node.directory.mkdir(parents=True)
        node.start()
    time.sleep(1)
    query(pg, database, "SELECT pg_stat_statements_reset()")
    query(pg, database, "SELECT pg_stat_reset()")
    time.sleep(0.6)  # the statistics collector flushes every 500 ms
    before = counters(pg, database)
    pg_pid = int((pg.data_dir / "postmaster.pid").read_text().split()[0])
    cpu_before = cpu_split(running, pg_pid)
    plan = ingest.Plan(f"{nodes} nodes", f"N{nodes}", args.connections * nodes, args.seconds, args.warmup)
    pipes, workers = [], []
    for index, node in enumerate(running):
        parent, child = multiprocessing.Pipe()
        indexes = list(range(index * args.connections, (index + 1) * args.connections))
        process = multiprocessing.Process(target=ingest.worker, args=(child, indexes, node.port, plan, tpl))
        process.start()
        pipes.append(parent)
        workers.append(process)
    for pipe in pipes:
        kind, detail = pipe.recv()
        if kind != "ready":
            sys.exit(detail)
    start = ingest.now_ns() + 200_000_000
    for pipe in pipes:
        pipe.send(start)
    window_start = time.time() + 0.2 + args.warmup
    reports = [pipe.recv()[1] for pipe in pipes]
    for process in workers:
        process.join()
    sent_done = time.monotonic()
    while outbox_open(pg, database) and time.monotonic() - sent_done < 120:
        time.sleep(0.2)
    drained = time.time()
    time.sleep(0.6)
    after = counters(pg, database)
    cpu_after = cpu_split(running, pg_pid)
    received = int(query(pg, database, "SELECT count(*) FROM messages"))
    delivered_in = int(query(pg, database, "SELECT count(*) FROM deliveries WHERE state = 'delivered' AND "
                                           f"delivered_at >= '{time.strftime('%Y-%m-%dT%H:%M:%S', time.gmtime(window_start))}'"))
    top = query(pg, database, "SELECT calls, round(total_exec_time::numeric, 0), shared_blks_hit / calls, "
                              "left(regexp_replace(query, '\\s+', ' ', 'g'), 80) FROM pg_stat_statements s "
                              "JOIN pg_database d ON d.oid = s.dbid WHERE d.datname = current_database() "
                              "ORDER BY total_exec_time DESC LIMIT 12")
    for node in running:
        node.stop()
    latency = array("q")
    for report in reports:
        latency.frombytes(report["latency"])
    ordered = sorted(latency)
    errors = [r["error"] for r in reports if r["error"]]
    not_aa = {k: v for r in reports for k, v in r["not_aa"].items()}
    return {
        "nodes": nodes, "connections": plan.connections, "acked_per_s": len(ordered) / args.seconds,
        "p50_ms": ingest.percentile(ordered, 0.5),
        "p99_ms": ingest.percentile(ordered, 0.99),
        "delivered_per_s": delivered_in / max(drained - window_start, 1e-9),
        "messages": received, "errors": errors, "not_aa": not_aa,
        "statements_per_msg": (after["statements"] - before["statements"]) / received,
        "transactions_per_msg": (after["transactions"] - before["transactions"]) / received,
        "wal_bytes_per_msg": (after["wal"] - before["wal"]) / received,
        **{f"{part}_cpu_ms_per_msg": (cpu_after[part] - cpu_before[part]) * 1000 / received for part in cpu_after},
        "top_statements": top.splitlines(),
    }


def table(rows: list[dict]) -> str:
    lines = ["| nodes | connections | ACKed msg/s | ACK p50 / p99 ms | delivered msg/s | statements / msg | "
             "transactions / msg | WAL bytes / msg | CPU ms / msg: engine, converter, PostgreSQL |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['nodes']} | {r['connections']} | {r['acked_per_s']:,.0f} | {r['p50_ms']:.1f} / "
                     f"{r['p99_ms']:.1f} | {r['delivered_per_s']:,.0f} | {r['statements_per_msg']:.1f} | "
                     f"{r['transactions_per_msg']:.2f} | {r['wal_bytes_per_msg']:,.0f} | "
                     f"{r['engine_cpu_ms_per_msg']:.2f}, {r['converter_cpu_ms_per_msg']:.2f}, "
                     f"{r['postgresql_cpu_ms_per_msg']:.2f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--nodes", type=int, action="append", help="node counts to run (default 1, 2, 3)")
    parser.add_argument("--connections", type=int, default=4, help="connections per node (default 4)")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--tmpdir", help="where PostgreSQL's data goes (a real disk; default the temp dir)")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    tpl = template()
    work = Path(tempfile.mkdtemp(prefix="hl7bridge-cluster-bench-"))
    settings = {"fsync": "on", "full_page_writes": "on", "synchronous_commit": "on",
                "shared_preload_libraries": "'pg_stat_statements'", "pg_stat_statements.track": "top"}
    rows = []
    with PostgresServer(settings=settings, parent=args.tmpdir or tempfile.gettempdir()) as pg:
        for nodes in args.nodes or [1, 2, 3]:
            row = run(pg, nodes, args, work, tpl)
            rows.append(row)
            print(f"{nodes} node(s): {row['acked_per_s']:,.0f} msg/s ACKed, {row['delivered_per_s']:,.0f} delivered; "
                  f"errors {row['errors'] or 'none'}, not AA {row['not_aa'] or 'none'}", file=sys.stderr, flush=True)
    shutil.rmtree(work, ignore_errors=True)
    info = ingest.machine()
    print(f"Machine: {info['cpu']}, {info['cores']} cores, Python {info['python']}, {info['date']}, "
          f"engine at {info['revision']}; PostgreSQL {pg.bindir.parent.name} with fsync on; shared with other work.\n")
    print(table(rows))
    print("\nThe statements PostgreSQL spent most time on in the last run (calls | total ms | buffers per call | statement):\n")
    for line in rows[-1]["top_statements"]:
        print(f"    {line}")
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": info, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
