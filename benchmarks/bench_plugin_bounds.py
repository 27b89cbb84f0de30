"""Bounded work per request: every route of the KernelWatch plugin against a real ``tensorboard``
(default fast loader, ``--samples_per_plugin=kernelwatch=0``) whose log holds a run of 10^5
snapshots (``long``) and a run of 5,000 layers (``wide``) beside small runs; then the small runs'
routes while the big ones are being read, on a fresh TensorBoard.

    .venv/bin/python benchmarks/bench_plugin_bounds.py [--log-dir DIR] [--snapshots 100000] [--layers 5000]

Targets (issue 25): every route < 2 s, and a small run's routes < 0.5 s while the big ones are
read. Each figure is the time of one GET: "first" is the first request of
its kind on a fresh TensorBoard (nothing of it read yet), "again" the same request right after.

The log is written once into ``--log-dir`` (default: a temporary folder kept between runs):
``long`` repeats one snapshot written by kernelwatch's EventWriter (a 5x5 depthwise layer of 16
kernels with its sprite, its quality metrics, a 3x4x4 stem's first-layer record and an anomaly
record, a flag at every tenth) at every step; ``wide`` and the small runs are written by
EventWriter throughout.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import torch
from tensorboard.backend.event_processing import event_file_loader

from bench_plugin import free_port
from kernelwatch import patterns
from kernelwatch.analysis import analyze_layer
from kernelwatch.first_layer import first_layer_report
from kernelwatch.metrics import layer_quality
from kernelwatch.spectrum import Spectrum
from kernelwatch.writing import EventWriter, tf_record

LONG, WIDE = "long", "wide"
LONG_LAYER, STEM = "blocks.0.dw", "stem"
SMALL_RUNS, SMALL_SNAPSHOTS, SMALL_LAYERS = 10, 3, 4
WIDE_SNAPSHOTS = 3
#: Targets of the issue, in seconds.
ROUTE_TARGET, SMALL_TARGET = 2.0, 0.5


def snapshot(writer: EventWriter, step: int, layer: str, spectrum: Spectrum, seed: int, flag: bool, stem: bool) -> None:
    """One snapshot of ``layer`` (16 5x5 kernels, with its sprite and quality), optionally the
    stem's first-layer record, and the anomaly record."""
    kernels, _ = patterns.generate_mixture(16, 5, rng=seed)
    writer.write_layer(step, analyze_layer(layer, torch.from_numpy(kernels), spectrum), kernels)
    writer.write_quality(step, layer, layer_quality(kernels))
    if stem:
        weight = np.random.default_rng(seed).standard_normal((16, 3, 4, 4))
        writer.write_first_layer(step, weight, first_layer_report(weight, layer=STEM, stride=(4, 4)).to_json())
    flags = [{"layer": layer, "kind": "collapse", "severity": "warning", "message": "one pattern dominates",
              "numbers": {"share": 0.8}}] if flag else []  # fmt: skip
    writer.write_anomalies(step, flags)


def write_long(root: Path, spectrum: Spectrum, snapshots: int) -> None:
    """``long``: the events of two snapshots written by EventWriter, the second's repeated at
    every later step (framed as EventWriter frames them); a flag at every tenth snapshot."""
    template = root / "template"
    with EventWriter(template) as writer:
        writer.write_spectrum(0, spectrum)
        snapshot(writer, 0, LONG_LAYER, spectrum, 0, True, True)
        for flag in (False, True):  # steps 1 and 2: a snapshot without a flag, and one with
            snapshot(writer, 1 + flag, LONG_LAYER, spectrum, 1, flag, True)
    (path,) = template.glob("events.out.tfevents.*")
    events = list(event_file_loader.EventFileLoader(str(path)).Load())
    head = [e for e in events if e.step == 0]
    plain = [e for e in events if e.step == 1]
    flagged = [e for e in events if e.step == 2]
    out = root / LONG
    out.mkdir()
    start = time.time()
    with open(out / f"events.out.tfevents.{int(start)}.bench", "wb") as f:
        f.write(b"".join(tf_record(e.SerializeToString()) for e in head))
        for step in range(1, snapshots):
            chunk = []
            for event in flagged if step % 10 == 0 else plain:
                event.step, event.wall_time = step, start + step * 1e-3
                chunk.append(tf_record(event.SerializeToString()))
            f.write(b"".join(chunk))
    for file in template.iterdir():
        file.unlink()
    template.rmdir()


