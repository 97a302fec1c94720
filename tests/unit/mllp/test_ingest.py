"""Frame -> journal row + ACK, against a real SQLite file (no sockets)."""

import itertools

import pytest

from backends import backend, journal, journal_location  # noqa: F401 (these tests run on both backends)
from conftest import EXAMPLES, NOW
from engine.hl7 import charset
from engine.hl7.assess import AcceptPolicy, assess
from engine.mllp.ingest import Frame, Ingestor
from engine.store import SearchQuery

SIU = (EXAMPLES / "siu_s12.hl7").read_bytes()


def test_accepted_message_is_journaled_verbatim_with_indexed_fields(ingestor, journal):
    [outcome] = ingestor.ingest([Frame(SIU, listener="mllp", peer="127.0.0.1:5000")])
    assert (outcome.status, outcome.ack_code) == ("accepted", "AA")
    row = journal.get(outcome.message_id)
    assert row["raw"] == SIU
    assert row["ack"] == outcome.ack
    assert outcome.ack.startswith(b"MSH|^~\\&|HL7BRIDGE|FINANCE|NORTHSCHED|NORTHCLINIC|20261124060000+0000||ACK^S12^ACK|ACK1|P|2.5.1\r")
    assert (row["message_type"], row["trigger_event"], row["message_structure"]) == ("SIU", "S12", "SIU_S12")
    assert (row["sending_facility"], row["control_id"], row["version"]) == ("NORTHCLINIC", "NC000123", "2.5.1")
    assert row["received_at"] == "2026-11-24T06:00:00.000000Z"
    assert (row["listener"], row["peer"]) == ("mllp", "127.0.0.1:5000")
    kinds = {(i["kind"], i["value"]) for i in row["ids"]}
    assert ("patient", "100234") in kinds
    assert ("placer_appointment", row["placer_appointment_id"]) in kinds
    assert row["patient_id"] == "100234"


def test_dft_transaction_ids_of_every_ft1_are_searchable(ingestor, journal):
    raw = (EXAMPLES / "dft_p03.hl7").read_bytes()
    [outcome] = ingestor.ingest([Frame(raw)])
    transactions = [i["value"] for i in journal.get(outcome.message_id)["ids"] if i["kind"] == "transaction"]
    assert len(transactions) == 4
    for tx in transactions:
        assert [r["id"] for r in journal.search(SearchQuery(transaction=tx))] == [outcome.message_id]


def test_duplicate_gets_the_same_ack_and_is_recorded_not_processed(ingestor, journal):
    [first] = ingestor.ingest([Frame(SIU)])
    [second] = ingestor.ingest([Frame(SIU)])
    assert second.status == "duplicate"
    assert second.ack == first.ack
    row = journal.get(second.message_id)
    assert row["duplicate_of"] == first.message_id
    assert row["warning"] is None
    assert journal.count("accepted") == 1 and journal.count("duplicate") == 1


def test_duplicates_inside_one_group_commit_are_caught(ingestor, journal):
    outcomes = ingestor.ingest([Frame(SIU), Frame(SIU), Frame(SIU)])
    assert [o.status for o in outcomes] == ["accepted", "duplicate", "duplicate"]
    assert outcomes[1].ack == outcomes[0].ack == outcomes[2].ack


def test_resend_restamped_with_a_new_msh7_is_still_a_duplicate(ingestor, journal):
    # Some senders stamp MSH-7 anew when they resend: the message is the same one.
    [first] = ingestor.ingest([Frame(SIU)])
    restamped = SIU.replace(b"|20261120101512-0600|", b"|20261120101999-0600|", 1)
    assert restamped != SIU
    [second] = ingestor.ingest([Frame(restamped)])
    assert (second.status, second.ack) == ("duplicate", first.ack)
    assert "only in MSH-7" in journal.get(second.message_id)["warning"]


