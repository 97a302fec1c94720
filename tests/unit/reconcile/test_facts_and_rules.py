"""The pure parts of scheduling to cash: what a message says, an appointment's state from its
events in any order, which appointment a charge belongs to, and the reconcile: settings."""

from datetime import timezone
from itertools import permutations

import pytest

from conftest import EXAMPLES
from engine.errors import ConfigError
from engine.hl7.er7 import parse
from engine.reconcile.facts import extract, key_for, read_time, zone_of
from engine.reconcile.rules import choose_link, current_state
from engine.reconcile.settings import Rules, load

CHICAGO = zone_of("America/Chicago")


def message(name, *edits):
    text = (EXAMPLES / name).read_bytes().decode()
    for old, new in edits:
        assert old in text
        text = text.replace(old, new)
    return parse(text)


def test_an_siu_gives_its_appointment_with_status_time_patient_visit_place_and_provider():
    facts = extract(message("siu_s12.hl7"), "2026-11-20T16:00:00.000000Z", CHICAGO)
    a = facts.appointment
    assert (a.facility, a.appointment_id, a.placer_id, a.trigger, a.event, a.status, a.filler_status) == (
        "NORTHCLINIC", "90001", "80001", "S12", "booked", "booked", "Booked")
    assert (a.start_at, a.start_day) == ("2026-12-01T15:30:00.000000Z", "2026-12-01")
    assert (a.patient_id, a.visit_id, a.location, a.provider) == ("100234", "V900123", "NCFM", "D10045")
    assert a.occurred_at == "2026-11-20T16:15:12.000000Z" and facts.charges == ()


@pytest.mark.parametrize("name, status, event", [("siu_s15.hl7", "cancelled", "cancelled"),
                                                 ("siu_s17.hl7", "deleted", "deleted"),
                                                 ("siu_s26.hl7", "noshow", "no-show")])
def test_triggers_set_the_status(name, status, event):
    a = extract(message(name), "2026-11-20T16:00:00.000000Z", CHICAGO).appointment
    assert (a.status, a.event) == (status, event)


def test_sch25_says_the_status_of_a_modification_and_placer_id_keys_without_a_filler_id():
    assert extract(message("siu_s14.hl7"), "x", CHICAGO).appointment.status == "booked"
    for code, status in (("Complete", "fulfilled"), ("Started", "arrived"), ("Noshow", "noshow"), ("Waitlist", "pending")):
        a = extract(message("siu_s14.hl7", ("|Booked^Booked^HL70278", f"|{code}^{code}^HL70278")), "x", CHICAGO).appointment
        assert (a.trigger, a.filler_status, a.status) == ("S14", code, status)
    no_filler = extract(message("siu_s12.hl7", ("|90001^NORTHSCHED|", "||")), "x", CHICAGO).appointment
    assert no_filler.appointment_id == "80001" and no_filler.filler_id == ""


def test_each_ft1_is_a_line_with_its_type_times_and_amount():
    facts = extract(message("dft_p03.hl7"), "2026-12-09T00:00:00.000000Z", CHICAGO)
    lines = [(c.charge_key, c.kind, c.service_day, c.made_at, c.amount, c.currency) for c in facts.charges]
    assert lines == [
        ("TX20261208-0001", "charge", "2026-12-08", "2026-12-08T23:30:00.000000Z", 185.0, "USD"),
        ("TX20261208-0002", "credit", "2026-12-08", "2026-12-08T23:30:00.000000Z", -25.0, "USD"),
        ("TX20261208-0003", "payment", "2026-12-08", "2026-12-08T23:30:00.000000Z", -30.0, "USD"),
        ("TX20261208-0004", "adjustment", "2026-12-08", "2026-12-08T23:30:00.000000Z", -40.0, "USD"),
    ]
    # Without FT1-5 the charge was made at EVN-2; without FT1-2 it is keyed by message and set ID.
    bare = extract(message("dft_p03.hl7", ("|TX20261208-0001||20261208093000-0600^20261208101500-0600|20261208173000-0600|",
                                           "|||20261208093000-0600^20261208101500-0600||")), "x", CHICAGO).charges[0]
    assert bare.transaction_id is None and key_for(bare, 42) == "message 42 line 1"
    assert bare.made_at == "2026-12-08T23:30:00.000000Z"  # EVN-2, 17:30 at -0600


