"""Senders against real sockets on 127.0.0.1 that misbehave: connect_timeout apart from timeout.

Twisted's trial TestCase (run by pytest): a test returns a Deferred and the reactor runs until it fires.
"""

import socket
import time

from twisted.internet import defer, reactor
from twisted.trial import unittest

from engine.delivery.destinations import Destination
from engine.delivery.outbox import TRANSIENT, Delivery
from engine.delivery.senders import FhirSender

BUNDLE = '{"resourceType": "Bundle", "type": "transaction", "entry": []}'


def delivery():
    return Delivery(1, 1, "fhir", "message:1", "pending", 0, "2026-11-28T10:00:00.000000Z", "NC1", BUNDLE)


class ConnectTimeoutTests(unittest.TestCase):
    def setUp(self):
        self.sockets = []

    def tearDown(self):
        for s in self.sockets:
            s.close()

    def listening(self, backlog: int) -> int:
        server = socket.socket()
        server.bind(("127.0.0.1", 0))
        server.listen(backlog)
        self.sockets.append(server)
        return server.getsockname()[1]

    def sender(self, url: str) -> FhirSender:
        destination = Destination(name="fhir", type="fhir", path="x.yaml", url=url, timeout=30.0,
                                  connect_timeout=0.5, verify_tls=False)
        sender = FhirSender(destination, reactor)
        self.addCleanup(sender.close)
        return sender

    @defer.inlineCallbacks
    def test_a_server_whose_accept_queue_is_full_is_given_up_on_after_connect_timeout(self):
        # A server that is alive but never accepts: once its queue is full, the kernel drops new
        # SYNs and a connect hangs. The delivery slot must be freed after connect_timeout, not timeout.
        port = self.listening(0)
        for _ in range(4):
            filler = socket.socket()
            filler.setblocking(False)
            filler.connect_ex(("127.0.0.1", port))
            self.sockets.append(filler)
        started = time.monotonic()
        result = yield self.sender(f"http://127.0.0.1:{port}/fhir").send(delivery())
        elapsed = time.monotonic() - started
        self.assertEqual(result.outcome, TRANSIENT)
        self.assertEqual(result.error, "no connection within connect_timeout (0.5s)")
        self.assertLess(elapsed, 5.0)

    @defer.inlineCallbacks
    def test_a_tls_handshake_that_never_finishes_is_given_up_on_after_connect_timeout(self):
        # TCP connects (the kernel accepts it) but nothing answers the TLS ClientHello.
        port = self.listening(16)
        started = time.monotonic()
        result = yield self.sender(f"https://127.0.0.1:{port}/fhir").send(delivery())
        elapsed = time.monotonic() - started
        self.assertEqual(result.outcome, TRANSIENT)
        self.assertIn("TLS handshake", result.error)
        self.assertLess(elapsed, 5.0)

    @defer.inlineCallbacks
    def test_a_refused_connection_is_said_in_words(self):
        port = self.listening(1)
        self.sockets.pop().close()  # nothing listens there any more
        result = yield self.sender(f"http://127.0.0.1:{port}/fhir").send(delivery())
        self.assertEqual(result.outcome, TRANSIENT)
        self.assertTrue(result.error.startswith("cannot connect: "), result.error)
        self.assertNotIn("Error", result.error)
