"""Per family, the share of kernels a spectrum labels with their own family, on two generators.

``independent``: benchmarks/independent_patterns.py (written apart from the package, never used
for training or labelling; sub-pixel offsets up to 0.4 px, orientation jitter, noise 0.08 of the
peak). ``library``: kernelwatch.patterns with noise 0.08 of the kernel's std (the generator the
spectra are trained and labelled with, so the weaker test). Each spectrum is shown beside the
paper's method (``method="paper"``: the paper's recipe and uniform threshold). Run:

    python benchmarks/evaluate_families.py [--sizes 5 7] [--n 2000] [--spectrum-dir DIR]
"""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

import numpy as np

import kernelwatch as kw
from kernelwatch import patterns
from kernelwatch.metrics import family
from kernelwatch.pretrain import shuffled

_spec = importlib.util.spec_from_file_location("independent_patterns", Path(__file__).with_name("independent_patterns.py"))
independent = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(independent)

EVAL_SEED = 4242  # differs from every seed used in pretraining and labelling


def kernels_of(generator: str, name: str, n: int, k: int, seed: int) -> np.ndarray:
    if generator == "independent":
        return independent.generate(name, n, k, rng=seed)[0]
    return patterns.generate(name, n, k, rng=seed, noise=0.08)[0]


def family_shares(spectrum: kw.Spectrum, generator: str, k: int, n: int) -> dict[str, tuple[float, float]]:
    """family -> (share labelled with that family, share clustered at all); plus the shuffled null."""
    out = {}
    pool = []
    for i, name in enumerate(independent.families(k)):
        kernels = kernels_of(generator, name, n, k, EVAL_SEED + i)
        pool.append(kernels)
        res = spectrum.classify(kernels)
        out[name] = (float(np.mean(res.clustered & (family(res.labels) == name))), float(res.clustered.mean()))
    null = spectrum.classify(shuffled(np.concatenate(pool), EVAL_SEED))
    out["(shuffled)"] = (float("nan"), float(null.clustered.mean()))
    return out


def _thresholds(spectrum: kw.Spectrum) -> str:
    return "per-family th" if spectrum.family_thresholds else f"th {spectrum.threshold:.3f}"


def load(k: int, method: str, spectrum_dir: Path | None) -> kw.Spectrum:
    if spectrum_dir is not None and method != "paper":
        return kw.Spectrum.load(spectrum_dir / f"spectrum_k{k}.npz")
    return kw.Spectrum.pretrained(kernel_size=k, method=method)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[5, 7])
    parser.add_argument("--n", type=int, default=2000, help="kernels per family")
    parser.add_argument("--spectrum-dir", type=Path, help="evaluate spectrum_k*.npz here as the shipped method")
    parser.add_argument("--methods", nargs="+", default=["paper", "autoencoder"])
    args = parser.parse_args()
    for k in args.sizes:
        spectra = {m: load(k, m, args.spectrum_dir) for m in args.methods}
        for generator in ("independent", "library"):
            tables = {m: family_shares(s, generator, k, args.n) for m, s in spectra.items()}
            print(f"\n{k}x{k}, {generator} generator, {args.n} kernels per family: right family (clustered)")
            print(f"  {'family':<18} " + " ".join(f"{m + ' (' + _thresholds(s) + ')':>26}" for m, s in spectra.items()))
            for name in tables[args.methods[0]]:
                cells = []
                for m in args.methods:
                    right, clustered = tables[m][name]
                    cells.append(f"{'':>10}({clustered:6.1%})" if np.isnan(right) else f"{right:9.1%} ({clustered:6.1%})")
                print(f"  {name:<18} " + " ".join(f"{c:>26}" for c in cells))


if __name__ == "__main__":
    main()
