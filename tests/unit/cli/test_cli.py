"""The CLI in-process with click's CliRunner: exact output and exit codes, the same on a SQLite
journal and a PostgreSQL one (each test that takes a journal runs on both)."""

import itertools
import json
from datetime import datetime, timezone

import pytest
from click.testing import CliRunner

from backends import backend, journal_location  # noqa: F401 (the tests run on both backends)
from conftest import EXAMPLES
from engine.cli import cli, parse_since
from engine.mllp.ingest import Frame, Ingestor
from engine.store import open_journal

SHORT = (
    b"MSH|^~\\&|SCHED|NORTHCLINIC|HL7BRIDGE|FINANCE|20261201093000||SIU^S12^SIU_S12|NC1|P|2.5.1\r"
    b"SCH|PL1|FL1\r"
    b"PID|1||100234^^^NORTHCLINIC^MR||DOE^JANE\r"
)


@pytest.fixture
def journal_path(journal_location):
    path = journal_location
    journal = open_journal(path)
    clock = iter([datetime(2026, 11, 24, 6, 0, s, tzinfo=timezone.utc) for s in range(10)])
    counter = itertools.count(1)
    ingestor = Ingestor(journal, clock=lambda: next(clock), next_control_id=lambda: f"A{next(counter)}")
    ingestor.ingest([Frame(SHORT, listener="mllp", peer="127.0.0.1:5000")])
    ingestor.ingest([Frame((EXAMPLES / "bad_msh.hl7").read_bytes(), listener="mllp", peer="127.0.0.1:5000")])
    ingestor.ingest([Frame(SHORT, listener="mllp", peer="127.0.0.1:5001")])
    journal.close()
    return path


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def test_search_table(journal_path):
    result = invoke("journal", "search", "--journal", journal_path)
    assert result.exit_code == 0
    assert result.output == (
        "id  received_at                  control_id  message_type  trigger_event  sending_facility  patient               status     ack_code\n"
        "--  ---------------------------  ----------  ------------  -------------  ----------------  --------------------  ---------  --------\n"
        "3   2026-11-24T06:00:02.000000Z  NC1         SIU           S12            NORTHCLINIC       100234^^^NORTHCLINIC  duplicate  AA\n"
        "2   2026-11-24T06:00:01.000000Z  NC000999                                 NORTHCLINIC       100999^^^NORTHCLINIC  rejected   AR\n"
        "1   2026-11-24T06:00:00.000000Z  NC1         SIU           S12            NORTHCLINIC       100234^^^NORTHCLINIC  accepted   AA\n"
    )


def test_search_filters_and_json(journal_path):
    result = invoke("journal", "search", "--journal", journal_path, "--status", "rejected", "--json")
    rows = json.loads(result.output)
    assert [(r["id"], r["error"]) for r in rows] == [(2, "MSH-9 message type is missing")]
    result = invoke("journal", "search", "--journal", journal_path, "--patient", "100234", "--limit", "1", "--json")
    assert [r["id"] for r in json.loads(result.output)] == [3]


def test_search_with_no_match_exits_1(journal_path):
    result = invoke("journal", "search", "--journal", journal_path, "--text", "nothing-like-this")
    assert (result.exit_code, result.output) == (1, "(no messages)\n")


def test_search_raw_output_can_be_piped_to_send(journal_path):
    result = CliRunner().invoke(cli, ["journal", "search", "--journal", str(journal_path), "--control-id", "NC1", "--raw"])
    assert result.stdout_bytes == (SHORT.rstrip(b"\r") + b"\r\n") * 2


def test_show(journal_path):
    result = invoke("journal", "show", "--journal", journal_path, "1")
    assert result.exit_code == 0
    assert result.output == (
        "id:                     1\n"
        "received_at:            2026-11-24T06:00:00.000000Z\n"
        "listener:               mllp\n"
        "peer:                   127.0.0.1:5000\n"
        "status:                 accepted\n"
        "control_id:             NC1\n"
        "message_type:           SIU\n"
        "trigger_event:          S12\n"
        "message_structure:      SIU_S12\n"
        "version:                2.5.1\n"
        "processing_id:          P\n"
        "sending_application:    SCHED\n"
        "sending_facility:       NORTHCLINIC\n"
        "receiving_application:  HL7BRIDGE\n"
        "receiving_facility:     FINANCE\n"
        "charset:                utf-8\n"
        "size:                   142\n"
        "truncated:              False\n"
        "ack_code:               AA\n"
        "identifiers:\n"
        "  patient               100234 (NORTHCLINIC)\n"
        "  placer_appointment    PL1\n"
        "  filler_appointment    FL1\n"
        "\n"
        "message:\n"
        "  MSH\n"
        "    MSH-1      Field Separator: |\n"
        "    MSH-2      Encoding Characters: ^~\\&\n"
        "    MSH-3      Sending Application: SCHED\n"
        "    MSH-4      Sending Facility: NORTHCLINIC\n"
        "    MSH-5      Receiving Application: HL7BRIDGE\n"
        "    MSH-6      Receiving Facility: FINANCE\n"
        "    MSH-7      Date Time Of Message: 20261201093000\n"
        "    MSH-9      Message Type: SIU^S12^SIU_S12\n"
        "    MSH-10     Message Control ID: NC1\n"
        "    MSH-11     Processing ID: P\n"
        "    MSH-12     Version ID: 2.5.1\n"
        "  SCH\n"
        "    SCH-1      Placer Appointment ID: PL1\n"
        "    SCH-2      Filler Appointment ID: FL1\n"
        "  PID\n"
        "    PID-1      Set ID PID: 1\n"
        "    PID-3      Patient Identifier List: 100234^^^NORTHCLINIC^MR\n"
        "    PID-5      Patient Name: DOE^JANE\n"
        "\n"
        "ack:\n"
        "  MSH|^~\\&|HL7BRIDGE|FINANCE|SCHED|NORTHCLINIC|20261124060000+0000||ACK^S12^ACK|A1|P|2.5.1\n"
        "  MSA|AA|NC1\n"
    )


