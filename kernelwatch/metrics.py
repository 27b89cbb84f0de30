"""Per-layer figures: proportions and total activation of classified kernels (section 5), and
quality metrics of any conv layer's weights (CNN Filter DB: sparsity, variance entropy,
orthogonality).

>>> import numpy as np
>>> cluster_proportions(np.array(["on-centre", "first-derivative/left", "unclustered", "on-centre"]))
{'on-centre': 0.5, 'off-centre': 0.0, 'on-cross': 0.0, 'off-cross': 0.0, 'first-derivative': 0.25, 'second-derivative': 0.0, 'on-square': 0.0, 'off-square': 0.0, 'other': 0.0}
"""

from __future__ import annotations

from collections import Counter
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kernelwatch._config import CLUSTERS, DEFAULT_SEED, INVALID, UNCLUSTERED
from kernelwatch.errors import KernelWatchError


def family(labels: np.ndarray) -> np.ndarray:
    """Drop the subtype: ``first-derivative/left`` -> ``first-derivative``.

    >>> family(np.array(["first-derivative/left", "on-centre", "first-derivative/left"])).tolist()
    ['first-derivative', 'on-centre', 'first-derivative']
    """
    # Split each distinct label once: a layer has thousands of kernels but a dozen labels.
    distinct, inverse = np.unique(np.asarray(labels, dtype=str), return_inverse=True)
    return np.array([label.split("/", 1)[0] for label in distinct], dtype=str)[inverse.reshape(-1)]


def cluster_proportions(labels: np.ndarray) -> dict[str, float]:
    """Share of all kernels in each cluster; unclustered and invalid kernels count in the total
    but in no cluster, so the shares sum to the clustered fraction (as in the paper's bar plots).

    >>> cluster_proportions(np.array(["on-centre", "unclustered", "first-derivative/left", "on-centre"]))["on-centre"]
    0.5
    """
    per_family = dict.fromkeys(CLUSTERS, 0)
    labels = np.asarray(labels, dtype=str)
    # Counted as Python strings, the clustered ones only: a layer has hundreds of kernels but a
    # dozen labels, and a null's kernels are nearly all unclustered.
    clustered = labels[(labels != UNCLUSTERED) & (labels != INVALID)]
    for label, count in Counter(clustered.tolist()).items():
        name = label.split("/", 1)[0]
        if name in per_family:
            per_family[name] += count
    n = max(len(labels), 1)
    return {name: count / n for name, count in per_family.items()}


def total_activation(kernels: np.ndarray, labels: np.ndarray) -> dict[str, dict[str, float]]:
    """Sum of each kernel's weights, summarised per cluster (Fig. 10): quartiles, mean, count.

    >>> k = np.ones((2, 3, 3)); total_activation(k, np.array(["on-centre", "on-centre"]))["on-centre"]["median"]
    9.0
    """
    sums = kernels.reshape(len(kernels), -1).sum(axis=1)
    fams = family(labels)
    out = {}
    for name in CLUSTERS:
        values = sums[(fams == name) & np.isfinite(sums)]
        if len(values):
            q1, median, q3 = _quartiles(values)
            out[name] = {
                "count": int(len(values)),
                "mean": float(values.mean()),
                "q1": float(q1),
                "median": float(median),
                "q3": float(q3),
            }
    return out


def _quartiles(values: np.ndarray) -> np.ndarray:
    """``np.quantile(values, [0.25, 0.5, 0.75])`` (its default, linear method) at a quarter of
    its cost, which on the monitor's worker is paid for every cluster of every layer.

    >>> v = np.random.default_rng(0).standard_normal(101)
    >>> bool((_quartiles(v) == np.quantile(v, [0.25, 0.5, 0.75])).all())
    True
    """
    ordered = np.sort(np.asarray(values, dtype=np.float64).reshape(-1))
    position = np.array([0.25, 0.5, 0.75]) * (len(ordered) - 1)
    below = position.astype(np.intp)
    above = np.minimum(below + 1, len(ordered) - 1)
    return _lerp(ordered[below], ordered[above], position - below)


def _lerp(a: np.ndarray, b: np.ndarray, t: np.ndarray) -> np.ndarray:
    """numpy's own interpolation between neighbours, from whichever end is nearer (so the
    result is exactly numpy's)."""
    step = b - a
    return np.where(t >= 0.5, b - step * (1 - t), a + step * t)


