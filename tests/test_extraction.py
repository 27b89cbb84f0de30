"""Tests of kernelwatch.extraction on real torch and timm models, wrappers and checkpoint files."""

from __future__ import annotations

import logging
import random
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import timm
import torch
import torch.distributed as dist
from timm.layers import Conv2dSame, MixedConv2d
from timm.models.convmixer import ConvMixer
from torch import nn

from kernelwatch.errors import KernelWatchError
from kernelwatch.extraction import DepthwiseKernels, extract_depthwise, is_depthwise, load_checkpoint


def _net() -> nn.Sequential:
    """Two depthwise convs (one nested) among a regular and a pointwise conv."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(4, 4, 3, padding=1, groups=4),
        nn.Conv2d(4, 8, 3, padding=1),
        nn.Conv2d(8, 8, 1),
        nn.Sequential(nn.Conv2d(8, 8, 5, padding=2, groups=8), nn.ReLU()),
    )


def _assert_same(kernels: DepthwiseKernels, model: nn.Module) -> None:
    expected = {name: m.weight.detach().squeeze(1) for name, m in model.named_modules() if is_depthwise(m)}
    assert list(kernels) == list(expected)
    for name, kernel in kernels.items():
        torch.testing.assert_close(kernel, expected[name], rtol=0, atol=0)


@pytest.fixture
def process_group(tmp_path: Path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_plain_model_keeps_only_depthwise_convs() -> None:
    model = _net()
    kernels = extract_depthwise(model)
    assert isinstance(kernels, DepthwiseKernels)
    assert list(kernels) == ["0", "3.0"]
    for name, module in (("0", model[0]), ("3.0", model[3][0])):
        kernel = kernels[name]
        assert kernel.dtype == torch.float32 and kernel.device.type == "cpu"
        assert kernel.is_contiguous() and not kernel.requires_grad
        assert torch.equal(kernel, module.weight.detach().squeeze(1))
    assert kernels.dilated == {} and kernels.unsupported == {}


def test_kernels_are_a_snapshot() -> None:
    model = _net()
    kernels = extract_depthwise(model)
    before = kernels["0"].clone()
    with torch.no_grad():
        model[0].weight.add_(1.0)
    assert torch.equal(kernels["0"], before)


def test_depth_multiplier_and_is_depthwise() -> None:
    conv = nn.Conv2d(3, 6, 3, groups=3)
    kernels = extract_depthwise(nn.Sequential(conv))
    assert kernels["0"].shape == (6, 3, 3)
    assert torch.equal(kernels["0"], conv.weight.detach().squeeze(1))
    assert is_depthwise(conv) and is_depthwise(Conv2dSame(4, 4, 3, groups=4))
    assert not is_depthwise(nn.Conv2d(4, 4, 3, groups=2))  # grouped, not depthwise
    assert not is_depthwise(nn.Conv2d(1, 4, 3))  # one input channel: a regular conv
    assert not is_depthwise(nn.Conv1d(4, 4, 3, groups=4))


def test_no_depthwise_gives_empty_result() -> None:
    kernels = extract_depthwise(nn.Sequential(nn.Conv2d(3, 8, 3), nn.Linear(8, 2)))
    assert len(kernels) == 0 and kernels.unsupported == {}


def test_timm_convnext_atto() -> None:
    model = timm.create_model("convnext_atto", pretrained=False)
    kernels = extract_depthwise(model)
    conv_dw = {n: m for n, m in model.named_modules() if n.endswith("conv_dw")}
    assert list(kernels) == list(conv_dw)
    assert sum(k.shape[0] for k in kernels.values()) == sum(m.out_channels for m in conv_dw.values())
    assert {k.shape[1:] for k in kernels.values()} == {(7, 7)}


@pytest.mark.parametrize(("name", "sizes"), [("efficientnet_b0", {3, 5}), ("mobilenetv3_small_050", {3, 5})])
def test_timm_efficientnet_and_mobilenet(name: str, sizes: set[int]) -> None:
    model = timm.create_model(name, pretrained=False)
    kernels = extract_depthwise(model)
    assert list(kernels) == [n for n, m in model.named_modules() if n.endswith("conv_dw")]
    assert {k.shape[-1] for k in kernels.values()} == sizes
    _assert_same(kernels, model)


def test_timm_mixnet_splits_mixed_convs() -> None:
    model = timm.create_model("mixnet_s", pretrained=False)
    kernels = extract_depthwise(model)
    # MixNet also uses MixedConv2d for grouped pointwise convs; only conv_dw is depthwise.
    mixed = {n: m for n, m in model.named_modules() if isinstance(m, MixedConv2d) and n.endswith("conv_dw")}
    assert mixed
    for name, module in mixed.items():
        children = [f"{name}.{i}" for i in range(len(module))]
        assert all(child in kernels for child in children)
        assert len({kernels[child].shape[-1] for child in children}) == len(children)
    assert "blocks.2.0.conv_dw.0" in kernels and "blocks.2.0.conv_dw.1" in kernels
    assert {k.shape[-1] for k in kernels.values()} >= {3, 5, 7, 9}
    _assert_same(kernels, model)


def test_timm_convmixer() -> None:
    model = ConvMixer(dim=16, depth=3, kernel_size=5, patch_size=4, num_classes=10)
    kernels = extract_depthwise(model)
    assert list(kernels) == [f"blocks.{i}.0.fn.0" for i in range(3)]
    assert all(k.shape == (16, 5, 5) for k in kernels.values())


def test_torch_compile_wrapper_has_bare_names() -> None:
    model = _net()
    compiled = torch.compile(model)
    assert any("_orig_mod" in n for n, _ in compiled.named_modules())
    _assert_same(extract_depthwise(compiled), model)


def test_activation_checkpoint_wrapper_has_bare_names() -> None:
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    model = _net()
    model[3] = checkpoint_wrapper(model[3])
    assert any("_checkpoint_wrapped_module" in n for n, _ in model.named_modules())
    kernels = extract_depthwise(model)
    assert list(kernels) == ["0", "3.0"]
    assert torch.equal(kernels["3.0"], model[3]._checkpoint_wrapped_module[0].weight.detach().squeeze(1))


def test_ddp_wrapper_has_bare_names(process_group) -> None:
    model = _net()
    ddp = nn.parallel.DistributedDataParallel(model)
    _assert_same(extract_depthwise(ddp), model)
    _assert_same(extract_depthwise(torch.compile(ddp)), model)


@pytest.mark.parametrize("use_orig_params", [False, True])
def test_fsdp1(process_group, use_orig_params: bool) -> None:
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    model = _net()
    expected = extract_depthwise(model)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="FSDP is switching to use `NO_SHARD`")
        # FSDP1 refuses CPU unless the device is named explicitly.
        fsdp = FSDP(model, device_id=torch.device("cpu"), use_orig_params=use_orig_params)
    assert any("_fsdp_wrapped_module" in n for n, _ in fsdp.named_modules())
    kernels = extract_depthwise(fsdp)
    assert list(kernels) == list(expected)
    for name, kernel in kernels.items():
        assert torch.equal(kernel, expected[name])


def test_fsdp2_fully_shard(process_group) -> None:
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    model = _net()
    expected = extract_depthwise(model)
    fully_shard(model[3])
    fully_shard(model)
    assert isinstance(model[0].weight, DTensor)
    kernels = extract_depthwise(model)
    assert list(kernels) == list(expected)
    for name, kernel in kernels.items():
        assert type(kernel) is torch.Tensor and torch.equal(kernel, expected[name])


_TWO_RANK_SCRIPT = """
import gc, sys, torch, torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP, fully_shard
from kernelwatch.extraction import extract_depthwise

