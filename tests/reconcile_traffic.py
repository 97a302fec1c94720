"""A month of scheduling and billing traffic with planted gaps of every kind, for the reconcile tests.

``Month(journal, config).run()`` feeds SIU and DFT messages (built from the shipped examples) through
the real ingest path and pipeline (``Ingestor`` with an injected clock, routes that map before the
ACK), settles each delivery as the planted story says (delivered within hours, dead, or left
pending) through the real outbox, and returns ``planted``: the (kind, facility, subject) of every
exception the month holds. Everything else in it is work a revenue-cycle team need not look at:
charges linked by visit number and by patient + date, reschedules, cancellations (some on the
day), no-shows, deletions, exact resends, a charge resent under a new control ID, an appointment
booked after its charge arrived, payments and adjustments, and a remapping replay of a few days.
"""

from __future__ import annotations

import shutil
from datetime import datetime, timedelta, timezone
from pathlib import Path

from conftest import EXAMPLES, ROOT
from engine.delivery.outbox import OK, PERMANENT, Result, finish
from engine.mllp.ingest import Frame, Ingestor
from engine.transform.project import Project

START = datetime(2026, 10, 1, 14, 0, tzinfo=timezone.utc)  # 08:00 in Chicago (-0600 written in every time)
AS_OF = datetime(2026, 11, 3, 18, 0, tzinfo=timezone.utc)
LOCAL = timezone(timedelta(hours=-6))
SETTINGS = """\
reconcile:
  charge_window: 3d
  posting_window: 1d
  link: [visit, patient_date]
  facilities:
    EASTCLINIC: {link: [patient_date], charge_window: 4d}
  report: {directory: reports, at: "06:00", since: 30d}
"""


def config_dir(directory: Path) -> Path:
    """The shipped routes, mappings and destinations, with scheduling mapped before the ACK (so the
    injected clock times every conversion) and the reconcile settings above."""
    if not directory.exists():
        for part in ("routes", "mappings", "destinations"):
            shutil.copytree(ROOT / part, directory / part)
        route = directory / "routes" / "10-scheduling.yaml"
        route.write_text(route.read_text().replace("after: commit ", "after: mapping"))
        (directory / "hl7bridge.yaml").write_text(SETTINGS)
    return directory


def ts(moment: datetime) -> str:
    return moment.astimezone(LOCAL).strftime("%Y%m%d%H%M%S-0600")


def _set(line: str, number: int, value: str) -> str:
    fields = line.split("|")
    index = number if not line.startswith("MSH") else number - 1
    while len(fields) <= index:
        fields.append("")
    fields[index] = value
    return "|".join(fields)


def _segments(name: str) -> list[str]:
    return (EXAMPLES / name).read_bytes().decode().rstrip("\r").split("\r")


SIU_TEMPLATE = _segments("siu_s12.hl7")
DFT_TEMPLATE = [line for line in _segments("dft_p03.hl7") if not line.startswith(("FT1|2", "FT1|3", "FT1|4"))]
STATUS = {"S12": "Booked", "S13": "Booked", "S14": "Booked", "S15": "Cancelled", "S17": "Deleted", "S26": "Noshow"}


def siu(trigger: str, facility: str, control: str, sent: datetime, appointment: str, start: datetime,
        patient: str, visit: str) -> bytes:
    out = []
    for line in SIU_TEMPLATE:
        if line.startswith("MSH"):
            line = _set(_set(_set(_set(line, 4, facility), 7, ts(sent)), 9, f"SIU^{trigger}^SIU_S12"), 10, control)
        elif line.startswith("SCH"):
            line = _set(_set(_set(line, 1, f"P{appointment}^SCHED"), 2, f"{appointment}^SCHED"),
                        11, f"^^30^{ts(start)}^{ts(start + timedelta(minutes=30))}")
            line = _set(line, 25, f"{STATUS[trigger]}^{STATUS[trigger]}^HL70278")
        elif line.startswith(("TQ1", "NTE", "RGS", "AIS", "AIG", "AIL", "AIP")):
            continue  # the SCH carries the time; resources are not needed here
        elif line.startswith("PID"):
            line = _set(_set(line, 3, f"{patient}^^^{facility}^MR"), 18, f"A{patient}^^^{facility}^AN")
        elif line.startswith("PV1"):
            line = _set(line, 19, f"{visit}^^^{facility}^VN" if visit else "")
        out.append(line)
    return ("\r".join(out) + "\r").encode()


