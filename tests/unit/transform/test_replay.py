"""Replays, in-process: resend the stored Bundle, or map again through the pipeline, and record who and why."""

import shutil
from datetime import datetime, timezone

import pytest

from backends import backend, journal, journal_location  # noqa: F401 (these tests run on both backends)
from conftest import EXAMPLES, ROOT, shipped_config
from engine.delivery.outbox import PERMANENT, Result, finish
from engine.mllp.ingest import Frame, Ingestor
from engine.store.base import HELD, MAPPED, MAPPING_ERROR, PENDING
from engine.transform.converter import convert_pending
from engine.transform.project import Project
from engine.transform.replay import ReplayError, remap, replay_messages

NOW = datetime(2026, 11, 24, 6, 0, tzinfo=timezone.utc)
SIU = (EXAMPLES / "siu_s12.hl7").read_bytes()
DFT = (EXAMPLES / "dft_p03.hl7").read_bytes()


@pytest.fixture
def project():
    return Project.load(ROOT)


def test_a_dead_delivery_is_sent_again_and_the_replay_recorded(journal, project):
    [outcome] = Ingestor(journal, clock=lambda: NOW, project=project).ingest([Frame(DFT)])
    [delivery] = journal.due_deliveries("erp-finance", NOW, 5)
    finish(journal, delivery, project.destinations["erp-finance"], Result(PERMANENT, 400, error="HTTP 400"), NOW, NOW)
    result = replay_messages(journal, None, [outcome.message_id], ["erp-finance"], "alice", "fixed the product",
                             only_dead=True, now=NOW)
    assert result == {"messages": 1, "deliveries": 1, "remapped": {}}
    states = {d["destination"]: d["state"] for d in journal.list_deliveries()}
    assert states == {"erp-finance": PENDING, "fhir-main": PENDING}
    [replay] = journal.history(outcome.message_id)["replays"]
    assert (replay["who"], replay["why"], replay["destination"], replay["remapped"]) == (
        "alice", "fixed the product", '["erp-finance"]', 0)


def test_remap_after_a_mapping_fix_maps_and_queues_what_is_missing(journal, tmp_path):
    config = shipped_config(tmp_path / "config")
    appointment = config / "mappings/resource/Appointment.yaml"
    good = appointment.read_text()
    appointment.write_text(good.replace("minutesDuration: duration", "minutesDuration: SCH-8.1"))
    broken = Project.load(config)
    [outcome] = Ingestor(journal, clock=lambda: NOW, project=broken).ingest([Frame(SIU)])
    convert_pending(journal, broken)
    assert journal.get(outcome.message_id)["status"] == MAPPING_ERROR and journal.list_deliveries() == []
    appointment.write_text(good)
    fixed = Project.load(config)
    result = replay_messages(journal, fixed, [outcome.message_id], None, "bob", "mapping fixed", remapped=True, now=NOW)
    assert result == {"messages": 1, "deliveries": 1, "remapped": {MAPPED: 1}}
    assert journal.get(outcome.message_id)["status"] == MAPPED
    [delivery] = journal.list_deliveries()
    assert (delivery["destination"], delivery["state"]) == ("fhir-main", PENDING)
    # Mapped again: the existing delivery is reset, not doubled.
    assert remap(journal, fixed, outcome.message_id, NOW) == MAPPED
    assert len(journal.list_deliveries()) == 1


def test_a_held_message_needs_remap(journal, tmp_path):
    config = shipped_config(tmp_path / "config")
    route = config / "routes" / "10-scheduling.yaml"
    route.write_text(route.read_text().replace("differing: process", "differing: hold"))
    project = Project.load(config)
    ingestor = Ingestor(journal, clock=lambda: NOW, project=project)
    ingestor.ingest([Frame(SIU)])
    [held] = ingestor.ingest([Frame(SIU.replace(b"DOE", b"ROE", 1))])
    assert held.status == HELD
    with pytest.raises(ReplayError, match=f"message {held.message_id} is held .* replay it with --remap"):
        replay_messages(journal, project, [held.message_id], None, "ops", "why")
    result = replay_messages(journal, project, [held.message_id], None, "ops", "processed", remapped=True, now=NOW)
    assert result["remapped"] == {MAPPED: 1} and journal.get(held.message_id)["status"] == MAPPED


def test_what_cannot_be_replayed_says_why(journal, project, tmp_path):
    with pytest.raises(ReplayError, match="remapping needs the routes and mappings"):
        replay_messages(journal, None, [1], None, "ops", "why", remapped=True)
    with pytest.raises(ReplayError, match="no message 42"):
        remap(journal, project, 42, NOW)
    [garbage] = Ingestor(journal, project=project).ingest([Frame(b"not hl7 at all")])
    with pytest.raises(ReplayError, match=f"message {garbage.message_id} is not HL7 .*nothing to map"):
        remap(journal, project, garbage.message_id, NOW)
    [siu] = Ingestor(journal, project=project).ingest([Frame(SIU)])
    for part in ("routes", "mappings", "destinations"):
        shutil.copytree(ROOT / part, tmp_path / part)
    (tmp_path / "routes" / "10-scheduling.yaml").unlink()
    (tmp_path / "routes" / "90-other-scheduling.yaml").unlink()
    with pytest.raises(ReplayError, match="no route takes it \\(its route 'clinic-scheduling' is no longer configured\\)"):
        remap(journal, Project.load(tmp_path), siu.message_id, NOW)
