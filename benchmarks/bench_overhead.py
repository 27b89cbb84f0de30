"""Overhead of KernelWatch (a snapshot every epoch) on a CPU training run of timm's ConvNeXt-Atto.

    python benchmarks/bench_overhead.py [--epochs 3] [--steps 40] [--repeats 4] [--threads N]

Runs with and without KernelWatch alternate in one process (fixed seeds, same synthetic data,
a fresh model each run); the medians over ``--repeats`` pairs are compared. Each run's wall
time counts training and every ``on_epoch_end`` call; ``close()`` (waiting for the worker to
classify the last snapshot) is reported apart, since it is a fixed cost per run, not per
epoch, and then added in a second, whole-run ratio. Blocking time is the time the training thread spends inside ``on_epoch_end``.

Then the blocking time for ConvNeXt-Tiny (6,624 depthwise kernels) after one training step,
and how long the background worker takes per snapshot of it.

``--threads`` (``torch.set_num_threads``) is the training's intra-op thread count; it defaults
to torch's own default (every core). ``--threads 1`` on two cores leaves a core to
KernelWatch's worker thread, which uses one.
No weights are downloaded (``pretrained=False``).
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import tempfile
import time
from collections.abc import Callable

import timm
import torch
from torch import nn

from kernelwatch import KernelWatch


def synthetic_batches(steps: int, batch: int, size: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Random images whose label is the quadrant with the brightest mean: learnable, not trivial."""
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(steps, batch, 3, size, size, generator=gen)
    half = size // 2
    quadrants = torch.stack(
        [images[..., :half, :half], images[..., :half, half:], images[..., half:, :half], images[..., half:, half:]]
    )
    labels = quadrants.mean(dim=(3, 4, 5)).argmax(0)
    return list(zip(images, labels))


def fit(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: list[tuple[torch.Tensor, torch.Tensor]],
    epochs: int,
    epoch_end: Callable[[int], None],
) -> None:
    """Train for ``epochs`` over ``batches``, calling ``epoch_end`` before the first and after each."""
    epoch_end(0)
    for epoch in range(1, epochs + 1):
        train_epoch(model, optimizer, batches)
        epoch_end(epoch)


