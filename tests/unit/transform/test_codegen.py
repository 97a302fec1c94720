"""Mappings compiled to Python (``codegen``) build exactly what the template interpreter builds.

The interpreter (``Node.build``) with ``fhirspec.problems`` is the reference: the generated
builders must give the same Bundle, the same warnings and, for a message that cannot be mapped,
the same problems in the same words, over every example, every corpus message and thousands of
generated variants (the same generator as the fast-validation differential). Beside that, the
generated code must really be the path valid messages take (no silent fallback on everything),
and a generated function must read as the mapping it came from.
"""

from __future__ import annotations

import linecache
from datetime import timezone
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import EXAMPLES
from engine.errors import ConfigError, ParseError
from engine.mllp.batch import split_messages
from engine.transform import fhirspec, mappings as mappings_module, pipeline
from engine.hl7.header import read_header
from engine.transform.mappings import Conversion, MappingError, MappingSet, provenance_values_valid
from engine.transform.project import Project
from test_fast_validation import NOW, ROOT, SAMPLES, VALUES, corpus_messages, variants


@pytest.fixture(scope="module")
def compiled():
    return Project.load(ROOT)


@pytest.fixture(scope="module")
def interpreted():
    project = Project.load(ROOT)
    for resource in project.mappings.resources.values():
        resource.compiled = None  # every resource built by the interpreter, checked by fhirspec
    return project


def outcome(project, raw: bytes):
    try:
        message = pipeline.read(raw)
    except ParseError as exc:
        return ("unreadable", str(exc))
    converted = pipeline.convert(project, message, now=NOW)
    return (converted.status, converted.bundle, converted.warnings, converted.problems)


def assert_same(compiled, interpreted, raw: bytes):
    fast, reference = outcome(compiled, raw), outcome(interpreted, raw)
    assert fast == reference
    return fast[0]


@pytest.mark.parametrize("path", SAMPLES, ids=lambda p: p.name)
def test_examples_give_the_same_bundles(compiled, interpreted, path):
    for item in split_messages(path.read_bytes()):
        assert_same(compiled, interpreted, item.data)


@pytest.mark.corpus
def test_corpus_gives_the_same_bundles_and_problems(compiled, interpreted):
    statuses = [assert_same(compiled, interpreted, raw) for raw in corpus_messages()]
    assert statuses.count("mapped") > 10


