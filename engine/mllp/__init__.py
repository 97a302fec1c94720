"""The wire: MLLP in and out, and what the listener does with each frame.

Owns framing (``framing``: a Twisted protocol shaped like ``LineReceiver``, no HL7 inside), the
listener (``listener``: protocol, factory, limits, TLS refusals, group commit), ingest (``ingest``:
frame to journal row and ACK, duplicates, mapping before the ACK through the pipeline), the
blocking client and the library behind ``hl7bridge send`` (``client``, ``sending``), and batch
files (``batch``: FHS/BHS splitting).

May import: ``engine.ops`` (the ACK latency histogram), ``engine.config`` (listener settings),
``engine.transform`` (routing and the pipeline), ``engine.delivery``, ``engine.store``,
``engine.hl7`` and the foundation. It sits above what it drives; nothing but ``serve`` and the CLI
imports it. Blocking work (commits, mapping) runs through functions handed in by ``serve``.
"""
