"""What real senders get wrong and we read all the same (docs/mappings.md, "What we accept",
"Reading the message"): each case is a minimal message of ours, with a comment saying which
sender habit it covers, the repair and the exact warning it gives; and what stays refused.
The warnings reach the journal: the last tests ingest them.
"""

from __future__ import annotations

import pytest

from conftest import ROOT
from engine.hl7 import charset
from engine.hl7.ack import ACCEPT, REJECT
from engine.hl7.assess import assess
from engine.hl7.er7 import parse
from engine.mllp.batch import split_messages
from engine.mllp.ingest import Frame, Ingestor

LINES = [
    "MSH|^~\\&|SCHED|NORTHCLINIC|HL7BRIDGE|FINANCE|20261120101512||SIU^S12^SIU_S12|NC1|P|2.5.1",
    "SCH|A1^SCHED|F1^SCHED|||||ROUTINE||30|min|^^30^20261201093000^20261201100000",
    "NTE|1||Bring the C:\\forms folder",
    "PID|1||100^^^NORTH^MR||DOE^JANE",
    "RGS|1",
    "AIP|1||D1^DOC^ANNA|||20261201093000",
]


def message(lines=LINES, end="\r", **replace) -> str:
    text = end.join(lines) + end
    for old, new in replace.values():
        assert old in text
        text = text.replace(old, new, 1)
    return text


def names(parsed):
    return [s.name for s in parsed.segments]


# (id, sender habit, text, the warnings it must give)
READ = [
    ("escape-left-out", "older systems write MSH-2 as ^~& (no escape character): a backslash is plain text",
     message(a=("^~\\&", "^~&")),
     ["MSH-2 '^~&' has 3 encoding characters (the escape character left out): read as component '^', repetition "
      "'~', sub-component '&'; escape sequences are not decoded"]),
    ("subcomponent-left-out", "MSH-2 ^~\\ (the sub-component character left out)",
     message(a=("^~\\&", "^~\\")),
     ["MSH-2 '^~\\' has 3 encoding characters (the sub-component character left out): '&' assumed"]),
    ("two-characters", "MSH-2 ^~ (two characters only)",
     message(a=("^~\\&", "^~")), ["MSH-2 '^~' has 2 encoding characters: '\\&' assumed for the rest"]),
    ("truncation-before-2.7", "a v2.7 interface engine forwarding v2.5.1 with the truncation character in MSH-2",
     message(a=("^~\\&", "^~\\&#")),
     ["MSH-2 has a 5th character '#' (the truncation character of HL7 v2.7 and later) in a v2.5.1 message: ignored"]),
    ("truncation-in-2.7", "v2.7 and later send ^~\\&#: conformant, no warning",
     message(a=("^~\\&", "^~\\&#"), b=("|2.5.1", "|2.7")), []),
    ("long-msh-2", "a sender that pads MSH-2", message(a=("^~\\&", "^~\\&#$x")),
     ["MSH-2 has 7 encoding characters: the first four are used"]),
    ("trailing-separators", "trailing empty fields and components (conformant: no warning)",
     message(a=("DOE^JANE", "DOE^JANE^^^|||"), b=("RGS|1", "RGS|1|||")), []),
    ("lf", "files saved on Unix: segments end with LF", message(end="\n"), ["segments end with LF, not CR"]),
    ("crlf", "files saved on Windows: segments end with CRLF", message(end="\r\n"), ["segments end with CRLF, not CR"]),
    ("mixed-ends", "segments pasted together from two editors", message(a=("\rPID|", "\nPID|")),
     ["mixed segment ends (CR, LF); each read as the end of a segment"]),
    ("line-break-in-field", "a note typed on two lines, in a message whose segments end with CR",
     message(a=("C:\\forms folder", "C:\\forms\nfolder")), ["line break inside segment 3 kept as part of its field"]),
    ("blank-lines", "blank lines between segments (and after the last)",
     message(a=("\rPID|", "\r\r\rPID|"), b=("RGS|1\r", "RGS|1\r \r")),
     ["3 empty segments (blank lines) skipped"]),
    ("blank-lines-first", "blank lines before MSH", "\r\n\r\n" + message(), ["blank lines before MSH removed"]),
    ("separators-only", "a line of separators left by a template", message(a=("\rRGS|1", "\r|||\rRGS|1")),
     ["segment 5 has no segment ID (only separators): skipped"]),
    ("lower-case-id", "segment IDs in lower case", message(a=("\rPID|", "\rpid|")),
     ["segment 4 ID 'pid' read as 'PID'"]),
    ("padded-id", "segment IDs indented or padded", message(a=("\rPID|", "\r pid |")),
     ["segment 4 ID ' pid ' read as 'PID'"]),
    ("lower-case-msh", "a whole message in lower-case segment IDs, MSH included",
     message(a=("MSH|", "msh|"), b=("\rPID|", "\rpid|")),
     ["segment 1 ID 'msh' read as 'MSH'", "segment 4 ID 'pid' read as 'PID'"]),
    ("framing-in-a-file", "a capture that kept the MLLP framing bytes and a NUL",
     "\x0b\x00" + message() + "\x1c\r",
     ["MLLP framing or NUL characters before MSH removed", "MLLP framing or NUL characters after the last segment removed"]),
]