@settings(max_examples=2000, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(raw=variants())
def test_generated_variants_give_the_same_outcome(compiled, interpreted, raw):
    assert_same(compiled, interpreted, raw)


def test_a_valid_message_takes_the_generated_path(compiled, monkeypatch):
    """Every resource of a valid SIU is built and checked by generated code: fhirspec.problems
    (the reference walk) does not run at all: the Provenance, built by our code, has only its
    values from the message checked (``provenance_values_valid``)."""
    walked = []
    real = fhirspec.problems
    monkeypatch.setattr(mappings_module.fhirspec, "problems", lambda resource: walked.append(
        resource["resourceType"]) or real(resource))
    converted = pipeline.convert(compiled, pipeline.read((EXAMPLES / "siu_s12.hl7").read_bytes()), now=NOW)
    assert converted.ok
    assert len(converted.bundle["entry"]) > 5
    assert walked == []


def test_a_bad_value_is_explained_by_the_reference_path(compiled):
    """The generated code only notices that SCH-11.4 is not a date/time; the problem the user
    reads names the element, the mapping line and the HL7 field, as the interpreter words it."""
    raw = (EXAMPLES / "siu_s12.hl7").read_bytes().decode()
    lines = raw.replace("\n", "\r").split("\r")
    sch = next(i for i, line in enumerate(lines) if line.startswith("SCH|"))
    fields = lines[sch].split("|")
    timing = fields[11].split("^")
    timing[3] = "2026133099"
    fields[11] = "^".join(timing)
    lines[sch] = "|".join(fields)
    for index, line in enumerate(lines):
        if line.startswith(("TQ1|", "AIS|", "AIL|", "AIP|", "AIG|")):
            lines[index] = line[:3] + "|1"  # no other start time to fall back on
    converted = pipeline.convert(compiled, pipeline.read("\r".join(lines).encode()), now=NOW)
    assert converted.status == "mapping_error"
    assert any("Appointment.$let.begins" in p and "month 13" in p and "Appointment.yaml" in p
               for p in converted.problems), converted.problems


def write(directory: Path, relative: str, text: str):
    path = directory / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_a_required_element_that_came_out_empty_is_reported_as_before(tmp_path):
    """Appointment.participant.status is required; here it is read from a field the message leaves
    empty. The generated check notices the object without it; the words come from fhirspec."""
    write(tmp_path, "message/SIU.yaml", "resources:\n  - {resource: Appointment, from: SCH}\n")
    write(tmp_path, "resource/Appointment.yaml",
          "resourceType: Appointment\nstatus: 'booked'\nparticipant:\n  - status: SCH-20\n    type:\n"
          "      - text: SCH-21\n")
    mapping_set = MappingSet(tmp_path)
    assert mapping_set.resources["Appointment"].compiled is not None
    message = pipeline.read(b"MSH|^~\\&|A|B|C|D|20260101||SIU^S12|1|P|2.5\rSCH|1||||||||||||||||||||ROOM\r")
    with pytest.raises(MappingError) as raised:
        mapping_set.convert(message, "SIU")
    assert raised.value.problems[0] == (
        f"Appointment.participant.0.status: FHIR requires it, but nothing came from the message for it: the "
        f"fields it is read from are empty (from {tmp_path}/resource/Appointment.yaml:4 (SCH-20))")


def test_generated_source_is_readable_and_in_tracebacks(compiled):
    appointment = compiled.mappings.resources["Appointment"].compiled
    source = appointment.source
    assert "Appointment.yaml" in source  # each function says which template it builds
    filename = appointment.__code__.co_filename
    assert linecache.getline(filename, appointment.__code__.co_firstlineno).startswith("def ")
    compile(source, "check", "exec")  # valid Python as read back


def test_a_mapping_the_structure_check_refuses_is_never_compiled(tmp_path):
    write(tmp_path, "message/SIU.yaml", "resources:\n  - {resource: Appointment, from: SCH}\n")
    write(tmp_path, "resource/Appointment.yaml", "resourceType: Appointment\nstatus: 'booked'\nparticipants: []\n")
    with pytest.raises(ConfigError) as raised:
        MappingSet(tmp_path)
    assert "participants" in str(raised.value)


def test_the_interpreter_still_builds_with_tracking(compiled):
    """Tracking (where each value came from) is the interpreter's job: a tracking conversion never
    uses the generated builders, and builds the same Bundle."""
    message = pipeline.read((EXAMPLES / "siu_s12.hl7").read_bytes())
    mapping_set = compiled.mappings
    zone = timezone.utc
    fast = Conversion(mapping_set, message, zone, now=NOW).run(mapping_set.messages["SIU"])
    tracked = Conversion(mapping_set, pipeline.read((EXAMPLES / "siu_s12.hl7").read_bytes()), zone, tracking=True,
                         now=NOW)
    slow = tracked.run(mapping_set.messages["SIU"])
    assert fast.bundle == slow.bundle
    built_from_templates = [checked for _, mapping, checked in tracked.outputs.values() if mapping is not None]
    assert built_from_templates and not any(built_from_templates)


@settings(max_examples=1500, deadline=None, database=None)
@given(values=st.lists(st.tuples(st.sampled_from([3, 4, 7, 9, 10]), VALUES), min_size=1, max_size=4))
def test_the_provenance_check_agrees_with_fhirspec(compiled, values):
    """The Provenance's short check (only the values taken from the message) accepts exactly the
    Provenances the full walk accepts, whatever MSH-3, -4, -7, -9 and -10 hold."""
    fields = "MSH|^~\\&|APP|FAC|C|D|20260101120000||SIU^S12|CTRL1|P|2.5".split("|")
    for number, value in values:
        fields[number - 1 if number > 1 else 1] = value
    try:
        message = pipeline.read(("|".join(fields) + "\rSCH|1\r").encode())
    except ParseError:
        return
    conversion = Conversion(compiled.mappings, message, timezone.utc, now=NOW)
    conversion.entries[("Patient", "x")] = {"fullUrl": "urn:uuid:00000000-0000-5000-8000-000000000000"}
    conversion.provenance(read_header(message))
    provenance = next(e["resource"] for e in conversion.entries.values() if "resource" in e)
    assert provenance_values_valid(provenance) == (fhirspec.problems(provenance) == [])


# -- resources built once per value ---------------------------------------------------------------

DFT_TWO_FT1 = ("MSH|^~\\&|A|B|C|D|20260101||DFT^P03|1|P|2.5\rPID|1||P1\r"
               "FT1|1|T1||20260101|||C1^Code|||||||||||||DR7^Who\rNTE|1||{first}\r"
               "FT1|2|T2||20260101|||C2^Code|||||||||||||DR7^Who\rNTE|1||{second}\r")


def charge_mappings(directory: Path, practitioner: str) -> MappingSet:
    write(directory, "message/DFT.yaml", "groups:\n  FT1: [NTE]\nresources:\n  - {resource: ChargeItem, from: 'FT1[*]'}\n")
    write(directory, "resource/ChargeItem.yaml",
          "resourceType: ChargeItem\nidentifier:\n  - value: FT1-2\nstatus: 'billable'\ncode:\n  text: FT1-7.2\n"
          "subject:\n  $reference: Patient\n  $from: PID\nperformer:\n  - actor:\n      $reference: Practitioner\n"
          "      $from: FT1-20\n")
    write(directory, "resource/Patient.yaml", "resourceType: Patient\nidentifier:\n  - value: PID-3.1\n")
    write(directory, "resource/Practitioner.yaml", practitioner)
    return MappingSet(directory)


def test_a_practitioner_read_only_from_its_field_is_built_once_for_every_ft1(tmp_path):
    mapping_set = charge_mappings(tmp_path, "resourceType: Practitioner\nidentifier:\n  - value: $.1\n"
                                            "name:\n  - family: $.2\n")
    assert mapping_set.resources["Practitioner"].reads == frozenset()
    message = pipeline.read(DFT_TWO_FT1.format(first="a", second="b").encode())
    conversion = Conversion(mapping_set, message, timezone.utc, now=NOW)
    result = conversion.run(mapping_set.messages["DFT"])
    practitioners = [e for e in result.bundle["entry"] if e["resource"]["resourceType"] == "Practitioner"]
    assert len(practitioners) == 1
    assert [key[0] for key in conversion.built_from_value] == ["Practitioner"]


def test_a_resource_that_reads_its_group_is_built_at_each_segment(tmp_path):
    """The practitioner's birth date comes from the NTE of the FT1 at hand (the FT1's group): built
    once for the first FT1 only, the second FT1's bad date would go unreported."""
    mapping_set = charge_mappings(tmp_path, "resourceType: Practitioner\nidentifier:\n  - value: $.1\n"
                                            "birthDate: date(NTE-3)\n")
    assert "NTE" in mapping_set.resources["Practitioner"].reads
    message = pipeline.read(DFT_TWO_FT1.format(first="19600101", second="19601399").encode())
    with pytest.raises(MappingError) as raised:
        mapping_set.convert(message, "DFT")
    assert any("month 13" in problem for problem in raised.value.problems), raised.value.problems


def test_a_resource_without_an_identity_in_its_data_is_not_shared(tmp_path):
    """Without an identifier or $key a resource's ID comes from its place in the message: two
    FT1s naming the same practitioner by name only give two Practitioners, as before."""
    mapping_set = charge_mappings(tmp_path, "resourceType: Practitioner\nname:\n  - family: $.2\n")
    message = pipeline.read(DFT_TWO_FT1.format(first="a", second="b").encode())
    result = mapping_set.convert(message, "DFT")
    practitioners = [e for e in result.bundle["entry"] if e["resource"]["resourceType"] == "Practitioner"]
    assert len(practitioners) == 2


# -- resources built from a value alone, kept across messages --------------------------------------

def staff_mappings(directory: Path, practitioner: str) -> MappingSet:
    write(directory, "message/SIU.yaml", "resources:\n  - {resource: Appointment, from: SCH}\n")
    write(directory, "resource/Appointment.yaml",
          "resourceType: Appointment\nidentifier:\n  - value: SCH-1.1\nstatus: 'proposed'\nparticipant:\n"
          "  - $each: 'AIP[*]'\n    status: 'accepted'\n    actor:\n      $reference: Practitioner\n      $from: AIP-3\n")
    write(directory, "resource/Practitioner.yaml", practitioner)
    return MappingSet(directory)


def siu(control: str, stamp: str = "20260101", staff: str = "DR7^Who^^^^491231") -> bytes:
    return (f"MSH|^~\\&|A|B|C|D|{stamp}||SIU^S12|{control}|P|2.5\rSCH|{control}\r"
            f"AIP|1||{staff}\r").encode()


PRACTITIONER = "resourceType: Practitioner\nidentifier:\n  - value: $.1\nname:\n  - family: $.2\nbirthDate: date($.6)\n"


def practitioner_of(result):
    return next(e["resource"] for e in result.bundle["entry"] if e["resource"]["resourceType"] == "Practitioner")


def test_a_resource_from_a_value_alone_is_kept_and_given_with_its_warnings(tmp_path):
    mapping_set = staff_mappings(tmp_path, PRACTITIONER)
    assert mapping_set.resources["Practitioner"].cacheable
    assert not mapping_set.resources["Appointment"].cacheable  # it reads SCH and references others
    first = mapping_set.convert(pipeline.read(siu("1")), "SIU")
    assert len(mapping_set.built_cache) == 1
    practitioner_of(first)["name"][0]["family"] = "changed in the first Bundle"
    second = mapping_set.convert(pipeline.read(siu("2")), "SIU")
    assert practitioner_of(second)["name"] == [{"family": "Who"}]  # its own copy, not the first's
    assert practitioner_of(second)["birthDate"] == "2049-12-31"
    warning = "AIP-3.6 '491231' has a two-digit year: read as 2049"
    assert warning in first.warnings and warning in second.warnings


def test_what_a_value_gives_is_kept_apart_by_the_message_year(tmp_path):
    """A two-digit year is read near the message's own year: the same staff value in a 1990
    message is not given what it gave in a 2026 one."""
    mapping_set = staff_mappings(tmp_path, PRACTITIONER)
    recent = mapping_set.convert(pipeline.read(siu("1", "20260101")), "SIU")
    older = mapping_set.convert(pipeline.read(siu("2", "19900101")), "SIU")
    assert practitioner_of(recent)["birthDate"] == "2049-12-31"
    assert practitioner_of(older)["birthDate"] == "1949-12-31"


def test_a_bad_value_is_not_kept(tmp_path):
    mapping_set = staff_mappings(tmp_path, PRACTITIONER)
    for control in ("1", "2"):
        with pytest.raises(MappingError) as raised:
            mapping_set.convert(pipeline.read(siu(control, staff="DR7^Who^^^^201399")), "SIU")
        assert any("Practitioner.birthDate" in p for p in raised.value.problems)
    assert mapping_set.built_cache == {}


def test_a_resource_that_reads_a_segment_is_not_kept(tmp_path):
    mapping_set = staff_mappings(tmp_path, "resourceType: Practitioner\nidentifier:\n  - value: $.1\n"
                                           "name:\n  - family: $.2\n    given:\n      - MSH-4\n")
    assert not mapping_set.resources["Practitioner"].cacheable
    mapping_set.convert(pipeline.read(siu("1")), "SIU")
    assert mapping_set.built_cache == {}


def test_a_datatype_that_uses_itself_on_a_component_compiles_and_agrees(tmp_path):
    """CX.4's assigner is built with CX again from that component: legal, and it ends where the
    component is empty. The generator names the function before writing it (no endless load)."""
    write(tmp_path, "message/ADT.yaml", "resources:\n  - {resource: Patient, from: PID}\n")
    write(tmp_path, "resource/Patient.yaml", "resourceType: Patient\nidentifier:\n  - $datatype: CX\n    $from: PID-3\n")
    write(tmp_path, "datatype/CX.yaml", "value: $.1\nassigner:\n  identifier:\n    $datatype: CX\n    $from: $.4\n")
    mapping_set = MappingSet(tmp_path)
    message = pipeline.read(b"MSH|^~\\&|A|B|C|D|20260101||ADT^A01|1|P|2.5\rPID|1||123^^^AUTH&1.2&ISO\r")
    fast = mapping_set.convert(message, "ADT").bundle
    for resource in mapping_set.resources.values():
        resource.compiled = None
    assert fast == mapping_set.convert(message, "ADT").bundle
    assert fast["entry"][0]["resource"]["identifier"] == [
        {"value": "123", "assigner": {"identifier": {"value": "AUTH&1.2&ISO"}}}]