rank, init_method, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=2)
def net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(4, 4, 3, groups=4), nn.Conv2d(4, 8, 1), nn.Conv2d(8, 8, 5, groups=8))
fsdp1 = extract_depthwise(FSDP(net(), device_id=torch.device("cpu")))
model = net()
fully_shard(model)
fsdp2 = extract_depthwise(model)
bare = extract_depthwise(net())
torch.save({"bare": dict(bare), "fsdp1": dict(fsdp1), "fsdp2": dict(fsdp2)}, f"{out}/rank{rank}.pt")
# A gloo worker thread drops a finished all-gather's tensors after the gather has returned, taking
# the GIL; during interpreter finalization that aborts the rank ("terminate called without an
# active exception", from ProcessGroupGloo::runLoop; 3 runs in 79). Sharded models gone and every
# rank past a barrier before the group goes: 0 aborts in 100 runs.
del model
gc.collect()
dist.barrier()
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_fsdp_two_ranks_gather_full_weights(tmp_path: Path) -> None:
    """With two ranks each holds half of every weight; both must still see the full kernels."""
    args = [f"file://{tmp_path / 'pg'}", str(tmp_path)]
    commands = [[sys.executable, "-c", _TWO_RANK_SCRIPT, str(r), *args] for r in range(2)]
    ranks = [subprocess.Popen(command, stderr=subprocess.PIPE, text=True) for command in commands]
    try:
        errors = [rank.communicate(timeout=120)[1] for rank in ranks]
    finally:
        for rank in ranks:
            rank.kill()  # only matters when one rank hangs on a collective
    assert all(rank.returncode == 0 for rank in ranks), "\n".join(errors)
    for r in range(2):
        result = torch.load(tmp_path / f"rank{r}.pt", weights_only=True)
        assert list(result["bare"]) == ["0", "2"]
        for wrapped in ("fsdp1", "fsdp2"):
            assert list(result[wrapped]) == ["0", "2"]
            for name, kernel in result[wrapped].items():
                assert torch.equal(kernel, result["bare"][name]), (wrapped, name)


