"""The engine's error hierarchy.

Each error carries what an operator needs to act on it: the message control ID, the HL7 location,
the file and line of a bad configuration. Messages never include patient data, so they are safe to log.
"""


class Hl7BridgeError(Exception):
    """Base class for every error the engine raises on purpose."""


class FramingError(Hl7BridgeError):
    """A byte stream violated MLLP framing (for example an unterminated or oversized frame)."""


class ParseError(Hl7BridgeError):
    """A frame could not be read as HL7 v2 ER7.

    ``location`` is an HL7 path such as ``MSH-9`` or a segment position such as ``segment 3``.
    """

    def __init__(self, message, location=None):
        super().__init__(message)
        self.location = location


class BatchError(Hl7BridgeError):
    """A file that holds FHS/BHS batches is not well formed."""

    def __init__(self, message, line=None):
        super().__init__(f"line {line}: {message}" if line else message)
        self.line = line


class ConfigError(Hl7BridgeError):
    """A configuration file is invalid; the text names the file, the line and what to fix."""

    def __init__(self, message, path=None, line=None, hint=None):
        self.path = path
        self.line = line
        self.hint = hint
        where = ""
        if path:
            where = f"{path}:{line}: " if line else f"{path}: "
        text = where + message
        if hint:
            text += f" ({hint})"
        super().__init__(text)


class PathError(Hl7BridgeError):
    """An HL7 path expression such as ``PID-3[2].1`` is not valid."""
