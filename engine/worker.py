"""What the engine's helper processes (text indexer, converter) share: how they start and stop."""

from __future__ import annotations

import os
import signal

WORKER_NICENESS = 10  # the engine's own work (ACKs) comes first


class WorkerSignals:
    """SIGTERM/SIGINT ask the worker to stop after its current batch; SIGHUP asks it to reload.
    The worker runs ``nice`` steps below the engine (os.nice adds up: it is applied here once)."""

    def __init__(self, parent: int | None = None, nice: int = WORKER_NICENESS):
        self.stop = False
        self.reload = False
        signal.signal(signal.SIGTERM, self._stop)
        signal.signal(signal.SIGINT, self._stop)
        signal.signal(signal.SIGHUP, self._reload)
        if parent is not None:
            die_with_parent()
            # The engine may have died while we were still importing: then there is nobody to serve.
            if parent_gone(parent):
                self.stop = True
        if nice:
            try:
                os.nice(nice)
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


def die_with_parent():
    """On Linux, ask the kernel to send us SIGTERM when the engine dies, even by SIGKILL."""
    try:
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass  # elsewhere the parent_gone() checks do it, a moment later
