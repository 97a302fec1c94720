"""The dashboard in a real browser: headless Chromium (Debian's package) drives the page served by a
running engine that delivers to the test FHIR server: sign in as a named user, the overview, the
listeners with their peers, the exception lists, the message browser (filters, pages, the tabs of
one message), bulk replay recorded under the user, and a viewer who may not replay. Screenshots
are saved beside the journal and checked pixel by pixel in the browser."""

import base64
import json
import os
import shutil
import sqlite3
import time
import urllib.error
import urllib.request

import pytest

from conftest import EXAMPLES, EngineProcess, shipped_config
from engine.mllp.client import MLLPClient

pytestmark = pytest.mark.slow
TOKEN = "test-dashboard-token-1234"
ALICE, VICTOR = "alice-token-0123456789", "victor-token-0123456789"
CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")
HEADER_BLUE = (38, 57, 77)  # app.css: header{background:#26394d}
DEAD_RED = (187, 0, 0)  # app.css: tr.dead td{color:#b00}
# A message no shipped route takes, for a patient with the same ID as NORTHCLINIC's 100234 but
# from another assigning authority (EASTCLINIC): a different person.
ADT = (b"MSH|^~\\&|ADT|NORTHCLINIC|HL7BRIDGE|FINANCE|20261201093000||ADT^A01^ADT_A01|NC000777|P|2.5.1\r"
       b"EVN|A01|20261201093000\rPID|1||100234^^^EASTCLINIC^MR||DOE^JOHN\r")


@pytest.fixture
def browser():
    if not (CHROMIUM and DRIVER):
        if os.environ.get("HL7BRIDGE_REQUIRE_BROWSER") == "1":
            pytest.fail("chromium and chromedriver are required (apt-get install chromium chromium-driver)")
        pytest.skip("chromium and chromedriver are not installed (apt-get install chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic",
                 "--window-size=1280,1000"):
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


def dead_count(journal):
    conn = sqlite3.connect(journal)
    try:
        return conn.execute("SELECT count(*) FROM deliveries WHERE state = 'dead'").fetchone()[0]
    finally:
        conn.close()


@pytest.fixture
def engine(tmp_path, fhir_server, monkeypatch):
    """An engine with two dashboard users (alice operates, victor views), whose fhir-main is the
    test FHIR server answering 422 with an OperationOutcome, and an open MLLP connection that sent
    a booking, a bad MSH, a reused control ID, an unrouted ADT, a DFT (messages 1 to 5) and a
    dozen unrouted ADTs from WESTCLINIC (6 to 17)."""
    monkeypatch.setenv("HL7BRIDGE_TOKEN_ALICE", ALICE)
    monkeypatch.setenv("HL7BRIDGE_TOKEN_VICTOR", VICTOR)
    config = shipped_config(tmp_path / "config")
    (config / "hl7bridge.yaml").write_text(
        "dashboard:\n  users:\n    - name: alice\n      token: ${HL7BRIDGE_TOKEN_ALICE}\n"
        "    - name: victor\n      token: ${HL7BRIDGE_TOKEN_VICTOR}\n      role: viewer\n")
    (config / "destinations/fhir-main.yaml").write_text(
        f"name: fhir-main\ntype: fhir\nurl: {fhir_server.base_url}\nmode: resources\nretry: {{max_attempts: 1}}\n")
    fhir_server.fail_next(422, count=1000)
    process = EngineProcess(tmp_path, config=config)
    client = MLLPClient("127.0.0.1", process.port)
    client.send((EXAMPLES / "siu_s12.hl7").read_bytes())
    client.send((EXAMPLES / "bad_msh.hl7").read_bytes())
    # The sender's counter was reset: the same control ID, another patient's message.
    client.send((EXAMPLES / "siu_s12.hl7").read_bytes().replace(b"DOE", b"ROE", 1).replace(b"100234", b"100999"))
    client.send(ADT)
    client.send((EXAMPLES / "dft_p03.hl7").read_bytes())
    for n in range(1, 13):  # a dozen more from another clinic, for pages of ten
        client.send(ADT.replace(b"NORTHCLINIC", b"WESTCLINIC").replace(b"NC000777", b"WC%06d" % n)
                    .replace(b"100234^^^EASTCLINIC", b"5%05d^^^WESTCLINIC" % n))
    process.client, process.fhir = client, fhir_server
    yield process
    client.close()
    process.stop()


