"""SIU -> Appointment and DFT -> ChargeItem with the shipped mappings; golden files; mapping errors."""

import json
import shutil
from datetime import datetime, timezone

import pytest

from conftest import EXAMPLES, ROOT, corpus_dir
from engine.errors import ConfigError
from engine.transform.project import Project
from engine.transform.regression import run_directory
from engine.transform import pipeline


# The moment conversions happen in these tests (the Provenance's recorded time).
CONVERTED_AT = datetime(2026, 12, 1, 12, 0, tzinfo=timezone.utc)


def converted_from(project, raw):
    """The pipeline's result for one message, as ``hl7bridge convert`` gets it (at CONVERTED_AT, and
    with the mapping version of ``hl7bridge test``, so copies of the mappings give equal Bundles)."""
    return pipeline.convert(project, pipeline.read(raw), now=CONVERTED_AT, mapping_version="test")


@pytest.fixture(scope="module")
def project():
    return Project.load(ROOT)


def resources(bundle, kind):
    return [e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == kind]


def convert(project, path):
    converted = converted_from(project, path.read_bytes())
    assert converted.ok, converted.problems
    return converted.bundle


def test_golden_examples(project):
    results = run_directory(project, EXAMPLES)
    assert len(results) == 19
    failures = [f"{r.name}:\n{r.detail}" for r in results if not r.passed]
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize(
    "name, status",
    [
        ("siu_s12", "booked"), ("siu_s13", "booked"), ("siu_s14", "booked"), ("siu_s15", "cancelled"),
        ("siu_s16", "cancelled"), ("siu_s17", "entered-in-error"), ("siu_s26", "noshow"),
        # S18-S24 change services and resources: the status is the filler status in SCH-25.
        ("siu_s18", "booked"), ("siu_s23", "cancelled"),
    ],
)
def test_every_trigger_has_its_status(project, name, status):
    [appointment] = resources(convert(project, EXAMPLES / f"{name}.hl7"), "Appointment")
    assert appointment["status"] == status


def test_appointment_fields(project):
    bundle = convert(project, EXAMPLES / "siu_s12.hl7")
    [appointment] = resources(bundle, "Appointment")
    assert [i["type"]["coding"][0]["code"] for i in appointment["identifier"]] == ["PLAC", "FILL"]
    assert appointment["start"] == "2026-12-01T09:30:00-06:00" and appointment["minutesDuration"] == 30
    kinds = [p["actor"]["reference"] for p in appointment["participant"]]
    by_url = {e["fullUrl"]: e["resource"]["resourceType"] for e in bundle["entry"]}
    assert sorted({by_url[k] for k in kinds}) == ["Device", "Location", "Patient", "Practitioner"]
    assert appointment["appointmentType"]["coding"][0]["system"] == "http://terminology.hl7.org/CodeSystem/v2-0276"
    assert appointment["serviceType"] and appointment["comment"]


def test_cancellation_carries_its_reason_and_declined_resources(project):
    [appointment] = resources(convert(project, EXAMPLES / "siu_s15.hl7"), "Appointment")
    assert appointment["cancelationReason"]["coding"][0]["code"] == "PTCANC"
    assert "declined" in {p["status"] for p in appointment["participant"]}


def test_one_chargeitem_per_ft1_and_every_transaction_type_kept(project):
    bundle = convert(project, EXAMPLES / "dft_p03.hl7")
    items = resources(bundle, "ChargeItem")
    assert [i["extension"][0]["valueCoding"]["code"] for i in items] == ["CG", "CD", "PY", "AJ"]
    assert [i["status"] for i in items] == ["billable", "billable", "not-billable", "billable"]
    assert [i["priceOverride"]["value"] for i in items] == [185.0, -25.0, -30.0, -40.0]
    assert [i["identifier"][0]["value"] for i in items] == [f"TX20261208-000{n}" for n in range(1, 5)]
    first = items[0]
    urls = {e["fullUrl"]: e["resource"] for e in bundle["entry"]}
    assert urls[first["subject"]["reference"]]["resourceType"] == "Patient"
    assert urls[first["context"]["reference"]]["resourceType"] == "Encounter"
    assert urls[first["account"][0]["reference"]]["resourceType"] == "Account"
    assert urls[first["costCenter"]["reference"]]["resourceType"] == "Organization"
    assert first["code"]["coding"][0] == {"system": "http://www.ama-assn.org/go/cpt", "code": "99214",
                                          "display": "Office visit est pt moderate"}


