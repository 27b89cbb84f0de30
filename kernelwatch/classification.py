"""Functional core of classification: nearest prototype by centred cosine similarity.

Kernels and prototypes are compared after centring (mean removed) and scaling to unit length,
so a kernel's label does not change under ``a * kernel + b`` with ``a > 0`` (section 4.1).
The search is exact: a branch-and-bound over contiguous blocks of the code axis returns the
same best prototype as comparing against every prototype, at a fraction of the work.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from kernelwatch._config import INVALID, UNCLUSTERED
from kernelwatch.errors import KernelWatchError

#: Kernels whose centred norm is below this (relative to their largest |w|, or absolute when
#: that is 0) carry no pattern: all-zero or constant.
_FLAT_TOLERANCE = 1e-6
#: Slack on the block bounds, far above float32 rounding of unit dot products.
_BOUND_SLACK = 1e-5


@dataclass(frozen=True)
class ClassificationResult:
    """Per-kernel outcome of :meth:`kernelwatch.Spectrum.classify`.

    ``labels`` holds a cluster name, ``"unclustered"`` or ``"invalid"``; ``codes`` the code of
    the nearest prototype in [0, 1] (NaN for invalid kernels); ``dissimilarity`` is
    ``1 - cos`` to that prototype (NaN for invalid kernels).
    """

    labels: np.ndarray
    clustered: np.ndarray
    dissimilarity: np.ndarray
    codes: np.ndarray
    valid: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)


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
    flat = torch.where(finite[:, None], flat, torch.zeros_like(flat))
    centred = flat - flat.mean(dim=1, keepdim=True)
    norm = centred.norm(dim=1)
    scale = flat.abs().amax(dim=1)
    valid = finite & (norm > _FLAT_TOLERANCE * torch.where(scale > 0, scale, torch.ones_like(scale)))
    unit = torch.where(valid[:, None], centred / norm.clamp_min(1e-30)[:, None], torch.zeros_like(centred))
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
    """Prototypes grouped into contiguous blocks of the code axis, each with a bounding cone.

    Neighbouring codes decode to similar kernels, so a block of ``block_size`` prototypes fits
    in a narrow cone around its normalised mean: ``cos(x, p) <= cos(max(0, angle(x, centre) -
    radius))`` for every prototype ``p`` in the block. Only blocks whose bound beats the best
    similarity found so far need an exact look.
    """

    prototypes: torch.Tensor  # [M, d] unit rows
    centres: torch.Tensor  # [B, d] unit rows
    radii: torch.Tensor  # [B] angle in radians
    block_size: int

    @classmethod
    def build(cls, prototypes: torch.Tensor, block_size: int | None = None) -> PrototypeIndex:
        n = prototypes.shape[0]
        if block_size is None:
            block_size = max(1, int(round(np.sqrt(n) / 2)))
        n_blocks = -(-n // block_size)
        padded = torch.cat([prototypes, prototypes[-1:].expand(n_blocks * block_size - n, -1)])
        blocks = padded.reshape(n_blocks, block_size, -1)
        centres = torch.nn.functional.normalize(blocks.mean(dim=1), dim=1)
        cos = torch.einsum("bsd,bd->bs", blocks, centres).clamp(-1.0, 1.0)
        radii = torch.arccos(cos).amax(dim=1)
        return cls(prototypes, centres, radii, block_size)

    def to(self, device: torch.device | str) -> PrototypeIndex:
        return PrototypeIndex(
            self.prototypes.to(device), self.centres.to(device), self.radii.to(device), self.block_size
        )

    def search(self, unit: torch.Tensor, chunk: int = 16384) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact nearest prototype for each row of ``unit``: ``(index, similarity)``."""
        index = torch.empty(unit.shape[0], dtype=torch.long, device=unit.device)
        sim = torch.empty(unit.shape[0], dtype=unit.dtype, device=unit.device)
        for start in range(0, unit.shape[0], chunk):
            index[start : start + chunk], sim[start : start + chunk] = self._search_chunk(unit[start : start + chunk])
        return index, sim

    def _search_chunk(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rows = torch.arange(x.shape[0], device=x.device)
        angle = torch.arccos((x @ self.centres.T).clamp(-1.0, 1.0))
        bound = torch.cos((angle - self.radii).clamp_min(0.0)) + _BOUND_SLACK
        best_sim = torch.full((x.shape[0],), -2.0, dtype=x.dtype, device=x.device)
        best_index = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
        # The most promising block first: for a kernel near the spectrum its best prototype is
        # usually there, and that similarity then rules out almost every other block.
        first = bound.argmax(dim=1)
        self._scan_blocks(x, rows, first, best_sim, best_index)
        bound[rows, first] = -2.0
        pair_rows, pair_blocks = (bound > best_sim[:, None]).nonzero(as_tuple=True)
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
        """Compare kernel ``rows[i]`` with every prototype of block ``blocks[i]``, in place.

        Pairs are grouped by block so each block costs one matmul; a kernel appears at most
        once per block, so the updates within a group never collide.
        """
        blocks, order = blocks.sort()
        rows = rows[order]
        unique, counts = torch.unique_consecutive(blocks, return_counts=True)
        for block, group in zip(unique.tolist(), rows.split(counts.tolist())):
            first = block * self.block_size
            sim, at = (x[group] @ self.prototypes[first : first + self.block_size].T).max(dim=1)
            better = sim > best_sim[group]
            best_sim[group[better]] = sim[better]
            best_index[group[better]] = first + at[better]


def classify_unit(
    unit: torch.Tensor,
    valid: torch.Tensor,
    index: PrototypeIndex,
    codes: np.ndarray,
    labels: np.ndarray,
    threshold: float,
) -> ClassificationResult:
    """Label centred unit kernels by their nearest prototype; see :class:`ClassificationResult`."""
    best, sim = index.search(unit)
    best = best.cpu().numpy()
    dissimilarity = (1.0 - sim).cpu().numpy().astype(np.float64)
    valid_np = valid.cpu().numpy()
    clustered = valid_np & (dissimilarity <= threshold)
    out_labels = np.where(clustered, labels[best], UNCLUSTERED).astype(object)
    out_labels[~valid_np] = INVALID
    return ClassificationResult(
        labels=out_labels.astype(str),
        clustered=clustered,
        dissimilarity=np.where(valid_np, dissimilarity, np.nan),
        codes=np.where(valid_np, codes[best], np.nan),
        valid=valid_np,
    )
