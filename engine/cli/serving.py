"""``hl7bridge serve`` and ``hl7bridge reload``: running the engine."""

from __future__ import annotations

import sys

import click

from ..errors import ConfigError
from .base import CONTEXT, EXIT_CONNECTION, EXIT_USAGE, Failure, cli, config_option, journal_option


@cli.command(context_settings=CONTEXT)
@click.option("--listen", "listen", multiple=True, metavar="ENDPOINT",
              help="Twisted endpoint to listen on, repeatable (default tcp:2575:interface=127.0.0.1). "
                   "TLS: ssl:PORT:privateKey=KEY:certKey=CERT.")
@config_option(help="Directory with hl7bridge.yaml, routes/ and mappings/ (default: embedded defaults).")
@journal_option(default=None, help="Journal file (default var/journal.db).")
@click.option("--log-level", type=click.Choice(["debug", "info", "warn", "error"]), help="Log level (default info).")
@click.option("--metrics", "metrics_endpoint", metavar="ENDPOINT",
              help="Where /metrics, /healthz and /readyz listen (default tcp:9102:interface=127.0.0.1), or 'off'.")
def serve(listen, config_dir, journal_path, log_level, metrics_endpoint):
    """Run the engine: listen for MLLP, journal every message, ACK after the commit.

    Example: hl7bridge serve --listen tcp:2575:interface=127.0.0.1 --journal var/journal.db
    """
    from dataclasses import replace

    from ..config import load_settings, with_overrides
    from ..transform.project import Project
    from ..serve import run

    try:
        settings = with_overrides(load_settings(config_dir), listen, journal_path)
        project = Project.load(settings.config_dir)
    except ConfigError as exc:
        raise Failure(str(exc), EXIT_USAGE) from None
    if log_level:
        settings = replace(settings, log_level=log_level)
    if metrics_endpoint:
        settings = replace(settings, metrics_endpoint=None if metrics_endpoint == "off" else metrics_endpoint)
    sys.exit(run(settings, project))


@cli.command(context_settings=CONTEXT)
@journal_option(help="The journal of the engine to reload.")
def reload(journal_path):
    """Ask the running engine to load its routes and mappings again (SIGHUP), without a restart.

    A file that fails to load leaves the running configuration in place; the engine's log says
    which file and line. Run 'hl7bridge check' first to see problems before they reach the engine.

    Example: hl7bridge reload --journal var/journal.db
    """
    import os
    import signal

    from ..serve import pid_file

    path = pid_file(journal_path)
    try:
        pid = int(path.read_text().strip())
        os.kill(pid, signal.SIGHUP)
    except (OSError, ValueError):
        raise Failure(f"no running engine for {journal_path} (no usable {path})", EXIT_CONNECTION) from None
    click.echo(f"reload signalled to the engine (pid {pid}); its log says whether the new files took")
