"""End to end over real loopback sockets: the engine process, `hl7bridge send`, TLS and mutual TLS."""

import json
import socket
import sqlite3
import ssl

import pytest

from conftest import CORPUS, EXAMPLES, EngineProcess, corpus_dir, run_cli, shipped_config, wait_for
from engine.mllp.batch import split_messages
from engine.mllp.client import MLLPClient, TlsClientOptions
from engine.mllp.framing import frame
from tlscerts import make_pki

pytestmark = pytest.mark.slow


def journal_rows(path):
    conn = sqlite3.connect(path)
    try:
        return conn.execute("SELECT raw, status, ack_code, ack_sent, ack FROM messages ORDER BY id").fetchall()
    finally:
        conn.close()


def test_examples_are_acknowledged_and_journaled_byte_for_byte(engine):
    files = [p for p in sorted(EXAMPLES.glob("*.hl7")) if p.name != "bad_msh.hl7"]
    result = run_cli("send", "--json", engine.address, *files)
    assert result.returncode == 0, result.stderr.decode()
    sent = json.loads(result.stdout)
    expected_bytes = [m.data for f in files for m in split_messages(f.read_bytes())]
    assert len(sent) == len(expected_bytes) >= 20
    assert all(r["accepted"] for r in sent)
    rows = journal_rows(engine.journal)
    assert [row[0] for row in rows] == expected_bytes
    enhanced = [r for r in sent if r["control_id"] == "NC000142"]
    assert enhanced[0]["ack_code"] == "CA"


def test_send_exit_code_when_a_message_is_rejected(engine):
    result = run_cli("send", "-q", engine.address, EXAMPLES / "siu_s12.hl7", EXAMPLES / "bad_msh.hl7")
    assert result.returncode == 1
    assert result.stdout.decode().splitlines() == [
        f"{EXAMPLES / 'siu_s12.hl7'}:1 NC000123: AA",
        f"{EXAMPLES / 'bad_msh.hl7'}:1 NC000999: AR: MSH-9 message type is missing",
    ]


