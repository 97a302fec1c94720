"""Retention rules: which messages a retention policy may delete. Plain Python, no storage.

A message may be pruned when it was received before the cutoff and nothing is still owed for it:
it is not waiting for the converter (accepted, with a route), not held for an operator, and has
no delivery that is not delivered (pending, in flight, retrying or dead). With ``keep_errors``,
errors stay for the operator whatever their age (rejected, error, mapping_error).

Each backend expresses ``prunable`` in its own query language for speed (SQLite:
``engine.store.sqlite``); a test checks the two agree. What goes with a message: its identifiers,
conversion, deliveries, attempts, replays and free-text entry.
"""

from __future__ import annotations

from .base import ACCEPTED, HELD

ERROR_STATUSES = ("rejected", "error", "mapping_error")
BATCH = 500  # messages a prune transaction deletes: short, so a running engine's commits never wait long


def prunable(message: dict, open_deliveries: int, cutoff: str, keep_errors: bool) -> bool:
    """The rule for one message (``received_at``, ``status``, ``route``), ``open_deliveries`` being
    how many of its deliveries are not delivered, ``cutoff`` a journal timestamp."""
    if message["received_at"] >= cutoff:
        return False
    if message["status"] == ACCEPTED and message["route"] is not None:
        return False  # still to be converted
    if message["status"] == HELD or open_deliveries:
        return False
    return not (keep_errors and message["status"] in ERROR_STATUSES)
