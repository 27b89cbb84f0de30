"""An independent generator of the paper's kernel families, for judging spectra only.

Written from the paper's formulas (section 4.2, appendices A, B, D) with a parameterisation of
its own, unlike :mod:`kernelwatch.patterns` (which trains and labels the spectra): this module
is never imported by the package, only by benchmarks and tests (by path), so what it measures
cannot leak into training or labelling.

Formulas (``G_s`` the *unit-area* Gaussian ``exp(-r^2 / 2s^2) / (2 pi s^2)``; coordinates ``x``
right, ``y`` down, from a centre offset by up to 0.4 px per axis; ``R = (k - 1) / 2``):

* DoG ``D = G_s1 - beta * G_s2`` with ``s1 = R * U(0.2, 0.45)`` (at least 0.45 px),
  ``s2 = s1 * U(1.3, 2.4)``, surround mass ``beta ~ U(0.55, 1)`` (1: zero-sum Marr-Hildreth).
  on-centre ``D``, off-centre ``-D``.
* First derivatives: ``-u . grad D`` (positive lobe towards ``u``) for ``u`` at 0, 90, 180, 270 degrees plus jitter of
  +-15 degrees (four subtypes, one per direction).
* Second derivatives, appendix A's six: ``-d_uu D`` and ``+d_uu D`` for ``u`` horizontal and
  vertical (stripes, on and off), and ``+-d_uv D`` (``v`` = ``u`` turned 90 degrees) for the two
  diagonal saddles; the same jitter. The derivatives use ``s1 * U(1, 1.5)``.
* Cross (appendix B): two orthogonal ridges ``exp(-p^2 / 2w^2)`` of width
  ``w = R * U(0.12, 0.3)`` (at least 0.35 px), under a Gaussian envelope of width
  ``R * U(0.9, 2)`` (the arms reach the border), raised to a power ``U(1, 1.5)`` for the denser
  centre; jitter +-15 degrees.
* Square (appendix D, 3x3 and 5x5 only): a soft box of side 2 (or 3 at 5x5) holding the centre
  pixel and reaching to the upper-left or bottom-right, edges logistic with width ``U(0.05, 0.3)``
  px, the block shifted by up to 0.4 px per axis, on a flat negative floor of ``U(0.1, 0.35)`` of the peak.

Every kernel is scaled to peak ``|w| = 1`` and gets i.i.d. Gaussian noise of std 0.08 (of the
peak), unless ``noise=`` says otherwise.
"""

from __future__ import annotations

import numpy as np

DOG_FAMILIES = ("on-centre", "off-centre", "on-cross", "off-cross", "first-derivative", "second-derivative")
SQUARE_FAMILIES = ("on-square", "off-square")
MAX_OFFSET = 0.4
JITTER_DEG = 15.0
NOISE = 0.08


def families(kernel_size: int) -> tuple[str, ...]:
    return DOG_FAMILIES + (SQUARE_FAMILIES if kernel_size <= 5 else ())


