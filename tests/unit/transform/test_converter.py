"""The converter's work, in-process: messages ACKed at commit are mapped, journaled and queued."""

import json
import shutil

import pytest

from backends import backend, journal, journal_location  # noqa: F401 (these tests run on both backends)
from conftest import EXAMPLES, ROOT
from engine.mllp.ingest import Frame, Ingestor
from engine.store.base import ACCEPTED, MAPPED, MAPPING_ERROR
from engine.transform.converter import BATCH, convert_pending
from engine.transform.project import Project

SIU = (EXAMPLES / "siu_s12.hl7").read_bytes()


@pytest.fixture
def project():
    return Project.load(ROOT)


def receive(journal, project, raw, count=1):
    ingestor = Ingestor(journal, project=project)
    return [ingestor.ingest([Frame(raw.replace(b"NC000123", f"NC{n:06d}".encode(), 1))])[0] for n in range(count)]


def test_waiting_messages_are_mapped_and_queued(journal, project):
    [outcome] = receive(journal, project, SIU)
    assert outcome.status == ACCEPTED and journal.waiting_for_conversion() != []
    assert convert_pending(journal, project) == 1
    row = journal.get(outcome.message_id)
    conversion = journal.conversion(outcome.message_id)
    assert (row["status"], conversion["status"], conversion["route"]) == (MAPPED, MAPPED, "clinic-scheduling")
    assert json.loads(conversion["bundle"])["type"] == "transaction"
    [delivery] = journal.list_deliveries()
    assert (delivery["destination"], delivery["key"], delivery["state"]) == ("fhir-main", "patient:NORTHCLINIC|100234",
                                                                               "pending")
    assert journal.waiting_for_conversion() == [] and convert_pending(journal, project) == 0


def test_a_short_batch_at_a_time(journal, project):
    receive(journal, project, SIU, count=BATCH + 3)
    assert convert_pending(journal, project) == BATCH
    assert convert_pending(journal, project) == 3
    assert journal.count(MAPPED) == BATCH + 3


def test_a_route_no_longer_configured_is_a_mapping_error_that_says_what_to_do(journal, project, tmp_path):
    [outcome] = receive(journal, project, SIU)
    for part in ("routes", "mappings", "destinations"):
        shutil.copytree(ROOT / part, tmp_path / part)
    (tmp_path / "routes" / "10-scheduling.yaml").unlink()
    assert convert_pending(journal, Project.load(tmp_path)) == 1
    conversion = journal.conversion(outcome.message_id)
    assert (conversion["status"], conversion["route"]) == (MAPPING_ERROR, "clinic-scheduling")
    assert json.loads(conversion["problems"]) == [
        "route 'clinic-scheduling' is no longer configured; replay the message to route it again"]
    assert journal.list_deliveries() == []


def test_a_message_that_cannot_be_mapped_is_journaled_with_its_problems(journal, project):
    bad = SIU.replace(b"|19840312|", b"|1984-03-12|", 1)  # PID-7 is no HL7 date
    [outcome] = receive(journal, project, bad)
    convert_pending(journal, project)
    assert journal.get(outcome.message_id)["status"] == MAPPING_ERROR
    problems = json.loads(journal.conversion(outcome.message_id)["problems"])
    assert any(p.startswith("Patient.birthDate:") and "(date(PID-7))" in p for p in problems), problems


def test_the_conversion_keeps_its_warnings_and_journal_show_lists_them(journal, project, tmp_path):
    """A message whose SCH-10 says 'm' and has no SCH-11.5: mapped, with what mapping assumed kept
    with the conversion (the message row keeps the reader's)."""
    from click.testing import CliRunner

    from engine.cli import cli
    from engine.store.base import decode_notes

    raw = SIU.replace(b"|30|min^minutes^ANS+|^^30^20261201093000-0600^20261201100000-0600|",
                      b"|30|m|^^30^20261201093000-0600|", 1).replace(b"TQ1|1|", b"ZQ1|1|", 1)
    crlf = raw.replace(b"\r\n", b"\r").replace(b"\n", b"\r").replace(b"\r", b"\r\n")
    [outcome] = receive(journal, project, crlf)
    convert_pending(journal, project)
    row, conversion = journal.get(outcome.message_id), journal.conversion(outcome.message_id)
    assert (row["status"], row["warning"]) == (MAPPED, "segments end with CRLF, not CR")
    assert decode_notes(conversion["problems"]) == ([], [
        "SCH-10 unit 'm' read as minutes",
        "end computed from the start (SCH-11.4) and the duration (SCH-9: 30 min)",
    ])
    journal.close()
    shown = CliRunner().invoke(cli, ["journal", "show", "--journal", journal.location,
                                     str(outcome.message_id)]).output
    assert "warning:                segments end with CRLF, not CR" in shown
    assert "  warning: SCH-10 unit 'm' read as minutes\n" in shown


# -- several converters on one journal ------------------------------------------------------------


def same_patient(count):
    """``count`` SIUs of one patient (one ordering key at fhir-main), each its own appointment."""
    return [SIU.replace(b"NC000123", f"NC{n:06d}".encode(), 1).replace(b"|10345^", f"|{10345 + n}^".encode(), 1)
            for n in range(count)]


