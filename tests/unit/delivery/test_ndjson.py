"""The file destination's NDJSON files: torn tails, records written once. Plain files, no reactor."""

import json
from datetime import datetime, timedelta, timezone
from pathlib import Path

from engine.delivery import ndjson
from engine.delivery.destinations import Destination
from engine.delivery.outbox import OK, Delivery
from engine.stamps import iso
from engine.delivery.senders import FileSender

T0 = datetime(2026, 11, 28, 10, 0, 0, tzinfo=timezone.utc)


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_records_start_with_delivery_id_and_time():
    data = ndjson.encode_records(7, T0, [{"message_id": 3, "bundle": {"resourceType": "Bundle"}}, {"event": "x"}])
    first, second = data.decode().splitlines()
    assert first.startswith('{"delivery_id":7,"written_at":"2026-11-28T10:00:00Z","message_id":3,')
    assert json.loads(second) == {"delivery_id": 7, "written_at": "2026-11-28T10:00:00Z", "event": "x"}


def test_a_torn_tail_is_set_aside_and_the_file_ends_clean(tmp_path):
    # The reproduction: a record cut at a page boundary, no newline after it.
    path = tmp_path / "2026-11-28.ndjson"
    whole = ndjson.encode_records(40, T0, [{"message_id": 40, "bundle": {}}])
    torn = b'{"message_id":41,"control_id":"TORN41","bundle":{"resourceType":"Bun'
    path.write_bytes(whole + torn)
    assert ndjson.repair_tail(path) == len(torn)
    assert path.read_bytes() == whole
    assert (tmp_path / "2026-11-28.ndjson.torn").read_bytes() == torn + b"\n"
    # The next record lands on a clean line: both lines parse.
    ndjson.append(path, ndjson.encode_records(42, T0, [{"message_id": 42, "bundle": {}}]))
    assert [r["delivery_id"] for r in lines(path)] == [40, 42]


def test_whole_records_of_the_torn_delivery_go_with_it(tmp_path):
    # A finance delivery writes several events in one write: if it is torn after the first event,
    # the first goes too, so the retry does not write it twice.
    path = tmp_path / "2026-11-28.ndjson"
    before = ndjson.encode_records(1, T0, [{"event": "charge"}])
    same_write = ndjson.encode_records(2, T0, [{"event": "a"}, {"event": "b"}, {"event": "c"}])
    cut = len(before) + len(same_write) - 10
    path.write_bytes((before + same_write)[:cut])
    assert ndjson.repair_tail(path) == cut - len(before)
    assert path.read_bytes() == before


def test_a_clean_empty_or_missing_file_is_left_alone(tmp_path):
    clean = tmp_path / "a.ndjson"
    clean.write_bytes(ndjson.encode_records(1, T0, [{}]))
    empty = tmp_path / "b.ndjson"
    empty.write_bytes(b"")
    assert [ndjson.repair_tail(p) for p in (clean, empty, tmp_path / "c.ndjson")] == [0, 0, 0]
    assert not list(tmp_path.glob("*.torn"))


def test_a_fragment_too_short_to_name_its_delivery_is_still_cut(tmp_path):
    path = tmp_path / "x.ndjson"
    whole = ndjson.encode_records(1, T0, [{}])
    path.write_bytes(whole + b'{"deli')
    assert ndjson.repair_tail(path) == 6
    assert path.read_bytes() == whole


def test_repair_directory_reports_each_repaired_file(tmp_path):
    (tmp_path / "2026-11-27.ndjson").write_bytes(b'{"delivery_id":1,"written_at":"2026-11-27T23:59:59Z"}\n{"del')
    (tmp_path / "2026-11-28.ndjson").write_bytes(b'{"delivery_id":2,"written_at":"2026-11-28T00:00:01Z"}\n')
    assert ndjson.repair_directory(tmp_path) == [("2026-11-27.ndjson", 5)]


