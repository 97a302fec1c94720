"""The fast value check (``fhirspec``) never accepts what fhir.resources rejects.

Three ways, each a differential against the reference validator: every example and every corpus
message converted; thousands of generated variants of the examples (empty, oversized and malformed
values put into the fields the mappings read); and generated values put straight into every kind
of primitive element. Whenever the fast path accepts a resource, fhir.resources must accept it too
(the fast path may be stricter: it then says why in words). Hypothesis keeps no database here, so
the runs write nothing into the tree.
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from conftest import EXAMPLES, corpus_files
from engine.errors import Hl7BridgeError, ParseError
from engine.hl7.charset import decode
from engine.mllp.batch import split_messages
from engine.transform import fhirspec, pipeline
from engine.transform.mappings import validate_resource
from engine.transform.project import Project

ROOT = Path(__file__).resolve().parents[3]
NOW = datetime(2026, 12, 1, 12, 0, tzinfo=timezone.utc)
SAMPLES = sorted(EXAMPLES.glob("*.hl7"))


@pytest.fixture(scope="module")
def project():
    return Project.load(ROOT)


def reference_rejects(resource: dict) -> str | None:
    """What fhir.resources says against a resource, None when it accepts it."""
    checked = resource
    if resource["resourceType"] == "Provenance" and len(resource.get("target", [])) > 1:
        checked = {**resource, "target": resource["target"][:1]}  # as the conversion checks it
    try:
        validate_resource(checked)
    except ValidationError as exc:
        return str(exc)
    return None


def assert_never_more_lenient(project, raw: bytes):
    """Convert (fast path); when it gives a Bundle, fhir.resources must accept every resource in it.
    Returns whether it converted."""
    try:
        message = pipeline.read(raw)
    except ParseError:
        return False
    try:
        converted = pipeline.convert(project, message, now=NOW)
    except ParseError:
        return False
    if not converted.ok:
        return False
    for entry in converted.bundle["entry"]:
        rejected = reference_rejects(entry["resource"])
        assert rejected is None, (entry["resource"], rejected)
    return True


@pytest.mark.parametrize("path", SAMPLES, ids=lambda p: p.name)
def test_examples(project, path):
    for item in split_messages(path.read_bytes()):
        assert_never_more_lenient(project, item.data)


def corpus_messages() -> list[bytes]:
    """Every message of the corpus files we read (skips the test when the corpus is not there)."""
    files = corpus_files()
    if not files:
        pytest.skip("../shared/corpus is not beside this clone (third-party messages are not shipped)")
    found = []
    for path in files:
        try:
            items = split_messages(path.read_bytes())
        except Hl7BridgeError:
            continue  # not a message or batch we read (test_corpus.py says why for each)
        found += [item.data for item in items]
    return found


@pytest.mark.corpus
def test_corpus(project):
    converted = sum(assert_never_more_lenient(project, raw) for raw in corpus_messages())
    assert converted > 10  # the corpus's SIU and DFT messages did convert


# -- generated variants of the examples ---------------------------------------------------------------

MAPPABLE = [p for p in SAMPLES if p.name.startswith(("siu_", "dft_"))]


def fields_of(raw: bytes) -> list[tuple[int, int]]:
    """(segment, field) of every field with something in it, MSH-1 and MSH-2 aside."""
    lines = decode(raw).text.replace("\n", "\r").split("\r")
    found = []
    for s, line in enumerate(lines):
        for f, value in enumerate(line.split("|")[1:], 1):
            if value and not (line.startswith("MSH") and f == 1):
                found.append((s, f))
    return found


def with_values(raw: bytes, changes: list[tuple[int, int, str]]) -> bytes:
    lines = decode(raw).text.replace("\n", "\r").split("\r")
    for s, f, value in changes:
        parts = lines[s].split("|")
        parts[f] = value
        lines[s] = "|".join(parts)
    return "\r".join(lines).encode("utf-8")


printable = st.characters(codec="utf-8", exclude_characters="|\r\n\x00")
VALUES = st.one_of(
    st.just(""),
    st.just('""'),  # HL7's explicit null
    st.text(printable, max_size=12),
    st.text(st.characters(codec="utf-8", categories=["Cc", "Zs", "Nd", "Lu", "Ll", "Po"], exclude_characters="|\r\n"),
            max_size=8),
    st.from_regex(r"\A[0-9]{2,16}(\.[0-9]{1,8})?([+-][0-9]{2,5})?\Z"),  # timestamps right and wrong
    st.from_regex(r"\A-?[0-9]{1,30}(\.[0-9]{0,12})?(E[+-]?[0-9]{1,4})?\Z"),  # numbers, huge ones too
    st.sampled_from(["NaN", "Infinity", "-0", "0", "20240230", "20231301", "2024022912", "99999999999999",
                     "1e999", "  ", "^^^", "&&", "~~", "A^B^C^D^E^F", "X" * 70, "x" * 5000]),
    st.builds(lambda n: "y" * n, st.sampled_from([64, 65, 255, 256, 1024 * 1024 + 1])),  # oversized
)


@st.composite
def variants(draw):
    path = draw(st.sampled_from(MAPPABLE))
    raw = path.read_bytes()
    places = fields_of(raw)
    chosen = draw(st.lists(st.sampled_from(places), min_size=1, max_size=4, unique=True))
    changes = [(s, f, draw(VALUES)) for s, f in chosen]
    if draw(st.booleans()):  # a component of a field instead of the whole field
        s, f = chosen[0]
        parts = raw.decode("utf-8", "replace").replace("\n", "\r").split("\r")[s].split("|")
        components = (parts[f] if f < len(parts) else "").split("^")
        index = draw(st.integers(0, max(0, len(components) - 1)))
        components[index] = draw(VALUES).replace("^", "")
        changes[0] = (s, f, "^".join(components))
    return with_values(raw, changes)


@settings(max_examples=2500, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(raw=variants())
def test_generated_variants_of_the_examples(project, raw):
    assert_never_more_lenient(project, raw)


# -- generated values in every kind of primitive element -------------------------------------------

# An element of each primitive kind the mappings use, in a resource that is otherwise valid.
PLACES = {
    "instant": ("Appointment", "start"), "dateTime": ("Appointment", "created"),
    "date": ("Patient", "birthDate"), "code": ("Appointment", "status"), "id": ("Patient", "id"),
    "uri": ("Patient", "implicitRules"), "decimal": ("ChargeItem", "factorOverride"),
    "positiveInt": ("Appointment", "minutesDuration"), "unsignedInt": ("Appointment", "priority"),
    "integer": ("Patient", "multipleBirthInteger"), "boolean": ("Patient", "active"),
    "string": ("Appointment", "description"), "canonical": ("ChargeItem", "definitionCanonical"),
}
BASE = {
    "Appointment": {"resourceType": "Appointment", "status": "booked", "participant": [{"status": "accepted"}]},
    "Patient": {"resourceType": "Patient"},
    "ChargeItem": {"resourceType": "ChargeItem", "status": "billable", "code": {"text": "x"},
                   "subject": {"reference": "urn:uuid:1"}},
}
ANY_VALUE = st.one_of(
    st.text(max_size=40), st.from_regex(r"\A[0-9T:+\-.Z ]{0,32}\Z"),
    st.from_regex(r"\A[12][0-9]{3}(-[01][0-9](-[0-3][0-9](T[0-2][0-9]:[0-5][0-9](:[0-6][0-9](\.[0-9]{1,9})?)?"
                  r"(Z|[+-][01][0-9]:[0-5][0-9])?)?)?)?\Z"),
    st.integers(min_value=-2**40, max_value=2**40), st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(), st.none(),
)


@settings(max_examples=3000, deadline=None, database=None)
@given(kind=st.sampled_from(sorted(PLACES)), value=ANY_VALUE)
def test_generated_values_in_every_kind_of_element(kind, value):
    resource_type, element = PLACES[kind]
    resource = {**BASE[resource_type], element: value}
    if not fhirspec.problems(resource):
        assert reference_rejects(resource) is None, resource