@pytest.mark.parametrize("case, habit, text, warnings", READ, ids=[c[0] for c in READ])
def test_the_reader_reads_it_and_says_what_it_assumed(case, habit, text, warnings):
    parsed = parse(text)
    assert names(parsed) == ["MSH", "SCH", "NTE", "PID", "RGS", "AIP"]
    assert parsed.warnings == warnings
    assert parsed.value("PID-3.1") == "100" and parsed.value("PID-5.2") == "JANE"
    assert parsed.value("AIP-6") == "20261201093000"
    # What each repair means for the values.
    if case == "escape-left-out":
        assert parsed.seps.escape == "" and parsed.value("NTE-3") == "Bring the C:\\forms folder"
        assert parsed.seps.encoding_characters == "^~&"  # echoed as sent in the ACK
    if case in ("subcomponent-left-out", "two-characters"):
        assert (parsed.seps.escape, parsed.seps.subcomponent) == ("\\", "&")
    if case.startswith("truncation"):
        assert parsed.seps.encoding_characters == "^~\\&#" and parsed.seps.subcomponent == "&"
    if case == "line-break-in-field":
        assert parsed.value("NTE-3") == "Bring the C:\\forms\nfolder"
    # The file splitter finds the same message, so hl7bridge convert reads it as ingest does.
    found = split_messages(text.encode("utf-8"))
    assert len(found) == 1 and names(parse(found[0].data.decode("utf-8"))) == names(parsed)


@pytest.mark.parametrize("raw, warning", [
    # Windows tools that save "UTF-8 with BOM"; MSH-18 even says otherwise.
    (b"\xef\xbb\xbf" + message(a=("|2.5.1", "|2.5.1||||||8859/1")).encode("utf-8"),
     "MSH-18 says '8859/1' but a byte-order mark says UTF-8: read as UTF-8; byte-order mark before MSH removed"),
    # Notepad's "Unicode": UTF-16 little-endian with its mark.
    ("\ufeff".encode("utf-16-le") + message().encode("utf-16-le"),
     "byte-order mark (UTF-16LE) before MSH: read as UTF-16LE"),
])
def test_a_byte_order_mark_says_the_encoding(raw, warning):
    assessment = assess(raw)
    assert assessment.outcome == ACCEPT
    assert assessment.warning == warning
    assert assessment.message.value("PID-5.1") == "DOE"


@pytest.mark.parametrize("field, code, warnings", [
    # Spaces and lower case in MSH-9 (hand-built test messages).
    (" siu ^ s12 ", "SIU^S12", ["MSH-9 has spaces around its components: removed",
                                "MSH-9 'siu^s12' read in upper case as SIU^S12"]),
    # The structure without the trigger (DFT^^DFT_P03): the structure serves only P03.
    ("DFT^^DFT_P03", "DFT^P03", ["MSH-9 has no trigger event (MSH-9.2); P03 taken from the message structure "
                                "DFT_P03 (MSH-9.3), which serves only P03"]),
    ("DFT^^DFT_P11", "DFT^P11", ["MSH-9 has no trigger event (MSH-9.2); P11 taken from the message structure "
                                "DFT_P11 (MSH-9.3), which serves only P11"]),
])
def test_msh_9_as_senders_write_it(field, code, warnings):
    assessment = assess(message(a=("SIU^S12^SIU_S12", field)).encode())
    assert assessment.outcome == ACCEPT
    assert assessment.header.message_code == code and assessment.header.warnings == tuple(warnings)


