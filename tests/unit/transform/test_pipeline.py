"""One pipeline for every path: what ``hl7bridge convert`` and ``hl7bridge test`` say about a message
is what the engine journals for it, structure validation included."""

import json
import shutil

import pytest
from click.testing import CliRunner

from backends import backend, journal, journal_location  # noqa: F401 (these tests run on both backends)
from conftest import EXAMPLES, ROOT
from engine.cli import cli
from engine.mllp.ingest import Frame, Ingestor
from engine.store.base import MAPPED, MAPPING_ERROR, UNROUTED
from engine.transform import pipeline
from engine.transform.converter import convert_pending
from engine.transform.project import Project

SIU = (EXAMPLES / "siu_s12.hl7").read_bytes()
# A SIU^S12 without its resource groups (RGS, AIS, AIL, AIP, AIG and their notes): the mapping can
# still make an Appointment of it (SCH and TQ1 say when), but the standard requires one resource
# group, so a route with validate: structure must refuse it.
GROUPS = (b"RGS", b"AIS", b"AIG", b"AIL", b"AIP", b"NTE|1|L")
NO_RGS = b"\r".join(line for line in SIU.replace(b"\n", b"\r").split(b"\r") if not line.startswith(GROUPS))
MISSING = "structure: Missing required child SIU_S12.SIU_S12_RESOURCES"
# A SIU^S12 without its SCH: nothing to build an Appointment from.
NO_SCH = b"\r".join(line for line in SIU.replace(b"\n", b"\r").split(b"\r") if not line.startswith(b"SCH"))


@pytest.fixture
def config(tmp_path):
    for part in ("routes", "mappings", "destinations"):
        shutil.copytree(ROOT / part, tmp_path / part)
    return tmp_path


def validating(config, **changes):
    """The shipped scheduling route with validate: structure (and other changes: old -> new)."""
    route = config / "routes" / "10-scheduling.yaml"
    text = route.read_text().replace("validate: none", "validate: structure", 1)
    for old, new in changes.items():
        assert old in text
        text = text.replace(old, new, 1)
    route.write_text(text)
    return Project.load(config)


def test_without_structure_validation_the_message_maps(config):
    converted = pipeline.convert(Project.load(config), pipeline.read(NO_RGS))
    assert converted.status == MAPPED and converted.ok


def test_a_siu_without_sch_is_a_mapping_error_that_names_the_segment(config):
    converted = pipeline.convert(Project.load(config), pipeline.read(NO_SCH))
    assert converted.status == MAPPING_ERROR and converted.bundle is None
    [problem] = converted.problems
    assert problem.startswith("SIU^S12 has no SCH segment: no Appointment can be built (from ")


def test_structure_validation_fails_convert_test_and_the_engine_alike(config, journal):
    project = validating(config)
    # The library.
    converted = pipeline.convert(project, pipeline.read(NO_RGS))
    assert converted.status == MAPPING_ERROR
    assert converted.problems == [MISSING]
    # hl7bridge convert.
    sample = config / "no_rgs.hl7"
    sample.write_bytes(NO_RGS)
    result = CliRunner().invoke(cli, ["convert", str(sample), "--config", str(config)])
    assert result.exit_code == 1
    assert f"(route clinic-scheduling): cannot convert\n  {MISSING}\n" in result.output
    # hl7bridge test, with an expected Bundle written without validation.
    (config / "no_rgs.fhir.json").write_text(json.dumps(pipeline.convert(Project.load(ROOT), pipeline.read(NO_RGS)).bundle))
    result = CliRunner().invoke(cli, ["test", str(config), "--config", str(config)])
    assert result.exit_code == 1 and f"FAIL  no_rgs.hl7\n      {MISSING}" in result.output
    # The engine: ACKed at commit, then the converter journals the same problems.
    [outcome] = Ingestor(journal, project=project).ingest([Frame(NO_RGS)])
    assert (outcome.status, outcome.ack_code) == ("accepted", "AA")
    assert convert_pending(journal, project) == 1
    assert journal.get(outcome.message_id)["status"] == MAPPING_ERROR
    assert json.loads(journal.conversion(outcome.message_id)["problems"]) == converted.problems
    assert journal.list_deliveries() == []


