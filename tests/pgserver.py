"""A private PostgreSQL server for tests, from the distribution's binaries (Debian: postgresql).

    from pgserver import postgres_server, postgres_url   # in conftest.py: the fixtures

    def test_something(postgres_url):
        postgres_url                             # postgresql://postgres@127.0.0.1:<port>/<fresh db>

    def test_other(postgres_server):             # one server for the whole session
        postgres_server.url                      # the "postgres" database
        url = postgres_server.create_database()  # an empty database of its own

    def test_crash():                            # a test that stops the server needs its own
        with PostgresServer() as pg:
            pg.stop(); pg.start()                # same port, committed data kept (crash recovery)

:class:`PostgresServer` runs ``initdb`` (trust authentication, user ``postgres``) in a temporary
directory (in /dev/shm when there is room: see :func:`default_parent`) and ``pg_ctl start`` on
127.0.0.1 with a free port; the Unix socket goes in that directory too, so it never meets the
system cluster.  ``initdb`` and ``pg_ctl`` refuse to run as
root: as root (CI) they run as the ``postgres`` system user with ``runuser -u postgres --``, and
the directory is handed to that user; as anyone else they run directly.

The binaries are found with ``$HL7BRIDGE_PG_BINDIR``, ``pg_config --bindir`` or the newest
/usr/lib/postgresql/*/bin.  Stdlib only (SQL for the helpers goes through ``psql``); pytest is
imported inside the fixtures.  The fixtures skip when PostgreSQL is missing, or fail instead when
HL7BRIDGE_REQUIRE_POSTGRES=1 (for CI, where a skip would hide it).
"""

from __future__ import annotations

import atexit
import itertools
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
import weakref
from pathlib import Path

SERVER_TOOLS = ("initdb", "pg_ctl", "postgres", "psql")
SYSTEM_USER = "postgres"  # the account the server runs as when we are root
DB_USER = "postgres"      # the database superuser initdb creates
# Durability against a crash of the *machine* is not what tests check; against a crash of the
# server process it stays intact (every commit is still written to the kernel before it returns).
DEFAULT_SETTINGS = {
    "fsync": "off",
    "full_page_writes": "off",
    "max_connections": "200",
}
_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


class PostgresUnavailable(RuntimeError):
    """The PostgreSQL server binaries (or, as root, the postgres user) are missing here."""


# --- finding the binaries ----------------------------------------------------------------------------

def _has_tools(directory: Path) -> bool:
    return all((directory / name).is_file() for name in SERVER_TOOLS)


def _version_key(directory: Path) -> tuple:
    """/usr/lib/postgresql/15/bin -> (15,), 9.6 -> (9, 6): for picking the newest."""
    return tuple(int(part) for part in re.findall(r"\d+", directory.parent.name)) or (0,)


def find_bindir() -> Path | None:
    """The directory with initdb, pg_ctl, postgres and psql, or None.

    ``$HL7BRIDGE_PG_BINDIR`` first, then ``pg_config --bindir`` (on Debian, pg_config may belong to
    libpq-dev alone, so its answer is only taken when the server is there), then the newest
    /usr/lib/postgresql/*/bin.
    """
    override = os.environ.get("HL7BRIDGE_PG_BINDIR")
    if override:
        return Path(override) if _has_tools(Path(override)) else None
    if shutil.which("pg_config"):
        done = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True, check=False)
        candidate = Path(done.stdout.strip())
        if done.returncode == 0 and _has_tools(candidate):
            return candidate
    found = [d for d in Path("/usr/lib/postgresql").glob("*/bin") if _has_tools(d)]
    return max(found, key=_version_key) if found else None


def missing_reason() -> str | None:
    """Why a private PostgreSQL cannot run here, or None when it can."""
    if find_bindir() is None:
        where = os.environ.get("HL7BRIDGE_PG_BINDIR") or "pg_config --bindir nor /usr/lib/postgresql/*/bin"
        return (f"PostgreSQL server binaries ({', '.join(SERVER_TOOLS)}) not found in {where}; "
                "apt-get install postgresql (or make test as root)")
    if os.geteuid() == 0:
        if shutil.which("runuser") is None:
            return "running as root, and runuser (util-linux) is missing: initdb refuses to run as root"
        if not _user_exists(SYSTEM_USER):
            return (f"running as root, and there is no {SYSTEM_USER!r} system user to run initdb as "
                    "(the Debian postgresql package creates it)")
    return None


def _user_exists(name: str) -> bool:
    import pwd

    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


def default_parent() -> Path:
    """Where the server's directory goes: ``$HL7BRIDGE_PG_TMPDIR``, else /dev/shm when it is a
    writable memory file system with 1 GiB free, else the system temp dir.

    Measured on a 2-core CI machine with another test run beside it: a fresh database took a
    median 38 ms in /dev/shm and 340 ms on the disk (fsync is off, but the writes still wait on
    ext4), and the server started in 0.9 s instead of 2.4 s. Memory survives a server crash
    just as well, which is all the tests need.
    """
    override = os.environ.get("HL7BRIDGE_PG_TMPDIR")
    if override:
        return Path(override)
    shm = Path("/dev/shm")
    try:
        stat = os.statvfs(shm)
        if os.access(shm, os.W_OK) and stat.f_bavail * stat.f_frsize >= 1 << 30:
            return shm
    except OSError:
        pass
    return Path(tempfile.gettempdir())


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --- the server --------------------------------------------------------------------------------------

