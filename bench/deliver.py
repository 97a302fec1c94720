"""End to end: MLLP in, FHIR server out. Messages per second and delivery lag (run by hand).

    .venv/bin/python bench/deliver.py [--messages 500] [--connections 4] [--mode resources]

Starts the test FHIR server (tests/fhir_server: Medplum's router, in memory, validating every
write) and hl7bridge with the shipped routes and mappings, fhir-main pointed at that server.
Sends SIU^S12 messages with fresh patient and appointment identifiers over MLLP, closed loop, then
waits until every delivery is done. Reports: ingest rate (ACKs), end-to-end rate (first send to
last delivery), and the delivery lag (from receipt to delivered, from the journal) p50/p99/max.
Medplum's store searches linearly, so a long run measures the server more than us: keep the
message count modest (see ../shared/notes/medplum-fhir-router.md).
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from datetime import date, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

from engine.mllp.client import MLLPClient  # noqa: E402
from fhirserver import FhirServer  # noqa: E402


def percentile(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=500)
    parser.add_argument("--connections", type=int, default=4)
    parser.add_argument("--mode", choices=["resources", "transaction"], default="resources")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="hl7bridge-deliver-"))
    config = work / "config"
    for part in ("routes", "mappings", "destinations"):
        shutil.copytree(ROOT / part, config / part)
    server = FhirServer()
    server.start()
    (config / "destinations/fhir-main.yaml").write_text(
        f"name: fhir-main\ntype: fhir\nurl: {server.base_url}\nmode: {args.mode}\nconcurrency: 8\n"
        "retry: {initial_delay: 200ms, max_delay: 2s}\n")
    journal = work / "journal.db"
    engine = subprocess.Popen([sys.executable, "-m", "engine.cli", "serve", "--listen", "tcp:0:interface=127.0.0.1",
                               "--journal", str(journal), "--config", str(config)],
                              cwd=ROOT, stdout=subprocess.PIPE, stderr=open(work / "engine.log", "wb"))
    port = int(engine.stdout.readline().decode().rsplit(":", 1)[1])
    siu = (ROOT / "examples/siu_s12.hl7").read_bytes()
    per_connection = args.messages // args.connections

    def sender(index):
        with MLLPClient("127.0.0.1", port) as client:
            for n in range(per_connection):
                tag = f"{index}{n:05d}"
                raw = (siu.replace(b"NC000123", f"D{tag}".encode(), 1).replace(b"|100234^", f"|7{tag}^".encode(), 1)
                          .replace(b"|80001^", f"|8{tag}^".encode(), 1).replace(b"|90001^", f"|9{tag}^".encode(), 1))
                assert b"MSA|AA|" in client.send(raw)

    started = time.perf_counter()
    threads = [threading.Thread(target=sender, args=(i,)) for i in range(args.connections)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    acked = time.perf_counter()
    total = per_connection * args.connections
    conn = sqlite3.connect(journal)
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
    engine.terminate()
    engine.wait(30)
    appointments = len(server.resources("Appointment", _count=10000))
    server.close()
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    print(f"{cpu}, Python {platform.python_version()}, {date.today()}; {total} SIU^S12 over {args.connections} "
          f"connections, FHIR mode {args.mode}")
    print(json.dumps({
        "ingest msg/s": round(total / (acked - started)),
        "end-to-end msg/s": round(total / (finished - started)),
        "lag p50 s": round(percentile(lags, 0.5), 3), "lag p99 s": round(percentile(lags, 0.99), 3),
        "lag max s": round(max(lags), 3), "delivered": done, "dead": dead, "appointments in server": appointments,
    }, indent=2))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
