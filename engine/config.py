"""Engine settings: embedded defaults, overridden by ``hl7bridge.yaml`` in the config directory.

Every key is documented in ``docs/configuration.md``; unknown keys are rejected with the file, the
line and the closest known key. May import ``engine.hl7``, ``engine.store`` (its synchronous
modes) and the foundation; the listener, ops and serve read it.
"""

from __future__ import annotations

import hmac
import ipaddress
import os
import re
import socket
from dataclasses import dataclass, replace
from pathlib import Path

from .hl7.ack import Identity
from .hl7.charset import codec_for
from .errors import ConfigError
from .hl7.assess import AcceptPolicy
from .hl7.versions import SUPPORTED_VERSIONS
from .reconcile.settings import ReconcileSettings, parse as parse_reconcile
from .store import is_database_url
from .store.base import SYNCHRONOUS_MODES
from .yamlconf import Section, age, expand_env, load_yaml, seconds

CONFIG_FILE = "hl7bridge.yaml"
DEFAULT_ENDPOINT = "tcp:2575:interface=127.0.0.1"
DEFAULT_METRICS_ENDPOINT = "tcp:9102:interface=127.0.0.1"
LOG_LEVELS = ("debug", "info", "warn", "error")


@dataclass(frozen=True)
class TlsSettings:
    """TLS for a ``tcp:`` endpoint; ``client_ca`` turns on mutual TLS (client certificates required)."""

    certificate: Path
    private_key: Path
    client_ca: Path | None = None


@dataclass(frozen=True)
class ListenerSettings:
    """One MLLP listener and its limits."""

    name: str = "mllp"
    endpoint: str = DEFAULT_ENDPOINT
    max_frame_bytes: int = 1024 * 1024
    idle_timeout: float = 300.0
    max_connections: int = 64
    allow_peers: tuple = ()  # ip_network objects; empty allows everyone
    tls: TlsSettings | None = None
    processing_ids: tuple = ("P", "T", "D")
    message_types: tuple = ()  # empty accepts every type

    def peer_allowed(self, host: str) -> bool:
        if not self.allow_peers:
            return True
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            return False
        return any(address in network for network in self.allow_peers)


@dataclass(frozen=True)
class DashboardUser:
    """One operator who may sign in to the dashboard: a name (replays are recorded under it), a
    token of their own, and a role: ``operator`` may replay, ``viewer`` only reads."""

    name: str
    token: str
    role: str = "operator"


@dataclass(frozen=True)
class DashboardSettings:
    """Who may open the dashboard: ``users``, each with their own token; or one shared ``token``
    with which the operator names themself at sign-in."""

    token: str | None = None
    users: tuple = ()

    def user_with_token(self, token: str) -> DashboardUser | None:
        """The user this token belongs to (compared in constant time), or None."""
        found = None
        for user in self.users:
            if hmac.compare_digest(user.token.encode(), token.encode()):
                found = user
        return found


DASHBOARD_ROLES = ("operator", "viewer")
_USER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,59}$")
_ENV_ONLY = re.compile(r"^\$\{[A-Za-z_][A-Za-z0-9_]*\}$")
MIN_TOKEN = 12


@dataclass(frozen=True)
class Settings:
    """Everything ``serve`` needs. ``base`` is the directory relative paths are read from."""

    base: Path = Path(".")
    listeners: tuple = (ListenerSettings(),)
    journal_path: Path = Path("var/journal.db")
    journal_url: str | None = None  # a PostgreSQL journal (postgresql://...) instead of the file
    journal_synchronous: str = "full"
    identity: Identity = Identity()
    default_charset: str = "utf-8"
    log_level: str = "info"
    unrouted: str = "accept"  # what a message no route takes gets: accept (AA, journaled) or reject (AR)
    metrics_endpoint: str | None = DEFAULT_METRICS_ENDPOINT  # /metrics, /healthz, /readyz; None: off
    retention: tuple | None = None  # (older_than seconds, keep_errors, every seconds): prune on a schedule
    dashboard: DashboardSettings | None = None  # serves the dashboard and guards everything but /healthz
    source: Path | None = None  # the file the settings came from, if any
    config_dir: Path | None = None  # where routes/ and mappings/ are read (None: engine.transform.project decides)
    reconcile: ReconcileSettings = ReconcileSettings()  # windows, linking rules, the daily report (engine.reconcile)
    node: str = ""  # this engine's name in the cluster, in its claims ("" : the host name)
    lease: float = 30.0  # seconds a node's claim on a delivery or a job lasts unless renewed
    converter_workers: int = 0  # converter processes (conversion.workers); 0: one per core
    converter_nice: int = 19  # how much lower the converters' priority is than the engine's (conversion.nice)

    @property
    def converters(self) -> int:
        """How many converter processes ``serve`` runs: ``conversion.workers``, else one per core."""
        return self.converter_workers or cores()

    @property
    def journal_location(self) -> str:
        """What the engine opens: the PostgreSQL URL when there is one, else the file."""
        return self.journal_url or str(self.journal_path)

    @property
    def node_name(self) -> str:
        """The node's name in its claims: ``cluster.node``, else the host name."""
        return self.node or socket.gethostname()

    def policy(self, listener: ListenerSettings) -> AcceptPolicy:
        """The ingest policy of one listener."""
        return AcceptPolicy(
            processing_ids=frozenset(listener.processing_ids),
            versions=SUPPORTED_VERSIONS,
            message_types=frozenset(listener.message_types) or None,
            default_charset=self.default_charset,
            identity=self.identity,
        )


