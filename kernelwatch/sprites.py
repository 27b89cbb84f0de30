"""Kernel pictures as PNG bytes, with numpy and zlib only (no PIL, no matplotlib).

Every kernel is divided by its own largest |w| and drawn in a diverging colour map centred on
0: blue negative, white zero, red positive. Kernels with NaN/Inf are a flat grey cell. The
pictures carry no text: each comes with a JSON-able ``layout`` (cell positions, labels,
colours) from which the frontend draws the legend.

>>> import numpy as np
>>> png, layout = kernel_sprite(np.random.default_rng(0).standard_normal((10, 3, 3)), ["on-centre"] * 10)
>>> png[:8] == PNG_SIGNATURE, layout["n_shown"], layout["groups"][0]["colour"]
(True, 10, '#f28e2b')
"""

from __future__ import annotations

import math
import struct
import zlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from kernelwatch._config import CLUSTERS, INVALID, UNCLUSTERED
from kernelwatch.errors import KernelWatchError

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

#: Legend colour of each group, in sprite order (clusters, then unclustered, then invalid).
CLUSTER_COLOURS: dict[str, str] = {
    "on-centre": "#f28e2b",
    "off-centre": "#76b7b2",
    "on-cross": "#b07aa1",
    "off-cross": "#ff9da7",
    "first-derivative": "#59a14f",
    "second-derivative": "#edc948",
    "on-square": "#9c755f",
    "off-square": "#4e79a7",
    "other": "#8cd17d",
    UNCLUSTERED: "#bab0ac",
    INVALID: "#e15759",
}
GROUPS: tuple[str, ...] = (*CLUSTERS, UNCLUSTERED, INVALID)

# Diverging map (ColorBrewer RdBu with a pure white centre), from -1 to 1.
_MAP_AT = np.linspace(-1.0, 1.0, 9)
_MAP_RGB = np.array(
    [
        (5, 48, 97),
        (33, 102, 172),
        (67, 147, 195),
        (146, 197, 222),
        (255, 255, 255),
        (244, 165, 130),
        (214, 96, 77),
        (178, 24, 43),
        (103, 0, 31),
    ],
    dtype=np.float64,
)
_NONFINITE_RGB = (150, 150, 150)
_BACKGROUND_RGB = (64, 64, 64)


def _hex_rgb(colour: str) -> tuple[int, int, int]:
    return int(colour[1:3], 16), int(colour[3:5], 16), int(colour[5:7], 16)


# Kernel pictures are palette PNGs, one byte per pixel rather than RGB's three: a sprite takes a
# third of the time to draw and compress, and half the bytes. The palette: the colour map at _LEVELS even steps
# from -1 to 1 (0 and the map's anchors fall on steps), then the grey of non-finite kernels,
# the background and each group's legend colour.
_LEVELS = 241
_NONFINITE, _BACKGROUND = _LEVELS, _LEVELS + 1
_GROUP_INDEX = {group: _LEVELS + 2 + i for i, group in enumerate(GROUPS)}
_PALETTE = np.concatenate(
    [
        np.round(np.stack([np.interp(np.linspace(-1.0, 1.0, _LEVELS), _MAP_AT, _MAP_RGB[:, c]) for c in range(3)], 1)),
        [_NONFINITE_RGB, _BACKGROUND_RGB],
        [_hex_rgb(CLUSTER_COLOURS[group]) for group in GROUPS],
    ]
).astype(np.uint8)


def encode_png(image: np.ndarray, palette: np.ndarray | None = None) -> bytes:
    """An 8-bit PNG: RGB of a ``[height, width, 3]`` uint8 array, or with ``palette`` (``[n, 3]``
    uint8, n <= 256) indexed colour of a ``[height, width]`` array of indices into it.

    >>> encode_png(np.zeros((2, 3, 3), np.uint8))[:8] == PNG_SIGNATURE
    True
    """
    image = np.ascontiguousarray(image, dtype=np.uint8)
    height, width = image.shape[:2]
    # Each scanline starts with its filter type; 0 = none (zlib does the compressing).
    raw = np.concatenate([np.zeros((height, 1), np.uint8), image.reshape(height, -1)], axis=1).tobytes()

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    colour_type = 2 if palette is None else 3
    chunks = chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, colour_type, 0, 0, 0))
    if palette is not None:
        chunks += chunk(b"PLTE", np.ascontiguousarray(palette, dtype=np.uint8).tobytes())
    # Level 3: half the time of zlib's default 6 on a sprite, for files about a third larger.
    return PNG_SIGNATURE + chunks + chunk(b"IDAT", zlib.compress(raw, 3)) + chunk(b"IEND", b"")


