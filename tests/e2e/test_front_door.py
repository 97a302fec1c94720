"""A newcomer's first minutes, with the real command: where serve reads its settings, routes and
mappings from (and says so), how a first run says to turn the dashboard on, what make serve runs,
reload that waits for the engine's verdict, and a SIGTERM to the whole process group."""

import os
import re
import select
import shutil
import signal
import subprocess
import time
import urllib.request

import pytest

from conftest import HL7BRIDGE, ROOT, EngineProcess, run_cli, shipped_config, wait_for

pytestmark = pytest.mark.slow
TOKEN = "front-door-token-1234"


def start(args, cwd, env=None, new_session=False):
    """``hl7bridge serve ARGS`` in ``cwd``; returns (process, its startup lines up to the dashboard line)."""
    process = subprocess.Popen([*HL7BRIDGE, "serve", "--listen", "tcp:0:interface=127.0.0.1",
                                "--metrics", "tcp:0:interface=127.0.0.1", *args],
                               cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               env={**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1", **(env or {})},
                               start_new_session=new_session)
    lines, pending = [], b""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if not select.select([process.stdout], [], [], 0.2)[0]:
            continue
        chunk = os.read(process.stdout.fileno(), 4096)
        if not chunk:
            raise AssertionError("serve exited: " + process.stderr.read().decode())
        pending += chunk
        while b"\n" in pending:
            line, pending = pending.split(b"\n", 1)
            lines.append(line.decode())
            if line.startswith(b"hl7bridge: dashboard"):
                return process, lines
    stop(process)
    raise AssertionError(f"serve printed no dashboard line in 30 s: {lines}")


def stop(process):
    process.send_signal(signal.SIGTERM)
    return process.communicate(timeout=30)


def masked(lines):
    return [re.sub(r"127\.0\.0\.1:\d+", "127.0.0.1:PORT", line) for line in lines]


def copy_routes(directory, route_name):
    """routes/ and mappings/ in ``directory``, with the first route renamed, to tell them apart."""
    shipped_config(directory)
    route = directory / "routes/10-scheduling.yaml"
    route.write_text(route.read_text().replace("name: clinic-scheduling", f"name: {route_name}"))


def test_config_dir_without_routes_runs_the_shipped_ones_never_the_current_directorys(tmp_path):
    here = tmp_path / "here"
    copy_routes(here, "here-scheduling")  # what the old engine silently loaded
    settings = tmp_path / "settings"
    settings.mkdir()
    (settings / "hl7bridge.yaml").write_text(f"journal: {{path: j.db}}\ndashboard: {{token: {TOKEN}}}\n")
    process, lines = start(["--config", str(settings)], cwd=here)
    stop(process)
    assert masked(lines) == [
        f"hl7bridge: settings from {settings / 'hl7bridge.yaml'}",
        f"hl7bridge: routes, mappings and destinations from {ROOT} (the shipped ones: {settings} has no routes/ "
        "or mappings/)",
        "hl7bridge: listener mllp ready on 127.0.0.1:PORT",
        "hl7bridge: metrics ready on 127.0.0.1:PORT",
        "hl7bridge: dashboard on http://127.0.0.1:PORT/dashboard (sign in with your name and the dashboard token)",
    ]
    assert (settings / "j.db").exists() and not (here / "var").exists()
    # The analyst's commands follow the same rule.
    checked = subprocess.run([*HL7BRIDGE, "check", str(settings)], cwd=here, capture_output=True,
                             env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert checked.stdout.decode().splitlines()[0] == f"ok: {ROOT}"


def test_without_config_serve_reads_the_current_directory_and_says_how_to_turn_the_dashboard_on(tmp_path):
    here = tmp_path / "here"
    copy_routes(here, "here-scheduling")
    process, lines = start([], cwd=here)
    stop(process)
    assert masked(lines) == [
        "hl7bridge: settings: the defaults (no hl7bridge.yaml)",
        f"hl7bridge: routes, mappings and destinations from {here}",
        "hl7bridge: listener mllp ready on 127.0.0.1:PORT",
        "hl7bridge: metrics ready on 127.0.0.1:PORT",
        "hl7bridge: dashboard off; to turn it on, put 'dashboard: {token: \"${HL7BRIDGE_DASHBOARD_TOKEN}\"}' in "
        "hl7bridge.yaml, export HL7BRIDGE_DASHBOARD_TOKEN=$(openssl rand -hex 16) and start again "
        "(examples/hl7bridge.yaml has every option; docs/operations.md, 'The dashboard')",
    ]
    assert (here / "var/journal.db").exists()
    # Doing what the line says turns it on.
    (here / "hl7bridge.yaml").write_text('dashboard: {token: "${HL7BRIDGE_DASHBOARD_TOKEN}"}\n')
    process, lines = start([], cwd=here, env={"HL7BRIDGE_DASHBOARD_TOKEN": TOKEN})
    try:
        assert lines[0] == "hl7bridge: settings from hl7bridge.yaml"
        url = re.search(r"dashboard on (\S+)", lines[-1]).group(1)
        assert urllib.request.urlopen(url).url.endswith("/login")  # redirected to sign in
    finally:
        stop(process)


def test_the_example_settings_run_as_the_example_says(tmp_path):
    """cp examples/hl7bridge.yaml . and serve, as its first lines say (with the token exported)."""
    here = tmp_path / "here"
    copy_routes(here, "clinic-scheduling")
    text = (ROOT / "examples/hl7bridge.yaml").read_text()
    (here / "hl7bridge.yaml").write_text(text)
    process, lines = start([], cwd=here, env={"HL7BRIDGE_DASHBOARD_TOKEN": TOKEN})
    stop(process)
    assert lines[0] == "hl7bridge: settings from hl7bridge.yaml"
    assert lines[-1].startswith("hl7bridge: dashboard on http://127.0.0.1:")
    assert (here / "var/journal.db").exists()


def test_dashboard_with_metrics_off_is_refused_at_start(tmp_path):
    (tmp_path / "hl7bridge.yaml").write_text(f"dashboard: {{token: {TOKEN}}}\n")
    result = run_cli("serve", "--config", tmp_path, "--metrics", "off")
    assert (result.returncode, result.stdout.decode() + result.stderr.decode()) == (
        2, "Error: the dashboard is served on the metrics endpoint, which is off (--metrics off or metrics.enabled: "
           "false): turn it on, or leave dashboard out of hl7bridge.yaml\n")


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_serve_reads_hl7bridge_yaml_here_or_config():
    def command(*args):
        # Under `make test` this make is a sub-make: MAKELEVEL would make it print "Leaving directory".
        env = {k: v for k, v in os.environ.items() if k not in ("MAKELEVEL", "MAKEFLAGS", "MFLAGS")}
        result = subprocess.run(["make", "--no-print-directory", "-n", "-W", "setup.cfg", "serve", *args],
                                cwd=ROOT, capture_output=True, env=env)
        return result.stdout.decode().splitlines()[-1]

    assert command() == ".venv/bin/hl7bridge serve --config ."
    assert command("CONFIG=examples") == ".venv/bin/hl7bridge serve --config examples"


# -- reload: wait for the engine's verdict ---------------------------------------------------------

def test_reload_waits_for_the_verdict_and_fails_with_the_reason(tmp_path):
    engine = EngineProcess(tmp_path)
    try:
        from engine.transform.project import Project

        project = Project.load(engine.config)
        result = run_cli("reload", "--journal", engine.journal)
        assert (result.returncode, result.stdout.decode()) == (
            0, f"reloaded {len(project.routes)} routes, {len(project.mappings.messages)} message mappings and "
               f"{len(project.destinations)} destinations from {engine.config}\n")
        route = engine.config / "routes/10-scheduling.yaml"
        route.write_text(route.read_text().replace("  message: [SIU]", "  mesage: [SIU]"))
        line = next(n for n, text in enumerate(route.read_text().splitlines(), 1) if "mesage:" in text)
        result = run_cli("reload", "--journal", engine.journal)
        assert (result.returncode, result.stderr.decode()) == (
            1, "Error: reload refused; the engine keeps running the routes and mappings it had: "
               f"{route}:{line}: unknown key 'mesage' in match (did you mean 'message'?)\n")
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{engine.metrics_port}/metrics").read().decode()
        assert 'hl7bridge_config_reloads_total{outcome="refused"} 1' in metrics.splitlines()
        assert "hl7bridge_config_last_reload_successful 0" in metrics.splitlines()
    finally:
        engine.stop()
    result = run_cli("reload", "--journal", engine.journal)
    assert (result.returncode, result.stderr.decode()) == (
        3, f"Error: no running engine for {engine.journal} (no usable {tmp_path / 'journal.pid'})\n")


# -- SIGTERM to the whole process group ------------------------------------------------------------

def test_sigterm_to_the_process_group_shuts_down_once_quietly(tmp_path):
    config = shipped_config(tmp_path / "config")
    process, _ = start(["--config", str(config), "--journal", str(tmp_path / "journal.db")], cwd=tmp_path,
                       new_session=True)
    time.sleep(1)  # the converter and the text indexer are up
    os.killpg(process.pid, signal.SIGTERM)  # as a terminal's Ctrl-C or a service manager does: everyone gets it
    time.sleep(0.05)
    os.killpg(process.pid, signal.SIGTERM)  # and again, impatiently
    _, stderr = process.communicate(timeout=30)
    log = stderr.decode()
    assert process.returncode == 0, log
    assert log.count("stopping (SIGTERM)") == 1, log
    for noise in ("Traceback", "ReactorNotRunning", "restarting", "exited ("):
        assert noise not in log, log
    assert not (tmp_path / "journal.pid").exists()
    wait_for(lambda: not subprocess.run(["pgrep", "-s", str(process.pid)], capture_output=True).stdout, 10)
