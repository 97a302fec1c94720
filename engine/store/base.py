"""The storage interface: everything that reads or writes the journal goes through ``Journal``.

The journal holds every frame received (verbatim, with the fields operators search by), its
identifiers, its FHIR conversion, its outbox deliveries with their attempts, and the replays an
operator asked for. One message's whole story hangs off its message ID.

``Journal`` is an abstract class, documented method by method; ``engine.store.sqlite`` implements
it on SQLite (the embedded default), and another backend is another module implementing the same
methods. The records that cross the interface (``Entry``, ``ConversionRecord``, ``Delivery``,
``Attempt``, ``SearchQuery``) are plain dataclasses, and times cross it as aware datetimes (the
ones read back as text are ISO 8601 in UTC, ``engine.stamps.iso``, so text order is time order).

The interface stores and finds; it decides nothing. Decisions are plain functions its callers
make and hand in: the next state of a delivery and when to try it again
(``engine.delivery.outbox``), the key deliveries are ordered by, which messages a retention
policy may delete (``engine.store.retention``).

Threads: a ``Journal`` object is used by one thread at a time (the engine runs all its writes in
one writer thread, and its reads in a pool of threads with a read-only journal each).

Several workers, several nodes: any number of engines (nodes) and converter workers may share
one journal (a cluster on PostgreSQL; on SQLite, the engine and its converter process). Work is
never taken by reading it and then writing it: it is *claimed* with a lease, in one atomic
statement, by a worker (a name unique in the cluster: ``NODE`` for a node's dispatcher,
``NODE/converter-1`` for a converter), and the claim is released when the work is recorded.
A worker that dies leaves its claims to the others once their lease expires; the same worker
starting again takes its own back at once. The claim API:

- conversion: ``claim_conversions`` -> map -> ``finish_conversions`` + ``record_conversion`` in
  one transaction (``renew_conversions`` when mapping a batch may outlast the lease);
- delivery: ``claim_deliveries`` (per-key order and ``cluster_limit`` held across nodes) ->
  send -> ``finish_attempt`` (``renew_deliveries`` while a send is slow); ``recover_in_flight``
  returns expired (and the worker's own earlier) claims to the queue;
- scheduled jobs: ``take_job`` / ``renew_job`` / ``finish_job``, a lease row per job in ``jobs``,
  so a job runs on one node at a time and once per period across the cluster;
- duplicate detection: ``lock_keys`` holds (sending facility, control ID) keys until the commit,
  so two nodes never both take a resent message for the original.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

SCHEMA_VERSION = 8
SYNCHRONOUS_MODES = ("full", "normal", "extra")

# Message statuses (set at ingest, by routing and by mapping).
ACCEPTED, MAPPED, MAPPING_ERROR, UNROUTED = "accepted", "mapped", "mapping_error", "unrouted"
REJECTED, DUPLICATE, FAILED, HELD = "rejected", "duplicate", "error", "held"
STATUSES = (ACCEPTED, MAPPED, MAPPING_ERROR, UNROUTED, REJECTED, DUPLICATE, HELD, FAILED)

# Delivery states (what the outbox keeps; engine.delivery.outbox decides the moves between them).
PENDING, IN_FLIGHT, DELIVERED, RETRYING, DEAD = "pending", "in_flight", "delivered", "retrying", "dead"
DELIVERY_STATES = (PENDING, IN_FLIGHT, RETRYING, DELIVERED, DEAD)
RESPONSE_KEPT = 2000  # characters of a response body kept with an attempt (the journal, not the log)


@dataclass
class ConversionRecord:
    """The FHIR conversion of a message: 'mapped' with a Bundle, or 'mapping_error' with problems.

    ``problems`` also carries the conversion's warnings (what mapping assumed to read the message),
    each prefixed ``warning: `` after the problems (``encode_notes``): a mapped message may have
    warnings and no problems."""

    route: str
    status: str
    converted_at: str
    bundle: str | None = None  # JSON text
    problems: str | None = None  # JSON list of text: the problems, then the warnings (encode_notes)


WARNING_PREFIX = "warning: "


def encode_notes(problems: list, warnings: list) -> str | None:
    """The ``problems`` text of a ConversionRecord: one JSON list, the problems first, then each
    warning prefixed ``warning: ``; None when there is neither."""
    notes = list(problems) + [WARNING_PREFIX + w for w in warnings]
    return json.dumps(notes) if notes else None


def decode_notes(text: str | None) -> tuple[list, list]:
    """(problems, warnings) from the ``problems`` text of a ConversionRecord."""
    notes = json.loads(text) if text else []
    problems = [n for n in notes if not n.startswith(WARNING_PREFIX)]
    warnings = [n[len(WARNING_PREFIX):] for n in notes if n.startswith(WARNING_PREFIX)]
    return problems, warnings


@dataclass
class Entry:
    """One received frame, ready to be journaled."""

    received_at: str
    raw: bytes
    status: str
    listener: str = ""
    peer: str = ""
    control_id: str = ""
    message_type: str = ""
    trigger_event: str = ""
    message_structure: str = ""
    version: str = ""
    processing_id: str = ""
    sending_application: str = ""
    sending_facility: str = ""
    receiving_application: str = ""
    receiving_facility: str = ""
    charset: str = ""
    error: str | None = None
    error_code: int | None = None
    error_location: str | None = None
    warning: str | None = None
    duplicate_of: int | None = None
    truncated: bool = False
    ack_code: str | None = None
    ack: bytes | None = None
    ack_sent: bool = False
    ids: list[tuple[str, str, str]] = field(default_factory=list)  # (kind, value, authority)
    route: str | None = None
    conversion: ConversionRecord | None = None  # when the route maps before the ACK
    acked_at: str | None = None
    # When it waits for a converter: (destination, ordering key) of the deliveries its conversion
    # will queue (engine.delivery.outbox.expected). Until its conversion is recorded they hold back
    # later messages' deliveries with those keys, however those were mapped.
    expected: list[tuple[str, str]] = field(default_factory=list)

    @property
    def patient_id(self) -> str | None:
        return next((value for kind, value, _ in self.ids if kind == "patient"), None)

    def first_id(self, kind: str) -> str | None:
        return next((value for k, value, _ in self.ids if k == kind), None)


@dataclass
class Delivery:
    """One delivery due to be sent: the outbox row with what sending it needs."""

    id: int
    message_id: int
    destination: str
    key: str
    state: str
    attempts: int
    created_at: str
    control_id: str = ""
    bundle: str | None = None
    # The message reused an earlier message's control ID with different content: its finance
    # event IDs carry this (its message ID) so the ERP does not take them for the earlier ones.
    discriminator: str = ""
    resumed: bool = False  # it was in flight when its worker stopped: its send may have happened
    claimed_by: str = ""  # the worker holding it in flight (claim_deliveries)


@dataclass
class Waiting:
    """A message claimed for conversion (``Journal.claim_conversions``)."""

    id: int
    raw: bytes
    charset: str
    route: str

    def __iter__(self):  # (id, raw, charset, route), like the rows of waiting_for_conversion
        return iter((self.id, self.raw, self.charset, self.route))


@dataclass
class Attempt:
    """One try at a delivery, as the journal keeps it (the response is cut to RESPONSE_KEPT)."""

    started: datetime
    finished: datetime
    outcome: str  # ok, transient or permanent
    status: int | None = None  # HTTP status, when there was one
    response: str = ""


@dataclass
class NextState:
    """Where a delivery goes after an attempt (decided by engine.delivery.outbox.next_state)."""

    state: str
    attempts: int
    next_attempt_at: datetime
    last_error: str | None


SUMMARY_COLUMNS = (
    "id", "received_at", "listener", "peer", "route", "control_id", "message_type", "trigger_event",
    "sending_application", "sending_facility", "patient_id", "placer_appointment_id",
    "filler_appointment_id", "transaction_id", "status", "ack_code", "error", "size",
)


@dataclass
class SearchQuery:
    """Filters for ``Journal.search``; every one given must hold. Keyed filters use indexes."""

    patient: str | None = None  # the ID (PID-3.1 of any repetition)
    patient_authority: str | None = None  # with ``patient``: only that assigning authority's (PID-3.4)
    control_id: str | None = None
    appointment: str | None = None
    transaction: str | None = None
    message_type: str | None = None  # "SIU" or "SIU^S12"
    sending_facility: str | None = None
    route: str | None = None
    status: str | None = None
    delivery: str | None = None  # "DESTINATION:STATE", or just a state (any destination)
    duplicate: str | None = None  # "exact" (resends), "differing" (control ID reused, content differs), "any"
    oldest_first: bool = False
    since: str | None = None  # ISO timestamp, inclusive
    until: str | None = None  # ISO timestamp, exclusive
    text: str | None = None  # free text anywhere in the message
    limit: int = 50
    # Paging: only rows after this (received_at, id) in the sort order (the last row of the page before).
    after: tuple[str, int] | None = None


@dataclass
class Candidates:
    """What may be an exception in a window (``Journal.reconcile_candidates``); rows are dicts."""

    missed: list  # active appointments started before the cutoff with no linked charge line
    late: list  # linked charge lines made long after their appointment (``lag_s``)
    unlinked: list  # charge lines that link to no appointment
    unposted: list  # charge lines with no ERP delivery delivered by the time asked (with ``deliveries``)
    # Every line made in the window, for the KPIs: (facility, kind, lag_s, made_at, when its first
    # message was first delivered to an ERP destination, or None).
    lines: list = field(default_factory=list)


@dataclass
class PruneResult:
    messages: int
    bytes_before: int
    bytes_after: int
    dry_run: bool

    @property
    def freed(self) -> int:
        return self.bytes_before - self.bytes_after


class Journal(ABC):
    """The journal: one writer (the engine, or a CLI command) and any number of readers.

    Methods that say "inside the caller's transaction" must run within ``transaction()``; the
    others run their own short transaction (or none, for reads).
    """

    path: Path  # where the journal is (for SQLite, its file; the engine's PID file goes beside it)
    location: str  # what ``open_journal`` opens again: the file's path, or the database's URL
    name: str  # how messages name it (a URL without its password)
    # Whether free text is indexed apart, by the text indexer process (SQLite), or with each
    # message in its own transaction (PostgreSQL).
    indexes_text_apart: bool = False

    @abstractmethod
    def close(self):
        """Release the connection(s)."""

    # -- writing: ingest ----------------------------------------------------------------------------

    @abstractmethod
    def transaction(self) -> AbstractContextManager:
        """One write transaction: committed (and on disk, as durable as the journal was opened)
        when the block exits, rolled back if it raises."""

    @abstractmethod
    def checkpoint(self):
        """Housekeeping the writer runs between transactions, never inside one an ACK waits for
        (SQLite: copy the WAL back into the database)."""

    @abstractmethod
    def background_checkpointer(self):
        """An object with ``run_once()`` and ``close()`` that does the bulk of ``checkpoint``'s
        work from another thread without blocking the writer; None when the backend needs none."""

    @abstractmethod
    def lock_keys(self, keys: list[tuple[str, str]]):
        """Inside the caller's transaction, before ``accepted_with_key``: hold these (sending
        facility, control ID) keys until the transaction ends, so another node's transaction with
        one of them waits, then sees this one's rows. Duplicate detection reads, then inserts;
        this makes the two atomic across nodes (PostgreSQL: transaction-level advisory locks,
        taken in sorted order so two batches never deadlock; SQLite: its one write lock already
        does it)."""

    @abstractmethod
    def accepted_with_key(self, sending_facility: str, control_id: str) -> list[tuple]:
        """Every accepted message with this (sending facility, control ID), oldest first:
        [(id, ack, ack_code, raw)]. Exact resends are left out: they are never the original."""

    @abstractmethod
    def accepted_with_keys(self, keys: list[tuple[str, str]]) -> dict[tuple[str, str], list[tuple]]:
        """``accepted_with_key`` for many keys in one query: {(facility, control ID): rows}, only
        the keys that have some (a batch's duplicate check in one round trip)."""

    @abstractmethod
    def insert(self, entry: Entry) -> int:
        """Store one entry, its identifiers, its conversion (if it has one) and its expected
        deliveries (``Entry.expected``), inside the caller's transaction; returns its message ID."""

    # -- writing: conversion --------------------------------------------------------------------------

    @abstractmethod
    def waiting_for_conversion(self, limit: int = 100) -> list[tuple[int, bytes, str, str]]:
        """Routed messages ACKed before mapping and not converted yet, oldest first:
        [(id, raw, charset, route)]. A read: workers take work with ``claim_conversions``."""

    @abstractmethod
    def waiting_ids(self, limit: int) -> list[int]:
        """The IDs of the oldest ``limit`` messages waiting for conversion, oldest first: what a
        converter polls (is there work? is its batch in turn?) without reading the messages."""

    @abstractmethod
    def claim_conversions(self, worker: str, limit: int, lease: float, now: datetime) -> list[Waiting]:
        """Claim up to ``limit`` messages waiting for conversion, oldest first, for ``lease``
        seconds, in one transaction of its own: those nobody holds, those whose claim expired,
        and those ``worker`` itself held (a restarted worker takes its own back at once). Two
        workers never get the same message while its claim lasts."""

    @abstractmethod
    def renew_conversions(self, worker: str, ids: list[int], lease: float, now: datetime) -> list[int]:
        """Extend ``worker``'s claims on these messages by ``lease`` seconds from ``now``; returns
        the IDs it still held (the others were taken over after their lease expired)."""

    @abstractmethod
    def finish_conversions(self, worker: str, ids: list[int]) -> list[int]:
        """Inside the caller's transaction (the one that records the conversions): release
        ``worker``'s claims on these messages; returns the IDs it still held, the ones whose
        conversions it should record. (Recording one taken over meanwhile would do no harm, as
        ``create_deliveries`` ignores a destination a message already has, but it is work lost.)"""

    @abstractmethod
    def message_source(self, message_id: int) -> tuple[bytes, str, str | None] | None:
        """(raw, charset, route) of a message, or None when there is no such message."""

    @abstractmethod
    def record_conversion(self, message_id: int, record: ConversionRecord, update_status: bool = False,
                          route: str | None = None):
        """Store a message's conversion, replacing an earlier one, inside the caller's transaction;
        with ``update_status`` the message takes the conversion's status, with ``route`` that route,
        and its expected deliveries are gone (it no longer holds anything back: its deliveries, if
        it has any now, do)."""

    @abstractmethod
    def waiting_without_expected(self, after_id: int, limit: int) -> list[tuple[int, str]]:
        """(id, route) of messages waiting for conversion with no expected deliveries, after
        ``after_id``, oldest first: those journaled before schema 8, which kept none (and those
        whose route's destinations order nothing). A read."""

    @abstractmethod
    def expect_deliveries(self, message_id: int, expected: list[tuple[str, str]]) -> int:
        """Add (destination, key) expected deliveries to a message while it still waits for
        conversion, in one transaction; returns how many were added (none once it is converted)."""

    # -- the outbox ----------------------------------------------------------------------------------

    @abstractmethod
    def message_identifiers(self, message_id: int) -> list[dict]:
        """A message's identifiers as stored: [{kind, value, authority}] (what ordering keys come from)."""

    @abstractmethod
    def delivery_destinations(self, message_id: int) -> set[str]:
        """The destinations a message already has a delivery for."""

    @abstractmethod
    def create_deliveries(self, message_id: int, deliveries: list[tuple[str, str]], now: datetime):
        """Queue one pending delivery per (destination, ordering key), inside the caller's
        transaction. A destination the message already has a delivery for is left alone (the
        database holds one delivery per message and destination: ``INSERT ... ON CONFLICT DO
        NOTHING``), so two workers that both convert a message never queue it twice."""

    @abstractmethod
    def due_deliveries(self, destination: str, now: datetime, limit: int) -> list[Delivery]:
        """Pending or retrying deliveries of ``destination`` whose time has come and that nothing
        earlier with the same key holds back, in order, with their Bundles: no undelivered delivery
        of an earlier message, and no expected delivery of an earlier message still waiting for
        conversion (``Entry.expected``). A read: the dispatcher takes work with ``claim_deliveries``."""

    @abstractmethod
    def claim_deliveries(self, destination: str, worker: str, now: datetime, limit: int, lease: float,
                         cluster_limit: int | None = None) -> list[Delivery]:
        """Claim up to ``limit`` due deliveries of ``destination`` (as ``due_deliveries`` picks
        them) for ``worker``: in flight, with a lease of ``lease`` seconds, committed before
        anything is sent. Per-key order holds across workers: an in-flight delivery holds back
        later ones with its key, wherever it is being sent. With ``cluster_limit``, no more than
        that many deliveries of this destination are in flight across every worker together
        (counted and claimed under one lock per destination)."""

    @abstractmethod
    def renew_deliveries(self, worker: str, ids: list[int], lease: float, now: datetime) -> list[int]:
        """Extend ``worker``'s leases on these in-flight deliveries; returns those it still holds."""

    @abstractmethod
    def finish_attempt(self, delivery: Delivery, attempt: Attempt, next_state: NextState) -> bool:
        """Record an attempt and move its delivery to ``next_state``, in one transaction. When the
        delivery was claimed (``delivery.claimed_by``) and that claim was lost meanwhile (the lease
        expired and another worker took it), the attempt is recorded but the state is left to the
        new holder; returns False then, True otherwise."""

    @abstractmethod
    def recover_in_flight(self, now: datetime, worker: str | None = None) -> list[int]:
        """In-flight deliveries whose lease expired, and (with ``worker``) those ``worker`` held
        before it restarted, become retrying, due now, flagged ``resumed`` (their send may have
        happened); returns their IDs. Another worker's live claims are never touched."""

    # -- scheduled jobs -------------------------------------------------------------------------------

    @abstractmethod
    def take_job(self, name: str, worker: str, every: float, lease: float, now: datetime) -> bool:
        """Take job ``name`` for ``worker`` when it is due (its last run started ``every`` seconds
        ago or more, or it never ran) and nobody holds it (or their lease expired): one atomic
        upsert of its row in ``jobs``. True when ``worker`` now holds it for ``lease`` seconds."""

    @abstractmethod
    def renew_job(self, name: str, worker: str, lease: float, now: datetime) -> bool:
        """Extend ``worker``'s lease on a job it runs; False when it no longer holds it."""

    @abstractmethod
    def finish_job(self, name: str, worker: str, now: datetime, outcome: str):
        """Release a job ``worker`` ran, with its outcome (a short text: "ok", or the error)."""

    @abstractmethod
    def jobs(self) -> list[dict]:
        """Every scheduled job's row: name, worker, lease_expires_at, last_started_at,
        last_finished_at, last_outcome."""

    @abstractmethod
    def outbox_counts(self, open_only: bool = False) -> list[tuple[str, str, int, str | None]]:
        """(destination, state, count, oldest created_at) per destination and state (with
        ``open_only``, not the delivered ones), sorted by destination and state."""

    @abstractmethod
    def outbox_holds(self) -> list[tuple[str, int, str | None, int]]:
        """(destination, messages waiting for conversion with an expected delivery there, the
        oldest one's received_at, pending or retrying deliveries they hold back) per destination
        that has any, sorted by destination."""

    @abstractmethod
    def list_deliveries(self, destination: str | None = None, state: str | None = None,
                        limit: int = 50) -> list[dict]:
        """Deliveries, newest first: id, message_id, control_id, destination, key, state, attempts,
        created_at, next_attempt_at, last_error; and for a pending or retrying one what holds it
        back, if anything: ``waits_for_message`` (the oldest earlier message with its key still
        waiting for conversion), ``waits_for_delivery`` and ``waits_for_state`` (the oldest earlier
        undelivered delivery with its key), else None."""

    @abstractmethod
    def replay(self, message_ids: list[int], destinations: list[str] | None, who: str, why: str,
               now: datetime, only_dead: bool = False, remapped: bool = False) -> int:
        """Start the messages' deliveries (to all or the named destinations; with ``only_dead``,
        the dead ones) over as pending, and record each replay (who, when, why), in one
        transaction. Deliveries in flight are left alone. Returns how many were reset."""

    @abstractmethod
    def held_among(self, message_ids: list[int]) -> list[int]:
        """Which of these messages are held for an operator (never mapped)."""

    @abstractmethod
    def messages_with_dead_deliveries(self, destination: str) -> list[int]:
        """IDs of the messages with a dead delivery to ``destination``, ascending."""

    @abstractmethod
    def messages_with_control_id(self, control_id: str) -> list[int]:
        """IDs of every message with this control ID (MSH-10), from any sender."""

    # -- reading --------------------------------------------------------------------------------------

    @abstractmethod
    def check_readable(self):
        """Raise an exception (with the backend's words) when the journal cannot be read."""

    @abstractmethod
    def get(self, message_id: int) -> dict | None:
        """One message as a dict of its columns (raw and ack as bytes), with ``ids``
        ([{kind, value, authority}] in the order of ID_KINDS), or None."""

    @abstractmethod
    def conversion(self, message_id: int) -> dict | None:
        """A message's conversion: route, status, converted_at, bundle (JSON text), problems."""

    @abstractmethod
    def history(self, message_id: int) -> dict:
        """What happened after ingest: {"deliveries": [... with "tries": [attempts]], "replays": [...]}; each
        delivery with what holds it back as ``list_deliveries`` says it (``waits_for_message``, ...)."""

    @abstractmethod
    def deliveries_of(self, message_id: int) -> list[dict]:
        """A message's deliveries in brief: id, destination, state, attempts, last_error."""

    @abstractmethod
    def count(self, status: str | None = None) -> int:
        """How many messages (with this status)."""

    @abstractmethod
    def search(self, query: SearchQuery) -> list[dict]:
        """Messages matching every filter of ``query`` (SUMMARY_COLUMNS, and ``patient_authority``:
        the assigning authority of ``patient_id``; no raw bytes), newest first (or oldest, and
        after ``query.after`` for the next page). Free text finds what was just received: the text
        index is brought up to date first."""

    @abstractmethod
    def stats(self, since: str, until: str | None = None) -> dict:
        """Counts per route, type and status, and latency percentiles (receipt to ACK, to
        conversion, to delivery per destination), for messages received in [since, until)."""

    @abstractmethod
    def traffic(self, since: str) -> dict:
        """Per hour since ``since``: {"flow": [{hour, route, messages}], "delivered": [{hour,
        destination, deliveries}]} (hours as 'YYYY-MM-DDTHH')."""

    @abstractmethod
    def timeline(self, since: str) -> dict:
        """Per hour since ``since`` (hours as 'YYYY-MM-DDTHH'), for the dashboard's charts:
        {"messages": [{hour, messages, ack_mean_s, ack_max_s}], "deliveries": [{hour, destination,
        delivered, mean_s, max_s}] (receipt to delivery), "queued": [{hour, destination, queued}],
        "open": [{destination, open}] (undelivered now)}."""

    @abstractmethod
    def exceptions(self, limit: int = 50) -> dict:
        """What needs an operator, newest first: {"messages": rejected, error, mapping_error and
        held messages (with the problems of their conversion), "differing": messages that reused
        a control ID with different content}."""

    # -- retention ------------------------------------------------------------------------------------

    @abstractmethod
    def count_prunable(self, cutoff: datetime, keep_errors: bool) -> int:
        """How many messages the retention rules (engine.store.retention) allow to delete."""

    @abstractmethod
    def prune_step(self, cutoff: datetime, keep_errors: bool, after_id: int, batch: int = 500) -> tuple[int, int]:
        """Delete one batch of prunable messages with an ID above ``after_id``, everything that
        hangs off them included (free-text entries too), in a short transaction; returns (how
        many, the last ID seen) so the caller can go on after it."""

    @abstractmethod
    def reclaim(self):
        """Give the space of deleted rows back to the file system."""

    @abstractmethod
    def prune(self, cutoff: datetime, keep_errors: bool = False, dry_run: bool = False, progress=None,
              batch: int = 500) -> PruneResult:
        """Everything the rules allow, batch by batch (``progress(n)`` after each), then reclaim."""

    # -- the scheduling-to-cash record (engine.reconcile decides; these store and find) -----------------

    @abstractmethod
    def record_appointment_event(self, message_id: int, event: dict):
        """Keep one message's word on one appointment (the AppointmentFact fields as a dict),
        replacing what the same message said before (a replay), inside the caller's transaction."""

    @abstractmethod
    def appointment_events(self, facility: str, appointment_id: str) -> list[dict]:
        """Every event of an appointment (the AppointmentFact fields and message_id), as received."""

    @abstractmethod
    def put_appointment(self, facility: str, appointment_id: str, state: dict):
        """Store an appointment's current state (``engine.reconcile.rules.current_state``), inside
        the caller's transaction."""

    @abstractmethod
    def record_charge_line(self, message_id: int, received_at: str, line: dict):
        """Keep one charge line (the ChargeFact fields as a dict, with ``charge_key`` and its link:
        ``appointment_id``, ``link_rule``, ``appointment_start``, ``lag_s``) and that this message
        carried it; the first message to carry a key gives its values, link included (a resend only
        adds its message). Inside the caller's transaction."""

    @abstractmethod
    def link_candidates(self, facility: str, visit_id: str, patient_id: str) -> list[dict]:
        """The facility's appointments with this visit number or this patient (current state)."""

    @abstractmethod
    def charges_to_relink(self, facility: str, appointment_id: str, visit_id: str, patient_id: str,
                          linked: bool = True) -> list[dict]:
        """The facility's charge lines linked to none and sharing the appointment's visit number or
        patient, and (with ``linked``) those linked to it."""

    @abstractmethod
    def set_charge_link(self, facility: str, charge_key: str, appointment_id: str | None, rule: str | None,
                        appointment_start: str | None, lag_s: float | None):
        """Link a charge line to an appointment (or to none), with the rule that did it and the
        lag from the service to the charge, inside the caller's transaction."""

    @abstractmethod
    def refresh_charged(self, facility: str, appointment_id: str, linked: bool = False):
        """Note on the appointment whether a charge or credit line is linked to it now (what the
        missed-charge query reads), inside the caller's transaction; ``linked``: the caller just
        linked one (no need to look)."""

    @abstractmethod
    def clear_reconcile(self):
        """Forget the whole record (not the acknowledgements), inside the caller's transaction: a
        rebuild follows."""

    @abstractmethod
    def reconcile_sources(self, after_id: int, limit: int) -> list[tuple]:
        """Messages a rebuild reads, by ascending ID after ``after_id``: mapped or not mappable,
        and not exact resends: [(id, raw, charset, route, received_at)]."""

    @abstractmethod
    def reconcile_candidates(self, since: str, as_of: str, cutoff: str, late_after: float, facility: str | None,
                             erp_destinations: list[str]):
        """What may be an exception in [since, as_of), as ``engine.reconcile.rules.Candidates``:
        active appointments started in [since, cutoff) with no linked charge line; linked lines made
        in the window with a lag over ``late_after`` seconds; lines linked to no appointment; lines
        with no delivery to ``erp_destinations`` delivered by ``as_of`` (none when that is empty; a
        delivery delivered once and replayed since still counts as delivered).
        Each row has its journal message IDs (``message_ids``). ``lines``: every line made in the
        window, for the KPIs."""

    @abstractmethod
    def reconcile_kpi_rows(self, since: str, as_of: str, facility: str | None, cutoffs: dict,
                           default_cutoff: str) -> list[tuple]:
        """For the KPIs of [since, as_of): appointments starting then per (facility, status) as
        (facility, status, count, same-day cancellations, how many started before the facility's
        cutoff: ``cutoffs[facility]``, else ``default_cutoff``). (The charge lines' figures come
        with ``reconcile_candidates``: ``Candidates.lines``.)"""

    @abstractmethod
    def appointment_record(self, facility: str, appointment_id: str) -> dict | None:
        """One appointment: its current state, ``history`` (its events, oldest first) and
        ``charges`` (the lines linked to it, with their deliveries); None when unknown."""

    @abstractmethod
    def charge_record(self, facility: str, charge_key: str) -> dict | None:
        """One charge line with ``message_ids`` and ``deliveries`` (destination, state, attempts,
        delivered_at, last_error per message), or None."""

    @abstractmethod
    def acknowledge(self, exception_id: str, who: str, note: str, at: str):
        """Record that an exception was resolved (replacing an earlier acknowledgement)."""

    @abstractmethod
    def acknowledgements(self) -> dict:
        """{exception ID: {"who", "note", "at"}}."""

