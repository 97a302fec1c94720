"""``hl7bridge serve``: wires settings, journal, listeners and logging to the reactor.

This is the edge where the global reactor is used; everything below takes a clock or a reactor
as a parameter.
"""

from __future__ import annotations

import os
import re
import signal
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

from twisted.internet import defer, protocol, ssl, task, threads
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
from twisted.web.server import Site
from twisted.python.threadpool import ThreadPool

from .config import ListenerSettings, Settings, TlsSettings
from .mllp.ingest import Ingestor
from .delivery.dispatcher import Dispatcher
from .store import retention
from .ops.metrics import Histogram
from .ops.webapi import site_root
from .errors import ConfigError
from .store.journal import Checkpointer, Journal
from .transform.project import Project
from .mllp.listener import Counters, GroupCommit, MLLPServerFactory

log = Logger(namespace="hl7bridge.serve")
STATS_INTERVAL = 60.0
CHECKPOINTER_INTERVAL = 0.5  # the background checkpoint that does the bulk of the copying
TEXT_INDEX_INTERVAL = 0.5  # how stale free-text search may get, in seconds
WORKER_RESTART_DELAY = 5.0
GIL_SWITCH_INTERVAL = 0.0005
CHECKPOINT_INTERVAL = 0.5  # how often the writer copies the WAL back, between batches
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


