"""A real FHIR R4 server for tests: tests/fhir_server/server.js (Medplum's FHIR router, in memory).

    from fhirserver import fhir_server, fhir_server_factory   # in conftest.py: the fixtures

    def test_something(fhir_server):
        fhir_server.base_url                     # http://127.0.0.1:<port>/fhir/R4
        fhir_server.search("Patient", identifier="urn:x|1")
        fhir_server.fail_next(503, count=2)      # the next two FHIR requests get a 503

Needs Node 20+ and npm; ``ensure_installed()`` runs ``npm ci`` in tests/fhir_server the first time.
Stdlib only at import time; pytest is imported inside the fixtures. The fixtures skip when node or npm
is missing, or fail instead when HL7BRIDGE_REQUIRE_FHIR_SERVER=1 (for CI, where a skip would hide it).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import selectors
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

SERVER_DIR = Path(__file__).resolve().parent / "fhir_server"
READY_PREFIX = "fhir-server listening on "
FHIR_JSON = "application/fhir+json"


class FhirServerUnavailable(RuntimeError):
    """Node or npm is missing, or the install failed: the server cannot run here."""


class FhirError(Exception):
    """A FHIR request answered with a status >= 400; ``outcome`` is the parsed body (an OperationOutcome)."""

    def __init__(self, status: int, body, method: str, url: str):
        self.status = status
        self.outcome = body
        super().__init__(f"{method} {url} -> {status}: {json.dumps(body)[:500]}")


# --- install -----------------------------------------------------------------------------------------

_installed = False


def _installed_matches_lock() -> bool:
    """Every package pinned in package-lock.json is in node_modules at that version."""
    lock = SERVER_DIR / "package-lock.json"
    if not (SERVER_DIR / "node_modules").is_dir() or not lock.is_file():
        return False
    for key, entry in json.loads(lock.read_text()).get("packages", {}).items():
        if not key.startswith("node_modules/"):
            continue
        manifest = SERVER_DIR / key / "package.json"
        try:
            if json.loads(manifest.read_text()).get("version") != entry.get("version"):
                return False
        except (OSError, ValueError):
            return False
    return True


def ensure_installed() -> None:
    """``npm ci`` in tests/fhir_server when node_modules is missing or differs from the lock file.

    Safe to call from several processes at once (pytest-xdist): a lock file in the temp dir serialises them.
    """
    global _installed
    if _installed:
        return
    for tool in ("node", "npm"):
        if shutil.which(tool) is None:
            raise FhirServerUnavailable(
                f"{tool} is not on PATH: the test FHIR server needs Node.js 20+ and npm (https://nodejs.org/)")
    version = subprocess.run(["node", "--version"], capture_output=True, text=True, check=False).stdout.strip()
    major, minor = (int(part) for part in version.lstrip("v").split(".")[:2])
    if (major, minor) < (20, 19):
        raise FhirServerUnavailable(f"node {version} is too old: the test FHIR server needs Node.js 20.19+")
    key = hashlib.sha1(str(SERVER_DIR).encode()).hexdigest()[:12]
    lock_path = Path(tempfile.gettempdir()) / f"hl7bridge-fhir-server-{key}.lock"
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not _installed_matches_lock():
            has_lock = (SERVER_DIR / "package-lock.json").is_file()
            command = ["npm", "ci" if has_lock else "install", "--no-audit", "--no-fund"]
            env = {**os.environ, "npm_config_update_notifier": "false"}
            done = subprocess.run(command, cwd=SERVER_DIR, env=env, capture_output=True, text=True, timeout=600,
                                  check=False)
            if done.returncode != 0:
                raise FhirServerUnavailable(
                    f"{' '.join(command)} failed in {SERVER_DIR} (exit {done.returncode}):\n"
                    f"{done.stdout[-2000:]}{done.stderr[-4000:]}")
    _installed = True


# --- the server --------------------------------------------------------------------------------------

class FhirServer:
    """``node server.js`` in a subprocess on 127.0.0.1.

    ``port=0`` lets the kernel choose; after the first start the port is kept, so ``stop()`` then
    ``start()`` (or ``restart()``) comes back on the same URL, with an empty store.
    """

    def __init__(self, port: int = 0, token: str | None = None, log_requests: bool = False,
                 startup_timeout: float = 30.0, env: dict | None = None):
        self.port = port
        self.token = token
        self.log_requests = log_requests
        self.startup_timeout = startup_timeout
        self.extra_env = dict(env or {})
        self.process: subprocess.Popen | None = None
        self.startup_seconds: float | None = None
        fd, name = tempfile.mkstemp(prefix="fhir-server-", suffix=".log")
        os.close(fd)
        self.log_path = Path(name)  # the server's stderr, kept across restarts

    # lifecycle

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/fhir/R4"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/admin"

    def start(self) -> FhirServer:
        if self.running:
            raise RuntimeError("FHIR server already running")
        ensure_installed()
        env = {**os.environ, **self.extra_env, "PORT": str(self.port), "FHIR_EXIT_ON_EOF": "1",
               "FHIR_LOG": "1" if self.log_requests else "0"}
        env.pop("FHIR_AUTH_TOKEN", None)
        if self.token:
            env["FHIR_AUTH_TOKEN"] = self.token
        began = time.monotonic()
        with open(self.log_path, "ab") as log:
            # stdin is a pipe that we never write: when this process dies, the server sees EOF and exits.
            self.process = subprocess.Popen(["node", "server.js"], cwd=SERVER_DIR, env=env,
                                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log)
        line = self._read_ready_line(began + self.startup_timeout)
        url = line[len(READY_PREFIX):].strip()
        self.port = urllib.parse.urlsplit(url).port
        self.startup_seconds = time.monotonic() - began
        return self

    def _read_ready_line(self, deadline: float) -> str:
        selector = selectors.DefaultSelector()
        selector.register(self.process.stdout, selectors.EVENT_READ)
        buffer = b""
        try:
            while time.monotonic() < deadline:
                if not selector.select(timeout=max(0.0, deadline - time.monotonic())):
                    continue
                chunk = os.read(self.process.stdout.fileno(), 4096)
                if not chunk:
                    self.process.wait(timeout=5)
                    raise RuntimeError(f"FHIR server exited with {self.process.returncode} before it was ready:\n"
                                       f"{self.log_text()[-4000:]}")
                buffer += chunk
                if b"\n" in buffer:
                    line = buffer.split(b"\n", 1)[0].decode()
                    if not line.startswith(READY_PREFIX):
                        raise RuntimeError(f"unexpected first line from the FHIR server: {line!r}")
                    return line
        finally:
            selector.close()
        self.kill()
        raise RuntimeError(f"FHIR server not ready in {self.startup_timeout} s:\n{self.log_text()[-4000:]}")

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM and wait (SIGKILL after ``timeout``). The store is gone with the process."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._close()

    def kill(self) -> None:
        """SIGKILL, as a crash would."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self._close()

    def restart(self) -> FhirServer:
        self.stop()
        return self.start()

    def _close(self) -> None:
        for pipe in (self.process.stdin, self.process.stdout):
            if pipe:
                pipe.close()
        self.process = None

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def close(self) -> None:
        """Stop, and remove the log file."""
        self.stop()
        self.log_path.unlink(missing_ok=True)

    def __enter__(self) -> FhirServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    # HTTP (urllib, stdlib only)

    def request(self, method: str, path: str, body=None, headers: dict | None = None, auth: bool = True,
                timeout: float = 30.0):
        """Any request; ``path`` is relative to the FHIR base ("Patient/1", "" for the base) or a full URL.

        Returns ``(status, headers, parsed JSON body or None)`` and never raises on an HTTP status.
        """
        url = path if path.startswith("http") else f"{self.base_url}/{path.lstrip('/')}".rstrip("/")
        data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
        all_headers = {"Accept": FHIR_JSON}
        if data is not None:
            all_headers["Content-Type"] = FHIR_JSON
        if auth and self.token:
            all_headers["Authorization"] = f"Bearer {self.token}"
        all_headers.update(headers or {})
        req = urllib.request.Request(url, data=data, method=method, headers=all_headers)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as response:
                status, response_headers, raw = response.status, dict(response.headers), response.read()
        except urllib.error.HTTPError as err:
            status, response_headers, raw = err.code, dict(err.headers), err.read()
        return status, response_headers, (json.loads(raw) if raw else None)

    def _checked(self, method, path, body=None):
        status, _, parsed = self.request(method, path, body)
        if status >= 400:
            raise FhirError(status, parsed, method, path)
        return parsed

    def get(self, path: str):
        """GET, parsed JSON; raises FhirError on a status >= 400."""
        return self._checked("GET", path)

    def post(self, path: str, body):
        return self._checked("POST", path, body)

    def put(self, path: str, body):
        return self._checked("PUT", path, body)

    def delete(self, path: str):
        return self._checked("DELETE", path)

    def transaction(self, bundle: dict):
        """POST a transaction or batch Bundle to the base; the response Bundle."""
        return self._checked("POST", "", bundle)

    def search(self, resource_type: str, params: dict | None = None, **kwargs):
        """The searchset Bundle. Parameters as keywords, or in ``params`` for names like "service-provider";
        a list value repeats the parameter."""
        query = urllib.parse.urlencode({**(params or {}), **kwargs}, doseq=True)
        return self.get(f"{resource_type}?{query}" if query else resource_type)

    def resources(self, resource_type: str, params: dict | None = None, **kwargs) -> list[dict]:
        """The resources a search finds (``_count`` defaults to 1000)."""
        kwargs.setdefault("_count", 1000)
        bundle = self.search(resource_type, params, **kwargs)
        return [entry["resource"] for entry in bundle.get("entry", [])]

    # test hooks

    def _admin(self, method: str, name: str, body=None):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(f"{self.admin_url}/{name}", data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as response:
            return json.loads(response.read())

    def fail_next(self, status: int = 503, count: int = 1, retry_after: float | None = None) -> None:
        """The next ``count`` FHIR requests get ``status`` (with Retry-After when given), then normal service."""
        body = {"status": status, "count": count}
        if retry_after is not None:
            body["retryAfter"] = retry_after
        self._admin("POST", "fail", body)

    def reset(self) -> None:
        """Empty the store, drop pending failures, zero the counters."""
        self._admin("POST", "reset", {})

    def stats(self) -> dict:
        """``{"requests": FHIR requests seen, "injectedFailures": ..., "pendingFailures": ...}``."""
        return self._admin("GET", "stats")


# --- pytest fixtures ----------------------------------------------------------------------------------

def _start_or_skip(server: FhirServer) -> FhirServer:
    import pytest

    try:
        return server.start()
    except FhirServerUnavailable as err:
        if os.environ.get("HL7BRIDGE_REQUIRE_FHIR_SERVER") == "1":
            raise
        server.close()
        pytest.skip(f"test FHIR server unavailable: {err}")


def _fixtures():
    import pytest

    @pytest.fixture
    def fhir_server():
        """A started FhirServer with an empty store, stopped after the test."""
        server = FhirServer()
        _start_or_skip(server)
        yield server
        server.close()

    @pytest.fixture
    def fhir_server_factory():
        """``make(**FhirServer kwargs)`` starts a server (e.g. ``token="t"``); all are stopped after the test."""
        servers = []

        def make(**kwargs) -> FhirServer:
            server = FhirServer(**kwargs)
            servers.append(server)
            return _start_or_skip(server)

        yield make
        for server in servers:
            server.close()

    return fhir_server, fhir_server_factory


try:  # the fixtures exist only where pytest does; the rest of this module needs just the stdlib
    import pytest as _pytest  # noqa: F401
except ImportError:  # pragma: no cover
    pass
else:
    fhir_server, fhir_server_factory = _fixtures()
