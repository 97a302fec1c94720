"""Canonical finance events (hl7bridge.finance/v1) from the golden Bundles in examples/: plain data in, plain data out."""

import json

import pytest

from conftest import EXAMPLES
from engine.delivery.finance import MONEY_EVENTS, SCHEMA, events
from engine.stamps import stable_id


def bundle(name):
    return json.loads((EXAMPLES / f"{name}.fhir.json").read_text())


def test_every_ft1_of_a_dft_is_one_money_event_with_the_sign_the_sender_gave():
    found = events(bundle("dft_p03"), 3, "EC000501")
    assert [(e["event"], e["transaction"]["type"], e["transaction"]["amount"]) for e in found] == [
        ("charge.posted", "CG", 185.0), ("credit.posted", "CD", -25.0),
        ("payment.received", "PY", -30.0), ("adjustment.posted", "AJ", -40.0),
    ]
    first = found[0]
    assert first["schema"] == SCHEMA
    assert first["account"] == {"number": "A2026120877", "patient_id": "300612", "patient_name": "TESTPATIENT, JORDAN L"}
    assert first["source"] == {"message_id": 3, "control_id": "EC000501"}
    assert first["transaction"]["currency"] == "USD" and first["transaction"]["id"]
    assert set(MONEY_EVENTS.values()) >= {e["event"] for e in found}


def test_event_ids_are_stable_and_a_reused_control_id_gets_its_own():
    again = [e["event_id"] for e in events(bundle("dft_p03"), 99, "EC000501")]
    assert [e["event_id"] for e in events(bundle("dft_p03"), 3, "EC000501")] == again  # a replay: same IDs
    assert len(set(again)) == 4
    first = events(bundle("dft_p03"), 3, "EC000501")[0]
    assert first["event_id"] == stable_id("finance", "EC000501", first["transaction"]["id"], "charge.posted")
    reused = [e["event_id"] for e in events(bundle("dft_p03"), 8, "EC000501", discriminator="8")]
    assert not set(reused) & set(again)  # the ERP does not take them for the earlier message's


@pytest.mark.parametrize("name, event", [("siu_s12", "appointment.booked"), ("siu_s15", "appointment.cancelled"),
                                         ("siu_s17", "appointment.cancelled"), ("siu_s26", "appointment.cancelled")])
def test_appointments_booked_or_cancelled(name, event):
    [found] = events(bundle(name), 1, "NC000123")
    assert found["event"] == event
    assert found["account"]["patient_id"] and found["account"]["number"] is None
    assert found["appointment"]["id"] and found["appointment"]["start"]


def test_a_bundle_without_charges_or_appointments_gives_no_events():
    assert events({"resourceType": "Bundle", "entry": []}, 1, "X") == []
