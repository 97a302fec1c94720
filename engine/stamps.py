"""Stamps: how the engine names moments and things so that they can be reproduced exactly.

Journal timestamps (``iso``: ISO 8601 in UTC with microseconds, so text order is time order),
ACK control IDs that stay unique across restarts (``control_id_factory``), and stable resource and
event IDs derived from identifiers (``stable_id``: the same message always gives the same IDs).
Plain Python, imported by every package; it imports nothing of the engine.
"""

from __future__ import annotations

import itertools
import time
import uuid
from hashlib import sha1
from datetime import datetime, timezone
from typing import Callable


def utc_now() -> datetime:
    return datetime.now(timezone.utc)


def iso(moment: datetime) -> str:
    """Journal timestamps: ISO 8601 in UTC with microseconds, so text order is time order."""
    m = moment.astimezone(timezone.utc)
    return f"{m.year:04d}-{m.month:02d}-{m.day:02d}T{m.hour:02d}:{m.minute:02d}:{m.second:02d}.{m.microsecond:06d}Z"


def parse_iso(text: str) -> datetime:
    """A journal timestamp (or any ISO 8601 text ending in Z) back to an aware datetime."""
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def control_id_factory(prefix: str = "HB") -> Callable[[], str]:
    """Unique ACK control IDs across restarts: prefix, start time in base 36, a counter."""
    start = _base36(int(time.time() * 1000))
    counter = itertools.count(1)
    return lambda: f"{prefix}{start}{next(counter):06d}"


def _base36(number: int) -> str:
    digits = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"
    out = ""
    while number:
        number, rem = divmod(number, 36)
        out = digits[rem] + out
    return out or "0"


ID_NAMESPACE = uuid.UUID("6f1c2a4e-8d0b-4c55-9a7e-4b1d0c9e2f31")
_NAMESPACE_BYTES = ID_NAMESPACE.bytes


def stable_id(*parts: str) -> str:
    """A UUID derived from the parts: the same identifiers always give the same resource ID.

    ``str(uuid.uuid5(ID_NAMESPACE, "|".join(parts)))``, written out (RFC 4122 version 5: SHA-1 of
    the namespace and the name, version and variant bits set) without building a ``UUID``: a
    message's resources need a dozen or more of these. The IDs of the last few thousand names are
    remembered."""
    name = "|".join(parts)
    made = _MADE.get(name)
    if made is None:
        digest = bytearray(sha1(_NAMESPACE_BYTES + name.encode("utf-8")).digest()[:16])
        digest[6] = (digest[6] & 0x0F) | 0x50
        digest[8] = (digest[8] & 0x3F) | 0x80
        h = digest.hex()
        made = f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"
        if len(_MADE) >= _MADE_KEPT:
            _MADE.clear()
        _MADE[name] = made
    return made


_MADE: dict = {}  # name -> ID: staff, places and equipment come back in message after message
_MADE_KEPT = 4096


_AGO_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def parse_moment(value: str, now: datetime | None = None) -> str:
    """A moment as a user types it, as a journal timestamp: '2h', '30m', '7d', '2w', '45s' ago,
    or an ISO date/time (UTC when it has no offset). Raises ValueError with what to write."""
    from datetime import timedelta

    now = now or utc_now()
    value = (value or "").strip()
    if value and value[-1] in _AGO_UNITS and value[:-1].isdigit():
        return iso(now - timedelta(**{_AGO_UNITS[value[-1]]: int(value[:-1])}))
    try:
        moment = datetime.fromisoformat(value[:-1] + "+00:00" if value.endswith("Z") else value)
    except ValueError:
        raise ValueError(f"{value!r}: use 30m, 2h, 7d or an ISO time like 2026-11-24T06:00") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return iso(moment)
