"""Find the depthwise convolutions of a model, state dict or checkpoint and copy out their kernels."""

from __future__ import annotations

import logging
import os
import pickle
import re
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from contextlib import nullcontext

import torch
from torch import nn

from kernelwatch.checkpoint_file import check_checkpoint_file, check_checksums
from kernelwatch.errors import KernelWatchError

logger = logging.getLogger("kernelwatch")

#: Keys under which training scripts commonly nest the state dict in a checkpoint.
_CHECKPOINT_KEYS: tuple[str, ...] = ("state_dict", "model", "model_state_dict", "module", "net")
#: Attributes through which torch.compile, FSDP1 and activation checkpointing hold the real model.
_WRAPPER_ATTRS = frozenset({"_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module"})
#: Wrappers that hold the real model as ``.module``.
_DATA_PARALLEL = (nn.DataParallel, nn.parallel.DistributedDataParallel)
#: Most values a depthwise weight may hold, far above real layers (2,048 channels of 31x31 kernels
#: hold 2M): a tiny file can declare an expanded or sparse tensor that would not fit in memory.
MAX_KERNEL_VALUES = 1 << 26

if torch.distributed.is_available():
    from torch.distributed.fsdp import FullyShardedDataParallel as _FSDP
    from torch.distributed.tensor import DTensor as _DTensor
else:  # builds without distributed support can hold neither FSDP wrappers nor DTensors
    _FSDP = _DTensor = ()


class DepthwiseKernels(OrderedDict[str, torch.Tensor]):
    """Layer name -> float32 CPU kernels ``[C, k, k]``, in registration order.

    ``dilated`` maps the names of dilated layers (kept, analysed on their k x k weights) to
    their dilation; ``unsupported`` maps the names of depthwise layers left out to the reason.
    """

    def __init__(self) -> None:
        super().__init__()
        self.dilated: dict[str, tuple[int, int]] = {}
        self.unsupported: dict[str, str] = {}

    def add(self, name: str, weight: torch.Tensor) -> None:
        """Record a full ``[C, 1, k, k]`` weight as kernels, or under ``unsupported`` with why."""
        reason = unsupported_reason(weight)
        if reason is not None:
            self.unsupported[name] = reason
            return
        if isinstance(weight, _DTensor):  # an FSDP2 state dict: gathering is a collective
            weight = weight.full_tensor()
        if weight.layout != torch.strided:  # e.g. a pruned checkpoint saved sparse
            weight = weight.to_dense()
        # A copy, so the snapshot neither changes with training nor outlives gathered FSDP storage.
        self[name] = (
            weight.detach()
            .to(device="cpu", dtype=torch.float32, memory_format=torch.contiguous_format, copy=True)
            .squeeze(1)
        )


def is_depthwise(module: nn.Module) -> bool:
    """Whether ``module`` is a 2-D depthwise convolution (depth multiplier ``out / in >= 1``).

    >>> is_depthwise(nn.Conv2d(8, 16, 3, groups=8)), is_depthwise(nn.Conv2d(8, 8, 3))
    (True, False)
    """
    return isinstance(module, nn.Conv2d) and _one_group_per_channel(module)


def is_depthwise_any(module: nn.Module) -> bool:
    """:func:`is_depthwise` for 2-D and 3-D convolutions (3-D ones are reported, not analysed)."""
    return isinstance(module, (nn.Conv2d, nn.Conv3d)) and _one_group_per_channel(module)


def _one_group_per_channel(conv: nn.Conv1d | nn.Conv2d | nn.Conv3d) -> bool:
    channels = conv.in_channels
    return channels > 1 and conv.groups == channels and conv.out_channels % channels == 0


def load_checkpoint(path: str | os.PathLike[str]) -> Mapping[str, torch.Tensor]:
    """Load the state dict of a ``.pt``/``.pth``/``.bin`` checkpoint on CPU, without running pickled code.

    A state dict nested under ``state_dict``, ``model``, ``model_state_dict``, ``module`` or
    ``net`` is unwrapped; entries that are not tensors are dropped. Files that are not
    ``torch.save`` checkpoints, and checkpoints holding Python objects other than tensors and
    containers, are refused with the reason in a :class:`KernelWatchError`.

    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     torch.save({"state_dict": nn.Conv2d(4, 4, 3, groups=4).state_dict()}, f"{tmp}/ckpt.pt")
    ...     sorted(load_checkpoint(f"{tmp}/ckpt.pt"))
    ['bias', 'weight']
    """
    name = os.fspath(path)
    check_checkpoint_file(name)
    check_checksums(name)
    try:
        content = _torch_load(name)
    except Exception as exc:  # torch.load reports damaged files through many unrelated exception types
        raise KernelWatchError(f"cannot load checkpoint {name!r}: {_load_failure_reason(exc)}") from exc
    return state_dict_of(content, f"checkpoint {name!r}")


