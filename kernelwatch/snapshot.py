"""Write one snapshot of a model's convolutions to a run: what :class:`~kernelwatch.KernelWatch`
writes at each scheduled step and ``kernelwatch analyze --log-dir`` at each checkpoint.

>>> import tempfile, torch
>>> from kernelwatch.anomalies import AnomalyDetector
>>> from kernelwatch.extraction import extract_depthwise
>>> from kernelwatch.update_lens import UpdateReference
>>> from kernelwatch.writing import EventWriter
>>> model = torch.nn.Sequential(torch.nn.Conv2d(8, 8, 5, groups=8), torch.nn.Conv2d(8, 4, 1))
>>> weights = {"0": model[0].weight, "1": model[1].weight}
>>> with tempfile.TemporaryDirectory() as log_dir, EventWriter(log_dir) as writer:
...     written = write_snapshot(
...         writer, 0, extract_depthwise(model), weights, SpectrumCache(), UpdateReference(), AnomalyDetector()
...     )
>>> list(written.reports), written.updates, written.no_spectrum
(['0'], {}, {})
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from kernelwatch.analysis import LayerReport, analyze_layer
from kernelwatch.anomalies import Anomaly, AnomalyDetector
from kernelwatch.errors import KernelWatchError
from kernelwatch.extraction import DepthwiseKernels
from kernelwatch.format import UPDATE
from kernelwatch.kernel_sizes import spectrum_size, unservable_reason
from kernelwatch.metrics import layer_quality
from kernelwatch.spectrum import Spectrum
from kernelwatch.update_lens import UpdateReference
from kernelwatch.writing import EventWriter

if TYPE_CHECKING:
    import numpy as np

    from kernelwatch.first_layer import FirstLayerReport


@dataclass(frozen=True)
class StemInput:
    """The model's stem, for the first-layer lens: its layer name (a key of the snapshot's
    conv weights), its stride, a sample of its input patches (None: the prior), and its
    weight at the previous snapshot (whose update since then the anomaly rule (e) reads)."""

    layer: str
    stride: tuple[int, int]
    patches: np.ndarray | None = None
    previous: torch.Tensor | None = None


class SpectrumCache(dict[int, Spectrum]):
    """The shipped spectra, each loaded once on first use; None for sizes none serves (even)."""

    def get_for(self, kernel_size: int) -> Spectrum | None:
        if unservable_reason(kernel_size):
            return None
        size = spectrum_size(kernel_size)
        if size not in self:
            self[size] = Spectrum.pretrained(size)
        return self[size]


@dataclass
class WrittenSnapshot:
    """What :func:`write_snapshot` analysed: per layer the weights lens and (after the
    reference step) the update lens, the anomalies, and the layers no spectrum serves (even sizes)."""

    reports: dict[str, LayerReport] = field(default_factory=dict)
    updates: dict[str, LayerReport] = field(default_factory=dict)
    anomalies: list[Anomaly] = field(default_factory=list)
    no_spectrum: dict[str, int] = field(default_factory=dict)  # layer -> kernel size
    first_layer: FirstLayerReport | None = None
    first_layer_error: str | None = None  # why the stem had no report (NaN weights, ...)


def write_snapshot(
    writer: EventWriter,
    step: int,
    kernels: DepthwiseKernels,
    conv_weights: Mapping[str, torch.Tensor],
    spectra: SpectrumCache,
    reference: UpdateReference,
    detector: AnomalyDetector,
    max_kernels: int = 64,
    stem: StemInput | None = None,
) -> WrittenSnapshot:
    """Write the snapshot at ``step``: per depthwise layer of ``kernels`` its spectrum (once per
    writer), the weights lens, and the update lens against ``reference``; the quality metrics
    of every conv weight in ``conv_weights`` (in model order: it gives each layer's position);
    with ``stem``, the first-layer lens of that conv against its sampled input patches; then
    the anomalies ``detector`` finds. Updates ``reference`` (the caller saves it) and
    ``detector``."""
    order = {name: i for i, name in enumerate(conv_weights)}
    written = WrittenSnapshot()
    for name, layer in kernels.items():
        spectrum = spectra.get_for(layer.shape[-1])
        if spectrum is None:
            written.no_spectrum[name] = layer.shape[-1]
            continue
        writer.write_spectrum(step, spectrum)
        report = written.reports[name] = analyze_layer(name, layer, spectrum, kernels.dilated.get(name))
        writer.write_layer(step, report, layer, max_kernels=max_kernels, order=order.get(name))
        update = reference.update(name, layer, step)
        if update is not None:
            written.updates[name] = analyze_layer(name, update, spectrum, activation=False)
            writer.write_layer(
                step, written.updates[name], update, max_kernels=max_kernels, lens=UPDATE, order=order.get(name)
            )
    for name, weight in conv_weights.items():
        if not weight.is_meta:
            writer.write_quality(step, name, layer_quality(weight), order=order[name])
    stem_update = None
    if stem is not None and not conv_weights[stem.layer].is_meta:
        from kernelwatch.first_layer import first_layer_report, reflections

        weight = conv_weights[stem.layer]
        try:
            written.first_layer = first_layer_report(weight, stem.patches, layer=stem.layer, stride=stem.stride)
            if stem.previous is not None and stem.previous.shape == weight.shape and not torch.equal(stem.previous, weight):
                stem_update = reflections((weight - stem.previous).numpy())
        except KernelWatchError as err:  # NaN weights: the invalid-kernel rule says so
            written.first_layer_error = f"first layer {stem.layer or '<root>'}: {err}"
        if written.first_layer is not None:
            writer.write_first_layer(step, weight, written.first_layer.to_json(), max_filters=max_kernels)
    written.anomalies = detector.update(
        step, written.reports, written.updates, first_layer=written.first_layer, stem_update=stem_update
    )
    writer.write_anomalies(step, [a.to_dict() for a in written.anomalies])
    return written


__all__ = ["SpectrumCache", "StemInput", "WrittenSnapshot", "write_snapshot"]
