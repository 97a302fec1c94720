"""Scheduling to cash: follow each appointment to its charges and their postings, and find what fell through.

``facts`` reads a parsed message's appointment and charge-line facts (pure); ``rules`` decides an
appointment's current state, which appointment a charge belongs to, the exceptions and the KPIs
(pure); ``settings`` reads the ``reconcile:`` section of hl7bridge.yaml; ``record`` keeps the
record in the store current as messages are mapped, and rebuilds it; ``queue`` asks the store for
a window and hands back the exceptions and KPIs; ``report`` writes them as CSV and JSON files.

May import ``engine.store`` (the ``Journal`` interface: every SQL statement stays there),
``engine.hl7`` and the foundation. ``engine.transform`` calls ``record.apply`` when it journals a
conversion; ``ops`` and ``cli`` read through ``queue``.
"""
