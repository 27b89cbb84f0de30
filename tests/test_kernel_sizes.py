"""Every odd kernel size through analyze: 9x9 and 31x31 layers, their shuffled copies, even sizes."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import kernelwatch as kw
from kernelwatch.kernel_sizes import adapt, choose_approach
from kernelwatch.metrics import family
from kernelwatch.structure import spatially_shuffled

# The independent generator never enters the package (it judges the spectra), so load it by path.
_spec = importlib.util.spec_from_file_location(
    "independent_patterns", Path(__file__).parents[1] / "benchmarks" / "independent_patterns.py"
)
independent = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(independent)


def depthwise(kernels: np.ndarray) -> nn.Conv2d:
    n, k = kernels.shape[0], kernels.shape[-1]
    conv = nn.Conv2d(n, n, k, padding=k // 2, groups=n, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.from_numpy(kernels)[:, None])
    return conv


def large_model(shuffle: bool = False) -> tuple[nn.Module, dict[str, str]]:
    """A 9x9 layer of 9x9-scale first derivatives and a 31x31 layer holding 7x7-scale
    off-centre DoGs at its centre in faint noise (appendix I)."""
    nine, _ = independent.generate("first-derivative", 512, 9, rng=11)
    small, _ = independent.generate("off-centre", 512, 7, rng=12)
    big = independent.embed(small, 31, noise=0.02, rng=13)
    if shuffle:
        nine, big = (spatially_shuffled(torch.from_numpy(x), seed=5).numpy() for x in (nine, big))
    model = nn.Sequential(depthwise(nine), nn.Conv2d(512, 512, 1), depthwise(big))
    return model, {"0": "first-derivative", "2": "off-centre"}


def test_9x9_and_31x31_layers_are_analysed_with_their_family():
    model, truth = large_model()
    report = kw.analyze(model)
    assert not report.skipped
    by_name = {layer.name: layer for layer in report.layers}
    assert by_name["0"].kernel_size == 9 and by_name["2"].kernel_size == 31
    assert by_name["2"].approach == "centre 7x7 crop"
    assert by_name["0"].approach != "native"
    for name, fam in truth.items():
        result = by_name[name].result
        right = np.mean(result.clustered & (family(result.labels) == fam))
        assert right >= 0.8, (name, right)
        assert by_name[name].null_clustered_fraction <= 0.03
    table = report.format_table()
    assert "note: layer 2 (31x31) read through its centre 7x7 crop" in table
    assert report.to_dict()["layers"][1]["approach"] == "centre 7x7 crop"


def test_shuffled_large_kernels_stay_unclustered():
    model, _ = large_model(shuffle=True)
    for layer in kw.analyze(model).layers:
        assert layer.clustered_fraction <= 0.03, (layer.name, layer.clustered_fraction)


def test_approach_follows_where_the_pattern_lives():
    rng = np.random.default_rng(0)
    filled, _ = independent.generate("on-centre", 64, 13, rng=1)  # a 13x13-scale pattern
    centred = independent.embed(independent.generate("on-centre", 64, 7, rng=2)[0], 51, 0.02, rng=3)
    noise = torch.from_numpy(rng.standard_normal((64, 51, 51)).astype(np.float32))
    assert choose_approach(torch.from_numpy(centred)).window == 7
    assert choose_approach(torch.from_numpy(filled)).window > 7
    assert choose_approach(noise).window > 25  # no pattern: the whole kernel, nearly
    approach = choose_approach(torch.from_numpy(centred))
    assert adapt(torch.from_numpy(centred), approach).shape == (64, 7, 7)
    spec = kw.Spectrum.pretrained(51)
    assert spec.kernel_size == 7 and spec.classify(noise).clustered.mean() <= 0.01


def test_even_and_tiny_sizes_have_a_clear_message():
    with pytest.raises(kw.KernelWatchError, match="4x4 kernels: no spectrum serves even sizes"):
        kw.analyze(nn.Conv2d(4, 4, 4, groups=4))
    with pytest.raises(kw.KernelWatchError, match="no spectrum serves even sizes"):
        kw.Spectrum.pretrained(kernel_size=8)
    with pytest.raises(kw.KernelWatchError, match="3x3 but this spectrum is for 5x5"):
        kw.Spectrum.pretrained(kernel_size=5).classify(np.zeros((2, 3, 3)))
