"""Fields in the shapes real senders use (docs/mappings.md, "What we accept", "Mapping the fields"),
and the Appointment's timing from the most precise source: each case a minimal message of ours,
with a comment saying which sender habit it covers, what it maps to and the exact warning.

The messages come from NORTHCLINIC, so the clinic-scheduling and clinic-charges routes take them,
in the America/Chicago time zone (times without an offset are read there).
"""

from __future__ import annotations

import shutil
from datetime import datetime, timezone

import pytest

from conftest import EXAMPLES, ROOT
from engine.hl7.er7 import parse
from engine.transform import pipeline
from engine.transform.expr import Context, DataError, compile_expression, read_dtm
from engine.transform.mappings import invariant_problems
from engine.transform.project import Project

NOW = datetime(2026, 12, 1, 12, 0, tzinfo=timezone.utc)
TIME_UNKNOWN = "https://hl7bridge.org/fhir/StructureDefinition/appointment-time-unknown"


@pytest.fixture(scope="module")
def project():
    return Project.load(ROOT)


def siu(sch9="30", sch10="min", sch11="^^30^20261201093000^20261201100000", trigger="S12", segments=(), tq1=None):
    """A minimal SIU: SCH (with SCH-9, SCH-10, SCH-11), PID, one resource group."""
    lines = [
        f"MSH|^~\\&|SCHED|NORTHCLINIC|HL7BRIDGE|FINANCE|20261120101512||SIU^{trigger}^SIU_S12|NC1|P|2.5.1",
        f"SCH|A1^SCHED|F1^SCHED|||||ROUTINE||{sch9}|{sch10}|{sch11}",
    ]
    if tq1 is not None:
        lines.append(f"TQ1|1||||||{tq1}")
    lines += ["PID|1||100^^^NORTH^MR||DOE^JANE", "RGS|1", *segments]
    return "\r".join(lines) + "\r"


def dft(ft1):
    lines = [
        "MSH|^~\\&|BILLING|NORTHCLINIC|HL7BRIDGE|FINANCE|20261208173000||DFT^P03^DFT_P03|NC2|P|2.5.1",
        "EVN|P03|20261208173000",
        "PID|1||100^^^NORTH^MR||DOE^JANE",
        ft1,
    ]
    return "\r".join(lines) + "\r"


def mapped(project, text):
    converted = pipeline.convert(project, parse(text), now=NOW)
    assert converted.ok, converted.problems
    return converted


def the(converted, kind):
    [found] = [e["resource"] for e in converted.bundle["entry"] if e["resource"]["resourceType"] == kind]
    return found


def failed(project, text):
    converted = pipeline.convert(project, parse(text), now=NOW)
    assert not converted.ok and converted.bundle is None
    return [p.split(" (from ")[0] for p in converted.problems]


# -- durations ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("sch9, sch10, minutes, warnings", [
    # The unit in the duration's own second component, the unit field left empty.
    ("30^MIN", "", 30, ["SCH-9 carries its unit in component 2 ('MIN'); SCH-10 is empty"]),
    # Units spelled as each scheduling system spells them: no warning, they are unambiguous.
    ("30", "MIN", 30, []), ("30", "minutes", 30, []), ("30", "Minutes", 30, []), ("2", "hrs", 120, []),
    ("1", "hour", 60, []), ("1.5", "h", 90, []), ("90", "sec", 2, []), ("1", "d", 1440, []), ("1", "wk", 10080, []),
    # As a CWE with its coding system (ANSI+, UCUM).
    ("30", "min^minutes^ANS+", 30, []), ("30", "min^^UCUM", 30, []), ("45", "s", 1, []),
    # 'M' and 'm': minutes, with a warning (a metre in UCUM, a month to some).
    ("15", "m", 15, ["SCH-10 unit 'm' read as minutes"]), ("15", "M", 15, ["SCH-10 unit 'M' read as minutes"]),
    # No unit at all.
    ("30", "", 30, ["SCH-10 is empty: SCH-9 read as minutes"]),
])
def test_durations_as_senders_write_them(project, sch9, sch10, minutes, warnings):
    converted = mapped(project, siu(sch9=sch9, sch10=sch10))
    assert the(converted, "Appointment")["minutesDuration"] == minutes
    assert converted.warnings == warnings


