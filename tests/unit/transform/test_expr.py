"""The expression language: paths, fallbacks, functions and conditions, without files."""

from datetime import timezone
from zoneinfo import ZoneInfo

import pytest

from engine.hl7.er7 import parse
from engine.transform.expr import Context, ExpressionError, compile_condition, compile_expression, fhir_datetime
from engine.transform.mappings import CodeMap

MESSAGE = parse(
    "MSH|^~\\&|SCHED|NORTHCLINIC|HL7BRIDGE|FINANCE|20261201093000||SIU^S15^SIU_S12|NC1|P|2.5.1\r"
    "SCH|PL1^SCHED|FL1^EPIC|||||ROUTINE^Routine^HL70276||60|s|^^30^20261201093000^202612011000\r"
    "NTE|1||Bring forms\r"
    "NTE|2||and the \\T\\ card\r"
    "PID|1||100^^^NORTH^MR~E7^^^EPIC^PI||DOE^JANE\r"
    "AIP|1||D1^DOC^ANNA|ATT||20261201093000-0500||||||Booked\r"
    "AIP|2||D2^DOC^BEN|ASST||20261201094500-0500||||||Cancelled\r"
)
TABLES = {"status": CodeMap("status", {"S15": "cancelled"}, None), "part": CodeMap("part", {"Booked": "accepted"}, "needs-action")}


def ctx(**kw):
    return Context(MESSAGE, tz=ZoneInfo("America/Chicago"), tables=TABLES, **kw)


@pytest.mark.parametrize(
    "text, value",
    [
        ("SCH-1.1", "PL1"),
        ("SCH-3.1 | SCH-2.1", "FL1"),
        ("'text'", "text"),
        ("42", 42),
        ("map(MSH-9.2, 'status')", "cancelled"),
        ("map(MSH-9.1, 'status') | 'fallback'", "fallback"),
        ("dateTime(SCH-11.4)", "2026-12-01T09:30:00-06:00"),
        ("instant(SCH-11.5)", "2026-12-01T10:00:00-06:00"),
        ("date(MSH-7)", "2026-12-01"),
        ("minutes(SCH-9, SCH-10)", 1),
        ("concat(PID-5.2, ' ', PID-5.1)", "JANE DOE"),
        ("words(PID-5.2, PID-5.3, PID-5.1)", "JANE DOE"),
        ("join(' ', NTE[*]-3)", "Bring forms and the & card"),
        ("system(PID-3.4, '', '')", "urn:hl7bridge:assigner:NORTH"),
        ("decimal('12.50')", 12.5),
        ("negate('12')", -12),
        ("upper(PID-5.2)", "JANE"),
        ("ZZZ-1", None),
        ("dateTime(ZZZ-1)", None),
    ],
)
def test_expressions(text, value):
    assert compile_expression(text)(ctx()) == value


def test_the_segment_at_hand_is_named_and_dollar_is_always_the_value():
    first, second = MESSAGE.all("AIP")
    # Inside $each: AIP[*] the AIP at hand is named AIP; an explicit index always reads that one.
    assert compile_expression("AIP-3.3")(ctx(segment=second)) == "BEN"
    assert compile_expression("AIP-3.3")(ctx(segment=first)) == "ANNA"
    assert compile_expression("AIP-3.3")(ctx()) == "ANNA"  # no segment at hand: the first
    assert compile_expression("AIP[1]-3.3")(ctx(segment=second)) == "ANNA"
    assert compile_expression("map(AIP-12, 'part')")(ctx(segment=second)) == "needs-action"
    assert compile_condition("AIP-4 == ASST")(ctx(segment=second))
    # $ is the value a template is applied to, whatever segment the template is at.
    assert compile_expression("$.4")(ctx(value="100^^^NORTH^MR", segment=second)) == "NORTH"
    assert compile_expression("$")(ctx(value="a\\T\\b")) == "a&b"


@pytest.mark.parametrize("text", ["$-3.2", "map($-12, 'part')", "$-19[*]"])
def test_the_old_dollar_minus_form_is_refused_with_the_new_one(text):
    from engine.transform.expr import OldSegmentNotation

    with pytest.raises(OldSegmentNotation) as info:
        compile_expression(text)
    assert "old notation" in str(info.value)
    assert info.value.hint("AIP").startswith(f"write AIP-{info.value.old[2:]}: ")


def test_offsets_are_kept_and_missing_ones_come_from_the_time_zone():
    assert fhir_datetime("20261201093000-0500", timezone.utc) == "2026-12-01T09:30:00-05:00"
    assert fhir_datetime("20260701093000", ZoneInfo("America/Chicago")) == "2026-07-01T09:30:00-05:00"
    assert fhir_datetime("202607", timezone.utc) == "2026-07"


def test_stable_ids():
    get = compile_expression("id('Patient', PID-3.1)")
    assert get(ctx()) == get(ctx()) and len(get(ctx())) == 36


@pytest.mark.parametrize(
    "text, expected",
    [
        ("MSH-9.2 == S15", True),
        ("MSH-9.2 == 'S12'", False),
        ("MSH-9.2 != S12", True),
        ("MSH-9.2 in [S12, S15]", True),
        ("MSH-9.2 not in [S12, S15]", False),
        ("PID-3[*].5 == PI", True),  # any repetition
        ("PID-3[*].5 != PI", False),
        ("PV1-2 missing", True),
        ("PID-3 exists", True),
        ("MSH-9.2 matches '^S1[0-9]$'", True),
    ],
)
def test_conditions(text, expected):
    assert compile_condition(text)(ctx()) is expected


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("booked", "text must be quoted"),
        ("\"'booked'\"", "quoted twice"),
        ("nofunc(PID-3)", "unknown function nofunc()"),
        ("map(PID-8, 'nosuch')", "no code map 'nosuch'"),
        ("dateTime(PID-7, PID-8)", "takes 1 argument"),
        ("PID-3 |", "expected a path"),
        ("PID-0", "indexes start at 1"),
        ("join(' ', 'x')", "join() takes a separator and a path"),
    ],
)
def test_errors_say_what_to_write(text, fragment):
    with pytest.raises(ExpressionError) as info:
        compile_expression(text, tables={"status"})
    assert fragment in str(info.value)


def test_condition_errors():
    with pytest.raises(ExpressionError, match="expected ==, !=, in"):
        compile_condition("PID-3")
    with pytest.raises(ExpressionError, match="matches needs a quoted pattern"):
        compile_condition("PID-3 matches PID-4")


def test_bad_data_is_a_value_error_not_a_crash():
    with pytest.raises(ValueError, match="not an HL7 date/time"):
        compile_expression("dateTime(PID-5.1)")(ctx())