# -- layer quality (CNN Filter DB, Gavrikov & Keuper, CVPR 2022) ---------------------------------

#: A filter is sparse when all its |w| are below this share of the layer's largest |w|.
SPARSITY_EPS = 0.01
#: CNN Filter DB's variance-entropy normaliser of 3x3 layers, as its authors compute it
#: (torchconvquality 0.3.0, ``_entropy_max_threshold``): a logistic fit of the low end of random
#: layers' entropy (log10) against log2 of the filter count: height, midpoint, rate, offset.
_PAPER_FIT_3X3 = (1.2618047, 2.30436435, 0.88767525, -0.31050834)
#: Other kernel sizes have no published fit: their normaliser is this quantile of random layers'
#: entropy, simulated (it tracks the 3x3 fit within ~6% from 16 filters on).
_RANDOM_QUANTILE = 0.01
#: Random layers drawn for it: up to 400, fewer from 5x5 up, whose decompositions cost d^3 and
#: whose spread is far smaller: for 7x7, 170 draws land within 0.2 % of 400 at a quarter of the cost.
_MAX_DRAWS, _MIN_DRAWS, _DRAW_BUDGET = 400, 8, 2e7
#: The simulated values for common sizes, shipped (see ``write_random_entropy_table``).
_RANDOM_ENTROPY_FILE = "random_entropy.npz"
#: Rows per product in orthogonality's upper triangle. Each block also computes its own b x b
#: square in full, so smaller blocks waste less on layers of few wide filters: 128 rows took the
#: 40 convs of convnext_atto from 29.8 to 26.3 ms (256, 192, 96 and 64 rows measured).
_ROW_BLOCK = 128


def sparsity(weight: Any, eps: float = SPARSITY_EPS) -> float:
    """Share of the layer's ``kh x kw`` filters whose weights are all below ``eps`` times the
    layer's largest |w|; an all-zero layer is fully sparse, a non-finite one gives NaN.

    >>> w = np.ones((4, 2, 3, 3)); w[0, 0] = 1e-4; w[1] = 0.0
    >>> sparsity(w)
    0.375
    """
    return _sparsity(_sparse_filters(_filters(weight), eps))


def variance_entropy(weight: Any, eps: float = SPARSITY_EPS) -> float:
    """Normalised entropy of the variance spectrum of the layer's ``kh x kw`` filters.

    The non-sparse filters (see :func:`sparsity`), flattened and centred, have singular values
    whose squares' shares of the total variance form a distribution whose entropy is
    divided by the low end of random layers' entropy for that many filters: for 3x3 filters
    CNN Filter DB's fitted curve (torchconvquality's ``variance_entropy_clean_norm``), for other
    sizes the simulated 1% quantile of random Gaussian layers. About 0.9 is a healthy trained
    layer, near 0 a degenerate one (all filters one pattern up to scale), 1 and above a
    random-like one. NaN when fewer than 3 filters remain or filters are 1x1.

    >>> rng = np.random.default_rng(0)
    >>> round(variance_entropy(rng.standard_normal((64, 8, 3, 3))), 2) >= 1.0
    True
    >>> round(variance_entropy(np.arange(1, 9)[:, None, None, None] * rng.standard_normal((3, 3))), 6)
    0.0
    """
    array = _as_weight(weight)
    filters = _filters(array)
    return _variance_entropy(array, filters, _sparse_filters(filters, eps))


def _variance_entropy(array: np.ndarray, filters: np.ndarray, sparse: np.ndarray | None) -> float:
    if sparse is None or filters.shape[1] < 2:
        return float("nan")
    filters = filters[~sparse]
    n = len(filters)
    if n < 3:  # two centred filters always span one direction: nothing to measure
        return float("nan")
    variance = _variances(filters - filters.mean(axis=0))
    if variance.sum() == 0:
        return 0.0
    if array.shape[2:] == (3, 3):
        normaliser = _paper_entropy_3x3(n)
    else:
        normaliser = _random_entropy(n, filters.shape[1])
    return float(_entropy(variance[None])[0] / normaliser)


