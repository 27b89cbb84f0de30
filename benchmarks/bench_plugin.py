"""Response times and payload sizes of the KernelWatch plugin's routes, against a real
``tensorboard`` process (default fast loader) on a log of 200 snapshots x 60 layers; then
``--clients`` dashboards asking at once (p50/p95/max latency and errors).

    .venv/bin/python benchmarks/bench_plugin.py [--log-dir DIR] [--repeat 3] [--clients 10] [--rounds 10]

The log is written once into ``--log-dir`` (default: a temporary folder kept between runs)
with kernelwatch's own EventWriter; generating it takes a few minutes on one core.
``--repeat 0`` skips the per-route table, ``--clients 0`` the concurrent clients.
"""

from __future__ import annotations

import argparse
import gzip
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

import torch

from kernelwatch import patterns
from kernelwatch.analysis import analyze_layer
from kernelwatch.metrics import layer_quality
from kernelwatch.spectrum import Spectrum
from kernelwatch.writing import EventWriter
from kernelwatch.reading import INDEX_TTL

SNAPSHOTS, LAYERS, RUN = 200, 60, "big"
#: Small runs beside the big one, so that listings are measured with many runs.
SMALL_RUNS, SMALL_SNAPSHOTS, SMALL_LAYERS = 40, 5, 4
#: Distinct kernel sets per layer, cycled over the snapshots (classifying 12,000 fresh ones is slow).
VARIANTS = 4


def write_log(root: Path) -> None:
    """One run of SNAPSHOTS x LAYERS with sprites, quality, anomalies and a spectrum, and
    SMALL_RUNS small runs; each part is written once and kept."""
    torch.set_num_threads(1)
    spectrum = Spectrum.pretrained(kernel_size=5)
    if not (root / "complete").exists():
        write_big_run(root, spectrum)
    if not (root / "complete-small").exists():
        for r in range(SMALL_RUNS):
            with EventWriter(root / f"small/{r:02d}") as writer:
                writer.write_spectrum(0, spectrum)
                for step in range(SMALL_SNAPSHOTS):
                    for i in range(SMALL_LAYERS):
                        kernels, _ = patterns.generate_mixture(32, 5, rng=r * 100 + step * 10 + i)
                        report = analyze_layer(f"blocks.{i}.dw", torch.from_numpy(kernels), spectrum)
                        writer.write_layer(step, report, kernels)
                    writer.write_anomalies(step, [])
        (root / "complete-small").write_text("ok\n")


