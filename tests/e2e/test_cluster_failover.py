"""A cluster fails over and loses nothing: three engine nodes on one PostgreSQL journal behind
HAProxy (health checks on /readyz), a client sending unique SIU messages over several connections
through HAProxy (and sending a message again, as senders do, when its connection dies before the
ACK), and one node after another SIGKILLed and started again while it runs.

Afterwards every message that was ACKed is in the journal exactly once as an original, mapped
once, with one delivery to the FHIR test server, delivered, and the server holds one Appointment
per message (PUT by stable IDs: a send repeated after a takeover changes nothing); nothing is
left owed (no delivery open, no conversion claimed, no message waiting for the converter).
"""

from __future__ import annotations

import itertools
import json
import os
import re
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from conftest import EXAMPLES, HL7BRIDGE, ROOT, shipped_config, terminate
from engine.mllp.client import MLLPClient
from engine.store import open_journal
from pgserver import free_port

pytestmark = pytest.mark.slow

SIU = (EXAMPLES / "siu_s12.hl7").read_bytes()
NODES = 3
CONNECTIONS = 4
KILLS = 4
PACE = 0.02  # seconds between a connection's messages: traffic goes on through every kill


def message(n: int) -> bytes:
    """A unique SIU: its own control ID, appointment and patient."""
    return (SIU.replace(b"NC000123", f"FO{n:06d}".encode(), 1)
               .replace(b"80001^EPICADT", f"8{n:05d}^EPICADT".encode(), 1)
               .replace(b"90001^NORTHSCHED", f"9{n:05d}^NORTHSCHED".encode(), 1)
               .replace(b"|100234^", f"|5{n:05d}^".encode(), 1))


class Node:
    """``hl7bridge serve`` on the cluster's journal, on fixed ports so HAProxy finds it again."""

    def __init__(self, name: str, directory: Path, url: str):
        self.name, self.directory, self.url = name, directory, url
        self.port, self.metrics_port = free_port(), free_port()
        self.stderr_path = directory / f"{name}.stderr"
        self.process = None

    def start(self):
        args = [*HL7BRIDGE, "serve", "--config", str(self.directory), "--journal", self.url, "--node", self.name,
                "--listen", f"tcp:{self.port}:interface=127.0.0.1",
                "--metrics", f"tcp:{self.metrics_port}:interface=127.0.0.1"]
        with open(self.stderr_path, "ab") as stderr:
            self.process = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=stderr,
                                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            line = self.process.stdout.readline().decode()
            if not line:
                raise RuntimeError(f"node {self.name} exited: {self.stderr_path.read_text()[-3000:]}")
            if re.search(r"metrics ready on", line):
                return self
        raise RuntimeError(f"node {self.name} did not start in 30 s")

    def kill(self):
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)

    def stop(self):
        if self.process is not None:
            terminate(self.process, 20)


def node_config(directory: Path, fhir_base: str) -> Path:
    config = shipped_config(directory)
    (config / "destinations/fhir-main.yaml").write_text(
        "name: fhir-main\ntype: fhir\n"
        f"url: {fhir_base}\n"
        "mode: resources\ntimeout: 5s\nconcurrency: 4\n"
        'retry: {"max_attempts": 200, "initial_delay": "100ms", "max_delay": "500ms"}\n')
    # A short lease, so a dead node's deliveries go to the others within seconds.
    (config / "hl7bridge.yaml").write_text("cluster:\n  lease: 3s\nlogging:\n  level: info\n")
    return config


class Sender(threading.Thread):
    """One connection sending unique messages through HAProxy until ``stop`` is set; a message
    whose ACK did not come (its node died) is sent again on a new connection, until it is ACKed."""

    def __init__(self, address, numbers, stop: threading.Event):
        super().__init__(daemon=True)
        self.address, self.numbers, self.stop = address, numbers, stop
        self.acked: list[int] = []
        self.resends = 0
        self.error = None

    def run(self):
        client = None
        try:
            while not self.stop.is_set():
                n = next(self.numbers)
                time.sleep(PACE)
                deadline = time.monotonic() + 60
                while True:
                    try:
                        if client is None:
                            client = MLLPClient(*self.address, timeout=10)
                        ack = client.send(message(n))
                        if b"MSA|AA|" in ack:
                            self.acked.append(n)
                            break
                        raise OSError(f"not accepted: {ack[:200]!r}")
                    except (OSError, Exception) as exc:  # a dead node: reconnect and send it again
                        if client is not None:
                            client.close()
                            client = None
                        self.resends += 1
                        if time.monotonic() > deadline:
                            raise RuntimeError(f"message {n} not ACKed within 60 s: {exc}") from exc
                        time.sleep(0.1)
        except Exception as exc:  # noqa: BLE001 - reported by the test
            self.error = exc
        finally:
            if client is not None:
                client.close()


