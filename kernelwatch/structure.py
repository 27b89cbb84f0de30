"""Structure measures that move long before the paper's clustered fraction does, and the two
nulls they are judged against.

Early in training a layer's kernels are still mostly their random initialisation, and few cross
the spectrum's threshold. Two figures show structure much earlier: the median dissimilarity to
the nearest prototype, and the clustered fraction, each compared with what chance gives. Chance
is measured twice per layer, with the same spectrum and threshold:

- the **shuffled null**: each kernel's weights in a random spatial order (same values, no
  spatial arrangement at all);
- the **smooth null**: kernels drawn from a Gaussian random field with the layer's own mean
  spatial autocovariance (:func:`smooth_random_like`): as smooth as the layer, in every
  direction, but with no pattern. Smooth random kernels are close to planes, which is what a
  first derivative is, so they beat the shuffled null easily; they cannot beat this one.

Structure above chance is measured against the stricter of the two
(:func:`kernelwatch.format.chance_fraction`).

>>> import torch, kernelwatch as kw
>>> spectrum = kw.Spectrum.pretrained(5)
>>> kernels, _ = kw.patterns.generate_mixture(256, 5, rng=0)  # DoG-family kernels
>>> result, nulls = classify_with_null(torch.as_tensor(kernels), spectrum)
>>> bool(median_dissimilarity(result) < min(nulls.shuffled.median_dissimilarity, nulls.smooth.median_dissimilarity))
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
from kernelwatch.metrics import cluster_proportions
from kernelwatch.spectrum import Spectrum

#: At most this many kernels of a layer are drawn for each of its nulls at a monitor snapshot:
#: enough to resolve a null's clustered fraction to about 0.03 and its median dissimilarity to
#: about 0.005, at a bounded cost for wide layers.
MAX_NULL_KERNELS = 256
#: ... and for ``kw.analyze``, which runs once: a null as precise as layers of thousands of kernels.
ANALYSIS_NULL_KERNELS = 4096


class NullLevel(NamedTuple):
    """What one null gives: its kernels' clustered fraction, median dissimilarity and share of
    each family (NaN and empty when no null kernel is valid)."""

    clustered_fraction: float
    median_dissimilarity: float
    proportions: dict[str, float]


class Nulls(NamedTuple):
    """A layer's two nulls: its kernels spatially shuffled, and smooth random kernels."""

    shuffled: NullLevel
    smooth: NullLevel


_UNMEASURED = NullLevel(float("nan"), float("nan"), {})


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


def null_level(result: ClassificationResult) -> NullLevel:
    """The :class:`NullLevel` of classified null kernels."""
    if not result.valid.any():
        return _UNMEASURED
    return NullLevel(float(result.clustered.mean()), median_dissimilarity(result), cluster_proportions(result.labels))


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


def smooth_random_like(kernels: torch.Tensor, n: int, seed: int = DEFAULT_SEED) -> torch.Tensor:
    """``n`` kernels drawn from a zero-mean Gaussian random field whose spatial autocovariance
    is the layer's: the mean over ``kernels`` (``[N, k, k]``; rows with NaN or Inf left out)
    of ``w(p) w(p + d)`` for each displacement ``d``, over every pair of positions ``d`` apart.

    Such a field is stationary: it has the layer's smoothness (its mean power spectrum, without
    assuming that kernels wrap around at their edges) but no pattern at any place, so it copies
    none of the layer's patterns into the null. Windows of any stationary Gaussian field (blurred
    noise, 1/f^2 noise) are draws of exactly this kind, so such kernels sit on their smooth null.
    Kernels with more energy weigh more, as in a mean power spectrum. Deterministic for a seed;
    the same draws serve every snapshot, so the null moves only as the layer does.

    >>> blurred = torch.nn.functional.avg_pool2d(torch.randn(1, 1, 70, 70), 3, 1)[0, 0]
    >>> windows = blurred.unfold(0, 5, 5).unfold(1, 5, 5).reshape(-1, 5, 5)  # 5x5 windows of it
    >>> smooth_random_like(windows, 100).shape
    torch.Size([100, 5, 5])
    """
    return _smooth_random([kernels], [n], seed)[0]


def _smooth_random(layers: Sequence[torch.Tensor], counts: Sequence[int], seed: int) -> list[torch.Tensor]:
    """:func:`smooth_random_like` of several layers of one kernel size, their covariances
    factorised in one batch."""
    k = layers[0].shape[-1]
    lags, pairs = _lags(k)
    scatters = torch.stack([_scatter(kernels) for kernels in layers])
    autocovariance = torch.zeros(len(layers), len(pairs), dtype=torch.float64).index_add_(1, lags, scatters.flatten(1))
    covariance = (autocovariance / pairs)[:, lags].reshape(len(layers), k * k, k * k)
    root, info = torch.linalg.cholesky_ex(covariance)
    # The average over each displacement's pairs need not be positive semi-definite: where it
    # is not, its negative eigenvalues (estimation noise) are set to 0.
    for i in info.nonzero().flatten().tolist():
        values, vectors = torch.linalg.eigh(covariance[i])
        root[i] = vectors * values.clamp_min(0.0).sqrt()
    roots = root.transpose(1, 2).float()
    # A layer's draws are the first rows of one block: the same whatever the other layers.
    draws = _normal_draws(max(ANALYSIS_NULL_KERNELS, *counts), k * k, seed)
    return [
        (draws[:n] @ roots[i]).reshape(n, k, k).to(kernels.device) for i, (kernels, n) in enumerate(zip(layers, counts))
    ]