def train_epoch(
    model: nn.Module, optimizer: torch.optim.Optimizer, batches: list[tuple[torch.Tensor, torch.Tensor]]
) -> None:
    """One optimizer step per batch."""
    for images, labels in batches:
        loss = nn.functional.cross_entropy(model(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def train(
    batches: list[tuple[torch.Tensor, torch.Tensor]], epochs: int, watch: KernelWatch | None
) -> tuple[float, float, float, list[float]]:
    """One run from a fresh seeded model: (wall seconds, process CPU seconds, seconds in close,
    seconds in each on_epoch_end). CPU time includes close, so it counts every snapshot's work."""
    torch.manual_seed(0)
    model = timm.create_model("convnext_atto", pretrained=False, num_classes=4)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    blocking = []
    start, cpu_start = time.perf_counter(), time.process_time()

    def epoch_end(epoch: int) -> None:
        if watch is not None:
            begin = time.perf_counter()
            watch.on_epoch_end(model, epoch)
            blocking.append(time.perf_counter() - begin)

    fit(model, optimizer, batches, epochs, epoch_end)
    wall = time.perf_counter() - start
    closing = 0.0
    if watch is not None:
        begin = time.perf_counter()
        watch.close()
        closing = time.perf_counter() - begin
    return wall, time.process_time() - cpu_start, closing, blocking


def bench_tiny(snapshots: int) -> tuple[list[float], list[float], int]:
    """ConvNeXt-Tiny after one step: blocking seconds per snapshot, worker seconds per snapshot, kernels."""
    torch.manual_seed(0)
    model = timm.create_model("convnext_tiny", pretrained=False, num_classes=4)
    ((images, labels),) = synthetic_batches(1, 8, 64)
    nn.functional.cross_entropy(model(images), labels).backward()
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    n_kernels = sum(m.weight.shape[0] for m in model.modules() if isinstance(m, nn.Conv2d) and m.groups > 1)
    blocking, worker = [], []
    with tempfile.TemporaryDirectory() as log_dir, KernelWatch(log_dir) as watch:
        for step in range(snapshots):
            begin = time.perf_counter()
            watch.snapshot(model, step)
            blocking.append(time.perf_counter() - begin)
            begin = time.perf_counter()
            watch.flush()  # waits for the worker, so the next call never blocks on a full queue
            worker.append(time.perf_counter() - begin)
    return blocking, worker, n_kernels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps per epoch")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=64, help="image side in pixels")
    parser.add_argument("--repeats", type=int, default=4, help="pairs of runs (with, without)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--tiny-snapshots", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    # Briefly trained random models trip the anomaly flags every epoch; their log lines are noise here.
    logging.getLogger("kernelwatch").setLevel(logging.ERROR)
    print(f"torch {torch.__version__}, {args.threads} training thread(s) of {os.cpu_count()} CPUs")

    batches = synthetic_batches(args.steps, args.batch, args.size)
    train(batches[:2], 1, None)  # warm-up: allocator, kernels' first-call costs
    plain, watched, closing, blocking = [], [], [], []
    cpu: dict[str, list[float]] = {"with": [], "without": []}
    with tempfile.TemporaryDirectory() as root:
        for repeat in range(args.repeats):
            # Alternating sides, starting with a different one each time, evens out drift in load.
            for side in ("with", "without") if repeat % 2 == 0 else ("without", "with"):
                if side == "with":
                    watch = KernelWatch(os.path.join(root, str(repeat)), every=1)
                    wall, cpu_s, close_s, block = train(batches, args.epochs, watch)
                    watched.append(wall)
                    closing.append(close_s)
                    blocking.extend(block)
                else:
                    wall, cpu_s, _, _ = train(batches, args.epochs, None)
                    plain.append(wall)
                cpu[side].append(cpu_s)
                print(f"  repeat {repeat} {side:>7}: {watched[-1] if side == 'with' else plain[-1]:.2f} s")

    without, with_ = statistics.median(plain), statistics.median(watched)
    epoch_s = without / args.epochs
    print(f"\nconvnext_atto, {args.epochs} epochs x {args.steps} steps (batch {args.batch}, {args.size}x{args.size}),")
    print(f"{args.epochs + 1} snapshots per run, median of {args.repeats} runs each:")
    print(f"  without KernelWatch   {without:8.2f} s  ({epoch_s:.2f} s per epoch)")
    print(f"  with KernelWatch      {with_:8.2f} s")
    print(f"  overhead ratio        {100 * (with_ / without - 1):+8.2f} %")
    with_close = statistics.median(w + c for w, c in zip(watched, closing))
    print(f"  ... with close()      {100 * (with_close / without - 1):+8.2f} %  (the run as a whole, {with_close:.2f} s)")
    extra_cpu = statistics.median(cpu["with"]) - statistics.median(cpu["without"])
    print(f"  extra CPU time        {extra_cpu:8.2f} s  ({extra_cpu / (args.epochs + 1):.2f} s per snapshot, all threads)")
    print(f"  close() at the end    {statistics.median(closing):8.2f} s median (last snapshot's classification)")
    print(
        f"  blocking per snapshot {1000 * statistics.median(blocking):8.1f} ms median, "
        f"{1000 * max(blocking):.1f} ms max ({len(blocking)} calls)"
    )

    tiny_block, tiny_worker, n_kernels = bench_tiny(args.tiny_snapshots)
    print(f"\nconvnext_tiny ({n_kernels} depthwise kernels), {args.tiny_snapshots} snapshots:")
    print(
        f"  blocking per snapshot {1000 * statistics.median(tiny_block):8.1f} ms median, "
        f"{1000 * max(tiny_block):.1f} ms max"
    )
    print(f"  worker per snapshot   {statistics.median(tiny_worker):8.2f} s median (background thread)")


if __name__ == "__main__":
    main()
