"""What a newcomer tripped on, command by command, with click's CliRunner and exact output: prune
ages, send with unreadable files and a silent listener, --who without $USER, patients of two
assigning authorities, a dead delivery's diagnostics and its attempts after a replay, and the type
of a rejected message in journal stats."""

import itertools
import json
import socket
import threading
from datetime import datetime, timedelta, timezone

import pytest
from click.testing import CliRunner

from conftest import EXAMPLES, ROOT
from engine.cli import cli
from engine.mllp.framing import frame
from engine.mllp.ingest import Frame, Ingestor
from engine.store.sqlite import SqliteJournal as Journal

NOW = datetime(2026, 11, 24, 6, 0, tzinfo=timezone.utc)
NORTH = (b"MSH|^~\\&|SCHED|NORTHCLINIC|HL7BRIDGE|FINANCE|20261201093000||SIU^S12^SIU_S12|NC1|P|2.5.1\r"
         b"SCH|PL1|FL1\rPID|1||100234^^^NORTHCLINIC^MR||DOE^JANE\r")
# The same patient ID, from another assigning authority: another person.
EAST = (b"MSH|^~\\&|SCHED|EASTCLINIC|HL7BRIDGE|FINANCE|20261201093000||SIU^S12^SIU_S12|EC1|P|2.5.1\r"
        b"SCH|PL2|FL2\rPID|1||100234^^^EASTCLINIC^MR||ROE^RICHARD\r")
OUTCOME = json.dumps({"resourceType": "OperationOutcome", "issue": [
    {"severity": "error", "code": "invalid", "diagnostics": "Invoice.totalNet: currency 'XXX' is not supported",
     "expression": ["Invoice.totalNet.currency"]}]})


def invoke(*args, **kwargs):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False, **kwargs)


def journal_with(path, *frames):
    journal = Journal(path)
    clock = iter(NOW + timedelta(seconds=s) for s in range(100))
    counter = itertools.count(1)
    ingestor = Ingestor(journal, clock=lambda: next(clock), next_control_id=lambda: f"A{next(counter)}")
    for raw in frames:
        ingestor.ingest([Frame(raw, listener="mllp", peer="127.0.0.1:5000")])
    journal.close()
    return path


@pytest.fixture
def journal_path(tmp_path):
    return journal_with(tmp_path / "journal.db", NORTH, (EXAMPLES / "bad_msh.hl7").read_bytes(), EAST)


# -- journal prune: a unit is required, months and years exist, the cutoff is shown ----------------

@pytest.mark.parametrize("age, message", [
    ("90", "Error: --older-than: '90' has no unit; write 90d for days (30min, 12h, 90d, 2w, 6mo or 1y)\n"),
    ("1m", "Error: --older-than: '1m' is ambiguous; write 1min for minutes or 1mo for months\n"),
    ("3 fortnights", "Error: --older-than: unknown unit 'fortnights' in '3 fortnights'; write 30min, 12h, 90d, 2w, 6mo or 1y\n"),
])
def test_prune_refuses_an_age_without_a_clear_unit(journal_path, age, message):
    result = invoke("journal", "prune", "--journal", journal_path, "--older-than", age, "--dry-run")
    assert (result.exit_code, result.output) == (2, message)


def test_prune_accepts_months_and_years_and_says_the_cutoff(journal_path, monkeypatch):
    monkeypatch.setattr("engine.cli.journal.utc_now", lambda: datetime(2027, 6, 1, 12, 30, tzinfo=timezone.utc))
    result = invoke("journal", "prune", "--journal", journal_path, "--older-than", "6mo", "--dry-run")
    assert (result.exit_code, result.output) == (
        0, "would prune 3 messages received before 2026-12-03 12:30 UTC (6mo ago)\n")
    result = invoke("journal", "prune", "--journal", journal_path, "--older-than", "1y", "--dry-run")
    assert result.output == "would prune 0 messages received before 2026-06-01 12:30 UTC (1y ago)\n"
    result = invoke("journal", "prune", "--journal", journal_path, "--older-than", "6mo")
    assert result.output.startswith("pruned 3 messages received before 2026-12-03 12:30 UTC (6mo ago); journal and")


# -- send: --keep-going, an ACK that never comes, exit codes in --help -----------------------------