def test_a_reused_control_id_with_different_content_is_processed_and_flagged(ingestor, journal):
    # A sender's counter reset after a restart: the same control ID, another message. Never dropped.
    [first] = ingestor.ingest([Frame(SIU)])
    changed = SIU.replace(b"DOE", b"ROE", 1)
    [second] = ingestor.ingest([Frame(changed)])
    assert (second.status, second.ack_code, second.differing_policy) == ("accepted", "AA", "process")
    assert second.ack != first.ack  # its own ACK, not the first message's
    row = journal.get(second.message_id)
    assert row["duplicate_of"] == first.message_id
    assert f"already used by message {first.message_id}, with different content; processed as a new message" in row["warning"]
    found = [r["id"] for r in journal.search(SearchQuery(duplicate="differing"))]
    assert found == [second.message_id]
    # An exact resend of the second message gets the second message's ACK.
    [third] = ingestor.ingest([Frame(changed)])
    assert (third.status, third.ack) == ("duplicate", second.ack)
    assert journal.get(third.message_id)["duplicate_of"] == second.message_id
    assert [r["id"] for r in journal.search(SearchQuery(duplicate="exact"))] == [third.message_id]


def policy_ingestor(tmp_path, journal, policy):
    """An ingestor with the shipped routes, the scheduling route set to ``duplicates.differing: policy``."""
    from conftest import shipped_config
    from engine.transform.project import Project

    config = shipped_config(tmp_path / "config")
    route = config / "routes" / "10-scheduling.yaml"
    route.write_text(route.read_text().replace("differing: process", f"differing: {policy}"))
    assert f"differing: {policy}" in route.read_text()
    counter = itertools.count(1)
    return Ingestor(journal, clock=lambda: NOW, next_control_id=lambda: f"ACK{next(counter)}",
                    project=Project.load(config))


def test_reused_control_id_rejected_when_the_route_says_so(tmp_path, journal):
    ingestor = policy_ingestor(tmp_path, journal, "reject")
    [first] = ingestor.ingest([Frame(SIU)])
    [second] = ingestor.ingest([Frame(SIU.replace(b"DOE", b"ROE", 1))])
    assert (second.status, second.ack_code, second.differing_policy) == ("rejected", "AR", "reject")
    assert b"MSA|AR|NC000123" in second.ack and b"ERR||MSH^1^10^1|205^Duplicate key identifier^HL70357|E" in second.ack
    row = journal.get(second.message_id)
    assert (row["duplicate_of"], row["error_code"], row["route"]) == (first.message_id, 205, "clinic-scheduling")
    assert journal.conversion(second.message_id) is None
    assert journal._one("SELECT count(*) FROM deliveries WHERE message_id = ?", second.message_id) == (0,)


def test_reused_control_id_held_for_an_operator(tmp_path, journal):
    ingestor = policy_ingestor(tmp_path, journal, "hold")
    ingestor.ingest([Frame(SIU)])
    [held] = ingestor.ingest([Frame(SIU.replace(b"DOE", b"ROE", 1))])
    assert (held.status, held.ack_code, held.differing_policy) == ("held", "AA", "hold")
    assert "held for an operator" in journal.get(held.message_id)["warning"]
    # A resend of the held message is a duplicate of it, not processed either.
    [again] = ingestor.ingest([Frame(SIU.replace(b"DOE", b"ROE", 1))])
    assert (again.status, again.ack) == ("duplicate", held.ack)


def test_same_control_id_from_another_facility_is_not_a_duplicate(ingestor):
    other = SIU.replace(b"|NORTHCLINIC|", b"|EASTCLINIC|", 1)
    outcomes = ingestor.ingest([Frame(SIU), Frame(other)])
    assert [o.status for o in outcomes] == ["accepted", "accepted"]


def test_a_rejected_message_may_be_resent_fixed(ingestor):
    bad = SIU.replace(b"|2.5.1", b"|9.9", 1)
    [rejected] = ingestor.ingest([Frame(bad)])
    [fixed] = ingestor.ingest([Frame(SIU)])
    assert (rejected.status, rejected.ack_code) == ("rejected", "AR")
    assert fixed.status == "accepted"


def test_not_hl7_is_rejected_and_still_journaled(ingestor, journal):
    raw = (EXAMPLES / "not_hl7.txt").read_bytes()
    [outcome] = ingestor.ingest([Frame(raw)])
    assert (outcome.status, outcome.ack_code) == ("rejected", "AR")
    assert b"MSA|AR||" in outcome.ack and b"ERR|||100^" in outcome.ack
    row = journal.get(outcome.message_id)
    assert row["raw"] == raw
    assert row["error_code"] == 100


def test_missing_msh_fields_are_rejected_with_101(ingestor, journal):
    raw = (EXAMPLES / "bad_msh.hl7").read_bytes()
    [outcome] = ingestor.ingest([Frame(raw)])
    row = journal.get(outcome.message_id)
    assert (row["status"], row["error_code"], row["error_location"]) == ("rejected", 101, "MSH-9")
    assert b"ERR||MSH^1^9^1|101^Required field missing^HL70357|E|" in outcome.ack


