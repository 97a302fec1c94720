"""The file destination's files: NDJSON that stays readable whatever moment the engine dies.

One file a day (``DIRECTORY/YYYY-MM-DD.ndjson``), one JSON record a line. Every record starts with
``{"delivery_id":N,"written_at":"..."`` so the two can be read without parsing the record, and all
the records of one delivery are written with one ``write()`` and fsynced before the delivery is
marked delivered (one fsync may cover several deliveries written meanwhile: ``GroupSync``). What can still happen is a SIGKILL (or a full disk) in the middle of that write:
the file then ends in a fragment with no newline. ``repair_tail`` cuts such a fragment off (with any
whole records of the same delivery just before it, so a delivery is in the file entirely or not at
all) and keeps the bytes aside in ``NAME.ndjson.torn``; it runs when a sender starts and before
every append, so the next record never lands on a fragment.

The other crash window is after the fsync and before the journal records the delivery: after a
restart that delivery is sent again. ``written_since`` finds whether its records already reached
the file, so the sender can skip writing them a second time.

Plain file I/O, no reactor: the file sender calls these from a worker thread.
"""

from __future__ import annotations

import json
import os
import re
import threading
from datetime import datetime, timezone
from pathlib import Path

import orjson

SUFFIX = ".ndjson"
TORN_SUFFIX = ".torn"
_PREFIX = re.compile(rb'^\{"delivery_id":(\d+),"written_at":"([^"]+)"')
_CHUNK = 65536


def file_for(directory: Path, moment: datetime) -> Path:
    """The day's file a record written at ``moment`` goes to (UTC date)."""
    return directory / f"{moment.astimezone(timezone.utc):%Y-%m-%d}{SUFFIX}"


def encode_records(delivery_id: int, written_at: datetime, records: list[dict]) -> bytes:
    """The bytes of one delivery's records: each on one line, delivery ID and time first."""
    stamp = written_at.astimezone(timezone.utc).isoformat().replace("+00:00", "Z")
    lines = []
    for record in records:
        body = orjson.dumps(record).decode()  # compact, characters as they are; ~6x the stdlib's speed
        head = f'{{"delivery_id":{int(delivery_id)},"written_at":"{stamp}"'
        lines.append(head + ("," + body[1:] if body != "{}" else "}") + "\n")
    return "".join(lines).encode("utf-8")


def _last_newline_before(handle, end: int) -> int:
    """Offset just after the last newline before ``end`` (0 when there is none)."""
    position = end
    while position > 0:
        step = min(_CHUNK, position)
        position -= step
        handle.seek(position)
        chunk = handle.read(step)
        index = chunk.rfind(b"\n")
        if index >= 0:
            return position + index + 1
    return 0


def repair_tail(path: Path) -> int:
    """Cut a torn last record off ``path`` and keep it in ``path.torn``; returns the bytes set aside.

    A file that ends with a newline (or is empty, or missing) is left alone and 0 is returned.
    Whole records of the torn record's delivery just before it are set aside too: they came from
    the same write, and the delivery will be written again in full.
    """
    try:
        handle = open(path, "r+b")
    except FileNotFoundError:
        return 0
    with handle:
        size = handle.seek(0, os.SEEK_END)
        if size == 0:
            return 0
        handle.seek(size - 1)
        if handle.read(1) == b"\n":
            return 0
        start = _last_newline_before(handle, size)
        handle.seek(start)
        fragment = handle.read(size - start)
        match = _PREFIX.match(fragment)
        if match is not None:
            # Whole lines of the same delivery before the fragment belong to the same write.
            while start > 0:
                previous = _last_newline_before(handle, start - 1)
                handle.seek(previous)
                line = handle.read(start - previous)
                found = _PREFIX.match(line)
                if found is None or found.group(1) != match.group(1):
                    break
                start = previous
        handle.seek(start)
        cut = handle.read(size - start)
        torn = path.with_name(path.name + TORN_SUFFIX)
        # The fragment is safe in the .torn file before it leaves the data file: a crash between
        # the two only means it is set aside twice.
        with open(torn, "ab") as aside:
            aside.write(cut + b"\n")
            aside.flush()
            os.fsync(aside.fileno())
        handle.truncate(start)
        handle.flush()
        os.fsync(handle.fileno())
    return len(cut)


