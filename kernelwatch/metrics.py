"""Per-layer figures from classified kernels (section 5): proportions and total activation.

>>> import numpy as np
>>> cluster_proportions(np.array(["on-centre", "first-derivative/left", "unclustered", "on-centre"]))
{'on-centre': 0.5, 'off-centre': 0.0, 'on-cross': 0.0, 'off-cross': 0.0, 'first-derivative': 0.25, 'second-derivative': 0.0, 'on-square': 0.0, 'off-square': 0.0, 'other': 0.0}
"""

from __future__ import annotations

import numpy as np

from kernelwatch._config import CLUSTERS


def family(labels: np.ndarray) -> np.ndarray:
    """Drop the subtype: ``first-derivative/left`` -> ``first-derivative``."""
    return np.array([label.split("/", 1)[0] for label in labels], dtype=str)


def cluster_proportions(labels: np.ndarray) -> dict[str, float]:
    """Share of all kernels in each cluster; unclustered and invalid kernels count in the total
    but in no cluster, so the shares sum to the clustered fraction (as in the paper's bar plots)."""
    fams = family(labels)
    n = max(len(fams), 1)
    return {name: float(np.sum(fams == name)) / n for name in CLUSTERS}


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
            q1, median, q3 = np.quantile(values, [0.25, 0.5, 0.75])
            out[name] = {
                "count": int(len(values)),
                "mean": float(values.mean()),
                "q1": float(q1),
                "median": float(median),
                "q3": float(q3),
            }
    return out
