"""``hl7bridge serve``: wires settings, journal, listeners, workers and logging to the reactor.

This is the edge where the global reactor is used (``run``); everything below takes a clock or a
reactor as a parameter, and blocking work runs in threads this package owns and hands down:

    Engine
      writer       JournalWriter: the journal's write connections, its thread, checkpoints (writer.py)
      supervisor   Supervisor: the text indexer and converter processes (supervisor.py)
      status       EngineStatus: what /metrics, /readyz and the dashboard read (status.py)
      committer    GroupCommit over the Ingestor (engine.mllp), mapping before the ACK in processes
                   (mapping.py) that a thread pool waits on
      dispatcher   Dispatcher (engine.delivery), file writes in a thread pool
      scheduler    Scheduler: jobs that run on one node of a cluster at a time (scheduler.py)

May import every package; nothing imports it but ``engine.cli``.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

from twisted.internet import defer, ssl, task, threads
from twisted.internet.endpoints import serverFromString
from twisted.logger import (
    FilteringLogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    Logger,
    globalLogBeginner,
    textFileLogObserver,
)
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.threadpool import ThreadPool
from twisted.web.server import Site

from ..config import CONFIG_FILE, ListenerSettings, Settings, TlsSettings
from ..delivery.dispatcher import Dispatcher
from ..errors import ConfigError
from ..mllp.ingest import Ingestor
from ..mllp.listener import Counters, GroupCommit, MLLPServerFactory
from ..ops.metrics import Histogram
from ..ops.webapi import site_root
from ..reconcile import report as reconcile_report
from ..store import Journal, open_journal
from ..transform.converter import JOURNAL_VARIABLE
from ..transform.project import Project
from .mapping import MappingProcesses
from .status import EngineStatus
from .scheduler import Scheduler
from .supervisor import Supervisor
from .writer import JournalWriter

log = Logger(namespace="hl7bridge.serve")
STATS_INTERVAL = 60.0
TEXT_INDEX_INTERVAL = 0.5  # how stale free-text search may get, in seconds
GIL_SWITCH_INTERVAL = 0.0005
CHECKPOINT_INTERVAL = 0.5  # how often the writer copies the WAL back, between batches
MAPPING_THREADS = 2  # mapping before the ACK (ack.after: mapping routes)
FILE_THREADS = 4  # file destinations' appends and fsyncs (a destination's 4 in flight share an fsync)
REPORT_CHECK = 900.0  # how often the daily reconcile report job looks whether a report is due
_PEM_CERT = re.compile(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.DOTALL)


def tls_options(tls: TlsSettings) -> ssl.CertificateOptions:
    """Server TLS options; with ``client_ca`` the peer must present a certificate that CA signed."""
    certs = _PEM_CERT.findall(tls.certificate.read_bytes())
    if not certs:
        raise ValueError(f"{tls.certificate} holds no PEM certificate")
    leaf = ssl.PrivateCertificate.loadPEM(certs[0] + b"\n" + tls.private_key.read_bytes())
    chain = [ssl.Certificate.loadPEM(pem).original for pem in certs[1:]]
    kwargs = {}
    if tls.client_ca is not None:
        cas = [ssl.Certificate.loadPEM(pem).original for pem in _PEM_CERT.findall(tls.client_ca.read_bytes())]
        if not cas:
            raise ValueError(f"{tls.client_ca} holds no PEM certificate")
        kwargs = {"verify": True, "caCerts": cas, "requireCertificate": True}
    return ssl.CertificateOptions(
        privateKey=leaf.privateKey.original,
        certificate=leaf.original,
        extraCertChain=chain or None,
        **kwargs,
    )


def maps_before_ack(project: Project) -> bool:
    """Whether any route ACKs after mapping (only then are mapping processes worth starting)."""
    return any(route.ack_after == "mapping" for route in project.routes)


class Engine:
    """The running engine: the journal writer, the helper processes, one group committer, the
    dispatcher, any number of MLLP listeners, and the status the operator's pages read."""

    def __init__(self, settings: Settings, reactor, journal: Journal | None = None, project: Project | None = None):
        self.settings = settings
        self.reactor = reactor
        self.writer = JournalWriter(reactor, journal or open_journal(
            settings.journal_location, settings.journal_synchronous, manual_checkpoints=True))
        self.project = project
        self.node = settings.node_name
        location = self.writer.journal.location
        # The helpers get the journal's location in their environment: a URL's password stays
        # out of the process list.
        worker_env = {**os.environ, JOURNAL_VARIABLE: location}
        self.supervisor = Supervisor(reactor)
        if self.writer.journal.indexes_text_apart:
            self.supervisor.add("text indexer", "engine.store.textindexer", location,
                                "--interval", str(TEXT_INDEX_INTERVAL), "--parent", str(os.getpid()))
        # Converter processes (mapping for ack.after: commit routes), one per core by default:
        # they share the work through their claims (per-key order: engine.delivery.outbox).
        self.converters = [f"converter-{n}" for n in range(1, settings.converters + 1)] if project is not None else []
        for name in self.converters:
            self.supervisor.add(name, "engine.transform.converter", "-",
                                "--config", str(project.given or project.directory), "--parent", str(os.getpid()),
                                "--worker", f"{self.node}/{name}", "--nice", str(settings.converter_nice),
                                env=worker_env)
        # Where the PID and reload-verdict files go: beside a journal file; for a database, in
        # var/ of the config directory, named after the node.
        self.state_path = state_path(settings, self.writer.journal)
        # Mapping before the ACK (ack.after: mapping routes): a thread of _mapping waits for each,
        # the conversion runs in these processes (engine.serve.mapping), off the engine's GIL.
        self.mapping_processes = (MappingProcesses(project.given or project.directory, MAPPING_THREADS)
                                  if project is not None else None)
        self.ingestor = Ingestor(self.writer.journal, project=project, unrouted=settings.unrouted,
                                 mapper=self.mapping_processes.convert if self.mapping_processes else None)
        self.counters = Counters()
        # Blocking work the reactor hands off: mapping before the ACK, and file destinations.
        self._mapping = ThreadPool(minthreads=0, maxthreads=MAPPING_THREADS, name="hl7bridge-mapping")
        self._files = ThreadPool(minthreads=0, maxthreads=FILE_THREADS, name="hl7bridge-file-destinations")
        self.committer = GroupCommit(
            self.ingestor, reactor, self.counters,
            run_commit=self.writer.write,
            checkpoint_interval=CHECKPOINT_INTERVAL,
            run_mapping=self._in(self._mapping),
        )
        # Outbox bookkeeping commits without waiting for the disk (see engine.serve.writer), on
        # the writer thread, so the two connections never wait for each other's lock.
        self.dispatcher = Dispatcher(
            reactor, self.writer.bookkeeping, project.destinations if project is not None else {},
            write=self.writer.write, run_blocking=self._in(self._files), worker=self.node, lease=settings.lease,
        )
        self.scheduler = Scheduler(reactor, self.writer.bookkeeping, self.writer.write, self.node)
        if settings.retention is not None:
            self.schedule("retention", settings.retention[2], self._apply_retention)
        if settings.reconcile.report is not None:
            self.schedule("reconcile-report", REPORT_CHECK, self._reconcile_report)
        self.ports = []
        self.metrics_port = None
        self.stopping = False
        self.ack_latency = Histogram()
        self.frames_by_listener: dict[str, int] = {}
        self.status = EngineStatus(self)
        self._stats = task.LoopingCall(self._log_stats)
        self._stats.clock = reactor
        self._last_frames = 0
        self.reloads = {"ok": 0, "refused": 0}  # since start, for /metrics
        self.last_reload: dict | None = None
        self.factories: list[tuple[ListenerSettings, MLLPServerFactory]] = []
        self.bound: dict[str, str] = {}  # listener name -> host:port it listens on

    def schedule(self, name: str, every: float, job, lease: float | None = None):
        """Run ``job()`` (a Deferred or a value) every ``every`` seconds on one node of the cluster
        at a time, once per period across the cluster (``engine.serve.scheduler``). Jobs scheduled
        before ``start`` begin with it."""
        return self.scheduler.schedule(name, every, job, **({"lease": lease} if lease else {}))

    def _in(self, pool: ThreadPool):
        """A ``run(fn, *args) -> Deferred`` that runs in ``pool``."""
        return lambda fn, *args: threads.deferToThreadPool(self.reactor, pool, fn, *args)

    @defer.inlineCallbacks
    def start(self):
        """Listen on every configured endpoint; fires with [(name, host, port)] or fails clearly."""
        bound = []
        for listener in self.settings.listeners:
            port = yield self._listen(listener)
            self.ports.append(port)
            address = port.getHost()
            bound.append((listener.name, address.host, address.port))
            self.bound[listener.name] = f"{address.host}:{address.port}"
            log.info(
                "listener {name} on {host}:{port} ({kind})",
                name=listener.name, host=address.host, port=address.port,
                kind="mutual TLS" if listener.tls and listener.tls.client_ca else
                "TLS" if listener.tls or listener.endpoint.startswith("ssl:") else "plain TCP",
            )
        if self.settings.metrics_endpoint:
            self.metrics_port = yield self._listen_metrics()
            address = self.metrics_port.getHost()
            bound.append(("metrics", address.host, address.port))
        self._stats.start(STATS_INTERVAL, now=False)
        log.info("journal {journal}, node {node}", journal=self.writer.journal.name, node=self.node)
        for pool in (self._mapping, self._files):
            pool.start()
        if self.mapping_processes is not None and maps_before_ack(self.project):
            self.mapping_processes.start()
        self.status.start()
        self.writer.start()
        if "text indexer" in self.supervisor.workers:
            self.supervisor.workers["text indexer"].start()
        yield self.dispatcher.start()
        self.scheduler.start()
        if self.project is not None:
            for name in self.converters:
                self.supervisor.workers[name].start()
            log.info("{routes} routes loaded from {directory}", routes=len(self.project.routes),
                     directory=str(self.project.directory.resolve()))
        return bound

    def reload(self):
        """Load routes and mappings again; a file that fails leaves the running ones in place.

        The verdict goes to the log, to /metrics and to the reload file beside the journal, where
        ``hl7bridge reload`` waits for it."""
        directory = (self.project.given or self.project.directory) if self.project is not None else self.settings.config_dir
        try:
            project = Project.load(directory)
        except ConfigError as exc:
            log.error("reload refused, the running routes and mappings stay: {error}", error=str(exc))
            self._reloaded(False, str(exc))
            return False
        self.project = project
        self.ingestor.project = project
        if self.mapping_processes is not None and maps_before_ack(project):
            self.mapping_processes.reload(directory)
        self.dispatcher.update(project.destinations)
        for name in self.converters:
            self.supervisor.signal(name, "HUP")
        text = (f"{len(project.routes)} routes, {len(project.mappings.messages)} message mappings and "
                f"{len(project.destinations)} destinations from {project.directory.resolve()}")
        log.info("reloaded {what}", what=text)
        self._reloaded(True, text)
        return True

    def _reloaded(self, ok: bool, text: str):
        self.reloads["ok" if ok else "refused"] += 1
        self.last_reload = {"pid": os.getpid(), "sequence": sum(self.reloads.values()),
                            "at": datetime.now(timezone.utc).isoformat(), "ok": ok, "message": text}
        path = reload_file(self.state_path)
        try:
            temporary = path.with_name(path.name + ".tmp")
            temporary.write_text(json.dumps(self.last_reload) + "\n")
            temporary.replace(path)
        except OSError as exc:
            log.warn("cannot write {path}: {error}", path=str(path), error=exc.strerror or str(exc))

    @defer.inlineCallbacks
    def _apply_retention(self):
        """The retention policy, one small batch per writer job so ingest commits go in between."""
        older_than, keep_errors, _ = self.settings.retention
        cutoff = datetime.now(timezone.utc) - timedelta(seconds=older_than)
        journal = self.writer.bookkeeping
        total, last = 0, 0
        while not self.stopping:
            done, last = yield self.writer.write(journal.prune_step, cutoff, keep_errors, last)
            if not done:
                break
            total += done
        if total:
            yield self.writer.write(journal.reclaim)
            log.info("retention: pruned {count} messages older than {cutoff}", count=total, cutoff=cutoff.isoformat())

    def _reconcile_report(self):
        """The daily reconcile report (``engine.reconcile.report.write_due``), read in a reader thread."""
        settings = self.settings.reconcile
        erp = self.project.erp_destinations() if self.project is not None else []

        def written(files):
            if files:
                log.info("reconcile: daily report written to {files}", files=", ".join(str(f) for f in files))

        return self.status.read(reconcile_report.write_due, settings, erp, datetime.now(timezone.utc)).addCallback(written)

    def _listen_metrics(self):
        endpoint_text = self.settings.metrics_endpoint
        try:
            endpoint = serverFromString(self.reactor, endpoint_text)
        except (ValueError, TypeError, KeyError) as exc:
            return defer.fail(ValueError(f"metrics: bad endpoint {endpoint_text!r}: {exc}"))
        site = Site(site_root(self.status))
        site.noisy = False
        site.log = lambda request: None  # no access log: a dashboard and a scraper poll every few seconds

        def explain(failure):
            raise RuntimeError(f"metrics: cannot listen on {endpoint_text}: {failure.getErrorMessage()}")

        return endpoint.listen(site).addErrback(explain)

    def _listen(self, listener: ListenerSettings):
        factory = MLLPServerFactory(listener, self.committer, self.settings.policy(listener))
        factory.ack_latency = self.ack_latency
        factory.frames_by_listener = self.frames_by_listener
        self.factories.append((listener, factory))
        try:
            endpoint = serverFromString(self.reactor, listener.endpoint)
        except (ValueError, TypeError, KeyError, OSError) as exc:
            return defer.fail(ValueError(f"listener {listener.name}: bad endpoint {listener.endpoint!r}: {exc}"))
        if listener.tls is not None:
            factory = TLSMemoryBIOFactory(tls_options(listener.tls), False, factory)
        d = endpoint.listen(factory)

        def explain(failure):
            raise RuntimeError(
                f"listener {listener.name}: cannot listen on {listener.endpoint}: {failure.getErrorMessage()}"
            )

        return d.addErrback(explain)

    @defer.inlineCallbacks
    def stop(self):
        """Stop listening, commit what is pending, stop the helpers, close the journal."""
        if self._stats.running:
            self._stats.stop()
        self.stopping = True
        self.scheduler.stop()
        self.writer.stop_checkpoints()
        for port in self.ports:
            yield port.stopListening()
        if self.metrics_port is not None:
            yield self.metrics_port.stopListening()
        yield self.dispatcher.stop()
        yield self.committer.drain()
        for pool in (self._mapping, self._files):
            if pool.started:
                pool.stop()
        if self.mapping_processes is not None:
            self.mapping_processes.stop()
        self.status.stop()
        yield self.writer.stop()
        yield self.supervisor.stop()
        self._log_stats()

    def abandon(self):
        """Start-up failed: release what was opened."""
        for port in self.ports:
            port.stopListening()
        for pool in (self._mapping, self._files):
            if pool.started:
                pool.stop()
        if self.mapping_processes is not None:
            self.mapping_processes.stop()
        self.status.stop()
        self.writer.close()

    def _log_stats(self):
        c = self.counters
        if c.frames == self._last_frames:
            return
        self._last_frames = c.frames
        log.info(
            "{frames} frames: {accepted} accepted, {rejected} rejected, {duplicates} duplicates, "
            "{failures} journal failures, {discarded} bytes outside frames",
            frames=c.frames, accepted=c.accepted, rejected=c.rejected, duplicates=c.duplicates,
            failures=c.journal_failures, discarded=c.discarded_bytes,
        )


