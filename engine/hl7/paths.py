"""HL7 path syntax, used everywhere a value is named: routes, mappings, the journal and the CLI.

    SEG[occurrence]-FIELD[repetition].COMPONENT.SUBCOMPONENT

``PID-3`` is the first repetition of PID-3 in the first PID; ``PID-3[2].1`` the first component
of its second repetition; ``FT1[2]-11.1`` a component of the second FT1; ``[*]`` selects every
occurrence or repetition (``FT1[*]-2``, ``PID-3[*].1``); a bare ``NTE[*]`` selects whole segments.
Indexes are 1-based, as in the standard. A path that stops at a field gives the whole field,
components and all (``MSH-9`` is ``SIU^S12^SIU_S12``); name the component to get one (``MSH-9.1``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

from ..errors import PathError

_PATH = re.compile(
    r"""^(?P<segment>[A-Z][A-Z0-9]{2})
        (?:\[(?P<segment_index>\d+|\*)\])?
        (?:-(?P<field>\d+)
           (?:\[(?P<repetition>\d+|\*)\])?
           (?:\.(?P<component>\d+)
              (?:\.(?P<subcomponent>\d+))?
           )?
        )?$""",
    re.VERBOSE,
)


@dataclass(frozen=True)
class Path:
    """A parsed HL7 path. ``None`` means "not given"; ``every_*`` means ``[*]``."""

    segment: str
    segment_index: int | None = None
    every_segment: bool = False
    field: int | None = None
    repetition: int | None = None
    every_repetition: bool = False
    component: int | None = None
    subcomponent: int | None = None

    def __str__(self):
        text = self.segment
        if self.every_segment:
            text += "[*]"
        elif self.segment_index is not None:
            text += f"[{self.segment_index}]"
        if self.field is None:
            return text
        text += f"-{self.field}"
        if self.every_repetition:
            text += "[*]"
        elif self.repetition is not None:
            text += f"[{self.repetition}]"
        if self.component is not None:
            text += f".{self.component}"
            if self.subcomponent is not None:
                text += f".{self.subcomponent}"
        return text


@lru_cache(maxsize=4096)
def parse_path(text: str) -> Path:
    """Parse ``PID-3[2].1`` into a ``Path``; raises ``PathError`` with a hint when it is not one."""
    match = _PATH.match(text.strip())
    if not match:
        raise PathError(
            f"{text!r} is not an HL7 path; write it as SEG-FIELD[REPETITION].COMPONENT.SUBCOMPONENT, "
            "for example PID-3[2].1 or FT1[*]-2"
        )
    g = match.groupdict()

    def index(value):
        if value is None or value == "*":
            return None
        number = int(value)
        if number < 1:
            raise PathError(f"{text!r}: indexes start at 1")
        return number

    path = Path(
        segment=g["segment"],
        segment_index=index(g["segment_index"]),
        every_segment=g["segment_index"] == "*",
        field=index(g["field"]),
        repetition=index(g["repetition"]),
        every_repetition=g["repetition"] == "*",
        component=index(g["component"]),
        subcomponent=index(g["subcomponent"]),
    )
    return path
