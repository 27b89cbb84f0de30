"""The analytic pattern generators: shapes that characterise each family, noise, mixtures."""

from __future__ import annotations

import time

import numpy as np
import pytest

from kernelwatch import patterns
from kernelwatch.errors import KernelWatchError

N = 400
CASES = [
    (family, subtype, k)
    for family in patterns.FAMILIES
    for subtype in patterns.SUBTYPES.get(family, (None,))
    for k in (3, 5, 7)
    if k <= patterns.MAX_SQUARE_KERNEL_SIZE or not family.endswith("square")
]


def _coords(k: int) -> tuple[np.ndarray, np.ndarray]:
    """x grows to the right, y downwards, both 0 at the centre pixel."""
    y, x = np.mgrid[0:k, 0:k] - k // 2
    return x, y


def _rot180(kernels: np.ndarray) -> np.ndarray:
    return kernels[:, ::-1, ::-1]


@pytest.mark.parametrize(("family", "subtype", "k"), CASES)
def test_every_family_is_well_formed_and_seeded(family, subtype, k):
    kernels, labels = patterns.generate(family, N, k, rng=3, subtype=subtype)
    assert kernels.shape == (N, k, k) and kernels.dtype == np.float32
    assert np.isfinite(kernels).all()
    assert labels.shape == (N,) and set(labels.tolist()) == {family + (f"/{subtype}" if subtype else "")}
    peak = np.abs(kernels).max(axis=(1, 2))
    assert peak.min() >= 0.5 - 1e-6 and peak.max() <= 1.5 + 1e-6
    again, _ = patterns.generate(family, N, k, rng=3, subtype=subtype)
    other, _ = patterns.generate(family, N, k, rng=4, subtype=subtype)
    np.testing.assert_array_equal(kernels, again)
    assert not np.allclose(kernels, other)


@pytest.mark.parametrize("family", ["first-derivative", "second-derivative", "on-square"])
def test_subtypes_are_drawn_uniformly_without_a_subtype(family):
    _, labels = patterns.generate(family, 3000, 5, rng=0)
    names, counts = np.unique(labels, return_counts=True)
    assert names.tolist() == sorted(f"{family}/{s}" for s in patterns.SUBTYPES[family])
    assert counts.min() > 0.8 * 3000 / len(names)


@pytest.mark.parametrize("base", ["centre", "cross", "square"])
def test_off_patterns_are_the_sign_flip_of_on_patterns(base):
    on, on_labels = patterns.generate(f"on-{base}", N, 5, rng=11)
    off, off_labels = patterns.generate(f"off-{base}", N, 5, rng=11)
    np.testing.assert_array_equal(off, -on)
    assert all(a.replace("on-", "off-", 1) == b for a, b in zip(on_labels, off_labels))


