"""The monitor's cost, every figure against a reference measured in the same run.

    python benchmarks/bench_monitor.py            # all three parts, about 6 minutes on 2 cores
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
   parameter every epoch (what users log by default). The arms take turns epoch by epoch, in
   a new order each epoch, each with a model of its own; an arm's turn is its previous epoch's
   end (the snapshot, whose background work then overlaps the arm's own epoch) and its next
   epoch's steps, waiting at the end for whatever of that work is left. Pairs a second apart
   share the machine's state, which drifts by several percent between runs of a dozen
   seconds. Per repeat, the arm's time over the no-monitor arm's: for epochs 3 to the last
   (the regular snapshots: the first snapshot's work, the second's first update-lens sprites
   and the last with ``close()`` fall outside), and for the whole run; then the median over
   repeats. The same for the process's CPU time.
3. classify: 50,000 7x7 kernels against the shipped 10,000-code spectrum, kernelwatch's index
   against brute force (``bench_classify.py``: each side in its own process, the two alternating
   over three rounds), same decisions.
4. process: what a further snapshot costs the process, as a user's process pays it: the whole
   process's CPU of a training of
   ``convnext_atto`` (``--steps-per-snapshot`` optimiser steps then a snapshot, 32 times, every
   feature at its default, ``close()`` included) less the same with 8 snapshots, less the same
   two trainings without KernelWatch, over 24. The first snapshot and ``close()`` fall out of the
   difference. Each training runs in a process of its own, whose CPU (every thread's) is counted
   from its first step to its end: the seconds of starting Python and torch, the same in every
   run, would only add their noise. The steps are short (batch 8, 32 px, every core): the CPU of
   a training of batch 32 at 64 px varied by up to 2x between runs on these VMs, which buried the
   snapshots' cost. The four trainings run in a new order each repeat; the median over repeats.

Timing-sensitive: run it with nothing else busy on the machine.
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
from bench_overhead import synthetic_batches, train_epoch  # noqa: E402
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


class Arm:
    """One ``convnext_atto`` training of the overhead part (``none``, ``kernelwatch`` or
    ``histograms``), trained one epoch at a time so that the arms can take turns."""

    def __init__(self, name: str, batches: list, log_dir: str):
        torch.manual_seed(0)
        self.name, self.batches = name, batches
        self.model = timm.create_model("convnext_atto", pretrained=False, num_classes=4)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-3)
        self.watch = KernelWatch(log_dir, every=1) if name == "kernelwatch" else None
        if name == "histograms":
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir)

    def epoch_end(self, epoch: int) -> None:
        if self.watch is not None:
            self.watch.on_epoch_end(self.model, epoch)
        elif self.name == "histograms":
            for name, parameter in self.model.named_parameters():
                self.writer.add_histogram(name, parameter, epoch)

    def segment(self, epoch: int) -> tuple[float, float]:
        """Wall and process CPU seconds of the previous epoch's end (epoch 0: before training)
        and then epoch ``epoch``'s steps: a snapshot's background work overlaps its own arm's
        next epoch."""
        start, cpu = time.perf_counter(), time.process_time()
        self.epoch_end(epoch - 1)
        train_epoch(self.model, self.optimizer, self.batches)
        # Whatever a snapshot left in the background finishes inside its own arm's turn, not
        # in the next arm's (process CPU counts every thread).
        if self.watch is not None:
            self.watch.flush()
        elif self.name == "histograms":
            self.writer.flush()
        return time.perf_counter() - start, time.process_time() - cpu

    def finish(self, epochs: int) -> tuple[float, float]:
        """The last epoch's end and ``close()``."""
        start, cpu = time.perf_counter(), time.process_time()
        self.epoch_end(epochs)
        if self.watch is not None:
            self.watch.close()
        elif self.name == "histograms":
            self.writer.close()
        return time.perf_counter() - start, time.process_time() - cpu


def part_overhead(epochs: int, steps: int, repeats: int) -> None:
    arms = ["none", "kernelwatch", "histograms"]
    print(
        f"\n== per-epoch overhead: convnext_atto, {epochs} epochs x {steps} steps (batch 32, 64 px), "
        f"a snapshot every epoch, {torch.get_num_threads()} training threads on {os.cpu_count()} CPUs, "
        "the three arms taking turns epoch by epoch =="
    )
    batches = synthetic_batches(steps, 32, 64)
    # [arm][repeat] -> per segment (wall, cpu); segment 0 holds epoch 1 (and the first snapshot),
    # the last one the final epoch end and close().
    runs: dict[str, list[list[tuple[float, float]]]] = {arm: [] for arm in arms}
    with tempfile.TemporaryDirectory() as root:
        warm_up = Arm("none", batches[:2], root)
        warm_up.segment(1)
        for repeat in range(repeats):
            trainings = {arm: Arm(arm, batches, os.path.join(root, f"{arm}{repeat}")) for arm in arms}
            for arm in arms:
                runs[arm].append([])
            for epoch in range(1, epochs + 1):
                # Each epoch in a new order: drift over seconds falls on every arm alike.
                turn = (repeat + epoch) % len(arms)
                for arm in arms[turn:] + arms[:turn]:
                    runs[arm][-1].append(trainings[arm].segment(epoch))
            for arm in arms:
                runs[arm][-1].append(trainings[arm].finish(epochs))
            whole = {arm: sum(wall for wall, _ in runs[arm][-1]) for arm in arms}
            print(f"  repeat {repeat}: " + ", ".join(f"{arm} {whole[arm]:.2f} s" for arm in arms))
    epoch = statistics.median(wall for run in runs["none"] for wall, _ in run[:-1])

    def ratios(arm: str, which: slice, column: int) -> list[float]:
        """Per repeat: the arm's seconds over the no-monitor arm's, for the segments ``which``."""
        return [
            sum(s[column] for s in run[which]) / sum(s[column] for s in none[which]) - 1
            for run, none in zip(runs[arm], runs["none"])
        ]

    def paired(values: list[float]) -> str:
        return f"{100 * statistics.median(values):+.2f} % ({', '.join(f'{100 * v:+.1f}' for v in values)} %)"

    # Epochs 3 to the last hold the regular snapshots (after epochs 2 to the second last); the
    # one before training, the one after epoch 1 (the update lens's first sprites) and the last
    # with close() fall outside.
    regular = slice(2, epochs)
    for arm, label in (("kernelwatch", "KernelWatch every epoch"), ("histograms", "add_histogram every epoch")):
        each_epoch = [
            run[e][0] / none[e][0] - 1 for run, none in zip(runs[arm], runs["none"]) for e in range(2, epochs)
        ]
        low, middle, high = statistics.quantiles(each_epoch, n=4)
        print(
            f"{label:<26} epochs 3 to {epochs} {paired(ratios(arm, regular, 0))} per epoch vs no monitor "
            f"(each epoch's pair: median {100 * middle:+.2f} %, quartiles {100 * low:+.1f} to {100 * high:+.1f} %; "
            f"epoch {epoch:.2f} s); whole run with close() {paired(ratios(arm, slice(None), 0))}; "
            f"process CPU, whole run {paired(ratios(arm, slice(None), 1))}"
        )