def test_same_message_twice_gives_the_same_bundle_of_conditional_updates(project):
    first = convert(project, EXAMPLES / "dft_p11.hl7")
    assert convert(project, EXAMPLES / "dft_p11.hl7") == first
    for entry in first["entry"]:
        assert entry["request"]["method"] == "PUT"
        resource = entry["resource"]
        if resource.get("identifier"):
            assert entry["request"]["url"].startswith(f"{resource['resourceType']}?identifier=")
        assert entry["fullUrl"].startswith("urn:uuid:")


def test_a_resource_referenced_twice_is_in_the_bundle_once(project):
    # The attending doctor (PV1-7) is also the AIP resource and the filler contact in siu_s12.
    bundle = convert(project, EXAMPLES / "siu_s12.hl7")
    urls = [e["fullUrl"] for e in bundle["entry"]]
    assert len(urls) == len(set(urls))


def test_latin1_names_survive(project):
    [patient] = resources(convert(project, EXAMPLES / "dft_p03_latin1.hl7"), "Patient")
    assert patient["name"][0]["family"] == "Müller"  # MSH-18 8859/1, decoded before mapping


# -- errors name the FHIR element, the mapping line and the HL7 field --------------------------------


@pytest.fixture
def scratch(tmp_path):
    shutil.copytree(ROOT / "mappings", tmp_path / "mappings")
    shutil.copytree(ROOT / "routes", tmp_path / "routes")
    shutil.copytree(ROOT / "destinations", tmp_path / "destinations")
    return tmp_path


def test_a_value_that_breaks_fhir_is_reported_with_its_origin(scratch):
    path = scratch / "mappings/resource/Appointment.yaml"
    path.write_text(path.read_text().replace("minutesDuration: duration", "minutesDuration: SCH-8.1"))
    converted = converted_from(Project.load(scratch), (EXAMPLES / "siu_s12.hl7").read_bytes())
    assert not converted.ok
    [problem] = converted.problems
    assert problem.startswith("Appointment.minutesDuration: ")
    assert f"{path}:" in problem and "(SCH-8.1)" in problem


def test_bad_data_in_a_field_is_reported_with_its_origin(project):
    raw = (EXAMPLES / "siu_s12.hl7").read_bytes().replace(b"|19840312|", b"|1984-03-12|", 1)
    converted = converted_from(project, raw)
    assert not converted.ok
    assert any("Patient.birthDate" in p and "date(PID-7)" in p for p in converted.problems), converted.problems


