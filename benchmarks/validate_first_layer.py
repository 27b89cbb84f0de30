"""Validate :mod:`kernelwatch.first_layer` on paired CPU trainings.

The same small CNN (a 5x5 stem, then depthwise blocks), the same seed and the same batches,
trained on generated dead-leaves images that differ in one property: ``sharp`` (the base),
``blur`` (Gaussian, sigma 1.5 px), ``noise`` (white noise added to every crop) and ``red``
(the red channel 1.4 times stronger, the blue one 1/1.4). Set-ups: SGD or AdamW, with or
without BatchNorm, true or random labels, several seeds.

``train`` writes, per set-up, seed and variant, the stem's weights at initialisation and at the
end and a sample of the training patches (``.npz``); ``report`` reads them and prints

- the whitening score of the initial and the trained stem against the training patches, and
  (for comparison) how far their log-profiles lean towards the whitening limit itself,
- the energy profiles, per group of principal components,
- how often each pair of variants ranks right by its reflection (sharp > blur in sharpness,
  noise > sharp in noise, red > sharp in the red value), per set-up and over all set-ups.

The reflections' calibration was chosen on the ``adamw-bn`` set-up; ``report --exclude
adamw-bn`` gives the figures on set-ups that were not tuned on. One training takes a few
seconds on one thread; run through ``/work/bin/heavy``::

    python benchmarks/validate_first_layer.py train --out /tmp/fl --setups adamw-bn --seeds 0,1,2
    python benchmarks/validate_first_layer.py report /tmp/fl --exclude adamw-bn
"""

from __future__ import annotations

import argparse
import itertools
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from kernelwatch.demo import _blur, dead_leaves
from kernelwatch.first_layer import first_layer_report, image_patches

VARIANTS = ("sharp", "blur", "noise", "red")
#: (optimiser, BatchNorm, labels, stem kernel size = stride or None for 5x5 stride 2) of each set-up.
SETUPS = {
    "adamw-bn": ("adamw", True, "true", None),
    "sgd-bn": ("sgd", True, "true", None),
    "adamw-nobn": ("adamw", False, "true", None),
    "sgd-nobn": ("sgd", False, "true", None),
    "adamw-bn-random": ("adamw", True, "random", None),
    "sgd-nobn-random": ("sgd", False, "random", None),
    "sgd-bn-random": ("sgd", True, "random", None),
    "adamw-patch4": ("adamw", True, "true", 4),  # a ConvNeXt-like patchify stem
}
BLUR_SIGMA = 1.5
NOISE_STD = 0.5  # of the base images' unit standard deviation
RED_GAIN = 1.4


@dataclass(frozen=True)
class Config:
    steps: int = 300
    batch: int = 32
    crop: int = 32
    width: int = 32
    depth: int = 2
    stem: int = 5
    n_classes: int = 16
    image_size: int = 128
    random_crops: int = 512


def base_images(n: int, size: int, seed: int) -> np.ndarray:
    """``[n, 3, size, size]`` sharp dead-leaves images (little blur), zero mean, unit variance."""
    rng = np.random.default_rng(seed)
    images = np.stack(
        [
            dead_leaves(
                rng,
                size,
                exponent=rng.uniform(2.4, 3.4),
                r_min=rng.uniform(1.0, 2.5),
                aspect=rng.uniform(1.0, 3.0),
                angle=rng.uniform(0, math.pi),
                square=rng.random() < 0.35,
                blur=0.3,
            )
            for _ in range(n)
        ]
    )
    return (images - images.mean()) / images.std()


def variant_images(images: np.ndarray, variant: str) -> np.ndarray:
    """The images a pipeline with fault ``variant`` would feed; noise is added per crop, later."""
    if variant == "blur":
        return np.stack([_blur(im.transpose(1, 2, 0), BLUR_SIGMA).transpose(2, 0, 1) for im in images])
    if variant == "red":
        gains = np.array([RED_GAIN, 1.0, 1.0 / RED_GAIN], dtype=images.dtype)[:, None, None]
        return images * gains
    return images


class Block(nn.Module):
    def __init__(self, width: int, norm: bool):
        super().__init__()
        self.depthwise = nn.Conv2d(width, width, 7, padding=3, groups=width)
        self.pointwise = nn.Conv2d(width, width, 1)
        self.norm = nn.BatchNorm2d(width) if norm else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.norm(self.pointwise(nn.functional.gelu(self.depthwise(x))))


def build_model(config: Config, norm: bool, patch: int | None = None) -> nn.Module:
    if patch:
        stem = nn.Conv2d(3, config.width, patch, stride=patch)
    else:
        stem = nn.Conv2d(3, config.width, config.stem, stride=2, padding=config.stem // 2)
    layers = [stem, nn.BatchNorm2d(config.width) if norm else nn.Identity(), nn.GELU()]
    layers += [Block(config.width, norm) for _ in range(config.depth)]
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(config.width, config.n_classes)]
    return nn.Sequential(*layers).to(memory_format=torch.channels_last)


