"""Routes: matching order, criteria, conditions, and what check and convert say about them."""

import json
from datetime import datetime, timedelta, timezone
import shutil

import pytest
from click.testing import CliRunner

from conftest import EXAMPLES, ROOT
from engine.cli import cli
from engine.stamps import parse_iso
from engine.hl7.er7 import parse
from engine.transform.project import Project


@pytest.fixture(scope="module")
def project():
    return Project.load(ROOT)


def route_of(project, raw: bytes):
    route = project.route_for(parse(raw.decode("latin-1")))
    return route.name if route else None


SIU = (EXAMPLES / "siu_s12.hl7").read_bytes()


def test_shipped_routes_in_order(project):
    assert [r.name for r in project.routes] == ["clinic-scheduling", "clinic-charges", "other-scheduling", "other-finance"]


@pytest.mark.parametrize(
    "raw, route",
    [
        (SIU, "clinic-scheduling"),
        ((EXAMPLES / "siu_s19.hl7").read_bytes(), "other-scheduling"),  # PV1-2 P: the where excludes it
        (SIU.replace(b"|NORTHCLINIC|", b"|WESTCLINIC|", 1), "other-scheduling"),  # another sender
        ((EXAMPLES / "dft_p03.hl7").read_bytes(), "clinic-charges"),
        ((EXAMPLES / "dft_p03.hl7").read_bytes().replace(b"DFT^P03^DFT_P03", b"DFT^P05", 1), "other-finance"),
        (SIU.replace(b"SIU^S12^SIU_S12", b"ADT^A04^ADT_A01", 1), None),
    ],
)
def test_first_matching_route_wins(project, raw, route):
    assert route_of(project, raw) == route


def test_match_on_version_receiver_processing_id(tmp_path):
    shutil.copytree(ROOT / "mappings", tmp_path / "mappings")
    (tmp_path / "routes").mkdir()
    (tmp_path / "routes/a.yaml").write_text(
        "name: narrow\nmatch:\n  message: [SIU^S12]\n  version: ['2.5.1']\n  receiving_facility: [FINANCE]\n"
        "  processing_id: [P]\n  where:\n    - PID-3[*].5 == MR\n    - SCH-1 exists\nmapping: SIU\n"
    )
    narrow = Project.load(tmp_path)
    assert route_of(narrow, SIU) == "narrow"
    assert route_of(narrow, SIU.replace(b"|P|2.5.1", b"|T|2.5.1", 1)) is None
    assert route_of(narrow, SIU.replace(b"|FINANCE|", b"|LAB|", 1)) is None
    assert route_of(narrow, SIU.replace(b"^MR~", b"^XX~", 1)) is None
    assert route_of(narrow, SIU.replace(b"SIU^S12", b"SIU^S13", 1)) is None


def test_duplicate_route_names_are_refused(tmp_path):
    shutil.copytree(ROOT / "mappings", tmp_path / "mappings")
    shutil.copytree(ROOT / "routes", tmp_path / "routes")
    shutil.copytree(ROOT / "destinations", tmp_path / "destinations")
    shutil.copy(tmp_path / "routes/10-scheduling.yaml", tmp_path / "routes/11-copy.yaml")
    with pytest.raises(Exception, match="route name 'clinic-scheduling' is also used in"):
        Project.load(tmp_path)


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def test_check_lists_routes_in_order_and_mappings(monkeypatch):
    monkeypatch.chdir(ROOT)
    result = invoke("check")
    assert result.exit_code == 0
    lines = result.output.splitlines()
    assert lines[0] == f"ok: {ROOT}"
    version = Project.load(ROOT).mappings.version
    assert lines[1] == f"mapping version: {version} (a hash of the mapping files; every Bundle's Provenance names it)"
    assert lines[3].split()[:2] == ["10", "clinic-scheduling"]
    assert lines[-4].startswith("message mappings (2): DFT, SIU")
    data = json.loads(invoke("check", ROOT, "--json").output)
    assert [r["name"] for r in data["routes"]][0] == "clinic-scheduling"
    assert data["mapping_version"] == version and len(version) == 12


def test_check_fails_with_file_and_line(tmp_path):
    shutil.copytree(ROOT / "mappings", tmp_path / "mappings")
    (tmp_path / "routes").mkdir()
    (tmp_path / "routes/bad.yaml").write_text("name: x\nmapping: SIU\nmatch:\n  mesage: [SIU]\n")
    result = invoke("check", tmp_path)
    assert result.exit_code == 1
    assert result.output == (
        f"Error: {tmp_path / 'routes/bad.yaml'}:4: unknown key 'mesage' in match (did you mean 'message'?)\n"
    )


