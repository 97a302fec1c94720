"""The ACK builder, byte for byte: clock and control ID are parameters."""

from datetime import datetime, timedelta, timezone

import pytest

from engine.hl7.ack import AckError, Identity, ack_code, ack_wanted, build_ack
from engine.hl7.er7 import parse
from engine.hl7.header import read_header

NOW = datetime(2026, 11, 24, 6, 0, 0, tzinfo=timezone(timedelta(hours=-6)))


def header(msh: str):
    return read_header(parse(msh + "\r"))


ORIGINAL = "MSH|^~\\&|SCHED|NORTHCLINIC^1.2.3^ISO|HL7BRIDGE|FINANCE|20261201093000||SIU^S12^SIU_S12|NC1|P|2.5.1"


def test_accept_in_original_mode():
    h = header(ORIGINAL)
    assert ack_code("accept", h) == "AA"
    assert build_ack(h, "AA", now=NOW, control_id="A1") == (
        "MSH|^~\\&|HL7BRIDGE|FINANCE|SCHED|NORTHCLINIC^1.2.3^ISO|20261124060000-0600||ACK^S12^ACK|A1|P|2.5.1\r"
        "MSA|AA|NC1\r"
    )


def test_reject_v251_has_err_with_table_0357_code_and_location():
    h = header(ORIGINAL)
    ack = build_ack(h, "AR", now=NOW, control_id="A2", error=AckError(203, "HL7 version 9.9 is not supported", "MSH-12"))
    assert ack.split("\r")[1:] == [
        "MSA|AR|NC1|HL7 version 9.9 is not supported",
        "ERR||MSH^1^12^1|203^Unsupported version id^HL70357|E|||HL7 version 9.9 is not supported",
        "",
    ]


def test_v23_uses_err1_layout_and_two_component_type():
    h = header("MSH|^~\\&|ORSOS|G|PRECASE|X|20100406132803||SIU^S14| 38762|P|2.3")
    ack = build_ack(h, "AE", now=NOW, control_id="A3", error=AckError(101, "PID-3 missing", "PID-3"))
    assert ack == (
        "MSH|^~\\&|PRECASE|X|ORSOS|G|20261124060000-0600||ACK^S14|A3|P|2.3\r"
        "MSA|AE| 38762|PID-3 missing\r"
        "ERR|PID^1^3^101&Required field missing&HL70357\r"
    )


def test_v22_message_type_is_plain_ack():
    h = header("MSH|^~\\&|A|B|C|D|20000101||DFT^P03|X9|P|2.2")
    assert "||ACK|A4|P|2.2\r" in build_ack(h, "AA", now=NOW, control_id="A4")


def test_v27_has_no_msa3():
    h = header("MSH|^~\\&|A|B|C|D|20260101||SIU^S12^SIU_S12|X|P|2.8")
    ack = build_ack(h, "AE", now=NOW, control_id="A5", error=AckError(207, "could not store"))
    assert "MSA|AE|X\r" in ack
    assert "ERR|||207^Application internal error^HL70357|E|||could not store\r" in ack


def test_custom_separators_are_mirrored_and_values_escaped():
    h = header("MSH#!@%*#SENDER#FAC#RECV#FAC#20260301120000##ADT!A01#MSG007#P#2.5")
    ack = build_ack(h, "AR", now=NOW, control_id="A6", error=AckError(200, "type ADT#x!y is not accepted", "MSH-9"))
    assert ack.startswith("MSH#!@%*#RECV#FAC#SENDER#FAC#20261124060000-0600##ACK!A01!ACK#A6#P#2.5\r")
    assert "MSA#AR#MSG007#type ADT%F%x%S%y is not accepted\r" in ack


def test_receiver_empty_uses_our_identity_and_charset_is_echoed():
    h = header("MSH|^~\\&|A|B|||20260101||SIU^S12^SIU_S12|X|P|2.5.1|||||USA|8859/1")
    ack = build_ack(h, "AA", now=NOW, control_id="A7", identity=Identity("BRIDGE", "HOSP"))
    assert ack.startswith("MSH|^~\\&|BRIDGE|HOSP|A|B|")
    assert ack.split("\r")[0].endswith("|A7|P|2.5.1||||||8859/1")


def test_minimal_reject_when_no_msh_is_readable():
    ack = build_ack(None, "AR", now=NOW, control_id="A8", error=AckError(100, "message does not start with an MSH segment", "segment 1"))
    assert ack == (
        "MSH|^~\\&|HL7BRIDGE|HL7BRIDGE|||20261124060000-0600||ACK|A8|P|2.5.1\r"
        "MSA|AR||message does not start with an MSH segment\r"
        "ERR|||100^Segment sequence error^HL70357|E|||message does not start with an MSH segment\r"
    )


def test_enhanced_mode_uses_commit_codes():
    h = header(ORIGINAL + "|||AL|NE")
    assert h.enhanced_mode
    assert [ack_code(o, h) for o in ("accept", "error", "reject")] == ["CA", "CE", "CR"]
    assert "MSA|CA|NC1\r" in build_ack(h, "CA", now=NOW, control_id="A9")


@pytest.mark.parametrize(
    "msh15, msh16, code, wanted",
    [
        ("", "", "AA", True),
        ("", "", "AR", True),
        ("AL", "", "CA", True),
        ("NE", "AL", "CA", False),
        ("NE", "AL", "CR", False),
        ("ER", "", "CA", False),
        ("ER", "", "CR", True),
        ("SU", "", "CA", True),
        ("SU", "", "CE", False),
        ("", "AL", "CA", True),  # MSH-16 alone asks for enhanced mode; MSH-15 empty means always
    ],
)
def test_msh15_decides_whether_a_commit_ack_is_sent(msh15, msh16, code, wanted):
    h = header(f"{ORIGINAL}|||{msh15}|{msh16}")
    assert ack_wanted(code, h) is wanted


def test_unknown_0357_code_is_refused():
    with pytest.raises(ValueError):
        AckError(999, "nope")
