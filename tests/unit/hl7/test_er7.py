"""The ER7 reader and path syntax: plain functions, no sockets."""

import pytest

from conftest import EXAMPLES, corpus_dir
from engine.hl7.er7 import Separators, escape, parse, split_segments, unescape
from engine.errors import ParseError, PathError
from engine.hl7.paths import parse_path

SIU = (
    "MSH|^~\\&|SCHED|NORTHCLINIC|HL7BRIDGE|FINANCE|20261201093000-0600||SIU^S12^SIU_S12|NC1|P|2.5.1\r"
    "SCH|PL123^SCHED|FL456^EPIC|||||ROUTINE^Routine visit^HL70276\r"
    "PID|1||100234^^^NORTHCLINIC^MR~E777^^^EPIC^PI||DOE^JANE^Q||19800101|F\r"
    "NTE|1||Bring \\T\\ sign forms\\F\\ID card \\E\\ insurance\r"
    "FT1|1|TX-1\r"
    "FT1|2|TX-2\r"
    "ZSC|1|site data\r"
)


def test_fields_components_and_repetitions():
    message = parse(SIU)
    assert message.value("MSH-9") == "SIU^S12^SIU_S12"  # a field without a component is the whole field
    assert message.value("MSH-9.1") == "SIU"
    assert message.value("MSH-9.2") == "S12"
    assert message.value("PID-3.1") == "100234"
    assert message.value("PID-3[2].1") == "E777"
    assert message.value("PID-3[2].4") == "EPIC"
    assert message.values("PID-3[*].1") == ["100234", "E777"]
    assert message.value("PID-5.2") == "JANE"


def test_msh_numbering_counts_the_field_separator():
    message = parse(SIU)
    assert message.value("MSH-1") == "|"
    assert message.raw_values("MSH-2") == ["^~\\&"]
    assert message.value("MSH-3") == "SCHED"
    assert message.value("MSH-12") == "2.5.1"


def test_segment_occurrences_and_every_segment():
    message = parse(SIU)
    assert message.value("FT1-2") == "TX-1"
    assert message.value("FT1[2]-2") == "TX-2"
    assert message.values("FT1[*]-2") == ["TX-1", "TX-2"]
    assert message.value("FT1[3]-2", "none") == "none"


def test_z_segments_are_kept():
    message = parse(SIU)
    assert [s.name for s in message.segments][-1] == "ZSC"
    assert message.value("ZSC-2") == "site data"


def test_escape_sequences_are_decoded_in_values_but_kept_in_raw():
    message = parse(SIU)
    assert message.value("NTE-3") == "Bring & sign forms|ID card \\ insurance"
    assert message.raw_values("NTE-3") == ["Bring \\T\\ sign forms\\F\\ID card \\E\\ insurance"]


@pytest.mark.parametrize(
    "escaped, plain",
    [
        ("a\\S\\b\\R\\c", "a^b~c"),
        ("hex \\X0D0A\\ end", "hex \r\n end"),
        ("\\H\\bold\\N\\", "bold"),
        ("line\\.br\\break", "line\nbreak"),
        ("unknown \\Z123\\ kept", "unknown \\Z123\\ kept"),
        ("lone \\ escape", "lone \\ escape"),
        ("odd hex \\X0\\ kept", "odd hex \\X0\\ kept"),
    ],
)
def test_unescape(escaped, plain):
    assert unescape(escaped) == plain


def test_escape_round_trips():
    text = "a|b^c~d\\e&f"
    assert escape(text) == "a\\F\\b\\S\\c\\R\\d\\E\\e\\T\\f"
    assert unescape(escape(text)) == text


@pytest.mark.parametrize("ending", ["\r", "\n", "\r\n"])
def test_any_segment_terminator(ending):
    message = parse(SIU.replace("\r", ending))
    assert [s.name for s in message.segments] == ["MSH", "SCH", "PID", "NTE", "FT1", "FT1", "ZSC"]


def test_blank_lines_are_skipped():
    assert split_segments("MSH|^~\\&\r\r\nPID|1\n\n") == ["MSH|^~\\&", "PID|1"]


def test_custom_separators():
    text = "MSH#!@%*#SENDER#FAC#RECV#FAC#20260301120000##ADT!A01#MSG007#P#2.5\rPID#1##12345!!!MRN@999##DOE!JOHN\r"
    message = parse(text)
    assert message.seps == Separators("#", "!", "@", "%", "*")
    assert message.value("MSH-9.2") == "A01"
    assert message.values("PID-3[*].1") == ["12345", "999"]
    assert message.value("PID-5.1") == "DOE"