@pytest.mark.parametrize("sch9, sch10, problem", [
    ("thirty", "min", "Appointment.$let.duration: SCH-9 duration 'thirty' is not a number"),
    ("-5", "min", "Appointment.$let.duration: SCH-9 duration '-5' is negative"),
    ("3", "mo", "Appointment.$let.duration: SCH-10 duration unit 'mo' is not a unit of time we know "
                "(s, min, h, d, wk, or these spelled out)"),
])
def test_a_duration_that_cannot_be_read_is_a_mapping_error_in_words(project, sch9, sch10, problem):
    assert failed(project, siu(sch9=sch9, sch10=sch10)) == [problem]


# -- dates and times ---------------------------------------------------------------------------------

@pytest.mark.parametrize("value, fhir, warnings", [
    # Conformant shapes: no seconds, fractional seconds, hour only, offsets like +0215.
    ("202612010930", "2026-12-01T09:30:00-06:00", []),
    ("20261201093000.1234", "2026-12-01T09:30:00.123400-06:00", []),
    ("20261201093000+0215", "2026-12-01T09:30:00+02:15", []),
    # More digits of fraction than microseconds hold.
    ("20261201093000.1234567", "2026-12-01T09:30:00.123456-06:00",
     ["TQ1-7.1 '20261201093000.1234567' has 7 digits of fractional seconds: cut to microseconds"]),
    # Z for UTC, as ISO 8601 writes it.
    ("20261201153000Z", "2026-12-01T15:30:00+00:00", ["TQ1-7.1 '20261201153000Z' ends in Z: read as UTC (+0000)"]),
    # An offset of hours only.
    ("20261201093000+02", "2026-12-01T09:30:00+02:00",
     ["TQ1-7.1 '20261201093000+02' has an offset of hours only: read as +0200"]),
    # A two-digit year (a Y2K-era system): read near the message's own year (2026), never 2612.
    ("2612010930", "2026-12-01T09:30:00-06:00", ["TQ1-7.1 '2612010930' has a two-digit year: read as 2026"]),
])
def test_start_times_as_senders_write_them(project, value, fhir, warnings):
    converted = mapped(project, siu(sch11="", tq1=f"{value}|20261201100000"))
    assert the(converted, "Appointment")["start"] == fhir
    assert [w for w in converted.warnings if not w.startswith("end ")] == warnings


def test_two_digit_years_are_read_within_50_years_of_the_message():
    # A birth date from a system that writes YYMMDD: 1984, not 2084, for a message of 2026.
    ctx = Context(parse(siu()))
    assert compile_expression("date(PID-7)")(Context(parse(siu().replace("DOE^JANE", "DOE^JANE||840312")))) == "1984-03-12"
    assert read_dtm("840312", 2026).year == 1984 and read_dtm("240312", 2026).year == 2024
    assert read_dtm("760312", 2026).year == 2076 and read_dtm("770312", 2026).year == 1977
    # A four-digit year stays one, however old (a birth date of 1912 is not 2019-12-01 01:00).
    assert read_dtm("19120101", 2026).year == 1912 and read_dtm("202401", 2026).month == 1
    # Never the year 2401: '2401020930' cannot be 2401-02-09 30:..., so it is 2024-01-02 09:30.
    moment = read_dtm("2401020930", 2026)
    assert (moment.year, moment.month, moment.day, moment.hour, moment.minute) == (2024, 1, 2, 9, 30)
    assert ctx.reference_year() == 2026


