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
