"""The shipped spectra: offline loading, classification of real and null kernels, file format."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

import kernelwatch as kw
from kernelwatch import patterns
from kernelwatch.classification import centre_and_normalise, nearest_prototype_brute_force
from kernelwatch.metrics import family
from kernelwatch.pretrain import shuffled

FIXTURE = Path(__file__).parent / "fixtures" / "efficientnet_lite0_kernels.npz"

# The independent generator judges the spectra and never enters the package: load it by path.
_spec = importlib.util.spec_from_file_location(
    "independent_patterns", Path(__file__).parents[1] / "benchmarks" / "independent_patterns.py"
)
independent = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(independent)


@pytest.fixture(scope="module")
def real():
    with np.load(FIXTURE) as data:
        return {3: data["k3"], 5: data["k5"]}


@pytest.mark.parametrize("k", [3, 5, 7])
def test_pretrained_spectra_ship_and_load_offline(k):
    spec = kw.Spectrum.pretrained(kernel_size=k)
    assert spec.n_codes == 10_000
    assert spec.prototypes.shape == (10_000, k, k)
    assert np.all(np.diff(spec.codes) > 0) and spec.codes[0] == 0 and spec.codes[-1] == 1
    assert set(family(spec.labels)) <= set(kw.CLUSTERS)
    assert 0 < spec.threshold <= {3: 1.0, 5: 0.2, 7: 0.3}[k]
    for key in ("sources", "seed", "epochs", "final_loss", "shuffled_false_positive_rate"):
        assert key in spec.provenance
    assert spec.provenance["shuffled_false_positive_rate"] <= 0.03
    # Every DoG family the library generates has codes of its own in the spectrum.
    assert {"on-centre", "off-centre", "first-derivative", "on-cross", "off-cross"} <= set(family(spec.labels))


def test_kmeans_spectrum_for_3x3(real):
    spec = kw.Spectrum.pretrained(kernel_size=3, method="kmeans")
    assert spec.method == "kmeans" and spec.n_codes == 10
    res = spec.classify(real[3])
    assert 0.3 < res.clustered.mean() < 1.0
    assert spec.classify(shuffled(real[3], 7)).clustered.mean() <= 0.03


def test_real_5x5_kernels_cluster_like_the_paper_and_null_kernels_do_not(real):
    spec = kw.Spectrum.pretrained(kernel_size=5)
    res = spec.classify(real[5])
    assert res.clustered.mean() >= 0.61  # appendix L: EfficientNet-Lite0 61.08 %
    assert spec.classify(shuffled(real[5], 7)).clustered.mean() <= 0.03
    noise = np.random.default_rng(7).standard_normal((5000, 5, 5))
    assert spec.classify(noise).clustered.mean() <= 0.01
    counts = {name: np.sum(res.labels == name) for name in set(res.labels[res.clustered])}
    assert sorted(counts, key=counts.get)[-2:] == ["off-centre", "on-centre"]


def test_real_3x3_kernels_beat_their_null(real):
    spec = kw.Spectrum.pretrained(kernel_size=3)
    # Several curves with thresholds per run of codes (one curve, per family: 0.41)
    assert spec.classify(real[3]).clustered.mean() >= 0.55
    assert spec.classify(shuffled(real[3], 7)).clustered.mean() <= 0.03
    noise = np.random.default_rng(7).standard_normal((5000, 3, 3))
    assert spec.classify(noise).clustered.mean() <= 0.01


@pytest.mark.parametrize("family_name", ["on-centre", "off-centre", "on-cross", "off-cross", "first-derivative"])
def test_clean_7x7_patterns_get_their_family(family_name):
    spec = kw.Spectrum.pretrained(kernel_size=7)
    kernels, _ = patterns.generate(family_name, 500, 7, rng=3, noise=0.1)
    res = spec.classify(kernels)
    assert np.mean(family(res.labels) == family_name) >= 0.85


def test_classify_matches_brute_force_and_accepts_numpy_or_torch(real):
    spec = kw.Spectrum.pretrained(kernel_size=5)
    res, exact = spec.classify(real[5]), spec.classify(real[5], exact=True)
    res_torch = spec.classify(torch.from_numpy(real[5]).double())
    np.testing.assert_array_equal(res.labels, res_torch.labels)
    unit, _ = centre_and_normalise(torch.from_numpy(real[5]))
    protos, _ = centre_and_normalise(torch.from_numpy(spec.prototypes))
    nearest, sim = nearest_prototype_brute_force(unit, protos)
    brute = 1 - sim.numpy()
    threshold = spec.prototype_thresholds[nearest.numpy()]  # one threshold per family
    ok = res.valid  # the real layer has a few all-zero (dead) kernels
    assert 0 < (~ok).sum() < 20
    # Decisions always equal the exhaustive search; distances too where they decide something.
    np.testing.assert_array_equal(res.labels, exact.labels)
    np.testing.assert_array_equal(res.clustered[ok], brute[ok] <= threshold[ok])
    np.testing.assert_allclose(exact.dissimilarity[ok], brute[ok], atol=1e-6)
    np.testing.assert_allclose(res.dissimilarity[res.clustered], brute[res.clustered], atol=1e-6)
    unclustered = ok & ~res.clustered
    assert np.all(brute[unclustered] > threshold[unclustered])
    assert np.all(res.dissimilarity[unclustered] >= brute[unclustered] - 1e-6)
    assert np.all((res.codes[ok] >= 0) & (res.codes[ok] <= 1))


def test_classification_ignores_scale_and_offset(real):
    spec = kw.Spectrum.pretrained(kernel_size=5)
    kernels = real[5][real[5].std(axis=(1, 2)) > 1e-3][:500]  # leave out dead kernels
    a = spec.classify(kernels)
    b = spec.classify(kernels * 37.0 - 4.0)
    np.testing.assert_array_equal(a.labels, b.labels)


def test_invalid_kernels_are_labelled_invalid():
    spec = kw.Spectrum.pretrained(kernel_size=5)
    kernels = np.random.default_rng(0).standard_normal((4, 5, 5))
    kernels[0, 2, 2] = np.nan
    kernels[1] = np.inf
    kernels[2] = 0.0
    res = spec.classify(kernels)
    assert res.labels[:3].tolist() == ["invalid"] * 3
    assert not res.clustered[:3].any() and res.valid.tolist() == [False, False, False, True]


def test_unsupported_sizes_and_methods_have_clear_errors():
    with pytest.raises(kw.KernelWatchError, match="no spectrum serves even sizes"):
        kw.Spectrum.pretrained(kernel_size=6)
    assert kw.Spectrum.pretrained(kernel_size=9).kernel_size == 7  # through the central area
    with pytest.raises(kw.KernelWatchError, match="unknown spectrum method"):
        kw.Spectrum.pretrained(kernel_size=5, method="pca")
    with pytest.raises(kw.KernelWatchError, match="3x3 but this spectrum is for 5x5"):
        kw.Spectrum.pretrained(kernel_size=5).classify(np.zeros((2, 3, 3)))


def test_save_load_round_trip_and_bad_files(tmp_path):
    spec = kw.Spectrum.pretrained(kernel_size=3)
    path = spec.save(tmp_path / "s.npz")
    again = kw.Spectrum.load(path)
    np.testing.assert_array_equal(again.prototypes, spec.prototypes)
    np.testing.assert_array_equal(again.labels, spec.labels)
    assert again.threshold == spec.threshold and again.provenance == spec.provenance
    np.testing.assert_array_equal(again.prototype_thresholds, spec.prototype_thresholds)
    # The 3x3 spectrum is several curves, with a threshold per code: each curve's stored
    # autoencoder decodes codes on [0, 1] to that curve's prototypes.
    sizes = again.config["curves"]
    assert len(sizes) > 1 and sum(sizes) == again.n_codes and again.code_thresholds is not None
    starts = np.cumsum([0, *sizes])
    for curve, (size, start) in enumerate(zip(sizes, starts)):
        codes = np.linspace(0.0, 1.0, size, dtype=np.float32)[::97]
        with torch.no_grad():
            decoded = again.autoencoder(curve).decode(torch.from_numpy(codes))
        expected = spec.prototypes[start : start + size][::97]
        np.testing.assert_allclose(decoded.numpy().reshape(-1, 3, 3), expected, atol=1e-5)
    with pytest.raises(kw.KernelWatchError, match="curves, not curve"):
        again.autoencoder(len(sizes))

    corrupt = tmp_path / "corrupt.npz"
    corrupt.write_bytes(b"not a spectrum")
    with pytest.raises(kw.KernelWatchError, match="cannot read spectrum file"):
        kw.Spectrum.load(corrupt)
    data = dict(np.load(path))
    data["header"] = np.array(str(data["header"]).replace('"format_version": 1', '"format_version": 99'))
    np.savez(tmp_path / "future.npz", **data)
    with pytest.raises(kw.KernelWatchError, match="format version 99"):
        kw.Spectrum.load(tmp_path / "future.npz")


def test_intervals_cover_the_code_axis():
    spec = kw.Spectrum.pretrained(kernel_size=7)
    intervals = spec.intervals()
    assert intervals[0][1] == 0.0 and intervals[-1][2] == 1.0
    assert all(a[0] != b[0] for a, b in zip(intervals, intervals[1:]))


@pytest.mark.parametrize("k", [3, 7])
def test_interval_thresholds_are_those_of_their_codes(k):
    spec = kw.Spectrum.pretrained(kernel_size=k)
    bounds = spec.interval_thresholds()
    thresholds = spec.prototype_thresholds
    assert len(bounds) == len(spec.intervals()) and all(low <= high for low, high in bounds)
    assert min(low for low, _ in bounds) == thresholds.min() and max(high for _, high in bounds) == thresholds.max()
    if k == 7:  # one threshold per family: each interval holds one
        family = lambda label: label.split("/")[0]  # noqa: E731
        expected = [spec.family_thresholds.get(family(label), spec.threshold) for label, _, _ in spec.intervals()]
        assert bounds == [(t, t) for t in expected]
    else:  # one per code: 3x3's intervals hold several
        assert any(low < high for low, high in bounds)


@pytest.mark.parametrize("k", [5, 7])
def test_every_family_of_the_independent_generator_is_recognised(k):
    spec = kw.Spectrum.pretrained(kernel_size=k)
    for i, name in enumerate(independent.families(k)):
        kernels, _ = independent.generate(name, 300, k, rng=100 + i)
        res = spec.classify(kernels)
        assert np.mean(res.clustered & (family(res.labels) == name)) >= 0.8, name


def test_the_papers_thresholds_and_method_stay_reachable(real):
    spec = kw.Spectrum.pretrained(kernel_size=5)
    assert spec.family_thresholds and kw.PAPER_THRESHOLDS[5] == 0.2
    uniform = spec.classify(real[5], threshold=0.2, exact=True)
    np.testing.assert_array_equal(uniform.clustered, uniform.valid & (uniform.dissimilarity <= 0.2))
    model = torch.nn.Conv2d(len(real[5]), len(real[5]), 5, groups=len(real[5]))
    with torch.no_grad():
        model.weight.copy_(torch.from_numpy(real[5])[:, None])
    assert kw.analyze(model, threshold=0.2).clustered_fraction == pytest.approx(uniform.clustered.mean())
    assert kw.analyze(model).clustered_fraction == pytest.approx(spec.classify(real[5]).clustered.mean())
    paper = kw.Spectrum.pretrained(kernel_size=5, method="paper")
    assert paper.method == "paper" and paper.threshold == 0.2 and not paper.family_thresholds
    assert kw.Spectrum.pretrained(kernel_size=3, method="paper").method == "kmeans"  # section 5
