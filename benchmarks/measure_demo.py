"""Measure what ``kernelwatch demo`` shows: per arm, at the first and last snapshot, the share of
depthwise kernels that are clustered, their median dissimilarity to the nearest prototype, and
the same for the update ``W_t - W_0``, each against a null of the same kernels spatially shuffled.

    PYTHONPATH=. python benchmarks/measure_demo.py [--log-dir DIR] [--steps N] [--seed S] [--shuffles 20]

It runs the demo's own training (``kernelwatch.demo.train_arms``, the default configuration
unless overridden) and classifies with ``Spectrum.pretrained(k).classify(kernels, exact=True)``.
The shuffled null permutes each kernel's k*k entries independently (``--shuffles`` draws,
averaged). It also checks the snapshot steps each arm's event file holds, and prints the wall
time of the whole training and the CPU time this process used. ``--set NAME=VALUE`` overrides
a field of the configuration (e.g. ``--set lr=3e-3``), for exploring.

Measured (torch 2.14.1, 2 CPU cores, default configuration, torch's default 2 threads; the
figures are the same with one thread). Seeds 0 / 1 / 2, at the last snapshot (step 250),
model-wide over 4 x 64 depthwise 7x7 kernels (dog-init: 0.99 clustered at step 0, the others
0.00); nulls from 20 shuffles (5,120 kernels), weights' nulls 0.000 too:

    arm         weights clustered   weights median dissimilarity   update clustered   update null
    default     0.000/0.004/0.000   0.726->0.662 / 0.719->0.660 / 0.710->0.668   0.297/0.309/0.258   0/0/0
    dog-init    0.887/0.852/0.859   0.049->0.147 / 0.037->0.160 / 0.041->0.148   0.230/0.266/0.215   0/0/0
    small-init  0.191/0.254/0.223   0.726->0.449 / 0.719->0.410 / 0.710->0.446   0.297/0.367/0.324   0/0/0
    memorise    0.027/0.027/0.027   0.726->0.642 / 0.719->0.642 / 0.710->0.632   0.289/0.320/0.305   0/0/0

Update clustered per layer (blocks 0..3), seed 0: default 0.17/0.11/0.19/0.72, memorise
0.03/0.05/0.31/0.77 (seeds 1, 2: default 0.17/0.05/0.20/0.81, 0.08/0.11/0.22/0.62; memorise
0.12/0.09/0.25/0.81, 0.06/0.12/0.27/0.77). Model-wide, memorising 256 crops with random labels
cannot be told apart from the default arm at this scale: its updates are as structured, its
last block's weights more so (0.11 clustered against 0.00-0.02).

Wall time of ``kernelwatch demo --log-dir DIR`` (defaults): 2 min 10 s on idle cores, 2 min 37 s
with other jobs on the machine part of the time.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import tempfile
import time

import numpy as np
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from kernelwatch import demo
from kernelwatch import format as fmt
from kernelwatch.spectrum import Spectrum
from kernelwatch.structure import median_dissimilarity, spatially_shuffled


def lens(spectrum: Spectrum, layers: dict[str, torch.Tensor], shuffles: int) -> dict:
    """Clustered fraction (model-wide and per layer), median dissimilarity over valid kernels
    and the shuffled null, of one set of kernels."""
    everything = torch.cat(list(layers.values()))
    result = spectrum.classify(everything, exact=True)
    null = [spectrum.classify(spatially_shuffled(everything, seed), exact=True).clustered.mean() for seed in range(shuffles)]
    sizes = np.cumsum([0, *(len(k) for k in layers.values())])
    return {
        "clustered": float(result.clustered.mean()),
        "median_dissimilarity": median_dissimilarity(result),
        "null": float(np.mean(null)),
        "layers": {n: float(result.clustered[a:b].mean()) for n, a, b in zip(layers, sizes[:-1], sizes[1:])},
        "layers_median_dissimilarity": {
            n: float(np.nanmedian(result.dissimilarity[a:b])) for n, a, b in zip(layers, sizes[:-1], sizes[1:])
        },
    }


def event_steps(run_dir: str) -> list[int]:
    """Steps of the snapshots in a run's kernelwatch events (of its first depthwise layer)."""
    acc = EventAccumulator(run_dir, size_guidance={"tensors": 0})
    acc.Reload()
    tags = sorted(t for t in acc.Tags()["tensors"] if t.startswith(fmt.make_tag(fmt.CLUSTERED_FRACTION, "")))
    return [e.step for e in acc.Tensors(tags[0])] if tags else []


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--log-dir", help="where the runs go (default: a temporary directory)")
    parser.add_argument("--steps", type=int)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--shuffles", type=int, default=20)
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()

    config = demo.QUICK if args.quick else demo.DEFAULT
    if args.steps:
        config = dataclasses.replace(config, steps=args.steps)
    for item in args.set:
        name, value = item.split("=", 1)
        kind = type(getattr(config, name))
        config = dataclasses.replace(config, **{name: tuple(value.split(",")) if kind is tuple else kind(value)})
    print(config)
    log_dir = args.log_dir or tempfile.mkdtemp(prefix="kernelwatch-demo-")
    start = time.perf_counter()
    arms = demo.train_arms(log_dir, config, args.seed)
    wall = time.perf_counter() - start
    usage = resource.getrusage(resource.RUSAGE_SELF)

    spectrum = Spectrum.pretrained(config.kernel_size)
    figures = {"config": dataclasses.asdict(config), "wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime}
    for arm in arms:
        last = {n: c.weight.detach().reshape(-1, *c.kernel_size).clone() for n, c in demo._depthwise(arm.model).items()}
        figures[arm.name] = {
            "first": lens(spectrum, arm.first, args.shuffles),
            "last": lens(spectrum, last, args.shuffles),
            "update": lens(spectrum, {n: last[n] - arm.first[n] for n in last}, args.shuffles),
            "update_norm_ratio": float(
                torch.cat([(last[n] - arm.first[n]).flatten() for n in last]).norm()
                / torch.cat([arm.first[n].flatten() for n in last]).norm()
            ),
            "train_loss": arm.loss,
            "train_accuracy": arm.accuracy,
            "train_seconds": arm.seconds,
            "snapshots": event_steps(f"{log_dir}/{arm.name}"),
        }

    print(f"training wall {wall:.1f} s, process CPU {figures['cpu_s']:.1f} s, runs in {log_dir}")
    print(
        f"{'arm':<11} {'acc':>5} {'W first':>7} {'W last':>6} {'W null':>6} {'median dissim.':>14} "
        f"{'U':>6} {'U null':>6} {'|U|/|W0|':>8}"
    )
    for arm in arms:
        f = figures[arm.name]
        first, last, update = f["first"], f["last"], f["update"]
        print(
            f"{arm.name:<11} {f['train_accuracy']:>5.2f} {first['clustered']:>7.3f} {last['clustered']:>6.3f} "
            f"{last['null']:>6.3f} {first['median_dissimilarity']:>6.3f}->{last['median_dissimilarity']:.3f} "
            f"{update['clustered']:>6.3f} {update['null']:>6.4f} {f['update_norm_ratio']:>8.2f}"
        )
    print("per layer, last snapshot: weights clustered / update clustered / weights median dissimilarity")
    for arm in arms:
        f = figures[arm.name]
        cells = "  ".join(
            f"{n}: {f['last']['layers'][n]:.2f}/{f['update']['layers'][n]:.2f}/"
            f"{f['last']['layers_median_dissimilarity'][n]:.3f}"
            for n in f["last"]["layers"]
        )
        print(f"  {arm.name:<11} {cells}")
    print("snapshots:", {arm.name: len(figures[arm.name]["snapshots"]) for arm in arms})
    if args.json:
        with open(args.json, "w") as out:
            json.dump(figures, out, indent=1)


if __name__ == "__main__":
    main()