def test_convert_prints_the_bundle_and_errors_go_to_stderr(monkeypatch, tmp_path):
    monkeypatch.chdir(ROOT)
    result = CliRunner().invoke(cli, ["convert", str(EXAMPLES / "siu_s12.hl7")])
    assert result.exit_code == 0
    printed, expected = json.loads(result.stdout), json.loads((EXAMPLES / "siu_s12.fhir.json").read_text())
    # The same Bundle as `hl7bridge test` makes, but for the Provenance's conversion time and mapping
    # version, which `test` pins (engine.transform.regression).
    assert printed["entry"][:-1] == expected["entry"][:-1]
    provenance, pinned = printed["entry"][-1]["resource"], expected["entry"][-1]["resource"]
    assert provenance["policy"] == [pinned["policy"][0], f"urn:hl7bridge:mapping:{Project.load(ROOT).mappings.version}"]
    assert abs(parse_iso(provenance["recorded"]) - datetime.now(timezone.utc)) < timedelta(minutes=5)
    assert {k: v for k, v in provenance.items() if k not in ("policy", "recorded")} == \
        {k: v for k, v in pinned.items() if k not in ("policy", "recorded")}
    broken = tmp_path / "broken.hl7"
    broken.write_bytes(SIU.replace(b"|19840312|", b"|1984-03-12|", 1))
    result = CliRunner().invoke(cli, ["convert", str(broken), str(EXAMPLES / "dft_p03.hl7")])
    assert result.exit_code == 1
    assert json.loads(result.stdout)["entry"]  # the good one is still printed
    assert f"{broken}:1 NC000123 (route clinic-scheduling): cannot convert" in result.stderr
    assert "Patient.birthDate" in result.stderr


def test_convert_with_a_named_route_and_an_unrouted_message(monkeypatch, tmp_path):
    monkeypatch.chdir(ROOT)
    result = CliRunner().invoke(cli, ["convert", str(EXAMPLES / "siu_s12.hl7"), "--route", "other-scheduling"])
    assert result.exit_code == 0
    adt = tmp_path / "adt.hl7"
    adt.write_bytes(SIU.replace(b"SIU^S12^SIU_S12", b"ADT^A04^ADT_A01", 1))
    result = CliRunner().invoke(cli, ["convert", str(adt)])
    assert result.exit_code == 1
    assert "no route matches ADT^A04 from NORTHCLINIC" in result.stderr
    result = CliRunner().invoke(cli, ["convert", str(adt), "--route", "nope"])
    assert result.exit_code == 2 and "no route named 'nope'" in result.stderr


def test_test_command_shows_a_diff(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    shutil.copy(EXAMPLES / "siu_s15.hl7", tmp_path / "case.hl7")
    expected = json.loads((EXAMPLES / "siu_s15.fhir.json").read_text())
    for entry in expected["entry"]:
        if entry["resource"]["resourceType"] == "Appointment":
            entry["resource"]["status"] = "booked"
    (tmp_path / "case.fhir.json").write_text(json.dumps(expected))
    result = invoke("test", tmp_path)
    assert result.exit_code == 1
    assert "FAIL  case.hl7" in result.output
    diff = [line.strip() for line in result.output.splitlines()]
    assert any(l.startswith("-") and '"status": "booked"' in l for l in diff)
    assert any(l.startswith("+") and '"status": "cancelled"' in l for l in diff)
    assert result.output.endswith("0 passed, 1 failed\n")
    assert invoke("test", EXAMPLES).output.endswith("19 passed, 0 failed\n")


def test_the_mapping_version_changes_with_any_mapping_file(tmp_path):
    shutil.copytree(ROOT / "mappings", tmp_path / "mappings")
    before = Project.load(tmp_path).mappings.version
    assert Project.load(tmp_path).mappings.version == before  # the same files, the same version
    codes = tmp_path / "mappings/codesystem/sex.yaml"
    codes.write_text(codes.read_text() + "\n# a comment is a change too\n")
    assert Project.load(tmp_path).mappings.version != before


def test_convert_prints_warnings_and_what_ingest_would_refuse(tmp_path):
    """hl7bridge convert reads a file as the listener would: the reader's and mapping's warnings, and
    a message ingest would refuse is refused with the same reason; the other messages still convert."""
    sample = tmp_path / "mixed.hl7"
    good = SIU.replace(b"\r\n", b"\r").replace(b"\n", b"\r")
    warned = good.replace(b"NC000123", b"NC000124", 1).replace(b"\rPID|", b"\rpid|", 1)
    refused = good.replace(b"NC000123", b"NC000125", 1).replace(b"SIU^S12^SIU_S12", b"SIU^^SIU_S12", 1)
    sample.write_bytes(warned + refused)
    result = CliRunner().invoke(cli, ["convert", str(sample), "--config", str(ROOT)])
    assert result.exit_code == 1
    assert json.loads(result.stdout)["resourceType"] == "Bundle"  # the first one
    lines = result.stderr.splitlines()
    assert f"{sample}:1 NC000124: warning: segment 5 ID 'pid' read as 'PID'" in lines
    second = len(warned.rstrip(b"\r").split(b"\r")) + 1
    assert (f"{sample}:{second} NC000125: not accepted: MSH-9 has no trigger event (MSH-9.2), and the message "
            "structure SIU_S12 in MSH-9.3 serves S12 to S24, S26 and S27, so it cannot tell which: send the trigger "
            "in MSH-9.2") in lines
