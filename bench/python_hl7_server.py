"""What a Python user writes by hand, for ``bench/ingest.py`` to compare hl7bridge against.

python-hl7's asyncio MLLP server (``hl7.mllp.start_hl7_server``) with the obvious handler: read a
message (``readmessage`` parses it with ``hl7.parse``), store it in SQLite, reply with
``message.create_ack()``. The store is as durable as hl7bridge's journal (WAL, synchronous=FULL,
committed before the ACK), but with one commit per message and the blocking SQLite call made on the
event loop, as the straightforward version of this program does.

Run by ``bench/ingest.py``; by hand: ``.venv/bin/python bench/python_hl7_server.py DB [PORT]``. It
prints ``python-hl7: ready on 127.0.0.1:PORT`` once listening and runs until SIGTERM or SIGINT.
"""

from __future__ import annotations

import asyncio
import signal
import sqlite3
import sys

import hl7
import hl7.mllp


def open_store(path: str) -> sqlite3.Connection:
    db = sqlite3.connect(path)
    db.execute("PRAGMA journal_mode = WAL")
    db.execute("PRAGMA synchronous = FULL")
    db.execute(
        "CREATE TABLE IF NOT EXISTS messages ("
        " id INTEGER PRIMARY KEY, received_at TEXT DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),"
        " sending_facility TEXT, control_id TEXT, message_type TEXT, raw TEXT NOT NULL)"
    )
    db.commit()
    return db


def handler(db: sqlite3.Connection):
    async def serve_connection(reader: hl7.mllp.HL7StreamReader, writer: hl7.mllp.HL7StreamWriter):
        try:
            while not writer.is_closing():
                try:
                    message = await reader.readmessage()
                except asyncio.IncompleteReadError:
                    break  # the peer closed between messages
                db.execute(
                    "INSERT INTO messages (sending_facility, control_id, message_type, raw) VALUES (?, ?, ?, ?)",
                    (str(message.segment("MSH")(4)), str(message.segment("MSH")(10)),
                     str(message.segment("MSH")(9)), str(message)),
                )
                db.commit()
                writer.writemessage(message.create_ack())
                await writer.drain()
        finally:
            writer.close()

    return serve_connection


async def main(argv: list[str]) -> int:
    db = open_store(argv[1])
    server = await hl7.mllp.start_hl7_server(
        handler(db), "127.0.0.1", int(argv[2]) if len(argv) > 2 else 0, limit=1024 * 1024
    )
    host, port = server.sockets[0].getsockname()[:2]
    print(f"python-hl7: ready on {host}:{port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    async with server:
        await stop.wait()
    db.close()
    return 0


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    sys.exit(asyncio.run(main(sys.argv)))