@pytest.mark.parametrize(
    "change, code, location",
    [
        ((b"|P|2.5.1", b"|X|2.5.1"), 202, "MSH-11"),
        ((b"|2.5.1", b"|3.0"), 203, "MSH-12"),
        ((b"SIU^S12^SIU_S12", b"SIU"), 201, "MSH-9.2"),
    ],
)
def test_header_rejections(ingestor, journal, change, code, location):
    [outcome] = ingestor.ingest([Frame(SIU.replace(*change, 1))])
    row = journal.get(outcome.message_id)
    assert (row["status"], row["error_code"], row["error_location"]) == ("rejected", code, location)


def test_listener_policy_limits_message_types(ingestor, journal):
    policy = AcceptPolicy(message_types=frozenset({"DFT"}))
    [outcome] = ingestor.ingest([Frame(SIU, policy=policy)])
    assert journal.get(outcome.message_id)["error_code"] == 200


def test_enhanced_mode_never_ack_is_journaled_but_not_sent(ingestor, journal):
    raw = SIU.replace(b"|P|2.5.1", b"|P|2.5.1|||NE|AL", 1)
    [outcome] = ingestor.ingest([Frame(raw)])
    assert outcome.ack is None
    row = journal.get(outcome.message_id)
    assert (row["ack_code"], row["ack_sent"]) == ("CA", 0)


def test_truncated_frame_is_journaled_as_rejected_without_ack(ingestor, journal):
    [outcome] = ingestor.ingest([Frame(SIU[:100], truncated=True)])
    row = journal.get(outcome.message_id)
    assert (row["status"], row["truncated"], outcome.ack) == ("rejected", 1, None)


def test_latin1_message_is_decoded_per_msh18_and_stored_as_bytes(ingestor, journal):
    raw = (EXAMPLES / "dft_p03_latin1.hl7").read_bytes()
    [outcome] = ingestor.ingest([Frame(raw)])
    row = journal.get(outcome.message_id)
    assert row["raw"] == raw and row["charset"] == "latin-1" and row["warning"] is None
    assert outcome.ack.split(b"\r")[0].endswith(b"|8859/1")
    assert [r["id"] for r in journal.search(SearchQuery(text="Müller"))] == [outcome.message_id]


def test_assess_never_raises_on_garbage():
    for raw in (b"", b"\x00\xff\xfe", b"MSH", b"MSH|", b"MSH|^~\\&", "MSH|^~\\&|é".encode("utf-16")):
        assert assess(raw).outcome == "reject"


def test_charset_fallback_and_declared_mismatch():
    assert charset.decode(b"MSH|^~\\&|\xe9").charset == "latin-1"
    msh = b"MSH|^~\\&" + b"|" * 16  # up to MSH-18
    decoded = charset.decode(msh + b"UNICODE UTF-8\r\xe9")
    assert decoded.charset == "utf-8" and "do not match" in decoded.warning
    assert charset.decode(msh + b"KLINGON\r").warning.startswith("MSH-18 character set 'KLINGON'")


def test_fast_identifier_reader_agrees_with_the_documented_paths():
    from conftest import corpus_files
    from engine.errors import BatchError
    from engine.hl7.er7 import parse
    from engine.hl7.identifiers import ID_KINDS, identifiers
    from engine.mllp.batch import split_messages

    checked = 0
    for path in [*sorted(EXAMPLES.glob("*.hl7")), *corpus_files()]:
        if path.name == "bad_msh.hl7":  # no message type: nothing to compare
            continue
        try:
            found = split_messages(path.read_bytes())
        except BatchError:
            # Only the corpus files that are broken batches on purpose may be refused; a message the
            # reader cannot read fails the test instead of being skipped.
            assert path.name.startswith("sample_bad_"), path
            continue
        for item in found:
            message = parse(item.data.decode("latin-1"))
            expected = []
            for kind, hl7_path in ID_KINDS.items():
                expected += [(kind, v.strip()) for v in message.values(hl7_path) if v.strip()]
            assert sorted((k, v) for k, v, _ in identifiers(message)) == sorted(expected), f"{path.name}:{item.line}"
            checked += 1
    assert checked >= len(list(EXAMPLES.glob("*.hl7"))) - 1
