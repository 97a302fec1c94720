"""YAML loading that remembers line numbers, and small checkers that report file, line and a fix.

Every configuration file (engine settings now, routes and mappings later) is read through here so
that a mistake is always reported as ``file:line: what is wrong (how to fix it)`` and unknown keys
are rejected instead of silently ignored.
"""

from __future__ import annotations

import difflib
import os
import re
from pathlib import Path

import yaml

from .errors import ConfigError


class MarkedDict(dict):
    """A mapping that knows the line it starts on and the line of each key."""

    line: int = 0
    key_lines: dict

    def line_of(self, key) -> int:
        return self.key_lines.get(key, self.line)


class MarkedList(list):
    line: int = 0


class Quoted(str):
    """A text value that was quoted in the file ('...' or "..."): mappings take it as it is."""


class _Loader(yaml.SafeLoader):
    pass


class _QuotingLoader(_Loader):
    """Keeps whether each text value was quoted (``Quoted``), for mapping templates."""


class _DuplicateKey(Exception):
    def __init__(self, key, line):
        self.key, self.line = key, line


def _construct_mapping(loader, node):
    loader.flatten_mapping(node)
    result = MarkedDict()
    result.line = node.start_mark.line + 1
    result.key_lines = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        if key in result:
            raise _DuplicateKey(key, key_node.start_mark.line + 1)
        result[key] = loader.construct_object(value_node, deep=True)
        result.key_lines[key] = key_node.start_mark.line + 1
    return result


def _construct_sequence(loader, node):
    result = MarkedList(loader.construct_object(child, deep=True) for child in node.value)
    result.line = node.start_mark.line + 1
    return result


def _construct_text(loader, node):
    value = loader.construct_scalar(node)
    return Quoted(value) if node.style in ("'", '"') else value


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)
_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_SEQUENCE_TAG, _construct_sequence)
_QuotingLoader.add_constructor("tag:yaml.org,2002:str", _construct_text)


def load_yaml(path: str | Path, keep_quotes: bool = False):
    """Load one YAML file; syntax errors become ``ConfigError`` with the file and line.

    With ``keep_quotes`` a text value that was quoted in the file comes back as ``Quoted``."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read the file: {exc.strerror}", path) from None
    try:
        return yaml.load(text, Loader=_QuotingLoader if keep_quotes else _Loader)
    except _DuplicateKey as exc:
        raise ConfigError(f"key {exc.key!r} appears twice", path, exc.line, "keep one of them") from None
    except yaml.MarkedYAMLError as exc:
        line = exc.problem_mark.line + 1 if exc.problem_mark else None
        raise ConfigError(f"YAML syntax error: {exc.problem}", path, line, "check indentation and quoting") from None


class Section:
    """Checks one mapping of a config file against the keys it may have.

    ``Section(data, path, "listener", allowed={...})`` rejects unknown keys (suggesting the
    closest known one), and its getters check types and report the line of the bad value.
    """

    def __init__(self, data, path, what: str, allowed: set[str], line: int = 0):
        if data is None:
            data = MarkedDict()
            data.line, data.key_lines = line, {}
        if not isinstance(data, dict):
            raise ConfigError(f"{what} must be a mapping of keys to values", path, getattr(data, "line", line))
        self.data, self.path, self.what = data, path, what
        for key in data:
            if key not in allowed:
                close = difflib.get_close_matches(str(key), sorted(allowed), n=1)
                close = close or [k for k in sorted(allowed) if k.startswith(str(key)) or str(key).startswith(k)][:1]
                hint = f"did you mean {close[0]!r}?" if close else f"known keys: {', '.join(sorted(allowed))}"
                raise ConfigError(f"unknown key {key!r} in {what}", path, self.line(key), hint)

    def line(self, key=None) -> int:
        data = self.data
        return data.line_of(key) if isinstance(data, MarkedDict) else 0

    def error(self, key, message, hint=None) -> ConfigError:
        return ConfigError(f"{self.what}.{key}: {message}", self.path, self.line(key), hint)

    def get(self, key, kind, default, hint=None):
        if key not in self.data or self.data[key] is None:
            return default
        value = self.data[key]
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            expected = {str: "text", int: "a whole number", float: "a number", bool: "true or false",
                        list: "a list", dict: "a mapping"}.get(kind, kind.__name__)
            raise self.error(key, f"must be {expected}, not {value!r}", hint)
        return value

    def positive(self, key, kind, default):
        value = self.get(key, kind, default)
        if value <= 0:
            raise self.error(key, f"must be greater than 0, not {value}")
        return value

    def choice(self, key, choices, default):
        value = self.get(key, str, default)
        if value not in choices:
            raise self.error(key, f"{value!r} is not one of {', '.join(choices)}")
        return value

    def strings(self, key, default):
        value = self.get(key, list, default)
        for item in value:
            if not isinstance(item, (str, int, float)) or isinstance(item, bool):
                raise self.error(key, f"items must be text, not {item!r}")
        return [str(item) for item in value]


_DURATION = re.compile(r"^(\d+(?:\.\d+)?)(ms|s|m|h|d)?$")


def seconds(text, what: str) -> float:
    """'500ms', '2s', '10m', '24h', '7d' (or a number of seconds) in seconds."""
    match = _DURATION.match(str(text).strip())
    if not match:
        raise ValueError(f"{what}: {text!r} is not a duration; write 500ms, 2s, 10m, 24h or 7d")
    factor = {"ms": 0.001, "s": 1, None: 1, "m": 60, "h": 3600, "d": 86400}[match.group(2)]
    return float(match.group(1)) * factor


# An age of data to delete (retention, ``journal prune``): the unit is required, because a slip
# costs messages. A month is 30 days and a year 365 (the cutoff date is shown before pruning).
AGE_UNITS = {"s": 1, "min": 60, "h": 3600, "d": 86400, "w": 7 * 86400, "mo": 30 * 86400, "y": 365 * 86400}
_AGE = re.compile(r"^(\d+(?:\.\d+)?)\s*([a-z]*)$")


def age(text, what: str) -> float:
    """'90d', '12h', '6mo', '1y', '2w', '30min' in seconds; a bare number or 'm' is refused."""
    match = _AGE.match(str(text).strip().lower())
    units = "30min, 12h, 90d, 2w, 6mo or 1y"
    if not match:
        raise ValueError(f"{what}: {text!r} is not an age; write {units}")
    number, unit = match.groups()
    if not unit:
        raise ValueError(f"{what}: {text!r} has no unit; write {number}d for days ({units})")
    if unit == "m":
        raise ValueError(f"{what}: {text!r} is ambiguous; write {number}min for minutes or {number}mo for months")
    if unit not in AGE_UNITS:
        raise ValueError(f"{what}: unknown unit {unit!r} in {text!r}; write {units}")
    return float(number) * AGE_UNITS[unit]


_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def expand_env(value, section: "Section", key: str):
    """``${NAME}`` in a text value read from the environment; a missing variable is refused by name."""
    if not isinstance(value, str):
        return value

    def replace(match):
        name = match.group(1)
        if name not in os.environ:
            raise section.error(key, f"environment variable {name} is not set", f"export {name}=... before starting")
        return os.environ[name]

    return _ENV.sub(replace, value)
