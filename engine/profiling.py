"""Profiles of the running engine, for bench/ingest.py --profile and for an operator chasing a slow
ACK: with ``$HL7BRIDGE_PROFILE`` set to a directory, ``serve`` profiles its reactor thread and its
journal writer thread (cProfile, one file each), its converter processes profile themselves, and
each writes its journal connections' write-lock figures (``SqliteJournal.lock_stats``) as JSON::

    HL7BRIDGE_PROFILE=/tmp/prof hl7bridge serve ...
    python -m pstats /tmp/prof/reactor-12345.prof      # then: sort cumtime, stats 30

Files are named after the thread or process and its process ID, and written when it stops. Off
(and free) when the variable is not set. cProfile slows the engine down several times over; with
``HL7BRIDGE_PROFILE_CPU=0`` only the write-lock figures are kept, which cost two clock readings a
transaction, so the timings stay true.
"""

from __future__ import annotations

import cProfile
import gc
import json
import os
import time
from pathlib import Path

PROFILE_VARIABLE = "HL7BRIDGE_PROFILE"
CPU_VARIABLE = "HL7BRIDGE_PROFILE_CPU"


def profile_dir() -> Path | None:
    """The directory profiles go to, or None when profiling is off."""
    value = os.environ.get(PROFILE_VARIABLE, "")
    return Path(value) if value else None


class ThreadProfile:
    """cProfile of the thread that calls ``start`` (cProfile follows one thread), written by ``stop``
    as ``NAME-PID.prof``. Every method does nothing when profiling is off."""

    def __init__(self, name: str):
        self.name = name
        self.directory = profile_dir()
        cpu = os.environ.get(CPU_VARIABLE, "1") != "0"
        self.profile = cProfile.Profile() if self.directory is not None and cpu else None

    def start(self):
        if self.profile is not None:
            self.profile.enable()

    def stop(self):
        """In the same thread as ``start``: stop and write the profile."""
        if self.profile is None:
            return
        self.profile.disable()
        self.directory.mkdir(parents=True, exist_ok=True)
        self.profile.dump_stats(str(self.directory / f"{self.name}-{os.getpid()}.prof"))
        self.profile = None


def write_figures(name: str, figures: dict):
    """Write ``figures`` (write-lock waits, say) as ``NAME-PID.json`` when profiling is on."""
    directory = profile_dir()
    if directory is None:
        return
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{name}-{os.getpid()}.json").write_text(json.dumps(figures, indent=2) + "\n")


class GcPauses:
    """How long the garbage collector stopped the process, per generation (count, total and
    longest milliseconds), while profiling is on: a full collection stops every thread, the
    reactor and the writer included."""

    def __init__(self):
        self.pauses = {0: [0, 0.0, 0.0], 1: [0, 0.0, 0.0], 2: [0, 0.0, 0.0]}
        self._started = 0.0
        self.on = profile_dir() is not None
        if self.on:
            gc.callbacks.append(self._callback)

    def _callback(self, phase, info):
        if phase == "start":
            self._started = time.perf_counter()
            return
        pause = self.pauses[info["generation"]]
        took = (time.perf_counter() - self._started) * 1000
        pause[0] += 1
        pause[1] += took
        pause[2] = max(pause[2], took)

    def as_dict(self) -> dict:
        return {f"generation {g}": {"collections": n, "ms_total": round(total, 3), "ms_max": round(longest, 3)}
                for g, (n, total, longest) in self.pauses.items()}

    def stop(self, name: str):
        if self.on:
            gc.callbacks.remove(self._callback)
            write_figures(name, self.as_dict())
            self.on = False