@pytest.mark.parametrize(
    "file, old, new, fragment",
    [
        ("mappings/resource/Appointment.yaml", "status: map(", "status: mapp(", "unknown function mapp()"),
        ("mappings/resource/Appointment.yaml", "$each: AIP[*]", "$eahc: AIP[*]", "unknown directive '$eahc'"),
        ("mappings/resource/Appointment.yaml", "$datatype: EI", "$datatype: EIX", "no datatype mapping 'EIX'"),
        ("mappings/resource/ChargeItem.yaml", "'transaction-status'", "'transaction-states'", "no code map 'transaction-states'"),
        ("mappings/resource/Appointment.yaml", "comment: notes(' ', NTE[*])", "comment: NTE[*]-0", "indexes start at 1"),
        ("mappings/resource/Appointment.yaml", "end: endOrNextDay(begins, ends)", "end: endOrNextDay(begins, endz)",
         "'endz' is neither an HL7 path nor a function nor a name defined under $let (begins, duration, ends, lasts)"),
        ("mappings/resource/Appointment.yaml", "  ends: precise(", "  2ends: precise(", "'2ends' is not a name"),
        ("mappings/resource/Appointment.yaml", "  begins: precise(TQ1-7.1", "  begins: precise(ends, TQ1-7.1",
         "$let.begins: uses 'ends', which is defined below it (a $let uses only the names defined above it)"),
        ("mappings/resource/ChargeItem.yaml", "  $when: FT1-4.2 missing", "  start: FT1-4.1",
         "$value goes only with $when (not start)"),
        ("mappings/message/SIU.yaml", "  RGS: [AIS, AIG, AIL, AIP, NTE]", "  RGS: AIS", "a segment and the list of segments"),
        ("mappings/message/SIU.yaml", "    required: true", "    required: yes please", "required"),
        ("mappings/message/SIU.yaml", "resource: Appointment", "resource: Appointmnt", "no resource mapping 'Appointmnt'"),
        ("routes/10-scheduling.yaml", "mapping: SIU", "mapping: SUI", "no message mapping 'SUI'"),
        ("routes/10-scheduling.yaml", "order: 10", "ordr: 10", "unknown key 'ordr' in route (did you mean 'order'?)"),
        ("routes/10-scheduling.yaml", "where: PV1-2 != P", "where: PV1-2 = P", "cannot read"),
        ("routes/20-finance.yaml", "after: mapping", "after: mapped", "'mapped' is not one of commit, mapping"),
        ("routes/20-finance.yaml", "timezone: America/Chicago", "timezone: Mars/Olympus", "is not a time zone"),
    ],
)
def test_broken_files_are_rejected_with_file_line_and_hint(scratch, file, old, new, fragment):
    path, line, message = refused(scratch, file, old, new)
    assert fragment in message, message
    assert message.startswith(f"{path}:"), message
    assert abs(int(message.split(":")[1]) - line) <= 1, (message, line)


def refused(scratch, file, old, new):
    """Change ``old`` to ``new`` in a copy of a shipped file; (the file, the line changed, the
    ConfigError's text loading it gave)."""
    path = scratch / file
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new, 1))
    line = next(n for n, l in enumerate(path.read_text().splitlines(), 1) if new in l)
    with pytest.raises(ConfigError) as info:
        Project.load(scratch)
    return path, line, str(info.value)


# -- the notation: quoted values are text, $ is the value, the segment at hand is named ---------------


@pytest.mark.parametrize(
    "file, old, new, fragment, hint",
    [
        # Text quoted twice: the form from before a quoted value was text.
        ("mappings/resource/Appointment.yaml", "code: 'PLAC'", "code: \"'PLAC'\"", "text is quoted twice",
         "quoted text is taken as it is now: write 'PLAC'"),
        ("mappings/datatype/CX.yaml", "- system: 'http://terminology.hl7.org/CodeSystem/v2-0203'",
         "- system: \"'http://terminology.hl7.org/CodeSystem/v2-0203'\"", "text is quoted twice",
         "write 'http://terminology.hl7.org/CodeSystem/v2-0203'"),
        # $-N: a field of the current segment is written with the segment's name.
        ("mappings/resource/Appointment.yaml", "$from: AIP-3", "$from: $-3", "old notation",
         "write AIP-3: a field of the current segment is named with the segment's name (the AIP at hand)"),
        ("mappings/resource/Appointment.yaml", "dateTime(AIG-8 | AIS-4)", "dateTime($-8 | AIS-4)", "old notation", "write AIG-8:"),
        ("mappings/resource/ChargeItem.yaml", "value: decimal(FT1-10)", "value: decimal($-10)", "old notation",
         "write FT1-10:"),
        ("mappings/resource/ChargeItem.yaml", "$each: FT1-19[*]", "$each: $-19[*]", "old notation", "write FT1-19[*]:"),
        ("mappings/datatype/CWE.yaml", "code: $.1", "code: $-1", "old notation", "write SEG-1:"),
        # A quoted expression would silently become text: refused.
        ("mappings/resource/Appointment.yaml", "code: SCH-7.1", "code: \"SCH-7.1\"", "reads as an expression",
         "drop the quotes: SCH-7.1"),
    ],
)
def test_old_notation_is_refused_with_file_line_and_the_new_way(scratch, file, old, new, fragment, hint):
    path, line, message = refused(scratch, file, old, new)
    assert message.startswith(f"{path}:{line}: "), message
    assert fragment in message and hint in message, message


