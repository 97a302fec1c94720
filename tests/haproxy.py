"""HAProxy in front of test servers: a TCP load balancer on 127.0.0.1 with fast health checks.

    from haproxy import haproxy_factory   # in conftest.py: the fixture

    def test_failover(haproxy_factory):
        proxy = haproxy_factory([("127.0.0.1", mllp_a), ("127.0.0.1", mllp_b)],
                                check_ports=[http_a, http_b])   # GET /readyz on those ports
        proxy.port                                # where clients connect
        proxy.wait_for_state("s1", "DOWN")        # after node A's /readyz starts answering 503
        proxy.states()                            # {"s1": "DOWN", "s2": "UP"}

:class:`HAProxy` writes a config into a temporary directory and runs the distribution's
``haproxy`` in the foreground (``-db``): one ``mode tcp`` frontend on a free port, one backend
with servers named s1, s2, ... in the order given.  Health checks run every ``inter`` seconds;
``fall`` failures mark a server DOWN and ``rise`` successes UP again (defaults: 0.2 s, 2, 2, so a
failover takes well under a second).  With ``check_ports`` the check is an HTTP ``GET /readyz``
on that port of each server (2xx/3xx is healthy); without, a TCP connect to the server's port.
An admin socket answers :meth:`HAProxy.command` (``show stat``, ``set server be/s1 state maint``).

Stdlib only at import time; pytest is imported inside the fixture, which skips when haproxy is
missing, or fails instead when HL7BRIDGE_REQUIRE_HAPROXY=1 (for CI, where a skip would hide it).
"""

from __future__ import annotations

import atexit
import csv
import shutil
import socket
import subprocess
import tempfile
import time
import weakref
from pathlib import Path

BACKEND = "be"  # the backend's name in the config, for admin commands: "set server be/s1 ..."


class HAProxyUnavailable(RuntimeError):
    """The haproxy binary is not installed here."""


def find_haproxy() -> str | None:
    """The haproxy binary: on PATH, or Debian's /usr/sbin/haproxy (sbin is not on every PATH)."""
    found = shutil.which("haproxy")
    if found:
        return found
    return "/usr/sbin/haproxy" if Path("/usr/sbin/haproxy").is_file() else None


def missing_reason() -> str | None:
    """Why HAProxy cannot run here, or None when it can."""
    if find_haproxy() is None:
        return "haproxy is not installed (apt-get install haproxy, or make test as root)"
    return None


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _milliseconds(seconds: float) -> str:
    return f"{max(1, round(seconds * 1000))}ms"