def test_written_since_reads_back_only_to_the_queueing_time(tmp_path):
    day1 = tmp_path / "2026-11-27.ndjson"
    day2 = tmp_path / "2026-11-28.ndjson"
    ndjson.append(day1, ndjson.encode_records(5, T0 - timedelta(hours=11), [{}]))
    ndjson.append(day2, ndjson.encode_records(6, T0, [{}]) + ndjson.encode_records(7, T0 + timedelta(seconds=1), [{}]))
    assert ndjson.written_since(tmp_path, 7, T0)
    assert ndjson.written_since(tmp_path, 6, T0)
    assert not ndjson.written_since(tmp_path, 6, T0 + timedelta(milliseconds=1))  # written before it was queued
    assert ndjson.written_since(tmp_path, 5, T0 - timedelta(hours=12))  # yesterday's file
    assert not ndjson.written_since(tmp_path, 5, T0 - timedelta(minutes=1))
    assert not ndjson.written_since(tmp_path, 99, T0 - timedelta(days=3))


def delivery(id_, attempts=0, resumed=False, created=T0, message_id=1):
    bundle = json.dumps({"resourceType": "Bundle", "type": "transaction", "entry": []})
    return Delivery(id_, message_id, "files", "message:1", "pending", attempts, iso(created), "NC1", bundle,
                    resumed=resumed)


def file_sender(tmp_path, now):
    destination = Destination(name="files", type="file", path="x.yaml", directory=tmp_path / "out")
    return FileSender(destination, run_blocking=None, clock=lambda: now[0])


def test_file_sender_writes_a_resumed_delivery_once(tmp_path):
    now = [T0 + timedelta(seconds=2)]
    sender = file_sender(tmp_path, now)
    assert sender.write(delivery(1)).outcome == OK
    # The engine died after the fsync, before the journal said delivered: it is resumed.
    result = sender.write(delivery(1, resumed=True))
    assert result.outcome == OK and "not written again" in result.response
    assert sender.counters["already_written"] == 1
    # A retried delivery whose first write failed before reaching the file is written.
    assert sender.write(delivery(2, attempts=1)).outcome == OK
    # A replay queues the delivery anew (created_at moves on): written again, on purpose.
    now[0] = T0 + timedelta(minutes=5)
    assert sender.write(delivery(1, attempts=1, created=T0 + timedelta(minutes=4))).outcome == OK
    records = lines(tmp_path / "out" / "2026-11-28.ndjson")
    assert [r["delivery_id"] for r in records] == [1, 2, 1]
    assert records[0]["control_id"] == "NC1" and records[0]["bundle"]["resourceType"] == "Bundle"


def test_file_sender_sets_a_torn_tail_aside_before_appending(tmp_path):
    now = [T0]
    sender = file_sender(tmp_path, now)
    out = tmp_path / "out"
    out.mkdir()
    (out / "2026-11-28.ndjson").write_bytes(b'{"delivery_id":41,"written_at":"2026-11-28T09:59:59Z","bundle":{"resou')
    fragment = (out / "2026-11-28.ndjson").read_bytes()
    assert sender.start() == [("2026-11-28.ndjson", len(fragment))]
    (out / "2026-11-28.ndjson").write_bytes(b'{"delivery_id":43,"written_at":"2026-11-28T09:59:59Z","bun')
    result = sender.write(delivery(44))
    assert result.outcome == OK and "set aside in 2026-11-28.ndjson.torn" in result.notice
    assert [r["delivery_id"] for r in lines(out / "2026-11-28.ndjson")] == [44]
    assert sender.counters["torn_records_set_aside"] == 2
    assert (out / "2026-11-28.ndjson.torn").read_bytes().count(b"\n") == 2


def test_one_fsync_covers_the_records_appended_before_it(tmp_path):
    """Group commit for files: two deliveries appended, the first to wait fsyncs once and the
    second finds its record already on disk; a record appended after that fsync needs its own."""
    syncs = ndjson.GroupSync()
    path = tmp_path / "2026-11-29.ndjson"
    end_a, new = ndjson.write(path, ndjson.encode_records(1, T0, [{"n": 1}]))
    assert new
    syncs.created(path)
    end_b, new = ndjson.write(path, ndjson.encode_records(2, T0, [{"n": 2}]))
    assert not new and end_b > end_a
    assert syncs.wait(path, end_a) is True  # fsynced the file and, as it is new, its directory
    assert path not in syncs.new_files and syncs.durable[path] == end_b
    assert syncs.wait(path, end_b) is False  # already covered
    end_c, _ = ndjson.write(path, ndjson.encode_records(3, T0, [{"n": 3}]))
    assert syncs.wait(path, end_c) is True
    assert [json.loads(line)["delivery_id"] for line in path.read_text().splitlines()] == [1, 2, 3]
