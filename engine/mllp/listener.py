"""The MLLP listener: Twisted protocol and factory, connection limits, and group commit.

The protocol frames bytes (``engine.mllp.framing``), keeps one message in flight per connection, and
writes each ACK only when the journal has committed the message. ``GroupCommit`` batches the frames
that arrive in one turn of the reactor, from any number of connections, into one journal
transaction: with eight busy connections one fsync covers eight messages. Mapping before the ACK
(routes with ``ack.after: mapping``) runs in a thread pool handed down from ``serve``, so a slow
mapping delays only its own message's ACK.

Logs carry control IDs, message types, peers, statuses and counts; never message content.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from twisted.internet import defer, protocol
from twisted.logger import Logger
from twisted.protocols.policies import TimeoutMixin
from twisted.python.failure import Failure

from ..config import ListenerSettings
from ..hl7.ack import TABLE_0357
from ..ops.metrics import Histogram
from .framing import MLLPFraming
from .ingest import AcceptPolicy, Frame, Ingestor, Outcome, Prepared

log = Logger(namespace="hl7bridge.listener")
NORMAL_STATUSES = ("accepted", "mapped")  # logged at debug level; everything else at warn
# Group commit (GroupCommit): a connection whose next frame came within QUICK seconds of its ACK
# is a busy sender (it has a queue, and sends the next message as soon as it is answered). Once
# such connections have been answered, the next batch waits for them to send again, at most
# MAX_HOLD seconds and at most HOLD_SHARE of the recent commit time, so one fsync covers them all.
QUICK = 0.002
MAX_HOLD = 0.002
HOLD_SHARE = 0.5
FORGET_ANSWERED = 1.0  # seconds after which an answered connection that sent nothing is forgotten


@dataclass
class Counters:
    """Running totals for the periodic log line (and, later, metrics)."""

    connections: int = 0
    frames: int = 0
    accepted: int = 0
    rejected: int = 0
    duplicates: int = 0
    unrouted: int = 0
    mapping_errors: int = 0
    journal_failures: int = 0
    discarded_bytes: int = 0
    refused_connections: int = 0
    differing_duplicates: dict = field(default_factory=dict)  # policy -> count
    tls_failures: dict = field(default_factory=dict)  # (listener, reason code) -> count

    def count(self, outcome: Outcome):
        self.frames += 1
        if outcome.status == "duplicate":
            self.duplicates += 1
        elif outcome.ack_code in ("AA", "CA"):
            self.accepted += 1
        else:
            self.rejected += 1
        if outcome.differing_policy:
            policy = outcome.differing_policy
            self.differing_duplicates[policy] = self.differing_duplicates.get(policy, 0) + 1
        if outcome.status == "unrouted":
            self.unrouted += 1
        elif outcome.status == "mapping_error":
            self.mapping_errors += 1


class GroupCommit:
    """Collects frames from every connection and journals them together, one transaction a batch.

    ``submit`` reads the frame and builds its ACK at once (in the caller's thread), then returns a
    Deferred that fires with the frame's ``Outcome`` after the commit. Commits run through
    ``run_commit`` (in ``serve``, the journal writer's thread): while one batch is being committed
    (and fsynced), the next one fills up, so with many busy connections each fsync covers many
    messages. If the journal write fails, every frame of that batch gets an error ACK (AE/CE,
    table 0357 code 207) so its sender resends it, and nothing is claimed to be stored.

    A frame whose route ACKs after mapping is mapped through ``run_mapping`` first (in ``serve``,
    a thread pool) and joins the batch that is filling when its mapping is done.

    Busy senders are waited for: with eight connections each sending its next message as soon as
    it has the ACK, batches taken as they come settle into two halves (one filling while the
    other commits), four messages an fsync. So once the connections of a batch that answered
    quickly last time (``QUICK``) are answered, the next batch waits until they have all sent
    again, or ``MAX_HOLD`` (at most ``HOLD_SHARE`` of the recent commit time: where an fsync is
    cheap there is nothing to gain), and one commit takes them all. A frame from any other
    connection never holds a batch: a lone sender, or a paced one, is answered at once.
    """

    def __init__(self, ingestor: Ingestor, clock, counters: Counters | None = None, run_commit=None,
                 checkpoint_interval: float | None = None, run_mapping=None):
        self.ingestor = ingestor
        self.clock = clock
        self.counters = counters or Counters()
        # How a batch is committed and a frame mapped: synchronously by default (tests), in
        # threads in serve. Each takes (function, *args) and returns a Deferred.
        self.run_commit = run_commit or (lambda fn, *args: defer.maybeDeferred(fn, *args))
        self.run_mapping = run_mapping or (lambda fn, *args: defer.maybeDeferred(fn, *args))
        self._pending: list[tuple[Prepared, defer.Deferred]] = []
        self._mapping: set[defer.Deferred] = set()  # frames being mapped before their ACK
        self._scheduled = None
        self._holding = False  # _scheduled is a timed flush, waiting for busy senders
        self._committing = None  # the Deferred of the batch being committed
        self._flush_started = 0.0
        self.commit_seconds = 0.0  # recent commit time (moving average)
        self._answered: dict[tuple[str, str], float] = {}  # connection -> when its ACK went out
        self._quick: set[tuple[str, str]] = set()  # connections that sent again within QUICK of their ACK
        self._awaited: set[tuple[str, str]] = set()  # quick connections answered, not back yet
        self.batches = 0  # commits and the frames they held: frames / batches is the batch size
        self.batched_frames = 0
        # With a journal opened with manual_checkpoints, how often (seconds) to checkpoint.
        self.checkpoint_interval = checkpoint_interval
        self._last_checkpoint = clock.seconds()

    def submit(self, frame: Frame) -> defer.Deferred:
        d = defer.Deferred()
        prepared = self.ingestor.prepare(frame)
        if prepared.mapping_route is None:
            self._enqueue(prepared, d)
            return d
        mapping = self.run_mapping(self.ingestor.map_before_ack, prepared)
        self._mapping.add(mapping)

        def mapped(done):
            self._mapping.discard(mapping)
            self._enqueue(done, d)

        def failed(failure):
            self._mapping.discard(mapping)
            d.errback(failure)

        mapping.addCallbacks(mapped, failed)
        return d

    def _enqueue(self, prepared: Prepared, d: defer.Deferred):
        self._pending.append((prepared, d))
        key = (prepared.frame.listener, prepared.frame.peer)
        answered = self._answered.pop(key, None)
        if answered is not None:
            if self.clock.seconds() - answered <= QUICK:
                self._quick.add(key)
            else:
                self._quick.discard(key)
        self._awaited.discard(key)
        if self._committing is None:
            self._schedule_flush()

    def _schedule_flush(self):
        """With frames pending and no commit running: flush at the end of this turn of the
        reactor (frames from other connections join), or, while answered busy senders have not
        sent again, when they have or the hold is over."""
        if self._awaited:
            if self._scheduled is None:
                self._holding = True
                self._scheduled = self.clock.callLater(min(MAX_HOLD, self.commit_seconds * HOLD_SHARE), self._flush)
            return
        if self._scheduled is not None and self._holding:
            self._scheduled.cancel()  # everyone awaited is here: no need to wait out the hold
            self._scheduled = None
        if self._scheduled is None:
            # Wait for the rest of this turn of the reactor: frames from other connections join.
            self._holding = False
            self._scheduled = self.clock.callLater(0, self._flush)

    @defer.inlineCallbacks
    def drain(self):
        """Map and commit everything pending, then fire (used at shutdown)."""
        while self._mapping or self._pending or self._committing is not None:
            if self._mapping:
                yield defer.DeferredList(list(self._mapping))
            elif self._committing is not None:
                yield self._committing
            else:
                self._flush()

    def _flush(self):
        if self._scheduled is not None and self._scheduled.active():
            self._scheduled.cancel()
        self._scheduled = None
        if self._committing is not None or not self._pending:
            return
        batch, self._pending = self._pending, []
        self._awaited.clear()  # whoever is not back yet joins a later batch
        self._flush_started = self.clock.seconds()
        # The commit may finish synchronously (and start the next one from _committed), so mark
        # this one with a token and keep its Deferred only if it is still the one running.
        token = object()
        self._committing = token
        d = self.run_commit(self.ingestor.record, [prepared for prepared, _ in batch])
        d.addErrback(self._failed, batch)
        d.addCallback(self._committed, batch)
        if self._committing is token:
            self._committing = d

    def _failed(self, failure, batch):
        self.counters.journal_failures += len(batch)
        log.failure("journal write failed; {count} message(s) answered with an error ACK", failure, count=len(batch))
        return [self.ingestor.failure_outcome(prepared) for prepared, _ in batch]

    def _committed(self, outcomes, batch):
        self._committing = None
        now = self.clock.seconds()
        self.commit_seconds = 0.8 * self.commit_seconds + 0.2 * (now - self._flush_started)
        self.batches += 1
        self.batched_frames += len(batch)
        self._note_answered(batch, now)
        for (_, d), outcome in zip(batch, outcomes):
            self.counters.count(outcome)
            d.callback(outcome)
        if self.checkpoint_interval is not None and self._committing is None:
            now = self.clock.seconds()
            if now - self._last_checkpoint >= self.checkpoint_interval:
                # The ACKs above are out; the next batch waits for this checkpoint instead.
                self._last_checkpoint = now
                self._checkpoint()
                return
        # Frames that arrived during the commit go next: at once, or with the busy senders just
        # answered, once they have sent again.
        if self._pending:
            self._schedule_flush()

    def _note_answered(self, batch, now: float):
        """The connections of a committed batch are being answered now: the quick ones are awaited."""
        if self._answered:
            stale = [key for key, at in self._answered.items() if now - at > FORGET_ANSWERED]
            for key in stale:  # gone quiet, or closed
                del self._answered[key]
                self._quick.discard(key)
        for prepared, _ in batch:
            key = (prepared.frame.listener, prepared.frame.peer)
            self._answered[key] = now
            if key in self._quick:
                self._awaited.add(key)

    def _checkpoint(self):
        token = object()
        self._committing = token
        d = self.run_commit(self.ingestor.journal.checkpoint)
        d.addErrback(lambda failure: log.failure("journal checkpoint failed; will try again", failure))
        d.addBoth(self._checkpointed)
        if self._committing is token:
            self._committing = d

    def _checkpointed(self, _):
        self._committing = None
        if self._pending:
            self._schedule_flush()


# OpenSSL's reason for a failed handshake -> (a code for /metrics, what it means for the operator).
TLS_REFUSALS = (
    (("peer did not return a certificate", "certificate required"),
     "no_client_certificate", "the client sent no certificate, and this listener requires one (tls.client_ca)"),
    (("certificate verify failed",),
     "untrusted_client_certificate",
     "the client's certificate is not signed by the listener's client_ca, or it has expired"),
    (("alert unknown ca", "alert bad certificate", "alert certificate unknown", "alert certificate expired",
      "alert unsupported certificate", "alert decrypt error"),
     "client_refused_server_certificate",
     "the client refused this listener's certificate (it does not trust the CA that signed it, or the "
     "name or date does not match)"),
    (("wrong version number", "http request", "unknown protocol", "packet length too long",
      "unsupported protocol", "no protocols available", "version too low", "alert protocol version",
      "record layer failure", "unexpected message"),
     "protocol_mismatch",
     "the client does not speak a TLS version this listener accepts, or sent plain MLLP to a TLS port"),
    (("no shared cipher", "alert handshake failure"),
     "no_shared_cipher", "the client and this listener have no cipher suite in common"),
)


def tls_refusal(reason: Failure) -> tuple[str, str, str] | None:
    """Why a TLS connection failed, from the Failure its protocol was closed with:
    (reason code, explanation, OpenSSL's own words); None when it was not a TLS error."""
    try:
        from OpenSSL import SSL
    except ImportError:  # no TLS support installed: no TLS listener either
        return None
    if reason is None or not reason.check(SSL.Error):
        return None
    words = []
    for item in (reason.value.args[0] if reason.value.args else []) or []:
        if isinstance(item, (tuple, list)) and item:
            words.append(str(item[-1]))
        else:
            words.append(str(item))
    text = "; ".join(w for w in words if w) or str(reason.value) or "TLS error"
    lowered = text.lower()
    for needles, code, meaning in TLS_REFUSALS:
        if any(needle in lowered for needle in needles):
            return code, meaning, text
    return "other", "the TLS handshake failed", text


def error_reason(entry) -> str:
    """The HL7 error of a journal row for the log: table 0357 code, its meaning and the field
    (", error 101 Required field missing at MSH-9"); never the text, which may quote content."""
    if entry is None or not entry.error_code:
        return ""
    meaning = TABLE_0357.get(entry.error_code, "")
    where = f" at {entry.error_location}" if entry.error_location else ""
    return f", error {entry.error_code}{' ' + meaning if meaning else ''}{where}"


class MLLPServerProtocol(MLLPFraming, TimeoutMixin):
    """One MLLP connection: frames in, one message at a time, ACKs out in order."""

    peer = "?"
    _open = False

    def connectionMade(self):
        factory = self.factory
        peer = self.transport.getPeer()
        self.peer = f"{getattr(peer, 'host', '?')}:{getattr(peer, 'port', '?')}"
        self.MAX_LENGTH = factory.settings.max_frame_bytes
        host = getattr(peer, "host", "")
        if not factory.settings.peer_allowed(host):
            factory.counters.refused_connections += 1
            log.warn("listener {listener}: refused {peer}: not in allow_peers", listener=factory.name, peer=self.peer)
            self.transport.abortConnection()
            return
        if factory.open_connections >= factory.settings.max_connections:
            factory.counters.refused_connections += 1
            log.warn(
                "listener {listener}: refused {peer}: {limit} connections already open",
                listener=factory.name, peer=self.peer, limit=factory.settings.max_connections,
            )
            self.transport.abortConnection()
            return
        self._open = True
        self.callLater = factory.clock.callLater  # TimeoutMixin's timer runs on the factory's clock
        factory.open_connections += 1
        factory.connections[self] = Connection(self.peer, factory.clock.seconds())
        factory.counters.connections += 1
        self.setTimeout(factory.settings.idle_timeout)
        log.info("listener {listener}: connection from {peer}", listener=factory.name, peer=self.peer)

    def dataReceived(self, data: bytes):
        if not self._open:
            return
        self.resetTimeout()
        MLLPFraming.dataReceived(self, data)

    def frameReceived(self, payload: bytes):
        self.pauseFraming()
        self._received_at = self.factory.clock.seconds()
        counts = self.factory.frames_by_listener
        counts[self.factory.name] = counts.get(self.factory.name, 0) + 1
        connection = self.factory.connections.get(self)
        if connection is not None:
            connection.messages += 1
            connection.last_message_at = self._received_at
        frame = Frame(payload, listener=self.factory.name, peer=self.peer)
        self.factory.submit(frame).addCallback(self._reply).addErrback(self._crashed)

    def _reply(self, outcome: Outcome):
        if outcome.differing_policy:
            entry = outcome.entry
            log.warn(
                "listener {listener}: control ID {control_id} from {facility} reused with different content: "
                "message {message_id} differs from message {original}; {action}",
                listener=self.factory.name, control_id=outcome.control_id or "-",
                facility=entry.sending_facility or "-", message_id=outcome.message_id, original=entry.duplicate_of,
                action={"process": "processed as a new message", "reject": f"rejected ({outcome.ack_code})",
                        "hold": "held for an operator ('hl7bridge replay --remap' processes it)"}[outcome.differing_policy],
            )
        if outcome.status not in NORMAL_STATUSES:
            log.warn(
                "listener {listener}: {status} {message_code} control ID {control_id} from {peer}: ACK {ack_code}"
                "{reason} (route {route})",
                listener=self.factory.name, status=outcome.status, message_code=outcome.message_code or "-",
                control_id=outcome.control_id or "-", peer=self.peer, ack_code=outcome.ack_code,
                reason=error_reason(outcome.entry),
                route=(outcome.entry.route if outcome.entry is not None else None) or "-",
            )
        elif self.factory.log_accepted:
            log.debug(
                "listener {listener}: accepted {message_code} control ID {control_id}: ACK {ack_code}",
                listener=self.factory.name, message_code=outcome.message_code,
                control_id=outcome.control_id, ack_code=outcome.ack_code,
            )
        if self.transport.disconnecting:
            return
        if outcome.ack is not None:
            self.sendFrame(outcome.ack)
            self.factory.ack_latency.observe(self.factory.clock.seconds() - self._received_at)
        self.resetTimeout()
        self.resumeFraming()

    def _crashed(self, failure: Failure):
        log.failure("listener {listener}: unexpected error; closing {peer}", failure,
                    listener=self.factory.name, peer=self.peer)
        self.transport.abortConnection()

    def frameLengthExceeded(self, partial: bytes):
        log.warn(
            "listener {listener}: frame from {peer} exceeds {limit} bytes; journaled cut off, disconnecting",
            listener=self.factory.name, peer=self.peer, limit=self.MAX_LENGTH,
        )
        self.factory.submit(Frame(partial, listener=self.factory.name, peer=self.peer, truncated=True))
        self.transport.loseConnection()

    def timeoutConnection(self):
        log.info("listener {listener}: {peer} idle for {seconds}s, disconnecting",
                 listener=self.factory.name, peer=self.peer, seconds=self.factory.settings.idle_timeout)
        self.transport.loseConnection()

    def connectionLost(self, reason=None):
        self.setTimeout(None)
        if not self._open:
            return
        self._open = False
        self.factory.open_connections -= 1
        self.factory.closed(self)
        refusal = tls_refusal(reason)
        if refusal is not None:
            code, meaning, words = refusal
            key = (self.factory.name, code)
            failures = self.factory.counters.tls_failures
            failures[key] = failures.get(key, 0) + 1
            log.warn("listener {listener}: TLS with {peer} failed: {meaning} (OpenSSL: {words})",
                     listener=self.factory.name, peer=self.peer, meaning=meaning, words=words)
        if self.discardedBytes:
            self.factory.counters.discarded_bytes += self.discardedBytes
            log.info("listener {listener}: {count} bytes outside MLLP frames discarded from {peer}",
                     listener=self.factory.name, count=self.discardedBytes, peer=self.peer)
        log.info("listener {listener}: {peer} disconnected", listener=self.factory.name, peer=self.peer)


@dataclass
class Connection:
    """One peer's connection as the operator sees it (no message content): where from, since
    when (clock seconds), how many messages, the last one's time, and when it closed."""

    peer: str
    since: float
    messages: int = 0
    last_message_at: float | None = None
    closed_at: float | None = None


RECENTLY_CLOSED = 20  # closed connections remembered per listener, for "when did the clinic last connect?"


class MLLPServerFactory(protocol.Factory):
    """Builds one protocol per connection and hands each the listener's settings and the committer."""

    protocol = MLLPServerProtocol
    noisy = False
    # Whether each accepted message's debug line is emitted at all: serve turns it off unless the
    # log level is debug (Twisted builds and filters the event either way: about 10 us of reactor
    # time per message, the ACK path's).
    log_accepted = True

    def __init__(self, settings: ListenerSettings, committer: GroupCommit, policy: AcceptPolicy):
        self.settings = settings
        self.name = settings.name
        self.committer = committer
        self.policy = policy
        self.counters = committer.counters
        self.clock = committer.clock
        self.open_connections = 0
        self.connections: dict[MLLPServerProtocol, Connection] = {}  # open ones, by protocol
        self.recently_closed: list[Connection] = []  # newest first, at most RECENTLY_CLOSED
        # Shared with the engine's /metrics (serve replaces them with its own).
        self.ack_latency = Histogram()
        self.frames_by_listener: dict[str, int] = {}

    def submit(self, frame: Frame) -> defer.Deferred:
        frame.policy = self.policy
        return self.committer.submit(frame)

    def closed(self, proto: MLLPServerProtocol):
        connection = self.connections.pop(proto, None)
        if connection is not None:
            connection.closed_at = self.clock.seconds()
            self.recently_closed.insert(0, connection)
            del self.recently_closed[RECENTLY_CLOSED:]

    def peers(self) -> dict:
        """The open connections, oldest first, and the recently closed ones, newest first."""
        return {"open": sorted(self.connections.values(), key=lambda c: c.since),
                "recently_closed": list(self.recently_closed)}