def test_times_without_an_offset_are_read_in_the_routes_zone():
    assert read_time("202607011200", CHICAGO).at == "2026-07-01T17:00:00.000000Z"  # CDT, -0500
    assert read_time("20260701", timezone.utc).day == "2026-07-01"
    assert read_time("2026-07-01", CHICAGO) is None and read_time("", CHICAGO) is None


def test_impossible_offsets_and_moments_outside_the_calendar_are_no_time():
    # Found by the generated variants (test_fast_validation): an FT1-4 of 0001-3000 stopped the
    # whole conversion with Python's own error instead of being no time.
    assert read_time("0001-3000", CHICAGO) is None  # an offset of -30 hours
    assert read_time("202607011200+2400", CHICAGO) is None
    assert read_time("00010101+2300", CHICAGO) is None  # before the year 1 in UTC
    assert read_time("99991231235959-2300", CHICAGO) is None  # after 9999 in UTC
    assert read_time("202607011200-2300", CHICAGO).at == "2026-07-02T11:00:00.000000Z"


EVENTS = [
    {"message_id": 1, "occurred_at": "2026-11-01T10:00:00Z", "status": "booked", "start_at": "2026-11-05T15:00:00Z",
     "start_day": "2026-11-05", "patient_id": "P1", "visit_id": "V1"},
    {"message_id": 2, "occurred_at": "2026-11-03T10:00:00Z", "status": "booked", "start_at": "2026-11-07T15:00:00Z",
     "start_day": "2026-11-07"},
    {"message_id": 3, "occurred_at": "2026-11-07T09:00:00Z", "status": "cancelled"},
]


def test_the_state_is_the_same_whatever_order_the_events_came_in():
    states = {tuple(sorted(current_state(list(order)).items())) for order in permutations(EVENTS)}
    assert len(states) == 1
    state = current_state(EVENTS)
    assert (state["status"], state["start_day"], state["same_day_cancel"], state["last_message_id"]) == (
        "cancelled", "2026-11-07", 1, 3)


def test_a_charge_links_by_visit_then_by_patient_and_day_preferring_an_appointment_that_expects_one():
    booked = {"appointment_id": "A1", "status": "booked", "start_day": "2026-11-05", "start_at": "x", "patient_id": "P1",
              "visit_id": "V1"}
    cancelled = dict(booked, appointment_id="A0", status="cancelled", visit_id="V0")
    next_day = dict(booked, appointment_id="A2", start_day="2026-11-06", visit_id="V2")
    charge = {"visit_id": "V9", "patient_id": "P1", "service_day": "2026-11-05", "made_at": "2026-11-05T20:00:00Z"}
    assert choose_link(dict(charge, visit_id="V2"), [booked, next_day], Rules()) == ("A2", "visit")
    assert choose_link(charge, [cancelled, booked, next_day], Rules()) == ("A1", "patient_date")
    assert choose_link(dict(charge, service_day="2026-11-06"), [booked], Rules()) is None
    assert choose_link(dict(charge, service_day="2026-11-06"), [booked], Rules(date_window=1)) == ("A1", "patient_date")
    assert choose_link(charge, [booked], Rules(link=("visit",))) is None


def test_reconcile_settings_are_checked_with_file_and_line(tmp_path):
    (tmp_path / "hl7bridge.yaml").write_text(
        "reconcile:\n  charge_window: 2d\n  facilities:\n    EAST: {link: [patient_date], date_window: 1d}\n")
    settings = load(tmp_path)
    assert settings.rules("EAST") == Rules(charge_window=2 * 86400.0, link=("patient_date",), date_window=1)
    assert settings.rules("NORTH") == Rules(charge_window=2 * 86400.0)
    for text, words in (("reconcile:\n  charge_windo: 2d\n", "unknown key 'charge_windo' in reconcile"),
                        ("reconcile:\n  link: [visit, nearby]\n", "'nearby' is not a linking rule"),
                        ("reconcile:\n  date_window: 12h\n", "is whole days"),
                        ("reconcile:\n  report: {at: '06:00'}\n", "reconcile.report.directory: is required")):
        (tmp_path / "hl7bridge.yaml").write_text(text)
        with pytest.raises(ConfigError) as info:
            load(tmp_path)
        assert words in str(info.value) and "hl7bridge.yaml:2" in str(info.value)
