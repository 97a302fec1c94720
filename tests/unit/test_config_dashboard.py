"""dashboard in hl7bridge.yaml: one shared token, or users with their own tokens from the
environment; every mistake named with the file, the line and what to write."""

import pytest

from engine.config import DashboardUser, load_settings
from engine.errors import ConfigError

USERS = """dashboard:
  users:
    - name: alice
      token: ${HL7BRIDGE_TOKEN_ALICE}
    - name: victor
      token: ${HL7BRIDGE_TOKEN_VICTOR}
      role: viewer
"""


@pytest.fixture
def tokens(monkeypatch):
    monkeypatch.setenv("HL7BRIDGE_TOKEN_ALICE", "alice-0123456789")
    monkeypatch.setenv("HL7BRIDGE_TOKEN_VICTOR", "victor-0123456789")


def settings_of(tmp_path, text):
    (tmp_path / "hl7bridge.yaml").write_text(text)
    return load_settings(tmp_path)


def error_of(tmp_path, text):
    with pytest.raises(ConfigError) as info:
        settings_of(tmp_path, text)
    return str(info.value).replace(f"{tmp_path / 'hl7bridge.yaml'}:", "hl7bridge.yaml:")


def test_users_with_their_own_tokens_and_roles(tmp_path, tokens):
    dashboard = settings_of(tmp_path, USERS).dashboard
    assert dashboard.token is None
    assert dashboard.users == (DashboardUser("alice", "alice-0123456789", "operator"),
                               DashboardUser("victor", "victor-0123456789", "viewer"))
    assert dashboard.user_with_token("victor-0123456789").name == "victor"
    assert dashboard.user_with_token("victor-012345678") is None


def test_the_single_shared_token_still_works(tmp_path):
    dashboard = settings_of(tmp_path, "dashboard:\n  token: a-shared-token-123\n").dashboard
    assert (dashboard.token, dashboard.users) == ("a-shared-token-123", ())
    assert settings_of(tmp_path, "logging: {level: info}\n").dashboard is None


@pytest.mark.parametrize("text, expected", [
    (USERS.replace("role: viewer", "rol: viewer"),
     "hl7bridge.yaml:7: unknown key 'rol' in dashboard.users[2] (did you mean 'role'?)"),
    (USERS.replace("${HL7BRIDGE_TOKEN_ALICE}", "alice-0123456789"),
     "hl7bridge.yaml:4: dashboard.users[1].token: must come from the environment, not be written in the file "
     "(write token: ${HL7BRIDGE_TOKEN_ALICE} and export HL7BRIDGE_TOKEN_ALICE=$(openssl rand -hex 16) before starting)"),
    (USERS.replace("${HL7BRIDGE_TOKEN_VICTOR}", "${HL7BRIDGE_TOKEN_NOBODY}"),
     "hl7bridge.yaml:6: dashboard.users[2].token: environment variable HL7BRIDGE_TOKEN_NOBODY is not set "
     "(export HL7BRIDGE_TOKEN_NOBODY=... before starting)"),
    (USERS.replace("${HL7BRIDGE_TOKEN_VICTOR}", "${HL7BRIDGE_TOKEN_ALICE}"),
     "hl7bridge.yaml:6: dashboard.users[2].token: of victor is the same as alice's (give each user a token of their own)"),
    (USERS.replace("name: victor", "name: alice"),
     "hl7bridge.yaml:5: dashboard.users[2].name: 'alice' is listed twice (list each user once)"),
    (USERS.replace("role: viewer", "role: admin"),
     "hl7bridge.yaml:7: dashboard.users[2].role: 'admin' is not one of operator, viewer"),
    (USERS.replace("dashboard:\n", "dashboard:\n  token: a-shared-token-123\n"),
     "hl7bridge.yaml:3: dashboard.users: goes without dashboard.token (with users, each signs in with their own "
     "token: remove dashboard.token (or give its holder a user entry))"),
    ("dashboard:\n  users: []\n",
     'hl7bridge.yaml:2: dashboard.users: needs at least one user (e.g. - {name: alice, token: "${HL7BRIDGE_TOKEN_ALICE}"})'),
    ("dashboard:\n  token: short\n",
     "hl7bridge.yaml:2: dashboard.token: is too short (use at least 12 characters, e.g. from: openssl rand -hex 16)"),
])
def test_mistakes_are_named_with_the_line_and_the_fix(tmp_path, tokens, text, expected):
    assert error_of(tmp_path, text) == expected