# Every key each part of hl7bridge.yaml may have (docs/configuration.md documents them all).
KEYS = {
    "settings": {"listeners", "journal", "identity", "charset", "logging", "routing", "metrics", "dashboard", "cluster",
                 "conversion", "reconcile"},
    "listener": {
        "name", "endpoint", "max_frame_bytes", "idle_timeout", "max_connections", "allow_peers", "tls",
        "processing_ids", "message_types",
    },
    "tls": {"certificate", "private_key", "client_ca"},
    "journal": {"path", "url", "synchronous", "retention"},
    "retention": {"older_than", "keep_errors", "every"},
    "identity": {"application", "facility"},
    "charset": {"default"},
    "logging": {"level"},
    "routing": {"unrouted"},
    "metrics": {"endpoint", "enabled"},
    "dashboard": {"token", "users"},
    "dashboard_user": {"name", "token", "role"},
    "cluster": {"node", "lease"},
    "conversion": {"workers", "nice"},
}
MAX_CONVERTERS = 64


def cores() -> int:
    """The cores this process may run on (its CPU affinity), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)
_NODE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")


def load_settings(config_dir: str | Path | None = None) -> Settings:
    """Settings from ``config_dir/hl7bridge.yaml`` when it exists, else the embedded defaults."""
    if config_dir is None:
        return Settings()
    base = Path(config_dir)
    if not base.is_dir():
        raise ConfigError(f"config directory {base} does not exist")
    path = base / CONFIG_FILE
    if not path.exists():
        return Settings(base=base, config_dir=base)
    data = load_yaml(path)
    top = Section(data, path, "settings", KEYS["settings"])

    def section(name):
        return Section(top.data.get(name), path, name, KEYS[name], top.line(name))

    journal, identity, charset, logging, routing, metrics, dashboard, cluster, conversion = (
        section(n) for n in ("journal", "identity", "charset", "logging", "routing", "metrics", "dashboard", "cluster",
                             "conversion")
    )
    workers = conversion.data.get("workers", "cores")
    if workers == "cores":
        workers = 0
    elif isinstance(workers, bool) or not isinstance(workers, int) or not 1 <= workers <= MAX_CONVERTERS:
        raise conversion.error("workers", f"{workers!r} is not a number of converter processes",
                               f"cores (one per core, the default) or a number from 1 to {MAX_CONVERTERS}")
    nice = conversion.data.get("nice", 19)
    if isinstance(nice, bool) or not isinstance(nice, int) or not 0 <= nice <= 19:
        raise conversion.error("nice", f"{nice!r} is not a nice value", "a number from 0 (the engine's own "
                               "priority) to 19 (the lowest, the default)")
    node = cluster.get("node", str, "")
    if node and not _NODE_NAME.match(node):
        raise cluster.error("node", f"{node!r} is not a usable node name", "letters, digits and . _ - (at most 63)")
    try:
        lease = seconds(cluster.data.get("lease", "30s"), "lease")
    except ValueError as exc:
        raise cluster.error("lease", str(exc)) from None
    if lease < 3:
        raise cluster.error("lease", f"must be 3 seconds or more, not {lease:g}",
                            "a node renews its claims every third of it; 30s is the default")
    dashboard_settings = _dashboard(dashboard, path)

    default_charset = charset.get("default", str, "utf-8")
    if codec_for(default_charset) is None:
        raise charset.error("default", f"{default_charset!r} is not a known HL7 character set",
                            "use a table 0211 value such as UNICODE UTF-8, 8859/1 or ASCII")
    listeners_data = top.get("listeners", list, None)
    listeners = (ListenerSettings(),)
    if listeners_data is not None:
        listeners = tuple(_listener(item, path, base, i) for i, item in enumerate(listeners_data, 1))
        if not listeners:
            raise top.error("listeners", "needs at least one listener")
        names = [listener.name for listener in listeners]
        if len(set(names)) != len(names):
            raise top.error("listeners", "listener names must be unique")
    retention = None
    if journal.data.get("retention") is not None:
        policy = Section(journal.data["retention"], path, "journal.retention", KEYS["retention"], journal.line("retention"))
        if policy.data.get("older_than") is None:
            raise policy.error("older_than", "is required", "e.g. 90d")
        try:
            older_than = age(policy.data["older_than"], "older_than")
        except ValueError as exc:
            raise policy.error("older_than", str(exc)) from None
        try:
            retention = (older_than, policy.get("keep_errors", bool, True), seconds(policy.data.get("every", "1h"), "every"))
        except ValueError as exc:
            raise policy.error("every", str(exc)) from None
    reconcile = parse_reconcile(top.data.get("reconcile"), path, top.line("reconcile"), base)
    journal_url = expand_env(journal.get("url", str, None), journal, "url")
    if journal_url is not None and not is_database_url(journal_url):
        raise journal.error("url", "is not a PostgreSQL URL", "postgresql://USER:${PASSWORD}@HOST:5432/DATABASE")
    if journal_url is not None and journal.data.get("path") is not None:
        raise journal.error("url", "goes without journal.path", "the journal is either a file or a database")
    return Settings(
        reconcile=reconcile,
        retention=retention,
        journal_url=journal_url,
        dashboard=dashboard_settings,
        base=base,
        listeners=listeners,
        journal_path=base / journal.get("path", str, "var/journal.db"),
        journal_synchronous=journal.choice("synchronous", SYNCHRONOUS_MODES, "full"),
        identity=Identity(
            identity.get("application", str, "HL7BRIDGE"), identity.get("facility", str, "HL7BRIDGE")
        ),
        default_charset=codec_for(default_charset),
        log_level=logging.choice("level", LOG_LEVELS, "info"),
        unrouted=routing.choice("unrouted", ("accept", "reject"), "accept"),
        metrics_endpoint=(metrics.get("endpoint", str, DEFAULT_METRICS_ENDPOINT)
                          if metrics.get("enabled", bool, True) else None),
        source=path,
        config_dir=base,
        node=node,
        lease=lease,
        converter_workers=workers,
        converter_nice=nice,
    )


def _dashboard(section: Section, path: Path) -> DashboardSettings | None:
    """``dashboard``: one shared ``token``, or ``users`` each with their own (not both)."""
    token = expand_env(section.get("token", str, None), section, "token")
    if token is not None and len(token) < MIN_TOKEN:
        raise section.error("token", "is too short", "use at least 12 characters, e.g. from: openssl rand -hex 16")
    items = section.get("users", list, None)
    if items is None:
        return DashboardSettings(token=token) if token else None
    if token is not None:
        raise section.error("users", "goes without dashboard.token",
                            "with users, each signs in with their own token: remove dashboard.token "
                            "(or give its holder a user entry)")
    if not items:
        raise section.error("users", "needs at least one user", "e.g. - {name: alice, token: \"${HL7BRIDGE_TOKEN_ALICE}\"}")
    users = []
    for number, item in enumerate(items, 1):
        user = Section(item, path, f"dashboard.users[{number}]", KEYS["dashboard_user"],
                       getattr(item, "line", 0) or section.line("users"))
        name = user.get("name", str, None)
        variable = "HL7BRIDGE_TOKEN_" + re.sub(r"[^A-Z0-9]", "_", (name or "NAME").upper())
        if not name:
            raise user.error("name", "is required", "the name replays are recorded under, e.g. alice")
        if not _USER_NAME.match(name):
            raise user.error("name", f"{name!r} is not a usable name", "letters, digits and . _ @ - (at most 60)")
        if any(other.name == name for other in users):
            raise user.error("name", f"{name!r} is listed twice", "list each user once")
        raw = user.get("token", str, None)
        if raw is None:
            raise user.error("token", "is required", f"write token: ${{{variable}}}")
        if not _ENV_ONLY.match(raw.strip()):
            raise user.error("token", "must come from the environment, not be written in the file",
                             f"write token: ${{{variable}}} and export {variable}=$(openssl rand -hex 16) before starting")
        value = expand_env(raw.strip(), user, "token")
        if len(value) < MIN_TOKEN:
            raise user.error("token", f"of {name} is too short", "use at least 12 characters, e.g. from: openssl rand -hex 16")
        twin = next((other.name for other in users if other.token == value), None)
        if twin is not None:
            raise user.error("token", f"of {name} is the same as {twin}'s", "give each user a token of their own")
        users.append(DashboardUser(name, value, user.choice("role", DASHBOARD_ROLES, "operator")))
    return DashboardSettings(users=tuple(users))


# Arguments of an ssl: endpoint that name files (Twisted's serverFromString).
SSL_FILE_ARGUMENTS = ("privateKey", "certKey", "extraCertChain", "caCertsDir", "dhParameters")


def _split_endpoint(text: str) -> list[str]:
    """An endpoint string's colon-separated parts; ``\\:`` is a literal colon, as Twisted reads it."""
    parts, current, escaped = [], "", False
    for char in text:
        if escaped:
            current += "\\" + char
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == ":":
            parts.append(current)
            current = ""
        else:
            current += char
    parts.append(current + ("\\" if escaped else ""))
    return parts


