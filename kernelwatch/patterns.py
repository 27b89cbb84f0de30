"""Analytic generators for the kernel patterns of the paper (sections 4-5, appendices A, B, D).

Every generator draws ``n`` kernels on a ``k x k`` grid (``k`` odd, 3..31) with random shape
parameters, vectorised over ``n``. Array orientation: ``kernel[row, col]``, row 0 is the top,
column 0 the left; below, ``x`` grows to the right and ``y`` grows downwards, both measured
from the centre pixel.

Patterns (``g(s)`` is a peak-1 Gaussian of width ``s``; ``DoG = g(sc) - a * g(ss)``):

* ``on-centre``: the DoG, a positive centre blob with a weaker negative ring.
* ``first-derivative/<dir>``: the DoG's derivative along a direction, positive lobe towards
  ``<dir>``: ``left`` = ``+d/dx DoG`` (positive lobe in the left columns, negative right),
  ``right`` = ``-d/dx DoG``, ``up`` = ``+d/dy DoG`` (positive in the top rows),
  ``down`` = ``-d/dy DoG``.
* ``second-derivative/<sub>``: the six second derivatives of appendix A.
  ``vertical-on`` = ``-d2/dx2 DoG``, a positive vertical stripe flanked by negative ones;
  ``horizontal-on`` = ``-d2/dy2 DoG``, the same stripe lying horizontally; ``vertical-off`` and
  ``horizontal-off`` are their sign flips. ``diagonal`` = ``+d2/dxdy DoG``, positive in the
  top-left and bottom-right quadrants; ``anti-diagonal`` is its sign flip (positive top-right
  and bottom-left), so it needs no separate off variant.
* ``on-cross``: the sum of two orthogonal elongated Gaussians (appendix B) plus a centre boost,
  since trained crosses are denser at the centre than the plain sum.
* ``on-square/<corner>``: a solid 2x2 or 3x3 block that holds the centre pixel and reaches
  towards the ``upper-left`` or ``bottom-right`` corner (section 5, appendix D), with a weak
  negative surround. Small kernels only (``k <= MAX_SQUARE_KERNEL_SIZE``).
* ``off-*``: the exact sign flip of the matching ``on-*`` kernel (same seed, same shape).

Sampled parameters, with ``h = (k - 1) / 2`` and ``s = max(1, h / 3)`` (sizes grow with ``k``
only beyond 7x7):

* centre sigma ``sc ~ U(0.3 + 0.1 * min(h, 3), 0.3 + 0.3 * min(h, 3)) * s``: 0.4-0.6 px for
  3x3, 0.5-0.9 for 5x5, 0.6-1.2 for 7x7 (a blob 1-3 px wide); derivatives use ``1.3 * sc`` so
  their lobes span the kernel; surround ratio ``ss / sc ~ U(1.5, 3)``; surround weight
  ``a ~ U(0.3, 0.5)`` of the centre peak (the ring stays weaker than the centre);
* sub-pixel centre offset ``~ U(-m, m)`` per axis, ``m = min(0.25 * min(h, 2) * s, sc / 2)``
  (at most 0.25 px in 3x3, 0.5 px in 5x5/7x7), so the blob stays on the centre pixel;
* derivative orientation jitter ``~ U(-20, 20)`` degrees around the nominal direction;
* cross: arm width ``~ U(0.35, 0.35 + 0.15 * min(h, 3)) * s``, arm length ``~ U(0.6, 1.3) * h``,
  centre boost ``~ U(0, 0.5)``, rotation jitter ``~ U(-10, 10)`` degrees, offset as above
  with the arm width in place of ``sc``;
* square: block side 2 or 3 (2 only for 3x3), surround depth ``~ U(0.1, 0.4)`` of the block,
  surround width ``~ U(0.8, 1.6)``;
* amplitude: each kernel is scaled to ``max |w| ~ U(0.5, 1.5)``, like raw weights.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from kernelwatch._config import CLUSTERS
from kernelwatch.errors import KernelWatchError

#: The pattern families a generator exists for: every cluster but "other".
FAMILIES: tuple[str, ...] = tuple(name for name in CLUSTERS if name != "other")

#: Finer variants of a family; a family missing here has none.
SUBTYPES: dict[str, tuple[str, ...]] = {
    "first-derivative": ("left", "right", "up", "down"),
    "second-derivative": (
        "vertical-on", "vertical-off", "horizontal-on", "horizontal-off", "diagonal", "anti-diagonal"
    ),
    "on-square": ("upper-left", "bottom-right"),
    "off-square": ("upper-left", "bottom-right"),
}

MIN_KERNEL_SIZE = 3
MAX_KERNEL_SIZE = 31
#: Squares are a small-kernel pattern (section 5): larger sizes have none.
MAX_SQUARE_KERNEL_SIZE = 5

# Unit vector (x right, y down) towards the positive lobe of each first derivative.
_FIRST_DIRECTIONS = {"left": 180.0, "right": 0.0, "up": 270.0, "down": 90.0}
_DERIVATIVE_JITTER_DEG = 20.0
_CROSS_JITTER_DEG = 10.0
# Derivative lobes sit about one sigma from the centre: wider sigmas make them span the kernel.
_DERIVATIVE_WIDEN = 1.3


def generate(
    family: str,
    n: int,
    kernel_size: int,
    *,
    rng: np.random.Generator | int | None = None,
    noise: float = 0.0,
    subtype: str | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Draw ``n`` kernels of one family: ``(float32 [n, k, k], labels [n])``.

    Labels are ``family`` or ``family/subtype``; with ``subtype=None`` a family that has
    subtypes draws them uniformly. ``noise`` adds Gaussian noise of std ``noise`` times the
    clean kernel's std, per kernel.

    >>> kernels, labels = generate("first-derivative", 3, 5, rng=0, subtype="left")
    >>> kernels.shape, kernels.dtype.name, str(labels[0])
    ((3, 5, 5), 'float32', 'first-derivative/left')
    >>> bool((kernels[:, :, :2].sum() > 0) and (kernels[:, :, -2:].sum() < 0))
    True
    """
    n, k = _check_count(n), _check_size(kernel_size)
    if family not in FAMILIES:
        raise KernelWatchError(f"unknown pattern family {family!r}; expected one of {FAMILIES}")
    if family.endswith("square") and k > MAX_SQUARE_KERNEL_SIZE:
        raise KernelWatchError(
            f"{family} is a small-kernel pattern: kernel_size must be <= {MAX_SQUARE_KERNEL_SIZE}, got {k}"
        )
    subtypes = SUBTYPES.get(family)
    if subtype is not None and (subtypes is None or subtype not in subtypes):
        raise KernelWatchError(f"unknown subtype {subtype!r} for {family!r}; expected one of {subtypes or ()}")
    noise = float(noise)
    if not np.isfinite(noise) or noise < 0:
        raise KernelWatchError(f"noise must be a finite number >= 0, got {noise}")
    rng = np.random.default_rng(rng)

    if subtypes is None:
        which, labels = np.zeros(n, dtype=np.intp), np.full(n, family)
    else:
        which = np.full(n, subtypes.index(subtype)) if subtype else rng.integers(len(subtypes), size=n)
        labels = np.array([f"{family}/{s}" for s in subtypes])[which]

    base = family.removeprefix("off-").removeprefix("on-")
    if base == "centre":
        kernels = _centre(rng, n, k)
    elif base == "cross":
        kernels = _cross(rng, n, k)
    elif base == "square":
        kernels = _square(rng, n, k, which)
    elif family == "first-derivative":
        kernels = _first_derivative(rng, n, k, which)
    else:
        kernels = _second_derivative(rng, n, k, which)
    if family.startswith("off-"):
        kernels = -kernels

    peak = np.abs(kernels).max(axis=(1, 2), keepdims=True)
    kernels = kernels / peak * rng.uniform(0.5, 1.5, (n, 1, 1))
    if noise > 0:
        std = kernels.std(axis=(1, 2), keepdims=True)
        kernels = kernels + rng.standard_normal(kernels.shape) * (noise * std)
    return kernels.astype(np.float32), labels.astype(str)