def _torch_load(path: str) -> object:
    with warnings.catch_warnings():
        # torch's notices here (sparse-tensor validation, deprecated storages) say nothing about the file.
        warnings.simplefilter("ignore")
        return torch.load(path, map_location="cpu", weights_only=True)


def _load_failure_reason(exc: Exception) -> str:
    """A sentence for why torch.load failed on a file that starts like a checkpoint."""
    message = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
    if isinstance(exc, pickle.UnpicklingError) and "Weights only load failed" in message:
        culprit = re.search(r"GLOBAL ([\w.]+)", message)
        found = f" ({culprit.group(1)})" if culprit else ""
        return (
            f"it holds pickled Python objects{found} that only load with weights_only=False, which runs "
            "code from the file; kernelwatch never does: save the state dict alone, "
            "torch.save(model.state_dict(), PATH)"
        )
    detail = next((line.strip() for line in message.splitlines() if line.strip()), "")
    # torch's own words help when they form a sentence, not when they are a bare key such as "101".
    return "the file is truncated or damaged" + (f" ({detail[:200]})" if " " in detail else "")


def extract_depthwise(
    model_or_state_dict: nn.Module | Mapping[str, torch.Tensor] | str | os.PathLike[str],
) -> DepthwiseKernels:
    """Copy the kernels of every depthwise convolution out of a model, state dict or checkpoint path.

    Names are those of the bare model: ``module.``, ``_orig_mod.``, ``_fsdp_wrapped_module.``
    and ``_checkpoint_wrapped_module.`` wrapper levels (DDP, ``torch.compile``, FSDP, activation
    checkpointing) are left out. With FSDP (FSDP1 or FSDP2 ``fully_shard``) gathering the full
    weights is a collective: every rank must call this, in the same order.

    Without the model class, every ``[C, 1, kh, kw]`` (or 3-D ``[C, 1, d, kh, kw]``) entry with
    ``C > 1`` whose key ends in ``weight`` counts as depthwise; sparse ones are made dense. A state
    dict cannot tell dilation (``dilated`` stays empty) nor a regular convolution with one input
    channel from a depthwise one.

    Depthwise layers that cannot be analysed (non-square kernels, 1x1, 3-D convolutions, weights
    that are not floating point or declare more than ``MAX_KERNEL_VALUES`` values) are listed in
    ``.unsupported`` and logged in one WARNING. A model without depthwise convolutions
    gives an empty result. NaN/Inf weights are returned as they are.

    >>> model = nn.Sequential(nn.Conv2d(3, 3, 5, groups=3), nn.Conv2d(3, 8, 1))
    >>> kernels = extract_depthwise(model)
    >>> {name: tuple(k.shape) for name, k in kernels.items()}
    {'0': (3, 5, 5)}
    """
    if isinstance(model_or_state_dict, nn.Module):
        kernels = _from_module(model_or_state_dict)
    elif isinstance(model_or_state_dict, (str, os.PathLike)):
        kernels = _from_state_dict(load_checkpoint(model_or_state_dict))
    elif isinstance(model_or_state_dict, Mapping):
        kernels = _from_state_dict(state_dict_of(model_or_state_dict, "state dict"))
    else:
        raise KernelWatchError(
            "extract_depthwise expects an nn.Module, a state dict or a checkpoint path, "
            f"got {type(model_or_state_dict).__name__}"
        )
    if kernels.unsupported:
        logger.warning(
            "%d depthwise layer(s) left out: %s",
            len(kernels.unsupported),
            "; ".join(f"{name or '<root>'}: {reason}" for name, reason in kernels.unsupported.items()),
        )
    return kernels


def _from_module(model: nn.Module) -> DepthwiseKernels:
    kernels = DepthwiseKernels()
    for name, module, weight in iter_conv_weights(model, select=is_depthwise_any):
        kernels.add(name, weight)
        if name in kernels and any(d > 1 for d in module.dilation):
            kernels.dilated[name] = tuple(module.dilation)
    return kernels


def is_sharded(model: nn.Module) -> bool:
    """Whether some weights of ``model`` are sharded across ranks (FSDP1 wrappers, FSDP2 DTensors)."""
    return any(isinstance(m, _FSDP) for m in model.modules()) or any(
        isinstance(p, _DTensor) for p in model.parameters()
    )