def write_log(root: Path, snapshots: int, layers: int) -> None:
    torch.set_num_threads(1)
    spectrum = Spectrum.pretrained(kernel_size=5)
    marker = root / f"complete-{snapshots}-{layers}"
    if marker.exists():
        return
    root.mkdir(parents=True, exist_ok=True)
    for part in root.iterdir():
        raise SystemExit(f"{root} holds {part.name} of another configuration: pass another --log-dir")
    print(f"writing {LONG} ({snapshots:,} snapshots)", file=sys.stderr)
    write_long(root, spectrum, snapshots)
    print(f"writing {WIDE} ({layers:,} layers)", file=sys.stderr)
    with EventWriter(root / WIDE) as writer:
        writer.write_spectrum(0, spectrum)
        for step in range(WIDE_SNAPSHOTS):
            for i in range(layers):
                kernels, _ = patterns.generate_mixture(16, 5, rng=i)
                report = analyze_layer(f"stages.{i // 100}.blocks.{i % 100}.dw", torch.from_numpy(kernels), spectrum)
                writer.write_layer(step, report, kernels, order=i)
            writer.write_anomalies(step, [])
    for r in range(SMALL_RUNS):
        with EventWriter(root / f"small/{r:02d}") as writer:
            writer.write_spectrum(0, spectrum)
            for step in range(SMALL_SNAPSHOTS):
                for i in range(SMALL_LAYERS):
                    snapshot(writer, step, f"blocks.{i}.dw", spectrum, r * 100 + step * 10 + i, i == 0, i == 0)
    marker.write_text("ok\n")


def routes(run: str, layer: str, stem: bool = True) -> list[str]:
    """Every data route of one run, the way the dashboard asks for them: ``{sprite}`` and
    ``{first}`` stand for a step that the answer before listed (as the slider offers it)."""
    q = urllib.parse.quote
    out = [
        f"layers?run={q(run)}", f"timeline?run={q(run)}&layer={q(layer)}", f"heatmap?run={q(run)}",
        f"heatmap?run={q(run)}&measure=null_median_dissimilarity", f"anomalies?run={q(run)}",
        f"sprite?run={q(run)}&layer={q(layer)}", f"sprite?run={q(run)}&layer={q(layer)}&step={{sprite}}",
        f"sprite.png?run={q(run)}&layer={q(layer)}&step={{sprite}}", f"spectrum?run={q(run)}",
        f"spectrum.png?run={q(run)}&kernel_size=5",
    ]  # fmt: skip
    if stem:
        out += [f"first_layer?run={q(run)}", f"first_layer?run={q(run)}&step={{first}}",
                f"first_layer.png?run={q(run)}&layer={q(STEM)}&step={{first}}"]  # fmt: skip
    return out


