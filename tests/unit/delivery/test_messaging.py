"""FHIR messages (payload: message): the MessageHeader made from a mapped Bundle, how the FHIR and
file senders send it, and the destination key that asks for it."""

import json
from datetime import datetime, timezone

import pytest
from fhir.resources.R4B import get_fhir_model_class

from conftest import EXAMPLES, ROOT
from engine.delivery.destinations import Destination, load_destination
from engine.delivery.messaging import message_bundle
from engine.delivery.outbox import OK, PERMANENT
from engine.delivery.senders import FhirSender, FileSender
from engine.errors import ConfigError
from engine.store.base import Delivery
from engine.transform import pipeline
from engine.transform.project import Project
from test_http_senders import Response, fired, sender_with

NOW = datetime(2026, 12, 1, 12, 0, tzinfo=timezone.utc)


@pytest.fixture(scope="module")
def bundles():
    project = Project.load(ROOT)
    return {name: pipeline.convert(project, pipeline.read((EXAMPLES / f"{name}.hl7").read_bytes()), now=NOW).bundle
            for name in ("siu_s12", "dft_p03")}


def test_a_message_starts_with_its_header_and_keeps_every_resource(bundles):
    bundle = bundles["siu_s12"]
    message = message_bundle(bundle, "hie", "https://hie.example.org/fhir")
    get_fhir_model_class("Bundle").model_validate(message)  # the whole message, every resource in it
    assert message["type"] == "message" and message["timestamp"] == "2026-12-01T12:00:00Z"
    header = message["entry"][0]["resource"]
    assert header["resourceType"] == "MessageHeader"  # FHIR invariant bdl-12: a message starts with one
    assert header["eventCoding"] == {"system": "http://terminology.hl7.org/CodeSystem/v2-0003", "code": "S12"}
    assert header["source"] == {"name": "hl7bridge", "endpoint": "urn:hl7bridge:route:clinic-scheduling"}
    assert header["destination"] == [{"name": "hie", "endpoint": "https://hie.example.org/fhir"}]
    # Focus: what the message is about, not the patient, staff, places and equipment it points to.
    types = {e["fullUrl"]: e["resource"]["resourceType"] for e in bundle["entry"]}
    assert sorted(types[f["reference"]] for f in header["focus"]) == ["Appointment", "Encounter"]
    # Every resource, with its fullUrl, without request (bdl-3: request only in batches and transactions).
    assert [e["fullUrl"] for e in message["entry"][1:]] == [e["fullUrl"] for e in bundle["entry"]]
    assert all("request" not in e for e in message["entry"])
    assert len({e["fullUrl"] for e in message["entry"]}) == len(message["entry"])  # bdl-7


def test_the_header_id_is_stable_for_one_conversion_and_one_destination(bundles):
    bundle = bundles["dft_p03"]
    first = message_bundle(bundle, "hie")["entry"][0]["resource"]
    assert message_bundle(bundle, "hie")["entry"][0]["resource"]["id"] == first["id"]  # a retry: the same message
    assert message_bundle(bundle, "other")["entry"][0]["resource"]["id"] != first["id"]
    remapped = json.loads(json.dumps(bundle))
    remapped["entry"][-1]["resource"]["recorded"] = "2026-12-02T08:00:00Z"  # replay --remap: converted again
    assert message_bundle(remapped, "hie")["entry"][0]["resource"]["id"] != first["id"]
    assert first["eventCoding"]["code"] == "P03" and first["destination"][0]["endpoint"] == "urn:hl7bridge:destination:hie"


def delivery(bundle):
    return Delivery(7, 3, "hie", "patient:100234", "pending", 0, "2026-11-24T06:00:00.000000Z", "EC000501",
                    json.dumps(bundle))


def test_a_fhir_destination_posts_the_message_to_process_message(bundles):
    sender, agent, _ = sender_with(FhirSender, lambda *a: Response(200, b'{"resourceType": "Bundle"}'),
                                   payload="message")
    assert fired(sender.send(delivery(bundles["dft_p03"]))).outcome == OK
    [(method, url, headers, body)] = agent.requests
    assert (method, url) == ("POST", "https://fhir.example.org/R4/$process-message")
    assert headers["content-type"] == "application/fhir+json"
    assert json.loads(body) == message_bundle(bundles["dft_p03"], "x", "https://fhir.example.org/R4")
    refused, _, _ = sender_with(FhirSender, lambda *a: Response(422, b"{}"), payload="message")
    result = fired(refused.send(delivery(bundles["dft_p03"])))
    assert (result.outcome, result.error) == (PERMANENT, "HTTP 422 on $process-message")


def test_a_file_destination_writes_the_message(tmp_path, bundles):
    destination = Destination(name="hie", type="file", path="x.yaml", directory=tmp_path, payload="message")
    sender = FileSender(destination, run_blocking=None, clock=lambda: NOW)
    assert sender.write(delivery(bundles["siu_s12"])).outcome == OK
    [record] = [json.loads(line) for line in (tmp_path / "2026-12-01.ndjson").read_text().splitlines()]
    assert record["bundle"] == message_bundle(bundles["siu_s12"], "hie")


def test_the_payload_key(tmp_path):
    path = tmp_path / "hie.yaml"
    path.write_text("name: hie\ntype: fhir\nurl: https://hie.example.org/fhir\npayload: message\n")
    assert load_destination(path, tmp_path).payload == "message"
    path.write_text("name: hie\ntype: fhir\nurl: https://hie.example.org/fhir\npayload: finance-events\n")
    with pytest.raises(ConfigError, match="hie.yaml:4: .*a FHIR destination takes bundle or message"):
        load_destination(path, tmp_path)
    path.write_text("name: hie\ntype: fhir\nurl: https://hie.example.org/fhir\npayload: mesage\n")
    with pytest.raises(ConfigError, match="'mesage' is not one of bundle, message, finance-events"):
        load_destination(path, tmp_path)
