"""The documentation is tested: the CLI reference is current and every option and config key is documented."""

import click

from conftest import ROOT
from engine.cli import cli
from engine.cli.clidoc import commands, render
from engine.config import KEYS


def test_cli_reference_is_current():
    assert (ROOT / "docs/cli.md").read_text() == render(), "run `make docs` to regenerate docs/cli.md"


def test_every_command_and_option_is_in_the_readme_or_docs():
    text = (ROOT / "README.md").read_text() + "".join(p.read_text() for p in (ROOT / "docs").glob("*.md"))
    for path, command in commands(cli, []):
        assert " ".join(["hl7bridge", *path]) in text
        for param in command.params:
            if isinstance(param, click.Option):
                for opt in param.opts:
                    assert opt in text, (path, opt)


def test_every_config_key_is_documented():
    text = (ROOT / "docs/configuration.md").read_text()
    for key in sorted(set().union(*KEYS.values())):
        assert f"`{key}`" in text, key


def test_every_route_key_and_mapping_directive_is_documented():
    from engine.transform.templates import DIRECTIVES
    from engine.transform.routes import ACK_KEYS, MATCH_KEYS, ROUTE_KEYS

    routes = (ROOT / "docs/routes.md").read_text()
    for key in sorted(ROUTE_KEYS | MATCH_KEYS | ACK_KEYS):
        assert f"`{key}`" in routes, key
    mappings = (ROOT / "docs/mappings.md").read_text()
    for directive in sorted(DIRECTIVES | {"$key"}):
        assert f"`{directive}" in mappings, directive
    for key in ("description", "timezone", "resources", "map", "default"):
        assert f"`{key}" in mappings or f"`resources[].{key}`" in mappings, key


def test_every_destination_key_is_documented():
    from engine.delivery.destinations import KEYS as DESTINATION_KEYS

    text = (ROOT / "docs/destinations.md").read_text()
    for key in sorted(set().union(*DESTINATION_KEYS.values())):
        assert f"`{key}" in text, key