def _scatter(kernels: torch.Tensor) -> torch.Tensor:
    """The mean outer product ``w w^T`` of a layer's flattened kernels with no NaN or Inf
    (float64, on the CPU)."""
    flat = kernels.detach().flatten(1).double()
    finite = torch.isfinite(flat).all(dim=1)
    if not finite.all():
        flat = flat[finite]
    return (flat.T @ flat).cpu() / max(len(flat), 1)


@lru_cache(maxsize=8)
def _lags(k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For the ``k*k x k*k`` position pairs of a kernel, the index of their displacement, and
    the number of pairs at each displacement."""
    y, x = torch.arange(k * k).div(k, rounding_mode="floor"), torch.arange(k * k) % k
    lags = ((y[:, None] - y[None, :] + k - 1) * (2 * k - 1) + x[:, None] - x[None, :] + k - 1).flatten()
    return lags, torch.bincount(lags, minlength=(2 * k - 1) ** 2).double()


@lru_cache(maxsize=8)
def _normal_draws(n: int, size: int, seed: int) -> torch.Tensor:
    """Standard normal draws, the same for every snapshot (the seed is fixed): drawn once."""
    return torch.randn(n, size, generator=torch.Generator().manual_seed(seed))


def classify_with_null(
    kernels: torch.Tensor,
    spectrum: Spectrum,
    seed: int = DEFAULT_SEED,
    approach: SizeApproach | None = None,
    threshold: float | None = None,
    null_kernels: int = MAX_NULL_KERNELS,
) -> tuple[ClassificationResult, Nulls]:
    """Classify ``[N, k, k]`` kernels, and with them both nulls: the spatially shuffled copies of
    (at most ``null_kernels`` evenly chosen of) them, and as many smooth random kernels. One
    classification call for all: on small layers its fixed cost is most of the work. All are
    read by the same ``approach`` (default: the one ``kernels`` call for) and ``threshold``
    (see :meth:`Spectrum.classify`)."""
    result, nulls, _ = classify_many_with_null([kernels], spectrum, seed, [approach], threshold, null_kernels)[0]
    return result, nulls


def classify_many_with_null(
    layers: Sequence[torch.Tensor],
    spectrum: Spectrum,
    seed: int = DEFAULT_SEED,
    approaches: Sequence[SizeApproach | None] | None = None,
    threshold: float | None = None,
    null_kernels: int = MAX_NULL_KERNELS,
) -> list[tuple[ClassificationResult, Nulls, SizeApproach]]:
    """:func:`classify_with_null` of several layers' kernels (any sizes this spectrum serves,
    on one device) in a single classification call: a snapshot's layers and lenses together
    cost one search. Each layer is read by its ``approaches`` entry (None: the one its kernels
    call for), which is returned with its result and nulls. The smooth null is drawn from the
    kernels as the spectrum reads them (a large kernel's central window).

    >>> import kernelwatch as kw
    >>> kernels = torch.as_tensor(kw.patterns.generate_mixture(64, 5, rng=0)[0])
    >>> layers = classify_many_with_null([kernels, kernels[:3]], kw.Spectrum.pretrained(5))
    >>> [len(result) for result, nulls, approach in layers]
    [64, 3]
    """
    approaches = list(approaches or [None] * len(layers))
    seen, shuffled = [], []
    for i, kernels in enumerate(layers):
        sample = kernels
        if len(kernels) > null_kernels:
            at = torch.linspace(0, len(kernels) - 1, null_kernels, device=kernels.device).round().long()
            sample = kernels[at]
        approach = approaches[i] = approaches[i] or spectrum.approach_for(kernels)
        seen.append(adapt(kernels, approach))
        shuffled.append(adapt(spatially_shuffled(sample, seed), approach))
    if not seen:
        return []
    smooth = _smooth_random(seen, [len(part) for part in shuffled], seed)
    parts = [part for layer in zip(seen, shuffled, smooth) for part in layer]
    every = spectrum.classify(torch.cat(parts), threshold=threshold)
    out, start = [], 0
    for i, approach in enumerate(approaches):
        ends = np.cumsum([start] + [len(part) for part in parts[3 * i : 3 * i + 3]])
        result, shuffled, smooth = (every[a:b] for a, b in zip(ends[:-1], ends[1:]))
        start = int(ends[-1])
        out.append((result, Nulls(null_level(shuffled), null_level(smooth)), approach))
    return out


__all__ = [
    "ANALYSIS_NULL_KERNELS",
    "MAX_NULL_KERNELS",
    "NullLevel",
    "Nulls",
    "classify_many_with_null",
    "classify_with_null",
    "median_dissimilarity",
    "null_level",
    "smooth_random_like",
    "spatially_shuffled",
]
