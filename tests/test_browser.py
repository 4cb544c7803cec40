"""The demo in a real browser: `python -m recommender.demo` on free ports, driven in headless Chromium.

Debian's chromium and chromedriver (`make browser-deps`); the driver path is given explicitly so
selenium-manager never downloads anything. The model-free hashing encoder keeps it fast.
"""

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from ingest.services import free_port
from ingest.services.process import stop_child
from ingest.settings import REPO_ROOT

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
SCREENSHOT = REPO_ROOT / "reports" / "ui.png"
CHROME_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic",
                "--disable-dev-shm-usage", "--window-size=1440,1100"]

pytestmark = pytest.mark.browser

# Clicks the first result's button and records (in window.__ternrecChangedMs) when the book left the list.
TIME_CLICK_JS = """
const clicked = arguments[0];
const titles = () => [...document.querySelectorAll("[class*='st-key-rec-'] strong")].map(e => e.textContent);
const began = performance.now();
window.__ternrecChangedMs = null;
const observer = new MutationObserver(() => {
  const now = titles();
  if (now.length >= 5 && !now.some(t => t.endsWith(". " + clicked))) {
    window.__ternrecChangedMs = performance.now() - began;
    observer.disconnect();
  }
});
observer.observe(document.body, {subtree: true, childList: true, characterData: true});
document.querySelector(".st-key-want-0 button").click();
"""


def wait_for(condition, timeout: float, what: str, proc: subprocess.Popen | None = None, log: Path | None = None):
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the demo exited ({proc.returncode}) while waiting for {what}:\n"
                                 + (log.read_text()[-3000:] if log else ""))
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}"
                                 + (f":\n{log.read_text()[-3000:]}" if log else ""))
        time.sleep(0.2)


def ui_ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/_stcore/health", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def start_chromium(profile_dir: Path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in CHROME_FLAGS + [f"--user-data-dir={profile_dir}"]:
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)


def card_titles(driver) -> list[str]:
    """Titles of the recommendation cards, in rank order ('3. Dune' -> 'Dune')."""
    from selenium.webdriver.common.by import By

    titles = []
    for rank in range(100):
        cards = driver.find_elements(By.CSS_SELECTOR, f".st-key-rec-{rank} strong")
        if not cards:
            break
        titles.append(cards[0].text.split(". ", 1)[-1])
    return titles


def latency_text(driver) -> str:
    from selenium.webdriver.common.by import By

    found = driver.find_elements(By.CSS_SELECTOR, ".st-key-latency-rec [data-testid='stMetricValue']")
    return found[0].text if found else ""


@pytest.mark.skipif(not (shutil.which(CHROMIUM) and shutil.which(CHROMEDRIVER)),
                    reason="needs Debian's chromium and chromedriver (make browser-deps)")
def test_demo_shows_recommendations_and_reacts_to_a_click(tmp_path, monkeypatch):
    from selenium.webdriver.common.by import By

    monkeypatch.setenv("SE_OFFLINE", "true")  # belt and braces: selenium-manager must not download
    http_port, ui_port = free_port(), free_port()
    env = {**os.environ, "TERNREC_HTTP_PORT": str(http_port), "TERNREC_UI_PORT": str(ui_port),
           "TERNREC_ENCODER": "hashing:384", "HF_HUB_OFFLINE": "1"}
    env.pop("TERNREC_SERVICE_URL", None)
    log = tmp_path / "demo.log"
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "recommender.demo", "--limit", "1500", "--users", "300"],
                                cwd=REPO_ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    driver = None
    try:
        url = f"http://127.0.0.1:{ui_port}"
        wait_for(lambda: ui_ready(url), 90, "the Streamlit UI", proc, log)
        driver = start_chromium(tmp_path / "chrome-profile")
        driver.get(url)
        titles = wait_for(lambda: len(card_titles(driver)) >= 5 and card_titles(driver), 90,
                          "at least 5 recommended books", proc, log)
        assert all(titles)
        assert wait_for(lambda: latency_text(driver).endswith("ms") and latency_text(driver), 10, "a latency figure")
        assert "Recommended for user 1" in driver.find_element(By.TAG_NAME, "body").text

        # Wait until the list settles (the page refreshes itself while the replay is filling it).
        wait_for(lambda: "books read" in driver.find_element(By.TAG_NAME, "body").text, 60,
                 "user 1's profile-based list", proc, log)
        time.sleep(2.5)
        before = card_titles(driver)
        clicked = before[0]
        # Timed in the page itself: from the click to the first DOM change that drops the book from the list.
        driver.execute_script(TIME_CLICK_JS, clicked)
        after = wait_for(lambda: (t := card_titles(driver)) and clicked not in t and len(t) >= 5 and t, 15,
                         f"{clicked!r} to leave the list")
        took_ms = wait_for(lambda: driver.execute_script("return window.__ternrecChangedMs"), 5, "the page timer")
        print(f"list changed {took_ms:.0f} ms after the click; before {before[:3]}, after {after[:3]}")
        assert after != before
        wait_for(lambda: "Marked" in driver.find_element(By.TAG_NAME, "body").text, 10, "the confirmation")
        SCREENSHOT.parent.mkdir(exist_ok=True)
        driver.save_screenshot(str(SCREENSHOT))
        assert SCREENSHOT.stat().st_size > 10_000
    finally:
        if driver is not None:
            driver.quit()
        stop_child(proc, timeout=15)  # the demo, and whatever is left of its process group