@pytest.mark.parametrize("value, words", [
    ("20261340", "'20261340' is not a date/time: month 13 is not 01 to 12"),
    ("20260230", "'20260230' is not a date/time: day 30 is not 01 to 28"),
    ("2026120125", "'2026120125' is not a date/time: hour 25 is not 00 to 23"),
    ("20261201+2400", "'20261201+2400' has the offset +2400, which is not a time zone offset (+/-HHMM, hours 00 to 23)"),
    ("21000101", "'21000101': the year 2100 is more than 50 years after the message's (2026), and it is not a date "
                 "with a two-digit year either"),
    ("2026-12-01", "'2026-12-01' is not an HL7 date/time (YYYY[MM[DD[HH[MM[SS[.S]]]]]][+/-ZZZZ])"),
])
def test_a_date_that_is_not_one_is_said_in_words(value, words):
    with pytest.raises(DataError) as info:
        read_dtm(value, 2026)
    assert str(info.value) == words


# -- the Appointment's timing -----------------------------------------------------------------------

def test_the_most_precise_source_wins_and_the_warning_says_where_the_time_came_from(project):
    # SCH-11.4 with only a date, the time in the AIS (an older scheduling system and a newer one).
    converted = mapped(project, siu(sch9="", sch10="", sch11="^^^20261201", segments=[
        "AIS|1||99213^Visit^C4|20261201093000|||30|min"]))
    appointment = the(converted, "Appointment")
    assert (appointment["start"], appointment["end"]) == ("2026-12-01T09:30:00-06:00", "2026-12-01T10:00:00-06:00")
    assert appointment["status"] == "booked" and "requestedPeriod" not in appointment
    assert converted.warnings == [
        "SCH-11.4 has only a date ('20261201'); the time of day comes from AIS-4",
        "end computed from the start (AIS-4) and the duration (AIS-7: 30 min)",
    ]


def test_an_end_comes_from_the_duration_when_none_is_sent(project):
    # Start in SCH-11.4, no SCH-11.5, SCH-9/SCH-10 15 min (Redox's and HAPI's samples).
    converted = mapped(project, siu(sch9="15", sch10="MIN", sch11="^^^20261201093000"))
    appointment = the(converted, "Appointment")
    assert (appointment["start"], appointment["end"]) == ("2026-12-01T09:30:00-06:00", "2026-12-01T09:45:00-06:00")
    assert converted.warnings == ["end computed from the start (SCH-11.4) and the duration (SCH-9: 15 min)"]


def test_an_end_across_a_daylight_saving_change_is_the_right_instant(project):
    # 2026-11-01 01:30 CDT + 60 min is 01:30 CST: a local clock shows 01:30 twice.
    appointment = the(mapped(project, siu(sch9="60", sch10="min", sch11="^^^20261101013000")), "Appointment")
    assert appointment["start"] == "2026-11-01T01:30:00-05:00" and appointment["end"] == "2026-11-01T01:30:00-06:00"
    # With the offset given, the end keeps it: the same instant.
    appointment = the(mapped(project, siu(sch9="60", sch10="min", sch11="^^^20261101013000-0500")), "Appointment")
    assert appointment["end"] == "2026-11-01T02:30:00-05:00"


def test_an_appointment_known_only_to_the_day_covers_the_day_and_says_so(project):
    # A waiting-list style booking: a day, no time anywhere, no duration.
    converted = mapped(project, siu(sch9="", sch10="", sch11="^^^20261201"))
    appointment = the(converted, "Appointment")
    assert appointment["status"] == "booked"  # kept: FHIR's app-3 is met by the whole day
    assert (appointment["start"], appointment["end"]) == ("2026-12-01T00:00:00-06:00", "2026-12-02T00:00:00-06:00")
    assert {"url": TIME_UNKNOWN, "valueBoolean": True} in appointment["extension"]
    assert appointment["requestedPeriod"] == [{"start": "2026-12-01", "end": "2026-12-01"}]
    assert converted.warnings == [
        "the start time is unknown: SCH-11.4 has only a date (2026-12-01): start and end cover the whole day, "
        "marked appointment-time-unknown, and the date is kept in requestedPeriod"]


