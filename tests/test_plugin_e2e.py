"""End to end: a real ``tensorboard`` process (default fast loader) and headless Chromium open
the KernelWatch tab on logs written by KernelWatch and EventWriter.

Needs Debian's ``chromium`` on PATH (``apt-get install -y chromium``) and the ``playwright``
Python package; the browser is never downloaded by a tool. Screenshots are saved under
``$KERNELWATCH_ARTIFACTS`` (default ``artifacts/``, git-ignored).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = Path(os.environ.get("KERNELWATCH_ARTIFACTS", ROOT / "artifacts"))
CHROMIUM = shutil.which("chromium")


def _backend_tests():
    # --import-mode=importlib: sibling test modules are not importable by name.
    path = Path(__file__).with_name("test_plugin_backend.py")
    spec = importlib.util.spec_from_file_location("test_plugin_backend", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


backend = _backend_tests()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class TensorBoard:
    """``tensorboard`` on a free loopback port; ``url`` is its root (with any path prefix)."""

    def __init__(self, logdir: Path, *extra: str):
        self.port = free_port()
        prefix = next((a.split("=", 1)[1] for a in extra if a.startswith("--path_prefix=")), "")
        self.url = f"http://127.0.0.1:{self.port}{prefix}"
        command = [str(Path(sys.executable).with_name("tensorboard")), "--logdir", str(logdir),
                   "--port", str(self.port), "--host", "127.0.0.1", *extra]  # fmt: skip
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    def wait_for(self, route: str, ready, timeout: float = 40) -> dict:
        """Poll a plugin route until ``ready(body)``; the fast loader reads logs in the background."""
        deadline, body = time.monotonic() + timeout, None
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"tensorboard exited: {self.process.stderr.read()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{self.url}/data/plugin/kernelwatch/{route}", timeout=5) as response:
                    body = json.loads(response.read())
                if ready(body):
                    return body
            except (OSError, ValueError):
                pass
            time.sleep(0.3)
        raise TimeoutError(f"{route} not ready after {timeout} s; last answer {body}")

    def close(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


@pytest.fixture(scope="module")
def logs(tmp_path_factory) -> Path:
    return backend.write_logs(tmp_path_factory.mktemp("e2e_logs"))


def all_loaded(body: dict) -> bool:
    runs = {r["run"]: r for r in body["runs"]}
    return {"train", "alpha", "beta", backend.HOSTILE_RUN} <= set(runs) and len(runs["alpha"]["layers"]) == 3


@pytest.fixture(scope="module")
def tensorboard(logs) -> Iterator[TensorBoard]:
    server = TensorBoard(logs, f"--samples_per_plugin={backend.fmt.PLUGIN_NAME}=0", "--path_prefix=/tb")
    try:
        server.wait_for("runs", all_loaded)
        # Every snapshot of every run, not just the listing.
        server.wait_for("anomalies?run=alpha", lambda b: len(b["checked_steps"]) == len(backend.STEPS))
        server.wait_for("heatmap?run=train", lambda b: len(b["steps"]) == 5)
        yield server
    finally:
        server.close()


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None:
        pytest.skip("chromium is not on PATH (apt-get install -y chromium)")
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"]
        )
        try:
            yield browser
        finally:
            browser.close()


def open_tab(browser, url: str, height: int = 1000):
    """TensorBoard's UI on the KernelWatch tab; returns (page, plugin frame, console errors)."""
    page = browser.new_page(viewport={"width": 1400, "height": height})
    errors: list[str] = []
    # TensorBoard's own UI asks for fonts it lacks offline: judge only the plugin's requests.
    ours = ("/data/plugin/kernelwatch/", "plugin_entry.html")

    def on_console(msg) -> None:
        if msg.type == "error" and "Failed to load" not in msg.text:  # failed loads: see on_response
            errors.append(msg.text)

    def on_response(response) -> None:
        if response.status >= 400 and any(o in response.url for o in ours):
            errors.append(f"HTTP {response.status} {response.url}")

    page.on("console", on_console)
    page.on("response", on_response)
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(f"{url}/#kernelwatch", wait_until="domcontentloaded")
    deadline = time.monotonic() + 30
    while not (frames := [f for f in page.frames if "plugin_entry.html" in f.url]):
        assert time.monotonic() < deadline, "the KernelWatch iframe never appeared"
        page.wait_for_timeout(200)
    return page, frames[0], errors