def owed(journal) -> dict:
    """What the cluster still owes: open deliveries, claimed or waiting conversions."""
    return {
        "open deliveries": journal._one("SELECT count(*) FROM deliveries WHERE state != 'delivered'")[0],
        "waiting for the converter": journal._one(
            "SELECT count(*) FROM messages WHERE status = 'accepted' AND route IS NOT NULL")[0],
        "conversion claims": journal._one("SELECT count(*) FROM conversion_claims")[0],
    }


def test_a_cluster_behind_haproxy_loses_nothing_when_nodes_are_killed(tmp_path, postgres_url, fhir_server,
                                                                      haproxy_factory):
    nodes = [Node(f"node{i}", node_config(tmp_path / f"node{i}", fhir_server.base_url), postgres_url)
             for i in range(1, NODES + 1)]
    journal = None
    try:
        for node in nodes:
            node.start()
        proxy = haproxy_factory([("127.0.0.1", n.port) for n in nodes], check_ports=[n.metrics_port for n in nodes],
                                inter=0.2, fall=2, rise=2, timeout_client=30, timeout_server=30)
        for name in proxy.names:
            proxy.wait_for_state(name, "UP", timeout=20, exact=True)
        numbers, stop = itertools.count(), threading.Event()
        senders = [Sender(proxy.address, numbers, stop) for _ in range(CONNECTIONS)]
        for sender in senders:
            sender.start()
        kills = []
        for round_ in range(KILLS):
            time.sleep(1.5)
            victim = nodes[round_ % NODES]
            victim.kill()
            kills.append(victim.name)
            proxy.wait_for_state(proxy.names[nodes.index(victim)], "DOWN", timeout=10)
            victim.start()  # the same node comes back, on the same ports
        time.sleep(1)
        stop.set()
        for sender in senders:
            sender.join(120)
        assert [s.error for s in senders] == [None] * CONNECTIONS
        acked = sorted(n for s in senders for n in s.acked)
        sent = list(range(len(acked)))
        assert acked == sent and len(sent) > 100  # every message was ACKed in the end (some after a resend)
        assert sum(s.resends for s in senders) > 0, "no connection was cut: the kills did not hit traffic"

        journal = open_journal(postgres_url, create=False)
        deadline = time.monotonic() + 120
        while any(owed(journal).values()) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert owed(journal) == {"open deliveries": 0, "waiting for the converter": 0, "conversion claims": 0}

        rows = journal._all(
            "SELECT m.control_id, m.status, c.status, d.state, d.attempts FROM messages m "
            "LEFT JOIN conversions c ON c.message_id = m.id "
            "LEFT JOIN deliveries d ON d.message_id = m.id AND d.destination = 'fhir-main' "
            "WHERE m.status != 'duplicate' ORDER BY m.id")
        originals: dict[str, list] = {}
        for control_id, status, conversion, state, attempts in rows:
            originals.setdefault(control_id, []).append((status, conversion, state))
        assert sorted(originals) == [f"FO{n:06d}" for n in sent]  # each once as an original
        assert {cid: found for cid, found in originals.items() if found != [("mapped", "mapped", "delivered")]} == {}
        duplicates = journal._one("SELECT count(*) FROM messages WHERE status = 'duplicate'")[0]
        assert duplicates <= sum(s.resends for s in senders)  # only resends of ACKs lost in a kill

        appointments, page = [], True
        while page:
            page = fhir_server.resources("Appointment", _count=1000, _offset=len(appointments))
            appointments += page
        fillers = [i["value"] for a in appointments for i in a.get("identifier", []) if i["value"].startswith("9")]
        assert sorted(fillers) == sorted(f"9{n:05d}" for n in sent)  # one Appointment per message
        print(json.dumps({"messages": len(sent), "kills": kills, "resends": sum(s.resends for s in senders), "duplicates": duplicates,
                          "attempts beyond one per delivery": journal._one(
                              "SELECT (SELECT count(*) FROM attempts) - (SELECT count(*) FROM deliveries)")[0]}))
    finally:
        for node in nodes:
            node.stop()
        if journal is not None:
            journal.close()
        from engine.store import postgres

        postgres.close_pools()


def test_the_shipped_haproxy_example_is_a_valid_configuration(haproxy_factory):
    from haproxy import find_haproxy

    example = ROOT / "examples" / "haproxy.cfg"
    done = subprocess.run([find_haproxy(), "-c", "-f", str(example)], capture_output=True, text=True,
                          env={**os.environ, "HL7BRIDGE_CHECK_TOKEN": "a-viewer-token"}, timeout=30)
    assert done.returncode == 0, done.stdout + done.stderr
    text = example.read_text()
    assert "option httpchk" in text and "uri /readyz" in text and "on-marked-down shutdown-sessions" in text


