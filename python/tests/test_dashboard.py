"""The coordinator's dashboard in a real headless browser (Debian's
chromium, driven by selenium through chromedriver): the page asks for an
API key, then shows the fleet's node and a running job whose progress
advances, and its cancel button stops the job (the caller gets
JobCancelled). Its API refuses requests without a valid key. A screenshot
is kept in target/test-artifacts/dashboard.png."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from conftest import IN_CI, PYTHON, START_TIMEOUT, fleetmap_command, wait_for

ARTIFACTS = Path(__file__).resolve().parents[2] / "target" / "test-artifacts"


def free_tcp_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def browser():
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if chromium is None or driver is None:
        if IN_CI:
            pytest.fail("chromium and chromedriver are missing (scripts/setup installs them)")
        pytest.skip("chromium and chromedriver are missing")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,900"):
        options.add_argument(arg)
    session = webdriver.Chrome(service=Service(executable_path=driver), options=options)
    try:
        yield session
    finally:
        session.quit()


def read(browser, css: str, what):
    """``what`` of the element ``css`` selects, read again if the page
    redrew it meanwhile (it redraws every second)."""
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By

    for _ in range(20):
        try:
            return what(browser.find_element(By.CSS_SELECTOR, css))
        except StaleElementReferenceException:
            continue
    raise AssertionError(f"{css} kept changing under the test")


def api(port: int, path: str, key: str | None, method: str = "GET") -> tuple[int, str]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method)
    if key is not None:
        request.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_the_dashboard_shows_the_fleet_and_a_job_and_cancels_it(processes, browser):
    from selenium.webdriver.common.by import By

    port = free_tcp_port()
    coordinator = processes.start_coordinator(extra=["--http-listen", f"127.0.0.1:{port}"])
    processes.start_node(coordinator, "dash-node", cores=2)
    # The API answers only with a valid key.
    assert api(port, "/api/state", None)[0] == 401
    assert api(port, "/api/state", "fmkey_not-a-key")[0] == 401
    assert api(port, "/api/jobs/0/cancel", None, method="POST")[0] == 401

    code = """
import time
from fleetmap import remote_parallel_map
remote_parallel_map(lambda x: time.sleep(0.2), range(600), verbose=False)
"""
    caller = processes.start("caller", [PYTHON, "-c", code], env=coordinator.client_env())
    wait_for(
        lambda: any(j["state"] == "running" for j in json.loads(api(port, "/api/state", coordinator.api_key)[1])["jobs"]),
        START_TIMEOUT,
        "the job to run",
        processes.describe,
    )
    job = next(j for j in json.loads(api(port, "/api/state", coordinator.api_key)[1])["jobs"] if j["state"] == "running")

    browser.get(f"http://127.0.0.1:{port}/")
    assert browser.find_element(By.ID, "board").get_attribute("hidden") is not None, "nothing shows before a key"
    browser.find_element(By.ID, "key").send_keys(coordinator.api_key)
    browser.find_element(By.ID, "connect").click()
    row = f"#jobs tr[data-job='{job['job']}']"
    wait_for(lambda: bool(browser.find_elements(By.CSS_SELECTOR, row)), 20, "the job on the page")
    node = read(browser, "#nodes tr[data-node='dash-node']", lambda e: e.text)
    assert "2/2" in node and "pinned" in node, node

    def progress() -> int:
        return int(read(browser, f"{row} progress", lambda e: e.get_attribute("value")))

    first = progress()
    wait_for(lambda: progress() > first, 20, "the job's progress to advance on the page")
    assert read(browser, f"{row} td.state-running", lambda e: e.text) == "running"
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    assert browser.save_screenshot(str(ARTIFACTS / "dashboard.png"))

    read(browser, f"button.cancel[data-job='{job['job']}']", lambda e: e.click())
    wait_for(lambda: not caller.alive(), 20, "the caller to stop", processes.describe)
    assert "JobCancelled" in caller.stderr() and "on the dashboard" in caller.stderr(), caller.stderr()
    wait_for(
        lambda: read(browser, row, lambda e: e.get_attribute("data-state")) == "cancelled",
        20,
        "the page to show the job cancelled",
    )
    assert not browser.find_elements(By.CSS_SELECTOR, f"button.cancel[data-job='{job['job']}']")
    out = json.loads(api(port, "/api/state", coordinator.api_key)[1])
    assert [j["state"] for j in out["jobs"] if j["job"] == job["job"]] == ["cancelled"]
    # Another principal's key sees none of it and cancels nothing.
    made = subprocess.run(
        fleetmap_command() + ["keys", "create", "mallory", "--state-dir", str(coordinator.state_dir)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert made.returncode == 0, made.stderr
    other = made.stdout.strip()
    seen = json.loads(api(port, "/api/state", other)[1])
    assert seen["principal"] == "mallory" and seen["jobs"] == [] and [n["name"] for n in seen["nodes"]] == ["dash-node"]
    assert api(port, f"/api/jobs/{job['job']}/cancel", other, method="POST")[0] == 404