def orthogonality(weight: Any) -> float:
    """One minus the mean |cosine similarity| between the layer's output filters (each
    ``in/groups x kh x kw``; the ``k x k`` kernels of a depthwise conv): 1 when all are
    mutually orthogonal, 0 when all are parallel. Zero filters count as orthogonal to all;
    NaN with fewer than 2 filters or non-finite weights.

    >>> orthogonality(np.eye(4).reshape(4, 1, 2, 2)), orthogonality(np.ones((3, 1, 2, 2)))
    (1.0, 0.0)
    """
    array = _as_weight(weight)
    flat = array.reshape(array.shape[0], -1)
    n = len(flat)
    if n < 2 or not np.isfinite(flat).all():
        return float("nan")
    flat = torch.from_numpy(np.ascontiguousarray(flat))  # In torch: see _variances.
    norm = torch.linalg.vector_norm(flat, dim=1, keepdim=True)
    # float32 products: the mean of n^2 cosines needs no more, and the products are most of the
    # monitor's background work per snapshot (wide 1x1 convs).
    unit = (flat / torch.where(norm > 0, norm, 1.0)).float()
    # Each pair once, in row blocks of the upper triangle, never the whole n x n matrix: a block
    # of rows i:i+b against columns i:n holds its own b x b square (pairs twice, the diagonal
    # once) and then pairs with later rows (once).
    pairs = 0.0
    for i in range(0, n, _ROW_BLOCK):
        block = (unit[i : i + _ROW_BLOCK] @ unit[i:].T).abs_()
        b = len(block)
        square = block[:, :b]
        pairs += (square.sum(dtype=torch.float64) - square.diagonal().sum(dtype=torch.float64)).item() / 2
        pairs += block[:, b:].sum(dtype=torch.float64).item()
    return float(1.0 - pairs / (n * (n - 1) / 2))


def layer_quality(weight: Any) -> dict[str, float]:
    """The three quality metrics of one conv layer's weight (numpy or torch, ``[out, in/groups,
    kh, kw]``, or ``[N, k, k]`` depthwise kernels).

    >>> q = layer_quality(np.random.default_rng(0).standard_normal((32, 1, 5, 5)))
    >>> list(q), q["sparsity"]
    (['sparsity', 'variance_entropy', 'orthogonality'], 0.0)
    """
    array = _as_weight(weight)  # converted once for all three, the sparse filters found once for two
    filters = _filters(array)
    sparse = _sparse_filters(filters, SPARSITY_EPS)
    return {
        "sparsity": _sparsity(sparse),
        "variance_entropy": _variance_entropy(array, filters, sparse),
        "orthogonality": orthogonality(array),
    }


def _as_weight(weight: Any) -> np.ndarray:
    if hasattr(weight, "detach"):  # a torch tensor, possibly bfloat16 or on an accelerator
        weight = weight.detach().float().cpu().numpy()
    array = np.asarray(weight, dtype=np.float64)
    if array.ndim == 3:
        array = array[:, None]
    if array.ndim != 4:
        raise KernelWatchError(f"conv weight must be [out, in/groups, kh, kw] or [N, k, k], got shape {array.shape}")
    return array


def _filters(weight: Any) -> np.ndarray:
    """The layer's 2-D filters, one flattened ``kh x kw`` filter per row (the paper's unit)."""
    array = _as_weight(weight)
    return array.reshape(-1, array.shape[2] * array.shape[3])


def _sparse_filters(filters: np.ndarray, eps: float) -> np.ndarray | None:
    """Which rows of ``filters`` are sparse (all |w| below ``eps`` times the layer's largest;
    all of them in an all-zero layer); None when a weight is not finite."""
    magnitude = np.abs(filters)
    peak = magnitude.max() if filters.size else 0.0
    if not np.isfinite(peak):  # a NaN or an infinity anywhere reaches the maximum
        return None
    if peak == 0:
        return np.ones(len(filters), dtype=bool)
    below = magnitude < eps * peak
    return below[:, 0] if filters.shape[1] == 1 else below.all(axis=1)


def _sparsity(sparse: np.ndarray | None) -> float:
    if sparse is None:
        return float("nan")
    return float(sparse.mean()) if len(sparse) else 1.0