def test_a_start_without_end_or_duration_covers_its_day_and_keeps_the_start(project):
    converted = mapped(project, siu(sch9="", sch10="", sch11="^^^20261201093000"))
    appointment = the(converted, "Appointment")
    assert (appointment["start"], appointment["end"]) == ("2026-12-01T00:00:00-06:00", "2026-12-02T00:00:00-06:00")
    assert {"url": TIME_UNKNOWN, "valueBoolean": True} in appointment["extension"]
    assert appointment["requestedPeriod"] == [{"start": "2026-12-01T09:30:00-06:00"}]
    assert converted.warnings == [
        "the end is unknown (no end time and no duration): start and end cover the day of the start (SCH-11.4), "
        "marked appointment-time-unknown, and the start time is kept in requestedPeriod"]


def test_without_any_start_a_booked_appointment_is_an_error_and_a_cancelled_one_maps(project):
    assert failed(project, siu(sch9="", sch10="", sch11="")) == [
        "Appointment: FHIR invariant app-3: an Appointment with status booked needs a start and an end, and the "
        "message gives no start time"]
    cancelled = the(mapped(project, siu(sch9="", sch10="", sch11="", trigger="S15")), "Appointment")
    assert cancelled["status"] == "cancelled" and "start" not in cancelled and "end" not in cancelled


def test_every_appointment_meets_app_2_and_app_3():
    assert invariant_problems({"resourceType": "Appointment", "status": "booked", "start": "x"}) == [
        "FHIR invariant app-2: an Appointment has both a start and an end, or neither (it has only a start)"]
    assert invariant_problems({"resourceType": "Appointment", "status": "waitlist"}) == []
    assert invariant_problems({"resourceType": "Appointment", "status": "booked", "start": "x", "end": "y"}) == []


def test_app_4_a_cancelation_reason_only_on_a_cancelled_or_no_show_appointment(project, tmp_path):
    timed = {"resourceType": "Appointment", "start": "x", "end": "y", "cancelationReason": {"text": "ill"}}
    assert invariant_problems({**timed, "status": "cancelled"}) == invariant_problems({**timed, "status": "noshow"}) == []
    [problem] = invariant_problems({**timed, "status": "booked"})
    assert problem == ("FHIR invariant app-4: only a cancelled or no-show Appointment has a cancelation reason, "
                       "and this one's status is booked") and problem.element == "cancelationReason"
    # A mapping that gives SCH-6 whatever the status: refused per message, naming its line.
    for part in ("routes", "mappings", "destinations"):
        shutil.copytree(ROOT / part, tmp_path / part)
    path = tmp_path / "mappings/resource/Appointment.yaml"
    path.write_text(path.read_text().replace("  $when: MSH-9.2 in [S15, S16, S26]\n  $datatype: CWE\n  $from: SCH-6",
                                             "  $datatype: CWE\n  $from: SCH-6", 1))
    raw = (EXAMPLES / "siu_s12.hl7").read_bytes()
    sch = next(line for line in raw.split(b"\r") if line.startswith(b"SCH|"))
    fields = sch.split(b"|")
    fields[6] = b"ILL^Patient ill"
    converted = pipeline.convert(Project.load(tmp_path), pipeline.read(raw.replace(sch, b"|".join(fields), 1)))
    assert not converted.ok
    [problem] = [p for p in converted.problems if "app-4" in p]
    assert f"(from {path}:" in problem and "$from: SCH-6" in problem


# -- groups, notes, people ------------------------------------------------------------------------------