class HAProxy:
    """``haproxy -db -f CONFIG`` in a subprocess, balancing TCP connections over ``servers``.

    ``servers`` is a list of (host, port); they are named s1, s2, ... in that order.
    ``check_ports`` (same length) turns on HTTP checks (``check_path`` on that port of the same
    host); without it the check is a TCP connect to the server's own port.  ``balance`` is any
    HAProxy algorithm (roundrobin, leastconn, first, source).  ``server_options`` is appended to
    every server line (for example ``"on-marked-down shutdown-sessions"``).  ``port=0`` picks a free
    port; it is kept across ``stop()``/``start()``.
    """

    def __init__(self, servers: list[tuple[str, int]], check_ports: list[int] | None = None,
                 check_path: str = "/readyz", port: int = 0, balance: str = "roundrobin",
                 inter: float = 0.2, fall: int = 2, rise: int = 2, timeout_connect: float = 1.0,
                 timeout_client: float = 60.0, timeout_server: float = 60.0,
                 server_options: str = "", startup_timeout: float = 10.0):
        if check_ports is not None and len(check_ports) != len(servers):
            raise ValueError("check_ports needs one port per server")
        self.servers = [(host, int(port_)) for host, port_ in servers]
        self.check_ports = list(check_ports) if check_ports is not None else None
        self.check_path = check_path
        self.port = port
        self.balance = balance
        self.inter, self.fall, self.rise = inter, fall, rise
        self.timeout_connect, self.timeout_client, self.timeout_server = (
            timeout_connect, timeout_client, timeout_server)
        self.server_options = server_options
        self.startup_timeout = startup_timeout
        self.directory = Path(tempfile.mkdtemp(prefix="hl7bridge-haproxy-"))
        self.process: subprocess.Popen | None = None
        _LIVE.add(self)

    # paths

    @property
    def config_path(self) -> Path:
        return self.directory / "haproxy.cfg"

    @property
    def socket_path(self) -> Path:
        """The admin socket (``level admin``)."""
        return self.directory / "admin.sock"

    @property
    def log_path(self) -> Path:
        """haproxy's stderr: startup warnings, and a line for every server going DOWN or UP."""
        return self.directory / "haproxy.log"

    @property
    def names(self) -> list[str]:
        """The server names, in the order of ``servers``: s1, s2, ..."""
        return [f"s{i}" for i in range(1, len(self.servers) + 1)]

    @property
    def address(self) -> tuple[str, int]:
        """(host, port) where clients connect."""
        return ("127.0.0.1", self.port)

    # lifecycle

    def config_text(self) -> str:
        """The configuration haproxy runs with."""
        lines = [
            "global",
            f"    stats socket {self.socket_path} mode 600 level admin",
            "",
            "defaults",
            "    mode tcp",
            f"    timeout connect {_milliseconds(self.timeout_connect)}",
            f"    timeout client {_milliseconds(self.timeout_client)}",
            f"    timeout server {_milliseconds(self.timeout_server)}",
            f"    timeout check {_milliseconds(max(self.inter, 0.5))}",
            # A connection refused by a server that is not yet marked DOWN goes to another one.
            "    option redispatch",
            "    retries 2",
            "",
            "frontend fe",
            f"    bind 127.0.0.1:{self.port}",
            f"    default_backend {BACKEND}",
            "",
            f"backend {BACKEND}",
            f"    balance {self.balance}",
        ]
        if self.check_ports is not None:
            lines.append(f"    option httpchk GET {self.check_path}")
        lines.append(f"    default-server check inter {_milliseconds(self.inter)} fall {self.fall} rise {self.rise}")
        for index, (name, (host, port)) in enumerate(zip(self.names, self.servers)):
            line = f"    server {name} {host}:{port}"
            if self.check_ports is not None:
                line += f" check port {self.check_ports[index]}"
            if self.server_options:
                line += f" {self.server_options}"
            lines.append(line)
        return "\n".join(lines) + "\n"

    def start(self) -> HAProxy:
        """Write the config, start haproxy and wait until its admin socket answers."""
        if self.running:
            raise RuntimeError("haproxy already running")
        binary = find_haproxy()
        if binary is None:
            raise HAProxyUnavailable(missing_reason())
        chosen = self.port
        for attempt in range(3):  # a free port may be taken between free_port() and haproxy's bind
            if not chosen:
                self.port = free_port()
            self.config_path.write_text(self.config_text())
            self.socket_path.unlink(missing_ok=True)
            with open(self.log_path, "ab") as log:
                self.process = subprocess.Popen([binary, "-db", "-f", str(self.config_path)],
                                                stdin=subprocess.DEVNULL, stdout=log, stderr=log)
            if self._wait_ready():
                return self
            self.kill()
            if chosen or attempt == 2 or "cannot bind" not in self.log_text().lower():
                break
        raise RuntimeError(f"haproxy did not start:\n{self.log_text()[-3000:]}")

    def _wait_ready(self) -> bool:
        # haproxy binds the frontend before it serves the admin socket. (A test connection to the
        # frontend would reach a backend, and count there.)
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                return False
            try:
                self.command("show info")
                return True
            except OSError:
                time.sleep(0.02)
        return False

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM (haproxy's hard stop: open connections are cut), SIGKILL after ``timeout``."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def kill(self) -> None:
        """SIGKILL."""
        if self.process is not None:
            if self.process.poll() is None:
                self.process.kill()
                self.process.wait()
            self.process = None

    def close(self) -> None:
        """Stop and remove the directory (config, socket, log)."""
        self.stop()
        shutil.rmtree(self.directory, ignore_errors=True)
        _LIVE.discard(self)

    def __enter__(self) -> HAProxy:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    # the admin socket

    def command(self, line: str, timeout: float = 5.0) -> str:
        """One command on the admin socket (``show stat``, ``disable server be/s1``...); its answer."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(str(self.socket_path))
            sock.sendall(line.encode() + b"\n")
            chunks = []
            while chunk := sock.recv(65536):  # haproxy closes after answering one command
                chunks.append(chunk)
        return b"".join(chunks).decode(errors="replace")

    def stats(self) -> list[dict]:
        """``show stat`` as dicts (pxname, svname, status, scur, stot, check_status, ...)."""
        text = self.command("show stat").lstrip("# ")
        return [row for row in csv.DictReader(text.splitlines()) if row.get("pxname")]

    def states(self) -> dict[str, str]:
        """Each server's state: "UP", "DOWN", "MAINT", "DRAIN", "NOLB" or "no check".

        A server between states shows as HAProxy says it: "UP 1/2" is up with one failed check
        to go before DOWN (also the state before the first check), "DOWN 1/2" down and rising.
        """
        return {row["svname"]: row["status"] for row in self.stats()
                if row["pxname"] == BACKEND and row["svname"] in self.names}

    def connections_total(self) -> dict[str, int]:
        """Connections each server has received since start (``stot``)."""
        return {row["svname"]: int(row["stot"] or 0) for row in self.stats()
                if row["pxname"] == BACKEND and row["svname"] in self.names}

    def wait_for_state(self, name: str, state: str, timeout: float = 10.0, exact: bool = False) -> None:
        """Wait until server ``name`` (s1, s2...) is in ``state`` ("UP", "DOWN", "MAINT"...).

        Only the first word counts unless ``exact``: "UP 1/2" (up, one failed check away from
        DOWN) is UP. HAProxy 2.6 starts every server as "UP 1/2", before its first check: to
        know that a check has passed, wait for "UP" with ``exact=True``. Raises TimeoutError.
        """
        deadline = time.monotonic() + timeout
        while True:
            current = self.states().get(name)
            if current is None:
                raise KeyError(f"no server {name!r}: the servers are {self.names}")
            if (current if exact else current.split()[0]) == state.upper():
                return
            if time.monotonic() >= deadline:
                raise TimeoutError(f"server {name} still {current!r} after {timeout} s, not {state}: "
                                   f"{self.states()}\n{self.log_text()[-2000:]}")
            time.sleep(0.05)

    def set_state(self, name: str, state: str) -> None:
        """Put server ``name`` in "maint" (no traffic), "drain" (no new connections) or "ready"."""
        answer = self.command(f"set server {BACKEND}/{name} state {state}").strip()
        if answer:
            raise RuntimeError(f"haproxy: set server {BACKEND}/{name} state {state}: {answer}")


_LIVE: weakref.WeakSet = weakref.WeakSet()


@atexit.register
def _close_live() -> None:
    for proxy in list(_LIVE):
        proxy.close()


# --- pytest fixture -----------------------------------------------------------------------------------

def _skip_unless_available() -> None:
    """Skip the test when haproxy is missing, or fail when HL7BRIDGE_REQUIRE_HAPROXY=1 (CI)."""
    import os

    import pytest

    reason = missing_reason()
    if reason:
        if os.environ.get("HL7BRIDGE_REQUIRE_HAPROXY") == "1":
            pytest.fail(f"HL7BRIDGE_REQUIRE_HAPROXY=1 but {reason}")
        pytest.skip(reason)


def _fixtures():
    import pytest

    @pytest.fixture
    def haproxy_factory():
        """``make(servers, **HAProxy kwargs)`` starts an HAProxy; all are stopped after the test."""
        _skip_unless_available()
        proxies = []

        def make(servers, **kwargs) -> HAProxy:
            proxy = HAProxy(servers, **kwargs)
            proxies.append(proxy)
            return proxy.start()

        yield make
        for proxy in proxies:
            proxy.close()

    return haproxy_factory


try:  # the fixture exists only where pytest does; the rest of this module needs just the stdlib
    import pytest as _pytest  # noqa: F401
except ImportError:  # pragma: no cover
    pass
else:
    haproxy_factory = _fixtures()
