"""Operations: what an operator sees of the engine.

Owns Prometheus metrics (``metrics``), ``/metrics``, ``/healthz`` and ``/readyz`` (``webapi``), the
dashboard and its JSON API (``dashboard``), the readable page of one journal row (``detail``: what
``journal show`` prints), and ``status``: the interface to the running engine that the web side
reads through (``serve`` implements it; every journal read goes to its reader threads).

May import: ``engine.config``, ``engine.transform`` (replays), ``engine.delivery``, ``engine.store``,
``engine.hl7`` and the foundation. Never ``serve``: it sees the engine only as a ``Status``.
"""