@pytest.mark.parametrize("text, code, reason", [
    (message(a=("SIU^S12^SIU_S12", "SIU^^SIU_S12")), 201,
     "MSH-9 has no trigger event (MSH-9.2), and the message structure SIU_S12 in MSH-9.3 serves S12 to S24, S26 "
     "and S27, so it cannot tell which: send the trigger in MSH-9.2"),
    (message(a=("SIU^S12^SIU_S12", "SIU_S12")), 201,
     "MSH-9 has the message structure SIU_S12 where the message type belongs: send SIU^S12 (type, then trigger event)"),
    (message(a=("SIU^S12^SIU_S12", "")), 101, "MSH-9 message type is missing"),
    ('<?xml version="1.0"?>\r<SIU_S12 xmlns="urn:hl7-org:v2xml"><MSH><MSH.1>|</MSH.1></MSH></SIU_S12>', 100,
     "HL7 v2 XML encoding is not supported: send ER7 (pipe-delimited)"),
    (message(a=("\rPID|", "\rP-D|")), 100, "segment 4 does not start with a valid segment ID"),
])
def test_what_stays_refused_is_refused_in_words(text, code, reason):
    assessment = assess(text.encode())
    assert assessment.outcome == REJECT
    assert (assessment.error.code, assessment.error.text) == (code, reason)


def test_the_journal_keeps_every_warning_of_the_message(journal):
    from engine.transform.project import Project

    ingestor = Ingestor(journal, project=Project.load(ROOT))
    raw = ("\x0b" + message(end="\n", a=("^~\\&", "^~&"), b=("\nPID|", "\npid|"))).encode()
    [outcome] = ingestor.ingest([Frame(raw)])
    assert outcome.status == "accepted" and outcome.ack_code == "AA"
    row = journal.get(outcome.message_id)
    assert row["raw"] == raw  # as received, whatever was repaired to read it
    assert row["warning"] == "; ".join([
        "MLLP framing or NUL characters before MSH removed",
        "MSH-2 '^~&' has 3 encoding characters (the escape character left out): read as component '^', "
        "repetition '~', sub-component '&'; escape sequences are not decoded",
        "segments end with LF, not CR",
        "segment 4 ID 'pid' read as 'PID'",
    ])
    # The ACK speaks the sender's MSH-2.
    assert outcome.ack.startswith(b"MSH|^~&|")
    # A resend keeps the reader's warnings and adds its own.
    [again] = ingestor.ingest([Frame(raw.replace(b"20261120101512", b"20261120101600"))])
    assert journal.get(again.message_id)["warning"].endswith(
        "segment 4 ID 'pid' read as 'PID'; resend differs from the original only in MSH-7 (time of message) or line ends")


def test_a_clean_message_has_no_warning():
    assert parse(message()).warnings == [] and assess(message().encode()).warning is None
    assert charset.decode(message().encode()).warning is None


def test_every_warning_and_reason_here_is_listed_in_what_we_accept():
    """docs/mappings.md lists every tolerance with its warning text: the very texts asserted above."""
    text = (ROOT / "docs/mappings.md").read_text()
    section = text.split("## What we accept", 1)[1].split("\n## ", 1)[0].replace("\\|", "|")
    expected = [w for case in READ for w in case[3]]
    expected += [w for _, warning in test_a_byte_order_mark_says_the_encoding.pytestmark[0].args[1]
                 for w in warning.split("; ")]
    expected += [w for _, _, warnings in test_msh_9_as_senders_write_it.pytestmark[0].args[1] for w in warnings
                 if "P11" not in w]  # the same text as for P03
    expected += [reason for _, _, reason in test_what_stays_refused_is_refused_in_words.pytestmark[0].args[1]]
    missing = [w for w in expected if w not in section]
    assert not missing, missing