def screenshot(page, name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / name
    page.screenshot(path=str(path), full_page=True)
    return path


def test_dashboard_renders_charts_and_sprites(browser, tensorboard):
    # Tall enough for the whole dashboard: the plugin scrolls inside TensorBoard's iframe.
    page, frame, errors = open_tab(browser, tensorboard.url, height=2300)
    frame.wait_for_selector("body[data-ready='1']", timeout=30_000)
    # The first readable run is alpha (runs are sorted); pick the KernelWatch-trained one.
    frame.select_option("select[title='Run']", "train")
    frame.wait_for_selector("#kw-timeline .kw-chart[data-points='5']", timeout=15_000)
    frame.wait_for_selector("#kw-heatmap .kw-chart[data-cells='10'] canvas")
    frame.wait_for_selector("#kw-sprite .kw-sprite-frame[data-loaded='1']", timeout=15_000)
    assert frame.eval_on_selector("#kw-sprite img", "img => img.naturalWidth") > 100
    frame.wait_for_selector("#kw-spectrum .kw-chart[data-intervals] canvas")
    frame.wait_for_selector("#kw-spectrum img[data-loaded='1']")
    # The charts drew something: canvases are not blank.
    blank = "c => { const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;" \
            " for (let i = 3; i < d.length; i += 4) if (d[i]) return false; return true; }"  # fmt: skip
    assert not frame.eval_on_selector("#kw-timeline canvas", blank)
    assert not frame.eval_on_selector("#kw-heatmap canvas", blank)
    screenshot(page, "kernelwatch-train.png")

    # Alpha has anomalies: marks on the heat map, rows in the list; a row's link opens its layer.
    frame.select_option("select[title='Run']", "alpha")
    frame.wait_for_selector("#kw-heatmap .kw-chart[data-marks='2']", timeout=15_000)
    frame.wait_for_selector("#kw-anomalies tbody tr:nth-child(3)")
    rows = frame.locator("#kw-anomalies tbody tr")
    assert rows.count() == 3 and "kernels died <b>" in rows.nth(0).inner_text()
    rows.nth(0).locator("button").click()
    frame.wait_for_function("document.querySelector('select[title=Layer]').value === 'stages.1.blocks.0.conv_dw'")
    frame.wait_for_selector("#kw-sprite .kw-step >> text=step 20")
    # The cluster filter dims the other kernels.
    frame.select_option("select.kw-filter", index=1)
    assert frame.locator(".kw-cell.kw-dim").count() > 0
    # Two runs side by side.
    frame.select_option("select[title='Compare with']", "beta")
    frame.wait_for_selector("#kw-compare .kw-column:nth-child(2) .kw-chart[data-cells='8']", timeout=15_000)
    screenshot(page, "kernelwatch-alpha-compare.png")
    assert not errors, errors


def test_names_are_escaped(browser, tensorboard):
    page, frame, errors = open_tab(browser, tensorboard.url)
    frame.wait_for_selector("body[data-ready='1']", timeout=30_000)
    frame.select_option("select[title='Run']", backend.HOSTILE_RUN)
    frame.wait_for_selector("#kw-anomalies tbody tr", timeout=15_000)
    frame.wait_for_selector("#kw-sprite .kw-sprite-frame[data-loaded='1']", timeout=15_000)
    assert frame.evaluate("window.__xss") is None
    assert frame.locator("#kw-anomalies img, #kw-anomalies b, header b").count() == 0
    assert backend.HOSTILE_LAYER in frame.locator("#kw-anomalies tbody").inner_text()
    assert backend.HOSTILE_LAYER in frame.locator("#kw-timeline h2").inner_text()
    assert not errors, errors


def test_unreadable_data_shows_a_message(browser, tmp_path):
    logs = tmp_path / "logs"
    fmt, np = backend.fmt, backend.np
    newer = json.dumps({"version": 99, "kind": "proportions", "layer": "dw", "clusters": []}).encode()
    backend._write_raw(logs / "newer_version", fmt.make_tag(fmt.PROPORTIONS, "dw"), newer, fmt.TENSOR, np.zeros(9))
    backend._write_raw(logs / "not_json", fmt.make_tag(fmt.PROPORTIONS, "dw"), b"{oops", fmt.TENSOR, np.zeros(9))
    server = TensorBoard(logs)  # the fast loader's default sampling, no path prefix
    try:
        server.wait_for("runs", lambda b: len(b["runs"]) == 2)
        page, frame, _ = open_tab(browser, server.url)
        alert = frame.wait_for_selector("[role=alert]", timeout=30_000)
        text = frame.locator("body").inner_text()
        assert "No readable KernelWatch data" in text and "newer than this reader" in text
        assert "invalid JSON" in text and alert.is_visible()
        assert "--samples_per_plugin=kernelwatch=0" in text  # the sampling notice, without the flag
        screenshot(page, "kernelwatch-unreadable.png")
    finally:
        server.close()
