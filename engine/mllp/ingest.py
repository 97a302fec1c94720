"""From received frame to journal row and ACK: plain Python, no sockets, no reactor.

``assess`` reads one frame and decides what it is (accepted, or rejected and why).
``Ingestor.ingest`` takes a batch of frames, detects duplicates, builds each ACK, and journals the
whole batch in one transaction (group commit). Only after that commit does the caller get the ACKs
to send, so an ACK never promises a message the journal does not hold.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Callable

from ..hl7 import charset as charsets
from ..hl7.ack import ACCEPT, ERROR, REJECT, AckError, Identity, ack_code, ack_wanted, build_ack, version_tuple
from ..hl7.er7 import Message, parse, unescape
from ..errors import ParseError
from ..hl7.header import Header, read_header
from ..store.journal import Entry, Journal
from ..delivery.outbox import create_deliveries
from ..transform.pipeline import decide

# Statuses a journal row can have after ingest.
ACCEPTED, REJECTED, DUPLICATE, FAILED, HELD = "accepted", "rejected", "duplicate", "error", "held"
SUPPORTED_VERSIONS = ("2.1", "2.2", "2.3", "2.3.1", "2.4", "2.5", "2.5.1", "2.6", "2.7", "2.7.1", "2.8", "2.8.1", "2.8.2")


@dataclass(frozen=True)
class AcceptPolicy:
    """What the engine accepts at ingest. Everything else is answered AR/CR with the reason."""

    processing_ids: frozenset = frozenset({"P", "T", "D"})
    versions: tuple = SUPPORTED_VERSIONS
    message_types: frozenset | None = None  # None accepts any type; routes decide later
    default_charset: str = charsets.DEFAULT_CHARSET
    identity: Identity = Identity()


@dataclass
class Frame:
    """A frame as it came off the wire, with where it came from."""

    raw: bytes
    listener: str = ""
    peer: str = ""
    truncated: bool = False  # an oversized frame, cut at the limit
    policy: AcceptPolicy | None = None  # the listener's; the ingestor's own when None


@dataclass
class Assessment:
    """What ``assess`` found: the outcome, the error if any, and what could be read."""

    outcome: str  # ACCEPT, ERROR or REJECT (see engine.hl7.ack)
    decoded: charsets.Decoded
    header: Header | None = None
    message: Message | None = None
    error: AckError | None = None


@dataclass
class Outcome:
    """The result for one frame: its journal row, status and the ACK bytes to send (or None)."""

    message_id: int
    status: str
    ack_code: str
    ack: bytes | None
    control_id: str = ""
    message_code: str = ""
    entry: Entry = field(repr=False, default=None)
    differing_policy: str | None = None  # set when the message reused a control ID with different content


@dataclass
class Prepared:
    """A frame read and answered in memory, waiting to be journaled."""

    frame: Frame
    entry: Entry
    dedupe_key: tuple[str, str] | None
    header: Header | None = None  # to answer again if it turns out to reuse a control ID


def assess(raw: bytes, policy: AcceptPolicy = AcceptPolicy()) -> Assessment:
    """Read a frame and decide whether it is acceptable HL7 v2. Never raises for bad input."""
    decoded = charsets.decode(raw, policy.default_charset)
    try:
        message = parse(decoded.text)
    except ParseError as exc:
        code = 100 if str(exc.location or "").startswith("segment") else 102
        # With a readable MSH line the reject can still be addressed to the sender.
        header = _header_only(decoded.text)
        return Assessment(REJECT, decoded, header, None, AckError(code, str(exc), exc.location))
    header = read_header(message)
    error = _check_header(header, policy)
    if error is not None:
        return Assessment(REJECT, decoded, header, message, error)
    return Assessment(ACCEPT, decoded, header, message)


def _header_only(text: str) -> Header | None:
    first = text.split("\r", 1)[0].split("\n", 1)[0]
    try:
        return read_header(parse(first))
    except ParseError:
        return None


def _check_header(header: Header, policy: AcceptPolicy) -> AckError | None:
    if not header.message_type:
        return AckError(101, "MSH-9 message type is missing", "MSH-9")
    if not header.control_id.strip():
        return AckError(101, "MSH-10 message control ID is missing", "MSH-10")
    if not header.processing_id:
        return AckError(101, "MSH-11 processing ID is missing", "MSH-11")
    if not header.version:
        return AckError(101, "MSH-12 version ID is missing", "MSH-12")
    if header.version not in policy.versions:
        return AckError(203, f"HL7 version {header.version} is not supported", "MSH-12")
    if header.processing_id not in policy.processing_ids:
        return AckError(
            202, f"processing ID {header.processing_id} is not accepted by this listener", "MSH-11"
        )
    if policy.message_types is not None and header.message_type not in policy.message_types:
        return AckError(200, f"message type {header.message_type} is not accepted", "MSH-9")
    if header.message_type not in ("ACK",) and not header.trigger_event and version_tuple(header.version) >= (2, 3):
        return AckError(201, "MSH-9 has no trigger event", "MSH-9.2")
    if header.accept_ack_type and header.accept_ack_type not in ("AL", "NE", "ER", "SU"):
        return AckError(103, f"MSH-15 {header.accept_ack_type} is not in HL7 table 0155", "MSH-15")
    return None


def identifiers(message: Message) -> list[tuple[str, str, str]]:
    """The searchable identifiers of a message: (kind, value, assigning authority).

    Reads the fields named in ``engine.store.journal.ID_KINDS`` directly (this runs for every message;
    a test checks it against the generic path reader).
    """
    seps = message.seps
    comp, sub = seps.component, seps.subcomponent
    found = []

    def first(segment, number):
        reps = segment.repetitions(number) if segment is not None else []
        value = reps[0].split(comp, 1)[0] if reps else ""
        return unescape(value, seps).strip() if value else ""

    pid = message.segment("PID")
    if pid is not None:
        for cx in pid.repetitions(3):
            parts = cx.split(comp)
            value = unescape(parts[0], seps).strip()
            if value:
                authority = parts[3].split(sub, 1)[0] if len(parts) > 3 else ""
                found.append(("patient", value, unescape(authority, seps).strip()))
    for kind, segment, number in (
        ("account", pid, 18),
        ("visit", message.segment("PV1"), 19),
        ("placer_appointment", message.segment("SCH"), 1),
        ("filler_appointment", message.segment("SCH"), 2),
    ):
        value = first(segment, number)
        if value:
            found.append((kind, value, ""))
    for ft1 in message.all("FT1"):
        value = first(ft1, 2)
        if value:
            found.append(("transaction", value, ""))
    return found


def same_message(a: bytes, b: bytes) -> bool:
    """Whether two messages are the same but for MSH-7 (a resend is often stamped anew) and line ends."""
    if a == b:
        return True
    return _comparable(a) == _comparable(b)


def _comparable(raw: bytes) -> list[bytes]:
    lines = [line.rstrip() for line in raw.replace(b"\r\n", b"\r").replace(b"\n", b"\r").split(b"\r")]
    lines = [line for line in lines if line]
    if lines and lines[0].startswith(b"MSH") and len(lines[0]) > 3:
        fields = lines[0].split(lines[0][3:4])
        if len(fields) > 6:
            fields[6] = b""
        lines[0] = lines[0][3:4].join(fields)
    return lines


def utc_now() -> datetime:
    return datetime.now(timezone.utc)


def iso(moment: datetime) -> str:
    """Journal timestamps: ISO 8601 in UTC with microseconds, so text order is time order."""
    m = moment.astimezone(timezone.utc)
    return f"{m.year:04d}-{m.month:02d}-{m.day:02d}T{m.hour:02d}:{m.minute:02d}:{m.second:02d}.{m.microsecond:06d}Z"


def control_id_factory(prefix: str = "HB") -> Callable[[], str]:
    """Unique ACK control IDs across restarts: prefix, start time in base 36, a counter."""
    start = _base36(int(time.time() * 1000))
    counter = itertools.count(1)
    return lambda: f"{prefix}{start}{next(counter):06d}"


def _base36(number: int) -> str:
    digits = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"
    out = ""
    while number:
        number, rem = divmod(number, 36)
        out = digits[rem] + out
    return out or "0"


class Ingestor:
    """Journals frames and builds their ACKs. The clock and the ACK control IDs are injected."""

    def __init__(
        self,
        journal: Journal,
        policy: AcceptPolicy = AcceptPolicy(),
        clock: Callable[[], datetime] = utc_now,
        next_control_id: Callable[[], str] | None = None,
        project=None,
        unrouted: str = "accept",
    ):
        self.journal = journal
        self.policy = policy
        self.clock = clock
        self.next_control_id = next_control_id or control_id_factory()
        # Routes and mappings (engine.transform.project.Project); None journals without routing.
        # serve swaps in a new one on reload; each message uses the one in place when it arrives.
        self.project = project
        self.unrouted = unrouted

    def ingest(self, frames: list[Frame]) -> list[Outcome]:
        """Journal a batch of frames in one transaction and return each one's outcome and ACK."""
        return self.record([self.prepare(frame) for frame in frames])

    def prepare(self, frame: Frame) -> Prepared:
        """Everything that needs no database: read the frame, build its journal row and its ACK.

        The engine runs this in the reactor thread as each frame arrives, so that the journal
        writer thread spends its time in SQLite (which releases the GIL) and not in Python.
        """
        entry, dedupe_key, header = self._entry(frame)
        return Prepared(frame, entry, dedupe_key, header)

    def record(self, batch: list[Prepared]) -> list[Outcome]:
        """Journal prepared frames in one transaction, detecting duplicates; returns their outcomes.

        If the journal cannot be written, the exception propagates and no ACK is produced: the
        caller answers with an error ACK that tells the sender to resend.
        """
        outcomes = []
        seen_in_batch: dict[tuple[str, str], list[Outcome]] = {}
        # The ACKs go out right after this batch's commit: its time is kept for 'journal stats'.
        # (Set on insert: an UPDATE afterwards would rewrite each row, raw bytes and all. The real
        # clock: an injected one is for received_at and ACKs, which tests compare byte for byte.)
        acked_at = iso(utc_now())
        with self.journal.transaction():
            for prepared in batch:
                entry, dedupe_key = prepared.entry, prepared.dedupe_key
                entry.acked_at = acked_at
                policy = None
                if dedupe_key is not None:
                    earlier = [(o.message_id, o.entry.ack, o.ack_code, o.entry.raw) for o in seen_in_batch.get(dedupe_key, [])]
                    earlier = self.journal.accepted_with_key(*dedupe_key) + earlier
                    policy = self._resend(prepared, earlier) if earlier else None
                message_id = self.journal.insert(entry)
                if entry.conversion is not None and entry.conversion.status == "mapped" and self.project is not None:
                    route = self.project.routes.get(entry.route)
                    if route is not None:
                        create_deliveries(self.journal, message_id, self.project.destinations_of(route), self.clock())
                outcome = Outcome(
                    message_id,
                    entry.status,
                    entry.ack_code,
                    entry.ack if entry.ack_sent else None,
                    entry.control_id,
                    f"{entry.message_type}^{entry.trigger_event}".rstrip("^"),
                    entry,
                    differing_policy=policy if policy != DUPLICATE else None,
                )
                outcomes.append(outcome)
                if dedupe_key is not None and entry.status != DUPLICATE and entry.ack_code in ("AA", "CA"):
                    seen_in_batch.setdefault(dedupe_key, []).append(outcome)
        return outcomes

    def _resend(self, prepared: Prepared, earlier: list[tuple]) -> str:
        """A message whose (sending facility, control ID) was accepted before: an exact resend
        gets the very ACK the original got and is not processed again; one with different content
        is handled as its route says. Returns DUPLICATE or the policy applied."""
        entry = prepared.entry
        for original_id, ack, code, raw in earlier:
            if same_message(entry.raw, raw):
                entry.status = DUPLICATE
                entry.conversion = None  # a resend is not processed again
                entry.duplicate_of, entry.ack, entry.ack_code = original_id, ack, code
                if entry.raw != raw:
                    entry.warning = "resend differs from the original only in MSH-7 (time of message) or line ends"
                return DUPLICATE
        first = earlier[0][0]
        route = self.project.routes.get(entry.route) if self.project is not None and entry.route else None
        policy = route.differing_duplicates if route is not None else "process"
        entry.duplicate_of = first
        reused = (f"control ID {entry.control_id} from {entry.sending_facility or 'this sender'} was already used "
                  f"by message {first}, with different content")
        if policy == "process":
            entry.warning = f"{reused}; processed as a new message (route policy duplicates.differing: process)"
            return policy
        entry.conversion = None
        header, charset = prepared.header, entry.charset
        frame_policy = prepared.frame.policy or self.policy
        if policy == "reject":
            error = AckError(205, f"{reused}; send it with a new control ID", "MSH-10")
            code = ack_code(REJECT, header)
            entry.status = REJECTED
            entry.error, entry.error_code, entry.error_location = error.text, error.code, error.location
        else:  # hold: the sender is told we have it; an operator decides (replay --remap processes it)
            error = None
            code = ack_code(ACCEPT, header)
            entry.status = HELD
            entry.error = entry.error_code = entry.error_location = None
            entry.warning = f"{reused}; held for an operator (route policy duplicates.differing: hold)"
        text = build_ack(header, code, now=self.clock(), control_id=self.next_control_id(), error=error,
                         identity=frame_policy.identity)
        entry.ack, entry.ack_code = charsets.encode(text, charset), code
        entry.ack_sent = ack_wanted(code, header)
        return policy

    def _entry(self, frame: Frame) -> tuple[Entry, tuple[str, str] | None, Header | None]:
        now = self.clock()
        policy = frame.policy or self.policy
        if frame.truncated:
            assessment = Assessment(
                REJECT,
                charsets.decode(frame.raw, policy.default_charset),
                error=AckError(207, "frame exceeded the listener's size limit and was cut off"),
            )
        else:
            assessment = assess(frame.raw, policy)
        header, decoded = assessment.header, assessment.decoded
        outcome, error = assessment.outcome, assessment.error
        status = {ACCEPT: ACCEPTED, ERROR: FAILED, REJECT: REJECTED}[outcome]
        decision = None
        if outcome == ACCEPT and self.project is not None:
            decision = decide(self.project, assessment.message, header, self.unrouted, iso(now))
            outcome, error, status = decision.outcome, decision.error, decision.status
        code = ack_code(outcome, header)
        ack_text = build_ack(
            header, code, now=now, control_id=self.next_control_id(), error=error,
            identity=policy.identity,
        )
        entry = Entry(
            received_at=iso(now),
            raw=frame.raw,
            status=status,
            listener=frame.listener,
            peer=frame.peer,
            charset=decoded.charset,
            warning=decoded.warning,
            truncated=frame.truncated,
            ack_code=code,
            ack=charsets.encode(ack_text, decoded.charset),
            ack_sent=ack_wanted(code, header) and not frame.truncated,
        )
        if error is not None:
            entry.error, entry.error_code, entry.error_location = error.text, error.code, error.location
        if decision is not None:
            entry.route = decision.route.name if decision.route else None
            entry.conversion = decision.conversion
        dedupe_key = None
        if header is not None:
            entry.control_id = header.control_id.strip()
            entry.message_type = header.message_type
            entry.trigger_event = header.trigger_event
            entry.message_structure = header.message_structure
            entry.version = header.version
            entry.processing_id = header.processing_id
            entry.sending_application = header.sending_application
            entry.sending_facility = header.sending_facility
            entry.receiving_application = header.receiving_application
            entry.receiving_facility = header.receiving_facility
        if assessment.message is not None:
            entry.ids = identifiers(assessment.message)
            if code in ("AA", "CA"):
                dedupe_key = (entry.sending_facility, entry.control_id)
        return entry, dedupe_key, header
