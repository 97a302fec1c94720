"""The HAProxy of tests/haproxy.py balances TCP connections and fails over on health checks.

The backends are tiny threads: a TCP server that answers each line with its name, and an HTTP
server whose /readyz answers 200 or 503 as the test says (the engine nodes will serve /readyz).
"""

from __future__ import annotations

import collections
import http.server
import socket
import socketserver
import threading
import time

import pytest


class _EchoHandler(socketserver.StreamRequestHandler):
    def handle(self):
        for line in self.rfile:  # health checks connect and close: no line, nothing to do
            self.wfile.write(self.server.name.encode() + b" " + line)


class _ThreadingTCPServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


class Backend:
    """A named TCP echo server and its /readyz HTTP server, each on a free port of 127.0.0.1."""

    def __init__(self, name: str):
        self.name = name
        self.ready = True  # /readyz answers 200 when True, 503 when False
        self.tcp = _ThreadingTCPServer(("127.0.0.1", 0), _EchoHandler)
        self.tcp.name = name
        backend = self

        class Ready(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                status = 200 if self.path == "/readyz" and backend.ready else 503
                self.send_response(status if self.path == "/readyz" else 404)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.http = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Ready)
        self.http.daemon_threads = True
        self.threads = [threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
                        for server in (self.tcp, self.http)]
        for thread in self.threads:
            thread.start()

    @property
    def address(self) -> tuple[str, int]:
        return self.tcp.server_address

    @property
    def ready_port(self) -> int:
        return self.http.server_address[1]

    def stop_tcp(self):
        """Close the echo server's port (connections are refused from now on)."""
        self.tcp.shutdown()
        self.tcp.server_close()

    def stop(self):
        for server in (self.tcp, self.http):
            server.shutdown()
            server.server_close()


@pytest.fixture
def backends():
    """Two backends, "a" and "b"."""
    started = [Backend("a"), Backend("b")]
    yield started
    for backend in started:
        try:
            backend.stop()
        except OSError:
            pass


def served_by(proxy, count: int = 1) -> list[str]:
    """Open ``count`` connections in turn through the proxy; the backend name that answered each."""
    names = []
    for _ in range(count):
        with socket.create_connection(proxy.address, timeout=5) as conn:
            conn.sendall(b"ping\n")
            answer = conn.makefile("rb").readline()
        name, _, rest = answer.decode().partition(" ")
        assert rest == "ping\n", answer
        names.append(name)
    return names


def proxy_for(haproxy_factory, backends, **kwargs):
    proxy = haproxy_factory([b.address for b in backends], check_ports=[b.ready_port for b in backends], **kwargs)
    for name in proxy.names:
        proxy.wait_for_state(name, "UP", exact=True)  # every server has passed a check
    return proxy


def test_round_robin_over_both_backends(haproxy_factory, backends):
    proxy = proxy_for(haproxy_factory, backends)
    assert proxy.states() == {"s1": "UP", "s2": "UP"}
    assert collections.Counter(served_by(proxy, 6)) == {"a": 3, "b": 3}
    assert proxy.connections_total() == {"s1": 3, "s2": 3}
    config = proxy.config_text()
    assert "option httpchk GET /readyz" in config
    assert f"check port {backends[0].ready_port}" in config


def test_readyz_503_takes_a_backend_out_and_200_brings_it_back(haproxy_factory, backends):
    proxy = proxy_for(haproxy_factory, backends)
    backends[0].ready = False
    began = time.monotonic()
    proxy.wait_for_state("s1", "DOWN", timeout=5)
    assert time.monotonic() - began < 2.0  # inter 0.2 s, fall 2: well under the "about a second" asked
    assert served_by(proxy, 10) == ["b"] * 10
    assert "Server be/s1 is DOWN" in proxy.log_text()

    backends[0].ready = True
    proxy.wait_for_state("s1", "UP", timeout=5, exact=True)
    assert set(served_by(proxy, 4)) == {"a", "b"}


def test_a_stopped_backend_is_marked_down(haproxy_factory, backends):
    proxy = proxy_for(haproxy_factory, backends)
    backends[1].stop()  # both its ports: the check and the traffic fail
    proxy.wait_for_state("s2", "DOWN", timeout=5)
    assert served_by(proxy, 10) == ["a"] * 10
    assert proxy.states()["s1"] == "UP"


def test_without_check_ports_a_tcp_connect_is_the_check(haproxy_factory, backends):
    proxy = haproxy_factory([b.address for b in backends])
    assert "httpchk" not in proxy.config_text()
    backends[0].ready = False  # no HTTP check: /readyz does not matter
    proxy.wait_for_state("s1", "UP", exact=True)
    backends[0].stop_tcp()
    proxy.wait_for_state("s1", "DOWN", timeout=5)
    assert served_by(proxy, 6) == ["b"] * 6


def test_admin_socket_puts_a_server_in_maintenance(haproxy_factory, backends):
    proxy = proxy_for(haproxy_factory, backends)
    proxy.set_state("s2", "maint")
    assert proxy.states()["s2"] == "MAINT"
    assert served_by(proxy, 4) == ["a"] * 4
    proxy.set_state("s2", "ready")
    proxy.wait_for_state("s2", "UP", timeout=5)
    assert set(served_by(proxy, 4)) == {"a", "b"}
    with pytest.raises(RuntimeError):
        proxy.set_state("s9", "maint")


def test_restart_keeps_the_port(haproxy_factory, backends):
    proxy = proxy_for(haproxy_factory, backends)
    port = proxy.port
    proxy.stop()
    with pytest.raises(OSError):
        socket.create_connection(proxy.address, timeout=1).close()
    proxy.start()
    assert proxy.port == port
    assert len(served_by(proxy, 2)) == 2
