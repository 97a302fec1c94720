"""examples/hl7bridge.yaml is "the commented example of every option": it loads, it turns the
dashboard on with a token from the environment, and every key hl7bridge.yaml may have is in it."""

import re

import pytest

from conftest import EXAMPLES
from engine.config import KEYS, load_settings
from engine.errors import ConfigError


def test_the_example_loads_and_turns_the_dashboard_on(monkeypatch):
    monkeypatch.setenv("HL7BRIDGE_DASHBOARD_TOKEN", "0123456789abcdef")
    settings = load_settings(EXAMPLES)
    assert [listener.name for listener in settings.listeners] == ["mllp"]
    assert settings.journal_path == EXAMPLES / "var/journal.db"
    assert settings.dashboard.token == "0123456789abcdef" and settings.dashboard.users == ()
    assert settings.metrics_endpoint == "tcp:9102:interface=127.0.0.1" and settings.unrouted == "accept"
    assert settings.retention is None


def test_without_the_token_it_says_what_to_export(monkeypatch):
    monkeypatch.delenv("HL7BRIDGE_DASHBOARD_TOKEN", raising=False)
    with pytest.raises(ConfigError) as info:
        load_settings(EXAMPLES)
    assert str(info.value) == (f"{EXAMPLES / 'hl7bridge.yaml'}:60: dashboard.token: environment variable "
                               "HL7BRIDGE_DASHBOARD_TOKEN is not set (export HL7BRIDGE_DASHBOARD_TOKEN=... before starting)")


def test_every_key_is_in_the_example():
    text = (EXAMPLES / "hl7bridge.yaml").read_text()
    keys = set(re.findall(r"^[ #-]*([a-z_]+):", text, re.MULTILINE))
    missing = sorted(set().union(*KEYS.values()) - keys)
    assert missing == [], f"examples/hl7bridge.yaml lacks {missing}"


def test_the_commented_options_load_too(tmp_path, monkeypatch):
    """Uncommenting the example's optional parts gives a file the engine takes."""
    monkeypatch.setenv("HL7BRIDGE_TOKEN_ALICE", "alice-0123456789")
    monkeypatch.setenv("HL7BRIDGE_TOKEN_PROMETHEUS", "prometheus-0123456789")
    out = []
    for line in (EXAMPLES / "hl7bridge.yaml").read_text().splitlines():
        found = re.match(r"^(\s*)# (\s*(?:- )?[a-z_]+:.*)$", line)
        out.append(found.group(1) + found.group(2) if found else line)
    text = "\n".join(out)
    # users replace the shared token; the TLS listener's certificates are not here.
    text = text.replace("  token: ${HL7BRIDGE_DASHBOARD_TOKEN}", "  # token")
    text = re.sub(r"  - name: eastclinic-tls\n(    .*\n)*", "", text)
    # The journal is a file or a database: first the file, then the database (with its password).
    url_line = re.search(r"\n  url: .*", text).group(0)
    (tmp_path / "hl7bridge.yaml").write_text(text.replace(url_line, ""))
    settings = load_settings(tmp_path)
    monkeypatch.setenv("HL7BRIDGE_DB_PASSWORD", "pw")
    (tmp_path / "hl7bridge.yaml").write_text(text.replace("\n  path: var/journal.db", ""))
    assert load_settings(tmp_path).journal_location == "postgresql://hl7bridge:pw@db.example.org/hl7bridge"
    assert settings.retention == (90 * 86400.0, True, 3600.0)
    assert [(user.name, user.role) for user in settings.dashboard.users] == [("alice", "operator"), ("prometheus", "viewer")]
