"""Functional core of classification: nearest prototype by centred cosine similarity.

Kernels and prototypes are compared after centring (mean removed) and scaling to unit length,
so a kernel's label does not change under ``a * kernel + b`` with ``a > 0`` (section 4.1).
The search is a branch-and-bound over contiguous blocks of the code axis: it returns the same
best prototype as comparing against every prototype, at a fraction of the work, for every
kernel that can be clustered (and for all kernels with ``exact=True``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from kernelwatch._config import INVALID, UNCLUSTERED
from kernelwatch.errors import KernelWatchError

#: Kernels whose centred norm is below this share of their norm carry no pattern: all-zero or
#: constant (up to float rounding).
_FLAT_TOLERANCE = 1e-6
#: Slack on the block bounds, far above float32 rounding of unit dot products.
_BOUND_SLACK = 1e-5


@dataclass(frozen=True)
class ClassificationResult:
    """Per-kernel outcome of :meth:`kernelwatch.Spectrum.classify`.

    ``labels`` holds a cluster name, ``"unclustered"`` or ``"invalid"``; ``codes`` the code of
    the nearest prototype in [0, 1]; ``dissimilarity`` is ``1 - cos`` to that prototype. Both
    are NaN for invalid kernels; for unclustered kernels they are exact only when classified
    with ``exact=True`` (otherwise a near prototype's, at least the threshold).
    """

    labels: np.ndarray
    clustered: np.ndarray
    dissimilarity: np.ndarray
    codes: np.ndarray
    valid: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: slice | np.ndarray) -> ClassificationResult:
        """The results of some kernels: ``result[:n]``, ``result[mask]``."""
        return ClassificationResult(
            self.labels[index], self.clustered[index], self.dissimilarity[index], self.codes[index], self.valid[index]
        )


def as_kernel_tensor(kernels: np.ndarray | torch.Tensor, kernel_size: int | None = None) -> torch.Tensor:
    """Check and convert ``[N, k, k]`` (or one ``[k, k]``) kernels to a float32 tensor.

    >>> as_kernel_tensor(np.zeros((2, 3, 3))).shape
    torch.Size([2, 3, 3])
    """
    if isinstance(kernels, np.ndarray):
        if not np.issubdtype(kernels.dtype, np.number):
            raise KernelWatchError(f"kernels must be numeric, got dtype {kernels.dtype}")
        kernels = torch.from_numpy(np.ascontiguousarray(kernels))
    elif not isinstance(kernels, torch.Tensor):
        raise KernelWatchError(f"kernels must be a numpy array or torch tensor, got {type(kernels).__name__}")
    if kernels.ndim == 2:
        kernels = kernels.unsqueeze(0)
    if kernels.ndim != 3 or kernels.shape[1] != kernels.shape[2]:
        raise KernelWatchError(f"kernels must be shaped [N, k, k] with square k x k, got {tuple(kernels.shape)}")
    if kernel_size is not None and kernels.shape[1] != kernel_size:
        raise KernelWatchError(
            f"kernels are {kernels.shape[1]}x{kernels.shape[2]} but this spectrum is for "
            f"{kernel_size}x{kernel_size}; use Spectrum.pretrained(kernel_size={kernels.shape[1]}) if one ships"
        )
    return kernels.detach().to(torch.float32)


def centre_and_normalise(kernels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flatten ``[N, k, k]`` kernels, remove each one's mean and scale it to unit length.

    Returns ``(unit, valid)``; rows of invalid kernels (NaN/Inf, all-zero, constant) are zero.

    >>> unit, valid = centre_and_normalise(torch.tensor([[[0., 1.], [1., 0.]], [[2., 2.], [2., 2.]]]))
    >>> valid.tolist(), round(float(unit[0].norm()), 4)
    ([True, False], 1.0)
    """
    flat = kernels.reshape(kernels.shape[0], -1)
    finite = torch.isfinite(flat).all(dim=1)
    if not finite.all():
        flat = torch.where(finite[:, None], flat, torch.zeros_like(flat))
    centred = flat - flat.mean(dim=1, keepdim=True)
    norm = centred.norm(dim=1)
    # Flat relative to the kernel's own size, so that scaling never changes validity.
    valid = finite & (norm > _FLAT_TOLERANCE * flat.norm(dim=1)) & (norm > 0)
    unit = centred / torch.where(valid, norm, 1.0)[:, None]
    if not valid.all():
        unit = torch.where(valid[:, None], unit, torch.zeros_like(unit))
    return unit, valid


def nearest_prototype_brute_force(
    unit: torch.Tensor, prototypes: torch.Tensor, chunk: int = 4096
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference search: compare every kernel with every prototype (one matmul per chunk).

    ``unit`` is ``[N, d]`` and ``prototypes`` ``[M, d]``, both unit rows. Returns
    ``(index, similarity)`` of the most similar prototype per kernel.
    """
    best_index = torch.empty(unit.shape[0], dtype=torch.long, device=unit.device)
    best_sim = torch.empty(unit.shape[0], dtype=unit.dtype, device=unit.device)
    for start in range(0, unit.shape[0], chunk):
        sim = unit[start : start + chunk] @ prototypes.T
        best_sim[start : start + chunk], best_index[start : start + chunk] = sim.max(dim=1)
    return best_index, best_sim


@dataclass(frozen=True)
class PrototypeIndex:
    """Prototypes cut into contiguous blocks of the code axis, each with a bounding cone.

    Neighbouring codes decode to similar kernels, so a run of prototypes fits in a narrow cone
    around its normalised mean: ``cos(x, p) <= cos(max(0, angle(x, centre) - radius))`` for
    every prototype ``p`` in the block. Blocks end where the spectrum turns by more than
    ``max_diameter`` degrees (so a jump between patterns never widens a cone) or after
    ``max_size`` codes. Only blocks whose bound beats the best similarity found so far need an
    exact look.
    """

    prototypes: torch.Tensor  # [M, d] unit rows
    starts: list[int]  # block b holds prototypes[starts[b]:starts[b + 1]]
    centres: torch.Tensor  # [B, d] unit rows
    radii: torch.Tensor  # [B] each cone's half-angle in radians, and its cosine and sine
    cos_radii: torch.Tensor
    sin_radii: torch.Tensor

    @classmethod
    def build(cls, prototypes: torch.Tensor, max_diameter: float = 20.0, max_size: int = 200) -> PrototypeIndex:
        unit = prototypes.double().numpy()
        min_cos = np.cos(np.radians(max_diameter))
        starts = [0]
        while starts[-1] < len(unit):
            first, end = starts[-1], starts[-1] + 1
            while end < len(unit) and end - first < max_size and unit[first] @ unit[end] >= min_cos:
                end += 1
            starts.append(end)
        centres, radii = [], []
        for first, end in zip(starts, starts[1:]):
            centre = torch.nn.functional.normalize(prototypes[first:end].mean(dim=0), dim=0)
            centres.append(centre)
            radii.append(torch.arccos((prototypes[first:end] @ centre).clamp(-1.0, 1.0)).max())
        radius = torch.stack(radii)
        return cls(prototypes, starts, torch.stack(centres), radius, torch.cos(radius), torch.sin(radius))

    def to(self, device: torch.device | str) -> PrototypeIndex:
        return PrototypeIndex(
            self.prototypes.to(device),
            self.starts,
            self.centres.to(device),
            self.radii.to(device),
            self.cos_radii.to(device),
            self.sin_radii.to(device),
        )

    def search(
        self, unit: torch.Tensor, floor: float = -1.0, chunk: int = 65536
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Nearest prototype for each row of ``unit``: ``(index, similarity)``.

        Exact for every kernel whose best similarity is at least ``floor``. For the others the
        search may stop early: their result is a real prototype, just possibly not the nearest,
        and its similarity stays below ``floor`` like the true best. With the default floor of
        -1 the search is exact for all.
        """
        index = torch.empty(unit.shape[0], dtype=torch.long, device=unit.device)
        sim = torch.empty(unit.shape[0], dtype=unit.dtype, device=unit.device)
        for start in range(0, unit.shape[0], chunk):
            part = slice(start, start + chunk)
            index[part], sim[part] = self._search_chunk(unit[part], floor)
        return index, sim

    def _search_chunk(self, x: torch.Tensor, floor: float) -> tuple[torch.Tensor, torch.Tensor]:
        rows = torch.arange(x.shape[0], device=x.device)
        cos = x @ self.centres.T
        best_sim = torch.full((x.shape[0],), -2.0, dtype=x.dtype, device=x.device)
        best_index = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
        # The nearest block first: for a kernel near the spectrum its best prototype is usually
        # there, and that similarity then rules out almost every other block.
        first = cos.argmax(dim=1)
        self._scan_blocks(x, rows, first, best_sim, best_index)
        # A block can beat similarity t only if angle(x, centre) < radius + arccos(t), that is
        # cos(x, centre) > cos(radius + arccos(t)) = cos(r) t - sin(r) sqrt(1 - t^2).
        target = (best_sim.clamp_min(floor) - _BOUND_SLACK).clamp(-1.0, 1.0)[:, None]
        reach = self.cos_radii * target - self.sin_radii * (1.0 - target * target).sqrt()
        # Past a half turn (radius + arccos(t) >= pi) every direction is within reach.
        angle = torch.arccos(target)
        if float(angle.max()) + float(self.radii.max()) >= torch.pi:
            reach = torch.where(self.radii + angle >= torch.pi, -2.0, reach)
        candidate = cos > reach
        candidate[rows, first] = False
        pair_rows, pair_blocks = candidate.nonzero(as_tuple=True)
        self._scan_blocks(x, pair_rows, pair_blocks, best_sim, best_index)
        return best_index, best_sim

    def _scan_blocks(
        self,
        x: torch.Tensor,
        rows: torch.Tensor,
        blocks: torch.Tensor,
        best_sim: torch.Tensor,
        best_index: torch.Tensor,
    ) -> None:
        """Compare kernel ``rows[i]`` with every prototype of block ``blocks[i]``; keep the best.

        Pairs are grouped by block so each block costs one matmul; the per-kernel reduction
        then runs once over all pairs.
        """
        if rows.numel() == 0:
            return
        blocks, order = blocks.sort()
        rows = rows[order]
        unique, counts = torch.unique_consecutive(blocks, return_counts=True)
        sims, indices = [], []
        for block, group in zip(unique.tolist(), rows.split(counts.tolist())):
            first = self.starts[block]
            sim, at = (x[group] @ self.prototypes[first : self.starts[block + 1]].T).max(dim=1)
            sims.append(sim)
            indices.append(at + first)
        sim, index = torch.cat(sims), torch.cat(indices)
        updated = best_sim.scatter_reduce(0, rows, sim, reduce="amax")
        won = (sim > best_sim[rows]) & (sim == updated[rows])
        best_index[rows[won]] = index[won]
        best_sim.copy_(updated)


def classify_unit(
    unit: torch.Tensor,
    valid: torch.Tensor,
    index: PrototypeIndex,
    codes: np.ndarray,
    labels: np.ndarray,
    threshold: float | np.ndarray,
    exact: bool = False,
) -> ClassificationResult:
    """Label centred unit kernels by their nearest prototype; see :class:`ClassificationResult`.

    ``threshold`` is one number or one per prototype (a kernel is clustered when its distance
    is at most its nearest prototype's threshold). Decisions (labels, clustered) are always
    those of the exhaustive search. ``exact=False`` lets the search give up on kernels that
    cannot reach the largest threshold: their dissimilarity and code then come from a near, not
    necessarily the nearest, prototype (still above that threshold).
    """
    threshold = np.asarray(threshold, dtype=np.float64)
    best, sim = index.search(unit, floor=-1.0 if exact else 1.0 - float(threshold.max()))
    best = best.cpu().numpy()
    dissimilarity = (1.0 - sim).cpu().numpy().astype(np.float64)
    valid_np = valid.cpu().numpy()
    clustered = valid_np & (dissimilarity <= (threshold[best] if threshold.ndim else threshold))
    out_labels = labels[best].astype(np.result_type(labels, np.array([UNCLUSTERED, INVALID])))
    out_labels[~clustered] = UNCLUSTERED
    out_labels[~valid_np] = INVALID
    return ClassificationResult(
        labels=out_labels,
        clustered=clustered,
        dissimilarity=np.where(valid_np, dissimilarity, np.nan),
        codes=np.where(valid_np, codes[best], np.nan),
        valid=valid_np,
    )
