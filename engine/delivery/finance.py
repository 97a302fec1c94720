"""Canonical financial events: what the finance side (an ERP) receives, derived from a Bundle.

Schema ``hl7bridge.finance/v1`` (docs/destinations.md documents every field):

    {
      "schema": "hl7bridge.finance/v1",
      "event": "charge.posted" | "credit.posted" | "adjustment.posted" | "copay.posted"
             | "payment.received" | "appointment.booked" | "appointment.cancelled",
      "event_id": "stable: the same message gives the same IDs (the ERP's idempotency key)",
      "occurred_at": "FHIR dateTime of the service or the appointment",
      "account": {"number": "PID-18", "patient_id": "PID-3", "patient_name": "FAMILY, Given"},
      "transaction": {"id", "type", "code", "code_system", "description", "quantity",
                      "amount", "currency", "posted_at", "department"}        (money events)
      "appointment": {"id", "status", "start", "end", "service"}              (appointment events)
      "source": {"message_id", "control_id"}
    }

Amounts keep the sign the sender gave them: credits, payments and adjustments are negative from
the senders we know. Plain Python: no I/O.
"""

from __future__ import annotations

from ..stamps import stable_id

SCHEMA = "hl7bridge.finance/v1"
MONEY_EVENTS = {"CG": "charge.posted", "CD": "credit.posted", "AJ": "adjustment.posted",
                "CO": "copay.posted", "PY": "payment.received"}
TRANSACTION_TYPE_URL = "https://hl7bridge.org/fhir/StructureDefinition/transaction-type"


def _by_url(bundle: dict) -> dict:
    return {entry["fullUrl"]: entry["resource"] for entry in bundle.get("entry", [])}


def _first_identifier(resource: dict | None) -> str | None:
    for identifier in (resource or {}).get("identifier", []) or []:
        if identifier.get("value"):
            return identifier["value"]
    return None


def _name(patient: dict | None) -> str | None:
    for name in (patient or {}).get("name", []) or []:
        given = " ".join(name.get("given", []) or [])
        family = name.get("family", "")
        return f"{family}, {given}".strip(", ") or None
    return None


def _coding(concept: dict | None) -> dict:
    codings = (concept or {}).get("coding") or [{}]
    return {**codings[0], "text": (concept or {}).get("text")}


def events(bundle: dict, message_id: int, control_id: str, discriminator: str = "") -> list[dict]:
    """The finance events a converted message gives (ChargeItems; Appointments booked or cancelled).

    ``discriminator`` goes into every event ID: empty for an ordinary message, so a replay gives
    the same IDs; set for a message that reused an earlier message's control ID with different
    content, so its events are not taken by the ERP for the earlier message's.
    """
    resources = _by_url(bundle)
    key = f"{control_id}~{discriminator}" if discriminator else control_id
    out = []
    for entry in bundle.get("entry", []):
        resource = entry["resource"]
        kind = resource["resourceType"]
        if kind == "ChargeItem":
            out.append(_charge_event(resource, resources, message_id, control_id, key))
        elif kind == "Appointment" and resource.get("status") in ("booked", "cancelled", "noshow", "entered-in-error"):
            out.append(_appointment_event(resource, resources, message_id, control_id, key))
    return [event for event in out if event is not None]


def _account(resource: dict, resources: dict) -> dict:
    subject = resource.get("subject") or {}
    patient = resources.get(subject.get("reference", ""))
    account_refs = resource.get("account") or []
    account = resources.get(account_refs[0]["reference"]) if account_refs else None
    return {"number": _first_identifier(account), "patient_id": _first_identifier(patient), "patient_name": _name(patient)}


def _charge_event(item: dict, resources: dict, message_id: int, control_id: str, key: str) -> dict | None:
    ttype = None
    for extension in item.get("extension", []) or []:
        if extension.get("url") == TRANSACTION_TYPE_URL:
            ttype = (extension.get("valueCoding") or {}).get("code")
    event = MONEY_EVENTS.get(ttype or "CG", "charge.posted")
    code = _coding(item.get("code"))
    price = item.get("priceOverride") or {}
    transaction_id = _first_identifier(item)
    cost_center = resources.get((item.get("costCenter") or {}).get("reference", ""))
    notes = item.get("note") or [{}]
    return {
        "schema": SCHEMA,
        "event": event,
        "event_id": stable_id("finance", key, transaction_id or code.get("code") or "", event),
        "occurred_at": item.get("occurrenceDateTime") or (item.get("occurrencePeriod") or {}).get("start"),
        "account": _account(item, resources),
        "transaction": {
            "id": transaction_id,
            "type": ttype or "CG",
            "code": code.get("code"),
            "code_system": code.get("system"),
            "description": notes[0].get("text") or code.get("display") or code.get("text"),
            "quantity": (item.get("quantity") or {}).get("value", 1),
            "amount": price.get("value"),
            "currency": price.get("currency"),
            "posted_at": item.get("enteredDate"),
            "department": (cost_center or {}).get("name"),
        },
        "source": {"message_id": message_id, "control_id": control_id},
    }


def _appointment_event(appointment: dict, resources: dict, message_id: int, control_id: str, key: str) -> dict:
    patient_ref = next((p["actor"]["reference"] for p in appointment.get("participant", [])
                        if resources.get(p.get("actor", {}).get("reference", ""), {}).get("resourceType") == "Patient"), "")
    patient = resources.get(patient_ref)
    status = appointment["status"]
    event = "appointment.booked" if status == "booked" else "appointment.cancelled"
    filler = next((i["value"] for i in appointment.get("identifier", [])
                   if (i.get("type") or {}).get("coding", [{}])[0].get("code") == "FILL"), _first_identifier(appointment))
    service = _coding((appointment.get("serviceType") or [None])[0])
    return {
        "schema": SCHEMA,
        "event": event,
        "event_id": stable_id("finance", key, filler or "", event),
        "occurred_at": appointment.get("start"),
        "account": {"number": None, "patient_id": _first_identifier(patient), "patient_name": _name(patient)},
        "appointment": {"id": filler, "status": status, "start": appointment.get("start"),
                        "end": appointment.get("end"), "service": service.get("display") or service.get("code")},
        "source": {"message_id": message_id, "control_id": control_id},
    }
