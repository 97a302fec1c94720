"""Replays: the library behind ``hl7bridge replay``. Plain Python over the journal.

A replay either resends the stored Bundle (the default) or maps the message again with the
routes and mappings as they are now (``remap``: after fixing a mapping), and queues it again to
all or chosen destinations. Every replay is recorded with who asked, when and why.
"""

from __future__ import annotations

from datetime import datetime, timezone

from ..hl7.er7 import parse
from ..errors import Hl7BridgeError, ParseError
from ..mllp.ingest import iso
from ..store.journal import Journal
from ..delivery.outbox import create_deliveries, replay
from .project import Project
from .pipeline import MAPPED, convert_record


class ReplayError(Hl7BridgeError):
    pass


def remap(journal: Journal, project: Project, message_id: int, now: datetime) -> str:
    """Map a message again with the current routes and mappings; returns the new status.

    Queues deliveries for the route's destinations that the message has none for yet (a message
    whose first mapping failed has none at all).
    """
    row = journal.conn.execute("SELECT raw, charset, route FROM messages WHERE id = ?", (message_id,)).fetchone()
    if row is None:
        raise ReplayError(f"no message {message_id}")
    raw, charset, route_name = row
    try:
        message = parse(raw.decode(charset or "utf-8", errors="replace"))
    except ParseError as exc:
        raise ReplayError(f"message {message_id} is not HL7 ({exc}); there is nothing to map") from None
    route = project.routes.get(route_name) if route_name else project.route_for(message)
    if route is None:
        raise ReplayError(f"message {message_id}: no route takes it" +
                          (f" (its route {route_name!r} is no longer configured)" if route_name else ""))
    record = convert_record(project, route, message, iso(now))
    with journal.transaction():
        journal.conn.execute("UPDATE messages SET route = ? WHERE id = ?", (route.name, message_id))
        journal.record_conversion(message_id, record, update_status=True)
        if record.status == MAPPED:
            existing = {r[0] for r in journal.conn.execute(
                "SELECT destination FROM deliveries WHERE message_id = ?", (message_id,))}
            missing = [d for d in project.destinations_of(route) if d.name not in existing]
            create_deliveries(journal, message_id, missing, now)
    return record.status


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
        held = []
        for start in range(0, len(message_ids), 500):
            chunk = message_ids[start : start + 500]
            held += [row[0] for row in journal.conn.execute(
                f"SELECT id FROM messages WHERE status = 'held' AND id IN ({', '.join('?' for _ in chunk)})", chunk)]
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
        reset += replay(journal, chunk, destinations, who, why, now, only_dead=only_dead, remapped=remapped)
        if progress is not None:
            progress(len(chunk))
    return {"messages": len(message_ids), "deliveries": reset, "remapped": statuses}


def dead_message_ids(journal: Journal, destination: str) -> list[int]:
    return [r[0] for r in journal.conn.execute(
        "SELECT DISTINCT message_id FROM deliveries WHERE destination = ? AND state = 'dead' ORDER BY message_id",
        (destination,))]


