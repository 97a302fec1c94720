"""End to end: MLLP in, FHIR server out, against the server's own ceiling (run by hand).

    .venv/bin/python bench/deliver.py [--messages 500] [--connections 4] [--mode resources]
                                      [--concurrency 8] [--before DIR]

Starts the test FHIR server (tests/fhir_server: Medplum's router, in memory, validating every
write) and, in one run:

1. **The server's ceiling**: the very requests hl7bridge makes for these messages (each SIU^S12
   converted with the shipped mappings beforehand; ``resources`` mode: one PUT per resource, in
   the sender's order, references rewritten; ``transaction``: one POST of the Bundle), sent by a
   minimal client (``http.client``, keep-alive, ``--concurrency`` threads as the destination's
   concurrency, one message's requests in order on one connection) to an empty server: how fast
   the server takes them, with nothing of ours in the way.
2. **hl7bridge end to end**: the server restarted empty, ``hl7bridge serve`` with the shipped
   routes and mappings and fhir-main pointed at it, the same messages over ``--connections`` MLLP
   connections, closed loop, then waiting until every delivery is done. With ``--before DIR``, the
   engine of another checkout too, on a fresh server again.

Reports the ceiling (messages and requests a second), each engine's ingest rate (ACKs), end-to-end
rate (first send to last delivery) and its fraction of the ceiling, and the delivery lag (receipt
to delivered, from the journal) p50/p99/max. Medplum's store searches linearly, so a long run
measures the server more than us: keep the message count modest (see
../shared/notes/medplum-fhir-router.md); every phase starts on an empty server, so they see the
same store sizes.
"""

from __future__ import annotations

import argparse
import http.client
import json
import platform
import re
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from datetime import date, datetime
from pathlib import Path
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

from engine.delivery.senders import resources_in_order  # noqa: E402
from engine.mllp.client import MLLPClient  # noqa: E402
from engine.transform import pipeline  # noqa: E402
from engine.transform.project import Project  # noqa: E402
from fhirserver import FhirServer  # noqa: E402


