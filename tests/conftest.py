"""Shared fixtures: the example and corpus messages, and a real engine process on 127.0.0.1."""

from __future__ import annotations

import itertools
import os
import re
import signal
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import pytest

from fhirserver import fhir_server, fhir_server_factory  # noqa: F401 (fixtures for every test module)
from tryton import tryton_server, tryton_template  # noqa: F401 (fixtures for every test module)
from pgserver import postgres_server, postgres_url  # noqa: F401 (fixtures for every test module)
from haproxy import haproxy_factory  # noqa: F401 (fixtures for every test module)

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
CORPUS = ROOT.parent / "shared" / "corpus"
HL7BRIDGE = [sys.executable, "-m", "engine.cli"]


def corpus_dir() -> Path:
    """The third-party corpus; tests that need it skip on a clone that has no ../shared."""
    if not CORPUS.is_dir():
        pytest.skip("../shared/corpus is not beside this clone (third-party messages are not shipped)")
    return CORPUS


def corpus_files() -> list[Path]:
    if not CORPUS.is_dir():
        return []
    return sorted(p for p in CORPUS.rglob("*.hl7"))


def shipped_config(directory: Path) -> Path:
    """A copy of the repository's routes, mappings and destinations, so file destinations write
    under the test's own directory and tests may change them."""
    import shutil

    if not directory.exists():
        for part in ("routes", "mappings", "destinations"):
            shutil.copytree(ROOT / part, directory / part)
    return directory


@pytest.fixture
def journal(tmp_path):
    """A fresh journal file."""
    from engine.store import open_journal

    j = open_journal(tmp_path / "journal.db")
    yield j
    j.close()


# The moment the in-process tests receive their messages at (ACKs and journal rows compare byte for byte).
NOW = datetime(2026, 11, 24, 6, 0, 0, tzinfo=timezone.utc)


@pytest.fixture
def ingestor(journal):
    """An ingestor without routes on the ``journal`` fixture, receiving at NOW, ACK control IDs ACK1, ACK2..."""
    from engine.mllp.ingest import Ingestor

    counter = itertools.count(1)
    return Ingestor(journal, clock=lambda: NOW, next_control_id=lambda: f"ACK{next(counter)}")


@pytest.fixture
def examples() -> Path:
    return EXAMPLES


def terminate(process: subprocess.Popen, grace: float):
    """Stop an engine as an operator would (SIGTERM), killing it if it has not exited in ``grace`` s."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(grace)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)


class EngineProcess:
    """``hl7bridge serve`` in a subprocess, listening on a free port."""

    def __init__(self, tmp_path: Path, extra_args=(), listen=("tcp:0:interface=127.0.0.1",), config=None):
        if config is None:
            config = shipped_config(tmp_path / "config")
        self.config = config
        self.journal = tmp_path / "journal.db"
        self.stderr_path = tmp_path / "engine.stderr"
        args = [*HL7BRIDGE, "serve", "--journal", str(self.journal), "--metrics", "tcp:0:interface=127.0.0.1"]
        for endpoint in listen:
            args += ["--listen", endpoint]
        if config is not None:
            args += ["--config", str(config)]
        args += list(extra_args)
        self.args = args
        self.ports: dict[str, int] = {}
        self.start()

    def start(self):
        self._stderr = open(self.stderr_path, "ab")
        self.process = subprocess.Popen(
            self.args, cwd=ROOT, stdout=subprocess.PIPE, stderr=self._stderr,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        deadline = time.monotonic() + 20
        self.ports = {}
        while time.monotonic() < deadline:
            line = self.process.stdout.readline().decode()
            if not line:
                raise RuntimeError(f"engine exited: {self.stderr_path.read_text()}")
            metrics = re.search(r"metrics ready on [\d.]+:(\d+)", line)
            if metrics:
                self.metrics_port = int(metrics.group(1))
                return
            match = re.search(r"listener (\S+) ready on [\d.]+:(\d+)", line)
            if match:
                self.ports[match.group(1)] = int(match.group(2))
        raise RuntimeError("engine did not start in 20 s")

    @property
    def port(self) -> int:
        return next(iter(self.ports.values()))

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def kill(self):
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)
        self._stderr.close()

    def stop(self):
        terminate(self.process, 15)
        self._stderr.close()

    def log(self) -> str:
        return self.stderr_path.read_text(errors="replace")


@pytest.fixture
def engine(tmp_path):
    proc = EngineProcess(tmp_path)
    yield proc
    proc.stop()


def wait_for(predicate, seconds=15, interval=0.05):
    """Poll ``predicate`` until it returns something true; that value, or an AssertionError after ``seconds``."""
    deadline = time.monotonic() + seconds
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not true after {seconds} s: {getattr(predicate, '__name__', predicate)}")
        time.sleep(interval)


def run_cli(*args, input=None, timeout=60):
    """Run the real console command (for end-to-end tests); returns CompletedProcess."""
    return subprocess.run([*HL7BRIDGE, *map(str, args)], cwd=ROOT, capture_output=True, input=input, timeout=timeout)
