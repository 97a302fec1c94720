"""Every SIU and DFT file of the third-party corpus (../shared/corpus), one by one: what it converts
to (status, start and end, identifiers, participants, codes, quantities, prices, and the warnings
saying what was assumed), or the clear reason it cannot be. A file added to the corpus fails
``test_every_file_is_described`` until it is described here.

The Bundles are validated by the conversion itself (fhir.resources and the Appointment invariants
app-2 and app-3); tests/e2e/test_corpus_fhir_server.py also has a FHIR server validate them.
The comparisons with Microsoft's converter's expected output are in test_mapping.py.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime, timezone

import pytest
from click.testing import CliRunner

from conftest import CORPUS, ROOT, corpus_dir
from engine.cli import cli
from engine.hl7.assess import assess
from engine.mllp.batch import split_messages
from engine.transform import pipeline
from engine.transform.project import Project

NOW = datetime(2026, 12, 1, 12, 0, tzinfo=timezone.utc)
XML = "HL7 v2 XML encoding is not supported: send ER7 (pipe-delimited)"
END_FROM_SCH9 = "end computed from the start (SCH-11.4) and the duration (SCH-9: 15 min)"
NTE2 = "NTE-2 (source of comment) holds text, not an HL7 0105 code: read as the comment"


@dataclass
class Appointment:
    status: str
    start: str
    end: str
    minutes: int | None
    ids: list  # (value, type code)
    participants: list  # the actors' resource types, in order
    services: list = field(default_factory=list)  # AIS-3 codes
    comment: str | None = None
    warnings: list = field(default_factory=list)
    based_on: int = 0  # ServiceRequests (SCH-26/SCH-27)
    visit: bool = False  # an Encounter (PV1-19) that points to the Appointment


@dataclass
class Charge:
    code: str
    quantity: float | None
    price: dict | None
    occurrence: object
    identifier: str | None
    context: bool  # ChargeItem.context is the Encounter (PV1-19)


@dataclass
class Refused:
    reason: str  # what hl7bridge says (a mapping problem, or why the file is not read)


MS_SIU = dict(ids=[("12345", "PLAC"), ("36996", "FILL")],
              participants=["Patient", "Practitioner", "Location", "Device", "Practitioner"], services=["76164006"])
MS_START, MS_END = "2021-09-24T09:30:00+02:15", "2021-09-24T10:20:00+02:15"
# Redox's archive samples (v2.3): SCH-11.4 with a time, SCH-9/SCH-10 15 MIN and no end.
REDOX_SIU = dict(ids=[("1234", "FILL")], participants=["Patient", "Practitioner"], warnings=[END_FROM_SCH9],
                 visit=True)
LFH_CHARGE = [Charge("FAKE", None, None, "2020-12-31T14:50:45Z", None, False)]

EXPECTED = {
    # An FT1-less DFT: a mapping error that names the segment, not a Bundle without a ChargeItem.
    "Efferent-Health-HL7-dotnetcore/Program_InvalidRepetitionTest.hl7":
        Refused("DFT^P03 has no FT1 segment: no ChargeItem can be built"),
    # FT1-7 is empty: the code comes from FT1-25; no FT1-11, so no price; no PV1-19, so no Encounter.
    "HL7-v2-to-fhir/archive/P03-Charge-v2.3.hl7": [Charge("99214", 1, None, "2019-04-16T11:00:00Z", "E8866", False)],
    # The v2 XML encoding of the same samples: refused by name, not as "a segment outside any message".
    "HL7-v2-to-fhir/archive/P03-Charge-v2.3.hl7v2.xml": Refused(XML),
    "HL7-v2-to-fhir/archive/S12-New-Appointment-v2.3.hl7v2.xml": Refused(XML),
    "HL7-v2-to-fhir/archive/S12-sample-s12-v2.3.hl7v2.xml": Refused(XML),
    "HL7-v2-to-fhir/archive/S13-sample-s13-v2.3.hl7v2.xml": Refused(XML),
    "HL7-v2-to-fhir/archive/S15-sample-s15-v2.3.hl7v2.xml": Refused(XML),
    "HL7-v2-to-fhir/archive/S26-sample-s26-v2.3.hl7v2.xml": Refused(XML),
    # SCH-10 'm'; the AIG (PULLEN, AIG-4 'P') is a person: a Practitioner, not a Device.
    "HL7-v2-to-fhir/archive/S12-New-Appointment-v2.3.hl7": Appointment(
        "booked", "2019-04-23T14:00:00+00:00", "2019-04-23T14:15:00+00:00", 15,
        ids=[("1209", "PLAC"), ("13030", "FILL")],
        participants=["Patient", "Practitioner", "Location", "Practitioner", "Practitioner"],
        warnings=["SCH-10 unit 'm' read as minutes"]),
    "HL7-v2-to-fhir/archive/S12-sample-s12-v2.3.hl7": Appointment(
        "booked", "2018-10-17T22:28:05+00:00", "2018-10-17T22:43:05+00:00", 15, **REDOX_SIU),
    "HL7-v2-to-fhir/archive/S13-sample-s13-v2.3.hl7": Appointment(
        "booked", "2018-10-24T22:28:05+00:00", "2018-10-24T22:43:05+00:00", 15, **REDOX_SIU),
    "HL7-v2-to-fhir/archive/S15-sample-s15-v2.3.hl7": Appointment(
        "cancelled", "2018-10-17T22:28:05+00:00", "2018-10-17T22:43:05+00:00", 15, **REDOX_SIU),
    "HL7-v2-to-fhir/archive/S26-sample-s26-v2.3.hl7": Appointment(
        "noshow", "2018-10-17T22:28:05+00:00", "2018-10-17T22:43:05+00:00", 15, **REDOX_SIU),
    # The IG's own test message: SCH-11.5 is a year after SCH-11.4, as sent; SCH-26/SCH-27 give the
    # ServiceRequest the Appointment is based on. No offset: the catch-all route's time zone (UTC).
    "HL7-v2-to-fhir/test_conversions_SIU_S12.hl7": Appointment(
        "booked", "2015-06-13T14:00:00+00:00", "2016-06-21T14:15:00+00:00", 15,
        ids=[("1209", "PLAC"), ("13030", "FILL")],
        participants=["Patient", "Practitioner", "Location", "Practitioner", "Practitioner"], based_on=1, visit=True),
    # One FT1 each, no transaction ID, no price; the IDs differ all the same (test below).
    **{f"LinuxForHealth-hl7v2-fhir-converter/{name}.hl7": LFH_CHARGE for name in (
        "Hl7DFTMessageTest__testResourceCreationFromDFT", "Hl7FinancialInsuranceTest__testBasicInsuranceCoverageFields",
        "Hl7FinancialInsuranceTest__testFailingOrganizationTelecom",
        "Hl7FinancialInsuranceTest__testInsuranceCoverageByRelatedFields",
        "Hl7FinancialInsuranceTest__testInsuranceCoverageFromIN2Self",
        "Hl7FinancialInsuranceTest__testInsuranceCoverageOfSelfAndTenant",
        "Hl7FinancialInsuranceTest__testInsuranceCoverageOfWorkersComp",
        "Hl7FinancialInsuranceTest__testInsuranceCoverageUnknownRelationship")},
    # FT1-4 is a date range (DR): a period.
    "RedoxEngine-redox-hl7-v2/parser.spec__DFT_P03.hl7": [
        Charge("84460", 1, {"value": 125.1}, {"start": "2009-09-23", "end": "2009-09-23"}, "691234", True)],
    # Four RGS groups. The end is SCH-11.4 + SCH-9 (379 MIN); each AIG (AIG-4 STAFF) is the same
    # person as its group's AIP, so the same Practitioner; OR 4 is in every group: listed once.
    "hapifhir-hapi-hl7v2/NewPipeParserTest__testNestedRepeatingGroups.hl7": Appointment(
        "booked", "2010-04-07T16:10:00+00:00", "2010-04-07T22:29:00+00:00", 379,
        ids=[("ADS", "PLAC"), ("569576", "FILL")],
        participants=["Patient", *["Practitioner"] * 4, "Location", *["Practitioner"] * 4, "Practitioner"],
        services=["G014080", "G11455", "G014045", "G11045"], visit=True,
        warnings=["end computed from the start (SCH-11.4) and the duration (SCH-9: 379 min)"]),
    "microsoft-FHIR-Converter/DFT-P03-01.hl7": [
        Charge("71045", 2, {"value": 100, "currency": "USD"}, "2019-11-22", "12345", True),
        Charge("626.2", 1, {"value": 120, "currency": "USD"}, "2019-11-22", None, True)],
    "microsoft-FHIR-Converter/DFT-P11-01.hl7": [
        Charge("71045", 2, {"value": 100, "currency": "USD"}, "2019-11-22", "12345", True),
        Charge("92002", 1, {"value": 70, "currency": "USD"}, "2019-11-22", None, True)],
    # TQ1 gives start and end (SCH-11 is a year away and is kept only for older senders); SCH-9/10
    # say 60 s, so minutesDuration is 1, as Microsoft's converter has it.
    "microsoft-FHIR-Converter/SIU-S12-01.hl7": Appointment(
        "booked", MS_START, MS_END, 1, comment="Appointment booked for emergency procedure", visit=True, **MS_SIU),
    # Three RGS groups: three AIPs, four places (4E and the PL.1 HDs 11, 22, 55), three devices; only
    # the note after SCH is the comment (each group's notes are its resources').
    "microsoft-FHIR-Converter/SIU-S12_1.hl7": Appointment(
        "booked", "2020-10-04T11:26:00+02:15", "2020-10-08T11:26:00+02:15", 70,
        ids=[("12345", "PLAC"), ("36996", "FILL")],
        participants=["Patient", *["Practitioner"] * 3, *["Location"] * 4, *["Device"] * 3, "Practitioner"],
        services=["111", "220", "215"], comment="Appointment specific instructions"),
    # S13-S26: the note after SCH has its text in NTE-2 (NTE||text).
    "microsoft-FHIR-Converter/SIU-S13-01.hl7": Appointment(
        "booked", MS_START, MS_END, 1, warnings=[NTE2],
        comment="The patient cannot make previous appointment scheduled on Sept 20.Apointment rescheduled on Sept 24.",
        **MS_SIU),
    "microsoft-FHIR-Converter/SIU-S14-01.hl7": Appointment(
        "booked", MS_START, MS_END, 1, warnings=[NTE2],
        comment="Appointment modified by filler application for change of location from Room01 to Room02.", **MS_SIU),
    "microsoft-FHIR-Converter/SIU-S15-01.hl7": Appointment(
        "cancelled", MS_START, MS_END, 1, warnings=[NTE2], comment="Appointment cancelled.", **MS_SIU),
    "microsoft-FHIR-Converter/SIU-S16-01.hl7": Appointment(
        "cancelled", MS_START, MS_END, 1, warnings=[NTE2],
        comment="Appointment discontinued due to equipment malfunction.", **MS_SIU),
    "microsoft-FHIR-Converter/SIU-S17-01.hl7": Appointment(
        "entered-in-error", MS_START, MS_END, 1, warnings=[NTE2],
        comment="Appointment deleted as it was booked for the wrong patient.", **MS_SIU),
    "microsoft-FHIR-Converter/SIU-S26-01.hl7": Appointment(
        "noshow", MS_START, MS_END, 1, warnings=[NTE2], comment="Patient did not show up for the appointment.",
        **MS_SIU),
    # Named SIU, but MSH-9 says ADT^A60: no route takes it, and the type is never guessed.
    "microsoft-FHIR-Converter/SIU_12.hl7": Refused("no route matches ADT^A60 from GHHSFacility"),
}


def siu_and_dft_files() -> list[str]:
    """The corpus files of real SIU and DFT feeds (not the generic parser edge cases)."""
    if not CORPUS.is_dir():
        return []
    return sorted(str(p.relative_to(CORPUS)) for p in CORPUS.rglob("*")
                  if p.name.endswith((".hl7", ".hl7v2.xml")) and not str(p.relative_to(CORPUS)).startswith("_generic"))


@pytest.fixture(scope="module")
def project():
    return Project.load(ROOT)


def convert_file(project, name):
    """(the Converted, the reader's warnings) of a corpus file's one message, as the engine reads it."""
    [item] = split_messages((corpus_dir() / name).read_bytes())
    assessment = assess(item.data)
    assert assessment.outcome == "accept", assessment.error
    return pipeline.convert(project, assessment.message, header=assessment.header, now=NOW), assessment.warnings


def resources(bundle, kind):
    return [e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == kind]


@pytest.mark.corpus
def test_every_file_is_described():
    found = siu_and_dft_files() or pytest.skip("../shared/corpus is not beside this clone")
    assert sorted(EXPECTED) == found


@pytest.mark.corpus
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_each_file_converts_to_what_it_says_or_is_refused_with_the_reason(project, name):
    expected = EXPECTED[name]
    if isinstance(expected, Refused) and name.endswith(".xml"):
        from engine.errors import BatchError

        with pytest.raises(BatchError) as info:
            split_messages((corpus_dir() / name).read_bytes())
        assert str(info.value) == f"line 1: {expected.reason}"
        assert assess((corpus_dir() / name).read_bytes()).error.text == expected.reason  # ingest says the same
        return
    converted, reader_warnings = convert_file(project, name)
    # None of these files needs the reader to repair anything once split into CR-ended messages.
    assert reader_warnings == []
    if isinstance(expected, Refused):
        assert not converted.ok and converted.bundle is None
        assert [p.split(" (from ")[0] for p in converted.problems] == [expected.reason]
        return
    assert converted.ok, converted.problems
    bundle = converted.bundle
    assert bundle["entry"][-1]["resource"]["resourceType"] == "Provenance"
    if isinstance(expected, Appointment):
        [appointment] = resources(bundle, "Appointment")
        urls = {e["fullUrl"]: e["resource"] for e in bundle["entry"]}
        got = Appointment(
            appointment["status"], appointment.get("start"), appointment.get("end"), appointment.get("minutesDuration"),
            ids=[(i["value"], i["type"]["coding"][0]["code"]) for i in appointment["identifier"]],
            participants=[urls[p["actor"]["reference"]]["resourceType"] for p in appointment["participant"]],
            services=[s["coding"][0]["code"] for s in appointment.get("serviceType", [])],
            comment=appointment.get("comment"), warnings=converted.warnings,
            based_on=len(appointment.get("basedOn", [])),
            visit=any(e.get("appointment") == [{"reference": url}] for e in resources(bundle, "Encounter")
                      for url, r in urls.items() if r is appointment))
        assert got == expected
        # FHIR invariants app-2 and app-3 (fhir.resources does not check them; the conversion does).
        assert "start" in appointment and "end" in appointment
        assert "requestedPeriod" not in appointment  # every file here gives a time and an end
    else:
        items = resources(bundle, "ChargeItem")
        got = [Charge(i["code"]["coding"][0]["code"], (i.get("quantity") or {}).get("value"), i.get("priceOverride"),
                      i.get("occurrenceDateTime") or i.get("occurrencePeriod"),
                      (i.get("identifier") or [{}])[0].get("value"), "context" in i) for i in items]
        assert got == expected
        assert converted.warnings == []
    # The same message gives the same Bundle.
    assert convert_file(project, name)[0].bundle == bundle


@pytest.mark.corpus
def test_no_two_different_charges_share_an_id_and_a_resend_keeps_its_ids(project):
    """The corpus reuses MSH-10 (MSG00001 in both of Microsoft's DFTs) and leaves FT1-2 empty: IDs
    made of the sender and control ID alone made their second charges (626.2 and 92002) one
    ChargeItem, and five LinuxForHealth charges another. Charges the sender identifies (FT1-2) are
    one ChargeItem when the identifier is the same: 12345 is in both of Microsoft's DFTs."""
    seen = {}
    for name, expected in EXPECTED.items():
        if not isinstance(expected, list):
            continue
        converted, _ = convert_file(project, name)
        for entry in converted.bundle["entry"]:
            item = entry["resource"]
            if item["resourceType"] == "ChargeItem":
                identifier = (item.get("identifier") or [None])[0]
                if entry["fullUrl"] in seen:
                    assert identifier is not None and seen[entry["fullUrl"]][1] == identifier, (name, seen[entry["fullUrl"]])
                seen[entry["fullUrl"]] = (name, identifier)
    identified = {json.dumps(i) for _, i in seen.values() if i is not None}
    assert len(seen) == sum(len(e) for e in EXPECTED.values() if isinstance(e, list)) - 1  # 12345, twice
    assert len(identified) == 3
    # A resend, restamped (new MSH-7) and with CRLF line ends, is the same charge.
    name = "microsoft-FHIR-Converter/DFT-P03-01.hl7"
    raw = (corpus_dir() / name).read_bytes()
    resend = raw.replace(b"|202108181126+0215|", b"|202108181300+0215|", 1).replace(b"\n", b"\r\n")
    again = pipeline.convert(project, pipeline.read(resend), now=NOW)
    assert [e["fullUrl"] for e in again.bundle["entry"]] == [e["fullUrl"] for e in convert_file(project, name)[0].bundle["entry"]]


@pytest.mark.corpus
def test_convert_reports_every_file_and_goes_on(tmp_path):
    """One run over the whole corpus: a file that cannot be read or mapped is reported with its
    file and line, and the run goes on to the next; exit code 1 at the end."""
    corpus_dir()
    names = sorted(EXPECTED)
    result = CliRunner().invoke(cli, ["convert", *(str(CORPUS / n) for n in names), "--config", str(ROOT)])
    assert result.exit_code == 1
    bundles = json.loads(result.stdout)
    assert len(bundles) == sum(not isinstance(e, Refused) for e in EXPECTED.values())
    for name, expected in EXPECTED.items():
        if isinstance(expected, Refused):
            line = f"{CORPUS / name}:1" + ("" if name.endswith(".xml") else " ")
            assert any(l.startswith(line) and (expected.reason in l or "cannot convert" in l)
                       for l in result.stderr.splitlines()), (name, result.stderr)
            assert expected.reason in result.stderr
