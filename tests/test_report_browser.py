"""The HTML report as a person sees it: opened in headless Chromium, no console errors, every plot drawn.

Chromium is driven over the DevTools protocol on a pipe (--remote-debugging-pipe: JSON messages
separated by NUL bytes on file descriptors 3 and 4), so no browser-automation package is needed.
The test loads the page, collects console errors, exceptions and failed loads, asks the page
whether every <img> decoded with a non-zero size, and saves a screenshot (path printed; kept in
the pytest tmp directory). It skips when no Chromium is installed; CI installs Debian's package.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from cebench.report.write import write_reports

CHROMIUM = next((p for p in (os.environ.get("CHROMIUM"), shutil.which("chromium"), shutil.which("chromium-browser"),
                             shutil.which("google-chrome")) if p), None)
TIMEOUT_S = 60


class DevTools:
    """A minimal DevTools-protocol client over Chromium's debugging pipe."""

    def __init__(self, profile: str):
        to_child_r, self._to_child = os.pipe()
        self._from_child, from_child_w = os.pipe()

        flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-default-apps", "--mute-audio", f"--user-data-dir={profile}", "--remote-debugging-pipe",
                 "about:blank"]
        # the browser reads commands on fd 3 and writes replies and events on fd 4: the shell puts the pipe
        # ends there and then becomes the browser (bash: dash takes only one-digit descriptors)
        wiring = f'exec "$0" "$@" 3<&{to_child_r} 4>&{from_child_w}'
        log = None if os.environ.get("CEBENCH_BROWSER_LOG") else subprocess.DEVNULL  # set it to see Chromium's stderr
        self.proc = subprocess.Popen(["bash", "-c", wiring, CHROMIUM, *flags], pass_fds=(to_child_r, from_child_w),
                                     stdout=subprocess.DEVNULL, stderr=log)
        os.close(to_child_r)
        os.close(from_child_w)
        self._buffer = b""
        self._next_id = 0
        self.events: list[dict] = []

    def _read_message(self, deadline: float) -> dict:
        while b"\0" not in self._buffer:
            if time.monotonic() > deadline:
                raise TimeoutError("no reply from Chromium")
            chunk = os.read(self._from_child, 1 << 16)
            if not chunk:
                raise RuntimeError("Chromium closed the debugging pipe")
            self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(message)

    def send(self, method: str, session: str | None = None, **params) -> dict:
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params}
        if session:
            message["sessionId"] = session
        os.write(self._to_child, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + TIMEOUT_S
        while True:
            reply = self._read_message(deadline)
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def wait_for(self, method: str) -> dict:
        deadline = time.monotonic() + TIMEOUT_S
        for event in self.events:
            if event.get("method") == method:
                return event
        while True:
            event = self._read_message(deadline)
            self.events.append(event)
            if event.get("method") == method:
                return event

    def close(self) -> None:
        try:
            self.send("Browser.close")
        except (OSError, RuntimeError, TimeoutError):
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        os.close(self._to_child)
        os.close(self._from_child)


def errors_of(events: list[dict]) -> list[str]:
    """Console errors, uncaught exceptions and failed loads among the recorded events."""
    found = []
    for event in events:
        method, params = event.get("method"), event.get("params", {})
        if method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
            found.append("console: " + " ".join(str(a.get("value", a.get("description"))) for a in params["args"]))
        elif method == "Runtime.exceptionThrown":
            found.append("exception: " + params["exceptionDetails"].get("text", ""))
        elif method == "Log.entryAdded" and params["entry"].get("level") == "error":
            found.append(f"log: {params['entry'].get('text')} {params['entry'].get('url', '')}")
        elif method == "Network.loadingFailed":
            found.append(f"load failed: {params.get('errorText')}")
    return found


IMAGE_CHECK = """JSON.stringify(Array.from(document.images).map(img => ({
    alt: img.alt, complete: img.complete, width: img.naturalWidth, height: img.naturalHeight,
    shown: img.getBoundingClientRect().width})))"""


def open_page(url: str, screenshot: Path) -> tuple[list[dict], list[str], str]:
    """(images, errors, title) of the page at `url`, after it loaded; a full-page screenshot is saved."""
    with tempfile.TemporaryDirectory() as profile:
        browser = DevTools(profile)
        try:
            target = browser.send("Target.createTarget", url="about:blank")["targetId"]
            session = browser.send("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
            for domain in ("Page", "Runtime", "Log", "Network"):
                browser.send(f"{domain}.enable", session)
            browser.send("Emulation.setDeviceMetricsOverride", session, width=1280, height=900, deviceScaleFactor=1,
                         mobile=False)
            browser.send("Page.navigate", session, url=url)
            browser.wait_for("Page.loadEventFired")
            result = browser.send("Runtime.evaluate", session, expression=IMAGE_CHECK, returnByValue=True)
            images = json.loads(result["result"]["value"])
            title = browser.send("Runtime.evaluate", session, expression="document.title", returnByValue=True)
            shot = browser.send("Page.captureScreenshot", session, format="png", captureBeyondViewport=True)
            screenshot.write_bytes(base64.b64decode(shot["data"]))
            return images, errors_of(browser.events), title["result"]["value"]
        finally:
            browser.close()


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    from test_report import standard_cells, write_run

    run_dir = write_run(tmp_path_factory.mktemp("results"), "20260102-030405-synthetic-cpu", standard_cells())
    return write_reports(run_dir)["html"]


@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium installed (Debian: apt-get install chromium); CI installs it")
def test_report_in_headless_chromium(report, tmp_path):
    screenshot = tmp_path / "report.png"
    images, errors, title = open_page(report.as_uri(), screenshot)
    print(f"screenshot: {screenshot}")
    assert errors == []
    assert title.startswith("cebench report")
    plots = list((report.parent / "figures").glob("*.png"))
    assert len(images) == len(plots) >= 5
    broken = [img["alt"] for img in images if not (img["complete"] and img["width"] > 0 and img["height"] > 0)]
    assert broken == [], f"plots that did not render: {broken}"
    assert all(img["shown"] > 100 for img in images), "a plot is laid out too small to read"
    assert screenshot.stat().st_size > 10_000


@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium installed (Debian: apt-get install chromium); CI installs it")
def test_browser_check_catches_a_broken_plot(report, tmp_path):
    """The check itself can fail: a page with an undecodable image and a script error is caught."""
    page = tmp_path / "broken.html"
    page.write_text('<!DOCTYPE html><title>broken</title><img class="plot" alt="bad" src="data:image/png;base64,AAAA">'
                    "<script>console.error('boom'); undefinedFunction();</script>")
    images, errors, _ = open_page(page.as_uri(), tmp_path / "broken.png")
    assert images[0]["width"] == 0
    assert any("boom" in e for e in errors) and any("exception" in e for e in errors)