def test_reload_reaches_the_node_of_a_cluster_on_this_host(tmp_path, postgres_url):
    config = shipped_config(tmp_path / "node")
    node = Node("reloadme", config, postgres_url).start()
    try:
        done = subprocess.run([*HL7BRIDGE, "reload", "--journal", postgres_url, "--config", str(config),
                               "--node", "reloadme", "--json"], cwd=ROOT, capture_output=True, timeout=60)
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["ok"] is True
        done = subprocess.run([*HL7BRIDGE, "reload", "--journal", postgres_url, "--config", str(config),
                               "--node", "another"], cwd=ROOT, capture_output=True, timeout=60)
        assert done.returncode == 3 and b"no running engine for node another" in done.stderr
    finally:
        node.stop()


def test_a_node_that_dies_mid_delivery_leaves_its_deliveries_to_the_others(tmp_path, postgres_url,
                                                                           fhir_server_factory):
    """The FHIR server stops answering (SIGSTOP), so sends hang in flight; the node holding them is
    killed and not started again; once its lease (3 s) runs out the other node sends them."""
    fhir = fhir_server_factory()
    nodes = [Node(f"node{i}", node_config(tmp_path / f"node{i}", fhir.base_url), postgres_url) for i in (1, 2)]
    journal = None
    stopped = False
    try:
        for node in nodes:
            node.start()
        journal = open_journal(postgres_url, create=False)
        os.kill(fhir.process.pid, signal.SIGSTOP)
        stopped = True
        numbers = range(20_000, 20_008)
        with MLLPClient("127.0.0.1", nodes[0].port) as client:
            for n in numbers:
                assert b"MSA|AA|" in client.send(message(n))

        def holders():
            return dict(journal._all("SELECT claimed_by, count(*) FROM deliveries WHERE state = 'in_flight' "
                                     "GROUP BY claimed_by"))

        deadline = time.monotonic() + 30
        while not holders() and time.monotonic() < deadline:
            time.sleep(0.1)
        held = holders()
        assert held, "no delivery went in flight"
        victim = next(node for node in nodes if node.name == max(held, key=held.get))
        survivor = next(node for node in nodes if node is not victim)
        taken = [row[0] for row in journal._all(
            "SELECT id FROM deliveries WHERE state = 'in_flight' AND claimed_by = ?", victim.name)]
        victim.kill()
        os.kill(fhir.process.pid, signal.SIGCONT)
        stopped = False
        deadline = time.monotonic() + 90
        while any(owed(journal).values()) and time.monotonic() < deadline:
            time.sleep(0.25)
        assert owed(journal) == {"open deliveries": 0, "waiting for the converter": 0, "conversion claims": 0}
        states = journal._all(f"SELECT state FROM deliveries WHERE id IN ({', '.join('?' for _ in taken)})", *taken)
        assert [s for (s,) in states] == ["delivered"] * len(taken)
        assert "in flight on a node that stopped renewing its claims" in survivor.stderr_path.read_text()
        fillers = [i["value"] for a in fhir.resources("Appointment") for i in a.get("identifier", [])
                   if i["value"].startswith("9")]
        assert sorted(fillers) == sorted(f"9{n:05d}" for n in numbers)  # each once, whoever sent it
    finally:
        if stopped:
            os.kill(fhir.process.pid, signal.SIGCONT)
        for node in nodes:
            if node.process.poll() is None:
                node.stop()
        if journal is not None:
            journal.close()
        from engine.store import postgres

        postgres.close_pools()


def readyz(node: Node) -> tuple[int, str]:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{node.metrics_port}/readyz", timeout=30) as answer:
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def test_readyz_says_when_a_node_cannot_reach_its_database(tmp_path):
    """What HAProxy checks: a node whose PostgreSQL is gone answers 503 (and is taken out of the
    balancing); when the database is back the same node answers 200 again, without a restart."""
    from pgserver import PostgresServer

    with PostgresServer() as pg:
        node = Node("lonely", shipped_config(tmp_path / "node"), pg.create_database()).start()
        try:
            assert readyz(node) == (200, "ready\n")
            pg.stop()
            status, text = readyz(node)
            assert status == 503 and text.startswith("not ready: journal unreadable: ")
            pg.start()
            deadline = time.monotonic() + 60
            while readyz(node)[0] != 200 and time.monotonic() < deadline:
                time.sleep(0.5)
            assert readyz(node) == (200, "ready\n")
        finally:
            node.stop()
