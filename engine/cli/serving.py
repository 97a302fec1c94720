"""``hl7bridge serve`` and ``hl7bridge reload``: running the engine."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from ..errors import ConfigError
from .base import (CONTEXT, EXIT_CONNECTION, EXIT_NOT_ACCEPTED, EXIT_USAGE, Failure, cli, config_option, journal_option,
                   json_option)


@cli.command(context_settings=CONTEXT)
@click.option("--listen", "listen", multiple=True, metavar="ENDPOINT",
              help="Twisted endpoint to listen on, repeatable (default tcp:2575:interface=127.0.0.1). "
                   "TLS: ssl:PORT:privateKey=KEY:certKey=CERT.")
@config_option(help="Directory with hl7bridge.yaml, routes/, mappings/ and destinations/ (default: the current "
                    "directory). Settings it leaves out have their defaults; a directory without routes/ and "
                    "mappings/ runs the shipped ones. Serve prints which it uses.")
@journal_option(default=None, help="Journal file (default var/journal.db).")
@click.option("--log-level", type=click.Choice(["debug", "info", "warn", "error"]), help="Log level (default info).")
@click.option("--metrics", "metrics_endpoint", metavar="ENDPOINT",
              help="Where /metrics, /healthz and /readyz listen (default tcp:9102:interface=127.0.0.1), or 'off'.")
@click.option("--node", metavar="NAME",
              help="This engine's name in a cluster, unique among the nodes (default: cluster.node, else the host name).")
def serve(listen, config_dir, journal_path, log_level, metrics_endpoint, node):
    """Run the engine: listen for MLLP, journal every message, ACK after the commit.

    Everything is read from one directory, --config DIR or the current one: hl7bridge.yaml (the
    engine's settings: listeners, journal, metrics, dashboard...), and routes/, mappings/ and
    destinations/. When DIR has no routes/ and no mappings/, the shipped ones are used (never
    those of the directory serve runs in). The first lines printed say what was read from where.

    Example: hl7bridge serve --config examples --listen tcp:2575:interface=127.0.0.1
    """
    from dataclasses import replace

    from ..config import CONFIG_FILE, load_settings, with_overrides
    from ..transform.project import Project, has_routes
    from ..serve import run

    directory = config_dir if config_dir is not None else Path(".")
    try:
        settings = with_overrides(load_settings(directory), listen, journal_path, node)
        project = Project.load(settings.config_dir)
    except ConfigError as exc:
        raise Failure(str(exc), EXIT_USAGE) from None
    if log_level:
        settings = replace(settings, log_level=log_level)
    if metrics_endpoint:
        settings = replace(settings, metrics_endpoint=None if metrics_endpoint == "off" else metrics_endpoint)
    if settings.dashboard is not None and settings.metrics_endpoint is None:
        raise Failure("the dashboard is served on the metrics endpoint, which is off (--metrics off or "
                      "metrics.enabled: false): turn it on, or leave dashboard out of hl7bridge.yaml", EXIT_USAGE)
    settings_file = directory / CONFIG_FILE
    click.echo(f"hl7bridge: settings from {settings_file}" if settings_file.exists()
               else f"hl7bridge: settings: the defaults (no {settings_file})")
    shipped = "" if has_routes(directory) else f" (the shipped ones: {directory} has no routes/ or mappings/)"
    click.echo(f"hl7bridge: routes, mappings and destinations from {project.directory.resolve()}{shipped}")
    sys.exit(run(settings, project))


@cli.command(context_settings=CONTEXT)
@journal_option(help="The journal of the engine to reload (a file, or a cluster's postgresql:// URL).")
@config_option(help="With a PostgreSQL journal: the node's config directory (default: this one); its var/ "
                    "holds the node's PID file.")
@click.option("--node", metavar="NAME", help="With a PostgreSQL journal: the node on this host (default: the host name).")
@click.option("--timeout", default=30.0, show_default=True, help="Seconds to wait for the engine's verdict.")
@json_option
def reload(journal_path, config_dir, node, timeout, as_json):
    """Ask the running engine to load its routes, mappings and destinations again, and wait for its verdict.

    The engine loads every file first and switches only when all of them load: a broken file is
    refused with its name, line and a hint, and the running configuration stays. Exit codes: 0
    reloaded; 1 refused (the reason is printed); 3 no engine runs for this journal, or it gave no
    verdict within --timeout. Run 'hl7bridge check' first to see problems before they reach it.
    In a cluster (a PostgreSQL journal) it reloads the node on this host: run it on each node's
    host, with the same files deployed to each (docs/cluster.md).

    Example: hl7bridge reload --journal var/journal.db
    """
    import json
    import os
    import signal
    import time

    import socket

    from ..serve import pid_file, reload_file
    from ..store import is_database_url

    where = journal_path
    if is_database_url(journal_path):
        node = node or socket.gethostname()
        where = (config_dir if config_dir is not None else Path(".")) / "var" / f"{node}.journal"
        journal_path = f"node {node}"
    path = pid_file(where)
    verdict_path = reload_file(where)

    def verdict():
        try:
            return json.loads(verdict_path.read_text())
        except (OSError, ValueError):
            return None

    try:
        pid = int(path.read_text().strip())
        before = verdict()
        os.kill(pid, signal.SIGHUP)
    except (OSError, ValueError):
        raise Failure(f"no running engine for {journal_path} (no usable {path})", EXIT_CONNECTION) from None
    seen = before["sequence"] if before and before.get("pid") == pid else 0
    deadline = time.monotonic() + timeout
    while True:
        found = verdict()
        if found and found.get("pid") == pid and found.get("sequence", 0) > seen:
            break
        if time.monotonic() > deadline:
            raise Failure(f"the engine (pid {pid}) gave no verdict within {timeout:g} s; its log says whether "
                          "the new files took", EXIT_CONNECTION)
        time.sleep(0.05)
    if as_json:
        click.echo(json.dumps(found, indent=2))
        if not found["ok"]:
            sys.exit(EXIT_NOT_ACCEPTED)
    elif found["ok"]:
        click.echo(f"reloaded {found['message']}")
    else:
        raise Failure(f"reload refused; the engine keeps running the routes and mappings it had: {found['message']}",
                      EXIT_NOT_ACCEPTED)
