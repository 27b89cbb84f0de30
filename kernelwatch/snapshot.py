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

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any

import torch

from kernelwatch.analysis import LayerReport, layer_report
from kernelwatch.anomalies import Anomaly, AnomalyDetector
from kernelwatch.errors import KernelWatchError
from kernelwatch.extraction import DepthwiseKernels
from kernelwatch.format import UPDATE, WEIGHTS
from kernelwatch.kernel_sizes import spectrum_size, unservable_reason
from kernelwatch.metrics import layer_quality
from kernelwatch.spectrum import Spectrum
from kernelwatch.structure import classify_many_with_null
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
class DetailCadence:
    """Which snapshots write the records that cost most to make: the kernel sprites (a PNG per
    layer and lens) and the quality metrics of every conv (products of all its filter pairs).
    Each series writes them at its first snapshot, then at every ``sprite_every``-th (and
    ``quality_every``-th) snapshot; 1 writes them at every snapshot.

    >>> cadence = DetailCadence(sprite_every=3)
    >>> [cadence.next().sprite("dw", "weights") for _ in range(7)]
    [True, False, False, True, False, False, True]
    """

    sprite_every: int = 1
    quality_every: int = 1
    snapshots: int = -1  # the snapshot being written, counted from 0
    _sprites: set[tuple[str, str]] = field(default_factory=set, repr=False)
    _quality: set[str] = field(default_factory=set, repr=False)

    def __post_init__(self) -> None:
        for name in ("sprite_every", "quality_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise KernelWatchError(f"{name} must be an integer >= 1, got {value!r}")

    def next(self) -> DetailCadence:
        """Move on to the next snapshot."""
        self.snapshots += 1
        return self

    def sprite(self, layer: str, lens: str) -> bool:
        return _due((layer, lens), self._sprites, self.snapshots % self.sprite_every == 0)

    def quality(self, layer: str) -> bool:
        return _due(layer, self._quality, self.snapshots % self.quality_every == 0)


def _due(key: Any, written: set[Any], scheduled: bool) -> bool:
    """Whether a series writes now: when scheduled, or when it never has."""
    if scheduled or key not in written:
        written.add(key)
        return True
    return False


@dataclass
class WrittenSnapshot:
    """What :func:`write_snapshot` analysed: per layer the weights lens and (after the
    reference step) the update lens, the anomalies, and the layers no spectrum serves (even sizes).
    ``deferred`` writes the sprites and quality metrics this snapshot skipped (its
    :class:`DetailCadence` said not now), at its step: for the run's last snapshot."""

    reports: dict[str, LayerReport] = field(default_factory=dict)
    updates: dict[str, LayerReport] = field(default_factory=dict)
    anomalies: list[Anomaly] = field(default_factory=list)
    no_spectrum: dict[str, int] = field(default_factory=dict)  # layer -> kernel size
    first_layer: FirstLayerReport | None = None
    first_layer_error: str | None = None  # why the stem had no report (NaN weights, ...)
    deferred: list[Callable[[], None]] = field(default_factory=list, repr=False)


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
    cadence: DetailCadence | None = None,
    on_device: Mapping[str, torch.Tensor] | None = None,
) -> WrittenSnapshot:
    """Write the snapshot at ``step``: per depthwise layer of ``kernels`` its spectrum (once per
    writer), the weights lens, and the update lens against ``reference``; the quality metrics
    of every conv weight in ``conv_weights`` (in model order: it gives each layer's position);
    with ``stem``, the first-layer lens of that conv against its sampled input patches; then
    the anomalies ``detector`` finds. Updates ``reference`` (the caller saves it) and
    ``detector``. ``cadence`` (default: everything at every snapshot) says which sprites and
    quality metrics to write now. ``on_device`` holds the same kernels (of some layers) where
    the model trains, e.g. on the GPU: they are classified there, the CPU copies only drawn.

    Every lens of every layer of one spectrum size is classified in one call, with their nulls.
    """
    cadence = (cadence or DetailCadence()).next()
    on_device = on_device or {}
    order = {name: i for i, name in enumerate(conv_weights)}
    written = WrittenSnapshot()
    # (layer, lens, kernels to classify, their CPU copy) per spectrum size, in model order.
    lenses: dict[int, list[tuple[str, str, torch.Tensor, torch.Tensor]]] = {}
    for name, layer in kernels.items():
        spectrum = spectra.get_for(layer.shape[-1])
        if spectrum is None:
            written.no_spectrum[name] = layer.shape[-1]
            continue
        here = on_device.get(name, layer)
        lenses.setdefault(spectrum.kernel_size, []).append((name, WEIGHTS, here, layer))
        update = reference.update(name, here, step)
        if update is not None:
            lenses[spectrum.kernel_size].append((name, UPDATE, update, update.cpu()))
    reports: dict[tuple[str, str], tuple[LayerReport, torch.Tensor]] = {}
    for size, items in lenses.items():
        classified = classify_many_with_null([item[2] for item in items], spectra.get_for(size))
        for (name, lens, _, cpu), (result, nulls, approach) in zip(items, classified):
            dilation, weights = kernels.dilated.get(name), lens == WEIGHTS
            report = layer_report(name, cpu, result, nulls, approach, dilation if weights else None, weights)
            reports[name, lens] = report, cpu
    for name, layer in kernels.items():
        if name in written.no_spectrum:
            continue
        writer.write_spectrum(step, spectra.get_for(layer.shape[-1]))
        for lens, by_layer in [(WEIGHTS, written.reports), (UPDATE, written.updates)]:
            if (name, lens) not in reports:
                continue
            report, cpu = reports[name, lens]
            by_layer[name] = report
            sprite = cadence.sprite(name, lens)
            writer.write_layer(
                step, report, cpu if sprite else None, max_kernels=max_kernels, lens=lens, order=order.get(name)
            )
            if not sprite:
                labels, where = report.result.labels, {"result": report.result, "lens": lens, "order": order.get(name)}
                written.deferred.append(partial(writer.write_sprite, step, name, cpu, labels, max_kernels, **where))
    for name, weight in conv_weights.items():
        if weight.is_meta:
            continue
        write = partial(_write_quality, writer, step, name, weight, order[name])
        if cadence.quality(name):
            write()
        else:
            written.deferred.append(write)
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


def _write_quality(writer: EventWriter, step: int, name: str, weight: torch.Tensor, order: int) -> None:
    writer.write_quality(step, name, layer_quality(weight), order=order)


__all__ = ["DetailCadence", "SpectrumCache", "StemInput", "WrittenSnapshot", "write_snapshot"]
