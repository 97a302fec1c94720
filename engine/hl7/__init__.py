"""HL7 v2 itself: reading, naming and answering messages. Plain Python, no I/O.

Owns the ER7 reader (``er7``: separators, segments, escapes), HL7 paths (``paths``: ``PID-3[2].1``),
character sets (``charset``: MSH-18), the header (``header``: MSH as the engine needs it), what is
acceptable at ingest (``assess``, ``AcceptPolicy``), the identifiers a message is searched by
(``identifiers``), ACKs (``ack``: a pure function, the clock and control ID injected), the versions
accepted (``versions``) and what hl7apy knows of the standard (``standard``: field names, structural
validation; slow, so never on the hot path).

May import: the top-level foundation (``engine.errors``, ``engine.stamps``). Nothing else.
"""
