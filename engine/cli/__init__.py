"""The ``hl7bridge`` command: thin commands over the library, in the manner of sqlite-utils.

Each command checks its input, raises ``Failure`` (a ``click.ClickException`` with an exit code
and a hint) or calls the library; no logic of its own. ``base`` holds the group and the options
written once (``--journal``, ``--config``, ``--json``); the commands are in ``serving`` (serve,
reload), ``send``, ``analyst`` (check, convert, test), ``delivery`` (outbox, replay) and
``journal``; ``clidoc`` writes docs/cli.md from their help.

May import every package (it is the top); nothing imports it.
"""

from __future__ import annotations

from . import analyst, delivery, journal, reconcile, send, serving  # noqa: F401 (each registers its commands)
from .base import EXIT_CONNECTION, EXIT_NOT_ACCEPTED, EXIT_OK, EXIT_USAGE, Failure, cli  # noqa: F401
from .journal import parse_since  # noqa: F401


def main():
    cli(prog_name="hl7bridge")
