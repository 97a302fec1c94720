"""The FHIR structure of the mappings is checked when they load: a template that cannot give
valid FHIR is refused with its file and line, before any message is mapped with it."""

import shutil
from pathlib import Path

import pytest

from engine.errors import ConfigError
from engine.transform import fhirspec
from engine.transform.project import Project

ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture
def scratch(tmp_path):
    for folder in ("mappings", "routes", "destinations"):
        shutil.copytree(ROOT / folder, tmp_path / folder)
    return tmp_path


@pytest.mark.parametrize(
    "file, old, new, fragment",
    [
        # An element FHIR R4 does not have, with the nearest one it does.
        ("mappings/resource/Appointment.yaml", "appointmentType:", "apointmentType:",
         "Appointment.apointmentType: FHIR R4 Appointment has no element 'apointmentType' (did you mean 'appointmentType'?)"),
        # One value (0..1) written as a list.
        ("mappings/resource/ChargeItem.yaml", "enteredDate: dateTime(FT1-5)", "enteredDate:\n  - dateTime(FT1-5)",
         "ChargeItem.enteredDate: FHIR has one dateTime here (0..1 or 1..1), not a list"),
        # An expression where FHIR wants an object.
        ("mappings/resource/ChargeItem.yaml", "code:\n  $datatype: CWE\n  $from: FT1-7 | FT1-25", "code: FT1-7.1",
         "ChargeItem.code: FHIR has a CodeableConcept here (an object): an expression gives a single value"),
        # A required element the template never gives (ChargeItem.status is 1..1).
        ("mappings/resource/ChargeItem.yaml", "status: map(FT1-6.1, 'transaction-status') | 'unknown'", "",
         "ChargeItem: FHIR requires ChargeItem.status, and the mapping gives none"),
        # Quoted text that is not a valid value of its element.
        ("mappings/resource/Appointment.yaml", "code: 'PLAC'", "code: 'PL AC  '",
         "Appointment.identifier.type.coding.code: 'PL AC  ' is not a valid FHIR code"),
        # A reference where FHIR has no Reference.
        ("mappings/resource/ChargeItem.yaml", "code:\n  $datatype: CWE", "code:\n  $reference: Patient\n  $datatype: CWE",
         "use $datatype or $reference, not both"),
        ("mappings/resource/ChargeItem.yaml", "code:\n  $datatype: CWE\n  $from: FT1-7 | FT1-25",
         "code:\n  $reference: Patient\n  $from: PID-3", "ChargeItem.code: $reference gives a Reference, but FHIR has a CodeableConcept here"),
        # A datatype mapping used as a type it does not fit: CX (an Identifier) as a CodeableConcept.
        ("mappings/resource/ChargeItem.yaml", "code:\n  $datatype: CWE", "code:\n  $datatype: CX",
         "datatype/CX.yaml:4: ChargeItem.code ($datatype CX at ChargeItem.yaml:"),
        # A $const that is not valid FHIR.
        ("mappings/resource/ChargeItem.yaml", "enteredDate: dateTime(FT1-5)", "enteredDate: {$const: 'yesterday'}",
         "ChargeItem.enteredDate: 'yesterday' is not a valid FHIR dateTime"),
    ],
)
def test_a_template_that_cannot_give_valid_fhir_is_refused_at_load(scratch, file, old, new, fragment):
    path = scratch / file
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new, 1))
    with pytest.raises(ConfigError) as info:
        Project.load(scratch)
    message = str(info.value)
    assert message.startswith(f"{path}:" if "$datatype: CX" not in new else f"{scratch}/mappings/datatype/CX.yaml:"), message
    assert fragment in message, message
    line = int(message.split(":")[1])
    assert 1 <= line <= len(path.read_text().splitlines())


def test_a_list_written_as_one_value_and_two_choices_name_the_line(scratch):
    path = scratch / "mappings/resource/Appointment.yaml"
    path.write_text(path.read_text().replace("serviceType:\n  - $each: AIS[*]\n    $datatype: CWE\n    $from: AIS-3",
                                             "serviceType:\n  $when: AIS exists\n  $datatype: CWE\n  $from: AIS-3", 1))
    with pytest.raises(ConfigError) as info:
        Project.load(scratch)
    line = next(n for n, l in enumerate(path.read_text().splitlines(), 1) if l.startswith("serviceType:"))
    message = str(info.value)
    assert message.startswith(f"{path}:") and abs(int(message.split(":")[1]) - line) <= 1, message
    assert "Appointment.serviceType: FHIR has a list of CodeableConcept here" in message
    path = scratch / "mappings/resource/ChargeItem.yaml"
    shutil.copy(ROOT / "mappings/resource/Appointment.yaml", scratch / "mappings/resource/Appointment.yaml")
    path.write_text(path.read_text().replace("enteredDate: dateTime(FT1-5)", "occurrenceDateTime: dateTime(FT1-5)", 1)
                    .replace("occurrenceDateTime:\n  $when: FT1-4.2 missing\n  $value: dateTime(FT1-4.1)\n", "", 1)
                    .replace("occurrencePeriod:\n  $when: FT1-4.2 exists\n", "occurrencePeriod:\n", 1))
    with pytest.raises(ConfigError) as info:
        Project.load(scratch)
    assert "are both occurrence[x], and FHIR allows only one" in str(info.value)


def test_the_shipped_mappings_pass():
    Project.load(ROOT)


@pytest.mark.parametrize(
    "kind, good, bad",
    [
        ("instant", ["2024-02-29T10:00:00Z", "2024-01-01T00:00:00.123+14:00"],
         ["2024-02-30T10:00:00Z", "2024-01-01T10:00Z", "2024-01-01", "2024-01-01T10:00:00+15:00", ""]),
        ("dateTime", ["2024", "2024-02", "2024-02-29", "2024-01-01T10:00:00-05:00"],
         ["2023-02-29", "2024-13", "2024-01-01T10:00:00", "0000", "24", 2024]),
        ("date", ["1984-03-12", "1984"], ["1984-03-12T00:00:00Z", "19840312", "1984-3-12"]),
        ("code", ["booked", "a b"], ["", " booked", "a  b", "booked ", 5]),
        ("id", ["abc-1.2"], ["a_b", "x" * 65, ""]),
        ("uri", ["urn:oid:1.2", "http://x/y"], ["", "a b"]),
        ("decimal", [0, -1.5, 12], [float("inf"), float("nan"), "12", True]),
        ("positiveInt", [1, 2**31 - 1], [0, -1, 2**31, "5", True, 1.0]),
        ("unsignedInt", [0], [-1]),
        ("boolean", [True, False], ["true", 1, None]),
        ("string", ["Müller", " x "], ["", "   ", "a\x00b", 5, "x" * (1024 * 1024 + 1)]),
    ],
)
def test_value_checks(kind, good, bad):
    for value in good:
        assert fhirspec.value_problem(kind, value) is None, value
    for value in bad:
        assert fhirspec.value_problem(kind, value) is not None, value


def test_problems_of_a_resource_name_the_element():
    found = fhirspec.problems({"resourceType": "Appointment", "status": "booked", "colour": "red",
                               "participant": [{"actor": {"reference": "urn:uuid:1"}}],
                               "start": "2024-01-01T10:00:00", "minutesDuration": "15"})
    by_place = {loc: kind for loc, kind, _ in found}
    assert by_place == {("colour",): "extra_forbidden", ("participant", 0, "status"): "missing",
                        ("start",): "value", ("minutesDuration",): "value"}
