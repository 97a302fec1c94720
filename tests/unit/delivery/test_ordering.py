"""Per-key order by arrival, whichever way a message is mapped, on both backends: an SIU waiting for
a converter (``ack.after: commit``) holds back a later DFT of its patient that was mapped before its
ACK (``ack.after: mapping``), and only that; its conversion (mapped or not) releases it."""

from datetime import datetime, timedelta, timezone

import pytest

from backends import backend, journal, journal_location  # noqa: F401 (these tests run on both backends)
from conftest import EXAMPLES, ROOT
from engine.delivery.destinations import Destination
from engine.delivery.outbox import OK, Result, deliveries, expected, finish, identifier_key, ordering_key, summary
from engine.mllp.ingest import Frame, Ingestor
from engine.ops.detail import delivery_stories
from engine.store.base import ACCEPTED, DUPLICATE, HELD, MAPPED, MAPPING_ERROR
from engine.transform.converter import convert_pending
from engine.transform.project import Project

T0 = datetime(2026, 11, 24, 6, 0, tzinfo=timezone.utc)
LATER = datetime.now(timezone.utc) + timedelta(hours=1)  # after the converter's deliveries (its clock is real)
SIU = (EXAMPLES / "siu_s12.hl7").read_bytes()
DFT = (EXAMPLES / "dft_p03.hl7").read_bytes()
# The DFT's patient (PID-3) and account (PID-18); the SIU's own are another patient's.
PATIENT, OTHER = b"300612^^^EASTCLINIC^MR~E77703090^^^EPICADT^PI", b"555^^^EASTCLINIC^MR"
FHIR_KEY = "patient:EASTCLINIC|300612"


def siu(control_id: str, patient: bytes = PATIENT) -> bytes:
    return SIU.replace(b"NC000123", control_id.encode(), 1).replace(
        b"100234^^^NORTHCLINIC^MR~E55501234^^^EPICADT^PI", patient, 1)


def dft(control_id: str, patient: bytes = PATIENT, account: bytes = b"A2026120877") -> bytes:
    return DFT.replace(b"EC000501", control_id.encode(), 1).replace(
        b"300612^^^EASTCLINIC^MR~E77703090^^^EPICADT^PI", patient, 1).replace(b"A2026120877", account, 1)


@pytest.fixture
def project():
    return Project.load(ROOT)


@pytest.fixture
def receive(journal, project):
    ingestor = Ingestor(journal, clock=lambda: T0, project=project)
    return lambda raw: ingestor.ingest([Frame(raw)])[0]


def claim(journal, destination):
    return [d.control_id for d in journal.claim_deliveries(destination, "node", LATER, 10, 30)]


def deliver_all(journal, project, destination) -> list[str]:
    """Claim and deliver what is due, round after round, until nothing is: the control IDs in the
    order they went out."""
    sent = []
    while found := journal.claim_deliveries(destination, "node", LATER, 10, 30):
        for delivery in found:
            finish(journal, delivery, project.destinations[destination], Result(OK, 200), LATER, LATER)
            sent.append(delivery.control_id)
    return sent


def test_a_message_waiting_for_a_converter_holds_back_a_later_one_mapped_before_its_ack(journal, project, receive):
    appointment = receive(siu("S1"))
    assert appointment.status == ACCEPTED  # ACKed at commit: waits for a converter
    charge = receive(dft("D1"))
    assert charge.status == MAPPED  # mapped before its ACK, deliveries queued at once
    stranger = receive(dft("D2", patient=OTHER, account=b"ACC2"))
    assert claim(journal, "fhir-main") == ["D2"]  # another patient: not held
    assert claim(journal, "erp-finance") == ["D1", "D2"]  # the SIU does not go to erp-finance
    [row] = [r for r in summary(journal) if r["destination"] == "fhir-main"]
    assert (row["pending"], row["unconverted"], row["held"]) == (1, 1, 1)
    assert all(type(n) is int for row in journal.outbox_holds() for n in (row[1], row[3]))  # JSON, metrics
    [held] = [d for d in deliveries(journal, "fhir-main") if d["message_id"] == charge.message_id]
    assert held["waits_for"] == f"message {appointment.message_id} (same key, not converted yet)"
    assert held["key"] == FHIR_KEY
    stories = {s["destination"]: s for s in delivery_stories(journal.history(charge.message_id))}
    assert stories["fhir-main"]["waits_for"] == held["waits_for"] and stories["erp-finance"]["waits_for"] == ""
    assert convert_pending(journal, project) == 1
    assert [r["unconverted"] for r in summary(journal)] == [0, 0]
    assert deliver_all(journal, project, "fhir-main") == ["S1", "D1"]  # arrival order
    assert stranger.status == MAPPED


def test_a_message_that_cannot_be_mapped_releases_the_key(journal, project, receive):
    bad = receive(siu("S1").replace(b"|19840312|", b"|1984-03-12|", 1))  # PID-7 is no HL7 date
    receive(dft("D1"))
    assert claim(journal, "fhir-main") == []
    assert convert_pending(journal, project) == 1
    assert journal.get(bad.message_id)["status"] == MAPPING_ERROR
    assert deliver_all(journal, project, "fhir-main") == ["D1"]


def test_only_messages_a_converter_will_map_hold_anything(journal, project, receive):
    """A resend, a message held for an operator, an unrouted one and one whose destination orders
    by message keep no expected deliveries: a converter will never map them."""
    first = receive(siu("S1"))
    assert receive(siu("S1")).status == DUPLICATE  # the exact resend
    assert journal.outbox_holds() == [("fhir-main", 1, journal.get(first.message_id)["received_at"], 0)]
    convert_pending(journal, project)
    assert journal.outbox_holds() == []
    hold = Ingestor(journal, clock=lambda: T0, project=project)
    hold.project.routes.get("clinic-scheduling").differing_duplicates = "hold"
    assert hold.ingest([Frame(siu("S1").replace(b"|DOE^JANE", b"|DOE^JANET", 1))])[0].status == HELD
    assert receive(siu("S3").replace(b"SIU^S12^SIU_S12", b"ADT^A04^ADT_A01", 1)).status == "unrouted"
    assert journal.outbox_holds() == [] and journal.waiting_without_expected(0, 10) == []
    receive(dft("D1"))
    assert deliver_all(journal, project, "fhir-main") == ["S1", "D1"]


def test_the_keys_held_are_the_keys_the_deliveries_get():
    """Read at ingest from the message (PID-3 repetitions in message order) or later from the
    journal (sorted): the same key, the lowest identifier by value and authority."""
    fhir = Destination("fhir-main", "file", "x", order_by="patient")
    erp = Destination("erp-finance", "file", "x", order_by="account")
    slots = Destination("slots", "file", "x", order_by="appointment")
    each = Destination("each", "file", "x", order_by="message")
    ids = [("patient", "Z9", "NORTH"), ("patient", "A1", "EPIC"), ("account", "ACC1", ""),
           ("placer_appointment", "P1", ""), ("filler_appointment", "F1", "")]
    assert ordering_key(fhir, ids, 7) == ordering_key(fhir, sorted(ids), 7) == "patient:EPIC|A1"
    assert ordering_key(slots, ids, 7) == "filler_appointment:F1"  # SCH-2 before SCH-1
    assert ordering_key(each, ids, 7) == "message:7" and identifier_key(each, ids) is None
    assert ordering_key(erp, ids[:2], 7) == "message:7"  # no account: ordered on its own
    assert expected([fhir, erp, each], ids) == [("fhir-main", "patient:EPIC|A1"), ("erp-finance", "account:ACC1")]