@pytest.mark.parametrize("k", [3, 5, 7, 15])
def test_dog_has_a_positive_centre_and_a_negative_ring(k):
    border = np.ones((k, k), bool)
    border[1:-1, 1:-1] = False
    for family, sign in (("on-centre", 1), ("off-centre", -1)):
        kernels, _ = patterns.generate(family, N, k, rng=k)
        assert (sign * kernels[:, k // 2, k // 2] > 0).all()
        assert (sign * kernels[:, border].mean(axis=1) < 0).mean() >= (0.97 if k == 3 else 1.0)
        if k <= 7:  # the blob sits on the centre pixel; larger kernels may shift it by pixels
            assert (np.abs(kernels).reshape(N, -1).argmax(axis=1) == k * k // 2).all()


@pytest.mark.parametrize("k", [3, 5, 7])
@pytest.mark.parametrize(
    ("subtype", "axis", "sign"), [("left", "x", -1), ("right", "x", 1), ("up", "y", -1), ("down", "y", 1)]
)
def test_first_derivative_has_its_positive_lobe_on_its_side(k, subtype, axis, sign):
    kernels, _ = patterns.generate("first-derivative", N, k, rng=5, subtype=subtype)
    x, y = _coords(k)
    towards = sign * (x if axis == "x" else y)
    positive = np.clip(kernels, 0, None)
    assert (positive[:, towards > 0].sum(axis=1) > positive[:, towards < 0].sum(axis=1)).mean() >= 0.98
    negative = np.clip(-kernels, 0, None)
    assert (negative[:, towards < 0].sum(axis=1) > negative[:, towards > 0].sum(axis=1)).mean() >= 0.98
    # Odd under a half turn: a derivative, not a shifted blob (3x3 offsets blur this more).
    odd = np.abs(kernels + _rot180(kernels)).sum(axis=(1, 2)) < np.abs(kernels - _rot180(kernels)).sum(axis=(1, 2))
    assert odd.mean() >= (0.8 if k == 3 else 0.95)


@pytest.mark.parametrize("k", [3, 5, 7])
def test_second_derivatives_are_even_with_the_right_stripes(k):
    x, y = _coords(k)
    c = k // 2
    for subtype in patterns.SUBTYPES["second-derivative"]:
        kernels, _ = patterns.generate("second-derivative", N, k, rng=6, subtype=subtype)
        even = np.abs(kernels - _rot180(kernels)).sum(axis=(1, 2)) < np.abs(kernels + _rot180(kernels)).sum(axis=(1, 2))
        assert even.mean() >= 0.95, subtype
        if subtype.startswith("vertical"):
            stripe = kernels[:, :, c].mean(axis=1) - kernels[:, :, [c - 1, c + 1]].mean(axis=(1, 2))
        elif subtype.startswith("horizontal"):
            stripe = kernels[:, c, :].mean(axis=1) - kernels[:, [c - 1, c + 1], :].mean(axis=(1, 2))
        else:  # positive where x * y > 0: the top-left and bottom-right quadrants
            stripe = (kernels * np.sign(x * y)).sum(axis=(1, 2))
        sign = -1 if subtype.endswith("-off") or subtype == "anti-diagonal" else 1
        assert (sign * stripe > 0).mean() >= 0.97, subtype


@pytest.mark.parametrize("k", [3, 5, 7, 31])
def test_crosses_carry_their_mass_on_the_centre_row_and_column(k):
    x, y = _coords(k)
    row, column = (y == 0) & (x != 0), (x == 0) & (y != 0)
    diagonals = (np.abs(x) == np.abs(y)) & (x != 0)
    for family, sign in (("on-cross", 1), ("off-cross", -1)):
        kernels, _ = patterns.generate(family, N, k, rng=7)
        off_axis = np.abs(kernels[:, diagonals]).mean(axis=1)
        for arm in (row, column):  # both arms, not a single bar
            assert (np.abs(kernels[:, arm]).mean(axis=1) > 1.5 * off_axis).all()
            assert (sign * kernels[:, arm].mean(axis=1) > 0).all()


@pytest.mark.parametrize("k", [3, 5])
@pytest.mark.parametrize(("corner", "towards"), [("upper-left", -1), ("bottom-right", 1)])
def test_squares_are_solid_blocks_off_centre_towards_their_corner(k, corner, towards):
    x, y = _coords(k)
    for family, sign in (("on-square", 1), ("off-square", -1)):
        kernels, _ = patterns.generate(family, N, k, rng=8, subtype=corner)
        block = np.isclose(sign * kernels, np.abs(kernels).max(axis=(1, 2), keepdims=True))
        sizes = block.sum(axis=(1, 2))
        assert set(sizes.tolist()) == ({4} if k == 3 else {4, 9})
        assert block[:, k // 2, k // 2].all()  # the block holds the centre pixel...
        for coord in (x, y):  # ...and leans towards the corner, never the other way
            centroid = (block * coord).sum(axis=(1, 2)) / sizes
            assert (towards * centroid > 0).all()
        assert (sign * kernels[~block] <= 0).all()  # a weak surround of the opposite sign


def test_noise_raises_the_residual_by_the_requested_relative_std():
    clean, _ = patterns.generate("on-centre", 2000, 7, rng=9)
    noisy, _ = patterns.generate("on-centre", 2000, 7, rng=9, noise=0.5)
    relative = (noisy - clean).std(axis=(1, 2)) / clean.std(axis=(1, 2))
    assert abs(relative.mean() - 0.5) < 0.02
    assert relative.min() > 0.2
    zero, _ = patterns.generate("on-centre", 2000, 7, rng=9, noise=0.0)
    np.testing.assert_array_equal(zero, clean)


def test_mixture_honours_proportions():
    shares = {"on-centre": 0.5, "first-derivative": 0.3, "on-cross": 0.2}
    kernels, labels = patterns.generate_mixture(20_000, 7, shares, rng=10)
    assert kernels.shape == (20_000, 7, 7) and kernels.dtype == np.float32
    families = np.array([label.split("/")[0] for label in labels])
    for family, share in shares.items():
        assert abs((families == family).mean() - share) < 0.02, family
    assert len(set(families[:50].tolist())) == 3  # shuffled, not grouped by family
    again, again_labels = patterns.generate_mixture(20_000, 7, shares, rng=10)
    np.testing.assert_array_equal(kernels, again)
    np.testing.assert_array_equal(labels, again_labels)


@pytest.mark.parametrize(("k", "expected"), [(5, patterns.FAMILIES), (7, patterns.FAMILIES[:6])])
def test_default_mixture_is_uniform_over_families_that_exist_at_the_size(k, expected):
    _, labels = patterns.generate_mixture(20_000, k, rng=12)
    families, counts = np.unique([label.split("/")[0] for label in labels], return_counts=True)
    assert sorted(families.tolist()) == sorted(expected)
    assert np.abs(counts / 20_000 - 1 / len(expected)).max() < 0.02


def test_empty_requests_give_empty_arrays():
    kernels, labels = patterns.generate("on-centre", 0, 5, rng=0)
    assert kernels.shape == (0, 5, 5) and labels.shape == (0,)
    kernels, labels = patterns.generate_mixture(0, 5, rng=0)
    assert kernels.shape == (0, 5, 5) and labels.shape == (0,)


def test_a_hundred_thousand_7x7_kernels_take_well_under_two_seconds():
    start = time.perf_counter()
    kernels, _ = patterns.generate_mixture(100_000, 7, rng=0, noise=0.1)
    assert time.perf_counter() - start < 2.0
    assert kernels.shape == (100_000, 7, 7)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"family": "blob"}, "unknown pattern family"),
        ({"family": "on-centre", "subtype": "left"}, "unknown subtype"),
        ({"family": "first-derivative", "subtype": "sideways"}, "unknown subtype"),
        ({"kernel_size": 4}, "odd integer"),
        ({"kernel_size": 1}, "odd integer"),
        ({"kernel_size": 33}, "odd integer"),
        ({"kernel_size": 7.0}, "odd integer"),
        ({"family": "on-square", "kernel_size": 7}, "small-kernel"),
        ({"n": -1}, "non-negative integer"),
        ({"n": 2.5}, "non-negative integer"),
        ({"noise": -0.1}, "noise"),
        ({"noise": float("nan")}, "noise"),
    ],
)
def test_generate_rejects_bad_input(kwargs, message):
    call = {"family": "on-centre", "n": 4, "kernel_size": 5, **kwargs}
    with pytest.raises(KernelWatchError, match=message):
        patterns.generate(call.pop("family"), call.pop("n"), call.pop("kernel_size"), **call)


@pytest.mark.parametrize(
    ("proportions", "k", "message"),
    [
        ({"on-centre": 0.5, "blob": 0.5}, 5, "unknown pattern families"),
        ({"on-centre": 1.2, "off-centre": -0.2}, 5, "non-negative"),
        ({"on-centre": 0.5, "off-centre": 0.4}, 5, "sum to 1"),
        ({}, 5, "sum to 1"),
        ({"on-centre": 0.5, "on-square": 0.5}, 7, "small-kernel"),
    ],
)
def test_mixture_rejects_bad_proportions(proportions, k, message):
    with pytest.raises(KernelWatchError, match=message):
        patterns.generate_mixture(1000, k, proportions, rng=0)