def test_send_cannot_connect_exits_3(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = run_cli("send", f"127.0.0.1:{port}", EXAMPLES / "siu_s12.hl7")
    assert result.returncode == 3
    assert b"cannot connect to 127.0.0.1" in result.stderr


def test_persistent_connection_carries_many_messages_and_garbage_between_them(engine):
    siu = (EXAMPLES / "siu_s12.hl7").read_bytes()
    with socket.create_connection(("127.0.0.1", engine.port)) as sock:
        stream = b""
        for n in range(20):
            stream += b"\r\n" + frame(siu.replace(b"NC000123", f"LOOP{n}".encode()))
        sock.sendall(stream)  # all twenty at once: ACKs must still come back in order
        received = b""
        while received.count(b"\x1c\r") < 20:
            received += sock.recv(65536)
    controls = [chunk.split(b"MSA|AA|")[1].split(b"\r")[0] for chunk in received.split(b"\x0b")[1:]]
    assert controls == [f"LOOP{n}".encode() for n in range(20)]
    assert len(journal_rows(engine.journal)) == 20


def test_not_hl7_frame_gets_a_minimal_reject_and_a_row(engine):
    raw = (EXAMPLES / "not_hl7.txt").read_bytes()
    with MLLPClient("127.0.0.1", engine.port) as client:
        ack = client.send(raw)
    assert ack.startswith(b"MSH|^~\\&|HL7BRIDGE|HL7BRIDGE|||")
    assert b"\rMSA|AR||" in ack
    assert journal_rows(engine.journal)[0][:2] == (raw, "rejected")


def test_oversized_frame_disconnects_only_that_peer(tmp_path):
    config = tmp_path / "config"
    config.mkdir()
    (config / "hl7bridge.yaml").write_text(
        "listeners:\n  - name: small\n    endpoint: tcp:0:interface=127.0.0.1\n    max_frame_bytes: 4000\n"
    )
    proc = EngineProcess(tmp_path, listen=(), config=config)
    try:
        big = (EXAMPLES / "dft_p03.hl7").read_bytes() * 3
        with MLLPClient("127.0.0.1", proc.port) as bystander, socket.create_connection(("127.0.0.1", proc.port)) as sock:
            sock.sendall(frame(big))
            assert sock.recv(100) == b""  # closed, no ACK
            ack = bystander.send((EXAMPLES / "siu_s12.hl7").read_bytes())
            assert b"MSA|AA|" in ack
        rows = journal_rows(proc.journal)
        assert [(len(r[0]), r[1]) for r in rows] == [(4000, "rejected"), (len((EXAMPLES / "siu_s12.hl7").read_bytes()), rows[1][1])]
        assert rows[1][1] in ("accepted", "mapped")  # the converter may already have mapped it
        assert "exceeds 4000 bytes" in proc.log()
    finally:
        proc.stop()


def test_tls_listener(tmp_path):
    pki = make_pki(tmp_path)
    proc = EngineProcess(
        tmp_path, listen=(f"ssl:0:interface=127.0.0.1:privateKey={pki / 'server.key'}:certKey={pki / 'server.pem'}",)
    )
    try:
        result = run_cli("send", "--tls", "--ca", pki / "ca.pem", proc.address, EXAMPLES / "siu_s12.hl7")
        assert result.returncode == 0, result.stderr.decode()
        assert "MSA|AA|NC000123" in result.stdout.decode()
        untrusted = run_cli("send", "--tls", proc.address, EXAMPLES / "siu_s12.hl7")
        assert untrusted.returncode == 3 and b"CERTIFICATE_VERIFY_FAILED" in untrusted.stderr
    finally:
        proc.stop()


def test_mutual_tls_requires_a_client_certificate_from_the_ca(tmp_path):
    pki = make_pki(tmp_path)
    config = tmp_path / "config"
    config.mkdir()
    (config / "hl7bridge.yaml").write_text(
        "listeners:\n"
        "  - name: secure\n"
        "    endpoint: tcp:0:interface=127.0.0.1\n"
        "    tls:\n"
        f"      certificate: {pki / 'server.pem'}\n"
        f"      private_key: {pki / 'server.key'}\n"
        f"      client_ca: {pki / 'ca.pem'}\n"
    )
    proc = EngineProcess(tmp_path, listen=(), config=config)
    try:
        ok = TlsClientOptions(ca=str(pki / "ca.pem"), certificate=str(pki / "client.pem"), key=str(pki / "client.key"))
        with MLLPClient("127.0.0.1", proc.port, tls=ok) as client:
            assert b"MSA|AA|NC000123" in client.send((EXAMPLES / "siu_s12.hl7").read_bytes())
        for options in (
            TlsClientOptions(ca=str(pki / "ca.pem")),
            TlsClientOptions(ca=str(pki / "ca.pem"), certificate=str(pki / "rogue.pem"), key=str(pki / "rogue.key")),
        ):
            with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
                with MLLPClient("127.0.0.1", proc.port, tls=options, timeout=5) as client:
                    client.send((EXAMPLES / "siu_s15.hl7").read_bytes())
        assert len(journal_rows(proc.journal)) == 1
        log = wait_for(lambda: proc.log().count("TLS with 127.0.0.1:") == 2 and proc.log())
        assert "mutual TLS" in log
        # An operator can tell the clinic why: each refusal is logged with its reason, and counted.
        assert "TLS with 127.0.0.1:" in log
        assert "failed: the client sent no certificate, and this listener requires one (tls.client_ca)" in log
        assert "failed: the client's certificate is not signed by the listener's client_ca" in log
        metrics = metrics_text(proc)
        assert 'hl7bridge_tls_handshake_failures_total{listener="secure",reason="no_client_certificate"} 1' in metrics
        assert 'hl7bridge_tls_handshake_failures_total{listener="secure",reason="untrusted_client_certificate"} 1' in metrics
    finally:
        proc.stop()


def metrics_text(proc) -> str:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{proc.metrics_port}/metrics", timeout=5) as response:
        return response.read().decode()


def test_ssl_endpoint_files_are_read_from_the_config_directory(tmp_path):
    # The engine runs from the repository root; the config directory is elsewhere and names its
    # certificate files relative to itself, as docs/configuration.md says every path is read.
    config = shipped_config(tmp_path / "config")
    (config / "pki").mkdir()
    make_pki(config / "pki")
    (config / "hl7bridge.yaml").write_text(
        "listeners:\n"
        "  - name: clinic\n"
        "    endpoint: ssl:0:interface=127.0.0.1:privateKey=pki/server.key:certKey=pki/server.pem\n"
    )
    proc = EngineProcess(tmp_path, listen=(), config=config)
    try:
        ok = TlsClientOptions(ca=str(config / "pki" / "ca.pem"))
        with MLLPClient("127.0.0.1", proc.port, tls=ok) as client:
            assert b"MSA|AA|NC000123" in client.send((EXAMPLES / "siu_s12.hl7").read_bytes())
        # Plain MLLP sent to the TLS port: refused, and the log says so in words.
        with socket.create_connection(("127.0.0.1", proc.port), timeout=5) as plain:
            plain.sendall(frame((EXAMPLES / "siu_s15.hl7").read_bytes()))
            assert plain.recv(100) == b""
        wait_for(lambda: "sent plain MLLP to a TLS port (OpenSSL: wrong version number)" in proc.log())
        assert 'reason="protocol_mismatch"} 1' in metrics_text(proc)
    finally:
        proc.stop()


def test_a_missing_ssl_endpoint_file_is_refused_with_file_and_line(tmp_path):
    config = tmp_path / "config"
    config.mkdir()
    (config / "hl7bridge.yaml").write_text(
        "listeners:\n  - name: clinic\n    endpoint: ssl:0:privateKey=pki/none.key:certKey=pki/none.pem\n")
    result = run_cli("serve", "--config", config, "--journal", tmp_path / "j.db")
    assert result.returncode == 2
    assert f"{config / 'hl7bridge.yaml'}:3: listeners[1].endpoint: privateKey file {config / 'pki/none.key'} does not exist" \
        in result.stderr.decode()


def test_two_listeners_in_one_process(tmp_path):
    config = tmp_path / "config"
    config.mkdir()
    (config / "hl7bridge.yaml").write_text(
        "listeners:\n"
        "  - {name: north, endpoint: 'tcp:0:interface=127.0.0.1'}\n"
        "  - {name: east, endpoint: 'tcp:0:interface=127.0.0.1', message_types: [DFT]}\n"
    )
    proc = EngineProcess(tmp_path, listen=(), config=config)
    try:
        assert set(proc.ports) == {"north", "east"}
        north = run_cli("send", "-q", f"127.0.0.1:{proc.ports['north']}", EXAMPLES / "siu_s12.hl7")
        east = run_cli("send", "-q", f"127.0.0.1:{proc.ports['east']}", EXAMPLES / "siu_s15.hl7", EXAMPLES / "dft_p03.hl7")
        assert north.returncode == 0
        assert east.returncode == 1
        assert "AR: message type SIU is not accepted" in east.stdout.decode()
        conn = sqlite3.connect(proc.journal)
        assert conn.execute("SELECT listener, ack_code FROM messages ORDER BY id").fetchall() == [
            ("north", "AA"), ("east", "AR"), ("east", "AA")
        ]
    finally:
        proc.stop()


def test_bind_failure_is_a_clear_error(engine, tmp_path):
    result = run_cli("serve", "--listen", f"tcp:{engine.port}:interface=127.0.0.1", "--journal", tmp_path / "other.db", timeout=30)
    assert result.returncode == 1
    assert f"cannot listen on tcp:{engine.port}:interface=127.0.0.1" in result.stderr.decode()


# -- the third-party corpus ------------------------------------------------------------------------

# Files whose messages ask for no ACK in enhanced mode (MSH-15 NE): journaled with CA, nothing sent.
NO_ACK = {
    "HL7-v2-to-fhir/archive/P03-Charge-v2.3.hl7",
    "HL7-v2-to-fhir/archive/S12-New-Appointment-v2.3.hl7",
    "_generic-tricky/johnpaulett-python-hl7/sample_batch1.hl7",
    "_generic-tricky/johnpaulett-python-hl7/sample_file1.hl7",
}
ENHANCED = {"HL7-v2-to-fhir/test_conversions_SIU_S12.hl7"}  # MSH-15 AL: a CA comes back
MALFORMED_BATCHES = {
    "_generic-tricky/johnpaulett-python-hl7/sample_bad_batch1.hl7": 4,
    "_generic-tricky/johnpaulett-python-hl7/sample_bad_file1.hl7": 5,
}


def test_every_corpus_message_gets_the_ack_it_deserves_and_is_journaled_byte_for_byte(engine):
    corpus = corpus_dir()
    files = [p for p in sorted(corpus.rglob("*.hl7")) if str(p.relative_to(corpus)) not in MALFORMED_BATCHES]
    result = run_cli("send", "--json", "--keep-line-endings", engine.address, *files, timeout=120)
    sent = json.loads(result.stdout)
    expected = []
    for path in files:
        name = str(path.relative_to(corpus))
        for message in split_messages(path.read_bytes(), keep_line_endings=True):
            expected.append((name, message.data))
    assert len(sent) == len(expected)
    for (name, _), outcome in zip(expected, sent):
        if name in NO_ACK:
            assert outcome["ack_code"] is None and outcome["accepted"], name
        elif name in ENHANCED:
            assert outcome["ack_code"] == "CA", name
        else:
            # Every corpus message has a readable MSH with type, control ID and a supported version.
            assert outcome["ack_code"] == "AA", (name, outcome["error"])
    assert result.returncode == 0
    rows = journal_rows(engine.journal)
    assert [row[0] for row in rows] == [data for _, data in expected]
    # The same (facility, control ID) sent again is a duplicate: stored, ACKed alike, not processed.
    # Nothing is rejected; ADT samples match no route and are journaled as unrouted.
    statuses = {row[1] for row in rows}
    assert "duplicate" in statuses and "unrouted" in statuses
    assert statuses <= {"accepted", "mapped", "mapping_error", "unrouted", "duplicate"}
    assert all(row[3] == 0 for (name, _), row in zip(expected, rows) if name in NO_ACK)


@pytest.mark.parametrize("name, line", sorted(MALFORMED_BATCHES.items()))
def test_malformed_corpus_batches_are_refused_by_send_with_the_line(engine, name, line):
    if not CORPUS.is_dir():
        pytest.skip("../shared/corpus is not beside this clone")
    result = run_cli("send", engine.address, CORPUS / name)
    assert result.returncode == 2
    assert f"line {line}: BHS inside a message" in result.stderr.decode()
    assert journal_rows(engine.journal) == []


def test_free_text_is_indexed_in_the_background_and_the_indexer_stops_with_the_engine(engine):
    import time

    from engine.store.sqlite_text import text_index_path

    assert run_cli("send", "-q", engine.address, EXAMPLES / "siu_s12.hl7", EXAMPLES / "dft_p03.hl7").returncode == 0
    text_db = text_index_path(engine.journal)
    deadline = time.monotonic() + 10
    indexed = 0
    while time.monotonic() < deadline and indexed < 2:
        if text_db.exists():
            conn = sqlite3.connect(text_db)
            try:
                row = conn.execute("SELECT value FROM meta WHERE key = 'indexed_through'").fetchone()
            except sqlite3.OperationalError:
                row = None
            conn.close()
            indexed = row[0] if row else 0
        time.sleep(0.1)
    assert indexed == 2  # without any CLI search asking for it
    engine.stop()
    import subprocess

    leftover = subprocess.run(["pgrep", "-f", f"engine.store.textindexer {engine.journal}"], capture_output=True)
    assert leftover.stdout == b""
