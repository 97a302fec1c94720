"""What the engine's helper processes (text indexer, converter) share: how they start and stop."""

from __future__ import annotations

import os
import signal

WORKER_NICENESS = 10  # the engine's own work (ACKs) comes first


class WorkerSignals:
    """SIGTERM/SIGINT ask the worker to stop after its current batch; SIGHUP asks it to reload."""

    def __init__(self):
        self.stop = False
        self.reload = False
        signal.signal(signal.SIGTERM, self._stop)
        signal.signal(signal.SIGINT, self._stop)
        signal.signal(signal.SIGHUP, self._reload)
        try:
            os.nice(WORKER_NICENESS)
        except OSError:
            pass

    def _stop(self, *_):
        self.stop = True

    def _reload(self, *_):
        self.reload = True

    def take_reload(self) -> bool:
        asked, self.reload = self.reload, False
        return asked


def parent_gone(parent: int) -> bool:
    """True once the engine that started us has exited: a worker must not linger."""
    return os.getppid() != parent
