"""The first-layer lens: stem detection, patches, energy profile, whitening score, reflections
(on real paired trainings), and clear errors for bad input."""

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import kernelwatch as kw
from kernelwatch.analysis import format_first_layer
from kernelwatch.first_layer import whitening_prediction

ROOT = Path(__file__).resolve().parent.parent


def _validation_script():
    spec = importlib.util.spec_from_file_location("validate_first_layer", ROOT / "benchmarks" / "validate_first_layer.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


class PatchifyNet(nn.Module):
    """A ConvNeXt-like stem (4x4, stride 4) registered after a head, with one input channel."""

    def __init__(self, channels: int = 1):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(channels, 16, 4, stride=4), nn.GroupNorm(1, 16))
        self.block = nn.Conv2d(16, 16, 7, padding=3, groups=16)
        self.head = nn.Linear(16, 2)

    def forward(self, x):
        return self.head(self.block(self.stem(x)).mean((2, 3)))


def test_the_stem_is_the_first_convolution_with_its_stride_and_any_channel_count():
    model = torch.compile(PatchifyNet(channels=5), backend="eager")
    name, conv = kw.find_stem(model)
    assert name == "stem.0" and conv.kernel_size == (4, 4)
    report = kw.analyze_first_layer(model, torch.randn(2, 5, 32, 32))
    assert (report.layer, report.in_channels, report.kernel_size, report.stride) == ("stem.0", 5, (4, 4), (4, 4))
    assert report.source == "data" and report.n_patches == 2 * 8 * 8
    assert len(report.reflections["colour"]) == 5
    from_state_dict = kw.analyze_first_layer(PatchifyNet(channels=5).state_dict())
    assert from_state_dict.layer == "stem.0" and from_state_dict.source == "prior" and from_state_dict.n_patches == 0


def test_patches_are_the_images_at_the_stride_grid_and_leave_the_global_random_state_alone():
    images = torch.randn(3, 2, 12, 12)
    state = torch.random.get_rng_state()
    patches = kw.image_patches(images, (4, 4), (4, 4), limit=1000)
    assert torch.equal(state, torch.random.get_rng_state())
    unfolded = nn.functional.unfold(images, 4, stride=4).transpose(1, 2).reshape(-1, 32).numpy()
    assert patches.shape == (27, 32)
    np.testing.assert_array_equal(np.sort(patches, axis=0), np.sort(unfolded, axis=0))
    few = kw.image_patches(images, (3, 3), (1, 1), limit=50, generator=torch.Generator().manual_seed(1))
    assert few.shape == (50, 18) and len(np.unique(few, axis=0)) == 50


def _bank(profile, pca):
    """D filters whose energy along principal component i is exactly profile[i]."""
    return (np.sqrt(profile)[:, None] * pca.eigenvectors.T).reshape(len(profile), 3, 5, 5)


def test_whitening_is_zero_for_random_filters_and_grows_along_the_trajectory_to_whitening():
    rng = np.random.default_rng(0)
    images = torch.from_numpy(np.cumsum(np.cumsum(rng.standard_normal((8, 3, 40, 40)), 2), 3).astype(np.float32))
    patches = kw.image_patches(images, (5, 5), (1, 1), 4096)
    pca = kw.patch_pca(patches)
    flat = kw.first_layer_report(rng.standard_normal((256, 3, 5, 5)), pca)
    assert flat.whitening == 0.0
    lam = pca.eigenvalues / pca.eigenvalues.mean()
    scores = []
    for tau in (3.0, 30.0, 300.0):  # the linear-systems profile after training time tau
        profile = 0.3 + (1 - np.exp(-lam * tau)) ** 2 / np.maximum(lam, 1e-12)
        scores.append(kw.first_layer_report(_bank(profile / profile.sum(), pca), patches).whitening)
    whitened = kw.first_layer_report(_bank(whitening_prediction(pca.eigenvalues), pca), patches)
    assert 0.0 < scores[0] < scores[1] < scores[2] <= whitened.whitening <= 1.0
    np.testing.assert_allclose(whitened.energy_profile, whitened.whitening_prediction, rtol=1e-6)
    for report in (flat, whitened):
        assert report.energy_profile.sum() == pytest.approx(1.0)
        assert np.all(np.diff(report.eigenvalues) <= 0)


