"""A real ``tensorboard`` process for the plugin's end-to-end and fuzz tests."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class TensorBoard:
    """``tensorboard --logdir logdir *extra`` on a free loopback port; ``url`` is its root (with
    any ``--path_prefix``), and routes are the plugin's (``runs``, ``sprite?run=...``)."""

    def __init__(self, logdir: Path, *extra: str):
        self.port = free_port()
        prefix = next((a.split("=", 1)[1] for a in extra if a.startswith("--path_prefix=")), "")
        self.url = f"http://127.0.0.1:{self.port}{prefix}"
        command = [str(Path(sys.executable).with_name("tensorboard")), "--logdir", str(logdir),
                   "--port", str(self.port), "--host", "127.0.0.1", *extra]  # fmt: skip
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: no proxy

    def get(self, route: str) -> tuple[int, bytes, str, float]:
        """Status, body, content type and seconds of one GET of a plugin route."""
        start = time.perf_counter()
        try:
            with self._opener.open(f"{self.url}/data/plugin/kernelwatch/{route}", timeout=30) as response:
                status, body, kind = response.status, response.read(), response.headers.get("Content-Type", "")
        except urllib.error.HTTPError as err:
            status, body, kind = err.code, err.read(), err.headers.get("Content-Type", "")
        return status, body, kind, time.perf_counter() - start

    def json(self, route: str) -> dict:
        status, body, _, _ = self.get(route)
        assert status == 200, (route, status, body[:300])
        return json.loads(body)

    def wait_for(self, route: str, ready, timeout: float = 90) -> dict:
        """Poll a route until ``ready(body)``; the fast loader reads logs in the background."""
        deadline, body = time.monotonic() + timeout, None
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"tensorboard exited: {self.process.stderr.read()[-2000:]}")
            try:
                status, raw, _, _ = self.get(route)
                body = json.loads(raw) if status == 200 else None
                if body is not None and ready(body):
                    return body
            except (OSError, ValueError):
                pass
            time.sleep(0.3)
        raise TimeoutError(f"{route} not ready after {timeout} s; last answer {str(body)[:500]}")

    def close(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