def test_both_quote_styles_give_the_same_text_and_unquoted_text_is_an_expression(scratch, project):
    path = scratch / "mappings/resource/Appointment.yaml"
    text = path.read_text().replace("code: 'PLAC'", 'code: "PLAC"').replace("status: 'accepted'", "status: accepted")
    path.write_text(text)
    with pytest.raises(ConfigError) as info:  # unquoted, accepted is neither a path nor a function
        Project.load(scratch)
    assert "'accepted' is neither an HL7 path nor a function" in str(info.value)
    assert "text must be quoted: write 'accepted'" in str(info.value)
    path.write_text(text.replace("status: accepted", "status: 'accepted'"))
    raw = (EXAMPLES / "siu_s12.hl7").read_bytes()
    assert converted_from(Project.load(scratch), raw).bundle == converted_from(project, raw).bundle


# -- the third-party corpus ---------------------------------------------------------------------------


def instant(text):
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


MICROSOFT = ["SIU-S12-01", "SIU-S13-01", "SIU-S14-01", "SIU-S15-01", "SIU-S16-01", "SIU-S17-01", "SIU-S26-01"]


@pytest.mark.corpus
@pytest.mark.parametrize("name", MICROSOFT)
def test_appointments_agree_with_microsofts_converter_on_key_fields(project, name):
    folder = corpus_dir() / "microsoft-FHIR-Converter"
    ours = resources(convert(project, folder / f"{name}.hl7"), "Appointment")[0]
    theirs = resources(json.loads((folder / f"{name}.expected.json").read_text()), "Appointment")[0]
    assert ours["status"] == theirs["status"]
    # Compare instants, not strings: their output was generated at +05:30.
    assert instant(ours["start"]) == instant(theirs["start"])
    assert instant(ours["end"]) == instant(theirs["end"])
    assert ours.get("minutesDuration") == theirs.get("minutesDuration")
    assert [(i["value"], i["type"]["coding"][0]["code"]) for i in ours["identifier"]] == [
        (i["value"], i["type"]["coding"][0]["code"]) for i in theirs["identifier"]
    ]
    assert ours["appointmentType"]["coding"][0]["code"] == theirs["appointmentType"]["coding"][0]["code"]
    # Intended difference: we also list the filler contact (SCH-16) as a participant; they put
    # SCH contacts in supportingInformation. Everyone else is in both.
    assert len(ours["participant"]) == len(theirs["participant"]) + 1
    # Intended difference: the note after SCH is the comment; where a sender put its text in NTE-2
    # (their S13-S26 samples: NTE||text) we read it from there, and they leave comment out.
    if "comment" in theirs:
        assert ours["comment"] == theirs["comment"]
    else:
        raw = (folder / f"{name}.hl7").read_text()
        assert ours["comment"] == raw.split("\nNTE||", 1)[1].split("\n", 1)[0]
    # Intended difference: they base every appointment on a ServiceRequest made from the AIS; we
    # make one only from an order number (SCH-26/SCH-27), which these samples do not send.
    assert len(theirs["basedOn"]) == 1 and "basedOn" not in ours


@pytest.mark.corpus
@pytest.mark.parametrize("name", ["DFT-P03-01", "DFT-P11-01"])
def test_charges_agree_with_microsofts_converter_on_key_fields(project, name):
    folder = corpus_dir() / "microsoft-FHIR-Converter"
    ours = resources(convert(project, folder / f"{name}.hl7"), "ChargeItem")
    theirs = resources(json.loads((folder / f"{name}.expected.json").read_text()), "ChargeItem")
    assert len(ours) == len(theirs)
    for mine, other in zip(ours, theirs):
        assert mine["code"]["coding"][0]["code"] == other["code"]["coding"][0]["code"]
        assert mine.get("quantity") == other.get("quantity")
        assert mine.get("priceOverride") == other.get("priceOverride")
        assert mine.get("occurrenceDateTime") == other.get("occurrenceDateTime")
        assert mine.get("enteredDate") == other.get("enteredDate")
        assert [c["coding"][0]["code"] for c in mine.get("reason", [])] == [
            c["coding"][0]["code"] for c in other.get("reason", [])
        ]
        # Intended difference: they set every status to "unknown"; ours says what FT1-6 means.
        assert other["status"] == "unknown" and mine["status"] == "billable"
