"""The monitor's cost, every figure against a reference measured in the same run.

    python benchmarks/bench_monitor.py            # all three parts, about 10 minutes on 2 cores
    python benchmarks/bench_monitor.py --parts worker overhead classify --repeats 3

1. worker: the background worker's CPU per snapshot of timm's ``convnext_atto``,
   ``convnext_tiny`` and ``convnext_base`` (``pretrained=False``, nothing downloaded), against
   the CPU of one training step of the same model (batch 32, 64 px). Each model gets one
   snapshot before training and then ``--cycle`` more (default 20: one cycle of the default
   cadence, sprites every 10th snapshot, quality metrics every 20th), each after a small
   perturbation of every weight and a forward pass, waiting for the worker after each: the
   CPU of the watch's threads from ``snapshot()`` until the worker has written it (the
   worker's thread CPU clock, and the training thread's inside ``snapshot()``; it sleeps
   meanwhile). The mean over the cycle, ``close()`` (which completes the last snapshot; the
   process's CPU) added, is the cost per snapshot. The whole process's CPU over the same
   stretch is printed beside it, and less the process's CPU over the same stretch without a
   watch (the same perturbation and forward pass, then a sleep as long as the watch took):
   torch's OpenMP threads spin on for milliseconds after the forward pass either way, and
   after the snapshot's weight copies, time that in a training would run its next operations.
2. overhead: ``convnext_atto`` trained on every core (batch 32, 64 px, ``--steps`` per epoch,
   a snapshot after every epoch and one before training), three arms in one process: no
   monitor, KernelWatch (``close()`` included), and TensorBoard's ``add_histogram`` of every
   parameter every epoch (what users log by default). The arms' order rotates each repeat;
   ratios are paired per repeat, then the median is taken; the same for the process's CPU time,
   and for epochs 3 to the last alone (regular snapshots only: the first snapshot's work, done
   during epoch 1, the sprite snapshot at epoch 10 and ``close()`` fall outside).
3. classify: 50,000 7x7 kernels against the shipped 10,000-code spectrum, kernelwatch's index
   against brute force (``bench_classify.py``: each side in its own process, the two alternating
   over three rounds), same decisions.

Timing-sensitive: run it alone on the machine (``/work/bin/quiet`` on the shared box).
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import timm
import torch
from torch import nn

from kernelwatch import KernelWatch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_overhead import fit, synthetic_batches  # noqa: E402
from bench_worker import training_step_cpu  # noqa: E402


def worker_costs(model: nn.Module, cycle: int) -> tuple[list[float], list[float], list[float], float, float]:
    """CPU seconds per snapshot, the first and then one cadence cycle: of the watch's own
    threads (the worker, and the training thread inside ``snapshot()``), of the whole process,
    and of the whole process over the same stretch without a watch; then ``close()`` (process
    CPU) and the longest ``snapshot()`` call (wall)."""
    costs, process, without, blocking = [], [], [], []
    with tempfile.TemporaryDirectory() as log_dir:
        watch = KernelWatch(log_dir)  # the default cadence
        worker = next(t for t in threading.enumerate() if t.name == "kernelwatch-worker")
        worker_clock = time.pthread_getcpuclockid(worker.ident)
        images = torch.randn(32, 3, 64, 64)

        def perturb_and_forward() -> None:
            with torch.no_grad():
                for parameter in model.parameters():
                    parameter.add_(0.01 * parameter.std().nan_to_num() * torch.randn_like(parameter))
                model(images)  # a batch for the first-layer lens's input sample (not timed)

        for step in range(cycle + 1):
            perturb_and_forward()
            cpu, wall = time.process_time(), time.perf_counter()
            own = time.clock_gettime(worker_clock) + time.thread_time()
            watch.snapshot(model, step)
            blocking.append(time.perf_counter() - wall)
            watch.flush()  # the training thread sleeps until the worker has written the snapshot
            costs.append(time.clock_gettime(worker_clock) + time.thread_time() - own)
            process.append(time.process_time() - cpu)
            took = time.perf_counter() - wall
            perturb_and_forward()
            cpu = time.process_time()
            time.sleep(took)
            without.append(time.process_time() - cpu)
        cpu = time.process_time()
        watch.close()
        closing = time.process_time() - cpu
    return costs, process, without, closing, max(blocking)


def part_worker(models: list[str], cycle: int) -> None:
    print(f"== worker CPU per snapshot (torch threads {torch.get_num_threads()}; the worker uses one) ==")
    for name in models:
        torch.manual_seed(0)
        model = timm.create_model(name, pretrained=False, num_classes=10)
        step_cpu = training_step_cpu(model)
        costs, process, without, closing, blocking = worker_costs(model, cycle)
        per_snapshot = (sum(costs[1:]) + closing) / cycle
        per_snapshot_process = (sum(process[1:]) + closing) / cycle
        per_snapshot_added = per_snapshot_process - sum(without[1:]) / cycle
        print(
            f"{name:<14} worker CPU per snapshot {1000 * per_snapshot:6.1f} ms (mean over a cycle of {cycle}, "
            f"close() included) = {per_snapshot / step_cpu:.3f} training steps ({1000 * step_cpu:.0f} ms CPU each); "
            f"median {1000 * statistics.median(costs[1:]):.1f} ms, max {1000 * max(costs[1:]):.0f} ms (sprites and "
            f"quality), first {1000 * costs[0]:.0f} ms, close {1000 * closing:.0f} ms; blocking max "
            f"{1000 * blocking:.1f} ms; whole process {1000 * per_snapshot_process:.1f} ms (median "
            f"{1000 * statistics.median(process[1:]):.1f} ms, first {1000 * process[0]:.0f} ms), "
            f"less the same stretch without a watch {1000 * per_snapshot_added:.1f} ms"
        )


def train(batches: list, epochs: int, arm: str, log_dir: str) -> tuple[float, float, float]:
    """Wall and process CPU seconds of one run of ``arm`` (none, kernelwatch, histograms),
    setup excluded, and the wall seconds from the third epoch to the last one's end (before
    ``close()``; NaN with fewer than three epochs)."""
    torch.manual_seed(0)
    model = timm.create_model("convnext_atto", pretrained=False, num_classes=4)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    watch = KernelWatch(log_dir, every=1) if arm == "kernelwatch" else None
    if arm == "histograms":
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(log_dir)
    start, cpu = time.perf_counter(), time.process_time()
    ends = []

    def epoch_end(epoch: int) -> None:
        ends.append(time.perf_counter())
        if watch is not None:
            watch.on_epoch_end(model, epoch)
        elif arm == "histograms":
            for name, parameter in model.named_parameters():
                writer.add_histogram(name, parameter, epoch)

    fit(model, optimizer, batches, epochs, epoch_end)
    if watch is not None:
        watch.close()
    elif arm == "histograms":
        writer.close()
    steady = ends[-1] - ends[2] if len(ends) > 3 else float("nan")
    return time.perf_counter() - start, time.process_time() - cpu, steady


def part_overhead(epochs: int, steps: int, repeats: int) -> None:
    arms = ["none", "kernelwatch", "histograms"]
    print(
        f"\n== per-epoch overhead: convnext_atto, {epochs} epochs x {steps} steps (batch 32, 64 px), "
        f"a snapshot every epoch, {torch.get_num_threads()} training threads on {os.cpu_count()} CPUs =="
    )
    batches = synthetic_batches(steps, 32, 64)
    times: dict[str, list[float]] = {arm: [] for arm in arms}
    cpus: dict[str, list[float]] = {arm: [] for arm in arms}
    later: dict[str, list[float]] = {arm: [] for arm in arms}
    with tempfile.TemporaryDirectory() as root:
        train(batches[:2], 1, "none", root)  # warm-up
        for repeat in range(repeats):
            order = arms[repeat % 3 :] + arms[: repeat % 3]
            for arm in order:
                wall, cpu, steady = train(batches, epochs, arm, os.path.join(root, f"{arm}{repeat}"))
                times[arm].append(wall)
                cpus[arm].append(cpu)
                later[arm].append(steady)
            print(f"  repeat {repeat}: " + ", ".join(f"{arm} {times[arm][-1]:.2f} s" for arm in order))
    epoch = statistics.median(times["none"]) / epochs

    def paired(ratios: list[float]) -> str:
        return f"{100 * statistics.median(ratios):+.2f} % ({', '.join(f'{100 * r:+.1f}' for r in ratios)} %)"

    for arm, label in (("kernelwatch", "KernelWatch every epoch"), ("histograms", "add_histogram every epoch")):
        ratios = [w / n - 1 for w, n in zip(times[arm], times["none"])]
        # The process's CPU moves less with the shared machine's state than its wall time.
        cpu_ratios = [c / n - 1 for c, n in zip(cpus[arm], cpus["none"])]
        steady_ratios = [w / n - 1 for w, n in zip(later[arm], later["none"])]
        print(
            f"{label:<26} {100 * statistics.median(ratios):+6.2f} % per epoch vs no monitor "
            f"(paired over {repeats} repeats: {', '.join(f'{100 * r:+.1f}' for r in ratios)} %; "
            f"epoch {epoch:.2f} s); process CPU {paired(cpu_ratios)}; epochs 3 to {epochs} alone {paired(steady_ratios)}"
        )


def part_classify(kernels: int, repeats: int) -> None:
    print(f"\n== classify {kernels:,} 7x7 kernels: kernelwatch's index vs brute force ==")
    cmd = [sys.executable, str(HERE / "bench_classify.py"), "--kernels", str(kernels), "--repeats", str(repeats)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    print(out.rstrip())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", nargs="+", choices=("worker", "overhead", "classify"),
                        default=["worker", "overhead", "classify"])
    parser.add_argument("--models", nargs="+", default=["convnext_atto", "convnext_tiny", "convnext_base"])
    parser.add_argument("--cycle", type=int, default=20, help="snapshots after the first in the worker part")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps per epoch")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--kernels", type=int, default=50_000)
    args = parser.parse_args()
    # Random models trip the anomaly flags at every snapshot: log noise here.
    logging.getLogger("kernelwatch").setLevel(logging.ERROR)
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}")
    if "worker" in args.parts:
        part_worker(args.models, args.cycle)
    if "overhead" in args.parts:
        part_overhead(args.epochs, args.steps, args.repeats)
    if "classify" in args.parts:
        part_classify(args.kernels, args.repeats)


if __name__ == "__main__":
    main()