class Listener:
    """A plain MLLP server on a real socket: answers AA with the message's control ID, or never
    answers at all (``silent``: it accepts the connection and reads, like a hung engine)."""

    def __init__(self, silent=False):
        self.silent = silent
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.address = "127.0.0.1:%d" % self.sock.getsockname()[1]
        self.received = []
        threading.Thread(target=self.serve, daemon=True).start()

    def serve(self):
        try:
            connection, _ = self.sock.accept()
        except OSError:  # closed before anyone connected
            return
        buffer = b""
        while True:
            chunk = connection.recv(65536)
            if not chunk:
                return
            buffer += chunk
            while b"\x1c\r" in buffer:
                payload, buffer = buffer.split(b"\x1c\r", 1)
                message = payload.lstrip(b"\x0b")
                self.received.append(message)
                if not self.silent:
                    control_id = message.split(b"\r")[0].split(b"|")[9]
                    connection.sendall(frame(b"MSH|^~\\&|HL7BRIDGE|FINANCE|S|F|20261124060000||ACK|X1|P|2.5.1\r"
                                             b"MSA|AA|" + control_id + b"\r"))

    def close(self):
        self.sock.close()


def test_send_keep_going_skips_unreadable_files_and_sends_the_others(tmp_path):
    bad = tmp_path / "bad.hl7"
    bad.write_bytes(b"PID|1\r")
    missing = tmp_path / "missing.hl7"
    listener = Listener()
    result = invoke("send", "-q", "--keep-going", listener.address, EXAMPLES / "siu_s12.hl7", missing, bad,
                    EXAMPLES / "dft_p03.hl7")
    listener.close()
    assert result.exit_code == 2
    assert result.output == (
        f"Error: {missing}: cannot read it: No such file or directory; skipped\n"
        f"Error: {bad}: line 1: segment 'PID' is outside any message (no MSH before it); skipped\n"
        f"{EXAMPLES / 'siu_s12.hl7'}:1 NC000123: AA\n"
        f"{EXAMPLES / 'dft_p03.hl7'}:1 EC000501: AA\n"
        f"Error: 2 of 4 file(s) skipped: {missing}, {bad}\n"
    )
    assert len(listener.received) == 2


def test_send_without_keep_going_sends_nothing_when_a_file_is_unreadable(tmp_path):
    missing = tmp_path / "missing.hl7"
    listener = Listener()
    result = invoke("send", listener.address, EXAMPLES / "siu_s12.hl7", missing)
    listener.close()
    assert (result.exit_code, result.output) == (
        2, f"Error: {missing}: cannot read it: No such file or directory (nothing sent; --keep-going sends the other files)\n")
    assert listener.received == []


def test_send_says_the_ack_timed_out_not_that_the_connection_failed():
    listener = Listener(silent=True)
    result = invoke("send", "--timeout", "0.3", listener.address, EXAMPLES / "siu_s12.hl7")
    listener.close()
    assert (result.exit_code, result.output) == (
        3, f"Error: no ACK from {listener.address} within 0.3 s for {EXAMPLES / 'siu_s12.hl7'}:1 NC000123: the "
           "connection is open but the listener did not answer (--timeout waits longer)\n")


def test_send_help_lists_every_exit_code():
    text = " ".join(invoke("send", "--help").output.split())
    assert ("Exit codes: 0 every message was accepted (AA/CA); 1 a message was not accepted; 2 bad usage or a file "
            "that cannot be read or split into messages (nothing is sent, unless --keep-going: then the other files "
            "are sent first); 3 the engine cannot be reached, closed the connection, or sent no ACK within --timeout."
            ) in text


# -- replay --who: the login name or the user ID when $USER is unset -------------------------------

def replayed_by(path):
    journal = Journal(path, create=False)
    try:
        return journal.conn.execute("SELECT who FROM replays ORDER BY id DESC LIMIT 1").fetchone()[0]
    finally:
        journal.close()


def test_who_falls_back_to_the_login_name_then_the_uid(journal_path, monkeypatch):
    import os
    import pwd

    unset = {"USER": None, "LOGNAME": None}
    result = invoke("replay", "--journal", journal_path, "--message", "1", "--why", "test", env=unset)
    assert result.exit_code == 0
    assert replayed_by(journal_path) == pwd.getpwuid(os.getuid()).pw_name
    invoke("replay", "--journal", journal_path, "--message", "1", "--why", "test", env={"USER": None, "LOGNAME": "ops"})
    assert replayed_by(journal_path) == "ops"

    def no_account(uid):
        raise KeyError(uid)

    monkeypatch.setattr(pwd, "getpwuid", no_account)
    invoke("replay", "--journal", journal_path, "--message", "1", "--why", "test", env=unset)
    assert replayed_by(journal_path) == f"uid {os.getuid()}"


# -- journal search --patient ID^^^AUTHORITY -------------------------------------------------------

HEADER = ("id  received_at                  control_id  message_type  trigger_event  sending_facility  patient"
          "               status    ack_code\n"
          "--  ---------------------------  ----------  ------------  -------------  ----------------  "
          "--------------------  --------  --------\n")


