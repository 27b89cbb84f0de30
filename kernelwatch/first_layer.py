"""The first-layer lens: what a network's stem filters say about the images it was trained on.

Two measures of the stem (the first convolution applied to the input):

- the **energy profile** (Chowers & Weiss, ICML 2023): the share of the filters' energy along
  each principal component of the input patches, beside the profile of a whitening filter bank
  for the same patches, and a **whitening** score of how far along the linear-systems
  trajectory towards that prediction the filters are (random initialisation: 0, whitened: 1);
- the **reflections** (Jorgenson et al., TAG-DS 2025): estimates of the training data's
  sharpness, noise and per-channel colour strength, from the weights alone.

Without a sample of patches the principal components come from a natural-image prior
(:func:`prior_pca`). See ``docs/first_layer.md`` for the method, the calibration and its limits.

>>> import torch, kernelwatch as kw
>>> stem = torch.nn.Conv2d(3, 16, 4, stride=4)
>>> report = kw.first_layer_report(stem.weight, stride=(4, 4))
>>> report.source, report.eigenvalues.shape, round(float(report.energy_profile.sum()), 6)
('prior', (48,), 1.0)
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from kernelwatch.errors import KernelWatchError
from kernelwatch.format import MAX_FIRST_LAYER_DIM, MAX_IN_CHANNELS, MAX_KERNEL_SIZE

#: Patches :func:`analyze_first_layer` samples from ``data``.
DEFAULT_PATCHES = 4096
#: Regularisation of the whitening prediction, relative to the mean eigenvalue: the components
#: far below it are mostly sensor noise and quantisation, and no finite training whitens them.
WHITENING_EPSILON = 0.01
#: The prior's correlation between any two input channels (RGB channels of photographs
#: correlate at about 0.9: most of their variation is luminance).
PRIOR_CHANNEL_CORRELATION = 0.9
#: The prior's power spectrum is ``1 / (f**2 + f0**2)`` (cycles/px), the classic natural-image
#: law; ``f0`` keeps the mean finite, at the scale of a 64-pixel field.
PRIOR_F0 = 1 / 64
#: Spatial frequencies (cycles/px) whose cross-channel agreement measures sharpness: where a
#: 1.5 px blur removes most of the signal and sharp images still carry some
#: (``benchmarks/validate_first_layer.py``).
SHARPNESS_BAND = (0.2, 0.3)


@dataclass(frozen=True)
class PatchPCA:
    """Principal components of input patches: ``eigenvalues`` ``[D]`` descending, ``eigenvectors``
    ``[D, D]`` (one per column). Computing it is the costly part of a report: callers measuring
    the same data again can keep it and pass it as ``patches`` to :func:`first_layer_report`."""

    eigenvalues: np.ndarray
    eigenvectors: np.ndarray
    n_patches: int
    source: str  # "data" or "prior"


@dataclass(frozen=True)
class FirstLayerReport:
    """What the stem's filters say; see :mod:`kernelwatch.first_layer` and ``docs/first_layer.md``.

    ``whitening`` in [0, 1] (:func:`whitening_score`): 0 for random filters, 1 once training has
    whitened every component; None when the eigenvalues are all equal (nothing to whiten).
    ``reflections`` (:func:`reflections`): ``sharpness`` and ``noise`` in [0, 1], ``colour``
    one value per input channel (mean 1).
    """

    layer: str
    in_channels: int
    kernel_size: tuple[int, int]
    stride: tuple[int, int]
    source: str
    n_patches: int
    eigenvalues: np.ndarray
    energy_profile: np.ndarray
    whitening_prediction: np.ndarray
    whitening: float | None
    reflections: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        """A plain dict of JSON types, with the fields' names."""
        return {
            "layer": self.layer,
            "in_channels": self.in_channels,
            "kernel_size": list(self.kernel_size),
            "stride": list(self.stride),
            "source": self.source,
            "n_patches": self.n_patches,
            "eigenvalues": self.eigenvalues.tolist(),
            "energy_profile": self.energy_profile.tolist(),
            "whitening_prediction": self.whitening_prediction.tolist(),
            "whitening": self.whitening,
            "reflections": {
                "sharpness": self.reflections["sharpness"],
                "noise": self.reflections["noise"],
                "colour": list(self.reflections["colour"]),
            },
        }


