"""The two nulls every layer is judged against: smooth patternless kernels sit on the smooth
null, patterns beat both, and the null copies no pattern of the layer (docs/spectra.md)."""

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

import kernelwatch as kw
from kernelwatch import format as fmt
from kernelwatch.analysis import analyze_layer
from kernelwatch.anomalies import detect
from kernelwatch.metrics import cluster_proportions
from kernelwatch.structure import ANALYSIS_NULL_KERNELS, classify_many_with_null, smooth_random_like


def blurred_noise(n: int, k: int, sigma: float, seed: int) -> torch.Tensor:
    """``n`` ``k x k`` windows of i.i.d. noise blurred by a Gaussian of ``sigma`` px."""
    generator = torch.Generator().manual_seed(seed)
    taps = torch.exp(-0.5 * (torch.arange(-6, 7.0) / sigma) ** 2)
    taps = (taps / taps.sum()).reshape(1, 1, 1, -1)
    noise = torch.randn(n, 1, k + 12, k + 12, generator=generator)
    blurred = torch.nn.functional.conv2d(torch.nn.functional.conv2d(noise, taps), taps.transpose(2, 3))
    return blurred[:, 0]


@pytest.mark.parametrize("k, sigma", [(5, 1.0), (7, 1.5)])
def test_smooth_random_kernels_sit_on_their_smooth_null_not_their_shuffled_one(k, sigma):
    # The case: blurred noise reads 28-43 % clustered, mostly first derivatives, while
    # its shuffled copies read 0-3 %. Against the smooth null it has no structure above chance.
    report = analyze_layer("blurred", blurred_noise(3000, k, sigma, seed=k), kw.Spectrum.pretrained(k))
    assert report.clustered_fraction > 0.25 and report.null_clustered_fraction < 0.03
    assert abs(report.smooth_null_clustered_fraction - report.clustered_fraction) < 0.03
    assert abs(report.structure_above_chance) < 0.03
    assert report.chance_fraction == report.smooth_null_clustered_fraction
    chance = fmt.chance_dissimilarity(report.null_median_dissimilarity, report.smooth_null_median_dissimilarity)
    assert abs(chance - report.median_dissimilarity) < 0.02
    # The families the null gives are the ones the noise shows: first derivatives.
    assert max(report.null_proportions["smooth"], key=report.null_proportions["smooth"].get) == "first-derivative"


def test_patterns_beat_both_nulls():
    spectrum = kw.Spectrum.pretrained(5)
    kernels = torch.as_tensor(kw.patterns.generate_mixture(512, 5, rng=0)[0])
    report = analyze_layer("dog", kernels, spectrum)
    assert report.clustered_fraction > 0.9 and report.structure_above_chance > 0.5
    assert report.median_dissimilarity < 0.7 * report.smooth_null_median_dissimilarity
    assert all(value > 0 for family, value in report.families_above_chance.items() if report.proportions[family] > 0.05)


def test_the_smooth_null_copies_no_pattern_of_the_layer():
    """A layer of one repeated pattern: a null drawn from the layer's full covariance would
    repeat it; the stationary field's kernels almost never take the layer's family."""
    spectrum = kw.Spectrum.pretrained(7)
    patterns = torch.as_tensor(kw.patterns.generate_mixture(3, 7, rng=1)[0])
    generator = torch.Generator().manual_seed(0)
    for pattern in patterns:
        layer = pattern + 0.05 * pattern.std() * torch.randn(512, 7, 7, generator=generator)
        family = max(cluster_proportions(spectrum.classify(layer).labels).items(), key=lambda item: item[1])
        assert family[1] == 1.0
        null = cluster_proportions(spectrum.classify(smooth_random_like(layer, 2048)).labels)
        assert null[family[0]] < 0.1, (family, null)
        flat = layer.flatten(1).double()
        values, vectors = torch.linalg.eigh(flat.T @ flat / len(flat))
        full = torch.randn(2048, 49, dtype=torch.float64, generator=generator) @ (vectors * values.clamp_min(0).sqrt()).T
        assert cluster_proportions(spectrum.classify(full.float().reshape(-1, 7, 7)).labels)[family[0]] > 0.4