def percentile(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


def messages(count: int) -> list[bytes]:
    """``count`` SIU^S12, each with its own control ID, patient, visit and account."""
    siu = (ROOT / "examples/siu_s12.hl7").read_bytes()
    out = []
    for n in range(count):
        tag = f"{n:06d}"
        out.append(siu.replace(b"NC000123", f"D{tag}".encode(), 1).replace(b"|100234^", f"|7{tag}^".encode(), 1)
                   .replace(b"|80001^", f"|8{tag}^".encode(), 1).replace(b"|90001^", f"|9{tag}^".encode(), 1))
    return out


def requests_of(raws: list[bytes], mode: str) -> list[list[tuple[str, str, bytes]]]:
    """Per message, the requests hl7bridge's FHIR sender makes for it: (method, path, body)."""
    project = Project.load(ROOT)
    out = []
    for raw in raws:
        bundle = pipeline.convert(project, pipeline.read(raw)).bundle
        if mode == "transaction":
            out.append([("POST", "", json.dumps(bundle, separators=(",", ":")).encode())])
        else:
            out.append([("PUT", f"/{url}", json.dumps(resource).encode()) for url, resource in resources_in_order(bundle)])
    return out


def ceiling(base_url: str, work: list[list[tuple[str, str, bytes]]], concurrency: int) -> dict:
    """The requests from a minimal client: ``concurrency`` threads, each with one keep-alive
    connection, taking whole messages from a shared queue."""
    parts = urlsplit(base_url)
    queue = list(reversed(work))
    lock = threading.Lock()
    failures = []

    def client():
        connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
        try:
            while True:
                with lock:
                    if not queue:
                        return
                    requests = queue.pop()
                for method, path, body in requests:
                    connection.request(method, parts.path + path, body=body,
                                       headers={"Content-Type": "application/fhir+json"})
                    answer = connection.getresponse()
                    answer.read()
                    if answer.status >= 300:
                        with lock:
                            failures.append(f"{method} {path}: HTTP {answer.status}")
        finally:
            connection.close()

    started = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    count = sum(len(requests) for requests in work)
    return {"msg/s": round(len(work) / elapsed), "requests/s": round(count / elapsed),
            "requests per message": round(count / len(work), 1), "failures": len(failures),
            "first failure": failures[0] if failures else None}


def engine_run(engine_root: Path, server: FhirServer, raws: list[bytes], args, work: Path) -> dict:
    """hl7bridge from ``engine_root``, its shipped config with fhir-main at ``server``."""
    config = work / "config"
    for part in ("routes", "mappings", "destinations"):
        shutil.copytree(engine_root / part, config / part)
    (config / "destinations/fhir-main.yaml").write_text(
        f"name: fhir-main\ntype: fhir\nurl: {server.base_url}\nmode: {args.mode}\nconcurrency: {args.concurrency}\n"
        "retry: {initial_delay: 200ms, max_delay: 2s}\n")
    journal = work / "journal.db"
    engine = subprocess.Popen([sys.executable, "-m", "engine.cli", "serve", "--listen", "tcp:0:interface=127.0.0.1",
                               "--journal", str(journal), "--config", str(config),
                               "--metrics", "tcp:0:interface=127.0.0.1"],
                              cwd=engine_root, stdout=subprocess.PIPE, stderr=open(work / "engine.log", "wb"))
    port, deadline = None, time.monotonic() + 30
    while port is None and time.monotonic() < deadline:
        line = engine.stdout.readline().decode()
        if not line:
            sys.exit(f"the engine exited: {(work / 'engine.log').read_text(errors='replace')[-2000:]}")
        found = re.search(r"listener \S+ ready on [\d.]+:(\d+)", line)
        if found:
            port = int(found.group(1))
    # The rest of what it prints goes nowhere, so the pipe never fills and blocks it.
    threading.Thread(target=lambda: [None for _ in engine.stdout], daemon=True).start()
    shares = [raws[i::args.connections] for i in range(args.connections)]

    def sender(share):
        with MLLPClient("127.0.0.1", port) as client:
            for raw in share:
                assert b"MSA|AA|" in client.send(raw)

    started = time.perf_counter()
    threads = [threading.Thread(target=sender, args=(share,)) for share in shares]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    acked = time.perf_counter()
    total = len(raws)
    conn = sqlite3.connect(journal)
    conn.execute("PRAGMA busy_timeout = 10000")
    while True:
        done = conn.execute("SELECT count(*) FROM deliveries WHERE destination = 'fhir-main' AND state = 'delivered'").fetchone()[0]
        dead = conn.execute("SELECT count(*) FROM deliveries WHERE state = 'dead'").fetchone()[0]
        if done + dead >= total:
            break
        time.sleep(0.05)
    finished = time.perf_counter()
    lags = [(datetime.fromisoformat(d.replace("Z", "+00:00")) - datetime.fromisoformat(r.replace("Z", "+00:00"))).total_seconds()
            for r, d in conn.execute("SELECT m.received_at, d.delivered_at FROM deliveries d JOIN messages m ON m.id = d.message_id "
                                     "WHERE d.destination = 'fhir-main' AND d.state = 'delivered'")]
    conn.close()
    engine.terminate()
    engine.wait(30)
    return {
        "ingest msg/s": round(total / (acked - started)),
        "end-to-end msg/s": round(total / (finished - started)),
        "lag p50 s": round(percentile(lags, 0.5), 3), "lag p99 s": round(percentile(lags, 0.99), 3),
        "lag max s": round(max(lags), 3), "delivered": done, "dead": dead,
        "appointments in server": len(server.resources("Appointment", _count=10000)),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=500)
    parser.add_argument("--connections", type=int, default=4, help="MLLP connections into the engine")
    parser.add_argument("--mode", choices=["resources", "transaction"], default="resources")
    parser.add_argument("--concurrency", type=int, default=8, help="the destination's concurrency, and the ceiling's threads")
    parser.add_argument("--before", type=Path, metavar="DIR", help="also run the engine of another checkout")
    args = parser.parse_args()
    raws = messages(args.messages)
    work = requests_of(raws, args.mode)
    scratch = Path(tempfile.mkdtemp(prefix="hl7bridge-deliver-"))
    server = FhirServer()
    server.start()
    results = {}
    try:
        results["ceiling (minimal client)"] = ceiling(server.base_url, work, args.concurrency)
        engines = ([("before", args.before.resolve())] if args.before else []) + [("after" if args.before else "hl7bridge", ROOT)]
        for label, root in engines:
            server.restart()
            (scratch / label).mkdir()
            results[label] = engine_run(root, server, raws, args, scratch / label)
            results[label]["fraction of the ceiling"] = round(
                results[label]["end-to-end msg/s"] / results["ceiling (minimal client)"]["msg/s"], 2)
    finally:
        server.close()
        shutil.rmtree(scratch, ignore_errors=True)
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    print(f"{cpu}, Python {platform.python_version()}, {date.today()}; {len(raws)} SIU^S12, FHIR mode {args.mode}, "
          f"concurrency {args.concurrency}; engine: {args.connections} MLLP connections")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