# -- finding the stem --------------------------------------------------------------------------


def find_stem(model: nn.Module) -> tuple[str, nn.Conv2d]:
    """The first 2-D convolution of ``model`` in registration order, which is the one applied
    to the input in ResNets, ConvNeXts, EfficientNets, ViT patch embeddings and timm models;
    its name without wrapper levels (DDP, ``torch.compile``, FSDP).

    >>> model = nn.Sequential(nn.Conv2d(3, 8, 4, stride=4), nn.Conv2d(8, 8, 7, groups=8))
    >>> find_stem(model)[0]
    '0'
    """
    from kernelwatch.extraction import bare_named_modules

    for name, module in bare_named_modules(model):
        if isinstance(module, nn.Conv2d):
            return name, module
    raise KernelWatchError(f"no nn.Conv2d in {type(model).__name__}: the first-layer lens needs a convolutional stem")


def stem_limit_reason(shape: tuple[int, ...], stride: tuple[int, int] = (1, 1)) -> str | None:
    """Why the lens reports no stem of weight ``shape`` ``[O, C, kh, kw]`` and ``stride``, or
    None. Its record holds at most :data:`~kernelwatch.format.MAX_IN_CHANNELS` channels,
    :data:`~kernelwatch.format.MAX_FIRST_LAYER_DIM` values per patch and sizes up to
    :data:`~kernelwatch.format.MAX_KERNEL_SIZE`; the principal components of ``D = C x kh x kw``
    values take ``D**2`` memory and ``D**3`` time (4x33x33: 31 s, 1x255x255: 31 GiB).

    >>> stem_limit_reason((40, 3, 4, 4), (4, 4)) is None
    True
    >>> print(stem_limit_reason((8, 4, 33, 33)))
    a 4x33x33 stem has 4,356 values per patch, over the first-layer lens's limit of 4,096
    """
    _, channels, kh, kw = (int(n) for n in shape)
    if channels > MAX_IN_CHANNELS:
        return f"a stem of {channels} input channels is over the first-layer lens's limit of {MAX_IN_CHANNELS}"
    if max(kh, kw, *stride) > MAX_KERNEL_SIZE:
        return f"a {kh}x{kw} stem of stride {tuple(stride)} is over the first-layer lens's limit of {MAX_KERNEL_SIZE}"
    dim = channels * kh * kw
    if dim > MAX_FIRST_LAYER_DIM:
        return (
            f"a {channels}x{kh}x{kw} stem has {dim:,} values per patch, over the first-layer lens's limit of "
            f"{MAX_FIRST_LAYER_DIM:,}"
        )
    return None


def _stem_of_state_dict(state_dict: Mapping[str, torch.Tensor]) -> tuple[str, torch.Tensor]:
    """The first ``[O, C, kh, kw]`` floating-point ``*weight`` entry: state dicts keep registration order."""
    from kernelwatch.extraction import bare_key

    for key, weight in state_dict.items():
        if key.endswith("weight") and weight.ndim == 4 and weight.is_floating_point():
            return bare_key(key.removesuffix(".weight")), weight
    raise KernelWatchError("the state dict holds no 4-D convolution weight: the first-layer lens needs a convolutional stem")


# -- patches and their principal components ------------------------------------------------------


