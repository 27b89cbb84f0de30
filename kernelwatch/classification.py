"""Functional core of classification: nearest prototype by centred cosine similarity.

Kernels and prototypes are compared after centring (mean removed) and scaling to unit length,
so a kernel's label does not change under ``a * kernel + b`` with ``a > 0`` (section 4.1).
The search is a branch-and-bound over contiguous blocks of the code axis: it returns the same
best prototype as comparing against every prototype, at a fraction of the work, for every
kernel that can be clustered (and for all kernels with ``exact=True``).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, fields
from functools import cached_property

import numpy as np
import torch

from kernelwatch._config import INVALID, UNCLUSTERED
from kernelwatch.errors import KernelWatchError

#: Kernels whose centred norm is below this share of their norm carry no pattern: all-zero or
#: constant (up to float rounding).
_FLAT_TOLERANCE = 1e-6
#: Slack on the block bounds, far above float32 rounding of unit dot products.
_BOUND_SLACK = 1e-5
#: Rows the search reduces at once: one buffer of products, small enough to stay in cache.
_ROWS = 4096
#: Most (kernel, block centre) similarities the search holds at once (32 MB).
_CELLS = 1 << 23


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
    flat = kernels.flatten(1)
    total = flat.sum(dim=1)
    finite = torch.isfinite(total)  # false for a NaN or Inf anywhere in the kernel
    if not finite.all():
        flat = torch.where(finite[:, None], flat, torch.zeros_like(flat))
        total = torch.where(finite, total, 0.0)
    unit = flat - (total / flat.shape[1])[:, None]
    norm = torch.linalg.vector_norm(unit, dim=1)
    # Flat relative to the kernel's own size (|kernel|^2 = |centred|^2 + total^2 / d), so that
    # scaling never changes validity.
    size = torch.sqrt(norm * norm + total * total / flat.shape[1])
    valid = finite & (norm > _FLAT_TOLERANCE * size) & (norm > 0)
    unit.mul_((1.0 / torch.where(valid, norm, 1.0))[:, None])
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
    """Prototypes cut into contiguous blocks of the code axis, and blocks into parts, each run
    with a bounding cone.

    Neighbouring codes decode to similar kernels, so a run of prototypes fits in a narrow cone
    around its normalised mean: ``cos(x, p) <= cos(max(0, angle(x, centre) - radius))`` for
    every prototype ``p`` in the run. Blocks end where the spectrum turns by more than
    ``max_diameter`` degrees (so a jump between patterns never widens a cone) or after
    ``max_size`` codes; parts are runs of ``part_size`` codes within a block. A kernel is
    compared with every block's centre and with every prototype of the nearest block; any other
    block is searched only if its cone, and then one of its parts' cones, could hold a better
    prototype.
    """

    prototypes: torch.Tensor  # [M, d] unit rows
    centres: torch.Tensor  # [B, d] unit rows
    radii: torch.Tensor  # [B] each cone's half-angle in radians
    # [B, d, S]: each block's prototypes as columns, padded to the largest block's size S by
    # repeating its last one (a repeat never changes a maximum).
    columns: torch.Tensor
    first: torch.Tensor  # [B] index of each block's first prototype, and its size
    sizes: torch.Tensor
    # [B, d + 2, Q]: each block's parts as columns [centre, -cos(radius), -sin(radius)],
    # padded to the most parts Q of a block with [0, 0, 1], a column never within reach
    part_columns: torch.Tensor
    widest: torch.Tensor  # the largest radius of any block or part (0-d)

    @classmethod
    def build(
        cls, prototypes: torch.Tensor, max_diameter: float = 30.0, max_size: int = 128, part_size: int = 16
    ) -> PrototypeIndex:
        unit = prototypes.double().numpy()
        min_cos = np.cos(np.radians(max_diameter))
        starts = [0]
        while starts[-1] < len(unit):
            first = starts[-1]
            # A block runs on while its codes stay within max_diameter of its first one.
            turned = np.flatnonzero(unit[first + 1 : first + max_size] @ unit[first] < min_cos)
            starts.append(first + 1 + int(turned[0]) if len(turned) else min(first + max_size, len(unit)))
        centres, radii = _cones(prototypes, starts)
        bounds = torch.tensor(starts)
        first, sizes = bounds[:-1], bounds.diff()
        part_starts = [s for a, b in zip(starts, starts[1:]) for s in range(a, b, part_size)]
        part_centres, part_radii = _cones(prototypes, [*part_starts, len(unit)])
        part_block = torch.searchsorted(bounds, torch.tensor(part_starts), right=True) - 1
        slot = (torch.tensor(part_starts) - first[part_block]) // part_size
        part_columns = torch.zeros(len(first), prototypes.shape[1] + 2, int(slot.max()) + 1)
        part_columns[:, -1] = 1.0
        part_columns[part_block, :, slot] = _cone_rows(part_centres, part_radii)
        slots = torch.minimum(first[:, None] + torch.arange(int(sizes.max())), (first + sizes - 1)[:, None])
        return cls(
            prototypes,
            centres,
            radii,
            prototypes[slots].transpose(1, 2).contiguous(),
            first,
            sizes,
            part_columns,
            torch.maximum(radii.max(), part_radii.max()),
        )

    def to(self, device: torch.device | str) -> PrototypeIndex:
        return PrototypeIndex(*(getattr(self, f.name).to(device) for f in fields(self)))

    def search(
        self, unit: torch.Tensor, floor: float = -1.0, chunk: int = 4096
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Nearest prototype for each row of ``unit``: ``(index, similarity)``.

        Exact for every kernel whose best similarity is at least ``floor``. For the others the
        search may stop early: their result is a real prototype, just possibly not the nearest,
        and its similarity stays below ``floor`` like the true best. With the default floor of
        -1 the search is exact for all.
        """
        if not len(unit):
            return torch.zeros(0, dtype=torch.long, device=unit.device), unit.new_zeros(0)
        size = max(1, _CELLS // len(self.centres))
        if len(unit) > size:  # the similarities to every block centre, below, for so many kernels at a time
            found = [self.search(part, floor, chunk) for part in unit.split(size)]
            return torch.cat([index for index, _ in found]), torch.cat([sim for _, sim in found])
        # The nearest block first: for a kernel near the spectrum its best prototype is usually
        # there, and that similarity then rules out almost every other block. (Chunks small
        # enough that the [chunk, blocks] similarities stay in cache for the argmax.)
        centre_sim = unit.new_empty(len(unit), len(self.centres))
        first = torch.cat(
            [
                _row_argmax(torch.mm(part, self.centres.T, out=centre_sim[start : start + len(part)]))
                for start, part in zip(range(0, len(unit), chunk), unit.split(chunk))
            ]
        )
        # Kernels sorted by their nearest block: each block's kernels are then one contiguous
        # slice, one product with its prototypes.
        first_sorted, order = _sort_small(first)
        position = torch.empty_like(order)
        position[order] = torch.arange(len(order), device=order.device)
        # (index_select is much faster than unit[order] on CPU)
        best_sim, within = self._best_in_blocks(torch.index_select(unit, 0, order), first_sorted)
        best_index = self._prototype(first_sorted, within)[position]
        best_sim = best_sim[position]
        # A cone of radius r can beat similarity t only if angle(x, centre) < a + r with
        # a = arccos(t), i.e. cos(x, centre) - cos(a + r) >= 0, and cos(a + r) = cos(a) cos(r)
        # - sin(a) sin(r): so [x, cos(a), -sin(a)] against a cone's [centre, -cos(r), -sin(r)]
        # gives it in one product, for parts; for blocks, cos(x, centre) is known already.
        cos_a = (best_sim.clamp_min(floor) - _BOUND_SLACK).clamp(-1.0, 1.0)
        x_trig = torch.cat([unit, cos_a[:, None], -(1.0 - cos_a * cos_a).sqrt()[:, None]], dim=1)
        # Past a half turn (a + r >= pi) the formula no longer bounds anything: such kernels
        # keep every cone.
        whole_turn = cos_a <= -self.widest.cos()
        any_whole_turn = bool(whole_turn.any())
        rows, blocks = self._blocks_within_reach(centre_sim, x_trig, first, whole_turn if any_whole_turn else None)
        alive = self._parts_within_reach(x_trig, rows, blocks)
        if any_whole_turn:
            alive |= whole_turn[rows]
        rows, blocks = rows[alive], blocks[alive]
        if len(rows):
            sim, within = self._best_in_blocks(unit.index_select(0, rows), blocks)
            updated = best_sim.scatter_reduce(0, rows, sim, reduce="amax")
            won = (sim > best_sim[rows]) & (sim == updated[rows])
            best_index[rows[won]] = self._prototype(blocks[won], within[won])
            best_sim = updated
        return best_index, best_sim

    def _best_in_blocks(self, x: torch.Tensor, blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Best similarity of ``x[i]`` within block ``blocks[i]`` (sorted), and its column.

        One matmul per block into a reused buffer of rows, reduced a buffer at a time while
        it is in cache."""
        sim = torch.empty(len(x), dtype=x.dtype, device=x.device)
        within = torch.empty(len(x), dtype=torch.long, device=x.device)
        n, columns = len(x), self._block_columns
        size = min(n, _ROWS)
        buffer = x.new_empty(size, self.columns.shape[2])
        for block, start, stop, first in _block_runs(blocks, len(columns)):
            torch.mm(x[start:stop], columns[block], out=buffer[start - first : stop - first])
            if stop - first == size or stop == n:
                # An argmax and a gather: on one thread, a third of torch.max's values and indices.
                within[first:stop] = best = _row_argmax(buffer[: stop - first])
                torch.gather(buffer[: stop - first], 1, best[:, None], out=sim[first:stop, None])
        return sim, within

    def _blocks_within_reach(
        self, centre_sim: torch.Tensor, x_trig: torch.Tensor, first: torch.Tensor, whole_turn: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(rows, blocks)``, sorted by block: each block cone within reach of ``x_trig[row]``,
        its nearest block ``first[row]`` left out (searched already). Overwrites ``centre_sim``,
        the kernels' similarities to the block centres."""
        # cos(x, centre) - cos(a + r): the centre similarities plus a product of rank 2.
        gap = centre_sim.addmm_(x_trig[:, -2:], self._block_cone_trig)
        if whole_turn is not None:
            gap[whole_turn] = 1.0
        gap[torch.arange(len(gap), device=gap.device), first] = -1.0
        rows, blocks = _nonnegative_cells(gap)
        blocks, by_block = _sort_small(blocks)
        return rows[by_block], blocks

    def _parts_within_reach(self, x_trig: torch.Tensor, rows: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
        """Whether one of block ``blocks[i]``'s (sorted) part cones is within reach of ``x_trig[rows[i]]``."""
        alive = torch.empty(len(rows), dtype=torch.bool, device=rows.device)
        size, n, part_columns = min(len(rows), _ROWS), len(rows), self._block_part_columns
        packed = x_trig.new_empty(size, x_trig.shape[1])
        gap = x_trig.new_empty(size, self.part_columns.shape[2])
        widest_gap = x_trig.new_empty(size)
        for block, start, stop, first in _block_runs(blocks, len(part_columns)):
            if start == first:
                torch.index_select(x_trig, 0, rows[first : first + size], out=packed[: min(size, n - first)])
            torch.mm(packed[start - first : stop - first], part_columns[block], out=gap[start - first : stop - first])
            if stop - first == size or stop == n:
                # A padding column's gap is -sin(a) < 0 (0 < a < pi here).
                torch.amax(gap[: stop - first], dim=1, out=widest_gap[: stop - first])
                torch.ge(widest_gap[: stop - first], 0, out=alive[first:stop])
        return alive

    @cached_property
    def _block_cone_trig(self) -> torch.Tensor:
        """``[-cos(radius); -sin(radius)]`` of each block's cone, as columns."""
        return torch.stack([-self.radii.cos(), -self.radii.sin()])

    @cached_property
    def _block_columns(self) -> tuple[torch.Tensor, ...]:
        return self.columns.unbind(0)  # views made once: indexing costs as much as a small product

    @cached_property
    def _block_part_columns(self) -> tuple[torch.Tensor, ...]:
        return self.part_columns.unbind(0)

    def _prototype(self, blocks: torch.Tensor, within: torch.Tensor) -> torch.Tensor:
        """Index of the ``within``-th column of ``blocks`` (a padding column is the last prototype)."""
        return self.first[blocks] + torch.minimum(within, self.sizes[blocks] - 1)


def _block_runs(blocks: torch.Tensor, n_blocks: int) -> Iterator[tuple[int, int, int, int]]:
    """``(block, start, stop, first)``: the runs of rows of each block in ``blocks`` (sorted),
    cut at every multiple of :data:`_ROWS`; ``first`` is the first row of the run's buffer.

    >>> list(_block_runs(torch.tensor([0, 0, 2]), 3))
    [(0, 0, 2, 0), (2, 2, 3, 0)]
    """
    start = 0
    for block, count in enumerate(torch.bincount(blocks, minlength=n_blocks).tolist()):
        end = start + count
        while start < end:
            first = start - start % _ROWS
            stop = min(end, first + _ROWS)
            yield block, start, stop, first
            start = stop


def _row_argmax(values: torch.Tensor) -> torch.Tensor:
    """The first index of each row's maximum, like ``values.argmax(dim=1)``.

    >>> _row_argmax(torch.tensor([[1.0, 3.0, 3.0], [2.0, 0.0, 1.0]])).tolist()
    [1, 0]
    """
    if values.device.type != "cpu":
        return values.argmax(dim=1)
    # numpy's argmax is twice as fast as torch's on CPU.
    return torch.from_numpy(values.numpy().argmax(axis=1))


def _sort_small(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Stable sort of block numbers, like ``values.sort(stable=True)``.

    >>> [t.tolist() for t in _sort_small(torch.tensor([2, 0, 2, 1]))]
    [[0, 1, 2, 2], [1, 3, 0, 2]]
    """
    if values.device.type != "cpu" or (len(values) and int(values.max()) > np.iinfo(np.int16).max):
        return values.sort(stable=True)
    # numpy sorts 16-bit integers stably by radix sort, in linear time: 4x torch's sort here.
    order = torch.from_numpy(np.argsort(values.numpy().astype(np.int16), kind="stable"))
    return values[order], order


def _nonnegative_cells(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column of each cell of a 2-D tensor that is at least 0, in row-major order.

    >>> [t.tolist() for t in _nonnegative_cells(torch.tensor([[-1.0, 0.0], [2.0, 3.0]]))]
    [[0, 1, 1], [1, 0, 1]]
    """
    if values.device.type != "cpu":
        return (values >= 0).nonzero(as_tuple=True)
    # numpy compares twice as fast as torch here, and finds the cells twice as fast.
    rows, columns = np.divmod(np.flatnonzero(values.numpy() >= 0), values.shape[1])
    return torch.from_numpy(rows), torch.from_numpy(columns)


def _cone_rows(centres: torch.Tensor, radii: torch.Tensor) -> torch.Tensor:
    """Each cone as a row ``[centre, -cos(radius), -sin(radius)]``: its product with a kernel's
    ``[x, cos(a), -sin(a)]`` is ``cos(x, centre) - cos(a + radius)``."""
    return torch.cat([centres, -radii.cos()[:, None], -radii.sin()[:, None]], dim=1)


def _cones(prototypes: torch.Tensor, starts: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit centre and half-angle of each run ``prototypes[starts[i]:starts[i + 1]]``."""
    run = torch.repeat_interleave(torch.arange(len(starts) - 1), torch.tensor(starts).diff())
    centres = torch.zeros(len(starts) - 1, prototypes.shape[1]).index_add_(0, run, prototypes)
    centres = torch.nn.functional.normalize(centres, dim=1)
    angles = torch.arccos((prototypes * centres[run]).sum(dim=1).clamp(-1.0, 1.0))
    return centres, torch.zeros(len(centres)).scatter_reduce_(0, run, angles, reduce="amax")


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
    out_labels = labels[best].astype(np.result_type(labels, np.array([UNCLUSTERED, INVALID])), copy=False)
    out_labels[~clustered] = UNCLUSTERED
    out_labels[~valid_np] = INVALID
    return ClassificationResult(
        labels=out_labels,
        clustered=clustered,
        dissimilarity=np.where(valid_np, dissimilarity, np.nan),
        codes=np.where(valid_np, codes[best], np.nan),
        valid=valid_np,
    )