def test_json_has_the_fields_and_plain_types():
    report = kw.first_layer_report(torch.randn(8, 3, 3, 3), layer="conv1", stride=(2, 2))
    data = json.loads(json.dumps(report.to_json()))
    assert list(data) == [
        "layer", "in_channels", "kernel_size", "stride", "source", "n_patches", "eigenvalues",
        "energy_profile", "whitening_prediction", "whitening", "reflections",
    ]  # fmt: skip
    assert data["kernel_size"] == [3, 3] and data["stride"] == [2, 2] and len(data["energy_profile"]) == 27
    assert set(data["reflections"]) == {"sharpness", "noise", "colour"} and len(data["reflections"]["colour"]) == 3
    assert format_first_layer(report).startswith("first layer conv1: 3x3x3, stride 2; whitening ")


def test_analyze_and_the_cli_table_show_the_stem_and_keep_the_depthwise_rows(tmp_path, capsys):
    from kernelwatch.cli import main

    model = PatchifyNet(channels=3)
    path = tmp_path / "model.pt"
    torch.save(model.state_dict(), path)
    report = kw.analyze(path)
    assert [layer.name for layer in report.layers] == ["block"]
    assert report.first_layer is not None and report.first_layer.layer == "stem.0"
    assert main(["analyze", str(path)]) == 0
    table = capsys.readouterr().out
    assert "block" in table and "first layer stem.0: 3x4x4, stride 1; whitening" in table
    assert main(["analyze", str(path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["first_layer"]["layer"] == "stem.0"


def test_a_stem_with_nan_weights_is_refused_by_the_lens_but_does_not_break_analyze():
    model = PatchifyNet(channels=3)
    with torch.no_grad():
        model.stem[0].weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(kw.KernelWatchError, match="stem.0: the stem weight .* NaN"):
        kw.analyze_first_layer(model)
    report = kw.analyze(model)
    assert report.first_layer is None and "NaN" in report.first_layer_note
    assert "first layer: first layer stem.0: the stem weight" in report.format_table()


@pytest.mark.parametrize(
    ("target", "data", "message"),
    [
        (nn.Sequential(nn.Linear(4, 4)), None, "no nn.Conv2d in Sequential"),
        ({"fc.weight": torch.zeros(4, 4)}, None, "no 4-D convolution weight"),
        (nn.Conv2d(3, 8, 3), torch.zeros(2, 4, 8, 8), "data has 4 channels, the stem <root> takes 3"),
        (nn.Conv2d(3, 8, 3), torch.zeros(3, 8, 8), r"images must be a batch \[N, C, H, W\]"),
        (nn.Conv2d(3, 8, 9), torch.zeros(2, 3, 8, 8), "hold no 9x9 patch"),
        (nn.Conv2d(3, 8, 3), torch.full((2, 3, 8, 8), float("inf")), "NaN or Inf"),
        (42, None, "expects an nn.Module, a state dict or a checkpoint path, got int"),
    ],
)
def test_bad_input_gets_a_clear_error(target, data, message):
    if isinstance(target, nn.Conv2d) and data is None:
        nn.init.zeros_(target.weight)
    with pytest.raises(kw.KernelWatchError, match=message):
        kw.analyze_first_layer(target, data)


def test_corrupt_and_all_zero_checkpoints_get_a_clear_error(tmp_path):
    path = tmp_path / "model.pt"
    torch.save(PatchifyNet().state_dict(), path)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(kw.KernelWatchError, match="truncated or damaged"):
        kw.analyze_first_layer(path)
    with pytest.raises(kw.KernelWatchError, match="all zero"):
        kw.analyze_first_layer({"conv.weight": torch.zeros(8, 3, 3, 3)})
    with pytest.raises(kw.KernelWatchError, match="do not fit a 3x3x3 stem"):
        kw.first_layer_report(torch.randn(8, 3, 3, 3), np.zeros((10, 12)))


def test_paired_trainings_are_told_apart_from_the_weights_alone():
    """The same CNN, seed and batches on sharp, blurred, noisy and red-shifted dead-leaves
    images (100 AdamW steps each, one thread, ~12 s): the reflections rank them as the data
    differ, and training moves the stem along the trajectory to whitening."""
    validation = _validation_script()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        runs = {v: validation.train("adamw-bn", v, 0, validation.Config(steps=100)) for v in validation.VARIANTS}
    finally:
        torch.set_num_threads(threads)
    reflections = {variant: kw.first_layer_report(last).reflections for variant, (_, last, _, _) in runs.items()}
    assert reflections["sharp"]["sharpness"] > reflections["blur"]["sharpness"]
    assert reflections["noise"]["noise"] > reflections["sharp"]["noise"]
    assert reflections["red"]["colour"][0] > reflections["sharp"]["colour"][0]
    first, last, patches, _ = runs["sharp"]
    assert kw.first_layer_report(first, patches).whitening == 0.0
    assert kw.first_layer_report(last, patches).whitening > 0.0
