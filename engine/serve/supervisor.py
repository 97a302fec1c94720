"""The engine's helper processes (text indexer, converter): started with it, restarted if they
die, passed SIGHUP on reload, and asked to finish their batch and exit when it stops.

The other half, what a helper process does with those signals, is ``engine.worker``.
"""

from __future__ import annotations

import sys

from twisted.internet import defer, protocol
from twisted.logger import Logger

log = Logger(namespace="hl7bridge.serve")
WORKER_RESTART_DELAY = 5.0


class WorkerProcess(protocol.ProcessProtocol):
    """One helper process (``python -m MODULE ARGS``), restarted if it dies."""

    def __init__(self, reactor, name: str, args: list[str], env: dict | None = None):
        self.reactor = reactor
        self.name = name
        self.args = args
        self.env = env  # None: the engine's own environment
        self.stopping = False
        self.ended = None
        self.transport = None

    def start(self):
        self.ended = defer.Deferred()
        argv = [sys.executable, "-m", *self.args]
        self.reactor.spawnProcess(self, sys.executable, argv, env=self.env, childFDs={0: "w", 1: 1, 2: 2})

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


class Supervisor:
    """The helper processes of one engine, by name."""

    def __init__(self, reactor):
        self.reactor = reactor
        self.workers: dict[str, WorkerProcess] = {}

    def add(self, name: str, module: str, *args: str, env: dict | None = None) -> WorkerProcess:
        self.workers[name] = WorkerProcess(self.reactor, name, [module, *args], env)
        return self.workers[name]

    def start(self):
        for worker in self.workers.values():
            worker.start()

    def stopping(self):
        """The engine is shutting down: a helper that exits from now on (it may have had the same
        signal) is neither restarted nor warned about."""
        for worker in self.workers.values():
            worker.stopping = True

    def signal(self, worker: str, name: str):
        """Pass a signal (HUP: reload) to one helper, when it is running."""
        if worker in self.workers:
            self.workers[worker].signal(name)

    @defer.inlineCallbacks
    def stop(self):
        for worker in self.workers.values():
            yield worker.stop()