def dft(facility: str, control: str, sent: datetime, lines: list[tuple], patient: str, visit: str) -> bytes:
    """``lines``: (transaction ID, service time, made time, type, amount)."""
    out = []
    for line in DFT_TEMPLATE:
        if line.startswith("MSH"):
            line = _set(_set(_set(line, 4, facility), 7, ts(sent)), 10, control)
        elif line.startswith("EVN"):
            line = _set(_set(line, 2, ts(sent)), 6, ts(sent))
        elif line.startswith("PID"):
            line = _set(_set(line, 3, f"{patient}^^^{facility}^MR"), 18, f"A{patient}^^^{facility}^AN")
        elif line.startswith("PV1"):
            line = _set(line, 19, f"{visit}^^^{facility}^VN" if visit else "")
        elif line.startswith("FT1"):
            template = line
            for number, (txn, service, made, kind, amount) in enumerate(lines, 1):
                item = _set(_set(_set(template, 1, str(number)), 2, txn), 4, ts(service))
                item = _set(_set(item, 5, ts(made)), 6, kind)
                item = _set(_set(item, 11, f"{amount:.2f}&USD"), 12, f"{amount:.2f}&USD")
                out.append(item)
            continue
        out.append(line)
    return ("\r".join(out) + "\r").encode()


