"""hl7apy where it pays: field names and data types, and structural validation on request."""

from conftest import EXAMPLES
from engine.hl7.standard import field_info, segment_fields, validate


def test_field_names_and_types():
    info = field_info("PID", 3, "2.5.1")
    assert (info.name, info.datatype, info.required, info.repeats) == ("Patient Identifier List", "CX", True, True)
    assert field_info("MSH", 10).name == "Message Control ID"
    assert field_info("FT1", 6, "2.5.1").table == "HL70017"
    assert field_info("SCH", 25, "2.5.1").name == "Filler Status Code"
    assert field_info("MSH", 1).name == "Field Separator"


def test_z_segments_and_unknown_versions():
    assert segment_fields("ZSC") == ()
    assert field_info("ZSC", 1) is None
    assert field_info("PID", 3, "9.9").name == "Patient Identifier List"  # falls back to 2.5


def test_validation_of_a_conformant_and_a_broken_message():
    good = validate((EXAMPLES / "dft_p03.hl7").read_bytes().decode())
    assert good.valid, good.errors
    broken = validate((EXAMPLES / "dft_p03.hl7").read_bytes().decode().replace("\rEVN|P03|", "\rEVN||", 1).replace("\rPID|", "\rPV2|", 1))
    assert not broken.valid


def test_one_list_of_versions_and_2_7_1_read_as_2_7():
    from engine.config import Settings
    from engine.hl7.assess import AcceptPolicy, assess
    from engine.hl7.versions import SUPPORTED_VERSIONS, reference_version

    assert "2.7.1" in SUPPORTED_VERSIONS
    assert AcceptPolicy().versions is SUPPORTED_VERSIONS
    assert Settings().policy(Settings().listeners[0]).versions is SUPPORTED_VERSIONS
    raw = (EXAMPLES / "dft_p03.hl7").read_bytes().replace(b"|2.5.1", b"|2.7.1", 1)
    assert assess(raw).outcome == "accept"
    assert reference_version("2.7.1") == "2.7" and reference_version("9.9") == "2.5"
    assert field_info("FT1", 6, "2.7.1") == field_info("FT1", 6, "2.7")
    # hl7apy has no 2.7.1 of its own: the message is checked against 2.7, not refused as unknown.
    report = validate(raw.decode("latin-1"))
    assert not any("not supported" in error for error in report.errors), report.errors


def test_structure_errors_name_fields_as_hl7_paths_not_python_objects():
    # In v2.3 MSH-9 has two components: a third (the structure) is not defined there.
    text = (EXAMPLES / "siu_s12.hl7").read_bytes().decode().replace("|2.5.1", "|2.3", 1)
    errors = validate(text).errors
    assert "Invalid children detected for MSH-9 (message type): a component the standard does not define there" in errors
    assert not any("<" in error or "None" in error for error in errors), errors
