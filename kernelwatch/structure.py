"""Structure measures that move long before the paper's clustered fraction does.

Early in training a layer's kernels are still mostly their random initialisation, and few cross
the spectrum's threshold. Two figures show structure above chance much earlier: the median
dissimilarity to the nearest prototype, and the null level, the same figures for the same
kernels with each kernel's weights spatially shuffled (what the spectrum makes of a kernel with
these values but no spatial pattern).

>>> import torch, kernelwatch as kw
>>> spectrum = kw.Spectrum.pretrained(5)
>>> kernels, _ = kw.patterns.generate_mixture(256, 5, rng=0)  # DoG-family kernels
>>> result, null = classify_with_null(torch.as_tensor(kernels), spectrum)
>>> median_dissimilarity(result) < null.median_dissimilarity
True
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from kernelwatch._config import DEFAULT_SEED
from kernelwatch.classification import ClassificationResult
from kernelwatch.kernel_sizes import SizeApproach
from kernelwatch.spectrum import Spectrum

#: At most this many kernels of a layer are shuffled for its null level: enough to resolve the
#: null's clustered fraction to 0.4 % and its median dissimilarity to about 0.005, at a bounded
#: cost for wide layers.
MAX_NULL_KERNELS = 256


class NullLevel(NamedTuple):
    """The clustered fraction and median dissimilarity of spatially shuffled kernels."""

    clustered_fraction: float
    median_dissimilarity: float


def median_dissimilarity(result: ClassificationResult) -> float:
    """Median ``1 - cos`` to the nearest prototype over the valid kernels (NaN if none).

    From the default (inexact) search this is an upper bound: for unclustered kernels the
    search may stop at a near, not the nearest, prototype. Measured on random and trained
    7x7 kernels it differs from the exact median by less than 0.001 (see docs/spectra.md).
    """
    valid = result.dissimilarity[result.valid]
    return float(np.median(valid)) if len(valid) else float("nan")


def spatially_shuffled(kernels: torch.Tensor, seed: int = DEFAULT_SEED) -> torch.Tensor:
    """Each ``[k, k]`` kernel with its weights in a random order of its own: same values, no
    spatial pattern. Deterministic for a seed, so successive snapshots shuffle alike.

    >>> x = torch.arange(18.0).reshape(2, 3, 3)
    >>> y = spatially_shuffled(x)
    >>> y.shape, bool((y.flatten(1).sort().values == x.flatten(1)).all()), bool((y != x).any())
    (torch.Size([2, 3, 3]), True, True)
    """
    n, k = kernels.shape[0], kernels.shape[-1]
    generator = torch.Generator().manual_seed(seed)
    order = torch.rand(n, k * k, generator=generator).argsort(dim=1).to(kernels.device)
    return kernels.reshape(n, k * k).gather(1, order).reshape(kernels.shape)


def classify_with_null(
    kernels: torch.Tensor,
    spectrum: Spectrum,
    seed: int = DEFAULT_SEED,
    approach: SizeApproach | None = None,
    threshold: float | None = None,
) -> tuple[ClassificationResult, NullLevel]:
    """Classify ``[N, k, k]`` kernels, and the spatially shuffled copies of (at most
    :data:`MAX_NULL_KERNELS` evenly chosen of) them for their null level. One classification
    call for both: on small layers its fixed cost is most of the work. Both are read by the
    same ``approach`` (default: the one ``kernels`` call for) and ``threshold``
    (see :meth:`Spectrum.classify`)."""
    sample = kernels
    if len(kernels) > MAX_NULL_KERNELS:
        sample = kernels[torch.linspace(0, len(kernels) - 1, MAX_NULL_KERNELS, device=kernels.device).round().long()]
    if approach is None and kernels.shape[-1] != spectrum.kernel_size:
        approach = spectrum.approach_for(kernels)
    both = spectrum.classify(torch.cat([kernels, spatially_shuffled(sample, seed)]), threshold=threshold, approach=approach)
    result, shuffled = both[: len(kernels)], both[len(kernels) :]
    if not shuffled.valid.any():
        return result, NullLevel(float("nan"), float("nan"))
    return result, NullLevel(float(shuffled.clustered.mean()), median_dissimilarity(shuffled))


__all__ = ["MAX_NULL_KERNELS", "NullLevel", "classify_with_null", "median_dissimilarity", "spatially_shuffled"]
