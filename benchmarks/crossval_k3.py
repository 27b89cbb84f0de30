"""3x3 recipe chosen without the held-out model: train on one training model, score the other.

Trains the 3x3 recipe of ``kernelwatch pretrain`` (``PRETRAIN_RECIPES[3]``: several curves,
thresholds per run of codes) on EfficientNet-Lite0's 3x3 kernels alone and scores Lite1's, then
the other way round; beside it the single-curve recipe with per-family thresholds shipped
before. Only Lite0/1 are read: Lite2 stays held out. Options vary the recipe: ``--curves``
as ``synthetic:SEED`` (real kernels plus the recipe's synthetic ones) or ``realN:SEED`` (the real
kernels alone, N times over), ``--run`` codes per threshold, ``--repeats`` null draws per real
kernel, ``--margin`` on the null bounds, ``--library-weight`` of the synthetic kernels in the
calibration. Run (about 4 minutes on one core):

    python benchmarks/crossval_k3.py [--curves synthetic:0 real4:0 ...] [--run 25] [--repeats 16] [--margin 0.7]
"""

from __future__ import annotations

import argparse
from collections import Counter
from typing import Any

import numpy as np
import torch

from kernelwatch._config import DEFAULT_N_CODES, DEFAULT_SEED, PRETRAIN_RECIPES
from kernelwatch.metrics import family
from kernelwatch.pretrain import (
    calibrate_family_thresholds,
    calibrate_run_thresholds,
    mix_proportions,
    noisy_mixture,
    real_kernels,
    shuffled,
    train_autoencoder,
)
from kernelwatch.spectrum import Spectrum

EVAL_SEED = 2024  # as benchmarks/evaluate_spectra.py: differs from every calibration seed


def curve(kernels: np.ndarray, n_codes: int, seed: int, epochs: int) -> Spectrum:
    model, _ = train_autoencoder(kernels, epochs, seed)
    return Spectrum.from_autoencoder(model, threshold=1.0, n_codes=n_codes, seed=DEFAULT_SEED)


def recipes(train: np.ndarray, recipe: dict[str, Any]) -> dict[str, Spectrum]:
    """The shipped-before recipe (one curve, per-family thresholds) and ``recipe``."""
    synthetic = noisy_mixture(recipe["n_synthetic"], 3, np.random.default_rng(DEFAULT_SEED), mix_proportions({}, 3))
    with_synthetic = np.concatenate([train, synthetic])
    single = curve(with_synthetic, DEFAULT_N_CODES, DEFAULT_SEED, recipe["epochs"])
    single.family_thresholds, _ = calibrate_family_thresholds(single, train, DEFAULT_SEED + 1)
    curves = recipe["curves"]
    parts = []
    for i, spec in enumerate(curves):
        data = with_synthetic if spec["synthetic"] else np.concatenate([train] * spec["real_repeats"])
        size = DEFAULT_N_CODES // len(curves) + (i < DEFAULT_N_CODES % len(curves))
        parts.append(curve(data, size, DEFAULT_SEED + spec["seed"], recipe["epochs"]))
    several = Spectrum.from_curves(parts)
    library = (synthetic, recipe["library_weight"]) if recipe["library_weight"] else None
    several.code_thresholds, _ = calibrate_run_thresholds(
        several, recipe["code_run"], train, DEFAULT_SEED + 1, recipe["null_repeats"], recipe["null_margin"], library
    )
    return {"one curve, per family": single, f"{len(curves)} curves, per run of {recipe['code_run']}": several}


def parse_curve(text: str) -> dict[str, Any]:
    kind, seed = text.split(":")
    if kind == "synthetic":
        return {"synthetic": True, "real_repeats": 1, "seed": int(seed)}
    return {"synthetic": False, "real_repeats": int(kind.removeprefix("real")), "seed": int(seed)}


def main() -> None:
    recipe = dict(PRETRAIN_RECIPES[3])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--curves", nargs="+", type=parse_curve, default=recipe["curves"])
    parser.add_argument("--run", type=int, default=recipe["code_run"])
    parser.add_argument("--repeats", type=int, default=recipe["null_repeats"])
    parser.add_argument("--margin", type=float, default=recipe["null_margin"])
    parser.add_argument("--library-weight", type=float, default=recipe["library_weight"])
    args = parser.parse_args()
    recipe.update(curves=args.curves, code_run=args.run, null_repeats=args.repeats, null_margin=args.margin,
                  library_weight=args.library_weight)
    print(f"recipe: {recipe}")
    torch.set_num_threads(1)
    real = {name.split("-pytorch")[0].removeprefix("efficientnet-"): k for name, k in real_kernels(3).items()}
    noise = np.random.default_rng(EVAL_SEED).standard_normal((20_000, 3, 3)).astype(np.float32)
    for train_name, test_name in [tuple(real), tuple(real)[::-1]]:
        train, test = real[train_name], real[test_name]
        for name, spec in recipes(train, recipe).items():
            res = spec.classify(test)
            fresh = spec.classify(shuffled(test, EVAL_SEED)).clustered.mean()
            gaussian = spec.classify(noise).clustered.mean()
            top = Counter(family(res.labels[res.clustered])).most_common(3)
            shares = ", ".join(f"{f} {n / len(test):.1%}" for f, n in top)
            print(
                f"{train_name} -> {test_name}  {name:<22} clustered {res.clustered.mean():6.1%} | shuffled {fresh:5.2%} | "
                f"gaussian {gaussian:5.2%} | {shares}",
                flush=True,
            )


if __name__ == "__main__":
    main()