def colourise(kernels: np.ndarray) -> np.ndarray:
    """``[..., k, k]`` weights -> ``[..., k, k, 3]`` uint8 colours, each ``k x k`` kernel scaled
    by its own max |w|; a kernel with NaN/Inf is flat grey.

    >>> colourise(np.array([[-2.0, 0.0, 1.0]]))[0].tolist()
    [[5, 48, 97], [255, 255, 255], [214, 96, 77]]
    """
    return _PALETTE[_colour_indices(kernels)]


def _colour_indices(kernels: np.ndarray) -> np.ndarray:
    """``[..., k, k]`` weights -> their colours' indices in the sprites' palette."""
    kernels = np.asarray(kernels, dtype=np.float64)
    finite = np.isfinite(kernels).all(axis=(-2, -1), keepdims=True)
    kernels = np.where(finite, kernels, 0.0)
    peak = np.abs(kernels).max(axis=(-2, -1), keepdims=True, initial=0.0)
    scaled = kernels / np.where(peak > 0, peak, 1.0)
    levels = np.floor((scaled + 1.0) * ((_LEVELS - 1) / 2) + 0.5)
    return np.where(finite, levels, _NONFINITE).astype(np.uint8)


def kernel_sprite(
    kernels: np.ndarray,
    labels: Sequence[str],
    max_kernels: int = 64,
    columns: int = 8,
    pixels_per_weight: int | None = None,
    gap: int = 3,
    band: int = 6,
    details: Mapping[str, Sequence[float]] | None = None,
) -> tuple[bytes, dict[str, Any]]:
    """A grid of a sample of ``[N, k, k]`` kernels, grouped by label; ``(png, layout)``.

    Groups follow :data:`GROUPS` order (subtypes such as ``first-derivative/left`` join their
    family), each starting on a new row behind a ``band``-pixel bar of its legend colour.
    With more than ``max_kernels`` kernels every group keeps at least one cell and the rest
    are shared in proportion to group size, picked evenly over channel order so successive
    snapshots show the same channels. ``layout`` gives the picture's size, each cell's ``x``,
    ``y``, source ``index`` and ``label``, and each group's band rectangle, colour and counts.
    ``details`` adds per-kernel numbers to each cell under their names (``{"code": codes}``),
    rounded to 4 decimals, None where not finite.
    """
    kernels = np.asarray(kernels)
    labels = np.asarray(labels, dtype=str)
    if kernels.ndim != 3 or kernels.shape[1] != kernels.shape[2] or len(labels) != len(kernels):
        raise KernelWatchError(f"need [N, k, k] kernels and N labels, got {kernels.shape} and {len(labels)} labels")
    details = {name: np.asarray(values, dtype=np.float64) for name, values in (details or {}).items()}
    if any(values.shape != (len(kernels),) for values in details.values()):
        raise KernelWatchError(f"every sprite detail needs one number per kernel ({len(kernels)})")
    if max_kernels < 1 or columns < 1:
        raise KernelWatchError(f"max_kernels and columns must be >= 1, got {max_kernels} and {columns}")
    k = kernels.shape[1]
    scale = pixels_per_weight or _pixels_per_weight(k)
    cell = k * scale
    family = _families(labels)
    members = [np.flatnonzero(family == group) for group in GROUPS]
    chosen = _sample(members, max_kernels)

    left = band + gap
    rows = sum(-(-len(c) // columns) for c in chosen)
    width = left + columns * (cell + gap)
    height = max(rows, 1) * (cell + gap) + gap
    canvas = np.full((height, width), _BACKGROUND, np.uint8)
    cells, groups, y = [], [], gap
    for group, member, picks in zip(GROUPS, members, chosen):
        if not len(picks):
            continue
        # Subtypes side by side within their family, each in channel order.
        picks = picks[np.lexsort((picks, labels[picks]))]
        n_rows = -(-len(picks) // columns)
        band_height = n_rows * (cell + gap) - gap
        canvas[y : y + band_height, :band] = _GROUP_INDEX[group]
        groups.append(
            {
                "label": group,
                "colour": CLUSTER_COLOURS[group],
                "count": len(member),
                "shown": len(picks),
                "x": 0,
                "y": y,
                "width": band,
                "height": band_height,
            }
        )
        # Python numbers per cell from tolist(): numpy scalars cost more than the drawing here.
        numbers = {name: values[picks].tolist() for name, values in details.items()}
        tiles = _upscale(_colour_indices(kernels[picks]), scale)
        for i, (index, label) in enumerate(zip(picks.tolist(), labels[picks].tolist())):
            cx, cy = left + (i % columns) * (cell + gap), y + (i // columns) * (cell + gap)
            canvas[cy : cy + cell, cx : cx + cell] = tiles[i]
            cells.append({"x": cx, "y": cy, "index": index, "label": label})
            cells[-1].update({name: _rounded(values[i]) for name, values in numbers.items()})
        y += n_rows * (cell + gap)
    layout = {
        "width": width,
        "height": height,
        "kernel_size": k,
        "pixels_per_weight": scale,
        "cell_size": cell,
        "gap": gap,
        "columns": columns,
        "n_kernels": len(kernels),
        "n_shown": len(cells),
        "cells": cells,
        "groups": groups,
    }
    return encode_png(canvas, _PALETTE), layout


def spectrum_strip(
    prototypes: np.ndarray,
    labels: Sequence[str],
    n: int = 24,
    pixels_per_weight: int | None = None,
    gap: int = 2,
    band: int = 10,
) -> tuple[bytes, dict[str, Any]]:
    """``n`` prototypes along the code axis in one row, over a band that colours every
    prototype by its label's family; ``(png, layout)``.

    The band maps prototype ``i`` of ``M`` to x = ``band.x + i * band.width / M`` (codes are
    evenly spaced, so x is linear in the code). Each cell shows the prototype in the middle of
    the stretch of band beneath it. ``layout`` lists each cell's ``x``, ``y``, prototype
    ``index`` and ``label``, the band rectangle and the colour of each family shown.

    >>> png, layout = spectrum_strip(np.random.default_rng(0).standard_normal((100, 5, 5)), ["other"] * 100, n=4)
    >>> [c["index"] for c in layout["cells"]], layout["colours"]
    ([12, 37, 62, 87], {'other': '#8cd17d'})
    """
    prototypes = np.asarray(prototypes)
    labels = np.asarray(labels, dtype=str)
    total, k = len(prototypes), prototypes.shape[-1]
    if prototypes.ndim != 3 or len(labels) != total or total == 0:
        raise KernelWatchError(
            f"need [M, k, k] prototypes (M > 0) and M labels, got {prototypes.shape} and {len(labels)} labels"
        )
    scale = pixels_per_weight or _pixels_per_weight(k)
    cell = k * scale
    m = min(n, total)
    picks = ((np.arange(m) + 0.5) * total / m).astype(int)
    width = gap + m * (cell + gap)
    band_y = gap + cell + gap
    canvas = np.full((band_y + band + gap, width), _BACKGROUND, np.uint8)
    cells = []
    for i, (index, tile) in enumerate(zip(picks, _upscale(_colour_indices(prototypes[picks]), scale))):
        x = gap + i * (cell + gap)
        canvas[gap : gap + cell, x : x + cell] = tile
        cells.append({"x": x, "y": gap, "index": int(index), "label": str(labels[index])})
    family = _families(labels)
    band_width = width - gap
    at = (np.arange(band_width) * total) // band_width  # prototype under each band column
    shown = set(np.unique(family).tolist())
    canvas[band_y : band_y + band, gap : gap + band_width] = np.array([_GROUP_INDEX[f] for f in family[at]], np.uint8)
    layout = {
        "width": width,
        "height": canvas.shape[0],
        "kernel_size": k,
        "pixels_per_weight": scale,
        "cell_size": cell,
        "n_prototypes": total,
        "cells": cells,
        "band": {"x": gap, "y": band_y, "width": band_width, "height": band},
        "colours": {name: CLUSTER_COLOURS[name] for name in GROUPS if name in shown},
    }
    return encode_png(canvas, _PALETTE), layout


def filter_grid(weight: np.ndarray, max_filters: int = 64, columns: int = 8) -> tuple[bytes, dict[str, Any]]:
    """A first layer's filters ``[out, in, kh, kw]`` as a grid of colour pictures, the first
    ``max_filters`` in channel order: with 3 input channels each filter is an RGB image (its
    channels as red, green and blue), otherwise grey (the mean over channels); each filter is
    scaled by its own max |w|, mid-grey at 0. Returns the PNG and the grid's geometry.

    >>> png, grid = filter_grid(np.random.default_rng(0).standard_normal((10, 3, 4, 4)))
    >>> png[:8] == PNG_SIGNATURE, grid
    (True, {'n_filters': 10, 'n_shown': 10, 'columns': 8, 'cell_size': 32})
    """
    weight = np.asarray(weight, dtype=np.float64)
    if weight.ndim != 4 or weight.shape[0] == 0:
        raise KernelWatchError(f"filter_grid needs a [out, in, kh, kw] conv weight, got shape {weight.shape}")
    filters = weight[:max_filters]
    if filters.shape[1] != 3:
        filters = filters.mean(axis=1, keepdims=True).repeat(3, axis=1)
    finite = np.isfinite(filters).all(axis=(1, 2, 3), keepdims=True)
    filters = np.where(finite, filters, 0.0)
    peak = np.abs(filters).max(axis=(1, 2, 3), keepdims=True, initial=0.0)
    rgb = 127.5 + 127.5 * filters / np.where(peak > 0, peak, 1.0)
    rgb = np.where(finite, rgb, _NONFINITE_RGB[0]).transpose(0, 2, 3, 1)  # [n, kh, kw, 3]
    kh, kw = rgb.shape[1:3]
    scale = max(1, 32 // max(kh, kw))
    cells = _upscale(np.round(rgb).astype(np.uint8), scale, channels=True)
    n, gap = len(cells), 2
    columns = min(columns, n)
    rows = -(-n // columns)
    cell_h, cell_w = kh * scale, kw * scale
    canvas = np.empty((rows * (cell_h + gap) + gap, columns * (cell_w + gap) + gap, 3), np.uint8)
    canvas[:] = _BACKGROUND_RGB
    for i, cell in enumerate(cells):
        y, x = gap + (i // columns) * (cell_h + gap), gap + (i % columns) * (cell_w + gap)
        canvas[y : y + cell_h, x : x + cell_w] = cell
    grid = {"n_filters": int(weight.shape[0]), "n_shown": n, "columns": columns, "cell_size": max(cell_h, cell_w)}
    return encode_png(canvas), grid


def _rounded(value: float) -> float | None:
    return round(value, 4) if math.isfinite(value) else None


def _families(labels: np.ndarray) -> np.ndarray:
    """Drop subtypes; a label outside :data:`GROUPS` (a custom spectrum's) counts as "other"."""
    # Each distinct label once: a layer has hundreds of kernels but a dozen labels.
    distinct, inverse = np.unique(labels, return_inverse=True)
    family = np.array([label.split("/", 1)[0] for label in distinct], dtype=str)
    return np.where(np.isin(family, GROUPS), family, "other")[inverse.reshape(-1)]


def _pixels_per_weight(k: int) -> int:
    """8 px per weight up to 8x8 kernels, so a 3x3 stays legible; then ~64 px per cell."""
    return max(2, min(8, 64 // k))


def _upscale(image: np.ndarray, scale: int, channels: bool = False) -> np.ndarray:
    """``[..., h, w]`` (``[..., h, w, 3]`` with ``channels``) -> ``h * scale`` by ``w * scale``,
    each weight a square of pixels."""
    rows = -3 if channels else -2
    return image.repeat(scale, axis=rows).repeat(scale, axis=rows + 1)


def _evenly(indices: np.ndarray, m: int) -> np.ndarray:
    """``m`` of ``indices`` evenly spread, first and last included (distinct since m <= len)."""
    if m >= len(indices):
        return indices
    # floor(x + 0.5), not np.round: banker's rounding could map two picks to one index.
    return indices[np.floor(np.linspace(0, len(indices) - 1, m) + 0.5).astype(int)]


def _sample(members: list[np.ndarray], limit: int) -> list[np.ndarray]:
    """At most ``limit`` indices over all groups: one per non-empty group first (largest groups
    first if there are more groups than room), then the rest by largest remainder."""
    counts = np.array([len(m) for m in members])
    if counts.sum() <= limit:
        return members
    quota = np.zeros(len(members), int)
    quota[np.argsort(-counts, kind="stable")[: min(limit, int(np.sum(counts > 0)))]] = 1
    room = counts - quota
    spare = limit - quota.sum()
    if spare > 0:
        exact = spare * room / room.sum()
        extra = np.floor(exact).astype(int)
        extra[np.argsort(-(exact - extra), kind="stable")[: spare - extra.sum()]] += 1
        quota += extra
    return [_evenly(m, q) for m, q in zip(members, quota)]
