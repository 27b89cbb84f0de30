"""Checkpoints a user already has, as one run of the dashboard: ``kernelwatch analyze CKPT ...
--log-dir DIR``. Each checkpoint becomes a snapshot at its step, written as
:class:`~kernelwatch.KernelWatch` writes one (:func:`kernelwatch.snapshot.write_snapshot`):
both lenses (the update lens against the first checkpoint), sprites, spectra, quality metrics,
the first-layer lens of the stem (against the natural-image prior: a checkpoint holds no
inputs) and anomalies.

>>> import tempfile, torch
>>> from kernelwatch.summary import summarise
>>> model = torch.nn.Sequential(torch.nn.Conv2d(8, 8, 5, groups=8), torch.nn.Conv2d(8, 4, 1))
>>> with tempfile.TemporaryDirectory() as log_dir:
...     with CheckpointLog(log_dir) as run:
...         for step in (0, 10):
...             report = run.add(step, model.state_dict())
...     [point["step"] for point in summarise(log_dir)["runs"]["."]["layers"]["0"]["series"]]
[0, 10]
"""

from __future__ import annotations

import glob
import os
from typing import Any

import torch
from torch import nn

from kernelwatch.analysis import AnalysisReport
from kernelwatch.anomalies import Anomaly, AnomalyDetector
from kernelwatch.errors import KernelWatchError
from kernelwatch.extraction import (
    MAX_KERNEL_VALUES,
    DepthwiseKernels,
    bare_key,
    extract_depthwise,
    iter_conv_weights,
    load_checkpoint,
)
from kernelwatch.first_layer import find_stem
from kernelwatch.format import check_step
from kernelwatch.kernel_sizes import unservable_reason
from kernelwatch.snapshot import SpectrumCache, StemInput, write_snapshot
from kernelwatch.update_lens import REFERENCE_FILE, UpdateReference
from kernelwatch.writing import EventWriter


class CheckpointLog:
    """One run in ``log_dir`` (a new or empty directory) with a snapshot per :meth:`add`."""

    def __init__(self, log_dir: str | os.PathLike[str], max_kernels: int = 64):
        self.log_dir = os.fspath(log_dir)
        if glob.glob(os.path.join(glob.escape(self.log_dir), "events.out.tfevents.*")) or os.path.exists(
            os.path.join(self.log_dir, REFERENCE_FILE)
        ):
            raise KernelWatchError(f"{self.log_dir!r} holds a run already: pass a new directory for --log-dir")
        self.max_kernels = max_kernels
        self._writer = EventWriter(self.log_dir)
        self._spectra = SpectrumCache()
        self._reference = UpdateReference()
        self._detector = AnomalyDetector()
        self._last_step: int | None = None
        self._stem_previous: torch.Tensor | None = None
        self._kernel_sizes: dict[str, tuple[tuple[int, ...], int]] = {}  # each layer's first size and its step
        self.anomalies: list[Anomaly] = []

    def add(self, step: int, model_or_checkpoint: Any) -> AnalysisReport:
        """Write the snapshot of a model, state dict or checkpoint path at ``step`` (later than
        the previous one's); returns its weights-lens report."""
        step = check_step(step)
        if self._last_step is not None and step <= self._last_step:
            raise KernelWatchError(f"steps must increase: step {step} follows step {self._last_step}")
        kernels, conv_weights = _kernels_and_conv_weights(model_or_checkpoint)
        _check_analysable(kernels)
        self._check_kernel_sizes(step, kernels)
        if self._last_step is None:
            self._writer.start_session(step)
        stem = None
        name = next(iter(conv_weights), None)  # the first conv, in model (or state dict) order
        if name is not None and name not in kernels and name not in kernels.unsupported:  # not depthwise
            # A state dict does not tell the stride; patch statistics hardly depend on it.
            stride = (1, 1)
            if isinstance(model_or_checkpoint, nn.Module):
                stride = tuple(find_stem(model_or_checkpoint)[1].stride)
            stem = StemInput(name, stride, None, self._stem_previous)
            self._stem_previous = conv_weights[name]
        written = write_snapshot(
            self._writer, step, kernels, conv_weights, self._spectra, self._reference, self._detector, self.max_kernels,
            stem=stem,
        )
        if self._reference.changed:
            self._reference.save(self.log_dir)
        self._last_step = step
        self.anomalies.extend(written.anomalies)
        skipped = dict(kernels.unsupported)
        skipped.update((name, unservable_reason(k)) for name, k in written.no_spectrum.items())
        return AnalysisReport(list(written.reports.values()), skipped)

    def _check_kernel_sizes(self, step: int, kernels: DepthwiseKernels) -> None:
        """Refuse a checkpoint whose layer has other kernels than under the same name before:
        another architecture, whose figures would join the layer's timeline (a timeline never
        mixes kernel sizes; a watched training that changes them gets a series per size)."""
        sizes = {name: tuple(layer.shape[-2:]) for name, layer in kernels.items()}
        for name, size in sizes.items():
            first, at = self._kernel_sizes.get(name, (size, step))
            if first != size:
                raise KernelWatchError(
                    f"layer {name or '<root>'} has {size[0]}x{size[1]} kernels, but {first[0]}x{first[1]} at step {at}: "
                    "the checkpoints of one run must be of one architecture; write the others to a --log-dir of "
                    "their own"
                )
        for name, size in sizes.items():
            self._kernel_sizes.setdefault(name, (size, step))

    def close(self) -> None:
        self._writer.close()

    def __enter__(self) -> CheckpointLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _kernels_and_conv_weights(target: Any) -> tuple[DepthwiseKernels, dict[str, torch.Tensor]]:
    """The depthwise kernels of a model, state dict or checkpoint path, and every 2-D conv
    weight in model order (for the quality metrics and the layer order)."""
    if isinstance(target, nn.Module):
        convs = iter_conv_weights(target, select=lambda module: isinstance(module, nn.Conv2d))
        return extract_depthwise(target), {name: weight.detach() for name, _, weight in convs}
    state_dict = load_checkpoint(target) if isinstance(target, (str, os.PathLike)) else target
    conv_weights = {
        bare_key(key.removesuffix(".weight")): weight
        for key, weight in state_dict.items()
        if key.endswith("weight") and _is_plain_conv_weight(weight)
    }
    return extract_depthwise(state_dict), conv_weights


