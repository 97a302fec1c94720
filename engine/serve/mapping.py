"""Mapping before the ACK (``ack.after: mapping`` routes) in worker processes.

The listener hands such a frame to a thread of serve's mapping pool (``Ingestor.map_before_ack``),
so its ACK waits for its own mapping only. A thread alone would still map under the engine's one
GIL, taking the reactor's and the journal writer's time: a few long conversions slow every
connection's ACK. So the thread only waits, and the conversion itself runs here, in one of a few
processes that each load the routes and mappings once (again after a reload), receiving the
message's decoded text and the route's name and sending back what the pipeline made of it.

When a process cannot answer (it died, or it runs mappings older than the route being asked for,
during a reload), the message is mapped in the waiting thread instead, as before: slower for the
others, never lost.
"""

from __future__ import annotations

import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from twisted.logger import Logger

from ..hl7.er7 import parse
from ..reconcile.facts import NO_FACTS
from ..store.base import MAPPED
from ..transform import pipeline
from ..transform.project import Project
from ..worker import die_with_parent

log = Logger(namespace="hl7bridge.serve")

_project: Project | None = None  # in a worker process: the routes and mappings it maps with


def _load(directory: str):
    global _project
    die_with_parent()  # a SIGKILLed engine must not leave its mapping processes behind
    _project = Project.load(directory)


def _ready() -> bool:
    return _project is not None


def _convert(text: str, route_name: str) -> tuple:
    """In a worker process: (status, bundle, problems, warnings, reconcile facts) of one message."""
    converted = pipeline.convert(_project, parse(text), route_name=route_name)
    return converted.status, converted.bundle, converted.problems, converted.warnings, converted.facts


class MappingProcesses:
    """``workers`` processes mapping with the routes and mappings of ``directory``; ``convert``
    is the ``Ingestor``'s mapper (blocking: called from a thread)."""

    def __init__(self, directory: str | Path, workers: int):
        self.directory = str(directory)
        self.workers = workers
        self.executor: ProcessPoolExecutor | None = None
        self.fallbacks = 0  # messages mapped in the engine because no process could (for /metrics and tests)

    def start(self):
        # spawn, not fork: the engine has threads (the writer, pools) that a fork would copy mid-step.
        # Started from the reactor thread (start, reload): the kernel's parent-death signal
        # follows the thread that started a process.
        self.executor = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"),
                                            initializer=_load, initargs=(self.directory,))
        for _ in range(self.workers):  # start them now, not on the first message's time
            self.executor.submit(_ready)

    def reload(self, directory: str | Path):
        """New processes with the routes and mappings of ``directory`` (the first ones, if none ran:
        a reload added a route that ACKs after mapping); the old ones finish theirs."""
        old = self.executor
        self.directory = str(directory)
        self.start()
        if old is not None:
            old.shutdown(wait=False)

    def convert(self, project: Project, assessment, route) -> pipeline.Converted:
        if self.executor is None:  # not started: no route mapped before its ACK when serve started
            return pipeline.convert(project, assessment.message, header=assessment.header, route=route)
        try:
            status, bundle, problems, warnings, facts = self.executor.submit(
                _convert, assessment.decoded.text, route.name).result()
        except Exception:  # noqa: BLE001 - a dead process, a route it does not know yet: map here
            self.fallbacks += 1
            log.warn("a mapping process could not map message {control_id}; mapped in the engine instead",
                     control_id=assessment.header.control_id.strip() if assessment.header else "")
            return pipeline.convert(project, assessment.message, header=assessment.header, route=route)
        return pipeline.Converted(assessment.header, route, status, bundle, problems,
                                  project.destinations_of(route) if status == MAPPED else [], warnings,
                                  facts=NO_FACTS if facts == NO_FACTS else facts, reconcile=project.reconcile)

    def stop(self):
        if self.executor is not None:
            self.executor.shutdown(wait=True, cancel_futures=True)
            self.executor = None
