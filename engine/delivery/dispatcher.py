"""The dispatcher: takes due deliveries from the outbox and sends them, per destination.

Runs in ``serve`` on the reactor. Every outbox read and write goes through the journal writer
(``write``), so it shares the single connection with ingest and never races it. Each destination
has its own concurrency limit; a slow or dead destination never holds back another.

Several nodes share one outbox (a cluster): the dispatcher *claims* due deliveries as ``worker``
(the node's name) with a lease of ``lease`` seconds (``Journal.claim_deliveries``), renews the
leases of what it is sending every third of that, and every half lease returns to the queue the
deliveries whose lease expired, those a dead node held (``recover_in_flight``). A destination's
``cluster_concurrency`` caps its deliveries in flight across all nodes (Tryton: one writer).
Logs carry delivery and message IDs, control IDs, destinations and outcomes; never content.

Everything it needs is handed in: the reactor (its clock, and the HTTP senders' connections),
the journal and ``write``, ``run_blocking`` for the file sender's writes, and ``senders`` (the
factory of a destination's sender; tests give fake ones).
"""

from __future__ import annotations

from twisted.internet import defer, task
from twisted.logger import Logger

from ..stamps import utc_now
from ..store.base import Journal
from . import outbox
from .senders import sender_for

log = Logger(namespace="hl7bridge.delivery")
POLL_INTERVAL = 0.25  # how soon a new or due delivery is noticed, in seconds
LEASE = 30.0  # seconds a claimed delivery is this node's before another may take it over
DEFAULT_WORKER = "local"


def run_here(fn, *args):
    """Run blocking work at once, in this thread (tests; serve hands down a thread pool)."""
    return defer.maybeDeferred(fn, *args)