def _variances(centred: np.ndarray) -> np.ndarray:
    """The squared singular values of ``centred`` rows (its variance spectrum, unscaled):
    eigenvalues of its d x d scatter matrix, far cheaper than an SVD of many rows, and as
    accurate for entropies (a lost digit in a share of 1e-12 changes nothing).

    Linear algebra here is torch's, not numpy's: numpy's OpenBLAS threads spin on after each
    call, which on the monitor's worker takes CPU from training; torch's obey set_num_threads."""
    rows = torch.from_numpy(centred)
    return torch.linalg.eigvalsh(rows.T @ rows).numpy().clip(min=0.0)


def _entropy(variance: np.ndarray) -> np.ndarray:
    """Shannon entropy (nats) of each row of non-negative variances, as shares of the row sum."""
    share = variance / variance.sum(axis=1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        return -np.sum(np.where(share > 0, share * np.log(share), 0.0), axis=1)


def _paper_entropy_3x3(n: int) -> float:
    """CNN Filter DB's normaliser for ``n`` 3x3 filters, in nats (the fit is in log10 units).

XX
    0.8831
    """
    height, midpoint, rate, offset = _PAPER_FIT_3X3
    return float((height / (1 + np.exp(-rate * (np.log2(n) - midpoint))) + offset) * np.log(10))


@lru_cache(maxsize=256)
def _random_entropy(n: int, d: int) -> float:
    """Low-end (1% quantile) variance entropy of ``n`` i.i.d. Gaussian filters of ``d`` weights:
    from the shipped table where it holds ``(n, d)``, else simulated."""
    table = _random_entropy_table().get(d)
    if table is not None and n < len(table):
        return float(table[n])
    return _simulated_random_entropy(n, d)


@lru_cache(maxsize=1)
def _random_entropy_table() -> dict[int, np.ndarray]:
    """``{d: entropies}`` with ``entropies[n]`` the simulated value for ``n`` filters."""
    with resources.as_file(resources.files("kernelwatch") / "data" / _RANDOM_ENTROPY_FILE) as path:
        with np.load(path) as data:
            return {int(key.removeprefix("d")): data[key] for key in data.files}


def write_random_entropy_table(
    path: str | Path, sizes: tuple[int, ...] = (16, 25, 49), max_filters: int = 2048
) -> None:
    """Simulate the normaliser for every filter count up to ``max_filters`` of each filter size
    ``d`` in ``sizes`` (4x4, 5x5, 7x7), and save them: the table that ships as package data, so
    a layer's first quality metrics cost no simulation (about 12 ms per filter count for 7x7).
    Regenerate it after any change to the simulation::

        python -c "from kernelwatch.metrics import write_random_entropy_table as w; w('kernelwatch/data/random_entropy.npz')"
    """
    tables = {}
    for d in sizes:
        values = [np.nan] * 3 + [_simulated_random_entropy(n, d) for n in range(3, max_filters + 1)]
        tables[f"d{d}"] = np.array(values)
    np.savez_compressed(path, **tables)


def _simulated_random_entropy(n: int, d: int) -> float:
    rng = np.random.default_rng(DEFAULT_SEED)
    draws = int(np.clip(_DRAW_BUDGET / d**3, _MIN_DRAWS, _MAX_DRAWS))
    dof = n - 1  # centring removes one degree of freedom
    if dof >= d:
        # The scatter matrix of n Gaussian rows is Wishart(d, n - 1); its eigenvalues are
        # distributed as those of B B^T for a lower bidiagonal B with chi-distributed entries
        # (Dumitriu & Edelman 2002): 2d random numbers per draw, however many filters.
        diag = np.arange(d)
        bidiagonal = np.zeros((draws, d, d))
        bidiagonal[:, diag, diag] = np.sqrt(rng.chisquare(dof - diag, size=(draws, d)))
        bidiagonal[:, diag[1:], diag[:-1]] = np.sqrt(rng.chisquare(d - diag[1:], size=(draws, d - 1)))
        scatter = torch.from_numpy(bidiagonal) @ torch.from_numpy(bidiagonal).transpose(1, 2)
        variance = torch.linalg.eigvalsh(scatter).numpy().clip(min=0.0)
    else:
        x = rng.standard_normal((draws, n, d))
        variance = torch.linalg.svdvals(torch.from_numpy(x - x.mean(axis=1, keepdims=True))).numpy() ** 2
    return float(np.quantile(_entropy(variance), _RANDOM_QUANTILE))