def image_patches(
    images: torch.Tensor | np.ndarray,
    kernel_size: tuple[int, int],
    stride: tuple[int, int],
    limit: int,
    generator: torch.Generator | None = None,
) -> np.ndarray:
    """At most ``limit`` patches ``[N, C*kh*kw]`` (float32, in a conv weight's ``C, kh, kw``
    order) at random positions of the stride grid of ``images`` ``[N, C, H, W]``.

    Only the chosen patches are copied (gathered on the images' device), so a large batch
    costs little. Without ``generator``
    the choice is seeded (0) and the global random state is left alone: a training's batches
    do not change because it is being watched.

    >>> image_patches(torch.zeros(2, 3, 8, 8), (4, 4), (4, 4), limit=5).shape
    (5, 48)
    """
    x = torch.as_tensor(images).detach()
    if x.ndim != 4:
        raise KernelWatchError(f"images must be a batch [N, C, H, W], got shape {list(x.shape)}")
    kh, kw = kernel_size
    sy, sx = stride
    n, c, h, w = x.shape
    if h < kh or w < kw or n == 0:
        raise KernelWatchError(f"images {list(x.shape)} hold no {kh}x{kw} patch")
    if limit < 1:
        raise KernelWatchError(f"limit must be >= 1, got {limit}")
    ny, nx = (h - kh) // sy + 1, (w - kw) // sx + 1
    total = n * ny * nx
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    if total <= limit:
        index = torch.arange(total)
    elif total <= 16 * limit:
        index = torch.randperm(total, generator=generator)[:limit]
    else:  # a permutation of millions of positions would cost more than the patches; repeats are rare
        index = torch.randint(total, (limit,), generator=generator)
    image, rest = index // (ny * nx), index % (ny * nx)
    ys, xs = (rest // nx) * sy, (rest % nx) * sx
    rows = (ys[:, None, None] + torch.arange(kh)[None, :, None]).to(x.device)
    cols = (xs[:, None, None] + torch.arange(kw)[None, None, :]).to(x.device)
    # Gathered where the images are: only the patches cross to the CPU, not a GPU batch.
    patches = x[image[:, None, None].to(x.device), :, rows, cols]  # [L, kh, kw, C]: advanced indices first
    out = patches.permute(0, 3, 1, 2).reshape(len(index), c * kh * kw).to("cpu", torch.float32).numpy()
    if not np.isfinite(out).all():
        raise KernelWatchError("the images hold NaN or Inf values")
    return out


def patch_pca(patches: np.ndarray) -> PatchPCA:
    """Principal components of ``patches`` ``[N, D]`` (their covariance about the mean patch).

    >>> pca = patch_pca(np.random.default_rng(0).standard_normal((500, 12)))
    >>> pca.eigenvalues.shape, bool(np.all(np.diff(pca.eigenvalues) <= 0))
    ((12,), True)
    """
    x = np.asarray(patches, dtype=np.float64)
    if x.ndim != 2 or len(x) < 2:
        raise KernelWatchError(f"patches must be [N, D] with N >= 2, got shape {list(x.shape)}")
    if not np.isfinite(x).all():
        raise KernelWatchError("the patches hold NaN or Inf values")
    centred = torch.from_numpy(x - x.mean(0))
    return _pca((centred.T @ centred / (len(x) - 1)).numpy(), len(x), "data")


@functools.lru_cache(maxsize=32)
def prior_pca(in_channels: int, kernel_size: tuple[int, int]) -> PatchPCA:
    """Principal components of patches of a natural-image prior: a ``1 / f**2`` power spectrum
    (``f`` in cycles/px, ``f0 =`` :data:`PRIOR_F0`) in every channel, channels correlated at
    :data:`PRIOR_CHANNEL_CORRELATION`. Cached per shape.

    >>> pca = prior_pca(3, (5, 5))
    >>> pca.source, pca.eigenvalues.shape
    ('prior', (75,))
    """
    kh, kw = kernel_size
    grid = max(64, 2 * max(kh, kw))  # wider than the kernel, so lags do not wrap around
    f = np.fft.fftfreq(grid)
    power = 1.0 / (f[:, None] ** 2 + f[None, :] ** 2 + PRIOR_F0**2)
    lag = np.real(np.fft.ifft2(power))  # the stationary covariance at each (dy, dx) lag
    dy = np.subtract.outer(np.arange(kh), np.arange(kh))
    dx = np.subtract.outer(np.arange(kw), np.arange(kw))
    spatial = lag[dy[:, None, :, None], dx[None, :, None, :]].reshape(kh * kw, kh * kw)
    channels = np.full((in_channels, in_channels), PRIOR_CHANNEL_CORRELATION)
    np.fill_diagonal(channels, 1.0)
    return _pca(np.kron(channels, spatial), 0, "prior")


def _pca(covariance: np.ndarray, n: int, source: str) -> PatchPCA:
    # Linear algebra here is torch's, not numpy's: numpy's OpenBLAS threads spin on after each
    # call (35 ms of CPU per snapshot on the monitor's worker); torch's obey set_num_threads.
    values, vectors = (t.numpy() for t in torch.linalg.eigh(torch.from_numpy(covariance)))
    values = np.clip(values[::-1], 0.0, None)  # rounding can make the smallest slightly negative
    # A copy, not ascontiguousarray: numpy calls a reversed 1x1 array contiguous and keeps its
    # negative stride, which torch.tensor refuses (a 1x1 stem of one channel).
    vectors = vectors[:, ::-1].copy()
    for array in (values, vectors):  # shared by cached priors and by every report made from them
        array.setflags(write=False)
    return PatchPCA(values, vectors, n, source)


# -- the report --------------------------------------------------------------------------------


def first_layer_report(
    weight: torch.Tensor | np.ndarray,
    patches: np.ndarray | PatchPCA | None = None,
    layer: str = "",
    stride: tuple[int, int] = (1, 1),
) -> FirstLayerReport:
    """The report of a stem ``weight`` ``[O, C, kh, kw]``, measured against ``patches``
    (``[N, C*kh*kw]``, e.g. from :func:`image_patches`, or their :func:`patch_pca`) or,
    without them, against the natural-image prior.

    >>> w = np.random.default_rng(0).standard_normal((64, 3, 5, 5))
    >>> first_layer_report(w).whitening  # random filters: a flat profile
    0.0
    """
    w = _as_weight(weight)
    out_channels, in_channels, kh, kw = w.shape
    reason = stem_limit_reason(w.shape, stride)
    if reason is not None:
        raise KernelWatchError(reason)
    if patches is None:
        pca = prior_pca(in_channels, (kh, kw))
    elif isinstance(patches, PatchPCA):
        pca = patches
    else:
        pca = patch_pca(patches)
    dim = in_channels * kh * kw
    if pca.eigenvectors.shape != (dim, dim):
        raise KernelWatchError(
            f"patches of {len(pca.eigenvalues)} values do not fit a {in_channels}x{kh}x{kw} stem ({dim} values)"
        )
    energy = ((torch.from_numpy(w.reshape(out_channels, dim)) @ torch.tensor(pca.eigenvectors)) ** 2).sum(0).numpy()
    energy = energy / energy.sum()
    prediction = whitening_prediction(pca.eigenvalues)
    return FirstLayerReport(
        layer=layer,
        in_channels=in_channels,
        kernel_size=(kh, kw),
        stride=(int(stride[0]), int(stride[1])),
        source=pca.source,
        n_patches=pca.n_patches,
        eigenvalues=pca.eigenvalues,
        energy_profile=energy,
        whitening_prediction=prediction,
        whitening=whitening_score(energy, pca.eigenvalues, out_channels),
        reflections=reflections(w),
    )


def whitening_prediction(eigenvalues: np.ndarray) -> np.ndarray:
    """The energy profile of a whitening filter bank, ``1 / (lambda + eps)`` normalised to sum
    to 1 (``eps = WHITENING_EPSILON * mean(lambda)``): a bank ``W`` with ``W C W^T = I`` for the
    patch covariance ``C`` has energy ``1 / lambda_i`` along component ``i``."""
    values = np.asarray(eigenvalues, dtype=np.float64)
    inverse = 1.0 / (values + WHITENING_EPSILON * max(values.mean(), 1e-30))
    return inverse / inverse.sum()


def whitening_score(profile: np.ndarray, eigenvalues: np.ndarray, n_filters: int) -> float | None:
    """How far along the linear-systems trajectory towards whitening (Chowers & Weiss) a
    ``profile`` of ``n_filters`` filters is: 0 at initialisation, 1 once every component is whitened.

    Gradient descent moves a linear first layer along component ``i`` at a rate proportional to
    its eigenvalue ``lambda_i`` towards a whitening target of energy ``~ 1 / lambda_i``, so that
    after training time ``tau`` the profile is ``a + b * (1 - exp(-lambda_i tau))**2 / lambda_i``
    (a bump that moves from the high-variance components towards the low-variance ones). ``tau``,
    ``a`` and ``b >= 0`` are fitted to the profile; the score is the mean over the components of
    their progress ``1 - exp(-lambda_i tau)`` (components with ``lambda_i`` near 0 never progress),
    ramped down to 0 when the profile deviates from flat no more than a random bank of
    ``n_filters`` filters may. None without distinct eigenvalues.

    >>> lam = np.geomspace(10, 0.1, 20)
    >>> whitening_score(np.full(20, 0.05), lam, 64)
    0.0
    >>> bump = 0.2 + (1 - np.exp(-lam / lam.mean() * 2.0)) ** 2 / (lam / lam.mean())  # tau = 2
    >>> round(whitening_score(bump / bump.sum(), lam, 4096), 2), round(float(np.mean(1 - np.exp(-lam / lam.mean() * 2))), 2)
    (0.57, 0.57)
    """
    lam = np.asarray(eigenvalues, dtype=np.float64)
    if lam.max() - lam.min() <= 1e-12 * max(lam.max(), 1e-300):
        return None
    lam = lam / lam.mean()
    energy = np.asarray(profile, dtype=np.float64) * len(lam)  # mean 1
    deviation = float(((energy - 1.0) ** 2).sum())
    # A random bank's energies are chi-square with n_filters degrees of freedom (variance 2 / n
    # each, 2 D / n in all): up to twice that is noise (0), from three times on all signal (1).
    signal = float(np.clip(deviation / (2.0 * len(lam) / max(n_filters, 1)) - 2.0, 0.0, 1.0))
    if signal == 0.0:
        return 0.0
    progress = 1.0 - np.exp(-np.outer(_TAUS, lam))  # [taus, D]
    shape = progress**2 / np.maximum(lam, 1e-300)
    centred = shape - shape.mean(1, keepdims=True)
    b = centred @ (energy - 1.0) / np.maximum((centred**2).sum(1), 1e-300)
    residual = (((energy - 1.0) - b[:, None] * centred) ** 2).sum(1)
    residual[b <= 0] = deviation  # an inverted bump is no stage of the trajectory
    best = int(np.argmin(residual))
    if residual[best] >= deviation:
        return 0.0
    return float(progress[best].mean() * signal)


#: Training times tried by :func:`whitening_score`, in units of 1 / mean eigenvalue.
_TAUS = np.geomspace(1e-3, 1e4, 141)


# -- reflections -------------------------------------------------------------------------------


def reflections(weight: torch.Tensor | np.ndarray) -> dict[str, Any]:
    """Estimates of the training data's sharpness, noise and colour from stem weights
    ``[O, C, kh, kw]`` alone, each a departure from what random filters show. Compare them
    between stems of the same architecture (trainings, checkpoints of one run); see
    ``docs/first_layer.md`` for the calibration, the directions measured and where they fail.

    - ``sharpness`` in [0, 1]: how much the filters agree across input channels at fine
      scales (0.2 to 0.3 cycles/px), ``|sum_c W_c(f)|**2 / (C sum_c |W_c(f)|**2)``; random
      filters give ``1 / C``. Fine detail in the data teaches the stem luminance edges there;
      blurred data leaves that band near its random initialisation. With one input channel:
      the band's share of the filters' power (not calibrated).
    - ``noise`` in [0, 1]: ``(1 + r) / 2`` for ``r`` the filters' correlation between
      neighbouring pixels; random filters give 0.5. Measured: noisy data makes the filters
      smoother, not rougher (noise adds variance at high frequencies, and whitening filters
      weigh a component less the more variance it has).
    - ``colour``: per input channel, the inverse of the filters' share of response to a uniform
      offset of that channel, normalised to mean 1: a stronger channel gets smaller weights
      (whitening again), so a larger value.

    >>> r = reflections(np.random.default_rng(0).standard_normal((64, 3, 5, 5)))
    >>> round(r["sharpness"], 1), round(r["noise"], 1), len(r["colour"])
    (0.3, 0.5, 3)
    """
    w = _as_weight(weight)
    _, in_channels, kh, kw = w.shape
    size = max(16, 2 * max(kh, kw))  # zero-padded: a smooth spectrum, never a cropped kernel
    spectra = np.fft.fft2(w, s=(size, size))  # [O, C, size, size]
    f = np.fft.fftfreq(size)
    radius = np.hypot(f[:, None], f[None, :])
    high = (radius >= SHARPNESS_BAND[0]) & (radius < SHARPNESS_BAND[1])
    power = (np.abs(spectra) ** 2).sum(1)[:, high].sum()
    if in_channels > 1:
        coherent = (np.abs(spectra.sum(1)) ** 2)[:, high].sum()
        sharpness = coherent / (in_channels * power)
    else:
        total = np.abs(spectra) ** 2
        sharpness = power / (total.sum() - total[:, :, 0, 0].sum())
    pairs = (w[:, :, :, 1:] * w[:, :, :, :-1]).sum() + (w[:, :, 1:, :] * w[:, :, :-1, :]).sum()
    norms = (w[:, :, :, 1:] ** 2).sum() + (w[:, :, 1:, :] ** 2).sum()
    correlation = pairs / norms if norms > 0 else 0.0
    offsets = (w.sum((2, 3)) ** 2).sum(0) + 1e-12 * (w**2).sum()  # response to a uniform channel offset
    inverse = 1.0 / offsets
    colour = inverse / inverse.mean()
    return {
        "sharpness": float(sharpness),
        "noise": float((1.0 + correlation) / 2.0),
        "colour": [float(v) for v in colour],
    }


def _as_weight(weight: torch.Tensor | np.ndarray) -> np.ndarray:
    if isinstance(weight, torch.Tensor):
        weight = weight.detach().to(device="cpu", dtype=torch.float64).numpy()
    w = np.asarray(weight, dtype=np.float64)
    if w.ndim != 4:
        raise KernelWatchError(f"a stem weight is [out, in, kh, kw], got shape {list(w.shape)}")
    if w.size == 0:
        raise KernelWatchError(f"the stem weight {list(w.shape)} is empty")
    if not np.isfinite(w).all():
        raise KernelWatchError(f"the stem weight {list(w.shape)} holds NaN or Inf values")
    if not np.any(w):
        raise KernelWatchError(f"the stem weight {list(w.shape)} is all zero")
    return w


# -- models and checkpoints --------------------------------------------------------------------


def stem_weight(
    model_or_checkpoint: nn.Module | Mapping[str, torch.Tensor] | str | os.PathLike[str],
) -> tuple[str, torch.Tensor, tuple[int, int]]:
    """The stem of a model, state dict or checkpoint path: its name, weight and stride (1 for a
    state dict, which does not tell it)."""
    from kernelwatch.extraction import load_checkpoint, state_dict_of

    if isinstance(model_or_checkpoint, nn.Module):
        layer, conv = find_stem(model_or_checkpoint)
        return layer, conv.weight, tuple(conv.stride)
    if isinstance(model_or_checkpoint, (str, os.PathLike)):
        return (*_stem_of_state_dict(load_checkpoint(model_or_checkpoint)), (1, 1))
    if isinstance(model_or_checkpoint, Mapping):
        return (*_stem_of_state_dict(state_dict_of(model_or_checkpoint, "state dict")), (1, 1))
    raise KernelWatchError(
        "analyze_first_layer expects an nn.Module, a state dict or a checkpoint path, "
        f"got {type(model_or_checkpoint).__name__}"
    )


def analyze_first_layer(
    model_or_checkpoint: nn.Module | Mapping[str, torch.Tensor] | str | os.PathLike[str],
    data: torch.Tensor | np.ndarray | None = None,
) -> FirstLayerReport:
    """The :class:`FirstLayerReport` of the stem of a model, state dict or checkpoint path (as
    :func:`kernelwatch.analyze` takes), against patches of ``data`` ``[N, C, H, W]`` (the
    model's input, normalised as in training) or the natural-image prior.

    A state dict does not tell the stem's stride: 1 is assumed (patch statistics hardly depend
    on it). The stem is the first convolution in registration order.

    >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3, groups=8))
    >>> report = analyze_first_layer(model, torch.randn(4, 3, 16, 16))
    >>> report.layer, report.source, report.n_patches
    ('0', 'data', 784)
    """
    layer, weight, stride = stem_weight(model_or_checkpoint)
    if weight.is_meta:
        raise KernelWatchError(f"the stem {layer or '<root>'} is on the meta device and holds no values")
    if weight.layout != torch.strided:  # e.g. a pruned checkpoint saved sparse
        weight = weight.to_dense()
    patches = None
    if data is not None:
        data = torch.as_tensor(data)
        if data.ndim == 4 and data.shape[1] != weight.shape[1]:
            raise KernelWatchError(
                f"data has {data.shape[1]} channels, the stem {layer or '<root>'} takes {weight.shape[1]}"
            )
        patches = image_patches(data, tuple(weight.shape[2:]), stride, DEFAULT_PATCHES)
    try:
        return first_layer_report(weight, patches, layer=layer, stride=stride)
    except KernelWatchError as err:
        raise KernelWatchError(f"first layer {layer or '<root>'}: {err}") from err