class Steps(dict):
    """The steps a sprite or first-layer answer listed, one picked per ``pick`` (0: the middle)."""

    def learn(self, route: str, body: bytes, pick: int = 0) -> None:
        kind = "sprite" if route.startswith("sprite?") else "first" if route.startswith("first_layer?") else None
        if kind and "step=" not in route:
            steps = json.loads(body)["steps"]
            self[kind] = steps[(len(steps) // 2 + pick * 7919) % len(steps)]


class TensorBoard:
    def __init__(self, log_dir: Path):
        self.port = free_port()
        command = [str(Path(sys.executable).with_name("tensorboard")), "--logdir", str(log_dir), "--port",
                   str(self.port), "--host", "127.0.0.1", "--samples_per_plugin=kernelwatch=0"]  # fmt: skip
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.base = f"http://127.0.0.1:{self.port}/data/plugin/kernelwatch"

    def get(self, route: str, steps: Steps | None = None, pick: int = 0) -> tuple[float, int, int]:
        """Seconds, status and bytes of one GET (uncompressed, as TensorBoard sends JSON); the
        steps a listing answer holds go to ``steps``, whose picks fill a route's placeholders."""
        route = route.format(**(steps or {}))
        start = time.perf_counter()
        try:
            with urllib.request.urlopen(f"{self.base}/{route}", timeout=600) as response:
                body, status = response.read(), response.status
        except urllib.error.HTTPError as err:
            body, status = err.read(), err.code
        elapsed = time.perf_counter() - start
        if steps is not None and status == 200:
            steps.learn(route, body, pick)
        return elapsed, status, len(body)

    def wait_loaded(self, snapshots: int, layers: int, timeout: float) -> float:
        """Seconds until the data server has read the whole log: the last record of each big run."""
        started = time.time()
        wanted = {LONG: snapshots - 1, WIDE: WIDE_SNAPSHOTS - 1}
        while time.time() - started < timeout:
            try:
                with urllib.request.urlopen(f"{self.base}/runs", timeout=60) as response:
                    runs = {r["run"]: r for r in json.load(response)["runs"]}
                steps = all(runs.get(r, {}).get("max_step") == s for r, s in wanted.items())
                if steps and len(runs[WIDE]["layers"]) == layers and sum(r.startswith("small") for r in runs) == SMALL_RUNS:
                    time.sleep(3)  # the last anomaly records follow their layers
                    return time.time() - started
            except (OSError, ValueError, KeyError):
                pass
            time.sleep(1)
        raise TimeoutError("TensorBoard did not load the log in time")

    def close(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)


def per_route(tb: TensorBoard, layers: int) -> list[tuple[str, float, float, int, int]]:
    last_wide = f"stages.{(layers - 1) // 100}.blocks.{(layers - 1) % 100}.dw"
    runs = ((LONG, LONG_LAYER, True), (WIDE, last_wide, False), ("small/00", "blocks.0.dw", True))
    rows = []
    for group in [["runs"], *(routes(run, layer, stem) for run, layer, stem in runs)]:
        steps = Steps()  # what a run's listing answers offer, for its later routes
        for route in group:
            first, status, size = tb.get(route, steps)
            again, _, _ = tb.get(route, steps)
            route = route.format(**steps)
            rows.append((route, first, again, status, size))
            print(f"{route:<92} {first * 1000:9.1f} {again * 1000:9.1f} {status:4d} {size:9,d}", flush=True)
    return rows


def while_big_read(tb: TensorBoard, layers: int, rounds: int) -> list[float]:
    """The small runs' routes, one client asking them in turn, while two clients ask every
    route of ``long`` and of ``wide`` (each at new steps, so some of every round is new to read)."""
    stop = threading.Event()
    big_times: list[tuple[float, str]] = []
    last_wide = f"stages.{(layers - 1) // 100}.blocks.{(layers - 1) % 100}.dw"

    def big(run: str, layer: str, stem: bool) -> None:
        i, steps = 0, Steps()
        while not stop.is_set():
            for route in routes(run, layer, stem=stem):
                if stop.is_set():
                    return
                big_times.append((tb.get(route, steps, pick=i)[0], route.format(**steps)))
            i += 1

    threads = [
        threading.Thread(target=big, args=(LONG, LONG_LAYER, True)),
        threading.Thread(target=big, args=(WIDE, last_wide, False)),
    ]
    for thread in threads:
        thread.start()
    time.sleep(0.2)  # both big clients are in their first (cold) requests
    small: list[tuple[float, str]] = []
    for r in range(rounds):
        steps = Steps()
        for route in ["runs", *routes(f"small/{r % SMALL_RUNS:02d}", f"blocks.{r % SMALL_LAYERS}.dw")]:
            small.append((tb.get(route, steps, pick=r)[0], route.format(**steps)))
    stop.set()
    for thread in threads:
        thread.join()
    times = [t for t, _ in small]
    print(f"\nwhile 2 clients read {LONG} and {WIDE} ({len(big_times)} answers, max {max(big_times)[0]:.2f} s): "
          f"{len(small)} small-run answers, median {statistics.median(times) * 1000:.1f} ms, "
          f"p95 {np.percentile(times, 95) * 1000:.1f} ms, max {max(times) * 1000:.1f} ms")  # fmt: skip
    for label, answers in (("small", small), ("big", big_times)):
        slowest = ", ".join(f"{route} {t * 1000:.0f} ms" for t, route in sorted(answers)[-4:])
        print(f"slowest {label} answers: {slowest}")
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--log-dir", type=Path, default=Path(tempfile.gettempdir()) / "kernelwatch-bench-bounds")
    parser.add_argument("--snapshots", type=int, default=100_000)
    parser.add_argument("--layers", type=int, default=5_000)
    parser.add_argument("--rounds", type=int, default=5, help="rounds of the small runs' routes while big ones are read")
    parser.add_argument("--load-timeout", type=float, default=1200)
    args = parser.parse_args()
    write_log(args.log_dir, args.snapshots, args.layers)

    tb = TensorBoard(args.log_dir)
    try:
        loaded = tb.wait_loaded(args.snapshots, args.layers, args.load_timeout)
        print(f"TensorBoard loaded {args.snapshots:,} snapshots, {args.layers:,} layers and {SMALL_RUNS} small runs "
              f"in {loaded:.0f} s\n")  # fmt: skip
        print(f"{'route':<92} {'first ms':>9} {'again ms':>9} {'code':>4} {'bytes':>9}")
        rows = per_route(tb, args.layers)
    finally:
        tb.close()
    tb = TensorBoard(args.log_dir)  # fresh: nothing read yet
    try:
        tb.wait_loaded(args.snapshots, args.layers, args.load_timeout)
        small = while_big_read(tb, args.layers, args.rounds)
    finally:
        tb.close()
    slowest = max(rows, key=lambda row: max(row[1], row[2]))
    failed = [row[0] for row in rows if row[3] != 200]
    print(f"\nslowest route: {slowest[0]} ({max(slowest[1], slowest[2]):.2f} s; target < {ROUTE_TARGET} s); "
          f"non-200 answers: {failed or 'none'}; small runs while big ones are read: max {max(small):.2f} s "
          f"(target < {SMALL_TARGET} s)")  # fmt: skip


if __name__ == "__main__":
    main()