def generate_mixture(
    n: int,
    kernel_size: int,
    proportions: Mapping[str, float] | None = None,
    *,
    rng: np.random.Generator | int | None = None,
    noise: float = 0.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Draw ``n`` kernels with families drawn by ``proportions``, in shuffled order.

    ``proportions`` maps families to non-negative shares summing to 1; the default is uniform
    over the families that exist at this size (squares only up to 5x5).

    >>> kernels, labels = generate_mixture(6, 7, {"on-centre": 0.5, "off-centre": 0.5}, rng=1)
    >>> kernels.shape, sorted(set(labels.tolist()))
    ((6, 7, 7), ['off-centre', 'on-centre'])
    """
    n, k = _check_count(n), _check_size(kernel_size)
    if proportions is None:
        families = [f for f in FAMILIES if k <= MAX_SQUARE_KERNEL_SIZE or not f.endswith("square")]
        proportions = dict.fromkeys(families, 1.0 / len(families))
    shares = check_proportions(proportions)
    rng = np.random.default_rng(rng)
    counts = rng.multinomial(n, list(shares.values()))
    parts = [generate(f, c, k, rng=rng, noise=noise) for f, c in zip(shares, counts) if c > 0]
    if not parts:
        return np.zeros((0, k, k), np.float32), np.array([], dtype=str)
    order = rng.permutation(n)
    return np.concatenate([p[0] for p in parts])[order], np.concatenate([p[1] for p in parts])[order]


def check_proportions(proportions: Mapping[str, float]) -> dict[str, float]:
    """Validated copy of family shares: known families, finite, non-negative, summing to 1."""
    unknown = [f for f in proportions if f not in FAMILIES]
    if unknown:
        raise KernelWatchError(f"unknown pattern families in proportions: {unknown}; expected keys from {FAMILIES}")
    shares = {f: float(v) for f, v in proportions.items()}
    if not all(np.isfinite(v) and v >= 0 for v in shares.values()):
        raise KernelWatchError(f"proportions must be finite and non-negative, got {shares}")
    if abs(sum(shares.values()) - 1.0) > 1e-6:
        raise KernelWatchError(f"proportions must sum to 1, got {sum(shares.values()):.6g}")
    return shares


def _check_size(kernel_size: int) -> int:
    ok = isinstance(kernel_size, (int, np.integer)) and not isinstance(kernel_size, bool)
    if not ok or not MIN_KERNEL_SIZE <= kernel_size <= MAX_KERNEL_SIZE or kernel_size % 2 == 0:
        raise KernelWatchError(
            f"kernel_size must be an odd integer in [{MIN_KERNEL_SIZE}, {MAX_KERNEL_SIZE}], got {kernel_size!r}"
        )
    return int(kernel_size)


def _check_count(n: int) -> int:
    if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 0:
        raise KernelWatchError(f"n must be a non-negative integer, got {n!r}")
    return int(n)


def _scales(k: int) -> tuple[float, float]:
    h = (k - 1) / 2
    return h, max(1.0, h / 3)


def _max_offset(k: int) -> float:
    h, s = _scales(k)
    return 0.25 * min(h, 2) * s


def _positions(rng: np.random.Generator, n: int, k: int, max_offset: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``x``, ``y`` of every pixel relative to a randomly offset centre, each ``[n, k, k]``."""
    offset = rng.uniform(-1.0, 1.0, (2, n, 1, 1)) * max_offset
    y, x = np.mgrid[0:k, 0:k] - (k - 1) / 2
    return x[None] - offset[0], y[None] - offset[1]


def _dog(
    rng: np.random.Generator, n: int, k: int, widen: float = 1.0
) -> tuple[list[tuple[float | np.ndarray, np.ndarray]], np.ndarray, np.ndarray]:
    """DoG parameters ``[(weight, sigma), ...]`` for centre and surround, and offset positions."""
    h, s = _scales(k)
    sc = rng.uniform(0.3 + 0.1 * min(h, 3), 0.3 + 0.3 * min(h, 3), (n, 1, 1)) * s * widen
    ss = sc * rng.uniform(1.5, 3.0, (n, 1, 1))
    a = rng.uniform(0.3, 0.5, (n, 1, 1))
    x, y = _positions(rng, n, k, np.minimum(_max_offset(k), sc / 2))
    return [(1.0, sc), (-a, ss)], x, y


def _angles(rng: np.random.Generator, nominal_deg: np.ndarray, jitter_deg: float) -> tuple[np.ndarray, np.ndarray]:
    theta = np.deg2rad(nominal_deg + rng.uniform(-jitter_deg, jitter_deg, nominal_deg.shape))
    return np.cos(theta)[:, None, None], np.sin(theta)[:, None, None]


def _centre(rng: np.random.Generator, n: int, k: int) -> np.ndarray:
    terms, x, y = _dog(rng, n, k)
    r2 = x**2 + y**2
    return sum(w * np.exp(-r2 / (2 * s**2)) for w, s in terms)


def _first_derivative(rng: np.random.Generator, n: int, k: int, which: np.ndarray) -> np.ndarray:
    nominal = np.array([_FIRST_DIRECTIONS[d] for d in SUBTYPES["first-derivative"]])[which]
    ux, uy = _angles(rng, nominal, _DERIVATIVE_JITTER_DEG)
    terms, x, y = _dog(rng, n, k, _DERIVATIVE_WIDEN)
    r2, along = x**2 + y**2, ux * x + uy * y
    # -(u . grad) g = (u . p) / s^2 * g: positive on the side u points to.
    return sum(w * along / s**2 * np.exp(-r2 / (2 * s**2)) for w, s in terms)


def _second_derivative(rng: np.random.Generator, n: int, k: int, which: np.ndarray) -> np.ndarray:
    # Per subtype: (u angle in degrees, sign, mixed?). Stripes are -sign * (u . grad)^2 DoG with
    # u across the stripe; mixed ones are sign * (u . grad)(v . grad) DoG with v = u rotated +90.
    table = np.array([(0, 1, 0), (0, -1, 0), (90, 1, 0), (90, -1, 0), (0, 1, 1), (0, -1, 1)], dtype=float)[which]
    ux, uy = _angles(rng, table[:, 0], _DERIVATIVE_JITTER_DEG)
    sign, mixed = table[:, 1, None, None], table[:, 2, None, None]
    terms, x, y = _dog(rng, n, k, _DERIVATIVE_WIDEN)
    # Both are A : Hessian(g) = (p'Ap / s^4 - tr A / s^2) g for a peak-1 Gaussian g, with
    # A = -sign uu' (stripe, tr A = -sign) or A = sign (uv' + vu') / 2 (mixed, tr A = 0).
    pu, pv = ux * x + uy * y, -uy * x + ux * y
    quad = sign * np.where(mixed > 0, pu * pv, -(pu**2))
    trace = -sign * (1 - mixed)
    r2 = x**2 + y**2
    return sum(w * (quad / s**4 - trace / s**2) * np.exp(-r2 / (2 * s**2)) for w, s in terms)


def _cross(rng: np.random.Generator, n: int, k: int) -> np.ndarray:
    h, s = _scales(k)
    width = rng.uniform(0.35, 0.35 + 0.15 * min(h, 3), (n, 1, 1)) * s
    length = rng.uniform(0.6, 1.3, (n, 1, 1)) * h
    boost = rng.uniform(0.0, 0.5, (n, 1, 1))
    ux, uy = _angles(rng, np.zeros(n), _CROSS_JITTER_DEG)
    x, y = _positions(rng, n, k, np.minimum(_max_offset(k), width / 2))
    pu, pv = ux * x + uy * y, -uy * x + ux * y
    arm_u = np.exp(-(pu**2) / (2 * length**2) - pv**2 / (2 * width**2))
    arm_v = np.exp(-(pv**2) / (2 * length**2) - pu**2 / (2 * width**2))
    return arm_u + arm_v + boost * np.exp(-(pu**2 + pv**2) / (2 * width**2))


def _square(rng: np.random.Generator, n: int, k: int, which: np.ndarray) -> np.ndarray:
    c = (k - 1) // 2
    side = rng.integers(2, 4, (n, 1, 1)) if k > 3 else np.full((n, 1, 1), 2)
    depth = rng.uniform(0.1, 0.4, (n, 1, 1))
    width = rng.uniform(0.8, 1.6, (n, 1, 1))
    # The block holds the centre pixel and reaches side - 1 pixels towards its corner.
    towards = np.where(which == SUBTYPES["on-square"].index("upper-left"), -1, 1)[:, None, None]
    lo = np.where(towards < 0, c - side + 1, c)
    rows, cols = np.mgrid[0:k, 0:k]
    block = (rows >= lo) & (rows < lo + side) & (cols >= lo) & (cols < lo + side)
    mid = lo + (side - 1) / 2
    surround = depth * np.exp(-((rows - mid) ** 2 + (cols - mid) ** 2) / (2 * width**2))
    return np.where(block, 1.0, -surround)