def iter_conv_weights(
    model: nn.Module, select: Callable[[nn.Module], bool] | None = None
) -> Iterator[tuple[str, nn.Module, torch.Tensor]]:
    """``(bare name, module, full weight)`` of every convolution ``select`` accepts, in order.

    Sharded weights are gathered: with FSDP that is a collective, so every rank must run the
    iterator to its end, with the same ``select``. The weights are views, not copies.

    >>> model = nn.Sequential(nn.Conv2d(3, 3, 3, groups=3), nn.Conv2d(3, 8, 1))
    >>> [(name, tuple(w.shape)) for name, _, w in iter_conv_weights(model)]
    [('0', (3, 1, 3, 3)), ('1', (8, 3, 1, 1))]
    """
    has_fsdp1 = any(isinstance(module, _FSDP) for module in model.modules())
    # FSDP1 holds flat shards between forward passes; the layers' weights exist only once gathered.
    gathered = _FSDP.summon_full_params(model, writeback=False) if has_fsdp1 else nullcontext()
    with gathered:
        for name, module in bare_named_modules(model):
            if isinstance(module, nn.modules.conv._ConvNd) and (select is None or select(module)):
                weight = module.weight
                if isinstance(weight, _DTensor):
                    weight = weight.full_tensor()  # FSDP2: a collective, every rank in the same order
                yield name, module, weight


def bare_named_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``model.named_modules()`` with wrapper levels removed from the names."""
    bare_names: dict[str, str] = {}
    modules: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        modules[name] = module
        parent, _, attr = name.rpartition(".")
        if not name:
            bare_names[name] = ""
        elif attr in _WRAPPER_ATTRS or (attr == "module" and isinstance(modules[parent], _DATA_PARALLEL)):
            bare_names[name] = bare_names[parent]
        else:
            bare_names[name] = f"{bare_names[parent]}.{attr}" if bare_names[parent] else attr
        yield bare_names[name], module


def state_dict_of(content: object, source: str) -> Mapping[str, torch.Tensor]:
    unwrapped = set()  # a pickle can hold a dict inside itself
    while isinstance(content, Mapping) and id(content) not in unwrapped:
        unwrapped.add(id(content))
        key = next((k for k in _CHECKPOINT_KEYS if isinstance(content.get(k), Mapping)), None)
        if key is None:
            break
        content = content[key]
    tensors = (
        OrderedDict((k, v) for k, v in content.items() if isinstance(k, str) and isinstance(v, torch.Tensor))
        if isinstance(content, Mapping)
        else None
    )
    if not tensors:
        found = f"keys {list(content)[:8]}" if isinstance(content, Mapping) else type(content).__name__
        raise KernelWatchError(
            f"{source} holds no tensors: expected a state dict (name -> tensor), possibly under one of "
            f"{list(_CHECKPOINT_KEYS)}, got {found}"
        )
    return tensors


def _from_state_dict(state_dict: Mapping[str, torch.Tensor]) -> DepthwiseKernels:
    kernels = DepthwiseKernels()
    for key, weight in state_dict.items():
        shape = weight.shape
        # Non-float and 1x1 ones too, so that they are reported as left out rather than silently missed.
        per_channel = weight.ndim in (4, 5) and shape[0] > 1 and shape[1] == 1 and shape[2:].numel() > 0
        if key.endswith("weight") and per_channel:
            kernels.add(bare_key(key.removesuffix(".weight")), weight)
    return kernels


def bare_key(name: str) -> str:
    parts = name.split(".")
    # DDP and DataParallel only ever add "module." in front; a "module" deeper is a real layer name.
    while parts and (parts[0] in _WRAPPER_ATTRS or parts[0] == "module"):
        parts.pop(0)
    return ".".join(part for part in parts if part not in _WRAPPER_ATTRS)


def unsupported_reason(weight: torch.Tensor) -> str | None:
    """Why a depthwise weight cannot be analysed as k x k kernels, or None if it can.

    >>> unsupported_reason(torch.zeros(4, 1, 1, 5))
    'non-square kernel 1x5 (weight [4, 1, 1, 5]); only k x k kernels are analysed'
    >>> unsupported_reason(torch.zeros(4, 1, 1, 1))
    '1x1 kernel (weight [4, 1, 1, 1]) has no spatial pattern; spectra serve odd sizes >= 3'
    """
    shape = list(weight.shape)
    if weight.ndim == 5:
        return f"3-D depthwise convolution (weight {shape}); only 2-D kernels are analysed"
    if weight.is_meta:
        return f"weight {shape} is on the meta device and holds no values"
    if not weight.is_floating_point():
        return f"{weight.dtype} weight {shape}; only floating-point weights are analysed"
    if weight.numel() > MAX_KERNEL_VALUES:
        return f"weight {shape} declares {weight.numel():,} values, more than any real depthwise layer"
    kh, kw = weight.shape[2:]
    if kh != kw:
        return f"non-square kernel {kh}x{kw} (weight {shape}); only k x k kernels are analysed"
    if kh == 1:
        return f"1x1 kernel (weight {shape}) has no spatial pattern; spectra serve odd sizes >= 3"
    return None
