"""Measure the first-layer shift alert (anomaly rule (e), ``docs/anomalies.md``) on real trainings.

A small CNN (a 5x5 stride-2 stem with BatchNorm, two depthwise blocks) trains under
:class:`kernelwatch.KernelWatch` on crops of generated dead-leaves images. In the ``blur`` and
``noise`` runs the data pipeline changes half way: from then on the images are blurred
(Gaussian, sigma 1.5 px) or get white noise (0.5 of their standard deviation); the ``none``
runs are the controls, the same seed and batches without the change. Prints, per run, the
steps of the ``first_layer_shift`` flags and each figure of the rule at every snapshot (the
update reflections and the input detail, against their baselines), then how many runs of
each kind were flagged, and when.

Run through ``/work/bin/heavy`` (about 15 s of CPU per run on one thread)::

    python benchmarks/measure_first_layer_shift.py --seeds 0,1,2 --optimisers adamw,sgd
"""

from __future__ import annotations

import argparse
import itertools
import tempfile
import time

import numpy as np
import torch
from torch import nn

from kernelwatch import KernelWatch
from kernelwatch.demo import Block, _blur, make_images

FAULTS = ("none", "blur", "noise")
BLUR_SIGMA = 1.5
NOISE_STD = 0.5


def build_model(seed: int, width: int = 32) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, width, 5, stride=2, padding=2), nn.BatchNorm2d(width), nn.GELU(),
        Block(width, 5), Block(width, 5), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 16),
    )  # fmt: skip


def crops(images: torch.Tensor, n: int, size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    labels = torch.randint(len(images), (n,), generator=generator)
    ys = torch.randint(images.shape[2] - size + 1, (n,), generator=generator)
    xs = torch.randint(images.shape[3] - size + 1, (n,), generator=generator)
    return torch.stack([images[i, :, y : y + size, x : x + size] for i, y, x in zip(labels, ys, xs)]), labels


def blurred(images: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(np.stack([_blur(im.numpy().transpose(1, 2, 0), BLUR_SIGMA).transpose(2, 0, 1) for im in images]))


def train(
    log_dir: str, fault: str, seed: int, optimiser: str = "adamw", steps: int = 400, every: int = 25
) -> tuple[list[int], list[tuple[int, dict]]]:
    """``(steps flagged, [(step, the rule's figures)])`` of one run whose data changes at
    ``steps // 2`` (``fault`` "blur" or "noise"; "none" never)."""
    images = make_images(16, 128, seed)
    faulty = blurred(images) if fault == "blur" else images
    model = build_model(seed)
    if optimiser == "adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.05)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9, weight_decay=5e-4)
    batches, noise = torch.Generator().manual_seed(seed + 1), torch.Generator().manual_seed(seed + 2)
    flags: list[int] = []
    watch = KernelWatch(log_dir, every=every, handle_sigterm=False, on_anomaly=lambda a: flags.append(a.step)
                        if a.kind == "first_layer_shift" else None)  # fmt: skip
    # The rule's figures at each snapshot, as the detector sees them (for the report only).
    shift, seen = watch._detector.first_layer, []
    figures = shift.figures
    shift.figures = lambda values: seen.append(dict(values)) or figures(values)
    with watch:
        for step in range(steps + 1):
            watch.snapshot(model, step)
            if step == steps:
                break
            switched = fault != "none" and step >= steps // 2
            x, y = crops(faulty if switched else images, 32, 32, batches)
            if switched and fault == "noise":
                x = x + NOISE_STD * torch.randn(x.shape, generator=noise)
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        watch.flush()
    return sorted(set(flags)), list(zip(watch.steps, seen))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--optimisers", default="adamw")
    parser.add_argument("--faults", default=",".join(FAULTS))
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--quiet", action="store_true", help="only the flags, not every snapshot's figures")
    args = parser.parse_args()
    torch.set_num_threads(1)
    flagged: dict[str, list[str]] = {}
    for optimiser, seed, fault in itertools.product(
        args.optimisers.split(","), [int(s) for s in args.seeds.split(",")], args.faults.split(",")
    ):
        start = time.process_time()
        with tempfile.TemporaryDirectory() as log_dir:
            flags, figures = train(log_dir, fault, seed, optimiser, args.steps)
        switch = "" if fault == "none" else f", switch at step {args.steps // 2}"
        print(f"{optimiser} seed {seed} {fault}{switch}: flagged at {flags or 'no step'} "
              f"({time.process_time() - start:.0f} s CPU)", flush=True)  # fmt: skip
        flagged.setdefault(fault, []).append(f"{optimiser}/{seed}: {flags[0] if flags else '-'}")
        if not args.quiet:
            for step, values in figures:
                shown = ", ".join(f"{k} {v:.4g}" for k, v in values.items() if v is not None)
                print(f"    step {step:4d}: {shown}")
    for fault, runs in flagged.items():
        hits = sum(not run.endswith("-") for run in runs)
        print(f"{fault}: {hits} of {len(runs)} runs flagged (first flag: {'; '.join(runs)})")


if __name__ == "__main__":
    main()
