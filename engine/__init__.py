"""hl7bridge: an HL7 v2 to FHIR interface engine."""

__version__ = "0.1.0"