def _is_plain_conv_weight(weight: torch.Tensor) -> bool:
    return (
        weight.ndim == 4
        and weight.is_floating_point()
        and weight.layout == torch.strided
        and 0 < weight.numel() <= MAX_KERNEL_VALUES
    )


def _check_analysable(kernels: DepthwiseKernels) -> None:
    """Refuse a checkpoint without a layer to analyse before anything of it is written."""
    if not kernels and not kernels.unsupported:
        raise KernelWatchError(
            "no depthwise convolutions found (nn.Conv2d with groups == in_channels > 1, "
            "or [C, 1, k, k] weights in a checkpoint)"
        )
    if all(unservable_reason(layer.shape[-1]) for layer in kernels.values()):
        reasons = dict(kernels.unsupported)
        reasons.update((name, unservable_reason(layer.shape[-1])) for name, layer in kernels.items())
        first = next(iter(reasons.items()))
        raise KernelWatchError(
            f"no depthwise layer could be analysed: layer {first[0] or '<root>'}: {first[1]}"
            + (f"; and {len(reasons) - 1} more layer(s)" if len(reasons) > 1 else "")
        )


def log_checkpoints(
    checkpoints: list[Any], log_dir: str | os.PathLike[str], steps: list[int] | None = None
) -> list[AnalysisReport]:
    """Write ``checkpoints`` (models, state dicts or paths) as one run in ``log_dir``, at
    ``steps`` (default 0, 1, 2, ...); their weights-lens reports."""
    steps = list(range(len(checkpoints))) if steps is None else list(steps)
    if len(steps) != len(checkpoints):
        raise KernelWatchError(f"{len(steps)} steps for {len(checkpoints)} checkpoints")
    with CheckpointLog(log_dir) as run:
        return [run.add(step, checkpoint) for step, checkpoint in zip(steps, checkpoints)]


__all__ = ["CheckpointLog", "log_checkpoints"]