def start_logging(level: str, stream=None):
    predicate = LogLevelFilterPredicate(defaultLogLevel=LogLevel.levelWithName(level))
    observer = FilteringLogObserver(textFileLogObserver(stream or sys.stderr), [predicate])
    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)


def dashboard_line(settings: Settings, bound) -> str:
    """Where the dashboard is, or how to turn it on (a newcomer's first question)."""
    metrics = next(((host, port) for name, host, port in bound if name == "metrics"), None)
    if settings.dashboard is not None and metrics is not None:
        how = ("your user name and token" if settings.dashboard.users else "your name and the dashboard token")
        return f"hl7bridge: dashboard on http://{metrics[0]}:{metrics[1]}/dashboard (sign in with {how})"
    where = settings.source or (settings.base / CONFIG_FILE)
    return (f"hl7bridge: dashboard off; to turn it on, put 'dashboard: {{token: \"${{HL7BRIDGE_DASHBOARD_TOKEN}}\"}}' in "
            f"{where}, export HL7BRIDGE_DASHBOARD_TOKEN=$(openssl rand -hex 16) and start again "
            "(examples/hl7bridge.yaml has every option; docs/operations.md, 'The dashboard')")


def state_path(settings: Settings, journal: Journal) -> Path:
    """The path the PID and reload files are named from: the journal file; for a PostgreSQL
    journal, ``var/NODE`` in the config directory (each node of a cluster has its own)."""
    if journal.path is not None:
        return Path(journal.path)
    return (settings.config_dir or settings.base) / "var" / f"{settings.node_name}.journal"