def repair_directory(directory: Path) -> list[tuple[str, int]]:
    """``repair_tail`` on every day file of ``directory``: [(file name, bytes set aside)] for those repaired."""
    repaired = []
    if not directory.is_dir():
        return repaired
    for path in sorted(directory.glob(f"*{SUFFIX}")):
        cut = repair_tail(path)
        if cut:
            repaired.append((path.name, cut))
    return repaired


def append(path: Path, data: bytes):
    """Append ``data`` with as many ``write()`` calls as it takes, then fsync (the directory too
    when the file is new, so the file itself survives a power cut)."""
    end, new = write(path, data)
    sync(path, new)


def write(path: Path, data: bytes) -> tuple[int, bool]:
    """Append ``data`` with as many ``write()`` calls as it takes, without fsync; returns (the
    file's length after it, whether the file is new)."""
    new = not path.exists()
    descriptor = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
    try:
        view = memoryview(data)
        while view:
            written = os.write(descriptor, view)
            view = view[written:]
        return os.fstat(descriptor).st_size, new
    finally:
        os.close(descriptor)


def sync(path: Path, directory_too: bool = False) -> int:
    """fsync the file (and its directory, for a new file); returns the length it had when the
    fsync began, all of it on disk now."""
    descriptor = os.open(path, os.O_WRONLY | os.O_APPEND)
    try:
        size = os.fstat(descriptor).st_size
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
    if directory_too:
        directory = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
    return size


class GroupSync:
    """fsyncs shared by the writers of one destination (group commit for files).

    Records are appended under the destination's lock, then each writer waits here until its
    record is on disk: the writer that takes this lock fsyncs once for every record appended
    before that fsync, and those writers find their records already covered and return without
    an fsync of their own. A delivery still counts as delivered only once its record is on disk;
    with 4 deliveries in flight, one fsync (milliseconds on many disks) serves up to 4."""

    def __init__(self):
        self.lock = threading.Lock()
        self.durable: dict[Path, int] = {}  # file -> length known to be on disk
        self.new_files: set[Path] = set()  # created, their directory entry not yet fsynced

    def created(self, path: Path):
        with self.lock:
            self.new_files.add(path)

    def wait(self, path: Path, end: int) -> bool:
        """Return once the first ``end`` bytes of ``path`` are on disk; True when this call fsynced."""
        with self.lock:
            if self.durable.get(path, -1) >= end and path not in self.new_files:
                return False
            directory_too = path in self.new_files
            size = sync(path, directory_too)
            self.new_files.discard(path)
            if len(self.durable) > 8:  # yesterday's files are done with
                self.durable.clear()
            self.durable[path] = size
            return True


def _parse_time(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def _lines_backwards(path: Path):
    """The lines of a file, last first (each without its newline)."""
    with open(path, "rb") as handle:
        end = handle.seek(0, os.SEEK_END)
        rest = b""
        while end > 0:
            step = min(_CHUNK, end)
            end -= step
            handle.seek(end)
            block = handle.read(step) + rest
            lines = block.split(b"\n")
            rest = lines[0]
            for line in reversed(lines[1:]):
                if line:
                    yield line
        if rest:
            yield rest


def written_since(directory: Path, delivery_id: int, since: datetime) -> bool:
    """Whether a record of ``delivery_id`` was written at or after ``since``.

    Reads the day files from the newest back, each from its end, and stops at the first record
    older than ``since``: only what was written since the delivery was queued is read.
    """
    wanted = str(int(delivery_id)).encode()
    first_day = f"{since.astimezone(timezone.utc):%Y-%m-%d}{SUFFIX}"
    files = sorted((p for p in directory.glob(f"*{SUFFIX}") if p.name >= first_day), reverse=True)
    for path in files:
        for line in _lines_backwards(path):
            match = _PREFIX.match(line)
            if match is None:
                continue
            if _parse_time(match.group(2).decode()) < since:
                return False
            if match.group(1) == wanted:
                return True
    return False
