"""The journey web page in a real browser: Debian's headless chromium driven by selenium through
chromium-driver logs in, opens the journey of a message in flight, sees its delivery arrive live
(Server-Sent Events), and saves a screenshot; the browser's console has no error."""

from __future__ import annotations

import os
import shutil
import smtplib
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from selenium import webdriver
from selenium.common.exceptions import WebDriverException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from tests.integration import relay_support
from tests.integration.conftest import ROOT, MailServer, make_server, wait_for
from tests.integration.relay_support import LabDNS
from tests.integration.test_journey import tls_context
from tests.integration.web_support import ADMIN, ADMIN_PASSWORD, start_console

lab_dns = relay_support.lab_dns  # the fixture

CHROMIUM = shutil.which("chromium")
CHROMEDRIVER = shutil.which("chromedriver")
# Set to write the page's picture in the README (docs/journey.png) from this run.
SCREENSHOT_FOR_DOCS = "MAILSYS_DOCS_SCREENSHOT"
ZONE = {"remote.test": {"MX": [[10, "mx1.remote.test"]]},
        "mx1.remote.test": {"A": ["127.0.0.2"]}}


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[webdriver.Chrome]:
    if CHROMIUM is None or CHROMEDRIVER is None:
        pytest.skip("chromium and chromium-driver are not installed (.ci/run installs them)")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic",
                     "--no-first-run", "--disable-background-networking",
                     "--disable-component-update", "--disable-sync",
                     "--disable-dev-shm-usage", "--window-size=1280,1500",
                     f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # The driver named outright: selenium then never looks for (or downloads) one itself.
    service = Service(executable_path=CHROMEDRIVER, log_output=str(tmp_path / "driver.log"))
    driver = webdriver.Chrome(options=options, service=service)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def test_browser_logs_in_and_watches_a_journey_live(
        browser: webdriver.Chrome, server_factory: Callable[..., MailServer], tmp_path: Path,
        lab_dns: LabDNS) -> None:
    """Log in, open the journey of a message waiting for its next hop, see the delivery appear
    without reloading once the next hop comes up; a screenshot is saved; no console errors."""
    lab_dns.set(ZONE)
    receiver = make_server(tmp_path / "receiver", interface="127.0.0.2",
                           local_domains=("example.test", "remote.test"),
                           aliases='"friend@remote.test" = ["demo@example.test"]')
    relay = f"""
[relay]
dns_servers = ["{lab_dns.server}"]
port = {receiver.smtp_port}
retry_schedule = [2.0, 2.0, 2.0, 2.0]
connect_timeout = 2.0
"""
    server, client, _ = start_console(server_factory, directory=tmp_path, imap=False,
                                      relay_config=relay)
    try:
        msg = ("From: demo@example.test\r\nTo: friend@remote.test\r\n"
               "Subject: Where is my mail?\r\nMessage-ID: <browser@client.example.test>\r\n"
               "\r\nHello.\r\n")
        with smtplib.SMTP("127.0.0.1", server.submission_port, timeout=30) as smtp:
            smtp.starttls(context=tls_context(server))
            smtp.login(ADMIN, ADMIN_PASSWORD)
            smtp.sendmail(ADMIN, ["demo@example.test", "friend@remote.test"], msg)
        client.login()
        wait_for(lambda: client.queue_ids("<browser@client.example.test>"),
                 message="the message in the list")

        wait = WebDriverWait(browser, 20)
        browser.get(f"{client.base}/messages")
        assert "/login" in browser.current_url  # no page without a login
        browser.find_element(By.ID, "user").send_keys(ADMIN)
        browser.find_element(By.ID, "password").send_keys(ADMIN_PASSWORD)
        browser.find_element(By.ID, "login").click()
        wait.until(lambda d: d.current_url.endswith("/messages"))
        link = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "a.journey-link"))
        link.click()
        wait.until(lambda d: "/journey/" in d.current_url)
        # The live stream is open: the page says so once the EventSource connected.
        wait.until(lambda d: d.find_element(By.ID, "live").is_displayed())
        assert "Where is my mail?" in browser.page_source
        assert _delivered_remotely(browser) == 0
        # The next hop comes up; the runner's next try delivers, and the step arrives live.
        receiver.start()
        WebDriverWait(browser, 40).until(lambda d: _delivered_remotely(d) > 0)
        new = browser.find_elements(By.CSS_SELECTOR, "li.step.new")
        assert new, "the delivery step came with the page, not live"
        # Open the live step's evidence and the first one, for the picture.
        new[-1].find_element(By.TAG_NAME, "summary").click()
        browser.find_element(By.CSS_SELECTOR, "#steps-client summary").click()
        assert "reached" in browser.find_element(By.ID, "stage-next").get_attribute("class")
        browser.execute_script("window.scrollTo(0, 0)")
        shot = tmp_path / "journey.png"
        assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
        if os.environ.get(SCREENSHOT_FOR_DOCS):
            shutil.copyfile(shot, ROOT / "docs" / "journey.png")
        errors = [entry for entry in _console(browser) if entry.get("level") == "SEVERE"]
        assert errors == [], errors
    finally:
        receiver.kill()


def _delivered_remotely(driver: webdriver.Chrome) -> int:
    steps = driver.find_elements(By.CSS_SELECTOR, '#steps-next li.step[data-kind='
                                                  '"delivery.attempt"] span.text')
    return sum(1 for step in steps if "friend@remote.test" in step.get_attribute("textContent")
               and "delivered" in step.get_attribute("textContent"))


def _console(driver: webdriver.Chrome) -> list[dict[str, object]]:
    try:
        entries: list[dict[str, object]] = driver.get_log("browser")
    except WebDriverException as exc:  # pragma: no cover - a driver without the log
        raise AssertionError(f"cannot read the browser console: {exc}") from None
    return entries