def write_big_run(root: Path, spectrum: Spectrum) -> None:
    layers = [f"stages.{i // 10}.blocks.{i % 10}.conv_dw" for i in range(LAYERS)]
    pool = {}
    for i, layer in enumerate(layers):
        for v in range(VARIANTS):
            kernels, _ = patterns.generate_mixture(96, 5, rng=i * VARIANTS + v, noise=0.1 + 0.1 * v)
            report = analyze_layer(layer, torch.from_numpy(kernels), spectrum)
            pool[layer, v] = (kernels, report, layer_quality(kernels))
    with EventWriter(root / RUN) as writer:
        writer.write_spectrum(0, spectrum)
        for s in range(SNAPSHOTS):
            step = s * 100
            for i, layer in enumerate(layers):
                kernels, report, quality = pool[layer, (s // 50 + i) % VARIANTS]
                writer.write_layer(step, report, kernels)
                writer.write_quality(step, layer, quality)
            flags = [
                {"layer": layers[(s * 7) % LAYERS], "kind": "collapse", "severity": ("info", "warning", "error")[s % 3],
                 "message": "one pattern dominates", "numbers": {"share": 0.8}}
            ] if s % 5 == 0 else []  # fmt: skip
            writer.write_anomalies(step, flags)
            if s % 20 == 0:
                print(f"  wrote snapshot {s}/{SNAPSHOTS}", file=sys.stderr)
    (root / "complete").write_text("ok\n")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def get(url: str) -> tuple[float, bytes, int]:
    """Seconds, body and gzipped size of one GET (as a browser would ask for it)."""
    request = urllib.request.Request(url, headers={"Accept-Encoding": "gzip"})
    start = time.perf_counter()
    with urllib.request.urlopen(request, timeout=60) as response:
        raw = response.read()
        elapsed = time.perf_counter() - start
        gzipped = response.headers.get("Content-Encoding") == "gzip"
    return elapsed, gzip.decompress(raw) if gzipped else raw, len(raw)


def wait_ready(base: str, deadline: float) -> None:
    """Until the fast loader has read the whole log (it loads in the background). Polls a
    tensor route only, so the plugin's cache of anomaly blobs stays cold."""
    last = urllib.parse.quote(f"stages.{(LAYERS - 1) // 10}.blocks.{(LAYERS - 1) % 10}.conv_dw")
    while time.time() < deadline:
        try:
            _, body, _ = get(f"{base}/timeline?run={RUN}&layer={last}")
            if len(json.loads(body)["proportions"]["steps"]) == SNAPSHOTS:
                time.sleep(2)  # the last snapshot's anomaly record follows its layers
                return
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(1)
    raise TimeoutError("TensorBoard did not load the log in time")


def dashboard_routes(client: int, round_: int) -> list[str]:
    """What the tab asks for when it opens a run at a layer: each client and round picks its own
    layer and sprite step, so that answers are not all the same."""
    i = (client * 7 + round_ * 13) % LAYERS
    layer = urllib.parse.quote(f"stages.{i // 10}.blocks.{i % 10}.conv_dw")
    step = ((client + round_) % SNAPSHOTS) * 100
    return [
        "runs", f"layers?run={RUN}", f"heatmap?run={RUN}", f"anomalies?run={RUN}",
        f"timeline?run={RUN}&layer={layer}", f"sprite?run={RUN}&layer={layer}&step={step}",
        f"sprite.png?run={RUN}&layer={layer}&step={step}", f"spectrum?run={RUN}",
        f"spectrum.png?run={RUN}&kernel_size=5",
    ]  # fmt: skip


def concurrent_clients(base: str, clients: int, rounds: int) -> None:
    """``clients`` dashboards at once, each asking its routes one after another, ``rounds``
    times; prints latency percentiles per route and overall, errors and throughput."""
    times: dict[str, list[float]] = {}
    errors: list[str] = []
    lock, start_line = threading.Lock(), threading.Barrier(clients)

    def client(c: int) -> None:
        start_line.wait()
        for r in range(rounds):
            for route in dashboard_routes(c, r):
                try:
                    elapsed, _, _ = get(f"{base}/{route}")
                except (OSError, urllib.error.HTTPError) as err:
                    with lock:
                        errors.append(f"{route}: {err}")
                    continue
                with lock:
                    times.setdefault(route.split("?")[0], []).append(elapsed * 1000)

    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))
    wall = time.perf_counter() - started
    every = [t for ts in times.values() for t in ts]
    print(f"\n{clients} concurrent clients x {rounds} rounds x {len(dashboard_routes(0, 0))} routes "
          f"({len(every)} answers, {len(errors)} errors) in {wall:.1f} s: {len(every) / wall:.0f} answers/s")
    print(f"{'route':<14} {'p50 ms':>8} {'p95 ms':>8} {'max ms':>8}")
    for route, ts in [*times.items(), ("all", every)]:
        p50, p95 = np.percentile(ts, [50, 95])
        print(f"{route:<14} {p50:8.1f} {p95:8.1f} {max(ts):8.1f}")
    for error in errors[:10]:
        print("error:", error)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--log-dir", type=Path, default=Path(tempfile.gettempdir()) / "kernelwatch-bench-plugin")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()
    write_log(args.log_dir)
    port = free_port()
    command = [str(Path(sys.executable).with_name("tensorboard")), "--logdir", str(args.log_dir), "--port", str(port),
               "--host", "127.0.0.1", "--samples_per_plugin=kernelwatch=0"]  # fmt: skip
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        base = f"http://127.0.0.1:{port}/data/plugin/kernelwatch"
        started = time.time()
        wait_ready(base, started + 300)
        print(f"TensorBoard loaded {SNAPSHOTS} snapshots x {LAYERS} layers (+{SMALL_RUNS} small runs) "
              f"in {time.time() - started:.1f} s")
        layer = urllib.parse.quote("stages.3.blocks.4.conv_dw")
        routes = [
            "runs", f"layers?run={RUN}", f"timeline?run={RUN}&layer={layer}", f"heatmap?run={RUN}",
            f"anomalies?run={RUN}", f"sprite?run={RUN}&layer={layer}&step=10000",
            f"sprite.png?run={RUN}&layer={layer}&step=10000", f"spectrum?run={RUN}",
            f"spectrum.png?run={RUN}&kernel_size=5", "static/echarts.esm.min.js", "index.js",
        ]  # fmt: skip
        if args.repeat:
            print(f"{'route':<62} {'first ms':>8} {'cold ms':>8} {'warm ms':>8} {'bytes':>9} {'gzipped':>8}")
        for route in routes if args.repeat else []:
            # First: nothing of it read yet (only what earlier routes read is kept). Cold: the
            # plugin lists the runs afresh (as every INDEX_TTL seconds) but keeps what it read of
            # series that did not change; warm: it reuses the listing, as when the dashboard
            # sends its requests together.
            first = get(f"{base}/{route}")[0] * 1000
            cold, warm, body, wire = [], [], b"", 0
            for _ in range(args.repeat):
                time.sleep(INDEX_TTL)
                for times in (cold, warm):
                    elapsed, body, wire = get(f"{base}/{route}")
                    times.append(elapsed * 1000)
            print(f"{route:<62} {first:8.1f} {statistics.median(cold):8.1f} {statistics.median(warm):8.1f} "
                  f"{len(body):9d} {wire:8d}")
        if args.clients:
            concurrent_clients(base, args.clients, args.rounds)
    finally:
        server.terminate()
        server.wait(timeout=20)


if __name__ == "__main__":
    main()