def test_patient_of_one_assigning_authority(journal_path):
    result = invoke("journal", "search", "--journal", journal_path, "--patient", "100234^^^NORTHCLINIC")
    assert (result.exit_code, result.output) == (0, HEADER + (
        "1   2026-11-24T06:00:00.000000Z  NC1         SIU           S12            NORTHCLINIC       "
        "100234^^^NORTHCLINIC  accepted  AA\n"))
    result = invoke("journal", "search", "--journal", journal_path, "--patient", "100234^^^EASTCLINIC^MR", "--json")
    assert [(r["id"], r["patient_authority"]) for r in json.loads(result.output)] == [(3, "EASTCLINIC")]
    assert invoke("journal", "search", "--journal", journal_path, "--patient", "100234^^^SOUTHCLINIC").exit_code == 1


def test_patient_id_alone_says_it_spans_two_authorities(journal_path):
    result = invoke("journal", "search", "--journal", journal_path, "--patient", "100234")
    assert result.output == HEADER + (
        "3   2026-11-24T06:00:02.000000Z  EC1         SIU           S12            EASTCLINIC        "
        "100234^^^EASTCLINIC   accepted  AA\n"
        "1   2026-11-24T06:00:00.000000Z  NC1         SIU           S12            NORTHCLINIC       "
        "100234^^^NORTHCLINIC  accepted  AA\n"
        "note: patient ID 100234 is used by 2 assigning authorities here (EASTCLINIC, NORTHCLINIC); "
        "--patient 100234^^^NORTHCLINIC shows one's\n")


def test_patient_and_facility_together(journal_path):
    result = invoke("journal", "search", "--journal", journal_path, "--patient", "100234", "--facility", "EASTCLINIC",
                    "--json")
    assert [r["control_id"] for r in json.loads(result.output)] == ["EC1"]


# -- journal stats: a rejected message's type ------------------------------------------------------

def test_stats_names_the_type_of_a_message_without_msh9(journal_path):
    lines = invoke("journal", "stats", "--journal", journal_path, "--since", "2026-11-24T00:00").output.splitlines()
    assert lines[:9] == [
        "3 messages received since 2026-11-24T00:00:00.000000Z",
        "by route:", "  -                               3",
        "by type:", "  SIU^S12                         2", "  (no MSH-9)                      1",
        "by status:", "  accepted                        2", "  rejected                        1",
    ]
    stats = json.loads(invoke("journal", "stats", "--journal", journal_path, "--since", "2026-11-24T00:00",
                              "--json").output)
    assert stats["by_type"] == [{"value": "SIU^S12", "count": 2}, {"value": "(no MSH-9)", "count": 1}]


# -- journal show: what the server said, and attempts that add up after a replay -------------------

def test_show_gives_the_servers_diagnostics_and_every_attempt_across_a_replay(tmp_path):
    from engine.delivery.outbox import PERMANENT, Result, finish
    from engine.transform.project import Project

    path = tmp_path / "journal.db"
    journal = Journal(path)
    project = Project.load(ROOT)
    ingestor = Ingestor(journal, clock=lambda: NOW, next_control_id=lambda: "A1", project=project)
    [outcome] = ingestor.ingest([Frame((EXAMPLES / "dft_p03.hl7").read_bytes())])
    refused = Result(PERMANENT, 422, OUTCOME, error="HTTP 422")
    destination = project.destinations["erp-finance"]
    [delivery] = journal.due_deliveries("erp-finance", NOW, 5)
    finish(journal, delivery, destination, refused, NOW, NOW + timedelta(milliseconds=12))
    journal.replay([outcome.message_id], ["erp-finance"], "alice", "currency table fixed", NOW + timedelta(minutes=5))
    [delivery] = journal.due_deliveries("erp-finance", NOW + timedelta(minutes=6), 5)
    finish(journal, delivery, destination, refused, NOW + timedelta(minutes=6), NOW + timedelta(minutes=6, milliseconds=9))
    journal.close()

    text = invoke("journal", "show", "--journal", path, outcome.message_id).output
    said = "error invalid: Invoice.totalNet: currency 'XXX' is not supported [Invoice.totalNet.currency]"
    assert (
        f"delivery to erp-finance: dead after 2 attempt(s), 1 since it was replayed (HTTP 422: {said})\n"
        "  2026-11-24T06:00:00.000000Z  permanent HTTP 422  12 ms\n"
        f"      {said}\n"
        "  2026-11-24T06:05:00.000000Z  replayed by alice: currency table fixed\n"
        "  2026-11-24T06:06:00.000000Z  permanent HTTP 422  9 ms\n"
        f"      {said}\n"
    ) in text
    detail = json.loads(invoke("journal", "show", "--journal", path, outcome.message_id, "--json").output)
    [erp] = [d for d in detail["deliveries"] if d["destination"] == "erp-finance"]
    assert (erp["attempts"], erp["attempts_since_replay"], erp["events"][0]["response"]) == (2, 1, OUTCOME)