def _grid(rng: np.random.Generator, n: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    y, x = np.mgrid[0:k, 0:k].astype(float) - (k - 1) / 2
    dx, dy = rng.uniform(-MAX_OFFSET, MAX_OFFSET, (2, n, 1, 1))
    return x[None] - dx, y[None] - dy


def _gauss_terms(rng: np.random.Generator, n: int, k: int, widen: tuple[float, float]) -> list[tuple[np.ndarray, np.ndarray]]:
    r = (k - 1) / 2
    s1 = np.maximum(r * rng.uniform(0.2, 0.45, (n, 1, 1)), 0.45) * rng.uniform(*widen, (n, 1, 1))
    s2 = s1 * rng.uniform(1.3, 2.4, (n, 1, 1))
    beta = rng.uniform(0.55, 1.0, (n, 1, 1))
    return [(np.ones_like(s1), s1), (-beta, s2)]


def _rotation(rng: np.random.Generator, nominal_deg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    t = np.deg2rad(nominal_deg + rng.uniform(-JITTER_DEG, JITTER_DEG, len(nominal_deg)))
    return np.cos(t)[:, None, None], np.sin(t)[:, None, None]


def _dog_derivative(rng, n, k, order: int, subtype: np.ndarray) -> np.ndarray:
    """Directional derivatives of the DoG: order 0, 1 (subtype = direction index 0..3) or 2
    (subtype 0..5: d_xx on/off, d_yy on/off, d_xy, -d_xy)."""
    x, y = _grid(rng, n, k)
    terms = _gauss_terms(rng, n, k, (1.0, 1.0) if order == 0 else (1.0, 1.5))
    if order == 1:
        c, s = _rotation(rng, 90.0 * subtype)
    elif order == 2:
        c, s = _rotation(rng, np.where(subtype // 2 == 1, 90.0, 0.0))
    else:
        c, s = np.ones((n, 1, 1)), np.zeros((n, 1, 1))
    pu, pv = c * x + s * y, -s * x + c * y
    out = np.zeros((n, k, k))
    for weight, sig in terms:
        g = np.exp(-(x**2 + y**2) / (2 * sig**2)) / (2 * np.pi * sig**2)
        if order == 0:
            out += weight * g
        elif order == 1:
            out += weight * (pu / sig**2) * g  # -d/du G: positive lobe towards u
        else:
            d_uu = (pu**2 / sig**4 - 1 / sig**2) * g
            d_uv = (pu * pv / sig**4) * g
            sign = np.where(subtype % 2 == 0, 1.0, -1.0)[:, None, None]
            stripe = (subtype < 4)[:, None, None]
            out += weight * np.where(stripe, -sign * d_uu, sign * d_uv)
    return out


def _cross(rng, n, k) -> np.ndarray:
    r = (k - 1) / 2
    x, y = _grid(rng, n, k)
    c, s = _rotation(rng, np.zeros(n))
    pu, pv = c * x + s * y, -s * x + c * y
    w = np.maximum(r * rng.uniform(0.12, 0.3, (n, 1, 1)), 0.35)
    envelope = np.exp(-(x**2 + y**2) / (2 * (r * rng.uniform(0.9, 2.0, (n, 1, 1))) ** 2))
    ridges = (np.exp(-(pu**2) / (2 * w**2)) + np.exp(-(pv**2) / (2 * w**2))) * envelope
    return ridges ** rng.uniform(1.0, 1.5, (n, 1, 1))


def _square(rng, n, k, subtype: np.ndarray) -> np.ndarray:
    c = (k - 1) / 2
    side = rng.integers(2, 4, (n, 1, 1)) if k == 5 else np.full((n, 1, 1), 2)
    towards = np.where(subtype == 0, -1.0, 1.0)[:, None, None]  # 0 upper-left, 1 bottom-right
    near, far = c - towards * 0.5, c + towards * (side - 0.5)
    lo, hi = np.minimum(near, far), np.maximum(near, far)
    shift = rng.uniform(-MAX_OFFSET, MAX_OFFSET, (2, n, 1, 1))  # the whole block moves, per axis
    soft = rng.uniform(0.05, 0.3, (n, 1, 1))
    rows, cols = np.mgrid[0:k, 0:k].astype(float)

    def inside(p, d):
        return 1 / (1 + np.exp(-(p - lo - d) / soft)) / (1 + np.exp((p - hi - d) / soft))

    box = inside(rows[None], shift[0]) * inside(cols[None], shift[1])
    floor = rng.uniform(0.1, 0.35, (n, 1, 1))
    return box * (1 + floor) - floor


def generate(family: str, n: int, kernel_size: int, rng: np.random.Generator | int, noise: float = NOISE) -> tuple[np.ndarray, np.ndarray]:
    """``n`` kernels of one family with subtypes balanced: ``(float32 [n, k, k], subtype names)``."""
    rng = np.random.default_rng(rng)
    k = kernel_size
    base = family.removeprefix("on-").removeprefix("off-")
    if family == "first-derivative":
        sub = np.arange(n) % 4
        kernels = _dog_derivative(rng, n, k, 1, sub)
        names = np.array(["right", "down", "left", "up"])[sub]
    elif family == "second-derivative":
        sub = np.arange(n) % 6
        kernels = _dog_derivative(rng, n, k, 2, sub)
        names = np.array(["vertical-on", "vertical-off", "horizontal-on", "horizontal-off", "diagonal", "anti-diagonal"])[sub]
    elif base == "centre":
        kernels, names = _dog_derivative(rng, n, k, 0, np.zeros(n, int)), np.full(n, "")
    elif base == "cross":
        kernels, names = _cross(rng, n, k), np.full(n, "")
    elif base == "square":
        if k > 5:
            raise ValueError("squares are a 3x3/5x5 pattern")
        sub = np.arange(n) % 2
        kernels, names = _square(rng, n, k, sub), np.array(["upper-left", "bottom-right"])[sub]
    else:
        raise ValueError(f"unknown family {family!r}")
    if family.startswith("off-"):
        kernels = -kernels
    kernels = kernels / np.abs(kernels).max(axis=(1, 2), keepdims=True)
    kernels = kernels + noise * rng.standard_normal(kernels.shape)
    return kernels.astype(np.float32), names


def embed(kernels: np.ndarray, size: int, noise: float, rng: np.random.Generator | int) -> np.ndarray:
    """Kernels placed at the centre of ``size x size`` kernels with faint i.i.d. noise around
    (appendix I: large kernels hold their pattern in a small central area)."""
    rng = np.random.default_rng(rng)
    n, k = kernels.shape[0], kernels.shape[-1]
    out = noise * rng.standard_normal((n, size, size))
    a = (size - k) // 2
    out[:, a : a + k, a : a + k] += kernels
    return out.astype(np.float32)