class Engine:
    """The running engine: one journal, one group committer, any number of MLLP listeners."""

    def __init__(self, settings: Settings, reactor, journal: Journal | None = None, project: Project | None = None):
        self.settings = settings
        self.reactor = reactor
        self.journal = journal or Journal(
            settings.journal_path, settings.journal_synchronous, manual_checkpoints=True
        )
        self.checkpointer = Checkpointer(self.journal.path)
        self._pool = ThreadPool(minthreads=1, maxthreads=1, name="hl7bridge-checkpointer")
        self._checkpointing = None
        self._checkpoint_loop = task.LoopingCall(self._checkpoint)
        self._checkpoint_loop.clock = reactor
        journal_arg = str(self.journal.path)
        self.indexer = WorkerProcess(
            reactor, "text indexer",
            ["engine.store.textindexer", journal_arg, "--interval", str(TEXT_INDEX_INTERVAL), "--parent", str(os.getpid())],
        )
        self.project = project
        config_args = ["--config", str(project.directory)] if project is not None else []
        self.converter = WorkerProcess(reactor, "converter",
                                       ["engine.transform.converter", journal_arg, *config_args, "--parent", str(os.getpid())])
        self.ingestor = Ingestor(self.journal, project=project, unrouted=settings.unrouted)
        self.counters = Counters()
        # One writer thread owns the journal connection: the reactor keeps reading and parsing
        # while a commit waits for the disk.
        self._writer = ThreadPool(minthreads=1, maxthreads=1, name="hl7bridge-journal-writer")
        self.committer = GroupCommit(
            self.ingestor, reactor, self.counters,
            run_commit=lambda fn, *args: threads.deferToThreadPool(reactor, self._writer, fn, *args),
            checkpoint_interval=CHECKPOINT_INTERVAL,
        )
        # Outbox bookkeeping (claims, attempts, states) commits without waiting for the disk: after a
        # power cut the last few of these may be lost, which only means a delivery is sent again,
        # and every send is idempotent. Ingest commits, which ACKs depend on, stay synchronous.
        # Same writer thread, so the two connections never wait for each other's lock.
        self.bookkeeping = Journal(self.journal.path, "normal", create=False, manual_checkpoints=True)
        self.dispatcher = Dispatcher(
            reactor, self.bookkeeping, project.destinations if project is not None else {},
            write=lambda fn, *args: threads.deferToThreadPool(reactor, self._writer, fn, *args),
        )
        self.ports = []
        self.metrics_port = None
        self.stopping = False
        self.ack_latency = Histogram()
        self.frames_by_listener: dict[str, int] = {}
        self._stats = task.LoopingCall(self._log_stats)
        self._stats.clock = reactor
        self._last_frames = 0

    @defer.inlineCallbacks
    def start(self):
        """Listen on every configured endpoint; fires with [(name, host, port)] or fails clearly."""
        bound = []
        for listener in self.settings.listeners:
            port = yield self._listen(listener)
            self.ports.append(port)
            address = port.getHost()
            bound.append((listener.name, address.host, address.port))
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
        if self.settings.retention is not None:
            self._retention_loop = task.LoopingCall(self._apply_retention)
            self._retention_loop.clock = self.reactor
            self._retention_loop.start(self.settings.retention[2], now=False)
        self._pool.start()
        self._writer.start()
        self._checkpoint_loop.start(CHECKPOINTER_INTERVAL, now=False)
        self.indexer.start()
        yield self.dispatcher.start()
        if self.project is not None:
            self.converter.start()
            log.info("{routes} routes loaded from {directory}", routes=len(self.project.routes),
                     directory=str(self.project.directory))
        return bound

    def reload(self):
        """Load routes and mappings again; a file that fails leaves the running ones in place."""
        directory = self.project.directory if self.project is not None else self.settings.config_dir
        try:
            project = Project.load(directory)
        except ConfigError as exc:
            log.error("reload refused, the running routes and mappings stay: {error}", error=str(exc))
            return False
        self.project = project
        self.ingestor.project = project
        self.dispatcher.update(project.destinations)
        self.converter.signal("HUP")
        log.info("reloaded {routes} routes and {mappings} message mappings from {directory}",
                 routes=len(project.routes), mappings=len(project.mappings.messages), directory=str(directory))
        return True

    def _checkpoint(self):
        """The bulk WAL checkpoint, in the background thread, one run at a time."""
        if self._checkpointing is not None:
            return
        d = threads.deferToThreadPool(self.reactor, self._pool, self.checkpointer.run_once)

        def done(result):
            self._checkpointing = None
            return result

        d.addBoth(done)
        d.addErrback(lambda failure: log.failure("journal checkpoint failed; will try again", failure))
        self._checkpointing = d

    @defer.inlineCallbacks
    def _apply_retention(self):
        """The retention policy, one small batch per writer job so ingest commits go in between."""
        older_than, keep_errors, _ = self.settings.retention
        cutoff = datetime.now(timezone.utc) - timedelta(seconds=older_than)
        write = lambda fn, *args: threads.deferToThreadPool(self.reactor, self._writer, fn, *args)  # noqa: E731
        total, last = 0, 0
        while not self.stopping:
            done, last = yield write(retention.prune_step, self.bookkeeping, cutoff, keep_errors, last)
            if not done:
                break
            total += done
        if total:
            yield write(retention.reclaim, self.bookkeeping)
            log.info("retention: pruned {count} messages older than {cutoff}", count=total, cutoff=cutoff.isoformat())

    def _listen_metrics(self):
        endpoint_text = self.settings.metrics_endpoint
        try:
            endpoint = serverFromString(self.reactor, endpoint_text)
        except (ValueError, TypeError, KeyError) as exc:
            return defer.fail(ValueError(f"metrics: bad endpoint {endpoint_text!r}: {exc}"))
        site = Site(site_root(self))
        site.noisy = False

        def explain(failure):
            raise RuntimeError(f"metrics: cannot listen on {endpoint_text}: {failure.getErrorMessage()}")

        return endpoint.listen(site).addErrback(explain)

    def _listen(self, listener: ListenerSettings):
        factory = MLLPServerFactory(listener, self.committer, self.settings.policy(listener))
        factory.ack_latency = self.ack_latency
        factory.frames_by_listener = self.frames_by_listener
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
        """Stop listening, commit what is pending, close the journal."""
        if self._stats.running:
            self._stats.stop()
        self.stopping = True
        if getattr(self, "_retention_loop", None) is not None and self._retention_loop.running:
            self._retention_loop.stop()
        if self._checkpoint_loop.running:
            self._checkpoint_loop.stop()
        for port in self.ports:
            yield port.stopListening()
        if self.metrics_port is not None:
            yield self.metrics_port.stopListening()
        yield self.dispatcher.stop()
        yield self.committer.drain()
        if self._writer.started:
            self._writer.stop()
        if self._checkpointing is not None:
            yield self._checkpointing
        if self._pool.started:
            self._pool.stop()
        self.checkpointer.close()
        yield self.indexer.stop()
        yield self.converter.stop()
        self._log_stats()
        self.bookkeeping.close()
        self.journal.close()

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