class Month:
    def __init__(self, journal, directory: Path):
        self.journal = journal
        self.project = Project.load(config_dir(directory))
        self.now = START
        self.ingestor = Ingestor(journal, clock=lambda: self.now, project=self.project)
        self.sent: list[tuple[datetime, bytes, str]] = []  # (time, frame, what happens to its ERP delivery)
        self.planted: set[tuple[str, str, str]] = set()
        self.controls = 0
        self.message_ids: dict[str, int] = {}  # control ID -> message ID

    def control(self) -> str:
        self.controls += 1
        return f"M{self.controls:06d}"

    def send(self, at: datetime, frame: bytes, erp: str = "delivered") -> str:
        self.sent.append((at, frame, erp))
        return frame.split(b"|")[9].decode()

    def visit(self, facility, number, day, hour=9, charge_after=timedelta(hours=8), visit=True, book=True,
              txn=None, amount=120.0, erp="delivered", payment=False):
        """A booked appointment and its charge (``charge_after`` its start; None: no charge)."""
        start = START + timedelta(days=day, hours=hour - 8)
        appointment, patient = f"{facility[0]}{number:05d}", f"{facility[0]}P{number:05d}"
        visit_id = f"V{facility[0]}{number:05d}" if visit else ""
        if book:
            self.send(start - timedelta(days=5), siu("S12", facility, self.control(), start - timedelta(days=5),
                                                     appointment, start, patient, visit_id))
        if charge_after is not None:
            made = start + charge_after
            lines = [(txn or f"T{appointment}", start, made, "CG", amount)]
            if payment:
                lines += [(f"P{appointment}", start, made, "PY", -20.0), (f"J{appointment}", start, made, "AJ", -10.0)]
            self.send(made + timedelta(minutes=5), dft(facility, self.control(), made, lines, patient, visit_id), erp)
        return appointment, patient, visit_id, start

    def run(self) -> set:
        for day in range(30):
            for n in range(4):  # ordinary visits: NORTH links by visit number, EAST by patient + date
                number = day * 10 + n
                self.visit("NORTHCLINIC", number, day, hour=9 + n, payment=n == 0)
                self.visit("EASTCLINIC", number, day, hour=9 + n)
        # Reschedules: booked for day 5, moved to day 7, charged on day 7 (EAST links by patient + date).
        appointment, patient, visit_id, start = self.visit("EASTCLINIC", 901, 5, charge_after=None)
        moved = start + timedelta(days=2)
        self.send(start - timedelta(days=1), siu("S13", "EASTCLINIC", self.control(), start - timedelta(days=1),
                                                 appointment, moved, patient, visit_id))
        self.send(moved + timedelta(hours=6), dft("EASTCLINIC", self.control(), moved + timedelta(hours=6),
                                                  [("TE00901", moved, moved + timedelta(hours=6), "CG", 90.0)],
                                                  patient, visit_id))
        # Modified (S14) and still charged; the S14 comes after the charge.
        appointment, patient, visit_id, start = self.visit("NORTHCLINIC", 902, 8)
        self.send(start + timedelta(hours=10), siu("S14", "NORTHCLINIC", self.control(), start + timedelta(hours=10),
                                                   appointment, start, patient, visit_id))
        # Cancelled (one on the day itself), a no-show and a deletion: no charge expected.
        for number, trigger, before in ((903, "S15", timedelta(days=2)), (904, "S15", timedelta(hours=2)),
                                        (905, "S26", -timedelta(hours=1)), (906, "S17", timedelta(days=1))):
            appointment, patient, visit_id, start = self.visit("NORTHCLINIC", number, 10, charge_after=None)
            self.send(start - before, siu(trigger, "NORTHCLINIC", self.control(), start - before, appointment, start,
                                          patient, visit_id))
        # The charge arrives before its appointment's booking message (out of order): linked when it comes.
        appointment, patient, visit_id, start = self.visit("NORTHCLINIC", 907, 12, book=False)
        self.send(start + timedelta(days=1), siu("S12", "NORTHCLINIC", self.control(), start + timedelta(days=1),
                                                 appointment, start, patient, visit_id))
        # An exact resend of a charge message (same control ID): a journal duplicate, nothing new.
        self.visit("NORTHCLINIC", 908, 14)
        at, frame, _ = self.sent[-1]
        self.send(at + timedelta(minutes=3), frame)
        # The same charge line resent under a new control ID: one line, two messages.
        appointment, patient, visit_id, start = self.visit("EASTCLINIC", 909, 14)
        at, frame, _ = self.sent[-1]
        self.send(at + timedelta(hours=1), frame.replace(frame.split(b"|")[9], self.control().encode(), 1))

        # The planted gaps.
        for facility, number, day in (("NORTHCLINIC", 950, 6), ("NORTHCLINIC", 951, 20), ("EASTCLINIC", 952, 25)):
            appointment, *_ = self.visit(facility, number, day, charge_after=None)
            self.planted.add(("missed_charge", facility, appointment))
        # Inside the charge window at AS_OF: not missed yet.
        self.visit("NORTHCLINIC", 953, 32, hour=8, charge_after=None)
        for facility, number, day, late in (("NORTHCLINIC", 960, 4, 5), ("EASTCLINIC", 961, 9, 6)):
            appointment, *_ = self.visit(facility, number, day, charge_after=timedelta(days=late))
            self.planted.add(("late_charge", facility, f"T{appointment}"))
        # 3.5 days is late for NORTH (3d) but not for EAST (4d).
        appointment, *_ = self.visit("NORTHCLINIC", 962, 11, charge_after=timedelta(days=3.5))
        self.planted.add(("late_charge", "NORTHCLINIC", f"T{appointment}"))
        self.visit("EASTCLINIC", 963, 11, charge_after=timedelta(days=3.5))
        for facility, number, day in (("NORTHCLINIC", 970, 16), ("EASTCLINIC", 971, 18)):
            appointment, *_ = self.visit(facility, number, day, book=False)
            self.planted.add(("charge_without_appointment", facility, f"T{appointment}"))
        # Booked for one patient, charged to another on the same day at EAST (patient + date): no link.
        _, _, visit_id, start = self.visit("EASTCLINIC", 972, 19, charge_after=None)
        self.planted.add(("missed_charge", "EASTCLINIC", "E00972"))
        self.send(start + timedelta(hours=3), dft("EASTCLINIC", self.control(), start + timedelta(hours=3),
                                                  [("TE00972", start, start + timedelta(hours=3), "CG", 75.0)],
                                                  "EP99999", visit_id))
        self.planted.add(("charge_without_appointment", "EASTCLINIC", "TE00972"))
        for facility, number, day, erp in (("NORTHCLINIC", 980, 21, "dead"), ("EASTCLINIC", 981, 22, "dead"),
                                           ("NORTHCLINIC", 982, 23, "pending")):
            appointment, *_ = self.visit(facility, number, day, erp=erp)
            self.planted.add(("erp_not_posted", facility, f"T{appointment}"))
        # A payment whose posting is dead: payments are posted too, so it is not posted.
        appointment, *_ = self.visit("NORTHCLINIC", 983, 24, payment=True, erp="dead-payment")
        self.planted.add(("erp_not_posted", "NORTHCLINIC", f"T{appointment}"))
        self.planted.add(("erp_not_posted", "NORTHCLINIC", f"P{appointment}"))
        self.planted.add(("erp_not_posted", "NORTHCLINIC", f"J{appointment}"))
        # Pending, but inside the posting window at AS_OF: not yet an exception.
        self.visit("NORTHCLINIC", 984, 33, hour=8, charge_after=timedelta(hours=2), erp="pending")

        for at, frame, erp in sorted(self.sent, key=lambda item: item[0]):
            self.now = at
            [outcome] = self.ingestor.ingest([Frame(frame)])
            assert outcome.status in ("mapped", "duplicate"), (outcome.status, frame[:120])
            self.settle(outcome.message_id, at, erp)
        return self.planted

    def settle(self, message_id: int, at: datetime, erp: str):
        """Deliver (or not) the message's deliveries an hour after it arrived."""
        later = at + timedelta(hours=1)
        for delivery in self.journal.due_deliveries("fhir-main", later, 1000) + \
                self.journal.due_deliveries("erp-finance", later, 1000):
            if delivery.message_id != message_id:
                continue
            destination = self.project.destinations[delivery.destination]
            if delivery.destination == "erp-finance" and erp in ("dead", "dead-payment"):
                finish(self.journal, delivery, destination, Result(PERMANENT, None, "refused", error="ERP refused it"),
                       later, later)
            elif delivery.destination == "erp-finance" and erp == "pending":
                continue
            else:
                finish(self.journal, delivery, destination, Result(OK, 200, "ok"), later, later)