def pid_file(journal_path) -> Path:
    """Where a running engine writes its process ID (beside its journal), for ``hl7bridge reload``."""
    path = Path(journal_path)
    return path.with_name(path.stem + ".pid")


def reload_file(journal_path) -> Path:
    """Where a running engine writes the verdict of its last reload (JSON: pid, sequence, at, ok,
    message), for ``hl7bridge reload`` to wait for."""
    path = Path(journal_path)
    return path.with_name(path.stem + ".reload")


def run(settings: Settings, project: Project | None = None) -> int:
    """Run the engine until SIGINT/SIGTERM; SIGHUP reloads routes and mappings. Returns the exit code."""
    from twisted.internet import reactor

    # The background threads (journal writer, text indexing) do Python work too; by default a
    # thread keeps the GIL for up to 5 ms before handing it over, which showed up as ACK latency.
    sys.setswitchinterval(GIL_SWITCH_INTERVAL)
    start_logging(settings.log_level)
    try:
        engine = Engine(settings, reactor, project=project)
    except OSError as exc:  # the journal's file or database cannot be opened or reached
        print(f"hl7bridge: cannot open the journal: {exc}", file=sys.stderr, flush=True)
        return 3
    exit_code = [0]
    pid_path = pid_file(engine.state_path)
    pid_path.parent.mkdir(parents=True, exist_ok=True)
    stopping = []

    def shut_down(reason: str | None = None):
        """Stop the reactor once: SIGTERM to the whole process group (or Ctrl-C under make)
        reaches the engine more than once, and its helpers exit on the same signal."""
        if stopping:
            return
        stopping.append(reason)
        engine.supervisor.stopping()  # helpers that exit now are not restarted, nor warned about
        if reason:
            log.info("stopping ({reason})", reason=reason)
        reactor.stop()

    def on_signal(number, _frame):
        if not stopping:
            # Only a flag in the handler itself; the rest runs in the reactor thread.
            engine.supervisor.stopping()
            reactor.callFromThread(shut_down, signal.Signals(number).name)

    def install_signals():
        # In place of Twisted's own SIGTERM/SIGINT handlers, which raise ReactorNotRunning when a
        # second signal arrives during shutdown.
        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)

    def started(bound):
        pid_path.write_text(f"{os.getpid()}\n")
        signal.signal(signal.SIGHUP, lambda *_: reactor.callFromThread(engine.reload))
        for name, host, port in bound:
            # One line per listener on stdout, so scripts and tests can find the port.
            kind = "metrics" if name == "metrics" else f"listener {name}"
            print(f"hl7bridge: {kind} ready on {host}:{port}", flush=True)
        print(dashboard_line(settings, bound), flush=True)
        reactor.addSystemEventTrigger("before", "shutdown", engine.stop)
        reactor.addSystemEventTrigger("after", "shutdown", lambda: pid_path.unlink(missing_ok=True))
        reactor.addSystemEventTrigger("after", "shutdown",
                                      lambda: reload_file(engine.state_path).unlink(missing_ok=True))

    def failed(failure):
        print(f"hl7bridge: {failure.getErrorMessage()}", file=sys.stderr, flush=True)
        exit_code[0] = 1
        engine.abandon()
        shut_down()

    reactor.callWhenRunning(install_signals)
    reactor.callWhenRunning(lambda: engine.start().addCallbacks(started, failed))
    reactor.run()
    return exit_code[0]