class PostgresServer:
    """A private PostgreSQL cluster in a temporary directory, listening on 127.0.0.1.

    ``start()`` runs initdb the first time; ``stop()`` (``pg_ctl -m immediate stop``, as a crash
    would) keeps the data and the port so ``start()`` comes back on the same URL; ``close()`` stops
    and removes the directory.  A context manager: ``with PostgresServer() as pg: ...``.
    """

    def __init__(self, port: int = 0, settings: dict | None = None, startup_timeout: float = 60.0,
                 parent: Path | str | None = None):
        self.port = port
        self.parent = Path(parent) if parent is not None else default_parent()
        self.settings = {**DEFAULT_SETTINGS, **(settings or {})}
        self.startup_timeout = startup_timeout
        self.bindir: Path | None = None
        self.directory: Path | None = None  # holds data/, the log and the Unix socket
        self.startup_seconds: float | None = None
        self._running = False
        self._names = itertools.count(1)

    # paths and URLs

    @property
    def data_dir(self) -> Path:
        return self.directory / "data"

    @property
    def log_path(self) -> Path:
        return self.directory / "postgres.log"

    @property
    def socket_dir(self) -> Path:
        return self.directory

    @property
    def url(self) -> str:
        """``postgresql://postgres@127.0.0.1:PORT/postgres``."""
        return self.url_for("postgres")

    def url_for(self, database: str) -> str:
        """The URL of one database of this server."""
        return f"postgresql://{DB_USER}@127.0.0.1:{self.port}/{database}"

    @property
    def running(self) -> bool:
        return self._running

    # lifecycle

    def _as_owner(self) -> list[str]:
        """The prefix that runs a server tool as the data directory's owner."""
        return ["runuser", "-u", SYSTEM_USER, "--"] if os.geteuid() == 0 else []

    def _tool(self, name: str, *args, timeout: float = 60.0) -> subprocess.CompletedProcess:
        """Run initdb/pg_ctl (as postgres when we are root), from our directory; raise with its output."""
        command = [*self._as_owner(), str(self.bindir / name), *map(str, args)]
        done = subprocess.run(command, cwd=self.directory, capture_output=True, text=True,
                              timeout=timeout, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed (exit {done.returncode}):\n"
                               f"{done.stdout[-2000:]}{done.stderr[-2000:]}\n{self.log_text()[-3000:]}")
        return done

    def _init(self) -> None:
        reason = missing_reason()
        if reason:
            raise PostgresUnavailable(reason)
        self.bindir = find_bindir()
        self.directory = Path(tempfile.mkdtemp(prefix="hl7bridge-pg-", dir=self.parent))
        _LIVE.add(self)
        if os.geteuid() == 0:
            shutil.chown(self.directory, SYSTEM_USER, SYSTEM_USER)
            # The postgres user must reach the directory: fail clearly when the temp dir hides it.
            check = subprocess.run([*self._as_owner(), "test", "-w", str(self.directory)], check=False)
            if check.returncode != 0:
                raise RuntimeError(f"the {SYSTEM_USER} user cannot write {self.directory}: set "
                                   "HL7BRIDGE_PG_TMPDIR to a directory every user can reach (such as /tmp)")
        self._tool("initdb", "-D", self.data_dir, "--auth=trust", f"--username={DB_USER}",
                   "--encoding=UTF8", "--no-locale", "--no-sync")

    def _write_settings(self) -> None:
        """Port, addresses and settings in postgresql.auto.conf (read after postgresql.conf)."""
        lines = {**self.settings, "port": str(self.port), "listen_addresses": "'127.0.0.1'",
                 "unix_socket_directories": f"'{self.socket_dir}'"}
        # Overwriting keeps the file's owner (postgres when we are root).
        with open(self.data_dir / "postgresql.auto.conf", "w") as conf:
            conf.write("# written by tests/pgserver.py\n")
            conf.writelines(f"{key} = {value}\n" for key, value in lines.items())

    def start(self) -> PostgresServer:
        """initdb (the first time) and ``pg_ctl start -w``; returns self."""
        if self._running:
            raise RuntimeError("PostgreSQL already running")
        began = time.monotonic()
        if self.directory is None:
            self._init()
        chosen = self.port
        for attempt in range(3):  # a free port may be taken between free_port() and the bind
            if not chosen:
                self.port = free_port()
            self._write_settings()
            try:
                self._tool("pg_ctl", "-D", self.data_dir, "-l", self.log_path, "-w",
                           "-t", int(self.startup_timeout), "start", timeout=self.startup_timeout + 10)
                break
            except RuntimeError:
                if chosen or attempt == 2 or "could not bind" not in self.log_text():
                    raise
        self._running = True
        self.startup_seconds = time.monotonic() - began
        return self

    def stop(self, mode: str = "immediate") -> None:
        """``pg_ctl -m MODE stop`` (immediate: no checkpoint, as a crash; or "fast", "smart")."""
        if self._running:
            self._running = False
            self._tool("pg_ctl", "-D", self.data_dir, "-m", mode, "-w", "stop")

    def restart(self, mode: str = "immediate") -> PostgresServer:
        self.stop(mode)
        return self.start()

    def close(self) -> None:
        """Stop and remove the directory (data, log, socket)."""
        try:
            self.stop()
        finally:
            if self.directory is not None:
                shutil.rmtree(self.directory, ignore_errors=True)
                self.directory = None
            _LIVE.discard(self)

    def __enter__(self) -> PostgresServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    def log_text(self) -> str:
        """The server's log so far ('' before the first start)."""
        try:
            return self.log_path.read_text(errors="replace")
        except (OSError, TypeError):
            return ""

    # SQL, through psql over the Unix socket (so this module needs no driver)

    def sql(self, statement: str, database: str = "postgres") -> str:
        """Run SQL with psql as the superuser; the rows as text (``|`` between columns), stripped."""
        command = [str(self.bindir / "psql"), "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1",
                   "-h", str(self.socket_dir), "-p", str(self.port), "-U", DB_USER, "-d", database,
                   "-c", statement]
        done = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"psql -c {statement!r} on {database} failed: {done.stderr.strip()}")
        return done.stdout.strip()

    def create_database(self, name: str | None = None, template: str = "template1") -> str:
        """A new database (copied from ``template``); returns its URL.

        ``name`` defaults to ``test_<n>``; it must be a plain lower-case identifier.  To give many
        tests the same starting point, fill a database once and pass it as ``template``: copying it
        is cheaper than building it again (nothing may be connected to it while it is copied).
        """
        if name is None:
            name = f"test_{next(self._names)}"
        for identifier in (name, template):
            if not _NAME.match(identifier):
                raise ValueError(f"not a plain database name: {identifier!r}")
        # The default strategy: measured here, STRATEGY FILE_COPY (which checkpoints) was no faster.
        self.sql(f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
        return self.url_for(name)

    def drop_database(self, name: str) -> None:
        """Drop a database, ending any session still connected to it."""
        if not _NAME.match(name):
            raise ValueError(f"not a plain database name: {name!r}")
        self.sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def databases(self) -> list[str]:
        """Names of the databases that are not templates."""
        return self.sql("SELECT datname FROM pg_database WHERE NOT datistemplate ORDER BY 1").splitlines()


_LIVE: weakref.WeakSet = weakref.WeakSet()


@atexit.register
def _close_live_servers() -> None:
    """pg_ctl detaches the server from us: stop any left running when the test process ends."""
    for server in list(_LIVE):
        server.close()


# --- pytest fixtures ----------------------------------------------------------------------------------

def start_or_skip(server: PostgresServer) -> PostgresServer:
    """``server.start()``; skip the test when PostgreSQL is missing here (fail if HL7BRIDGE_REQUIRE_POSTGRES=1)."""
    import pytest

    try:
        return server.start()
    except PostgresUnavailable as err:
        server.close()
        if os.environ.get("HL7BRIDGE_REQUIRE_POSTGRES") == "1":
            pytest.fail(f"HL7BRIDGE_REQUIRE_POSTGRES=1 but {err}")
        pytest.skip(f"PostgreSQL unavailable: {err}")


def _database_name(test_name: str) -> str:
    """A database name from a test's name: t<n>_<test name>, lower case, at most 63 characters."""
    slug = re.sub(r"[^a-z0-9_]+", "_", test_name.lower()).strip("_")
    return f"t{next(_test_numbers)}_{slug}"[:63]


_test_numbers = itertools.count(1)


def _fixtures():
    import pytest

    @pytest.fixture(scope="session")
    def postgres_server():
        """One PostgresServer for the whole run (started on first use), removed at the end."""
        server = PostgresServer()
        try:
            start_or_skip(server)
            yield server
        finally:
            server.close()

    @pytest.fixture
    def postgres_url(postgres_server, request):
        """The URL of a fresh, empty database for this test, dropped after it."""
        name = _database_name(request.node.name)
        url = postgres_server.create_database(name)
        yield url
        if postgres_server.running:  # a test may have stopped the server
            postgres_server.drop_database(name)

    return postgres_server, postgres_url


try:  # the fixtures exist only where pytest does; the rest of this module needs just the stdlib
    import pytest as _pytest  # noqa: F401
except ImportError:  # pragma: no cover
    pass
else:
    postgres_server, postgres_url = _fixtures()


if __name__ == "__main__":  # python tests/pgserver.py: start one, print the URL, Ctrl-C stops
    import contextlib

    with PostgresServer() as pg:
        print(f"{pg.url} (log {pg.log_path}, started in {pg.startup_seconds:.2f} s); Ctrl-C stops", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            while True:
                time.sleep(1)
