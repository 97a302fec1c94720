"""Engine settings: defaults, overrides, and errors that name the file, the line and the fix."""

import pytest

from engine.config import DEFAULT_ENDPOINT, load_settings, with_overrides
from engine.errors import ConfigError


def write(tmp_path, text):
    (tmp_path / "hl7bridge.yaml").write_text(text)
    return tmp_path


def test_embedded_defaults():
    settings = load_settings(None)
    [listener] = settings.listeners
    assert listener.endpoint == DEFAULT_ENDPOINT == "tcp:2575:interface=127.0.0.1"
    assert (listener.max_frame_bytes, listener.max_connections, listener.idle_timeout) == (1048576, 64, 300.0)
    assert str(settings.journal_path) == "var/journal.db"
    assert settings.journal_synchronous == "full"


def test_directory_without_a_settings_file_uses_defaults(tmp_path):
    assert load_settings(tmp_path).listeners == load_settings(None).listeners


def test_full_file(tmp_path):
    write(tmp_path, """
listeners:
  - name: north
    endpoint: tcp:6661:interface=127.0.0.1
    max_frame_bytes: 2048
    idle_timeout: 5
    max_connections: 3
    allow_peers: [127.0.0.1, 10.0.0.0/8]
    processing_ids: [P]
    message_types: [SIU, DFT]
journal:
  path: data/j.db
  synchronous: normal
identity: {application: BRIDGE, facility: HOSP}
charset: {default: 8859/1}
logging: {level: debug}
""")
    s = load_settings(tmp_path)
    [north] = s.listeners
    assert north.name == "north" and north.max_frame_bytes == 2048 and north.idle_timeout == 5.0
    assert north.peer_allowed("10.2.3.4") and north.peer_allowed("127.0.0.1") and not north.peer_allowed("192.168.1.1")
    assert s.journal_path == tmp_path / "data/j.db" and s.journal_synchronous == "normal"
    assert s.default_charset == "latin-1" and s.log_level == "debug"
    policy = s.policy(north)
    assert policy.processing_ids == {"P"} and policy.message_types == {"SIU", "DFT"}


@pytest.mark.parametrize(
    "text, line, fragment",
    [
        ("listeners:\n  - name: a\n    max_frame_byte: 10\n", 3, "unknown key 'max_frame_byte' in listeners[1] (did you mean 'max_frame_bytes'?)"),
        ("journal:\n  synchronous: sometimes\n", 2, "journal.synchronous: 'sometimes' is not one of full, normal, extra"),
        ("listeners:\n  - max_connections: 0\n", 2, "must be greater than 0"),
        ("listeners:\n  - idle_timeout: soon\n", 2, "must be a number, not 'soon'"),
        ("listeners:\n  - allow_peers: [not-an-ip]\n", 2, "'not-an-ip' is not an IP address or network"),
        ("listeners:\n  - processing_ids: [Q]\n", 2, "'Q' is not in HL7 table 0103"),
        ("journal:\n  path: a\n  path: b\n", 3, "key 'path' appears twice"),
        ("listeners: [\n", 2, "YAML syntax error"),
        ("charset: {default: KLINGON}\n", 1, "'KLINGON' is not a known HL7 character set"),
        ("listeners:\n  - endpoint: ssl:1\n    tls: {certificate: a, private_key: b}\n", 3, "goes with a tcp: endpoint"),
        ("listeners:\n  - tls: {certificate: missing.pem, private_key: k}\n", 2, "missing.pem does not exist"),
        ("listeners:\n  - name: a\n  - name: a\n", 1, "listener names must be unique"),
        ("colour: blue\n", 1, "unknown key 'colour' in settings"),
        ("journal:\n  url: mysql://db/x\n", 2, "journal.url: is not a PostgreSQL URL"),
        ("journal:\n  path: a.db\n  url: postgresql://db/x\n", 3, "journal.url: goes without journal.path"),
        ("cluster:\n  node: two words\n", 2, "'two words' is not a usable node name"),
        ("cluster:\n  lease: 1s\n", 2, "must be 3 seconds or more, not 1"),
        ("cluster:\n  leader: me\n", 2, "unknown key 'leader' in cluster"),
    ],
)
def test_errors_name_file_line_and_fix(tmp_path, text, line, fragment):
    write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_settings(tmp_path)
    message = str(info.value)
    assert message.startswith(f"{tmp_path / 'hl7bridge.yaml'}:{line}: "), message
    assert fragment in message


