"""Kill the engine with SIGKILL while clients are sending: every ACKed message must be in the journal."""

import sqlite3
import threading
import time

import pytest

from conftest import EXAMPLES, EngineProcess
from engine.mllp.client import MLLPClient
from engine.errors import FramingError

pytestmark = pytest.mark.slow
SIU = (EXAMPLES / "siu_s12.hl7").read_bytes()


def sender(port, prefix, acked, stop):
    """Send unique messages until the connection dies; record each control ID that was ACKed AA."""
    try:
        with MLLPClient("127.0.0.1", port, timeout=10) as client:
            n = 0
            while not stop.is_set():
                control_id = f"{prefix}{n}"
                ack = client.send(SIU.replace(b"NC000123", control_id.encode()))
                if b"MSA|AA|" + control_id.encode() + b"\r" in ack:
                    acked.append(control_id)
                n += 1
    except (OSError, FramingError):
        pass  # the engine was killed mid-send: the last message may or may not be stored


def test_sigkill_during_sending_loses_nothing_that_was_acked(tmp_path):
    engine = EngineProcess(tmp_path)
    acked: list[str] = []
    stop = threading.Event()
    threads = [threading.Thread(target=sender, args=(engine.port, f"K{i}-", acked, stop)) for i in range(4)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 30
    while len(acked) < 400 and time.monotonic() < deadline:
        time.sleep(0.01)
    engine.kill()
    stop.set()
    for thread in threads:
        thread.join(10)
    assert len(acked) >= 400

    conn = sqlite3.connect(engine.journal)
    # Any status: the converter may already have mapped some of them.
    stored = {row[0] for row in conn.execute("SELECT control_id FROM messages WHERE ack_code = 'AA'")}
    conn.close()
    missing = [c for c in acked if c not in stored]
    assert missing == []

    # The engine starts again on the same journal; a resend of an ACKed message is a duplicate.
    engine.start()
    try:
        with MLLPClient("127.0.0.1", engine.port) as client:
            ack = client.send(SIU.replace(b"NC000123", acked[0].encode()))
        assert b"MSA|AA|" + acked[0].encode() in ack
        conn = sqlite3.connect(engine.journal)
        assert conn.execute("SELECT status FROM messages ORDER BY id DESC LIMIT 1").fetchone() == ("duplicate",)
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        conn.close()
    finally:
        engine.stop()


def test_workers_do_not_outlive_a_killed_engine(tmp_path):
    import subprocess

    engine = EngineProcess(tmp_path)
    engine.kill()  # right after start: the workers may still be importing
    time.sleep(3)
    left = subprocess.run(["pgrep", "-f", f"engine\\.(transform\\.converter|store\\.textindexer) {engine.journal}"], capture_output=True)
    assert left.stdout == b"", left.stdout