#: The process part's training step: short, so that its own variation leaves the snapshots' cost visible.
PROCESS_BATCH, PROCESS_SIZE = 8, 32


def process_child(snapshots: int, watch: bool, steps: int) -> None:
    """One training of ``part_process``, in a process of its own."""
    torch.manual_seed(0)
    model = timm.create_model("convnext_atto", pretrained=False, num_classes=4)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    batches = synthetic_batches(steps, PROCESS_BATCH, PROCESS_SIZE)
    with tempfile.TemporaryDirectory() as log_dir:
        start = time.process_time()
        kernelwatch = KernelWatch(log_dir) if watch else None
        for step in range(snapshots):
            train_epoch(model, optimizer, batches)
            if kernelwatch is not None:
                kernelwatch.snapshot(model, step)
        if kernelwatch is not None:
            kernelwatch.close()
        print(time.process_time() - start)


def part_process(steps: int, repeats: int, long: int = 32, short: int = 8) -> None:
    print(
        f"\n== process CPU per further snapshot: convnext_atto, {steps} step(s) of batch {PROCESS_BATCH} at "
        f"{PROCESS_SIZE} px per snapshot, "
        f"({long} - {short} snapshots) - (the same without KernelWatch), over {long - short} =="
    )

    def cpu_of(snapshots: int, watch: bool) -> float:
        command = [sys.executable, __file__, "--process-child", str(snapshots), str(int(watch)), str(steps)]
        return float(subprocess.run(command, check=True, capture_output=True, text=True).stdout.split()[-1])

    runs = [(long, True), (short, True), (long, False), (short, False)]
    costs = []
    for repeat in range(repeats):
        turn = repeat % len(runs)
        cpu = {run: cpu_of(*run) for run in runs[turn:] + runs[:turn]}
        costs.append(((cpu[long, True] - cpu[short, True]) - (cpu[long, False] - cpu[short, False])) / (long - short))
        print(f"  repeat {repeat}: " + ", ".join(f"{n} snapshots{'' if w else ' unwatched'} {c:.2f} s" for (n, w), c in cpu.items())
              + f" -> {1000 * costs[-1]:.1f} ms")  # fmt: skip
    print(f"process CPU per further snapshot: {1000 * statistics.median(costs):.1f} ms (median of {repeats}; "
          f"repeats {', '.join(f'{1000 * c:.0f}' for c in costs)} ms)")  # fmt: skip


def part_classify(kernels: int, repeats: int) -> None:
    print(f"\n== classify {kernels:,} 7x7 kernels: kernelwatch's index vs brute force ==")
    cmd = [sys.executable, str(HERE / "bench_classify.py"), "--kernels", str(kernels), "--repeats", str(repeats)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    print(out.rstrip())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", nargs="+", choices=("worker", "overhead", "classify", "process"),
                        default=["worker", "overhead", "classify", "process"])
    parser.add_argument("--steps-per-snapshot", type=int, default=1, help="optimiser steps before each snapshot (process)")
    parser.add_argument("--process-child", nargs=3, type=int, help=argparse.SUPPRESS)
    parser.add_argument("--models", nargs="+", default=["convnext_atto", "convnext_tiny", "convnext_base"])
    parser.add_argument("--cycle", type=int, default=20, help="snapshots after the first in the worker part")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps per epoch")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--kernels", type=int, default=50_000)
    args = parser.parse_args()
    # Random models trip the anomaly flags at every snapshot: log noise here.
    logging.getLogger("kernelwatch").setLevel(logging.ERROR)
    if args.process_child:
        snapshots, watch, steps = args.process_child
        process_child(snapshots, bool(watch), steps)
        return
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}")
    if "worker" in args.parts:
        part_worker(args.models, args.cycle)
    if "overhead" in args.parts:
        part_overhead(args.epochs, args.steps, args.repeats)
    if "classify" in args.parts:
        part_classify(args.kernels, args.repeats)
    if "process" in args.parts:
        part_process(args.steps_per_snapshot, args.repeats)


if __name__ == "__main__":
    main()
