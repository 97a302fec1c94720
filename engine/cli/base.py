"""What every command shares: the group, exit codes, the error type and the options written once.

Exit codes mean the same everywhere:
  0  everything asked for was done (every message sent was accepted)
  1  the command ran but something was not accepted or not found
  2  bad usage or a bad input file (click's own usage errors are 2 as well)
  3  a connection or I/O failure (the engine is not reachable, the journal cannot be opened)
"""

from __future__ import annotations

import os
from pathlib import Path

import click

from .. import __version__
from ..errors import ConfigError

EXIT_OK, EXIT_NOT_ACCEPTED, EXIT_USAGE, EXIT_CONNECTION = 0, 1, 2, 3
CONTEXT = {"help_option_names": ["-h", "--help"]}
DEFAULT_JOURNAL = "var/journal.db"


class Failure(click.ClickException):
    """An error with an exit code of our choosing."""

    def __init__(self, message, exit_code=EXIT_USAGE):
        super().__init__(message)
        self.exit_code = exit_code


def json_option(fn):
    return click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts instead of text.")(fn)


def journal_option(fn=None, *, default=DEFAULT_JOURNAL, help="Journal file."):
    """``--journal PATH``, for every command that opens a journal (serve has no default: its
    settings say)."""

    def decorate(command):
        return click.option("--journal", "journal_path", default=default, show_default=default is not None,
                            type=click.Path(dir_okay=False), help=help)(command)

    return decorate(fn) if fn is not None else decorate


def config_option(help="Directory with routes/ and mappings/ (default: this one, else the shipped ones)."):
    """``--config DIR``: where routes/, mappings/ and destinations/ (and hl7bridge.yaml) are."""
    return click.option("--config", "config_dir", type=click.Path(file_okay=False, path_type=Path), help=help)


@click.group(context_settings=CONTEXT)
@click.version_option(__version__, prog_name="hl7bridge")
def cli():
    """hl7bridge: HL7 v2 (MLLP) in, SQLite journal, FHIR and ERP out.

    Example: hl7bridge serve
    """


def login_name() -> str:
    """Who runs the command, for the record: $USER, else $LOGNAME, else the account of the user ID
    (a container or cron job often has no $USER), else "uid N"."""
    for variable in ("USER", "LOGNAME"):
        if os.environ.get(variable, "").strip():
            return os.environ[variable].strip()
    try:
        import pwd

        return pwd.getpwuid(os.getuid()).pw_name
    except (ImportError, KeyError):
        return f"uid {os.getuid()}"


def open_journal(path):
    from ..store import open_journal as open_store

    try:
        return open_store(path, create=False)
    except (FileNotFoundError, OSError) as exc:
        raise Failure(f"cannot open journal {path}: {exc}", EXIT_CONNECTION) from None


def load_project(config_dir):
    from ..transform.project import Project

    try:
        return Project.load(config_dir)
    except ConfigError as exc:
        raise Failure(str(exc), EXIT_NOT_ACCEPTED) from None