def test_a_route_that_maps_before_the_ack_refuses_it_in_the_ack(config, journal):
    project = validating(config, **{"after: commit": "after: mapping", "mapping_error: AE": "mapping_error: AR"})
    [outcome] = Ingestor(journal, project=project).ingest([Frame(NO_RGS)])
    assert (outcome.status, outcome.ack_code) == (MAPPING_ERROR, "AR")
    assert f"cannot be mapped: {MISSING}".encode() in outcome.ack


def test_mapped_messages_say_where_their_deliveries_go():
    project = Project.load(ROOT)
    converted = pipeline.convert(project, pipeline.read((EXAMPLES / "dft_p03.hl7").read_bytes()))
    assert converted.status == MAPPED
    assert [d.name for d in converted.destinations] == ["fhir-main", "erp-finance"]
    record = converted.record("2026-11-24T06:00:00.000000Z")
    assert record.route == "clinic-charges" and json.loads(record.bundle) == converted.bundle


def test_unrouted_and_unknown_routes():
    project = Project.load(ROOT)
    message = pipeline.read(SIU.replace(b"|NORTHCLINIC|", b"|SOUTHCLINIC|", 1).replace(b"SIU^S12^SIU_S12", b"ADT^A01^ADT_A01", 1))
    converted = pipeline.convert(project, message)
    assert (converted.status, converted.route, converted.ok) == (UNROUTED, None, False)
    assert converted.problems == ["no route matches ADT^A01 from SOUTHCLINIC"]
    with pytest.raises(pipeline.RouteNotFound, match="no route named 'nowhere' \\(routes: clinic-scheduling"):
        pipeline.convert(project, pipeline.read(SIU), route_name="nowhere")
    named = pipeline.convert(project, pipeline.read(SIU), route_name="other-scheduling")
    assert named.route.name == "other-scheduling" and named.status == MAPPED


def test_read_uses_the_journaled_charset_or_msh18():
    raw = (EXAMPLES / "dft_p03_latin1.hl7").read_bytes()
    assert pipeline.read(raw).text == pipeline.read(raw, "latin-1").text
    assert "\ufffd" in pipeline.read(raw, "utf-8").text  # what the journal says wins


def test_structure_validation_sees_the_message_as_read(config):
    """hl7apy reads MSH-2 strictly and segment IDs as sent: it gets the message as our reader read
    it (four-character MSH-2, IDs repaired), so a tolerated message is not refused for what we
    tolerate."""
    project = validating(config)
    sloppy = SIU.replace(b"\r\n", b"\r").replace(b"\n", b"\r")
    sloppy = sloppy.replace(b"^~\\&", b"^~&", 1).replace(b"\rPID|", b"\rpid|", 1)
    converted = pipeline.convert(project, pipeline.read(sloppy))
    assert converted.status == MAPPED, converted.problems


def test_an_impossible_time_zone_offset_is_a_mapping_error_not_a_crash():
    # FT1-4 with an offset of -30 hours: the workflow facts take it as no time, the mapping says why.
    dft = (EXAMPLES / "dft_p03.hl7").read_bytes().replace(b"|20261208|20261208173000-0600|CD",
                                                         b"|0001-3000|20261208173000-0600|CD")
    converted = pipeline.convert(Project.load(ROOT), pipeline.read(dft))
    assert converted.status == MAPPING_ERROR
    assert converted.problems == ["ChargeItem.occurrenceDateTime: FT1-4.1 '0001-3000' has the offset -3000, which is "
                                  f"not a time zone offset (+/-HHMM, hours 00 to 23) (from {ROOT}/"
                                  "mappings/resource/ChargeItem.yaml:32 (dateTime(FT1-4.1)))"]
    assert [charge.service_at for charge in converted.facts.charges][:2] == ["2026-12-08T15:30:00.000000Z", None]