def test_each_resource_group_reads_its_own_segments_and_notes_belong_to_what_they_follow(project):
    text = siu(sch9="", sch10="", sch11="^^^20261201", segments=[
        "AIS|1||99213^Visit^C4|20261201093000|||20|min",
        "NTE|1||Fasting required",  # the service's note, not the appointment's
        "AIP|1||D1^DOC^ANNA",  # no time of its own: the group's service time is the appointment's
        "RGS|2",
        "AIS|1||36415^Draw^C4|20261201095000|||10|min",
        "AIG|1||CHAIR2^Phlebotomy chair^L|EQUIP",
        "AIG|2||N30112^Nurse Carla^L|STAFF",  # a person named as a general resource
        "AIL|1||LAB^DRAW2",
    ]).replace("RGS|1\r", "NTE|1||Patient asked for a morning slot\rRGS|1\r")
    appointment = the(mapped(project, text), "Appointment")
    # That note follows PID, and the AIS's follows the AIS: neither is the appointment's comment.
    assert "comment" not in appointment
    # SCH-11.4 has only the day: the time comes from the (first) service.
    assert appointment["start"] == "2026-12-01T09:30:00-06:00"
    bundle = mapped(project, text).bundle
    urls = {e["fullUrl"]: e["resource"] for e in bundle["entry"]}
    kinds = [urls[p["actor"]["reference"]]["resourceType"] for p in appointment["participant"]]
    assert kinds == ["Patient", "Practitioner", "Location", "Practitioner", "Device"]
    assert urls[appointment["participant"][3]["actor"]["reference"]]["name"] == [{"text": "Nurse Carla"}]
    # Without times of their own, each resource is there from its own group's service on: the doctor
    # (RGS 1) at 09:30, the room, the nurse and the chair (RGS 2) at 09:50.
    starts = [p.get("period", {}).get("start") for p in appointment["participant"]]
    assert starts == [None, "2026-12-01T09:30:00-06:00", *["2026-12-01T09:50:00-06:00"] * 3]


def test_notes_after_sch_are_the_comment_and_nte_2_text_is_read(project):
    # The note after SCH is the comment; the AIS's note is the service's.
    lines = siu(sch11="^^^20261201093000^20261201100000", segments=["AIS|1||99213^Visit^C4", "NTE|1||Fasting"])
    text = lines.replace("\rPID|", "\rNTE|1|P|Patient asked for a morning slot\rPID|")
    assert the(mapped(project, text), "Appointment")["comment"] == "Patient asked for a morning slot"
    # Some senders put the text in NTE-2, the source-of-comment field.
    converted = mapped(project, lines.replace("\rPID|", "\rNTE||Rescheduled by phone\rPID|"))
    assert the(converted, "Appointment")["comment"] == "Rescheduled by phone"
    assert converted.warnings == ["NTE-2 (source of comment) holds text, not an HL7 0105 code: read as the comment"]


def test_an_order_number_gives_the_service_request_the_appointment_is_based_on(project):
    text = siu().replace("|^^30^20261201093000^20261201100000",
                         "|^^30^20261201093000^20261201100000" + "|" * 15 + "ORD1^CPOE^2.16.1^ISO|FORD1^LAB")
    converted = mapped(project, text)
    appointment, order = the(converted, "Appointment"), the(converted, "ServiceRequest")
    urls = {e["resource"]["resourceType"]: e["fullUrl"] for e in converted.bundle["entry"]}
    assert appointment["basedOn"] == [{"reference": urls["ServiceRequest"]}]
    assert [(i["value"], i.get("system"), i["type"]["coding"][0]["code"]) for i in order["identifier"]] == [
        ("ORD1", "urn:oid:2.16.1", "PLAC"), ("FORD1", "urn:hl7bridge:assigner:LAB", "FILL")]
    assert (order["status"], order["intent"], order["subject"]) == ("unknown", "order", {"reference": urls["Patient"]})


# -- money and dates in FT1 ---------------------------------------------------------------------------

