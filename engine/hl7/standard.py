"""What the HL7 v2 standard says, from hl7apy: field names, data types, tables, and validation.

The split (measured here with ``bench/reader.py``): our ER7 reader parses and indexes a 3.5 KB
SIU^S12 in about 50 microseconds; hl7apy's ``parse_message(find_groups=True)`` takes about 48 ms
and drops segments it does not expect. So the hot path (ingest, routing, mapping) reads with
``engine.hl7.er7``, and hl7apy is used where its knowledge of the standard pays and speed does not
matter: naming fields for people (``journal show``), and structural validation for the routes and
tools that ask for it.
"""

from __future__ import annotations

import os
import re
import tempfile
from dataclasses import dataclass, field
from functools import lru_cache

from hl7apy import load_reference
from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.exceptions import HL7apyException
from hl7apy.parser import parse_message
from hl7apy.validation import Validator

from .er7 import split_segments
from .versions import DEFAULT_REFERENCE as DEFAULT_VERSION
from .versions import REFERENCE_ALIASES, reference_version


@dataclass(frozen=True)
class FieldInfo:
    """One field of a segment as the standard defines it."""

    number: int
    name: str  # "Patient Identifier List"
    datatype: str  # "CX"
    table: str | None  # "HL70203"
    required: bool
    repeats: bool


def _title(constant: str, segment: str) -> str:
    """PATIENT_IDENTIFIER_LIST -> Patient Identifier List; SET_ID_PID -> Set ID PID."""
    return " ".join(word if word in ("ID", segment) else word.capitalize() for word in constant.split("_"))


@lru_cache(maxsize=512)
def segment_fields(segment: str, version: str = DEFAULT_VERSION) -> tuple[FieldInfo, ...]:
    """The fields of ``segment`` in ``version`` (empty for Z-segments and unknown segments)."""
    try:
        reference = load_reference(segment, "Segment", reference_version(version))
    except (HL7apyException, KeyError, ValueError):
        return ()
    fields = []
    for child_name, child, (minimum, maximum), _kind in reference[1]:
        number = int(child_name.rsplit("_", 1)[1])
        fields.append(
            FieldInfo(
                number=number,
                name=_title(child[3] or child_name, segment),
                datatype=child[2] or "",
                table=child[4],
                required=minimum > 0,
                repeats=maximum == -1 or maximum > 1,
            )
        )
    return tuple(fields)


def field_info(segment: str, number: int, version: str = DEFAULT_VERSION) -> FieldInfo | None:
    """The standard's definition of ``SEGMENT-number``, or None when it has none."""
    if segment == "MSH" and number in (1, 2):
        names = {1: "Field Separator", 2: "Encoding Characters"}
        return FieldInfo(number, names[number], "ST", None, True, False)
    for info in segment_fields(segment, version):
        if info.number == number:
            return info
    return None


@dataclass
class ValidationReport:
    """hl7apy's structural validation: errors break the standard, warnings are table misses."""

    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def valid(self) -> bool:
        return not self.errors


def validate(text: str) -> ValidationReport:
    """Validate a message's structure against its version (MSH-12) with hl7apy.

    Slow (tens of milliseconds): for routes that ask for it and for tools, not for every message.
    """
    normalized = "\r".join(_as_reference_version(split_segments(text)))
    report = ValidationReport()
    try:
        message = parse_message(normalized, find_groups=True, validation_level=VALIDATION_LEVEL.TOLERANT)
    except HL7apyException as exc:
        report.errors.append(f"cannot be read against the standard: {exc}")
        return report
    handle, report_path = tempfile.mkstemp(prefix="hl7bridge-validation-", suffix=".txt")
    os.close(handle)
    try:
        try:
            Validator.validate(message, report_file=report_path)
        except HL7apyException:
            pass  # the report file holds every problem found
        with open(report_path, encoding="utf-8") as report_file:
            for line in report_file:
                kind, _, text_ = line.strip().partition(": ")
                if kind == "Error":
                    report.errors.append(_in_words(text_))
                elif kind == "Warning":
                    report.warnings.append(_in_words(text_))
    finally:
        os.unlink(report_path)
    return report


_ELEMENT = re.compile(r"<\w+ ([A-Z][A-Z0-9]{2})_(\d+)(?:_(\d+))? \(([^)]*)\) of type \w+>")


def _in_words(text: str) -> str:
    """hl7apy's texts name elements as Python objects (``<Field MSH_9 (MESSAGE_TYPE) of type
    CM_MSG>``) and list children as ``[None]``: say them as HL7 paths and words."""
    text = _ELEMENT.sub(lambda m: f"{m.group(1)}-{m.group(2)}{'.' + m.group(3) if m.group(3) else ''} "
                                  f"({m.group(4).replace('_', ' ').lower()})", text)
    return text.replace(": [None]", ": a component the standard does not define there")


def _as_reference_version(segments: list[str]) -> list[str]:
    """The segments with MSH-12 replaced by the version hl7apy knows it as (2.7.1 is read as 2.7)."""
    if not segments or not segments[0].startswith("MSH") or len(segments[0]) < 4:
        return segments
    separator = segments[0][3]
    fields = segments[0].split(separator)
    if len(fields) > 11:
        version, component_separator, rest = fields[11].partition(fields[1][:1] or "^")
        if version in REFERENCE_ALIASES:
            fields[11] = REFERENCE_ALIASES[version] + component_separator + rest
            return [separator.join(fields), *segments[1:]]
    return segments
