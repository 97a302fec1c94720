"""Mapping before the ACK in worker processes (engine.serve.mapping): the same conversion as in
the engine's own thread, and a message the processes cannot map is mapped there instead."""

import shutil

import pytest

from conftest import EXAMPLES, ROOT
from engine.hl7.assess import assess
from engine.serve.mapping import MappingProcesses
from engine.transform import pipeline
from engine.transform.project import Project

DFT = (EXAMPLES / "dft_p03.hl7").read_bytes()


@pytest.fixture(scope="module")
def processes():
    mapping = MappingProcesses(ROOT, 1)
    mapping.start()
    yield mapping
    mapping.stop()


def test_a_process_maps_as_the_engine_would(processes):
    project = Project.load(ROOT)
    assessment = assess(DFT)
    route = project.route_for(assessment.message, assessment.header)
    assert route.ack_after == "mapping"
    here = pipeline.convert(project, assessment.message, header=assessment.header, route=route)
    there = processes.convert(project, assessment, route)
    assert there.ok and there.bundle["entry"][:-1] == here.bundle["entry"][:-1]  # the Provenance (last) has its own time
    assert [e["fullUrl"] for e in there.bundle["entry"]] == [e["fullUrl"] for e in here.bundle["entry"]]
    assert (there.status, there.route, there.header, there.warnings) == (here.status, route, assessment.header, here.warnings)
    assert [d.name for d in there.destinations] == [d.name for d in here.destinations] != []
    assert there.facts == here.facts and there.facts.charges and there.reconcile is project.reconcile  # for reconcile
    assert processes.fallbacks == 0


def test_a_route_the_processes_do_not_know_yet_is_mapped_here(processes, tmp_path):
    """During a reload the processes may still run the old routes: the engine maps it itself."""
    for part in ("routes", "mappings", "destinations"):
        shutil.copytree(ROOT / part, tmp_path / part)
    route_file = tmp_path / "routes/20-finance.yaml"
    route_file.write_text(route_file.read_text().replace("name: ", "name: renamed-", 1))
    project = Project.load(tmp_path)
    assessment = assess(DFT)
    route = project.route_for(assessment.message, assessment.header)
    assert route.name.startswith("renamed-")
    converted = processes.convert(project, assessment, route)
    assert converted.ok and converted.route is route and processes.fallbacks == 1
