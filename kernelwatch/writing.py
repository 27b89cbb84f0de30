"""Write kernelwatch records to TensorBoard event files (tensorboard's own writer, no TensorFlow).

Each call writes one event holding all its records, so a snapshot of a layer is in a file
entirely or (after a crash mid-write) not at all. :meth:`EventWriter.flush` returns once
everything written so far is in the file: a process killed afterwards leaves those records
readable, and TensorBoard's loaders skip a torn last record.

>>> import tempfile
>>> with tempfile.TemporaryDirectory() as log_dir, EventWriter(log_dir) as writer:
...     writer.write_quality(10, "stem.conv", {"sparsity": 0.0, "variance_entropy": 0.9, "orthogonality": 0.7})
...     writer.write_anomalies(10, [])
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.plugins.scalar import metadata as scalar_metadata
from tensorboard.summary.writer.event_file_writer import EventFileWriter
from tensorboard.util import tensor_util

from kernelwatch import format as fmt
from kernelwatch._config import CLUSTERS
from kernelwatch.errors import KernelWatchError
from kernelwatch.sprites import kernel_sprite, spectrum_strip

if TYPE_CHECKING:
    from kernelwatch.analysis import LayerReport
    from kernelwatch.classification import ClassificationResult
    from kernelwatch.spectrum import Spectrum

#: Bins of the code histogram over [0, 1].
CODE_BINS = 50
#: Figures of a layer also written as stock scalars (update-lens ones prefixed ``update.``).
_SCALAR_FIELDS = ("clustered_fraction", "median_dissimilarity", "null_clustered_fraction", "null_median_dissimilarity")


class EventWriter:
    """Writes kernelwatch records (and stock scalars) for one run into ``log_dir``.

    ``flush_secs`` bounds how long written records may wait in memory before reaching the
    file without an explicit :meth:`flush`.
    """

    def __init__(self, log_dir: str | Path, flush_secs: float = 120.0):
        self.log_dir = str(log_dir)
        try:
            self._writer = EventFileWriter(self.log_dir, flush_secs=flush_secs, filename_suffix=".kernelwatch")
        except OSError as err:
            raise KernelWatchError(f"cannot write TensorBoard events to {self.log_dir!r}: {err}") from err
        self._described: set[str] = set()
        self._spectra: set[int] = set()
        self._closed = False

    # -- records -------------------------------------------------------------------------------

    def write_layer(
        self,
        step: int,
        report: LayerReport,
        kernels: Any = None,
        max_kernels: int = 64,
        *,
        lens: str = fmt.WEIGHTS,
        order: int | None = None,
    ) -> None:
        """A depthwise layer's figures at ``step``: proportions, clustered fraction with the
        structure measures, total activation (weights lens only) and the matching stock
        scalars; with ``report.result``, also the code histogram and, when the layer's
        ``[C, k, k]`` ``kernels`` are given, the kernel sprite. ``lens`` says whether the
        kernels are the weights or the update since the run's first snapshot; ``order`` is
        the layer's position in the model."""
        layer = report.name
        proportions = np.array([report.proportions[c] for c in CLUSTERS], np.float32)
        clustered = np.array([getattr(report, name) for name in fmt.CLUSTERED_FIELDS], np.float64)
        prefix = "" if lens == fmt.WEIGHTS else f"{lens}."
        values = [
            self._tensor(fmt.PROPORTIONS, layer, proportions, lens, order),
            self._tensor(fmt.CLUSTERED_FRACTION, layer, clustered, lens, order),
            *(self._scalar(fmt.scalar_tag(prefix + name, layer), getattr(report, name)) for name in _SCALAR_FIELDS),
        ]
        if lens == fmt.WEIGHTS:
            values.append(self._tensor(fmt.TOTAL_ACTIVATION, layer, _activation(report), lens, order))
            values.extend(self._scalar(fmt.scalar_tag("proportion", layer, c), p) for c, p in zip(CLUSTERS, proportions))
        result = report.result
        if result is not None:
            values.append(self._tensor(fmt.CODE_HISTOGRAM, layer, _code_histogram(result), lens, order))
            if kernels is not None:
                details = {"dissimilarity": result.dissimilarity, "code": result.codes}
                png, layout = kernel_sprite(_numpy(kernels), result.labels, max_kernels=max_kernels, details=details)
                values.append(self._blobs(fmt.SPRITE, layer, [png, fmt.encode_json(layout)], lens=lens, order=order))
        self._write(step, values)

    def write_sprite(self, step: int, layer: str, kernels: Any, labels: Sequence[str], max_kernels: int = 64) -> None:
        """Only the kernel sprite of a layer (e.g. less often than the figures)."""
        png, layout = kernel_sprite(_numpy(kernels), labels, max_kernels=max_kernels)
        self._write(step, [self._blobs(fmt.SPRITE, layer, [png, fmt.encode_json(layout)])])

    def write_spectrum(self, step: int, spectrum: Spectrum, n: int = 24) -> bool:
        """The spectrum of one kernel size, once per writer: a strip of ``n`` prototypes and its
        labelled intervals. Returns False (writing nothing) if this size was written already."""
        k = spectrum.kernel_size
        if k in self._spectra:
            return False
        png, layout = spectrum_strip(spectrum.prototypes, spectrum.labels, n=n)
        for cell in layout["cells"]:
            cell["code"] = float(spectrum.codes[cell["index"]])
        info = {
            "kernel_size": k,
            "threshold": float(spectrum.threshold),
            "method": spectrum.method,
            "n_codes": spectrum.n_codes,
            "intervals": [{"label": label, "start": a, "end": b} for label, a, b in spectrum.intervals()],
            "strip": layout,
        }
        self._write(step, [self._blobs(fmt.SPECTRUM, None, [png, fmt.encode_json(info)], kernel_size=k)])
        self._spectra.add(k)
        return True

    def write_anomalies(self, step: int, anomalies: list[dict[str, Any]]) -> None:
        """The anomaly flags of a snapshot (see :func:`kernelwatch.format.check_anomalies`); an
        empty list records that the snapshot had none."""
        try:
            fmt.check_anomalies(anomalies)
            blob = fmt.encode_json(anomalies)
        except (TypeError, ValueError) as err:
            raise KernelWatchError(f"cannot write anomalies: {err}") from err
        self._write(step, [self._blobs(fmt.ANOMALIES, None, [blob])])

    def write_quality(
        self, step: int, layer: str, quality: Mapping[str, float], order: int | None = None
    ) -> None:
        """Quality metrics of any conv layer (:func:`kernelwatch.metrics.layer_quality`), also as
        stock scalars; ``order`` is the layer's position in the model."""
        missing = [m for m in fmt.QUALITY_METRICS if m not in quality]
        if missing:
            raise KernelWatchError(f"quality of {layer!r} lacks {missing}")
        values = np.array([quality[m] for m in fmt.QUALITY_METRICS], np.float64)
        self._write(
            step,
            [
                self._tensor(fmt.QUALITY, layer, values, order=order),
                *(self._scalar(fmt.scalar_tag("quality", layer, m), v) for m, v in zip(fmt.QUALITY_METRICS, values)),
            ],
        )

    # -- lifecycle -----------------------------------------------------------------------------

    def start_session(self, step: int) -> None:
        """Mark a (re)start at ``step``: TensorBoard then drops records of an earlier session
        from ``step`` on, so a run resumed from a checkpoint never shows the steps it redoes."""
        start = event_pb2.SessionLog(status=event_pb2.SessionLog.START)
        self._add(event_pb2.Event(wall_time=time.time(), step=int(step), session_log=start))

    def flush(self) -> None:
        """Block until everything written so far is in the event file (a no-op once closed)."""
        if not self._closed:
            self._writer.flush()

    def close(self) -> None:
        """Flush and close the file; later calls do nothing."""
        if not self._closed:
            self._closed = True
            self._writer.close()

    def __enter__(self) -> EventWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- helpers -------------------------------------------------------------------------------

    def _value(self, tag: str, metadata: summary_pb2.SummaryMetadata, tensor: Any) -> summary_pb2.Summary.Value:
        value = summary_pb2.Summary.Value(tag=tag, tensor=tensor)
        # Loaders take a series' metadata from its first event only, as TensorFlow writes it.
        if tag not in self._described:
            value.metadata.CopyFrom(metadata)
        return value

    def _tensor(
        self, kind: str, layer: str, array: np.ndarray, lens: str = fmt.WEIGHTS, order: int | None = None
    ) -> summary_pb2.Summary.Value:
        tag = fmt.make_tag(kind, layer, lens)
        metadata = fmt.summary_metadata(kind, layer, lens=lens, order=order)
        return self._value(tag, metadata, tensor_util.make_tensor_proto(array))

    def _blobs(
        self,
        kind: str,
        layer: str | None,
        blobs: list[bytes],
        kernel_size: int | None = None,
        lens: str = fmt.WEIGHTS,
        order: int | None = None,
    ) -> summary_pb2.Summary.Value:
        tag = fmt.make_tag(kind, kernel_size if kernel_size is not None else layer, lens)
        tensor = tensor_util.make_tensor_proto(np.array(blobs, dtype=object))
        return self._value(tag, fmt.summary_metadata(kind, layer, kernel_size, lens=lens, order=order), tensor)

    def _scalar(self, tag: str, number: float) -> summary_pb2.Summary.Value:
        metadata = scalar_metadata.create_summary_metadata(display_name=None, description=None)
        metadata.data_class = summary_pb2.DATA_CLASS_SCALAR
        return self._value(tag, metadata, tensor_util.make_tensor_proto(np.float32(number)))

    def _write(self, step: int, values: list[summary_pb2.Summary.Value]) -> None:
        if not isinstance(step, (int, np.integer)) or isinstance(step, bool):
            raise KernelWatchError(f"step must be an integer, got {step!r}")
        self._add(event_pb2.Event(wall_time=time.time(), step=int(step), summary=summary_pb2.Summary(value=values)))
        self._described.update(value.tag for value in values)

    def _add(self, event: event_pb2.Event) -> None:
        if self._closed:
            raise KernelWatchError(f"this EventWriter for {self.log_dir!r} is closed")
        try:
            self._writer.add_event(event)
        except OSError as err:
            raise KernelWatchError(f"cannot write TensorBoard events to {self.log_dir!r}: {err}") from err


def _activation(report: LayerReport) -> np.ndarray:
    """``[clusters, stats]`` of :data:`kernelwatch.format.ACTIVATION_STATS`; count 0 and NaN
    for clusters without kernels."""
    activation = np.full((len(CLUSTERS), len(fmt.ACTIVATION_STATS)), np.nan)
    activation[:, 0] = 0.0
    for i, cluster in enumerate(CLUSTERS):
        if cluster in report.total_activation:
            activation[i] = [report.total_activation[cluster][s] for s in fmt.ACTIVATION_STATS]
    return activation


def _code_histogram(result: ClassificationResult) -> np.ndarray:
    """Counts over [0, 1] of the nearest codes of clustered and of unclustered valid kernels."""
    rows = (result.clustered, result.valid & ~result.clustered)
    return np.stack([np.histogram(result.codes[r], bins=CODE_BINS, range=(0.0, 1.0))[0] for r in rows]).astype(np.int64)


def _numpy(kernels: Any) -> np.ndarray:
    if hasattr(kernels, "detach"):  # torch, without importing it
        kernels = kernels.detach().float().cpu().numpy()
    return np.asarray(kernels)
