"""Kernels above 7x7 through the 7x7 spectrum: per family, the share labelled with it, and
the spatially shuffled and Gaussian null rates, for layers of each size and pattern scale.

Layers come from benchmarks/independent_patterns.py: 9x9 and 13x13 kernels filled by their
pattern, and 13x13, 31x31 and 51x51 kernels holding a 7x7- or 9x9-scale pattern at their centre
in faint noise (std 0.02 of the peak; appendix I). Each layer gets its approach from its own
kernels, as in ``kw.analyze``. Run:

    python benchmarks/evaluate_kernel_sizes.py [--n 500]
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from evaluate_families import independent

import kernelwatch as kw
from kernelwatch.metrics import family
from kernelwatch.structure import spatially_shuffled

SEED = 777
LAYOUTS = [(9, 9), (13, 13), (13, 9), (31, 7), (31, 9), (51, 7)]  # (kernel size, pattern scale)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=500, help="kernels per layer")
    args = parser.parse_args()
    spectrum = kw.Spectrum.pretrained(7)
    print(f"{'layer':<26} {'approach':<32} " + " ".join(f"{f[:12]:>12}" for f in independent.DOG_FAMILIES) + "   shuffled (all families)")
    for i, (size, scale) in enumerate(LAYOUTS):
        cells, approaches, nulls = [], set(), []
        for j, name in enumerate(independent.DOG_FAMILIES):
            kernels, _ = independent.generate(name, args.n, scale, rng=SEED + 10 * i + j)
            if size > scale:
                kernels = independent.embed(kernels, size, 0.02, rng=SEED + 10 * i + j)
            tensor = torch.from_numpy(kernels)
            approach = spectrum.approach_for(tensor)
            res = spectrum.classify(tensor, approach=approach)
            null = spectrum.classify(spatially_shuffled(tensor, SEED), approach=approach)
            cells.append(np.mean(res.clustered & (family(res.labels) == name)))
            nulls.append(null.clustered.mean())
            approaches.add(approach.describe())
        layer = f"{size}x{size}" + (f" ({scale}x{scale} at centre)" if size > scale else "")
        print(f"{layer:<26} {'/'.join(sorted(approaches)):<32} " + " ".join(f"{c:>12.1%}" for c in cells) + f"   {np.mean(nulls):>7.1%}")
    for size in (9, 13, 31, 51):
        noise = torch.from_numpy(np.random.default_rng(size).standard_normal((2000, size, size)).astype(np.float32))
        print(f"gaussian {size}x{size}: clustered {spectrum.classify(noise).clustered.mean():.1%} "
              f"({spectrum.approach_for(noise).describe()})")


if __name__ == "__main__":
    main()