class WorkerProcess(protocol.ProcessProtocol):
    """A helper process of the engine (text indexer, converter), restarted if it dies."""

    def __init__(self, reactor, name: str, args: list[str]):
        self.reactor = reactor
        self.name = name
        self.args = args
        self.stopping = False
        self.ended = None
        self.transport = None

    def start(self):
        self.ended = defer.Deferred()
        argv = [sys.executable, "-m", *self.args]
        self.reactor.spawnProcess(self, sys.executable, argv, env=None, childFDs={0: "w", 1: 1, 2: 2})

    def processEnded(self, reason):
        ended, self.ended = self.ended, None
        if ended is not None:
            ended.callback(None)
        if not self.stopping:
            log.warn("{name} exited ({reason}); restarting in {delay}s",
                     name=self.name, reason=reason.getErrorMessage(), delay=WORKER_RESTART_DELAY)
            self.reactor.callLater(WORKER_RESTART_DELAY, self._restart)

    def _restart(self):
        if not self.stopping and self.ended is None:
            self.start()

    def signal(self, name: str):
        if self.ended is not None:
            try:
                self.transport.signalProcess(name)
            except Exception:  # it is just exiting; it will be restarted
                pass

    def stop(self):
        """Ask the worker to finish its current batch and exit; fires when it has."""
        self.stopping = True
        if self.ended is None:
            return defer.succeed(None)
        ended = self.ended
        self.signal("TERM")
        return ended


def start_logging(level: str, stream=None):
    predicate = LogLevelFilterPredicate(defaultLogLevel=LogLevel.levelWithName(level))
    observer = FilteringLogObserver(textFileLogObserver(stream or sys.stderr), [predicate])
    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)


def pid_file(journal_path) -> Path:
    """Where a running engine writes its process ID (beside its journal), for ``hl7bridge reload``."""
    path = Path(journal_path)
    return path.with_name(path.stem + ".pid")


def run(settings: Settings, project: Project | None = None) -> int:
    """Run the engine until SIGINT/SIGTERM; SIGHUP reloads routes and mappings. Returns the exit code."""
    from twisted.internet import reactor

    # The background threads (journal writer, text indexing) do Python work too; by default a
    # thread keeps the GIL for up to 5 ms before handing it over, which showed up as ACK latency.
    sys.setswitchinterval(GIL_SWITCH_INTERVAL)
    start_logging(settings.log_level)
    engine = Engine(settings, reactor, project=project)
    exit_code = [0]
    pid_path = pid_file(engine.journal.path)

    def started(bound):
        pid_path.write_text(f"{os.getpid()}\n")
        signal.signal(signal.SIGHUP, lambda *_: reactor.callFromThread(engine.reload))
        for name, host, port in bound:
            # One line per listener on stdout, so scripts and tests can find the port.
            kind = "metrics" if name == "metrics" else f"listener {name}"
            print(f"hl7bridge: {kind} ready on {host}:{port}", flush=True)
        reactor.addSystemEventTrigger("before", "shutdown", engine.stop)
        reactor.addSystemEventTrigger("after", "shutdown", lambda: pid_path.unlink(missing_ok=True))

    def failed(failure):
        print(f"hl7bridge: {failure.getErrorMessage()}", file=sys.stderr, flush=True)
        exit_code[0] = 1
        for port in engine.ports:
            port.stopListening()
        for pool in (engine._pool, engine._writer):
            if pool.started:
                pool.stop()
        engine.checkpointer.close()
        engine.journal.close()
        reactor.stop()

    reactor.callWhenRunning(lambda: engine.start().addCallbacks(started, failed))
    reactor.run()
    return exit_code[0]
