"""A FHIR server validates what we make of every example and every corpus SIU and DFT.

The test FHIR server (Medplum's router, tests/fhir_server) validates each resource it is given
against the R4 definitions, invariants included (app-2, app-3: fhir.resources checks neither);
each resource of each Bundle is PUT by its stable ID, as `mode: resources` does (Medplum takes
conditional transactions of 8 entries at most), and the FHIR-message form of each Bundle
(`payload: message`) is stored as a Bundle, which validates it too.
"""

from __future__ import annotations

import pytest

import fhirserver
from conftest import EXAMPLES, ROOT
from engine.delivery.messaging import message_bundle
from engine.delivery.senders import resources_in_order
from engine.transform import pipeline
from engine.transform.project import Project
from conftest import CORPUS

# The corpus files that cannot be converted (tests/unit/transform/test_corpus.py says why).
NOT_CONVERTED = {"Efferent-Health-HL7-dotnetcore/Program_InvalidRepetitionTest.hl7", "microsoft-FHIR-Converter/SIU_12.hl7"}


def samples():
    found = [pytest.param(EXAMPLES / p.name, id=f"examples/{p.name}") for p in sorted(EXAMPLES.glob("*.hl7"))
             if p.with_name(p.stem + ".fhir.json").exists()]
    if CORPUS.is_dir():
        found += [pytest.param(p, id=str(p.relative_to(CORPUS))) for p in sorted(CORPUS.rglob("*.hl7"))
                  if not str(p.relative_to(CORPUS)).startswith("_generic")
                  and str(p.relative_to(CORPUS)) not in NOT_CONVERTED]
    return found


@pytest.fixture(scope="module")
def project():
    return Project.load(ROOT)


@pytest.fixture(scope="module")
def server():
    """One server for the module: every sample's resources go into the same store, as a feed's do."""
    running = fhirserver.FhirServer()
    fhirserver._start_or_skip(running)
    yield running
    running.close()


@pytest.mark.parametrize("path", samples())
def test_the_fhir_server_accepts_every_resource_and_the_message(server, project, path):
    if not path.exists():
        pytest.skip("../shared/corpus is not beside this clone")
    converted = pipeline.convert(project, pipeline.read(path.read_bytes()))
    assert converted.ok, converted.problems
    for url, resource in resources_in_order(converted.bundle):
        status, _, body = server.request("PUT", url, resource)
        assert status in (200, 201), (url, body)
    appointment = [r for _, r in resources_in_order(converted.bundle) if r["resourceType"] == "Appointment"]
    if appointment:
        stored = server.get(f"Appointment/{appointment[0]['id']}")
        assert ("start" in stored) == ("end" in stored)
    status, _, body = server.request("POST", "Bundle", message_bundle(converted.bundle, "hie"))
    assert status == 201, body
