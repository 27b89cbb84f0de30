"""The functional core: normalisation, exact branch-and-bound search, invalid kernels."""

import numpy as np
import pytest
import torch

from kernelwatch import classification
from kernelwatch.classification import (
    PrototypeIndex,
    as_kernel_tensor,
    centre_and_normalise,
    classify_unit,
    nearest_prototype_brute_force,
)
from kernelwatch.errors import KernelWatchError


def smooth_curve(n_codes: int, dim: int, seed: int = 0) -> torch.Tensor:
    """Unit prototypes along a smooth closed-form curve, like a decoder's spectrum."""
    g = torch.Generator().manual_seed(seed)
    t = torch.linspace(0, 1, n_codes)[:, None]
    freqs = torch.arange(1, 9, dtype=torch.float32)[None, :]
    basis = torch.cat([torch.sin(2 * np.pi * freqs * t), torch.cos(2 * np.pi * freqs * t)], dim=1)
    curve = basis @ torch.randn(basis.shape[1], dim, generator=g)
    unit, _ = centre_and_normalise(curve.reshape(n_codes, dim, 1))
    return unit


def test_centre_and_normalise_is_invariant_to_affine_maps():
    k = torch.randn(10, 5, 5)
    a, _ = centre_and_normalise(k)
    b, _ = centre_and_normalise(3.0 * k + 7.0)
    assert torch.allclose(a, b, atol=1e-5)
    assert torch.allclose(a.sum(dim=1), torch.zeros(10), atol=1e-5)
    assert torch.allclose(a.norm(dim=1), torch.ones(10), atol=1e-5)


def test_invalid_kernels_are_flagged_not_crashing():
    k = torch.randn(5, 3, 3)
    k[0, 1, 1] = float("nan")
    k[1] = float("inf")
    k[2] = 0.0
    k[3] = 4.2  # constant: no pattern after centring
    unit, valid = centre_and_normalise(k)
    assert valid.tolist() == [False, False, False, False, True]
    assert torch.isfinite(unit).all()


@pytest.mark.parametrize("max_diameter, max_size, part_size", [(10.0, 200, 16), (5.0, 20, 3), (180.0, 10_000, 64)])
@pytest.mark.parametrize("floor", [-1.0, 0.7])
@pytest.mark.parametrize("small_buffers", [False, True])
def test_index_search_equals_brute_force(max_diameter, max_size, part_size, floor, small_buffers, monkeypatch):
    if small_buffers:  # row buffers cut runs of a block; the search takes the kernels in several pieces
        monkeypatch.setattr(classification, "_ROWS", 97)
        monkeypatch.setattr(classification, "_CELLS", 20_000)
    protos = smooth_curve(2000, 49)
    g = torch.Generator().manual_seed(1)
    near = protos[torch.randint(0, 2000, (1500,), generator=g)] + 0.05 * torch.randn(1500, 49, generator=g)
    far = torch.randn(1000, 49, generator=g)
    unit, _ = centre_and_normalise(torch.cat([near, far]).reshape(-1, 7, 7))
    ref_index, ref_sim = nearest_prototype_brute_force(unit, protos)
    index, sim = PrototypeIndex.build(protos, max_diameter, max_size, part_size).search(unit, floor=floor)
    # Exact wherever the best similarity reaches the floor; below it, a real prototype whose
    # similarity stays below the floor.
    exact = ref_sim >= floor
    assert exact.sum() > 1000 and (floor < 0 or (~exact).sum() > 500)
    assert torch.allclose(sim[exact], ref_sim[exact], atol=1e-6)
    assert torch.all(sim[~exact] < floor) and torch.all(sim <= ref_sim + 1e-6)
    assert torch.allclose((unit * protos[index]).sum(1), sim, atol=1e-5)
    # Different indices are only allowed for exact ties in similarity.
    differs = (index != ref_index) & exact
    tied = (unit[differs] * protos[index[differs]]).sum(1) >= ref_sim[differs] - 1e-6
    assert tied.all()


def test_classify_unit_labels_threshold_and_invalid():
    protos = torch.eye(4)[:, :] - 0.25  # four centred directions
    protos, _ = centre_and_normalise(protos.reshape(4, 2, 2))
    kernels = torch.tensor(
        [
            [[1.0, 0.0], [0.0, 0.0]],  # exactly prototype 0
            [[1.0, 1.0], [0.0, 0.0]],  # between 0 and 1: cos = 0.577 -> dissimilarity 0.42
            [[float("nan"), 0.0], [0.0, 0.0]],
        ]
    )
    unit, valid = centre_and_normalise(kernels)
    codes = np.linspace(0, 1, 4)
    labels = np.array(["a", "b", "c", "d"])
    res = classify_unit(unit, valid, PrototypeIndex.build(protos, max_size=2), codes, labels, threshold=0.2)
    assert res.labels.tolist() == ["a", "unclustered", "invalid"]
    assert res.clustered.tolist() == [True, False, False]
    assert res.dissimilarity[0] == pytest.approx(0.0, abs=1e-6)
    assert res.dissimilarity[1] == pytest.approx(1 - 1 / np.sqrt(3), abs=1e-5)
    assert np.isnan(res.dissimilarity[2]) and np.isnan(res.codes[2])


@pytest.mark.parametrize(
    "bad, message",
    [
        (np.zeros((2, 3, 4)), "square"),
        (np.zeros((2, 2, 3, 3)), r"\[N, k, k\]"),
        ([[1, 2], [3, 4]], "numpy array or torch tensor"),
        (np.array([["a"]]), "numeric"),
    ],
)
def test_bad_kernel_input_has_clear_errors(bad, message):
    with pytest.raises(KernelWatchError, match=message):
        as_kernel_tensor(bad)


def test_wrong_kernel_size_names_both_sizes():
    with pytest.raises(KernelWatchError, match="5x5 but this spectrum is for 7x7"):
        as_kernel_tensor(np.zeros((1, 5, 5)), kernel_size=7)


def test_no_kernels_give_empty_results():
    unit, valid = centre_and_normalise(torch.zeros(0, 7, 7))
    assert unit.shape == (0, 49) and valid.shape == (0,)
    index, sim = PrototypeIndex.build(smooth_curve(300, 49)).search(unit)
    assert index.shape == sim.shape == (0,)
