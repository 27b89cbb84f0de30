"""Measure what ``kernelwatch demo`` shows, from the records its watches wrote: per arm and depthwise
layer, at the last snapshot, for the weights and for the update ``W_t - W_0``, the clustered
fraction against both nulls (the shuffled and the smooth one, ``kernelwatch.structure``) and the
median dissimilarity against both; and each arm's anomaly flags.

    python benchmarks/measure_demo.py [--seeds 0 1 2] [--log-dir DIR] [--steps N] [--set NAME=VALUE]

It runs the demo's own training (``kernelwatch.demo.train_arms``, the default configuration
unless overridden; one log directory per seed) and reads it back with ``kernelwatch summary``'s
reader, so the figures are the monitor's own, nulls of 64 kernels per layer. ``--set
NAME=VALUE`` overrides a field of the configuration (e.g. ``--set lr=3e-3``), for exploring.
Prints the wall time of each training and the CPU time this process used. Measured figures:
docs/spectra.md ("What the demo shows").
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import resource
import tempfile
import time
from collections import Counter

from kernelwatch import demo
from kernelwatch import format as fmt
from kernelwatch.summary import summarise


def chance(figures: dict, suffix: str) -> tuple[float | None, float | None]:
    """The shuffled and the smooth null's figure ``suffix`` (clustered_fraction, median_dissimilarity)."""
    return figures[f"null_{suffix}"], figures[f"smooth_null_{suffix}"]


def cells(figures: dict) -> str:
    """clustered / shuffled / smooth / above chance; median dissimilarity / shuffled / smooth / closer than chance."""
    shuffled, smooth = chance(figures, "clustered_fraction")
    median_shuffled, median_smooth = chance(figures, "median_dissimilarity")
    closer = fmt.chance_dissimilarity(median_shuffled, median_smooth) - figures["median_dissimilarity"]
    return (
        f"{figures['clustered_fraction']:.2f} / {shuffled:.2f} / {smooth:.2f} / **{figures['structure_above_chance']:+.2f}** | "
        f"{figures['median_dissimilarity']:.3f} / {median_shuffled:.3f} / {median_smooth:.3f} / {closer:+.3f}"
    )


def report(seed: int, log_dir: str, wall: float) -> None:
    summary = summarise(log_dir)["runs"]
    print(f"\n### Seed {seed} (training {wall:.0f} s wall; runs in {log_dir})\n")
    print("| arm | layer | weights: clustered / shuffled / smooth / above chance | median dissim. / shuffled / smooth "
          "/ closer than chance | update: clustered / shuffled / smooth / above chance | median dissim. / shuffled "
          "/ smooth / closer than chance |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    for arm in demo.ARMS:
        for name, layer in summary[arm]["layers"].items():
            last = layer["series"][-1]
            print(f"| {arm} | {name} | {cells(last)} | {cells(last['update'])} |")
    print()
    for arm in demo.ARMS:
        flags = Counter((flag["kind"], flag["step"]) for flag in summary[arm]["anomalies"] if flag["severity"] != "info")
        listed = ", ".join(f"{kind} at {step}" + (f" (x{n})" if n > 1 else "") for (kind, step), n in sorted(flags.items()))
        print(f"- {arm}: {listed or 'no flags'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--log-dir", help="where the runs go, a directory per seed (default: a temporary directory)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--steps", type=int)
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE")
    args = parser.parse_args()

    config = demo.DEFAULT if args.steps is None else dataclasses.replace(demo.DEFAULT, steps=args.steps)
    for item in args.set:
        name, value = item.split("=", 1)
        kind = type(getattr(config, name))
        config = dataclasses.replace(config, **{name: tuple(value.split(",")) if kind is tuple else kind(value)})
    print(config)
    root = args.log_dir or tempfile.mkdtemp(prefix="kernelwatch-demo-")
    for seed in args.seeds:
        log_dir = os.path.join(root, f"seed{seed}")
        start = time.perf_counter()
        demo.train_arms(log_dir, config, seed)
        report(seed, log_dir, time.perf_counter() - start)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    print(f"\nprocess CPU {usage.ru_utime + usage.ru_stime:.0f} s")


if __name__ == "__main__":
    main()
