"""Layer quality metrics of CNN Filter DB: sparsity, variance entropy, orthogonality."""

import numpy as np
import pytest
import torch

from kernelwatch import format as fmt
from kernelwatch import patterns
from kernelwatch.errors import KernelWatchError
from kernelwatch.metrics import (
    _random_entropy,
    _random_entropy_table,
    _simulated_random_entropy,
    layer_quality,
    orthogonality,
    sparsity,
    variance_entropy,
)


def gaussian(*shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape)


@pytest.mark.parametrize(
    ("shape", "top"),
    # 12 3x3 filters: the paper's fitted normaliser sits below random layers' low end there.
    [((256, 1, 3, 3), 1.15), ((64, 16, 3, 3), 1.15), ((96, 1, 5, 5), 1.15), ((32, 1, 7, 7), 1.15), ((12, 1, 3, 3), 1.25)],
)
def test_random_gaussian_layers_score_about_one_and_above(shape, top):
    values = [variance_entropy(gaussian(*shape, seed=s)) for s in range(5)]
    assert min(values) > 0.98 and np.mean(values) > 1.0 and max(values) < top


def reference_variance_entropy(weight: np.ndarray) -> float:
    """CNN Filter DB's normalised variance entropy of a 3x3 layer, written out as torchconvquality
    0.3.0 computes it (``variance_entropy_clean_norm``): log10 entropy of the non-sparse filters'
    variance shares over a logistic fit in log2 of their number."""
    filters = weight.reshape(-1, 9)
    filters = filters[np.any(np.abs(filters) >= 0.01 * np.abs(filters).max(), axis=1)]
    s = np.linalg.svd(filters - filters.mean(axis=0), compute_uv=False) ** 2
    share = s[s > 0] / s.sum()
    fit = 1.2618047 / (1 + np.exp(-0.88767525 * (np.log2(len(filters)) - 2.30436435))) - 0.31050834
    return float(-np.sum(share * np.log10(share)) / fit)


