"""A small, bounded sample of the inputs a model's stem sees while it trains, kept by a forward
pre-hook: the patches that the first-layer lens (:mod:`kernelwatch.first_layer`) measures the
stem's filters against, with no extra forward pass.

On every ``every``-th (by default second) call of the stem in training mode, the hook copies one crop of
``images`` consecutive images of the batch (a window of ``8 x 8`` of the stem's patch
positions, on its stride grid, at a random place) off the device: a view and one small copy,
non-blocking from CUDA (a CUDA event marks its end; the reader waits on it, never the
training thread). Crops go into a reservoir of at most ``max_patches / 64`` crops; once it is
full, each new crop replaces a random old one, so the sample follows the data over time
(a crop survives ``n`` later ones with probability ``(1 - 1/capacity)^n``). Its own random
generator: the training's random streams are untouched.

>>> import torch
>>> stem = torch.nn.Conv2d(3, 8, 4, stride=4)
>>> sampler = PatchSampler(stem, every=1)
>>> for _ in range(3):
...     _ = stem(torch.rand(4, 3, 64, 64))
>>> sample = sampler.sample()
>>> len(sample), tuple(sample.crops[0].shape)
(3, (2, 3, 32, 32))
>>> sampler.remove()
"""

from __future__ import annotations

import random
import threading
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from kernelwatch.errors import KernelWatchError

#: Patch positions along each side of a crop: 64 patches per crop.
POSITIONS = 8


@dataclass
class InputSample:
    """Crops of real inputs (CPU tensors ``[n, C, h, w]``, the input's dtype), each with the
    CUDA event that marks the end of its copy (None for CPU inputs)."""

    crops: list[torch.Tensor] = field(default_factory=list)
    copied: list[Any] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.crops)

    def images(self) -> list[torch.Tensor]:
        """The crops as float32, once their copies have completed (waits on the device)."""
        for event in self.copied:
            if event is not None:
                event.synchronize()
        return [crop.float() for crop in self.crops]


class PatchSampler:
    """Keep a reservoir of input crops of ``module`` (a conv) from its forward pre-hook; see
    the module's docstring. ``remove()`` takes the hook off."""

    def __init__(
        self, module: nn.Module, *, max_patches: int = 4096, every: int = 2, images: int = 2, seed: int = 0
    ):
        if not isinstance(module, nn.Conv2d):
            raise KernelWatchError(f"PatchSampler needs an nn.Conv2d, got {type(module).__name__}")
        if max_patches < POSITIONS**2 or every < 1 or images < 1:
            raise KernelWatchError(f"PatchSampler needs max_patches >= {POSITIONS**2}, every >= 1 and images >= 1")
        self.module = module
        self.every, self.images = int(every), int(images)
        (kh, kw), (sh, sw) = module.kernel_size, module.stride
        self.stride = (int(sh), int(sw))
        self.crop = ((POSITIONS - 1) * sh + kh, (POSITIONS - 1) * sw + kw)
        self.capacity = max(1, max_patches // (POSITIONS**2 * self.images))
        self.calls = 0  # training-mode calls of the stem seen
        self._entries: list[tuple[torch.Tensor, Any]] = []
        self._random = random.Random(seed)
        self._lock = threading.Lock()
        self._handle = module.register_forward_pre_hook(self._hook)

    def sample(self) -> InputSample:
        """The crops kept now (a copy of the list; the crops themselves are never changed)."""
        with self._lock:
            entries = list(self._entries)
        return InputSample([crop for crop, _ in entries], [event for _, event in entries])

    def remove(self) -> None:
        self._handle.remove()

    def _hook(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        if not module.training:
            return  # evaluation passes see other data
        self.calls += 1
        if (self.calls - 1) % self.every:
            return
        x = args[0] if args else None
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.is_meta or not x.is_floating_point():
            return
        n, _, height, width = x.shape
        if n == 0:
            return
        draw = self._random.randrange
        ch, cw = min(self.crop[0], height), min(self.crop[1], width)
        # On the stem's stride grid, so that the patches are those the stem sees.
        y = self.stride[0] * draw((height - ch) // self.stride[0] + 1)
        x0 = self.stride[1] * draw((width - cw) // self.stride[1] + 1)
        first = draw(max(n - self.images, 0) + 1)
        with torch.no_grad():
            view = x.detach()[first : first + self.images, :, y : y + ch, x0 : x0 + cw]
            crop, event = _off_device(view)
        with self._lock:
            if len(self._entries) < self.capacity:
                self._entries.append((crop, event))
            else:
                self._entries[draw(self.capacity)] = (crop, event)


def _off_device(view: torch.Tensor) -> tuple[torch.Tensor, Any]:
    """A CPU copy of ``view``; from CUDA into pinned memory without waiting, with the event
    that marks the end of the copy."""
    if view.device.type == "cuda":
        buffer = torch.empty(view.shape, dtype=view.dtype, pin_memory=True)
        buffer.copy_(view, non_blocking=True)
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(view.device))
        return buffer, event
    return view.to("cpu", copy=True, memory_format=torch.contiguous_format), None


def sample_patches(
    sample: InputSample, kernel_size: tuple[int, int], stride: tuple[int, int], limit: int = 4096
) -> np.ndarray | None:
    """The patches ``[N, C * kh * kw]`` of a sample's crops (at most ``limit``), or None when
    it has none. Runs :func:`kernelwatch.first_layer.image_patches` on each crop."""
    from kernelwatch.first_layer import image_patches

    per_crop = max(1, limit // max(len(sample), 1))
    parts = [image_patches(crop, kernel_size, stride, per_crop) for crop in sample.images()]
    parts = [p for p in parts if len(p)]
    return np.concatenate(parts)[:limit] if parts else None


__all__ = ["InputSample", "PatchSampler", "sample_patches"]
