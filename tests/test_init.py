"""DoG initialisation of real models: what changes, what does not, the scale and the shares."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import timm
import torch
from torch import nn

from kernelwatch import patterns
from kernelwatch.errors import KernelWatchError
from kernelwatch.init import DEFAULT_PROPORTIONS, dog_


class _SubclassedConv(nn.Conv2d):
    pass


def _depthwise(model: nn.Module) -> list[tuple[str, nn.Conv2d]]:
    return [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, nn.Conv2d) and m.in_channels > 1 and m.groups == m.in_channels
    ]


def _default_std(conv: nn.Conv2d) -> float:
    return 1.0 / math.sqrt(conv.weight[0].numel()) / math.sqrt(3.0)


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: t.detach().clone() for name, t in model.state_dict().items()}


@pytest.fixture(scope="module")
def convnext():
    torch.manual_seed(0)
    model = timm.create_model("convnext_atto", pretrained=False).eval()
    before = _snapshot(model)
    assert dog_(model, seed=0) is model
    return model, before


def test_only_depthwise_weights_change(convnext):
    model, before = convnext
    depthwise_weights = {f"{name}.weight" for name, _ in _depthwise(model)}
    assert len(depthwise_weights) == 12
    for name, tensor in model.state_dict().items():
        if name in depthwise_weights:
            assert (tensor != before[name]).all(), name
        else:  # regular convs, biases, norms, linears
            assert torch.equal(tensor, before[name]), name


def test_each_layer_has_the_default_init_std(convnext):
    model, _ = convnext
    for name, conv in _depthwise(model):
        assert conv.weight.std().item() == pytest.approx(_default_std(conv), rel=1e-3), name


def test_channels_follow_the_default_proportions(convnext):
    model, _ = convnext
    # Replay the generator: same seed, same layer order, one mixture per layer.
    rng = np.random.default_rng(0)
    labels = []
    for name, conv in _depthwise(model):
        kernels, names = patterns.generate_mixture(conv.out_channels, conv.kernel_size[0], DEFAULT_PROPORTIONS, rng=rng)
        weight = conv.weight.detach().reshape(conv.out_channels, -1).double()
        expected = torch.from_numpy(kernels).reshape(conv.out_channels, -1).double()
        cosine = nn.functional.cosine_similarity(weight, expected, dim=1)
        assert cosine.min().item() > 1 - 1e-5, name  # each channel is its pattern, positively scaled
        labels.extend(names.tolist())
    families = np.array([label.split("/")[0] for label in labels])
    assert len(families) == 1840
    for family, share in DEFAULT_PROPORTIONS.items():
        assert abs((families == family).mean() - share) < 0.04, family


def test_forward_pass_still_runs(convnext):
    model, _ = convnext
    with torch.no_grad():
        out = model(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 1000) and torch.isfinite(out).all()


def test_mobilenet_with_3x3_and_5x5_depthwise_convs():
    model = timm.create_model("mobilenetv3_small_050", pretrained=False).eval()
    before = _snapshot(model)
    dog_(model, seed=1)
    sizes = set()
    for name, conv in _depthwise(model):
        sizes.add(conv.kernel_size[0])
        assert not torch.equal(conv.weight, before[f"{name}.weight"]), name
        assert conv.weight.std().item() == pytest.approx(_default_std(conv), rel=1e-3), name
    assert sizes == {3, 5}
    assert torch.equal(model.conv_stem.weight, before["conv_stem.weight"])
    with torch.no_grad():
        assert torch.isfinite(model(torch.randn(1, 3, 64, 64))).all()


def _sequential() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        _SubclassedConv(16, 32, 5, padding=2, groups=16),  # depthwise with a channel multiplier
        nn.Conv2d(32, 32, (3, 5), padding=(1, 2), groups=32),
        nn.Conv2d(32, 32, 4, padding=2, groups=32),
        nn.Conv2d(32, 32, 7, padding=3, groups=32, bias=True),
    )


def test_sequential_skips_non_square_and_even_kernels_with_a_warning(caplog):
    model = _sequential()
    before = _snapshot(model)
    with caplog.at_level(logging.WARNING, logger="kernelwatch"):
        dog_(model, seed=2)
    skipped = [r.getMessage() for r in caplog.records if r.name == "kernelwatch" and r.levelno == logging.WARNING]
    assert len(skipped) == 2 and "'2'" in skipped[0] and "'3'" in skipped[1]
    for index in (0, 2, 3):
        assert torch.equal(model[index].weight, before[f"{index}.weight"])
    for index in (1, 4):
        assert (model[index].weight != before[f"{index}.weight"]).all()
        assert model[index].weight.std().item() == pytest.approx(_default_std(model[index]), rel=1e-3)
        assert torch.equal(model[index].bias, before[f"{index}.bias"])
    assert model(torch.randn(1, 3, 9, 9)).shape == (1, 32, 10, 10)


def test_custom_proportions_show_in_the_centre_signs():
    model = nn.Sequential(nn.Conv2d(2000, 2000, 5, padding=2, groups=2000))
    dog_(model, {"on-centre": 0.3, "off-centre": 0.7}, seed=3)
    centre = model[0].weight[:, 0, 2, 2]
    assert abs((centre > 0).float().mean().item() - 0.3) < 0.04


def test_seeded_noise_and_dtype():
    first = dog_(_sequential(), seed=4)[4].weight
    again = dog_(_sequential(), seed=4)[4].weight
    other = dog_(_sequential(), seed=5)[4].weight
    noisy = dog_(_sequential(), seed=4, noise=0.5)[4].weight
    assert torch.equal(first, again) and not torch.allclose(first, other) and not torch.allclose(first, noisy)
    assert noisy.std().item() == pytest.approx(first.std().item(), rel=1e-3)
    double = dog_(_sequential().to(torch.float64), seed=4)[4].weight
    assert double.dtype == torch.float64 and torch.allclose(double.float(), first)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_half_parameters_stay_on_their_device():
    model = _sequential().cuda().half()
    dog_(model, seed=4)
    weight = model[4].weight
    assert weight.is_cuda and weight.dtype == torch.float16
    assert torch.allclose(weight.float().cpu(), dog_(_sequential(), seed=4)[4].weight, atol=1e-3)


@pytest.mark.parametrize(
    ("proportions", "message"),
    [
        ({"on-centre": 0.5, "off-centre": 0.4}, "sum to 1"),
        ({"on-centre": 1.1, "off-centre": -0.1}, "non-negative"),
        ({"on-centre": 0.5, "gabor": 0.5}, "unknown pattern families"),
        ({"on-centre": float("nan"), "off-centre": 1.0}, "non-negative"),
    ],
)
def test_bad_proportions_raise_and_leave_the_model_alone(proportions, message):
    model = _sequential()
    before = _snapshot(model)
    with pytest.raises(KernelWatchError, match=message):
        dog_(model, proportions, seed=0)
    assert all(torch.equal(t, before[n]) for n, t in model.state_dict().items())


def test_squares_cannot_initialise_large_kernels():
    with pytest.raises(KernelWatchError, match="small-kernel"):
        dog_(nn.Conv2d(8, 8, 7, groups=8), {"on-square": 1.0}, seed=0)


@pytest.mark.parametrize(
    "model",
    [
        nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(4)),
        nn.Conv2d(1, 4, 3, groups=1),  # one input channel: not depthwise
        nn.Conv2d(8, 8, 3, groups=4),  # grouped, not depthwise
    ],
)
def test_models_without_depthwise_convs_raise(model):
    with pytest.raises(KernelWatchError, match="no depthwise"):
        dog_(model, seed=0)


def test_only_skipped_depthwise_convs_raise(caplog):
    with caplog.at_level(logging.WARNING, logger="kernelwatch"), pytest.raises(KernelWatchError, match="no depthwise"):
        dog_(nn.Conv2d(8, 8, 4, groups=8), seed=0)
    assert "4x4" in caplog.text