def sign_in(browser, base, name, token):
    from selenium.webdriver.common.by import By

    browser.get(base + "/login")
    browser.find_element(By.ID, "name").send_keys(name)
    browser.find_element(By.ID, "token").send_keys(token)
    browser.find_element(By.ID, "login").click()


def text_of(browser, element_id, containing=None, seconds=15):
    """The text of an element once it holds ``containing`` (or once it exists)."""
    from selenium.webdriver.common.by import By

    def found():
        text = browser.find_element(By.ID, element_id).text
        return text if containing is None or containing in text else None

    return wait_for(found, seconds)


def open_page(browser, name):
    from selenium.webdriver.common.by import By

    browser.find_element(By.ID, f"nav-{name}").click()


def pixels(browser, path, color, tolerance=8):
    """How many pixels of the saved screenshot ``path`` have ``color``, and its width and
    height: the PNG is read back from the file and counted in the browser's own canvas."""
    data = base64.b64encode(path.read_bytes()).decode()
    return browser.execute_async_script("""
        const [data, color, tolerance, done] = arguments;
        const image = new Image();
        image.onload = () => {
          const canvas = document.createElement('canvas');
          canvas.width = image.width; canvas.height = image.height;
          const context = canvas.getContext('2d');
          context.drawImage(image, 0, 0);
          const bytes = context.getImageData(0, 0, image.width, image.height).data;
          let count = 0;
          for (let i = 0; i < bytes.length; i += 4)
            if (Math.abs(bytes[i] - color[0]) <= tolerance && Math.abs(bytes[i + 1] - color[1]) <= tolerance
                && Math.abs(bytes[i + 2] - color[2]) <= tolerance) count++;
          done([count, image.width, image.height]);
        };
        image.onerror = () => done([-1, 0, 0]);
        image.src = 'data:image/png;base64,' + data;
    """, data, list(color), tolerance)


