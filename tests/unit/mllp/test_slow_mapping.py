"""A deliberately slow mapping, in a real thread pool on the real reactor: the other connection's
ACK does not wait for it (trial TestCase, like the senders' socket tests)."""

import time

from twisted.internet import defer, reactor, task, threads
from twisted.python.threadpool import ThreadPool
from twisted.trial import unittest

from conftest import EXAMPLES, ROOT
from engine.config import ListenerSettings, Settings
from engine.mllp.framing import frame
from engine.mllp.listener import GroupCommit, MLLPServerFactory
from engine.transform.project import Project
from listening import connect, ingestor_for

SLOW = 1.0  # seconds the mapping of the DFT (ack.after: mapping) takes


class SlowMappingTests(unittest.TestCase):
    def setUp(self):
        ingestor = ingestor_for(self, Project.load(ROOT))
        slow_map = ingestor.map_before_ack

        def map_slowly(prepared):
            time.sleep(SLOW)  # a mapping stuck on something: pydantic, hl7apy, a huge message
            return slow_map(prepared)

        ingestor.map_before_ack = map_slowly
        pool = ThreadPool(minthreads=0, maxthreads=2, name="test-mapping")
        pool.start()
        self.addCleanup(pool.stop)
        self.committer = GroupCommit(
            ingestor, reactor, run_mapping=lambda fn, *args: threads.deferToThreadPool(reactor, pool, fn, *args))
        settings = ListenerSettings(name="test", idle_timeout=30, max_connections=4)
        self.factory = MLLPServerFactory(settings, self.committer, Settings().policy(settings))

    def connect(self, port):
        proto, transport = connect(self.factory, port=port)
        self.addCleanup(proto.connectionLost, None)
        return proto, transport

    @defer.inlineCallbacks
    def test_the_other_connections_ack_is_prompt(self):
        charges, charges_transport = self.connect(1)
        scheduling, scheduling_transport = self.connect(2)
        started = time.monotonic()
        charges.dataReceived(frame((EXAMPLES / "dft_p03.hl7").read_bytes()))
        scheduling.dataReceived(frame((EXAMPLES / "siu_s12.hl7").read_bytes()))
        while b"MSA|AA|NC000123" not in scheduling_transport.value():
            self.assertLess(time.monotonic() - started, SLOW / 2, "the SIU's ACK waited for the DFT's mapping")
            yield task.deferLater(reactor, 0.01, lambda: None)
        self.assertEqual(charges_transport.value(), b"")  # still mapping
        while b"MSA|AA|EC000501" not in charges_transport.value():
            self.assertLess(time.monotonic() - started, SLOW + 5)
            yield task.deferLater(reactor, 0.02, lambda: None)
        self.assertGreaterEqual(time.monotonic() - started, SLOW)
        yield self.committer.drain()
