"""Test helpers for the dashboard: real processes (inside, outside, dashboard) and a real headless Chromium."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

EXFILGUARD = [sys.executable, "-m", "exfilguard.cli.main"]
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(cond: Callable[[], Any], timeout: float, what: str, interval: float = 0.2) -> Any:
    """Poll cond() until it returns something truthy; raise AssertionError naming `what` after timeout."""
    deadline = time.monotonic() + timeout
    last_exc: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            v = cond()
            if v:
                return v
        except Exception as exc:  # the page may be mid-render; try again
            last_exc = exc
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}" + (f" (last error: {last_exc!r})" if last_exc else ""))


def http_get(url: str, timeout: float = 2.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read()


class Proc:
    """An exfilguard command as a real subprocess, its output in a log file."""

    def __init__(self, tmp: Path, name: str, *args: str):
        self.log_path = Path(tmp) / f"{name}.log"
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen([*EXFILGUARD, *args], stdout=self._log, stderr=subprocess.STDOUT,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise AssertionError(f"{self.log_path.name} exited {self.proc.returncode}: {self.log()}")

    def wait_http(self, url: str, timeout: float = 120.0) -> None:
        def up() -> bool:
            self.check_alive()
            http_get(url, 1.0)
            return True

        wait_for(up, timeout, f"{url} ({self.log_path.name})")

    def wait_port(self, port: int, timeout: float = 120.0) -> None:
        def up() -> bool:
            self.check_alive()
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return True

        wait_for(up, timeout, f"port {port} ({self.log_path.name})")

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text()[-3000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()


def ledger_status(url: str) -> dict[str, Any]:
    """`exfilguard ledger status --json`, run as the operator would."""
    r = subprocess.run([*EXFILGUARD, "ledger", "status", "--ledger", url, "--json"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def start_browser() -> Any:
    """A headless Debian Chromium driven by Selenium through chromium-driver; never downloads anything."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_path = shutil.which("chromedriver") or "/usr/lib/chromium/chromedriver"
    if binary is None or not os.path.exists(driver_path):
        raise AssertionError("Chromium or chromium-driver is missing: `make test` installs the Debian packages "
                             "(apt-get install -y chromium chromium-driver)")
    os.environ.setdefault("SE_OFFLINE", "true")  # Selenium Manager must not reach for the network
    opts = webdriver.ChromeOptions()
    opts.binary_location = binary
    profile = tempfile.mkdtemp(prefix="exfilguard-chromium-")
    for flag in CHROMIUM_FLAGS + [f"--user-data-dir={profile}"]:
        opts.add_argument(flag)
    driver = webdriver.Chrome(options=opts, service=Service(executable_path=driver_path))
    driver.set_page_load_timeout(30)
    driver._exfilguard_profile = profile  # type: ignore[attr-defined]
    return driver


def stop_browser(driver: Any) -> None:
    try:
        driver.quit()
    finally:
        shutil.rmtree(getattr(driver, "_exfilguard_profile", ""), ignore_errors=True)


def _num(text: str) -> int:
    """'1,234,567 B' -> 1234567."""
    return int(text.split()[0].replace(",", ""))


def read_budget(driver: Any, budget: str = "default") -> dict[str, Any]:
    """The numbers the page shows for one budget, read from the rendered text in one go.

    The page redraws its cards on every refresh, so the texts are collected by one script call:
    element-by-element reads could straddle a redraw.
    """
    texts = driver.execute_script(
        "const card = document.querySelector('[data-budget=\"' + arguments[0] + '\"]');"
        "if (!card) return null; const out = {};"
        "for (const e of card.querySelectorAll('[data-field]')) out[e.dataset.field] = e.innerText;"
        "return out;", budget)
    if texts is None:
        raise LookupError(f"no card for budget {budget!r} on the page")
    out: dict[str, Any] = {k: _num(texts[k]) for k in
                           ("cap_bytes", "forwarded_bytes", "remaining_bytes", "outstanding_bytes", "tree_size")}
    out.update({k: texts[k] for k in ("burn_rate", "exhaustion", "ledger_denials")})
    return out


def text_of(driver: Any, css: str) -> str:
    """The rendered text of the first element matching css ('' when there is none)."""
    t = driver.execute_script("const e = document.querySelector(arguments[0]); return e ? e.innerText : '';", css)
    return str(t).strip()
