"""Headless Debian Chromium driven by Selenium: the playground's browser test and the README's
screenshot (:mod:`gainrag_harness.playground_shot`) open it the same way."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from gainrag_harness.process import missing

WIDTH = 1280


@contextmanager
def chromium(height: int = 1000) -> Iterator[Any]:
    """A Selenium Chrome driver on Debian's ``chromium`` + ``chromium-driver``; the driver's path
    is given, so Selenium Manager never runs (it would try to download a driver)."""
    exe, driver_exe = shutil.which("chromium"), shutil.which("chromedriver")
    if exe is None or driver_exe is None:
        missing("chromium", "apt-get install chromium chromium-driver; scripts/system-deps.sh test")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service as DriverService
    except ImportError:
        missing("selenium", "pip install -e '.[dev]'")
    options = webdriver.ChromeOptions()
    options.binary_location = exe
    for arg in (
        "--headless=new",
        "--no-sandbox",  # CI and the dev VMs run as root
        "--disable-dev-shm-usage",
        "--disable-gpu",
        f"--window-size={WIDTH},{height}",
        "--no-first-run",
        "--disable-extensions",
        "--disable-background-networking",
    ):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=DriverService(executable_path=driver_exe), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def wait_for(driver: Any, condition: Any, timeout_s: float) -> Any:
    """Poll ``condition(driver)`` every 0.1 s until it is truthy (Selenium's WebDriverWait)."""
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout_s, poll_frequency=0.1).until(condition)


def fill(driver: Any, element_id: str, text: str) -> None:
    """Replace the text of the input ``element_id``."""
    field = driver.find_element("id", element_id)
    field.clear()
    field.send_keys(text)


def screenshot(driver: Any, path: Path, max_height: int = 4000) -> None:
    """The whole page, or its top ``max_height`` pixels: the viewport is resized to the
    document's height first (DevTools)."""
    height = driver.execute_script("return document.documentElement.scrollHeight")
    size = {"width": WIDTH, "height": min(int(height), max_height)}
    driver.execute_cdp_cmd(
        "Emulation.setDeviceMetricsOverride", {**size, "deviceScaleFactor": 1, "mobile": False}
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(path))
