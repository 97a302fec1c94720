"""``hl7bridge test``: sample messages beside their expected FHIR output, compared with a readable diff.

A case is ``NAME.hl7`` with ``NAME.fhir.json`` beside it (the Bundle it must convert to). Analysts
keep such cases next to their routes and run them before a change goes live.

What in a Bundle depends on when and with what it is made, the Provenance's ``recorded`` and its
mapping version, is the message's own time (MSH-7) and ``test`` in these runs, so an expected file
stays right from day to day and a change to one mapping file fails only the cases it changes.
"""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from ..errors import ParseError
from ..hl7.er7 import Message
from . import pipeline
from .expr import DataError, read_dtm
from .project import Project

FIXED_TIME = datetime(2000, 1, 1, tzinfo=timezone.utc)  # for a message whose MSH-7 cannot be read
TEST_VERSION = "test"  # the mapping version written in regression runs

EXPECTED_SUFFIX = ".fhir.json"


@dataclass
class CaseResult:
    name: str
    passed: bool
    detail: str = ""  # the diff, or the conversion problems
    missing_expected: bool = False


def expected_path(sample: Path) -> Path:
    return sample.with_name(sample.stem + EXPECTED_SUFFIX)


def pretty(bundle) -> str:
    return json.dumps(bundle, indent=2, ensure_ascii=False, sort_keys=False) + "\n"


def message_time(message: Message) -> datetime:
    """When the message says it was made (MSH-7), as the conversion time of a regression run."""
    try:
        dtm = read_dtm(message.segments[0].field(7).split(message.seps.component)[0])
        return dtm.moment(timezone.utc) if dtm.has_time else FIXED_TIME
    except DataError:
        return FIXED_TIME


def run_case(project: Project, sample: Path, update: bool = False) -> CaseResult:
    try:
        message = pipeline.read(sample.read_bytes())
        converted = pipeline.convert(project, message, now=message_time(message), mapping_version=TEST_VERSION)
    except ParseError as exc:
        return CaseResult(sample.name, False, f"not an HL7 message: {exc}")
    expected_file = expected_path(sample)
    if not converted.ok:
        return CaseResult(sample.name, False, "\n".join(converted.problems))
    actual = pretty(converted.bundle)
    if update:
        expected_file.write_text(actual, encoding="utf-8")
        return CaseResult(sample.name, True, "written")
    if not expected_file.exists():
        return CaseResult(sample.name, False, f"no {expected_file.name} beside it (run with --update to write one)",
                          missing_expected=True)
    expected = pretty(json.loads(expected_file.read_text(encoding="utf-8")))
    if expected == actual:
        return CaseResult(sample.name, True)
    diff = difflib.unified_diff(expected.splitlines(), actual.splitlines(),
                                f"{expected_file.name} (expected)", f"{sample.name} (converted now)", lineterm="", n=2)
    return CaseResult(sample.name, False, "\n".join(diff))


def run_directory(project: Project, directory: Path, update: bool = False) -> list[CaseResult]:
    """Every ``*.hl7`` case in ``directory`` (one message each) whose expected output exists, or all with update."""
    results = []
    for sample in sorted(directory.glob("*.hl7")):
        if not update and not expected_path(sample).exists():
            continue
        results.append(run_case(project, sample, update))
    return results