class Dispatcher:
    def __init__(self, reactor, journal: Journal, destinations: dict, write, clock=utc_now, run_blocking=run_here,
                 senders=sender_for, worker: str = DEFAULT_WORKER, lease: float = LEASE):
        self.reactor = reactor
        self.journal = journal
        self.write = write  # runs a function in the journal writer's thread; returns a Deferred
        self.clock = clock
        self.run_blocking = run_blocking
        self.sender_for = lambda destination: senders(destination, reactor, run_blocking)
        self.destinations = destinations
        self.senders = {name: self.sender_for(d) for name, d in destinations.items()}
        self.worker = worker
        self.lease = lease
        self.in_flight: dict[str, set[int]] = {name: set() for name in destinations}  # delivery IDs being sent
        self.polling = {name: False for name in destinations}
        self.outcomes: dict[tuple[str, str], int] = {}  # (destination, state after the attempt) -> count
        self._loop = task.LoopingCall(self.poll_all)
        self._loop.clock = reactor
        self._running: set = set()
        self._leases = task.LoopingCall(self.renew_leases)
        self._leases.clock = reactor
        self._takeover = task.LoopingCall(self.take_over_expired)
        self._takeover.clock = reactor

    @defer.inlineCallbacks
    def start(self):
        for name, sender in self.senders.items():
            self._start_sender(name, sender)
        # Ours from before a restart, and any whose lease expired; never another live node's.
        recovered = yield self.write(self.journal.recover_in_flight, self.clock(), self.worker)
        if recovered:
            log.info("resuming {count} deliveries that were in flight when a node stopped", count=len(recovered))
        self._loop.start(POLL_INTERVAL, now=True)
        self._leases.start(self.lease / 3, now=False)
        self._takeover.start(self.lease / 2, now=False)

    def renew_leases(self):
        """Extend the leases of every delivery this node is sending (a slow send keeps its claim)."""
        ids = sorted(set().union(*self.in_flight.values()))
        if not ids:
            return defer.succeed([])

        def check(held):
            sending = set().union(*self.in_flight.values())  # those finished meanwhile were released, not lost
            lost = [i for i in ids if i not in held and i in sending]
            if lost:
                log.warn("lost the claim on {count} deliveries being sent (their lease expired): "
                         "another node may send them too", count=len(lost))

        return self._housekeeping("renewing delivery leases", check, self.journal.renew_deliveries, self.worker, ids,
                                  self.lease, self.clock())

    def take_over_expired(self):
        """Return deliveries whose lease expired (their node died) to the queue, flagged resumed."""
        def taken(ids):
            if ids:
                log.warn("{count} deliveries were in flight on a node that stopped renewing its claims; "
                         "they go out again", count=len(ids))

        return self._housekeeping("taking over expired deliveries", taken, self.journal.recover_in_flight, self.clock())

    def _housekeeping(self, what: str, report, fn, *args):
        """Run ``fn(*args)`` through the writer, hand its result to ``report``, log a failure
        (the next round tries again); a Deferred of the result."""
        d = self.write(fn, *args)

        def reported(result):
            report(result)
            return result

        d.addCallback(reported)
        d.addErrback(lambda failure: log.failure(what + " failed; will try again", failure))
        return d

    def _start_sender(self, name, sender):
        """A sender's own start-up work (the file destination repairs torn records), logged."""
        start = getattr(sender, "start", None)
        if start is None:
            return
        for file_name, size in start():
            log.warn("{destination}: the last record of {file} was torn ({size} bytes, the engine stopped while "
                     "writing it); set aside in {file}.torn, the delivery will be written again",
                     destination=name, file=file_name, size=size)

    def update(self, destinations: dict):
        """New destination settings after a reload; senders of changed destinations are rebuilt."""
        for name, destination in destinations.items():
            if self.destinations.get(name) != destination:
                old = self.senders.get(name)
                if old is not None:
                    old.close()
                self.senders[name] = self.sender_for(destination)
                self._start_sender(name, self.senders[name])
            self.in_flight.setdefault(name, set())
            self.polling.setdefault(name, False)
        self.destinations = destinations

    def poll_all(self):
        for name in list(self.destinations):
            self.poll(name)

    def poll(self, name: str):
        destination = self.destinations.get(name)
        if destination is None or self.polling[name]:
            return
        room = destination.concurrency - len(self.in_flight[name])
        if room <= 0:
            return
        self.polling[name] = True
        d = self.write(self.journal.claim_deliveries, name, self.worker, self.clock(), room, self.lease,
                       destination.cluster_concurrency)
        d.addCallback(self._send_all, name)
        d.addErrback(lambda failure: log.failure("outbox read failed for {destination}", failure, destination=name))
        d.addBoth(lambda _: self.polling.__setitem__(name, False))

    def _send_all(self, deliveries, name):
        for delivery in deliveries:
            self.in_flight[name].add(delivery.id)
            d = self._send(delivery, name)
            self._running.add(d)
            d.addBoth(self._sent, d, name, delivery.id)

    def _sent(self, _, d, name, delivery_id):
        self._running.discard(d)
        self.in_flight[name].discard(delivery_id)
        self.poll(name)  # room again: take the next one now

    @defer.inlineCallbacks
    def _send(self, delivery, name):
        destination = self.destinations[name]
        started = self.clock()
        if not delivery.bundle:
            result = outbox.Result(outbox.PERMANENT, None, "", error="no converted Bundle for this message")
        else:
            try:
                result = yield self.senders[name].send(delivery)
            except Exception as exc:  # a bug in a sender must not lose the delivery
                log.failure("sender for {destination} failed", destination=name)
                result = outbox.Result(outbox.TRANSIENT, None, "", error=f"internal error: {type(exc).__name__}")
        finished = self.clock()
        if result.notice:
            log.warn("{destination}: {notice}", destination=name, notice=result.notice)
        state = yield self.write(outbox.finish, self.journal, delivery, destination, result, started, finished)
        self.outcomes[(name, state)] = self.outcomes.get((name, state), 0) + 1
        if state == outbox.DELIVERED:
            log.debug("delivered message {message_id} ({control_id}) to {destination}",
                      message_id=delivery.message_id, control_id=delivery.control_id, destination=name)
        elif state == outbox.RETRYING:
            log.warn("delivery {id} of message {message_id} ({control_id}) to {destination} failed "
                     "(attempt {attempt}: {error}); will retry",
                     id=delivery.id, message_id=delivery.message_id, control_id=delivery.control_id,
                     destination=name, attempt=delivery.attempts + 1, error=result.error)
        else:
            log.error("delivery {id} of message {message_id} ({control_id}) to {destination} is dead: {error}; "
                      "'hl7bridge replay' sends it again",
                      id=delivery.id, message_id=delivery.message_id, control_id=delivery.control_id,
                      destination=name, error=result.error)

    def sender_counters(self) -> dict[tuple[str, str], int]:
        """(destination, counter) -> count, from senders that keep counters (the file destination)."""
        found = {}
        for name, sender in self.senders.items():
            for counter, value in getattr(sender, "counters", {}).items():
                found[(name, counter)] = value
        return found

    @defer.inlineCallbacks
    def stop(self):
        for loop in (self._loop, self._leases, self._takeover):
            if loop.running:
                loop.stop()
        if self._running:
            yield defer.DeferredList(list(self._running))
        for sender in self.senders.values():
            yield sender.close()