def test_converters_journal_as_they_finish_and_an_earlier_message_holds_its_key(journal, project):
    """Converter A holds the oldest messages; B journals later ones at once (it does not wait for
    A), and their deliveries wait until A's messages are converted: one patient's deliveries go out
    in arrival order whichever converter finishes first."""
    from engine.stamps import utc_now
    from engine.store import open_journal

    ingestor = Ingestor(journal, project=project)
    ids = [ingestor.ingest([Frame(raw)])[0].message_id for raw in same_patient(4)]
    other = open_journal(journal.location, "normal", create=False)
    try:
        held = journal.claim_conversions("node/converter-1", 2, 60, utc_now())  # A has the first two
        assert [w.id for w in held] == ids[:2]
        assert convert_pending(other, project, batch=2, worker="node/converter-2") == 2  # B: 3 and 4, now
        assert sorted(d["message_id"] for d in journal.list_deliveries()) == ids[2:]
        assert journal.due_deliveries("fhir-main", utc_now(), 10) == []  # 1 and 2 are not converted yet
        assert convert_pending(journal, project, batch=2, worker="node/converter-1") == 2
    finally:
        other.close()
    assert [d.message_id for d in journal.due_deliveries("fhir-main", utc_now(), 10)] == ids[:1]


def test_a_converter_that_stops_holds_back_only_the_keys_of_what_it_held(journal, project):
    """A converter claims a message and dies: later messages of that patient wait (until its claim
    expires and another converter converts it); another patient's go out."""
    from datetime import timedelta

    from engine.stamps import utc_now

    ingestor = Ingestor(journal, project=project)
    first, second = [ingestor.ingest([Frame(raw)])[0].message_id for raw in same_patient(2)]
    stranger = SIU.replace(b"NC000123", b"NC999999", 1).replace(b"|100234^^^NORTHCLINIC^MR~", b"|555^^^NORTHCLINIC^MR~", 1)
    third = ingestor.ingest([Frame(stranger)])[0].message_id
    journal.claim_conversions("node/converter-1", 1, 60, utc_now())  # and then it dies
    assert convert_pending(journal, project, worker="node/converter-2") == 2
    assert [d.message_id for d in journal.due_deliveries("fhir-main", utc_now(), 10)] == [third]
    assert convert_pending(journal, project, worker="node/converter-2") == 0  # the dead one's claim lasts
    # A minute on, the dead one's lease is over: converter-2 takes the message over and converts it.
    later = utc_now() + timedelta(seconds=61)
    assert [w.id for w in journal.claim_conversions("node/converter-2", 10, 60, later)] == [first]
    assert convert_pending(journal, project, worker="node/converter-2") == 1  # its own claim
    assert sorted(d.message_id for d in journal.due_deliveries("fhir-main", utc_now(), 10)) == [first, third]


def test_a_message_that_cannot_be_mapped_releases_its_key(journal, project):
    from engine.stamps import utc_now

    ingestor = Ingestor(journal, project=project)
    bad, good = same_patient(2)
    first = ingestor.ingest([Frame(bad.replace(b"|19840312|", b"|1984-03-12|", 1))])[0].message_id
    second = ingestor.ingest([Frame(good)])[0].message_id
    journal.claim_conversions("node/converter-1", 1, 60, utc_now())  # the bad one, still being mapped
    assert convert_pending(journal, project, worker="node/converter-2") == 1
    assert journal.due_deliveries("fhir-main", utc_now(), 10) == []
    with journal.transaction():
        journal.finish_conversions("node/converter-1", [first])  # converter-1 gives it up
    assert convert_pending(journal, project, worker="node/converter-2") == 1
    assert journal.get(first)["status"] == MAPPING_ERROR
    assert [d.message_id for d in journal.due_deliveries("fhir-main", utc_now(), 10)] == [second]


def test_messages_journaled_before_expected_deliveries_get_them_when_a_converter_starts(journal, project):
    """A journal upgraded to schema 8 with messages still waiting: they kept no expected
    deliveries; a converter gives them theirs before it converts anything."""
    from engine.transform.converter import expect_waiting

    ingestor = Ingestor(journal, project=project)
    ids = [ingestor.ingest([Frame(raw)])[0].message_id for raw in same_patient(3)]
    journal._run("DELETE FROM expected_deliveries")  # as a journal of schema 7 left them
    assert journal.waiting_without_expected(0, 10) == [(i, "clinic-scheduling") for i in ids]
    assert expect_waiting(journal, project, batch=2) == 3
    assert journal.waiting_without_expected(0, 10) == []
    assert journal.outbox_holds()[0][:2] == ("fhir-main", 3)
    assert expect_waiting(journal, project) == 0


def test_three_converters_share_the_work_and_convert_each_message_once(journal, project):
    import threading

    from engine.store import open_journal

    ingestor = Ingestor(journal, project=project)
    count = 3 * BATCH + 7
    ids = [ingestor.ingest([Frame(raw)])[0].message_id for raw in same_patient(count)]
    done = {}

    def converter(name):
        own = open_journal(journal.location, "normal", create=False)
        try:
            total = 0
            while own.waiting_for_conversion(1):
                total += convert_pending(own, project, worker=name)
            done[name] = total
        finally:
            own.close()

    threads = [threading.Thread(target=converter, args=(f"node/converter-{n}",)) for n in (1, 2, 3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sum(done.values()) == count and journal.count(MAPPED) == count
    assert sorted(d["message_id"] for d in journal.list_deliveries()) == ids  # one each
    # Whichever converter journaled them, they go out in arrival order, one at a time (one patient).
    from engine.stamps import utc_now

    sent = []
    while due := journal.due_deliveries("fhir-main", utc_now(), 10):
        assert len(due) == 1
        sent.append(due[0].message_id)
        journal._run("UPDATE deliveries SET state = 'delivered' WHERE id = ?", due[0].id)
    assert sent == ids
