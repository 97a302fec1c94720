"""Delivery: getting converted messages to FHIR servers, ERPs and files, at least once, in order per key.

Owns the outbox rules (``outbox``: states, what an attempt came to, the next state and backoff,
ordering keys and the expected deliveries of messages not mapped yet, ``queue``, the one place
deliveries are created), destinations (``destinations``),
the HTTP client every HTTP sender composes (``http``: TLS, auth incl. OAuth2, timeouts, what is
transient), the senders (``senders``: FHIR, REST ERP, files; ``tryton``), finance events
(``finance``), NDJSON files that survive a crash (``ndjson``), and the dispatcher.

May import: ``engine.store``, ``engine.hl7`` and the foundation. The reactor, the journal writer
and the thread pool for file writes are handed in by ``serve``.
"""
