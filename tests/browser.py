"""A real headless browser for the tests: Debian's chromium and chromium-driver, driven by selenium.

``chromium()`` installs both with apt-get where they are missing; ``headless_chrome()`` starts a driver that keeps
the browser's console log; screenshots go to ``ARTEFACTS`` (``test-artifacts/`` in the checkout).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ARTEFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"


def chromium() -> tuple[str, str]:
    """Debian's chromium and its driver, installed with apt-get where missing."""
    if not (shutil.which("chromium") and shutil.which("chromedriver")):
        sudo = [] if os.geteuid() == 0 else ["sudo", "-n"]
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        install = [*sudo, "apt-get", "install", "-y", "-q", "chromium", "chromium-driver"]
        proc = subprocess.run(install, capture_output=True, text=True, env=env, timeout=900)
        if proc.returncode != 0:  # stale or missing package lists: update them once and try again
            subprocess.run([*sudo, "apt-get", "update", "-q"], capture_output=True, env=env, timeout=900)
            proc = subprocess.run(install, capture_output=True, text=True, env=env, timeout=900)
        if proc.returncode != 0:
            pytest.fail(f"could not install chromium and chromium-driver with apt-get: {proc.stderr[-1000:]}")
    return shutil.which("chromium"), shutil.which("chromedriver")


def headless_chrome(width: int = 1400, height: int = 2400):
    """A selenium Chrome driver on headless chromium, logging the browser console (``driver.get_log("browser")``).
    The caller quits it."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    browser, driver_path = chromium()
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                f"--window-size={width},{height}"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(driver_path), options=options)


def console_errors(driver) -> list[dict]:
    return [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