def test_a_currency_written_where_the_price_type_goes_is_read(project):
    # FT1-11 as 100.00^USD (the currency in CP.2, not in CP.1's second sub-component).
    converted = mapped(project, dft("FT1|1|TX1||20261208093000||CG|99213^Visit^C4|||1|100.00^USD"))
    assert the(converted, "ChargeItem")["priceOverride"] == {"value": 100.0, "currency": "USD"}
    assert converted.warnings == ["FT1-11.2 'USD' is a currency, not a price type (HL7 0205): read as the currency"]
    # A real price type (UP, unit price) is not a currency.
    other = mapped(project, dft("FT1|1|TX1||20261208093000||CG|99213^Visit^C4|||1|100.00^UP"))
    assert the(other, "ChargeItem")["priceOverride"] == {"value": 100.0} and other.warnings == []


def test_a_service_date_range_is_a_period(project):
    # FT1-4 is a DR from v2.5: start^end.
    item = the(mapped(project, dft("FT1|1|TX1||20261208^20261209||CG|99213^Visit^C4|||1|100.00")), "ChargeItem")
    assert item["occurrencePeriod"] == {"start": "2026-12-08", "end": "2026-12-09"}
    assert "occurrenceDateTime" not in item


def test_an_unqualified_identifier_system_stays_a_uri(project):
    # MSH-4 with a space (GHH Inc.): the fallback system is percent-encoded, never a raw space.
    text = dft("FT1|1|TX1||20261208||CG|99213^Visit^C4|||1|100.00").replace("|NORTHCLINIC|", "|GHH Inc.|", 1)
    item = the(mapped(project, text), "ChargeItem")
    assert item["identifier"] == [{"value": "TX1", "system": "urn:hl7bridge:ft1:GHH%20Inc."}]


def test_a_dft_without_ft1_and_a_siu_without_sch_say_what_is_missing(project):
    assert failed(project, dft("ZZZ|1")) == ["DFT^P03 has no FT1 segment: no ChargeItem can be built"]
    no_sch = "\r".join(line for line in siu().split("\r") if not line.startswith("SCH"))
    assert failed(project, no_sch) == ["SIU^S12 has no SCH segment: no Appointment can be built"]
    # An FT1 whose code fields are empty: the element FHIR requires, and where it is read from.
    [problem] = pipeline.convert(project, parse(dft("FT1|1|TX1||20261208||CG||||1|100.00")), now=NOW).problems
    assert problem.startswith("ChargeItem.code: FHIR requires it, but nothing came from the message for it: the fields "
                              "it is read from are empty (from ")
    assert "mappings/resource/ChargeItem.yaml:" in problem and problem.endswith(" ($from: FT1-7 | FT1-25))")


def test_every_warning_here_is_listed_in_what_we_accept():
    """docs/mappings.md lists every tolerance with its warning text: the very texts asserted above."""
    text = (ROOT / "docs/mappings.md").read_text()
    section = text.split("## What we accept", 1)[1].split("\n## ", 1)[0].replace("\\|", "|")
    expected = [w for *_, warnings in test_durations_as_senders_write_them.pytestmark[0].args[1] for w in warnings]
    expected += [w for *_, warnings in test_start_times_as_senders_write_them.pytestmark[0].args[1] for w in warnings]
    expected += [problem.split(": ", 1)[1] for *_, problem in
                 test_a_duration_that_cannot_be_read_is_a_mapping_error_in_words.pytestmark[0].args[1]]
    expected += [
        "SCH-11.4 has only a date ('20261201'); the time of day comes from AIS-4",
        "end computed from the start (SCH-11.4) and the duration (SCH-9: 15 min)",
        "the start time is unknown: SCH-11.4 has only a date (2026-12-01): start and end cover the whole day, "
        "marked appointment-time-unknown, and the date is kept in requestedPeriod",
        "the end is unknown (no end time and no duration): start and end cover the day of the start (SCH-11.4), "
        "marked appointment-time-unknown, and the start time is kept in requestedPeriod",
        "NTE-2 (source of comment) holds text, not an HL7 0105 code: read as the comment",
        "FT1-11.2 'USD' is a currency, not a price type (HL7 0205): read as the currency",
        "'20261340' is not a date/time: month 13 is not 01 to 12",
    ]
    missing = [w for w in expected if w not in section]
    assert not missing, missing
