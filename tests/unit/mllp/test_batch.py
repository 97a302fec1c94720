"""Splitting files into messages: plain, several, FHS/BHS batches, and malformed batches."""

import pytest

from conftest import EXAMPLES
from engine.mllp.batch import split_messages
from engine.errors import BatchError

M1 = b"MSH|^~\\&|A|B|C|D|1||SIU^S12|1|P|2.5"
M2 = b"MSH|^~\\&|A|B|C|D|1||SIU^S14|2|P|2.5"


def test_one_and_many_messages_with_any_line_endings():
    data = M1 + b"\nPID|1\n\n" + M2 + b"\r\nPID|2\r\n"
    found = split_messages(data)
    assert [(m.line, m.data) for m in found] == [(1, M1 + b"\rPID|1\r"), (4, M2 + b"\rPID|2\r")]


def test_keep_line_endings_returns_the_files_own_bytes():
    data = M1 + b"\nPID|1\n" + M2 + b"\r\nPID|2"
    assert [m.data for m in split_messages(data, keep_line_endings=True)] == [M1 + b"\nPID|1\n", M2 + b"\r\nPID|2"]


def test_batch_envelope_is_removed():
    found = split_messages((EXAMPLES / "batch_siu.hl7").read_bytes())
    assert len(found) == 3
    assert all(m.data.startswith(b"MSH|") and b"BTS" not in m.data and b"FHS" not in m.data for m in found)


@pytest.mark.parametrize(
    "data, line, text",
    [
        (b"PID|1\r" + M1, 1, "outside any message"),
        (b"BHS|^~\\&\r" + M1 + b"\rEVN|1\rBHS|^~\\&\rPID|1\rBTS|1", 4, "BHS inside a message"),
        (b"BHS|^~\\&\r" + M1 + b"\rBTS|2", 3, "BTS-1 message count says 2 but 1 found"),
        (b"BHS|^~\\&\r" + M1, None, "batch has no BTS"),
        (M1 + b"\rBTS|1", 2, "BTS without a BHS"),
        (M1 + b"\rFHS|^~\\&", 2, "FHS must be the first segment"),
        (b"FHS|^~\\&\rBHS|^~\\&\r" + M1 + b"\rBTS|1\rFTS|2", 5, "FTS-1 batch count says 2 but 1 found"),
        (b"BHS|^~\\&\r" + M1 + b"\rFTS|1", 3, "FTS before the batch's BTS"),
    ],
)
def test_malformed_batches_name_the_line(data, line, text):
    with pytest.raises(BatchError) as info:
        split_messages(data)
    assert text in str(info.value)
    assert info.value.line == line


def test_empty_file_has_no_messages():
    assert split_messages(b"\r\n\n") == []
