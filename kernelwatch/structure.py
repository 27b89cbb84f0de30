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

from collections.abc import Sequence
from functools import lru_cache
from typing import NamedTuple

import numpy as np
import torch

from kernelwatch._config import DEFAULT_SEED
from kernelwatch.classification import ClassificationResult
from kernelwatch.kernel_sizes import SizeApproach, adapt
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
    search may stop at a near, not the nearest, prototype. Measured on 4,000 Gaussian kernels it
    is above the exact median by 0.0018 (3x3), 0.0017 (5x5) and 0.0007 (7x7); on structured 7x7
    kernels it is exact (see docs/spectra.md).
    """
    valid = result.dissimilarity[result.valid]
    if not len(valid):
        return float("nan")
    # np.median's own arithmetic (the mean of the two middle values of an even count), without
    # its generic checks, which cost four times the selection on the worker's small layers.
    half = len(valid) // 2
    if len(valid) % 2:
        return float(np.partition(valid, half)[half])
    middle = np.partition(valid, (half - 1, half))
    return float((middle[half - 1] + middle[half]) / 2)


def spatially_shuffled(kernels: torch.Tensor, seed: int = DEFAULT_SEED) -> torch.Tensor:
    """Each ``[k, k]`` kernel with its weights in a random order of its own: same values, no
    spatial pattern. Deterministic for a seed, so successive snapshots shuffle alike.

    >>> x = torch.arange(18.0).reshape(2, 3, 3)
    >>> y = spatially_shuffled(x)
    >>> y.shape, bool((y.flatten(1).sort().values == x.flatten(1)).all()), bool((y != x).any())
    (torch.Size([2, 3, 3]), True, True)
    """
    n, k = kernels.shape[0], kernels.shape[-1]
    order = _shuffle_order(n, k * k, seed) if n <= MAX_NULL_KERNELS else _draw_order(n, k * k, seed)
    return kernels.reshape(n, k * k).gather(1, order.to(kernels.device)).reshape(kernels.shape)


def _draw_order(n: int, size: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(n, size, generator=generator).argsort(dim=1)


#: The same orders at every snapshot (the seed is fixed): drawn once.
_shuffle_order = lru_cache(maxsize=64)(_draw_order)


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
    result, null, _ = classify_many_with_null([kernels], spectrum, seed, [approach], threshold)[0]
    return result, null


def classify_many_with_null(
    layers: Sequence[torch.Tensor],
    spectrum: Spectrum,
    seed: int = DEFAULT_SEED,
    approaches: Sequence[SizeApproach | None] | None = None,
    threshold: float | None = None,
) -> list[tuple[ClassificationResult, NullLevel, SizeApproach]]:
    """:func:`classify_with_null` of several layers' kernels (any sizes this spectrum serves,
    on one device) in a single classification call: a snapshot's layers and lenses together
    cost one search. Each layer is read by its ``approaches`` entry (None: the one its kernels
    call for), which is returned with its result and null level.

    >>> import kernelwatch as kw
    >>> kernels = torch.as_tensor(kw.patterns.generate_mixture(64, 5, rng=0)[0])
    >>> layers = classify_many_with_null([kernels, kernels[:3]], kw.Spectrum.pretrained(5))
    >>> [len(result) for result, null, approach in layers]
    [64, 3]
    """
    approaches = list(approaches or [None] * len(layers))
    parts = []
    for i, kernels in enumerate(layers):
        sample = kernels
        if len(kernels) > MAX_NULL_KERNELS:
            at = torch.linspace(0, len(kernels) - 1, MAX_NULL_KERNELS, device=kernels.device).round().long()
            sample = kernels[at]
        approaches[i] = approaches[i] or spectrum.approach_for(kernels)
        parts += [adapt(kernels, approaches[i]), adapt(spatially_shuffled(sample, seed), approaches[i])]
    if not parts:
        return []
    every = spectrum.classify(torch.cat(parts), threshold=threshold)
    out, start = [], 0
    for kernels, shuffled_part, approach in zip(parts[::2], parts[1::2], approaches):
        middle, end = start + len(kernels), start + len(kernels) + len(shuffled_part)
        result, shuffled = every[start:middle], every[middle:end]
        start = end
        if not shuffled.valid.any():
            out.append((result, NullLevel(float("nan"), float("nan")), approach))
        else:
            null = NullLevel(float(shuffled.clustered.mean()), median_dissimilarity(shuffled))
            out.append((result, null, approach))
    return out


__all__ = [
    "MAX_NULL_KERNELS",
    "NullLevel",
    "classify_many_with_null",
    "classify_with_null",
    "median_dissimilarity",
    "spatially_shuffled",
]