def test_show_json_and_validation(journal_path):
    result = invoke("journal", "show", "--journal", journal_path, "1", "--json", "--validate")
    detail = json.loads(result.output)
    assert detail["summary"]["control_id"] == "NC1"
    assert detail["segments"][2]["fields"][1] == {
        "path": "PID-3", "name": "Patient Identifier List", "datatype": "CX", "value": "100234^^^NORTHCLINIC^MR"
    }
    assert detail["validation"]["errors"]  # SCH lacks required fields in this short message


def test_show_raw_and_missing(journal_path):
    assert CliRunner().invoke(cli, ["journal", "show", "--journal", str(journal_path), "1", "--raw"]).stdout_bytes == SHORT
    result = invoke("journal", "show", "--journal", journal_path, "99")
    assert (result.exit_code, result.output) == (1, f"Error: no message 99 in {journal_path}\n")


def test_missing_journal_exits_3(tmp_path):
    result = invoke("journal", "search", "--journal", tmp_path / "none.db")
    assert result.exit_code == 3
    assert "cannot open journal" in result.output


def test_send_rejects_a_bad_address_and_a_bad_batch(tmp_path):
    bad = tmp_path / "bad.hl7"
    bad.write_bytes(b"PID|1\r")
    assert invoke("send", "nowhere", EXAMPLES / "siu_s12.hl7").output == "Error: 'nowhere' is not HOST:PORT\n"
    result = invoke("send", "127.0.0.1:9", bad)
    assert result.exit_code == 2
    assert result.output == (f"Error: {bad}: line 1: segment 'PID' is outside any message (no MSH before it) "
                             "(nothing sent; --keep-going sends the other files)\n")


def test_serve_reports_a_bad_config(tmp_path):
    (tmp_path / "hl7bridge.yaml").write_text("journal:\n  sync: full\n")
    result = invoke("serve", "--config", tmp_path)
    assert result.exit_code == 2
    assert result.output == (
        f"Error: {tmp_path / 'hl7bridge.yaml'}:2: unknown key 'sync' in journal (did you mean 'synchronous'?)\n"
    )


def test_parse_since():
    now = datetime(2026, 11, 24, 6, 0, tzinfo=timezone.utc)
    assert parse_since("2h", now) == "2026-11-24T04:00:00.000000Z"
    assert parse_since("7d", now) == "2026-11-17T06:00:00.000000Z"
    assert parse_since("2026-11-24T01:30", now) == "2026-11-24T01:30:00.000000Z"


def test_every_command_has_help_with_an_example():
    def walk(group, prefix):
        for name, command in group.commands.items():
            yield prefix + [name], command
            if hasattr(command, "commands"):
                yield from walk(command, prefix + [name])

    for path, _ in walk(cli, []):
        result = invoke(*path, "--help")
        assert result.exit_code == 0
        assert "Example: hl7bridge " in result.output, path


def test_show_includes_the_conversion(journal_location):
    from conftest import ROOT
    from engine.transform.project import Project

    path = journal_location
    journal = open_journal(path)
    ingestor = Ingestor(journal, clock=lambda: datetime(2026, 11, 24, 6, 0, tzinfo=timezone.utc),
                        next_control_id=lambda: "A1", project=Project.load(ROOT))
    [outcome] = ingestor.ingest([Frame((EXAMPLES / "dft_p03.hl7").read_bytes())])
    journal.close()
    assert outcome.status == "mapped"
    result = invoke("journal", "show", "--journal", path, "1")
    text = result.output
    assert "route:                  clinic-charges" in text
    assert "conversion: mapped by route clinic-charges at 2026-11-24T06:00:00.000000Z" in text
    assert "  bundle: 14 entries" in text  # 13 resources and the Provenance
    assert "    PUT ChargeItem?identifier=urn:hl7bridge:ft1:EASTCLINIC|TX20261208-0001" in text
    rows = json.loads(invoke("journal", "search", "--journal", path, "--route", "clinic-charges", "--json").output)
    assert [r["status"] for r in rows] == ["mapped"]
    assert invoke("journal", "search", "--journal", path, "--status", "mapping_error").exit_code == 1


