"""Writes docs/cli.md from the commands' own --help, so the reference cannot drift from the code.

    python -m engine.cli.clidoc > docs/cli.md      (or: make docs)
"""

from __future__ import annotations

import click
from click.testing import CliRunner

from . import cli

HEADER = """# Command reference

Generated from `hl7bridge --help` by `make docs`; a test fails when it is out of date.

Exit codes: 0 done (every message accepted), 1 something not accepted or not found,
2 bad usage or bad input file, 3 connection or I/O failure.
"""


def commands(group: click.Group, prefix: list[str]):
    yield prefix, group
    for name in sorted(group.commands):
        command = group.commands[name]
        if isinstance(command, click.Group):
            yield from commands(command, prefix + [name])
        else:
            yield prefix + [name], command


def render() -> str:
    runner = CliRunner()
    parts = [HEADER]
    for path, _ in commands(cli, []):
        result = runner.invoke(cli, [*path, "--help"], prog_name="hl7bridge", terminal_width=100)
        title = " ".join(["hl7bridge", *path])
        parts.append(f"## {title}\n\n```\n{result.output.rstrip()}\n```\n")
    return "\n".join(parts)


if __name__ == "__main__":
    print(render(), end="")