def test_state_dict_and_checkpoint_files(tmp_path: Path) -> None:
    model = _net()
    expected = extract_depthwise(model)
    state_dict = model.state_dict()
    torch.save(state_dict, tmp_path / "plain.pt")
    torch.save(
        {"epoch": 3, "state_dict": {f"module.{k}": v for k, v in state_dict.items()}, "optimizer": {}},
        tmp_path / "wrapped.pth",
    )
    torch.save({"model": {f"_orig_mod.{k}": v.bfloat16() for k, v in state_dict.items()}}, tmp_path / "c.bin")
    for source in (state_dict, tmp_path / "plain.pt", str(tmp_path / "wrapped.pth")):
        kernels = extract_depthwise(source)
        assert list(kernels) == list(expected)
        for name, kernel in kernels.items():
            assert torch.equal(kernel, expected[name])
    half = extract_depthwise(tmp_path / "c.bin")
    assert list(half) == list(expected) and half["0"].dtype == torch.float32
    torch.testing.assert_close(half["0"], expected["0"], rtol=1e-2, atol=1e-2)
    assert list(load_checkpoint(tmp_path / "wrapped.pth")) == [f"module.{k}" for k in state_dict]


def test_dilated_conv_is_reported() -> None:
    model = nn.Sequential(nn.Conv2d(4, 4, 3, dilation=2, groups=4), nn.Conv2d(4, 4, 3, groups=4))
    kernels = extract_depthwise(model)
    assert list(kernels) == ["0", "1"]
    assert kernels.dilated == {"0": (2, 2)}


def test_unsupported_layers_are_listed_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    model = nn.Sequential(
        nn.Conv2d(4, 4, (1, 5), groups=4),
        nn.Conv2d(4, 4, 3, groups=4),
        nn.Conv3d(4, 4, 3, groups=4),
    )
    with caplog.at_level(logging.WARNING, logger="kernelwatch"):
        kernels = extract_depthwise(model)
    assert list(kernels) == ["1"]
    assert set(kernels.unsupported) == {"0", "2"}
    assert "1x5" in kernels.unsupported["0"] and "non-square" in kernels.unsupported["0"]
    assert "3-D" in kernels.unsupported["2"]
    warnings_logged = [r for r in caplog.records if r.name == "kernelwatch" and r.levelno == logging.WARNING]
    assert len(warnings_logged) == 1 and "1x5" in warnings_logged[0].getMessage()

    from_state_dict = extract_depthwise(model.state_dict())
    assert list(from_state_dict) == ["1"] and set(from_state_dict.unsupported) == {"0", "2"}
    assert "1x5" in from_state_dict.unsupported["0"]


def test_nan_and_inf_weights_are_returned_unchanged() -> None:
    model = _net()
    with torch.no_grad():
        model[0].weight[0].fill_(float("nan"))
        model[0].weight[1, 0, 0, 0] = float("inf")
    kernel = extract_depthwise(model)["0"]
    assert torch.isnan(kernel[0]).all() and kernel[1, 0, 0] == float("inf")
    torch.testing.assert_close(kernel, model[0].weight.detach().squeeze(1), equal_nan=True, rtol=0, atol=0)


def test_corrupt_file(tmp_path: Path) -> None:
    path = tmp_path / "random.pt"
    path.write_bytes(random.Random(0).randbytes(4096))
    with pytest.raises(KernelWatchError, match=r"cannot load checkpoint .*random\.pt.*corrupt"):
        extract_depthwise(path)


def test_truncated_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "truncated.pth"
    torch.save(_net().state_dict(), path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(KernelWatchError, match=r"cannot load checkpoint .*truncated\.pth.*truncated"):
        load_checkpoint(path)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(KernelWatchError, match=r"checkpoint not found: .*missing\.pt"):
        extract_depthwise(tmp_path / "missing.pt")


def test_checkpoint_without_tensors(tmp_path: Path) -> None:
    path = tmp_path / "meta.pt"
    torch.save({"epoch": 3, "lr": 0.1}, path)
    with pytest.raises(KernelWatchError, match=r"meta\.pt.* holds no tensors.*'epoch'"):
        extract_depthwise(path)
    with pytest.raises(KernelWatchError, match="holds no tensors"):
        extract_depthwise({"state_dict": {}})


def test_unsupported_input_type() -> None:
    with pytest.raises(KernelWatchError, match=r"nn\.Module, a state dict or a checkpoint path, got int"):
        extract_depthwise(3)