def test_short_encoding_characters_fall_back_to_defaults():
    message = parse("MSH|^~|A|B|C|D|20260101||ADT^A01|1|P|2.3\r")
    assert message.seps.escape == "\\" and message.seps.subcomponent == "&"


@pytest.mark.parametrize(
    "text, location",
    [
        ("", "segment 1"),
        ("PID|1||123\r", "segment 1"),
        ("GET / HTTP/1.1\r\n", "segment 1"),
        ("MSH|^~\\&|A\rpi|1\r", "segment 2"),
        ("MSH|^~\\&|A\r p-d|1\r", "segment 2"),
        ("MSH|^^\\&|A\r", "MSH-2"),
    ],
)
def test_unreadable_messages_raise_with_a_location(text, location):
    with pytest.raises(ParseError) as info:
        parse(text)
    assert info.value.location == location


def test_parse_error_does_not_quote_message_content():
    with pytest.raises(ParseError) as info:
        parse("MSH|^~\\&|A\rDOE JANE 19800101\r")
    assert "DOE" not in str(info.value)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("PID-3", "PID-3"),
        ("PID-3[2].1", "PID-3[2].1"),
        ("FT1[*]-2", "FT1[*]-2"),
        ("PID-3[*].4.1", "PID-3[*].4.1"),
        ("NTE[*]", "NTE[*]"),
        ("ZSC[2]-1", "ZSC[2]-1"),
    ],
)
def test_paths_round_trip(text, expected):
    assert str(parse_path(text)) == expected


@pytest.mark.parametrize("bad", ["PID", "pid-3", "PID-0", "PID-3.0", "PID-3[0]", "PID-3..1", "PID3", "PIDX-1", ""])
def test_bad_paths_are_rejected_with_a_hint(bad):
    if bad == "PID":
        assert parse_path(bad).field is None  # a bare segment is a valid path
        return
    with pytest.raises(PathError) as info:
        parse_path(bad)
    assert "PID-3[2].1" in str(info.value) or "start at 1" in str(info.value)


def test_whole_segments_by_path():
    message = parse(SIU)
    assert message.raw_values("FT1[*]") == ["FT1|1|TX-1", "FT1|2|TX-2"]


def test_every_example_parses():
    for path in sorted(EXAMPLES.glob("*.hl7")):
        if path.name in ("bad_msh.hl7", "batch_siu.hl7"):
            continue
        message = parse(path.read_bytes().decode("latin-1"))
        assert message.segments[0].name == "MSH", path.name


def test_corpus_edge_escaped_delimiters():
    text = (corpus_dir() / "_generic-tricky/rethinkhealth-hl7v2/edge-escaped-delimiters.hl7").read_text()
    message = parse(text)
    assert message.value("PID-5.1") == "DOE&SMITH"
    assert message.value("PID-5.2") == "JOHN^JANE"
    assert "pipe | and ampersand & and caret ^ and tilde ~ and backslash \\ chars" in message.value("OBX-5")


def test_corpus_leading_space_control_id_is_kept():
    text = (corpus_dir() / "hapifhir-hapi-hl7v2/NewPipeParserTest__testNestedRepeatingGroups.hl7").read_text()
    assert parse(text).value("MSH-10") == " 38762"


def test_segment_ids_are_checked_the_same_when_seen_before():
    # The second time an ID is read it comes from what was seen (er7._VALID_IDS): same verdicts.
    for _ in range(2):
        message = parse("MSH|^~\\&|A|B|||20261201||SIU^S12|1|P|2.5\rZX1|a\rPID|1\r")
        assert [seg.name for seg in message.segments] == ["MSH", "ZX1", "PID"]
        with pytest.raises(ParseError, match="segment 2 does not start with a valid segment ID"):
            parse("MSH|^~\\&|A|B|||20261201||SIU^S12|1|P|2.5\r1AB|x\r")
        repaired = parse("MSH|^~\\&|A|B|||20261201||SIU^S12|1|P|2.5\rpid|1\r")
        assert repaired.segments[1].name == "PID" and repaired.warnings == ["segment 2 ID 'pid' read as 'PID'"]