def test_smooth_null_draws_are_reproducible_and_skip_invalid_kernels():
    kernels = blurred_noise(200, 5, 1.0, seed=1)
    first = smooth_random_like(kernels, 64)
    with_nan = torch.cat([kernels, torch.full((3, 5, 5), math.nan)])
    assert torch.equal(first, smooth_random_like(kernels, 64)) and torch.equal(first, smooth_random_like(with_nan, 64))
    # A layer's draws do not depend on the other layers classified with it.
    spectrum = kw.Spectrum.pretrained(5)
    alone = classify_many_with_null([kernels], spectrum)[0][1]
    together = classify_many_with_null([kernels[:40], kernels], spectrum)[1][1]
    assert alone == together
    # No valid kernel: no null, not an error.
    nan_layer = classify_many_with_null([torch.full((8, 5, 5), math.nan)], spectrum)[0][1]
    assert math.isnan(nan_layer.smooth.clustered_fraction) and nan_layer.smooth.proportions == {}


def test_analysis_nulls_are_large_and_monitor_nulls_bounded():
    spectrum = kw.Spectrum.pretrained(3)
    kernels = blurred_noise(5000, 3, 1.0, seed=2)
    result, nulls, _ = classify_many_with_null([kernels], spectrum, null_kernels=ANALYSIS_NULL_KERNELS)[0]
    assert len(result) == 5000
    # Shares of 4,096 kernels are multiples of 1/4096; of the monitor's 256, of 1/256.
    assert nulls.smooth.clustered_fraction * ANALYSIS_NULL_KERNELS == pytest.approx(
        round(nulls.smooth.clustered_fraction * ANALYSIS_NULL_KERNELS)
    )
    bounded = classify_many_with_null([kernels], spectrum)[0][1]
    assert (bounded.smooth.clustered_fraction * 256) == pytest.approx(round(bounded.smooth.clustered_fraction * 256))


def test_a_smooth_patternless_layer_among_structured_ones_is_flagged():
    """Before the smooth null, a layer of blurred noise (30 % "clustered", mostly as first
    derivatives) passed for structured next to DoG-initialised layers."""
    model = torch.nn.Sequential(*[torch.nn.Conv2d(256, 256, 7, groups=256) for _ in range(5)])
    kw.init.dog_(model, seed=0)
    with torch.no_grad():
        model[2].weight.copy_(blurred_noise(256, 7, 1.5, seed=3)[:, None])
    layers = {layer.name: layer for layer in kw.analyze(model).layers}
    assert layers["2"].clustered_fraction > 0.3 and layers["2"].null_clustered_fraction < 0.03
    flags = detect(0, layers)
    assert [(a.layer, a.kind) for a in flags] == [("2", "memorisation")]
    assert flags[0].numbers["null_level"] == layers["2"].smooth_null_clustered_fraction
    assert "smooth random kernels" in flags[0].message


def test_cli_json_and_table_carry_both_nulls(tmp_path):
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 32, 3), torch.nn.Conv2d(32, 32, 5, groups=32))
    torch.save(kw.init.dog_(model, seed=0).state_dict(), tmp_path / "model.pt")
    run = [sys.executable, "-m", "kernelwatch.cli", "analyze", str(tmp_path / "model.pt")]
    layer = json.loads(subprocess.run([*run, "--json"], capture_output=True, text=True, check=True).stdout)["layers"][0]
    for key in ("null_clustered_fraction", "smooth_null_clustered_fraction", "smooth_null_median_dissimilarity"):
        assert 0 <= layer[key] <= 1
    assert layer["structure_above_chance"] == pytest.approx(
        layer["clustered_fraction"] - max(layer["null_clustered_fraction"], layer["smooth_null_clustered_fraction"])
    )
    assert set(layer["null_proportions"]) == set(fmt.NULLS) and set(layer["families_above_chance"]) == set(kw.CLUSTERS)
    table = subprocess.run(run, capture_output=True, text=True, check=True).stdout
    assert " above " in table.splitlines()[0] and table.splitlines()[-2].startswith("above chance")
    assert np.isclose(float(table.splitlines()[2].split()[5]), 100 * layer["structure_above_chance"], atol=0.06)
