"""The HL7 v2 versions hl7bridge accepts: one list, used by ingest and by the standard's knowledge.

2.7.1 is a published version (a technical correction of 2.7) and real senders use it, so it is
accepted; hl7apy 1.3.5 has no definitions of its own for it, so field names and structural
validation read it as 2.7 (``reference_version``), the version it corrects.
"""

from __future__ import annotations

SUPPORTED_VERSIONS = ("2.1", "2.2", "2.3", "2.3.1", "2.4", "2.5", "2.5.1", "2.6", "2.7", "2.7.1", "2.8", "2.8.1",
                      "2.8.2")
# Versions hl7apy has no definitions for -> the version whose definitions they share.
REFERENCE_ALIASES = {"2.7.1": "2.7"}
DEFAULT_REFERENCE = "2.5"
# The version a minimal reject claims when the inbound message has no readable MSH.
FALLBACK_VERSION = "2.5.1"


def reference_version(version: str) -> str:
    """The version whose definitions describe ``version`` (2.5 for anything not supported)."""
    if version not in SUPPORTED_VERSIONS:
        return DEFAULT_REFERENCE
    return REFERENCE_ALIASES.get(version, version)


def version_tuple(version: str) -> tuple[int, ...]:
    """'2.5.1' -> (2, 5, 1); anything unreadable sorts as the fallback version."""
    try:
        return tuple(int(part) for part in version.split("."))
    except ValueError:
        return version_tuple(FALLBACK_VERSION)