def crops(images: torch.Tensor, n: int, crop: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    labels = torch.randint(len(images), (n,), generator=generator)
    ys = torch.randint(images.shape[2] - crop + 1, (n,), generator=generator)
    xs = torch.randint(images.shape[3] - crop + 1, (n,), generator=generator)
    out = torch.stack([images[i, :, y : y + crop, x : x + crop] for i, y, x in zip(labels, ys, xs)])
    return out, labels


def train(
    setup: str, variant: str, seed: int, config: Config = Config()
) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """``(initial stem weight, trained stem weight, training patches, final accuracy)``."""
    optimiser, norm, labels, patch = SETUPS[setup]
    images = torch.from_numpy(
        variant_images(base_images(config.n_classes, config.image_size, seed), variant).astype(np.float32)
    )
    torch.manual_seed(seed)
    model = build_model(config, norm, patch)
    stem = model[0]
    first = stem.weight.detach().clone().numpy()
    if optimiser == "adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.05)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=0.02 if norm else 0.01, momentum=0.9, weight_decay=5e-4)
    batches = torch.Generator().manual_seed(seed + 1)  # the same batches for every variant
    noise = torch.Generator().manual_seed(seed + 2)
    fixed = None
    if labels == "random":
        fixed = (crops(images, config.random_crops, config.crop, batches)[0],
                 torch.randint(config.n_classes, (config.random_crops,), generator=batches))
    correct = []
    for _ in range(config.steps):
        if fixed is None:
            x, y = crops(images, config.batch, config.crop, batches)
        else:
            index = torch.randint(config.random_crops, (config.batch,), generator=batches)
            x, y = fixed[0][index], fixed[1][index]
        if variant == "noise":
            x = x + NOISE_STD * torch.randn(x.shape, generator=noise)
        logits = model(x.contiguous(memory_format=torch.channels_last))
        loss = nn.functional.cross_entropy(logits, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        correct.append((logits.argmax(1) == y).float().mean().item())
    sample, _ = crops(images, 64, config.crop, torch.Generator().manual_seed(seed + 3))
    if variant == "noise":
        sample = sample + NOISE_STD * torch.randn(sample.shape, generator=noise)
    patches = image_patches(sample, stem.kernel_size, stem.stride, 4096, torch.Generator().manual_seed(seed))
    return first, stem.weight.detach().clone().numpy(), patches, float(np.mean(correct[-50:]))


def _train_command(args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    config = Config(steps=args.steps)
    for setup, seed, variant in itertools.product(args.setups.split(","), _ints(args.seeds), VARIANTS):
        path = out / f"{setup}_s{seed}_{variant}.npz"
        if path.exists():
            continue
        start = time.process_time()
        first, last, patches, accuracy = train(setup, variant, seed, config)
        np.savez(path, first=first, last=last, patches=patches, accuracy=accuracy)
        print(f"{path.name}: accuracy {accuracy:.2f}, {time.process_time() - start:.1f} s CPU", flush=True)


#: The pairs whose order the reflections should tell: (reflection, higher variant, lower
#: variant). The first three are the issue's "Done means"; the others tell each fault from the
#: other faults (red and noisy images are as sharp as the base ones, which is not compared).
PAIRS = (
    ("sharpness", "sharp", "blur"),
    ("noise", "noise", "sharp"),
    ("red", "red", "sharp"),
    ("sharpness", "red", "blur"),
    ("noise", "noise", "blur"),
    ("noise", "noise", "red"),
    ("red", "red", "blur"),
    ("red", "red", "noise"),
)


#: Groups of principal components (descending variance) for printing energy profiles.
GROUPS = (slice(0, 1), slice(1, 3), slice(3, 6), slice(6, 10), slice(10, 20), slice(20, 40), slice(40, None))


def _grouped(profile: np.ndarray) -> np.ndarray:
    """Mean energy per group of components, relative to a flat profile (1)."""
    return np.array([profile[g].mean() * len(profile) for g in GROUPS])


def _towards_limit(report) -> float:
    """The projection of the centred log-profile on the centred log of the whitening limit
    (0: flat, 1: the limit): the naive "closer to whitening" that the trajectory does not follow."""
    target = np.log(report.whitening_prediction)
    target -= target.mean()
    profile = np.log(report.energy_profile)
    return float((profile - profile.mean()) @ target / (target @ target))


def _label(group: slice) -> str:
    return f"{group.start + 1}-{group.stop or ''}"


def _value(report, name: str) -> float:
    return report.reflections["colour"][0] if name == "red" else report.reflections[name]


def _report_command(args: argparse.Namespace) -> None:
    runs: dict[tuple[str, str, int], dict[str, dict[str, np.ndarray]]] = {}
    for folder in args.dirs:
        for path in sorted(Path(folder).glob("*.npz")):
            setup, seed, variant = path.stem.rsplit("_", 2)
            if setup in args.exclude.split(","):
                continue
            runs.setdefault((folder, setup, int(seed[1:])), {})[variant] = dict(np.load(path))
    right: dict[str, dict[str, list[bool]]] = {}
    whiten: dict[str, list[tuple[float, float]]] = {}
    profiles: dict[str, tuple[list[np.ndarray], list[np.ndarray]]] = {}
    by_whitening: dict[bool, list[list[bool]]] = {True: [], False: []}
    for (_, setup, _), variants in sorted(runs.items()):
        if set(variants) != set(VARIANTS):
            continue
        reports = {v: first_layer_report(d["last"]) for v, d in variants.items()}
        for name, high, low in PAIRS:
            ok = _value(reports[high], name) > _value(reports[low], name)
            right.setdefault(setup, {}).setdefault(f"{name}: {high} > {low}", []).append(bool(ok))
        trained = min(first_layer_report(d["last"], d["patches"]).whitening for d in variants.values())
        by_whitening[trained >= args.split].append(
            [_value(reports[high], name) > _value(reports[low], name) for name, high, low in PAIRS[:3]]
        )
        for v, d in variants.items():
            init, trained = (first_layer_report(d[k], d["patches"]) for k in ("first", "last"))
            whiten.setdefault(setup, []).append(
                (init.whitening, trained.whitening, _towards_limit(init), _towards_limit(trained))
            )
            first, last = profiles.setdefault(setup, ([], []))
            first.append(_grouped(init.energy_profile))
            last.append(_grouped(trained.energy_profile))
    print(f"{'set-up':<18} {'pair':<26} right")
    total: dict[str, list[bool]] = {}
    for setup, pairs in right.items():
        for pair, oks in pairs.items():
            total.setdefault(pair, []).extend(oks)
            print(f"{setup:<18} {pair:<26} {sum(oks)}/{len(oks)}")
    for pair, oks in total.items():
        print(f"{'all':<18} {pair:<26} {sum(oks)}/{len(oks)}")
    print(
        f"\n{'set-up':<18} {'whitening init':>14} {'trained':>8} {'trained > init':>14}"
        f"   {'towards limit init':>18} {'trained':>8} {'trained > init':>14}"
    )
    pooled = []
    for setup, rows in [*whiten.items(), ("all", None)]:
        rows = pooled if rows is None else rows
        if setup != "all":
            pooled += rows
        init, trained, limit_init, limit_trained = np.array(rows).T
        print(
            f"{setup:<18} {init.mean():>14.3f} {trained.mean():>8.3f} {int((trained > init).sum()):>9}/{len(init)}"
            f"   {limit_init.mean():>18.3f} {limit_trained.mean():>8.3f} "
            f"{int((limit_trained > limit_init).sum()):>9}/{len(init)}"
        )
    print("\nthe first three pairs, by the lowest whitening (against its data) of a set's trained stems")
    for above, sets in by_whitening.items():
        oks = np.array(sets, dtype=bool).reshape(-1, 3)
        counts = ", ".join(f"{name} {int(oks[:, i].sum())}/{len(oks)}" for i, (name, _, _) in enumerate(PAIRS[:3]))
        print(f"  whitening {'>=' if above else '<'} {args.split}: {len(oks)} sets; right: {counts}")
    print("\nenergy profile, times flat, over principal-component groups (mean over seeds and variants)")
    print(f"{'set-up':<18} {'':<8} " + " ".join(f"{_label(g):>6}" for g in GROUPS))
    for setup, (first, last) in profiles.items():
        for name, values in (("init", first), ("trained", last)):
            print(f"{setup:<18} {name:<8} " + " ".join(f"{v:>6.2f}" for v in np.mean(values, 0)))


def _ints(text: str) -> list[int]:
    return [int(part) for part in text.split(",")]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("train")
    run.add_argument("--out", required=True)
    run.add_argument("--setups", default=",".join(SETUPS))
    run.add_argument("--seeds", default="0,1,2")
    run.add_argument("--steps", type=int, default=Config.steps)
    run.set_defaults(run=_train_command)
    report = commands.add_parser("report")
    report.add_argument("dirs", nargs="+", metavar="DIR")
    report.add_argument("--split", type=float, default=0.03, help="whitening at which to split the sets")
    report.add_argument("--exclude", default="")
    report.set_defaults(run=_report_command)
    args = parser.parse_args(argv)
    args.run(args)


if __name__ == "__main__":
    main(sys.argv[1:])