def resolve_ssl_paths(endpoint: str, base: Path) -> tuple[str, list[tuple[str, Path]]]:
    """An ``ssl:`` endpoint with its relative file arguments read from ``base`` (the config
    directory), like every other path in hl7bridge.yaml; returns the endpoint and [(argument, file)].

    Other endpoints come back unchanged.
    """
    if not endpoint.startswith("ssl:"):
        return endpoint, []
    parts = _split_endpoint(endpoint)
    files = []
    for index, part in enumerate(parts[1:], start=1):
        key, equals, value = part.partition("=")
        if not equals or key not in SSL_FILE_ARGUMENTS or not value:
            continue
        file = Path(value.replace("\\:", ":"))
        if not file.is_absolute():
            file = base / file
        files.append((key, file))
        parts[index] = f"{key}={str(file).replace(':', chr(92) + ':')}"
    return ":".join(parts), files


def _listener(data, path, base: Path, number: int) -> ListenerSettings:
    line = data.line if hasattr(data, "line") else 0
    section = Section(data, path, f"listeners[{number}]", KEYS["listener"], line)
    endpoint, ssl_files = resolve_ssl_paths(section.get("endpoint", str, DEFAULT_ENDPOINT), base)
    for key, file in ssl_files:
        if not file.exists():
            raise section.error("endpoint", f"{key} file {file} does not exist",
                                "relative paths are read from the directory of hl7bridge.yaml")
    networks = []
    for item in section.strings("allow_peers", []):
        try:
            networks.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            raise section.error("allow_peers", f"{item!r} is not an IP address or network",
                                "write 127.0.0.1 or 10.0.0.0/8") from None
    tls = None
    if section.data.get("tls") is not None:
        tls_section = Section(section.data["tls"], path, f"listeners[{number}].tls",
                              KEYS["tls"], section.line("tls"))
        if not endpoint.startswith("tcp:"):
            raise section.error("tls", "goes with a tcp: endpoint",
                                "use endpoint tcp:PORT with tls:, or an ssl: endpoint without it")
        files = {}
        for key in ("certificate", "private_key", "client_ca"):
            value = tls_section.get(key, str, None)
            if value is None:
                if key != "client_ca":
                    raise tls_section.error(key, "is required")
                continue
            file = base / value
            if not file.exists():
                raise tls_section.error(key, f"file {file} does not exist")
            files[key] = file
        tls = TlsSettings(**files)
    processing_ids = section.strings("processing_ids", ["P", "T", "D"])
    for value in processing_ids:
        if value not in ("P", "T", "D"):
            raise section.error("processing_ids", f"{value!r} is not in HL7 table 0103", "use P, T or D")
    return ListenerSettings(
        name=section.get("name", str, f"listener-{number}"),
        endpoint=endpoint,
        max_frame_bytes=section.positive("max_frame_bytes", int, 1024 * 1024),
        idle_timeout=section.positive("idle_timeout", float, 300.0),
        max_connections=section.positive("max_connections", int, 64),
        allow_peers=tuple(networks),
        tls=tls,
        processing_ids=tuple(processing_ids),
        message_types=tuple(section.strings("message_types", [])),
    )


def with_overrides(settings: Settings, listen: tuple = (), journal: str | None = None, node: str | None = None) -> Settings:
    """Apply command-line options: ``--listen`` replaces the endpoints, ``--journal`` the path,
    ``--node`` the node's name."""
    if listen:
        template = settings.listeners[0]
        listeners = tuple(
            replace(template, name=f"listen-{i}" if len(listen) > 1 else template.name, endpoint=endpoint, tls=None)
            for i, endpoint in enumerate(listen, 1)
        )
        settings = replace(settings, listeners=listeners)
    if journal and is_database_url(journal):
        settings = replace(settings, journal_url=journal)
    elif journal:
        settings = replace(settings, journal_path=Path(journal), journal_url=None)
    if node:
        if not _NODE_NAME.match(node):
            raise ConfigError(f"--node {node!r} is not a usable node name: letters, digits and . _ - (at most 63)")
        settings = replace(settings, node=node)
    return settings

