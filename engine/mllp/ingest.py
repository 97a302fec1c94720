"""From received frame to journal row and ACK: plain Python, no sockets, no reactor.

``Ingestor.prepare`` reads one frame (``engine.hl7.assess``), routes it, and builds its journal row
and its ACK; for a route that ACKs after mapping, ``map_before_ack`` then runs the pipeline and
finishes the row and the ACK (the listener runs that in a thread pool, never on the reactor).
``Ingestor.record`` journals a batch of prepared frames in one transaction (group commit),
detecting duplicates (atomically across the nodes of a cluster: ``Journal.lock_keys``), and queues the deliveries of those mapped already
(those left to a converter get their expected deliveries instead, which hold their ordering keys).
Only after that commit does the caller get the ACKs to send, so an ACK never promises a message the
journal does not hold.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Callable

from ..delivery import outbox
from ..hl7 import charset as charsets
from ..hl7.ack import ACCEPT, ERROR, REJECT, AckError, ack_code, ack_wanted, build_ack
from ..hl7.assess import AcceptPolicy, Assessment, assess, join_warnings
from ..hl7.er7 import Message
from ..hl7.header import Header
from ..hl7.identifiers import identifiers
from ..stamps import control_id_factory, iso, utc_now
from ..store.base import (
    ACCEPTED,
    DUPLICATE,
    FAILED,
    HELD,
    MAPPING_ERROR,
    REJECTED,
    UNROUTED,
    Entry,
    Journal,
)
from ..transform import pipeline
from ..transform.routes import Route

ACKED_NOW = ("AA", "CA")


@dataclass
class Frame:
    """A frame as it came off the wire, with where it came from."""

    raw: bytes
    listener: str = ""
    peer: str = ""
    truncated: bool = False  # an oversized frame, cut at the limit
    policy: AcceptPolicy | None = None  # the listener's; the ingestor's own when None


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
    """A frame read and answered in memory, waiting to be journaled.

    When ``mapping_route`` is set the route ACKs after mapping and ``map_before_ack`` has not run
    yet: ``entry`` is None until it has.
    """

    frame: Frame
    entry: Entry | None
    dedupe_key: tuple[str, str] | None
    header: Header | None = None  # to answer again if it turns out to reuse a control ID
    converted: pipeline.Converted | None = None  # mapped before the ACK
    mapping_route: Route | None = None
    # What map_before_ack needs to finish the frame:
    received: datetime | None = None
    assessment: Assessment | None = None
    project: object = None


def same_message(a: bytes, b: bytes) -> bool:
    """Whether two messages are the same but for MSH-7 (a resend is often stamped anew) and line ends."""
    if a == b:
        return True
    return _comparable(a) == _comparable(b)


def _comparable(raw: bytes) -> list[bytes]:
    raw = raw[3:] if raw.startswith(b"\xef\xbb\xbf") else raw
    raw = raw.lstrip(b"\x0b\x1c\x00\t\r\n ").rstrip(b"\x0b\x1c\x00")  # what the reader removes too
    lines = [line.rstrip() for line in raw.replace(b"\r\n", b"\r").replace(b"\n", b"\r").split(b"\r")]
    lines = [line for line in lines if line]
    if lines and lines[0].startswith(b"MSH") and len(lines[0]) > 3:
        fields = lines[0].split(lines[0][3:4])
        if len(fields) > 6:
            fields[6] = b""
        lines[0] = lines[0][3:4].join(fields)
    return lines


def map_here(project, assessment: Assessment, route: Route) -> pipeline.Converted:
    """Map a frame in the calling thread (tests, tools; serve maps in worker processes)."""
    return pipeline.convert(project, assessment.message, header=assessment.header, route=route)


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
        mapper=None,
    ):
        self.journal = journal
        self.policy = policy
        self.clock = clock
        self.next_control_id = next_control_id or control_id_factory()
        # Routes and mappings (engine.transform.project.Project); None journals without routing.
        # serve swaps in a new one on reload; each message uses the one in place when it arrives.
        self.project = project
        self.unrouted = unrouted
        # What maps a frame before its ACK: (project, assessment, route) -> pipeline.Converted.
        # serve gives one that maps in worker processes; by default it is mapped right here.
        self.mapper = mapper or map_here

    def ingest(self, frames: list[Frame]) -> list[Outcome]:
        """Journal a batch of frames in one transaction and return each one's outcome and ACK."""
        prepared = []
        for frame in frames:
            item = self.prepare(frame)
            prepared.append(self.map_before_ack(item) if item.mapping_route is not None else item)
        return self.record(prepared)

    def prepare(self, frame: Frame) -> Prepared:
        """What needs no database and no mapping: read the frame, route it, build its row and ACK.

        The engine runs this in the reactor thread as each frame arrives (it takes tens of
        microseconds), so that the journal writer thread spends its time in SQLite and not in
        Python. A route that ACKs after mapping leaves the row and the ACK to ``map_before_ack``.
        """
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
        outcome, error = assessment.outcome, assessment.error
        status = {ACCEPT: ACCEPTED, ERROR: FAILED, REJECT: REJECTED}[outcome]
        project = self.project
        route = None
        if outcome == ACCEPT and project is not None:
            route = project.route_for(assessment.message, assessment.header)
            if route is None:
                status = UNROUTED
                if self.unrouted == "reject":
                    header = assessment.header
                    text = f"no route takes {header.message_code} from {header.sending_facility or 'this sender'}"
                    outcome, error, status = REJECT, AckError(200, text, "MSH-9"), REJECTED
            elif route.ack_after == "mapping":
                return Prepared(frame, None, None, assessment.header, mapping_route=route, received=now,
                                assessment=assessment, project=project)
        prepared = self._finish(frame, now, assessment, outcome, error, status, route)
        if status == ACCEPTED and route is not None:  # for a converter: its keys hold later deliveries back
            prepared.entry.expected = outbox.expected(project.destinations_of(route), prepared.entry.ids)
        return prepared

    def map_before_ack(self, prepared: Prepared) -> Prepared:
        """Map a frame whose route ACKs after mapping, and finish its row and ACK (blocking: the
        listener runs it in a thread pool). A message that cannot be mapped gets AE, AR or AA as
        the route says, with the first problem (the sender learns what failed, not where our
        mapping files live)."""
        route, assessment = prepared.mapping_route, prepared.assessment
        converted = self.mapper(prepared.project, assessment, route)
        outcome, error, status = ACCEPT, None, converted.status
        if converted.status == MAPPING_ERROR:
            first = converted.problems[0].split(" (from ")[0]
            outcome = {"AE": ERROR, "AR": REJECT, "AA": ACCEPT}[route.mapping_error]
            error = AckError(207, f"cannot be mapped: {first}") if outcome != ACCEPT else None
        done = self._finish(prepared.frame, prepared.received, assessment, outcome, error, status, route)
        done.converted = converted
        return done

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
            # Another node may be journaling a message with one of these keys right now: hold them
            # (sorted, so two batches never wait for each other) until this commit.
            keys = sorted({p.dedupe_key for p in batch if p.dedupe_key is not None})
            self.journal.lock_keys(keys)
            journaled = self.journal.accepted_with_keys(keys) if keys else {}  # one query for the batch
            for prepared in batch:
                entry, dedupe_key = prepared.entry, prepared.dedupe_key
                entry.acked_at = acked_at
                policy = None
                if dedupe_key is not None:
                    earlier = [(o.message_id, o.entry.ack, o.ack_code, o.entry.raw) for o in seen_in_batch.get(dedupe_key, [])]
                    earlier = journaled.get(dedupe_key, []) + earlier
                    policy = self._resend(prepared, earlier) if earlier else None
                    if entry.status != ACCEPTED:
                        entry.expected = []  # a resend, rejected or held: not converted, holds nothing
                message_id = self.journal.insert(entry)
                if prepared.converted is not None:
                    pipeline.record(self.journal, message_id, prepared.converted, entry.received_at, self.clock())
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
                if dedupe_key is not None and entry.status != DUPLICATE and entry.ack_code in ACKED_NOW:
                    seen_in_batch.setdefault(dedupe_key, []).append(outcome)
        return outcomes

    def failure_outcome(self, prepared: Prepared) -> Outcome:
        """The outcome for a frame the journal could not store: an error ACK (AE/CE, table 0357
        code 207) so its sender resends it; nothing is claimed to be stored."""
        frame = prepared.frame
        policy = frame.policy or self.policy
        assessment = assess(frame.raw, policy)
        header = assessment.header
        code = ack_code(ERROR, header)
        text = build_ack(
            header, code, now=self.clock(), control_id=self.next_control_id(),
            error=AckError(207, "message could not be stored; send it again"),
            identity=policy.identity,
        )
        ack = charsets.encode(text, assessment.decoded.charset) if ack_wanted(code, header) else None
        control_id = header.control_id.strip() if header else ""
        return Outcome(0, "error", code, ack, control_id, header.message_code if header else "")

    def _resend(self, prepared: Prepared, earlier: list[tuple]) -> str:
        """A message whose (sending facility, control ID) was accepted before: an exact resend
        gets the very ACK the original got and is not processed again; one with different content
        is handled as its route says. Returns DUPLICATE or the policy applied."""
        entry = prepared.entry
        for original_id, ack, code, raw in earlier:
            if same_message(entry.raw, raw):
                entry.status = DUPLICATE
                prepared.converted = None  # a resend is not processed again
                entry.duplicate_of, entry.ack, entry.ack_code = original_id, ack, code
                if entry.raw != raw:
                    entry.warning = join_warnings([entry.warning, "resend differs from the original only in MSH-7 "
                                                   "(time of message) or line ends"])
                return DUPLICATE
        first = earlier[0][0]
        route = self.project.routes.get(entry.route) if self.project is not None and entry.route else None
        policy = route.differing_duplicates if route is not None else "process"
        entry.duplicate_of = first
        reused = (f"control ID {entry.control_id} from {entry.sending_facility or 'this sender'} was already used "
                  f"by message {first}, with different content")
        if policy == "process":
            entry.warning = join_warnings([entry.warning, f"{reused}; processed as a new message "
                                                          "(route policy duplicates.differing: process)"])
            return policy
        prepared.converted = None
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
            entry.warning = join_warnings([entry.warning, f"{reused}; held for an operator "
                                                          "(route policy duplicates.differing: hold)"])
        text = build_ack(header, code, now=self.clock(), control_id=self.next_control_id(), error=error,
                         identity=frame_policy.identity)
        entry.ack, entry.ack_code = charsets.encode(text, charset), code
        entry.ack_sent = ack_wanted(code, header)
        return policy

    def _finish(self, frame: Frame, now: datetime, assessment: Assessment, outcome: str, error: AckError | None,
                status: str, route: Route | None) -> Prepared:
        """The journal row and the ACK of a frame whose outcome is decided."""
        policy = frame.policy or self.policy
        header, decoded = assessment.header, assessment.decoded
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
            warning=assessment.warning,
            truncated=frame.truncated,
            ack_code=code,
            ack=charsets.encode(ack_text, decoded.charset),
            ack_sent=ack_wanted(code, header) and not frame.truncated,
        )
        if error is not None:
            entry.error, entry.error_code, entry.error_location = error.text, error.code, error.location
        if route is not None:
            entry.route = route.name
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
        message: Message | None = assessment.message
        if message is not None:
            entry.ids = identifiers(message)
            if code in ACKED_NOW:
                dedupe_key = (entry.sending_facility, entry.control_id)
        return Prepared(frame, entry, dedupe_key, header)