def trained_like_3x3(n: int, seed: int = 0) -> np.ndarray:
    """A structured 3x3 layer with some sparse filters: DoG-family patterns, noise, zeros."""
    kernels, _ = patterns.generate_mixture(n, 3, rng=seed, noise=0.2)
    kernels = np.asarray(kernels, np.float64).reshape(n, 1, 3, 3)
    kernels[: n // 8] = 0.0
    return kernels


@pytest.mark.parametrize("n", [4, 12, 48, 300])
def test_3x3_variance_entropy_is_cnn_filter_dbs(n):
    for weight in (trained_like_3x3(n), gaussian(n, 1, 3, 3)):
        assert variance_entropy(weight) == pytest.approx(reference_variance_entropy(weight), rel=1e-9)


def test_3x3_variance_entropy_matches_torchconvquality():
    tcq = pytest.importorskip("torchconvquality")
    for weight in (trained_like_3x3(96), gaussian(32, 8, 3, 3)):
        theirs = tcq.measure_conv_weight_quality(torch.from_numpy(weight).float())
        ours = layer_quality(weight)
        assert ours["variance_entropy"] == pytest.approx(theirs["variance_entropy_clean_norm"], abs=1e-5)
        assert ours["sparsity"] == pytest.approx(theirs["sparsity"])
    # Orthogonality: the same, except that torchconvquality adds 1 per all-zero filter's own
    # |cos - 1| on the diagonal; kernelwatch counts a zero filter as orthogonal to every filter.
    weight = gaussian(32, 8, 3, 3)
    theirs = tcq.measure_conv_weight_quality(torch.from_numpy(weight).float())
    assert orthogonality(weight) == pytest.approx(theirs["orthogonality"], abs=1e-5)
    weight[:4] = 0.0
    theirs = tcq.measure_conv_weight_quality(torch.from_numpy(weight).float())
    assert orthogonality(weight) - theirs["orthogonality"] == pytest.approx(4 / (32 * 31), abs=1e-5)


def test_degenerate_layers_score_near_zero():
    pattern = gaussian(5, 5)
    scales = np.linspace(-2, 3, 64)[:, None, None, None]
    assert variance_entropy(scales * pattern) == pytest.approx(0.0, abs=1e-6)
    noisy = scales * pattern + 1e-3 * gaussian(64, 1, 5, 5, seed=1)
    assert variance_entropy(noisy) < 0.05


@pytest.mark.parametrize("k", [3, 5])
def test_structured_layers_score_in_between(k):
    mixture, _ = patterns.generate_mixture(128, k, rng=0, noise=0.05)
    one_family, _ = patterns.generate("on-centre", 128, k, rng=0)
    random = variance_entropy(gaussian(128, 1, k, k))
    assert 0.2 < variance_entropy(one_family) < variance_entropy(mixture) < 0.95 < random


@pytest.mark.parametrize("n", [16, 32, 64, 256, 1024, 100_000])
def test_normaliser_tracks_the_papers_fit_for_3x3(n):
    # CNN Filter DB normalises 3x3 layers by a logistic fit (log10 entropy against log2 n).
    height, mid, rate, offset = 1.2618047, 2.30436435, 0.88767525, -0.31050834
    paper = (height / (1 + np.exp(-rate * (np.log2(n) - mid))) + offset) * np.log(10)
    assert _random_entropy(n, 9) == pytest.approx(paper, rel=0.06)


@pytest.mark.parametrize("n, d", [(3, 16), (200, 16), (7, 25), (1000, 25), (40, 49), (48, 49), (320, 49), (2048, 49)])
def test_shipped_normaliser_table_holds_the_simulation(n, d):
    # Regenerate with metrics.write_random_entropy_table after changing the simulation.
    table = _random_entropy_table()
    assert sorted(table) == [16, 25, 49] and {len(values) for values in table.values()} == {2049}
    assert table[d][n] == pytest.approx(_simulated_random_entropy(n, d), rel=1e-9)
    assert _random_entropy(n, d) == table[d][n]


def test_sparse_filters_are_left_out_of_the_variance_entropy():
    w = gaussian(64, 1, 3, 3)
    padded = np.concatenate([w, np.zeros((32, 1, 3, 3)), 1e-5 * gaussian(16, 1, 3, 3)])
    assert variance_entropy(padded) == pytest.approx(variance_entropy(w))
    assert sparsity(padded) == pytest.approx(48 / 112)


def test_sparsity_counts_2d_filters_below_one_percent_of_the_layer_max():
    w = gaussian(8, 4, 3, 3) + 5.0  # all weights well away from zero
    assert sparsity(w) == 0.0
    w[0, :] = 0.0  # four filters of output channel 0
    w[1, 0] = 0.009 * np.abs(w).max()
    w[2, 0] = 0.0
    w[2, 0, 1, 1] = 0.011 * np.abs(w).max()  # one weight above the limit: not sparse
    assert sparsity(w) == pytest.approx(5 / 32)
    assert sparsity(w, eps=0.02) == pytest.approx(6 / 32)
    assert sparsity(np.zeros((4, 1, 3, 3))) == 1.0


def test_orthogonality():
    assert orthogonality(np.eye(9).reshape(9, 1, 3, 3)) == pytest.approx(1.0)
    assert orthogonality(np.stack([gaussian(2, 3, 3)] * 5)) == pytest.approx(0.0)
    assert orthogonality(np.stack([gaussian(2, 3, 3)] * 2 + [-gaussian(2, 3, 3)])) == pytest.approx(0.0)
    # Whole output filters (in x k x k) are compared: mean |cos| of random ones ~ sqrt(2 / (pi D)).
    d = 32 * 9
    assert orthogonality(gaussian(128, 32, 3, 3)) == pytest.approx(1 - np.sqrt(2 / (np.pi * d)), abs=0.01)
    with_zero = np.concatenate([np.eye(4).reshape(4, 1, 2, 2), np.zeros((1, 1, 2, 2))])
    assert orthogonality(with_zero) == pytest.approx(1.0)
    w = gaussian(16, 2, 3, 3)
    assert orthogonality(w[::-1]) == pytest.approx(orthogonality(w))  # any numpy strides


def test_orthogonality_of_wide_layers_matches_the_direct_formula():
    w = gaussian(1500, 1, 3, 3).reshape(1500, 9)
    unit = w / np.linalg.norm(w, axis=1, keepdims=True)
    cos = np.abs(unit @ unit.T)
    direct = 1 - (cos.sum() - np.trace(cos)) / (1500 * 1499)
    assert orthogonality(w[:, None].reshape(1500, 1, 3, 3)) == pytest.approx(direct, rel=1e-9)


def test_degenerate_inputs_give_nan_not_errors():
    one_by_one = gaussian(16, 8, 1, 1)
    assert np.isnan(variance_entropy(one_by_one)) and np.isfinite(orthogonality(one_by_one))
    assert np.isnan(variance_entropy(gaussian(2, 1, 3, 3))) and np.isnan(orthogonality(gaussian(1, 1, 3, 3)))
    broken = gaussian(8, 1, 3, 3)
    broken[3, 0, 1, 1] = np.nan
    assert all(np.isnan(v) for v in layer_quality(broken).values())


def test_torch_numpy_and_depthwise_kernels_agree():
    conv = torch.nn.Conv2d(48, 48, 5, groups=48)
    from_torch = layer_quality(conv.weight)
    from_numpy = layer_quality(conv.weight.detach().numpy())
    from_kernels = layer_quality(conv.weight.detach()[:, 0].numpy())
    assert list(from_torch) == list(fmt.QUALITY_METRICS)
    for name in fmt.QUALITY_METRICS:
        assert from_torch[name] == pytest.approx(from_numpy[name]) == pytest.approx(from_kernels[name])
    assert layer_quality(conv.weight.to(torch.bfloat16))["variance_entropy"] == pytest.approx(
        from_torch["variance_entropy"], abs=0.02
    )


def test_regular_convs_are_measured_too():
    conv = torch.nn.Conv2d(32, 64, 3)
    quality = layer_quality(conv.weight)
    assert quality["sparsity"] == 0.0 and quality["variance_entropy"] > 0.98 and quality["orthogonality"] > 0.9


@pytest.mark.parametrize("shape", [(3, 3), (2, 2, 3, 3, 1)])
def test_bad_shapes_raise(shape):
    with pytest.raises(KernelWatchError):
        layer_quality(np.zeros(shape))
