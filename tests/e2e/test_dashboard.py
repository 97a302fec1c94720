"""The dashboard in a real browser: headless Chromium (Debian's package) drives the page served by a
running engine: sign in, read the flow and the exception queues, open a message, click Replay."""

import json
import shutil
import sqlite3
import time
import urllib.request

import pytest

from conftest import EXAMPLES, EngineProcess, shipped_config
from engine.mllp.client import MLLPClient

pytestmark = pytest.mark.slow
TOKEN = "test-dashboard-token-1234"
CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")


@pytest.fixture
def browser():
    import os

    if not (CHROMIUM and DRIVER):
        if os.environ.get("HL7BRIDGE_REQUIRE_BROWSER") == "1":
            pytest.fail("chromium and chromedriver are required (apt-get install chromium chromium-driver)")
        pytest.skip("chromium and chromedriver are not installed (apt-get install chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def wait_for(predicate, seconds=15):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            value = predicate()
        except Exception:  # the page is still loading
            value = None
        if value:
            return value
        time.sleep(0.2)
    return predicate()


@pytest.fixture
def engine(tmp_path):
    config = shipped_config(tmp_path / "config")
    (config / "hl7bridge.yaml").write_text(f"dashboard:\n  token: {TOKEN}\n")
    # fhir-main points at a closed port and gives up at once, so a delivery dies.
    (config / "destinations/fhir-main.yaml").write_text(
        "name: fhir-main\ntype: fhir\nurl: http://127.0.0.1:9/fhir\nretry: {max_attempts: 1}\n")
    process = EngineProcess(tmp_path, config=config)
    with MLLPClient("127.0.0.1", process.port) as client:
        client.send((EXAMPLES / "siu_s12.hl7").read_bytes())
        client.send((EXAMPLES / "bad_msh.hl7").read_bytes())
        # The sender's counter was reset: the same control ID, another patient's message.
        client.send((EXAMPLES / "siu_s12.hl7").read_bytes().replace(b"DOE", b"ROE", 1).replace(b"100234", b"100999"))
    yield process
    process.stop()


def dead_count(journal):
    conn = sqlite3.connect(journal)
    try:
        return conn.execute("SELECT count(*) FROM deliveries WHERE state = 'dead'").fetchone()[0]
    finally:
        conn.close()


def test_everything_but_healthz_needs_the_token(engine):
    base = f"http://127.0.0.1:{engine.metrics_port}"
    assert urllib.request.urlopen(base + "/healthz").status == 200
    for path in ("/metrics", "/readyz", "/api/summary"):
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(base + path)
        assert info.value.code == 401
    request = urllib.request.Request(base + "/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
    assert urllib.request.urlopen(request).status == 200


def test_dashboard_in_chromium(engine, browser):
    from selenium.webdriver.common.by import By

    assert wait_for(lambda: dead_count(engine.journal) == 2)
    base = f"http://127.0.0.1:{engine.metrics_port}"
    browser.get(base + "/dashboard")
    assert browser.current_url.endswith("/login")
    browser.find_element(By.ID, "name").send_keys("night-operator")
    browser.find_element(By.ID, "token").send_keys("wrong")
    browser.find_element(By.ID, "login").click()
    assert wait_for(lambda: "Wrong token" in browser.page_source)
    browser.find_element(By.ID, "name").send_keys("night-operator")
    browser.find_element(By.ID, "token").send_keys(TOKEN)
    browser.find_element(By.ID, "login").click()
    assert wait_for(lambda: "signed in as night-operator" in browser.find_element(By.ID, "who").text)

    flow = browser.find_element(By.ID, "flow").text
    assert "clinic-scheduling" in flow and "(no route)" in flow
    dead = wait_for(lambda: browser.find_element(By.ID, "dead").text if "NC000123" in browser.find_element(By.ID, "dead").text else None)
    assert "fhir-main" in dead
    assert "MSH-9 message type is missing" in browser.find_element(By.ID, "errors").text
    differing = browser.find_element(By.ID, "differing").text
    assert "NC000123" in differing and "NORTHCLINIC" in differing

    # Search (a POST: the patient ID never appears in a URL) and a message's detail view.
    browser.find_element(By.ID, "q-patient").send_keys("100234")
    browser.find_element(By.ID, "go").click()
    assert wait_for(lambda: "NC000123" in browser.find_element(By.ID, "results").text)
    browser.find_element(By.CSS_SELECTOR, "#results a").click()
    detail = wait_for(lambda: browser.find_element(By.ID, "detail").text if "PID-3" in browser.find_element(By.ID, "detail").text else None)
    assert "Patient Identifier List" in detail and "delivery to fhir-main: dead" in detail
    assert "100234" not in browser.current_url

    # Replay the dead delivery: recorded with the operator's name.
    browser.execute_script("window.prompt = () => 'checked the server';")
    browser.find_element(By.CSS_SELECTOR, "#dead button.replay").click()
    assert wait_for(lambda: "queued again" in browser.find_element(By.ID, "dead").text)
    conn = sqlite3.connect(engine.journal)
    assert conn.execute("SELECT who, why FROM replays").fetchall() == [("dashboard:night-operator", "checked the server")]
    conn.close()
    browser.save_screenshot(str(engine.journal.parent / "dashboard.png"))
