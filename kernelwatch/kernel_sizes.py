"""Kernels of every odd size onto a shipped spectrum: natively, or through their central window.

3x3, 5x5 and 7x7 kernels have spectra of their own. Larger kernels go to the 7x7 spectrum: in
large kernels the pattern lives in a small central area (appendix I of the paper), so each layer
is read through the smallest central ``w x w`` window (``w >= 7``) that holds nearly all of its
structured energy, resampled to 7x7 when ``w > 7``. The window is chosen per layer, from the
layer's kernels, and reported as the layer's approach: ``"native"``, ``"centre 7x7 crop"`` or
``"centre 9x9 resampled to 7x7"``.

>>> import torch
>>> kernels = torch.zeros(4, 31, 31)
>>> kernels[:, 13:18, 13:18] = torch.randn(4, 5, 5)  # a pattern at the centre
>>> approach = choose_approach(kernels)
>>> approach.describe(), adapt(kernels, approach).shape
('centre 7x7 crop', torch.Size([4, 7, 7]))
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kernelwatch._config import SUPPORTED_KERNEL_SIZES
from kernelwatch.errors import KernelWatchError

#: Share of a layer's structured energy the chosen central window must hold.
WINDOW_ENERGY = 0.95


def unservable_reason(kernel_size: int) -> str | None:
    """Why no spectrum serves ``kernel_size`` kernels, or None when one does.

    >>> unservable_reason(9) is None, unservable_reason(4)[:36]
    (True, '4x4 kernels: no spectrum serves even')
    """
    if isinstance(kernel_size, int) and kernel_size >= 3 and kernel_size % 2 == 1:
        return None
    return (
        f"{kernel_size}x{kernel_size} kernels: no spectrum serves even sizes or sizes below 3 (the paper's "
        "patterns sit on a centre pixel that an even kernel lacks); every odd size >= 3 is served"
    )


def spectrum_size(kernel_size: int) -> int:
    """The size of the shipped spectrum that serves ``kernel_size`` kernels.

    >>> spectrum_size(5), spectrum_size(9), spectrum_size(51)
    (5, 7, 7)
    """
    reason = unservable_reason(kernel_size)
    if reason is not None:
        raise KernelWatchError(reason)
    return kernel_size if kernel_size in SUPPORTED_KERNEL_SIZES else max(SUPPORTED_KERNEL_SIZES)


@dataclass(frozen=True)
class SizeApproach:
    """How ``kernel_size`` kernels meet a ``target``-size spectrum: through their central
    ``window`` (the whole kernel when natively served), resampled when ``window > target``."""

    kernel_size: int
    window: int
    target: int

    def describe(self) -> str:
        if self.kernel_size == self.target:
            return "native"
        if self.window == self.target:
            return f"centre {self.window}x{self.window} crop"
        return f"centre {self.window}x{self.window} resampled to {self.target}x{self.target}"


def choose_approach(kernels: torch.Tensor) -> SizeApproach:
    """The approach for a layer of ``[N, K, K]`` kernels: the smallest odd central window of at
    least the spectrum's size that holds :data:`WINDOW_ENERGY` of the layer's structured energy.

    Energy is each kernel's centred, unit-norm square, averaged over the layer. For kernels at
    least twice the spectrum's size the median energy of the outermost ring counts as a noise
    floor and is taken off first, so that faint noise spread over a large kernel does not hide a
    small central pattern.
    """
    k = kernels.shape[-1]
    target = spectrum_size(k)
    if k == target:
        return SizeApproach(k, k, k)
    flat = kernels.detach().reshape(len(kernels), -1).double().cpu()
    flat = flat[torch.isfinite(flat).all(dim=1)]
    centred = flat - flat.mean(dim=1, keepdim=True)
    norm = centred.norm(dim=1, keepdim=True)
    centred = centred[norm[:, 0] > 0] / norm[norm[:, 0] > 0]
    if not len(centred):
        return SizeApproach(k, k, target)
    energy = centred.pow(2).mean(dim=0).reshape(k, k)
    if k >= 2 * target:
        ring = torch.cat([energy[0], energy[-1], energy[1:-1, 0], energy[1:-1, -1]])
        energy = (energy - ring.median()).clamp_min(0.0)
    total = float(energy.sum())
    if total <= 0:
        return SizeApproach(k, k, target)
    for window in range(target, k, 2):
        start = (k - window) // 2
        if float(energy[start : start + window, start : start + window].sum()) >= WINDOW_ENERGY * total:
            return SizeApproach(k, window, target)
    return SizeApproach(k, k, target)


def resample(kernels: torch.Tensor, size: int) -> torch.Tensor:
    """Resize ``[N, k, k]`` kernels to ``size`` with bicubic interpolation (corners aligned)."""
    out = torch.nn.functional.interpolate(
        kernels.to(torch.float32)[:, None], size=(size, size), mode="bicubic", align_corners=True
    )
    return out[:, 0]


def adapt(kernels: torch.Tensor, approach: SizeApproach) -> torch.Tensor:
    """``[N, K, K]`` kernels as the spectrum sees them under ``approach``: ``[N, t, t]``."""
    k = kernels.shape[-1]
    if k != approach.kernel_size:
        raise KernelWatchError(f"approach for {approach.kernel_size}x{approach.kernel_size} kernels, got {k}x{k}")
    if k == approach.target:
        return kernels
    start = (k - approach.window) // 2
    window = kernels[:, start : start + approach.window, start : start + approach.window]
    return window if approach.window == approach.target else resample(window, approach.target)


__all__ = ["SizeApproach", "adapt", "choose_approach", "resample", "spectrum_size", "unservable_reason"]
