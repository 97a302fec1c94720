"""FHIR messages: a mapped transaction Bundle turned into a message Bundle for destinations that
ask for one (``payload: message``, docs/destinations.md).

A message Bundle (``type: message``) starts with a MessageHeader that says which event it is
(the HL7 v2 trigger, from the Provenance's ``activity``), where it comes from (the route) and where
it goes (the destination), and what it is about (``focus``: the resources the message is about,
not the patients, practitioners, places and other resources they point to); the other entries
follow, without their ``request``. Derived from the journaled Bundle at send time, so one
conversion serves every destination.

The MessageHeader's ID is stable for a conversion and a destination: a retry is the same message
(a receiver may answer it as a duplicate); a message mapped again (``replay --remap``) is new.
"""

from __future__ import annotations

from ..stamps import stable_id

V2_EVENTS = "http://terminology.hl7.org/CodeSystem/v2-0003"
# What the message is not about, only refers to: left out of MessageHeader.focus.
SUPPORTING = frozenset({"Patient", "Practitioner", "PractitionerRole", "RelatedPerson", "Location", "Device",
                        "Organization", "Account", "Provenance"})


def message_bundle(bundle: dict, destination_name: str, destination_endpoint: str = "") -> dict:
    """The message Bundle for ``bundle`` (a transaction Bundle made by the mappings)."""
    entries = bundle.get("entry", [])
    provenance = next((e["resource"] for e in entries if e["resource"].get("resourceType") == "Provenance"), {})
    coding = ((provenance.get("activity") or {}).get("coding") or [None])[0]
    policies = provenance.get("policy") or []
    source = next((p for p in policies if p.startswith("urn:hl7bridge:route:")), "urn:hl7bridge:route:none")
    header_id = stable_id("MessageHeader", provenance.get("id", ""), provenance.get("recorded", ""), destination_name)
    header = {"resourceType": "MessageHeader", "id": header_id}
    if coding and coding.get("code"):
        header["eventCoding"] = {"system": coding.get("system", V2_EVENTS), "code": coding["code"]}
    else:
        header["eventUri"] = "urn:hl7bridge:event:unknown"
    header["destination"] = [{"name": destination_name,
                              "endpoint": destination_endpoint or f"urn:hl7bridge:destination:{destination_name}"}]
    header["source"] = {"name": "hl7bridge", "endpoint": source}
    focus = [{"reference": e["fullUrl"]} for e in entries if e["resource"].get("resourceType") not in SUPPORTING]
    if focus:
        header["focus"] = focus
    message = {
        "resourceType": "Bundle",
        "id": stable_id("Bundle", header_id),
        "type": "message",
        "entry": [{"fullUrl": f"urn:uuid:{header_id}", "resource": header}]
        + [{"fullUrl": e["fullUrl"], "resource": e["resource"]} for e in entries],
    }
    if provenance.get("recorded"):
        message["timestamp"] = provenance["recorded"]
    return message
