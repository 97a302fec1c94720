"""The test FHIR server (tests/fhir_server, Medplum's router in memory) does what the other tests rely on.

Without Node.js the fixtures skip these tests, or fail them when HL7BRIDGE_REQUIRE_FHIR_SERVER=1
(as in CI): the module has no skip of its own that would bypass that.
"""

from __future__ import annotations

import uuid

import fhirserver

fhir_server = fhirserver.fhir_server  # the fixtures (conftest may import them instead)
fhir_server_factory = fhirserver.fhir_server_factory

def appointment_bundle():
    patient_url = f"urn:uuid:{uuid.uuid4()}"
    return {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {
                "fullUrl": patient_url,
                "resource": {"resourceType": "Patient", "identifier": [{"system": "urn:x", "value": "1"}],
                             "name": [{"family": "TEST"}]},
                "request": {"method": "PUT", "url": "Patient?identifier=urn:x|1"},
            },
            {
                "fullUrl": f"urn:uuid:{uuid.uuid4()}",
                "resource": {"resourceType": "Appointment", "status": "booked",
                             "identifier": [{"system": "urn:appt", "value": "A1"}],
                             "start": "2024-05-01T09:00:00Z", "end": "2024-05-01T09:30:00Z",
                             "participant": [{"actor": {"reference": patient_url}, "status": "accepted"}]},
                "request": {"method": "PUT", "url": "Appointment?identifier=urn:appt|A1"},
            },
        ],
    }


def test_transaction_is_idempotent_and_resolves_urn_uuid(fhir_server):
    first = fhir_server.transaction(appointment_bundle())
    assert first["type"] == "transaction-response"
    assert [e["response"]["status"] for e in first["entry"]] == ["201", "201"]
    second = fhir_server.transaction(appointment_bundle())  # new urn:uuids, same identifiers
    assert [e["response"]["status"] for e in second["entry"]] == ["200", "200"]

    patients = fhir_server.resources("Patient", identifier="urn:x|1")
    appointments = fhir_server.resources("Appointment")
    assert len(patients) == 1 and len(appointments) == 1
    assert appointments[0]["participant"][0]["actor"]["reference"] == f"Patient/{patients[0]['id']}"
    assert fhir_server.get(f"Patient/{patients[0]['id']}")["name"][0]["family"] == "TEST"


def test_invalid_resource_is_a_400_operation_outcome(fhir_server):
    status, headers, body = fhir_server.request("POST", "Appointment", {"resourceType": "Appointment"})
    assert status == 400
    assert headers["Content-Type"].startswith("application/fhir+json")
    assert body["resourceType"] == "OperationOutcome"
    assert ["Appointment.status"] in [issue.get("expression") for issue in body["issue"]]

    bundle = appointment_bundle()
    del bundle["entry"][1]["resource"]["status"]
    status, _, body = fhir_server.request("POST", "", bundle)
    assert status == 400 and body["resourceType"] == "OperationOutcome"

    status, _, body = fhir_server.request("GET", "Patient/does-not-exist")
    assert status == 404 and body["resourceType"] == "OperationOutcome"


def test_bearer_token(fhir_server_factory):
    server = fhir_server_factory(token="secret")
    assert server.search("Patient")["type"] == "searchset"  # the helper sends the token
    status, headers, body = server.request("GET", "Patient", auth=False)
    assert status == 401 and headers.get("WWW-Authenticate") == "Bearer"
    assert body["resourceType"] == "OperationOutcome"
    status, _, _ = server.request("GET", "Patient", auth=False, headers={"Authorization": "Bearer wrong"})
    assert status == 401


def test_fail_next_then_recover(fhir_server):
    fhir_server.fail_next(503, count=2, retry_after=1)
    for _ in range(2):
        status, headers, body = fhir_server.request("POST", "", appointment_bundle())
        assert status == 503 and headers["Retry-After"] == "1"
        assert body["resourceType"] == "OperationOutcome"
    status, _, _ = fhir_server.request("POST", "", appointment_bundle())
    assert status == 200
    assert fhir_server.stats() == {"requests": 3, "injectedFailures": 2, "pendingFailures": 0}

    fhir_server.reset()
    assert fhir_server.resources("Appointment") == []


def test_restart_on_the_same_port_starts_empty(fhir_server):
    fhir_server.transaction(appointment_bundle())
    port = fhir_server.port
    fhir_server.stop()
    fhir_server.start()
    assert fhir_server.port == port
    assert fhir_server.resources("Patient") == []