def test_missing_directory(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "nope")


def test_command_line_overrides_keep_the_limits(tmp_path):
    write(tmp_path, "listeners:\n  - name: main\n    max_connections: 5\n")
    s = with_overrides(load_settings(tmp_path), ("tcp:1:interface=127.0.0.1", "tcp:2"), "other.db")
    assert [l.endpoint for l in s.listeners] == ["tcp:1:interface=127.0.0.1", "tcp:2"]
    assert [l.max_connections for l in s.listeners] == [5, 5]
    assert [l.name for l in s.listeners] == ["listen-1", "listen-2"]
    assert str(s.journal_path) == "other.db"


def test_a_cluster_node_reads_its_database_url_and_name(tmp_path, monkeypatch):
    monkeypatch.setenv("DB_PASSWORD", "pw")
    write(tmp_path, "journal:\n  url: postgresql://hl7:${DB_PASSWORD}@db:5432/hl7\ncluster:\n  node: hl7-a\n  lease: 45s\n")
    s = load_settings(tmp_path)
    assert (s.journal_location, s.node_name, s.lease) == ("postgresql://hl7:pw@db:5432/hl7", "hl7-a", 45.0)
    # --journal with a URL keeps it a URL (a Path would fold its //); with a file, the file wins.
    assert with_overrides(s, journal="postgresql://other/db", node="hl7-b").journal_location == "postgresql://other/db"
    assert with_overrides(s, journal="local.db").journal_location == "local.db"
    assert with_overrides(s, node="hl7-b").node_name == "hl7-b"
    with pytest.raises(ConfigError, match="not a usable node name"):
        with_overrides(s, node="no/slashes")


def test_the_shipped_example_loads(monkeypatch):
    from conftest import EXAMPLES

    monkeypatch.setenv("HL7BRIDGE_DASHBOARD_TOKEN", "0123456789abcdef")
    settings = load_settings(EXAMPLES)
    assert [l.name for l in settings.listeners] == ["mllp"]
    assert settings.journal_path == EXAMPLES / "var/journal.db"


def test_conversion_workers_default_to_one_per_core(tmp_path):
    import os

    assert load_settings(None).converters == len(os.sched_getaffinity(0))
    assert load_settings(write(tmp_path, "conversion:\n  workers: cores\n")).converters == len(os.sched_getaffinity(0))
    assert load_settings(write(tmp_path, "conversion:\n  workers: 3\n")).converters == 3


def test_conversion_nice(tmp_path):
    assert load_settings(None).converter_nice == 19
    assert load_settings(write(tmp_path, "conversion:\n  nice: 0\n")).converter_nice == 0
    write(tmp_path, "conversion:\n  nice: 20\n")
    with pytest.raises(ConfigError) as info:
        load_settings(tmp_path)
    assert str(info.value).startswith(f"{tmp_path / 'hl7bridge.yaml'}:2: ") and "20 is not a nice value" in str(info.value)


@pytest.mark.parametrize("value", ["0", "many", "65", "true"])
def test_conversion_workers_must_be_a_number_of_processes(tmp_path, value):
    write(tmp_path, f"journal:\n  path: j.db\nconversion:\n  workers: {value}\n")
    with pytest.raises(ConfigError) as info:
        load_settings(tmp_path)
    message = str(info.value)
    assert message.startswith(f"{tmp_path / 'hl7bridge.yaml'}:4: ") and "not a number of converter processes" in message
    assert "cores (one per core, the default) or a number from 1 to 64" in message