def dft_with_one_attempt(location, result, replay=False):
    """A journal with the DFT example mapped and its erp-finance delivery tried once (with
    ``result``), then replayed by alice if asked; returns (journal path, the message's outcome)."""
    from conftest import ROOT
    from engine.delivery.outbox import finish
    from engine.transform.project import Project

    path = location
    journal = open_journal(path)
    now = datetime(2026, 11, 24, 6, 0, tzinfo=timezone.utc)
    project = Project.load(ROOT)
    ingestor = Ingestor(journal, clock=lambda: now, next_control_id=lambda: "A1", project=project)
    [outcome] = ingestor.ingest([Frame((EXAMPLES / "dft_p03.hl7").read_bytes())])
    [delivery] = journal.due_deliveries("erp-finance", now, 5)
    finish(journal, delivery, project.destinations["erp-finance"], result, now, now)
    if replay:
        journal.replay([outcome.message_id], ["erp-finance"], "alice", "test", now)
    journal.close()
    return path, outcome


def test_show_lists_deliveries_attempts_and_replays_and_search_by_delivery(journal_location):
    from engine.delivery.outbox import OK, Result

    path, outcome = dft_with_one_attempt(journal_location, Result(OK, 201), replay=True)
    text = invoke("journal", "show", "--journal", path, str(outcome.message_id)).output
    assert ("delivery to erp-finance: pending after 1 attempt(s), 0 since it was replayed\n"
            "  2026-11-24T06:00:00.000000Z  ok HTTP 201  0 ms\n"
            "  2026-11-24T06:00:00.000000Z  replayed by alice: test\n") in text
    assert "delivery to fhir-main: pending after 0 attempt(s)\n" in text
    rows = json.loads(invoke("journal", "search", "--journal", path, "--delivery", "fhir-main:pending", "--json").output)
    assert [r["id"] for r in rows] == [outcome.message_id]
    assert invoke("journal", "search", "--journal", path, "--delivery", "dead").exit_code == 1
    stats = json.loads(invoke("journal", "stats", "--journal", path, "--since", "2026-11-24T00:00", "--json").output)
    assert stats["messages"] == 1 and stats["by_status"] == [{"value": "mapped", "count": 1}]
    assert stats["by_type"] == [{"value": "DFT^P03", "count": 1}]
    assert stats["seconds_to_conversion"]["p50"] == 0.0


def test_outbox_replay_and_stats_exact_output(journal_location):
    from engine.delivery.outbox import PERMANENT, Result

    path, _ = dft_with_one_attempt(journal_location, Result(PERMANENT, 400, error="HTTP 400"))
    assert invoke("outbox", "--journal", path).output == (
        "destination  pending  in_flight  retrying  dead  delivered  oldest_open                  unconverted  held\n"
        "-----------  -------  ---------  --------  ----  ---------  ---------------------------  -----------  ----\n"
        "erp-finance  0        0          0         1     0          2026-11-24T06:00:00.000000Z  0            0\n"
        "fhir-main    1        0          0         0     0          2026-11-24T06:00:00.000000Z  0            0\n"
    )
    assert invoke("outbox", "--journal", path, "--state", "dead").output == (
        "id  message_id  control_id  destination  state  attempts  next_attempt_at              last_error  waits_for\n"
        "--  ----------  ----------  -----------  -----  --------  ---------------------------  ----------  ---------\n"
        "2   1           EC000501    erp-finance  dead   1         2026-11-24T06:00:00.000000Z  HTTP 400\n"
    )
    result = invoke("replay", "--journal", path, "--dead", "erp-finance", "--who", "ops", "--why", "fixed")
    assert (result.exit_code, result.output) == (0, "replayed 1 message(s): 1 deliveries queued again\n")
    result = invoke("replay", "--journal", path, "--dead", "erp-finance", "--why", "again")
    assert (result.exit_code, result.output) == (1, "Error: nothing to replay: no message matched\n")
    lines = invoke("journal", "stats", "--journal", path, "--since", "2026-11-24T00:00").output.splitlines()
    assert lines[:7] == [
        "1 messages received since 2026-11-24T00:00:00.000000Z",
        "by route:", "  clinic-charges                  1",
        "by type:", "  DFT^P03                         1",
        "by status:", "  mapped                          1",
    ]
    assert lines[7] == "seconds from receipt to:"
    assert lines[8].startswith("  ACK ")
