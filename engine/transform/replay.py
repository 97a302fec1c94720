"""Replays: the library behind ``hl7bridge replay`` and the dashboard's Replay button.

A replay either resends the stored Bundle (the default) or maps the message again with the
routes and mappings as they are now (``remap``: after fixing a mapping, through the same pipeline
as every other conversion), and queues it again to all or chosen destinations. Every replay is
recorded with who asked, when and why.
"""

from __future__ import annotations

from datetime import datetime, timezone

from ..errors import Hl7BridgeError, ParseError
from ..stamps import iso
from ..store.base import Journal
from . import pipeline
from .project import Project


class ReplayError(Hl7BridgeError):
    pass


def remap(journal: Journal, project: Project, message_id: int, now: datetime) -> str:
    """Map a message again with the current routes and mappings; returns the new status.

    Queues deliveries for the route's destinations that the message has none for yet (a message
    whose first mapping failed has none at all).
    """
    source = journal.message_source(message_id)
    if source is None:
        raise ReplayError(f"no message {message_id}")
    raw, charset, route_name = source
    try:
        message = pipeline.read(raw, charset or "utf-8")
    except ParseError as exc:
        raise ReplayError(f"message {message_id} is not HL7 ({exc}); there is nothing to map") from None
    try:
        converted = pipeline.convert(project, message, route_name=route_name or None)
    except pipeline.RouteNotFound:
        converted = None
    if converted is None or converted.route is None:
        raise ReplayError(f"message {message_id}: no route takes it" +
                          (f" (its route {route_name!r} is no longer configured)" if route_name else ""))
    with journal.transaction():
        pipeline.record(journal, message_id, converted, iso(now), now, update_status=True, set_route=True,
                        only_missing=True)
    return converted.status


def replay_messages(journal: Journal, project: Project | None, message_ids: list[int], destinations: list[str] | None,
                    who: str, why: str, remapped: bool = False, only_dead: bool = False,
                    now: datetime | None = None, progress=None, batch: int = 200) -> dict:
    """Replay each message; returns counts: messages, deliveries reset, and remap outcomes.

    Works through the messages in batches (each its own transaction, so a running engine's
    commits never wait long); ``progress(n)`` is called after each batch.
    """
    now = now or datetime.now(timezone.utc)
    if remapped and project is None:
        raise ReplayError("remapping needs the routes and mappings (--config)")
    if not remapped:
        held = journal.held_among(message_ids)
        if held:
            raise ReplayError(f"message {held[0]} is held (it reused a control ID with different content) and was "
                              "never mapped: replay it with --remap to process it")
    statuses: dict[str, int] = {}
    reset = 0
    for start in range(0, len(message_ids), batch):
        chunk = message_ids[start : start + batch]
        if remapped:
            for message_id in chunk:
                status = remap(journal, project, message_id, now)
                statuses[status] = statuses.get(status, 0) + 1
        reset += journal.replay(chunk, destinations, who, why, now, only_dead=only_dead, remapped=remapped)
        if progress is not None:
            progress(len(chunk))
    return {"messages": len(message_ids), "deliveries": reset, "remapped": statuses}