def filter_messages(browser, **values):
    """Fill the message filters (by element ID suffix) and search; returns the results' text."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    wait_for(lambda: browser.find_element(By.ID, "f-since"))  # the page just opened may still be drawing
    for name in ("since", "until", "facility", "type", "patient", "control", "text"):
        field = browser.find_element(By.ID, f"f-{name}")
        field.clear()
        if name in values:
            field.send_keys(values[name])
    for name in ("route", "status", "destination", "delivery-state", "limit"):
        chosen = values.get(name.replace("-", "_"), "50" if name == "limit" else "")
        Select(browser.find_element(By.ID, f"f-{name}")).select_by_value(str(chosen))
    oldest = browser.find_element(By.ID, "f-oldest")
    if oldest.is_selected() != bool(values.get("oldest_first")):
        oldest.click()
    before = browser.find_element(By.ID, "messages")
    browser.find_element(By.ID, "f-go").click()
    wait_for(lambda: browser.find_element(By.ID, "messages") != before)
    return text_of(browser, "messages")


def test_everything_but_healthz_needs_a_users_token(engine):
    base = f"http://127.0.0.1:{engine.metrics_port}"
    assert urllib.request.urlopen(base + "/healthz").status == 200
    for path in ("/metrics", "/readyz", "/api/summary", "/static/app.js"):
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(base + path)
        assert info.value.code == 401
    for token in (ALICE, VICTOR):
        request = urllib.request.Request(base + "/metrics", headers={"Authorization": f"Bearer {token}"})
        assert urllib.request.urlopen(request).status == 200
    # A viewer's token reads, and may not replay.
    request = urllib.request.Request(base + "/api/replay", data=json.dumps({"items": [{"message_id": 1}]}).encode(),
                                     headers={"Authorization": f"Bearer {VICTOR}", "Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(request)
    assert info.value.code == 403
    assert json.loads(info.value.read()) == {"error": "victor is a viewer: this needs the operator role"}


def test_dashboard_in_chromium(engine, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    assert wait_for(lambda: dead_count(engine.journal) == 3, 30)  # two bookings and the DFT to fhir-main
    base = f"http://127.0.0.1:{engine.metrics_port}"
    shots = engine.journal.parent
    browser.get(base + "/dashboard")
    assert browser.current_url.endswith("/login")
    sign_in(browser, base, "alice", "wrong")
    assert wait_for(lambda: "Wrong name or token" in browser.page_source)
    sign_in(browser, base, "alice", VICTOR)  # another user's token is no good either
    assert wait_for(lambda: "Wrong name or token" in browser.page_source)
    sign_in(browser, base, "alice", ALICE)
    assert text_of(browser, "who", "signed in as alice") == "signed in as alice"

    # Overview: the flow per route, the deliveries, the listener with its connected peer.
    flow = text_of(browser, "flow", "clinic-scheduling")
    assert "(no route)" in flow and "clinic-charges" in flow
    outbox = text_of(browser, "outbox", "fhir-main")
    assert "not converted yet" in outbox and "held for them" in outbox  # per-key order's holds
    assert "127.0.0.1" in text_of(browser, "overview-listeners", "mllp")

    # Listeners: the open connection, from the client's own address, with its five messages.
    open_page(browser, "listeners")
    peer = "127.0.0.1:%d" % engine.client.sock.getsockname()[1]
    connected = text_of(browser, "open-mllp", peer)
    row = next(line for line in connected.splitlines() if line.startswith(peer))
    assert row.split()[2] == "17"  # peer, since, messages, last message

    # Exceptions: a dead delivery says what the server said, not only "HTTP 422"; the rejected,
    # unrouted and differing messages are each listed.
    open_page(browser, "exceptions")
    dead = text_of(browser, "dead", "NC000123")
    assert "HTTP 422 on PUT Patient: error transient: Injected failure (test hook)" in dead
    assert "MSH-9 message type is missing" in text_of(browser, "errors", "NC000999")
    assert "ADT^A01" in text_of(browser, "unrouted", "NC000777")
    differing = text_of(browser, "differing", "NC000123")
    assert "NORTHCLINIC" in differing
    browser.save_screenshot(str(shots / "dashboard.png"))
    red, width, height = pixels(browser, shots / "dashboard.png", DEAD_RED)
    blue, _, _ = pixels(browser, shots / "dashboard.png", HEADER_BLUE)
    assert width == 1280 and height > 500 and red > 200 and blue > width * 20

    # Messages: one assigning authority's patient, then the ID alone (both patients).
    open_page(browser, "messages")
    text_of(browser, "messages", "NC000777")
    found = filter_messages(browser, patient="100234^^^NORTHCLINIC")
    assert "NC000123" in found and "NC000777" not in found and "100234^^^NORTHCLINIC" in found
    found = filter_messages(browser, patient="100234")
    assert "NC000123" in found and "100234^^^EASTCLINIC" in found
    assert "NC000777" in filter_messages(browser, type="ADT") and "NC000123" not in filter_messages(browser, type="ADT")
    assert "NC000999" in filter_messages(browser, status="rejected")
    assert "NC000999" not in filter_messages(browser, since="2026-01-01T00:00", until="2026-01-02T00:00")
    dead_rows = filter_messages(browser, destination="fhir-main", delivery_state="dead")
    assert [line.split()[0] for line in dead_rows.splitlines()[1:]] == ["5", "3", "1"]  # the message IDs, newest first
    assert "fhir-main: dead" in dead_rows and "erp-finance: delivered" in dead_rows
    everything = filter_messages(browser, facility="NORTHCLINIC")
    assert [line.split()[0] for line in everything.splitlines()[1:]] == ["4", "3", "2", "1"]
    assert text_of(browser, "messages-note", "last page") == "messages 1 to 4 (the last page)"
    # Pages of ten: newest first, then the older ones, then back; and oldest first.
    ids = lambda text: [int(line.split()[0]) for line in text.splitlines()[1:]]  # noqa: E731
    first = filter_messages(browser, facility="WESTCLINIC", limit="10")
    assert ids(first) == list(range(17, 7, -1)) and text_of(browser, "messages-note") == "messages 1 to 10"
    browser.find_element(By.ID, "older").click()
    assert ids(text_of(browser, "messages", "WC000001")) == [7, 6]
    assert text_of(browser, "messages-note") == "messages 11 to 12 (the last page)"
    assert not browser.find_element(By.ID, "older").is_enabled()
    browser.find_element(By.ID, "newer").click()
    assert ids(text_of(browser, "messages", "WC000012")) == list(range(17, 7, -1))
    assert ids(filter_messages(browser, facility="WESTCLINIC", limit="10", oldest_first=True)) == list(range(6, 16))
    assert "100234" not in browser.current_url and "NORTHCLINIC" not in browser.current_url

    # One message, in tabs: the HL7 by field name, the Bundle, the deliveries, the ACK.
    assert ids(filter_messages(browser, control="NC000123", patient="100234^^^NORTHCLINIC")) == [1]
    browser.find_element(By.CSS_SELECTOR, "#messages a.message-link").click()
    hl7 = text_of(browser, "detail-body", "Patient Identifier List")
    assert "PID|1||100234^^^NORTHCLINIC^MR" in hl7 and "PID-3" in hl7
    assert browser.current_url.endswith("#message/1")
    browser.find_element(By.ID, "tab-bundle").click()
    assert '"resourceType": "Appointment"' in text_of(browser, "detail-body", '"resourceType": "Bundle"')
    browser.find_element(By.ID, "tab-deliveries").click()
    deliveries = text_of(browser, "detail-body", "fhir-main: dead after 1 attempt(s)")
    assert "HTTP 422 on PUT Patient: error transient: Injected failure (test hook)" in deliveries
    assert '"resourceType":"OperationOutcome"' in deliveries  # the response body itself
    browser.find_element(By.ID, "tab-ack").click()
    ack = text_of(browser, "detail-body", "Acknowledgment Code")
    assert "MSA|AA|NC000123" in ack
    browser.save_screenshot(str(shots / "message.png"))
    assert pixels(browser, shots / "message.png", HEADER_BLUE)[0] > 1280 * 20

    # Bulk replay from the message list, once the server takes writes again: recorded under alice.
    engine.fhir.reset()
    open_page(browser, "messages")
    filter_messages(browser, destination="fhir-main", delivery_state="dead")
    browser.find_element(By.ID, "select-all").click()
    assert text_of(browser, "selected-count", "3 selected")
    browser.find_element(By.ID, "replay-why").send_keys("server fixed")
    Select(browser.find_element(By.ID, "replay-destination")).select_by_value("fhir-main")
    browser.find_element(By.ID, "replay-selected").click()
    assert text_of(browser, "replay-result", "queued again") == "queued again: 3 deliveries of 3 message(s)"
    conn = sqlite3.connect(engine.journal)
    assert conn.execute("SELECT message_id, who, why, destination FROM replays ORDER BY message_id").fetchall() == [
        (1, "dashboard:alice", "server fixed", '["fhir-main"]'), (3, "dashboard:alice", "server fixed", '["fhir-main"]'),
        (5, "dashboard:alice", "server fixed", '["fhir-main"]')]
    assert wait_for(lambda: conn.execute("SELECT count(*) FROM deliveries WHERE destination = 'fhir-main' "
                                         "AND state = 'delivered'").fetchone()[0] == 3, 30)
    conn.close()
    browser.get(base + "/dashboard#message/1")
    # A change of hash only: the page draws the message after this returns, so wait for its tabs.
    wait_for(lambda: browser.find_element(By.ID, "tab-deliveries")).click()
    story = text_of(browser, "detail-body", "delivered after 2 attempt(s), 1 since it was replayed")
    assert "replayed by dashboard:alice: server fixed" in story

    # A viewer sees everything and is offered no replay.
    browser.find_element(By.ID, "logout").click()
    assert wait_for(lambda: browser.current_url.endswith("/login"))
    sign_in(browser, base, "victor", VICTOR)
    assert text_of(browser, "who", "victor") == "signed in as victor (viewer)"
    open_page(browser, "exceptions")
    text_of(browser, "differing", "NC000123")
    assert browser.find_elements(By.ID, "dead-replay") == [] and "Replays need the operator role" in browser.page_source


# The reconcile page's queue badges (app.css): 12 x 12 pixels of one colour per exception.
KIND_COLORS = {"missed_charge": (192, 57, 43), "late_charge": (230, 126, 34),
               "charge_without_appointment": (142, 68, 173), "erp_not_posted": (31, 111, 178)}
BADGE = 12 * 12


@pytest.fixture
def workflow(tmp_path, monkeypatch):
    """An engine that was sent, over MLLP, scheduling and billing with one gap of each kind but
    missed charges (two): bookings 10 and 6 days ago with no charge, a charge made 6 days after
    its appointment, a walk-in charge, a charge that cannot be mapped (so never queued for the
    ERP), and a booked and charged visit that is in order."""
    from datetime import datetime, timedelta, timezone

    from reconcile_traffic import dft, siu

    monkeypatch.setenv("HL7BRIDGE_TOKEN_ALICE", ALICE)
    config = shipped_config(tmp_path / "config")
    (config / "hl7bridge.yaml").write_text(
        "dashboard:\n  users:\n    - name: alice\n      token: ${HL7BRIDGE_TOKEN_ALICE}\n"
        "reconcile:\n  posting_window: 1s\n")
    process = EngineProcess(tmp_path, config=config)
    now = datetime.now(timezone.utc).replace(microsecond=0)
    day = timedelta(days=1)
    frames = [
        siu("S12", "NORTHCLINIC", "W1", now - 20 * day, "N1", now - 10 * day, "NP1", "VN1"),
        siu("S12", "NORTHCLINIC", "W2", now - 20 * day, "N2", now - 6 * day, "NP2", "VN2"),
        siu("S12", "EASTCLINIC", "W3", now - 20 * day, "E3", now - 12 * day, "EP3", "VE3"),
        dft("EASTCLINIC", "W4", now - 6 * day, [("TE3", now - 12 * day, now - 6 * day, "CG", 80.0)], "EP3", "VE3"),
        dft("EASTCLINIC", "W5", now - 2 * day, [("TWALK", now - 2 * day, now - 2 * day, "CG", 60.0)], "EP9", "VE9"),
        siu("S12", "NORTHCLINIC", "W6", now - 20 * day, "N6", now - 5 * day, "NP6", "VN6"),
        dft("NORTHCLINIC", "W7", now - 5 * day, [("TN6", now - 5 * day, now - 5 * day, "CG", 100.0)], "NP6", "VN6"),
        siu("S12", "NORTHCLINIC", "W8", now - 20 * day, "N8", now - 4 * day, "NP8", "VN8"),
        dft("NORTHCLINIC", "W9", now - 4 * day, [("TN8", now - 4 * day, now - 4 * day, "CG", 1.0)], "NP8", "VN8")
        .replace(b"1.00&USD", b"one&USD"),
    ]
    with MLLPClient("127.0.0.1", process.port) as client:
        for frame in frames:
            client.send(frame)
    yield process
    process.stop()


def test_the_reconcile_page_in_chromium(workflow, browser):
    from selenium.webdriver.common.by import By

    journal = workflow.journal
    assert wait_for(lambda: sqlite3.connect(journal).execute(
        "SELECT count(*) FROM deliveries WHERE state = 'delivered'").fetchone()[0] == 11, 30)
    # The charge that cannot be mapped has no delivery to wait for: wait for its converter (with a
    # converter per core it may be the last message mapped), then for the 1 s posting window after
    # its arrival to pass, so it is not posted "in time" yet.
    assert wait_for(lambda: sqlite3.connect(journal).execute(
        "SELECT count(*) FROM messages WHERE status = 'mapping_error'").fetchone()[0] == 1, 30)
    time.sleep(1.2)
    base = f"http://127.0.0.1:{workflow.metrics_port}"
    sign_in(browser, base, "alice", ALICE)
    text_of(browser, "who", "signed in as alice")
    open_page(browser, "reconcile")
    queue = text_of(browser, "rc-queue", "TWALK")
    assert "appointment booked for" in queue and "charge made 6.0 days after the appointment" in queue
    assert "never queued for the ERP (mapping_error)" in queue
    assert text_of(browser, "rc-counts", "Missed charge: 2") == (
        "Missed charge: 2 · Late charge: 1 · Charge without appointment: 1 · Not posted to the ERP: 1")
    kpis = text_of(browser, "rc-kpis", "NORTHCLINIC")
    assert "NORTHCLINIC 4 2 (50.0%)" in kpis  # two missed of the four NORTHCLINIC appointments past the window
    # Four charts, drawn by the vendored uPlot.
    assert wait_for(lambda: len(browser.find_elements(By.CSS_SELECTOR, ".charts .uplot")) == 4)

    def badges(name):
        browser.find_element(By.ID, "rc-queue").screenshot(str(journal.parent / name))
        return {kind: pixels(browser, journal.parent / name, color, tolerance=2)[0] for kind, color in KIND_COLORS.items()}

    assert badges("reconcile.png") == {"missed_charge": 2 * BADGE, "late_charge": BADGE,
                                       "charge_without_appointment": BADGE, "erp_not_posted": BADGE}

    # Drill down: the late charge's appointment, its history and its messages.
    row = next(r for r in browser.find_elements(By.CSS_SELECTOR, "#rc-queue tr") if "TE3" in r.text)
    row.find_element(By.CLASS_NAME, "rc-show").click()
    detail = text_of(browser, "rc-detail", "booked (S12)")
    assert "linked to\nE3 by visit" in detail and "TE3" in detail
    browser.find_element(By.CSS_SELECTOR, "#rc-detail .message-link").click()  # the charge's own message
    assert wait_for(lambda: browser.current_url.endswith("#message/4"))
    assert wait_for(lambda: "W4" in browser.find_element(By.ID, "page").text)

    # Acknowledge one missed charge with a note: it leaves the queue, recorded under alice.
    open_page(browser, "reconcile")
    text_of(browser, "rc-queue", "TWALK")
    browser.find_element(By.ID, "rc-note").send_keys("rebooked: the visit never happened")
    row = next(r for r in browser.find_elements(By.CSS_SELECTOR, "#rc-queue tr") if "N1" in r.text.split())
    row.find_element(By.CLASS_NAME, "rc-ack").click()
    assert text_of(browser, "rc-result", "acknowledged") == "acknowledged missed_charge:NORTHCLINIC:N1"
    text_of(browser, "rc-counts", "Missed charge: 1")
    assert badges("reconcile-after.png")["missed_charge"] == BADGE
    who, note = sqlite3.connect(journal).execute("SELECT who, note FROM rc_acks").fetchone()
    assert (who, note) == ("alice", "rebooked: the visit never happened")
    browser.execute_script("document.querySelector('.charts').scrollIntoView()")
    browser.save_screenshot(str(journal.parent / "reconcile-charts.png"))  # for a person to look at
