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

import torch

from kernelwatch.analysis import LayerReport, analyze_layer
from kernelwatch.anomalies import Anomaly, AnomalyDetector
from kernelwatch.extraction import DepthwiseKernels
from kernelwatch.format import UPDATE
from kernelwatch.kernel_sizes import spectrum_size, unservable_reason
from kernelwatch.metrics import layer_quality
from kernelwatch.spectrum import Spectrum
from kernelwatch.update_lens import UpdateReference
from kernelwatch.writing import EventWriter


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


def write_snapshot(
    writer: EventWriter,
    step: int,
    kernels: DepthwiseKernels,
    conv_weights: Mapping[str, torch.Tensor],
    spectra: SpectrumCache,
    reference: UpdateReference,
    detector: AnomalyDetector,
    max_kernels: int = 64,
) -> WrittenSnapshot:
    """Write the snapshot at ``step``: per depthwise layer of ``kernels`` its spectrum (once per
    writer), the weights lens, and the update lens against ``reference``; the quality metrics
    of every conv weight in ``conv_weights`` (in model order: it gives each layer's position);
    then the anomalies ``detector`` finds. Updates ``reference`` (the caller saves it) and
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
    written.anomalies = detector.update(step, written.reports, written.updates)
    writer.write_anomalies(step, [a.to_dict() for a in written.anomalies])
    return written


__all__ = ["SpectrumCache", "WrittenSnapshot", "write_snapshot"]
