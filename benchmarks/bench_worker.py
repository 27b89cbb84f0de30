"""The monitor's cost per snapshot: the worker's CPU time and the training thread's blocking.

    python benchmarks/bench_worker.py [--models convnext_atto convnext_tiny] [--snapshots 8]

For each timm model (``pretrained=False``, nothing downloaded) one KernelWatch takes a snapshot
after each small perturbation of every weight (so the update lens has something to classify),
waiting for the worker after each. Per snapshot it reports:

- blocking: wall time of ``snapshot()`` on the training thread (copying the kernels);
- worker CPU: the process's CPU time from ``snapshot()`` until the worker has written it
  (the training thread sleeps meanwhile), i.e. classification of both lenses with their nulls,
  sprites, quality metrics, encoding and flushing;
- the worker's CPU against one training step of the same model (batch 32, 64 px, all
  threads), measured in the same run: how many steps' worth of CPU a snapshot costs.

The first snapshot (loading spectra, warming caches) is left out. Medians over ``--snapshots``.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import timm
import torch

from kernelwatch import KernelWatch


def training_step_cpu(model: torch.nn.Module, repeats: int = 3) -> float:
    """Median process CPU seconds of one AdamW step, batch 32 at 64 px."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x, y = torch.randn(32, 3, 64, 64), torch.randint(0, 10, (32,))
    times = []
    for _ in range(repeats + 1):
        start = time.process_time()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        times.append(time.process_time() - start)
    return statistics.median(times[1:])


def snapshot_costs(model: torch.nn.Module, snapshots: int) -> tuple[list[float], list[float]]:
    """(blocking seconds, worker CPU seconds) of each snapshot after the first."""
    blocking, worker = [], []
    with tempfile.TemporaryDirectory() as log_dir, KernelWatch(log_dir) as watch:
        for step in range(snapshots + 1):
            with torch.no_grad():
                for parameter in model.parameters():
                    parameter.add_(0.01 * parameter.std().nan_to_num() * torch.randn_like(parameter))
            cpu, wall = time.process_time(), time.perf_counter()
            watch.snapshot(model, step)
            took = time.perf_counter() - wall
            watch.flush()
            if step:
                blocking.append(took)
                worker.append(time.process_time() - cpu)
    return blocking, worker


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["convnext_atto", "convnext_tiny"])
    parser.add_argument("--snapshots", type=int, default=8)
    args = parser.parse_args()
    print(f"torch threads: {torch.get_num_threads()}")
    for name in args.models:
        torch.manual_seed(0)
        model = timm.create_model(name, pretrained=False, num_classes=10)
        step_cpu = training_step_cpu(model)
        blocking, worker = snapshot_costs(model, args.snapshots)
        cpu = statistics.median(worker)
        print(
            f"{name}: worker CPU per snapshot {1000 * cpu:.0f} ms (min {1000 * min(worker):.0f}), "
            f"= {cpu / step_cpu:.2f} training steps ({1000 * step_cpu:.0f} ms CPU each); "
            f"blocking median {1000 * statistics.median(blocking):.1f} ms, max {1000 * max(blocking):.1f} ms"
        )


if __name__ == "__main__":
    main()
