"""Write kernelwatch records to TensorBoard event files (tensorboard's record framing, no TensorFlow).

Each call writes one event holding all its records, so a snapshot of a layer is in a file
entirely or (after a crash mid-write) not at all. Events are written synchronously by the
calling thread (no writer thread of TensorBoard's): a failed write (a full disk) raises
:class:`KernelWatchError` at that call, and the file is cut back to its last whole event, so
everything written before stays readable. Every write is in the file once the call returns: a
process killed afterwards leaves those records readable, and TensorBoard's loaders skip a torn
last record.

>>> import tempfile
>>> with tempfile.TemporaryDirectory() as log_dir, EventWriter(log_dir) as writer:
...     writer.write_quality(10, "stem.conv", {"sparsity": 0.0, "variance_entropy": 0.9, "orthogonality": 0.7})
...     writer.write_anomalies(10, [])
"""

from __future__ import annotations

import errno
import itertools
import os
import socket
import struct
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import google_crc32c
import numpy as np
from tensorboard.compat.proto import event_pb2, summary_pb2, tensor_pb2, tensor_shape_pb2, types_pb2
from tensorboard.plugins.scalar import metadata as scalar_metadata
from tensorboard.util import tensor_util

from kernelwatch import format as fmt
from kernelwatch._config import CLUSTERS
from kernelwatch.errors import KernelWatchError
from kernelwatch.sprites import filter_grid, kernel_sprite, spectrum_strip

if TYPE_CHECKING:
    from kernelwatch.analysis import LayerReport
    from kernelwatch.classification import ClassificationResult
    from kernelwatch.spectrum import Spectrum

#: Bins of the code histogram over [0, 1].
CODE_BINS = 50
_CODE_EDGES = np.linspace(0.0, 1.0, CODE_BINS + 1)


class EventWriter:
    """Writes kernelwatch records (and stock scalars) for one run into ``log_dir``, in a new
    event file ``events.out.tfevents.<time>.<host>.<pid>.<n>.kernelwatch``.

    Raises :class:`KernelWatchError` naming the directory if it cannot be created or written
    (the file's first event is written here). Records are never held back in memory: each
    write reaches the file before it returns. A ``log_dir`` whose path holds a character that
    TensorBoard's data server cannot read back in a run name (``"``, ``\\``, a control
    character) is refused: the dashboard could show none of its sprites, spectra or anomalies.
    """

    def __init__(self, log_dir: str | Path):
        self.log_dir = str(log_dir)
        self._closed = True  # until the file is open
        _check_log_dir(self.log_dir)
        try:
            os.makedirs(self.log_dir, exist_ok=True)
            self._file = _EventFile(self.log_dir)
        except OSError as err:
            raise KernelWatchError(f"cannot write TensorBoard events to {self.log_dir!r}: {err}") from err
        self._closed = False
        version = event_pb2.Event(
            wall_time=time.time(),
            file_version="brain.Event:2",
            source_metadata=event_pb2.SourceMetadata(writer="kernelwatch"),
        )
        try:
            self._add(version)
        except KernelWatchError:
            self._file.discard()
            self._closed = True
            raise
        self._described: set[str] = set()
        self._spectra: set[int] = set()

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
        structure measures, the nulls' proportions (when measured), total activation (weights
        lens only) and the matching stock scalars; with ``report.result``, also the code
        histogram and, when the layer's ``[C, k, k]`` ``kernels`` are given, the kernel sprite.
        ``lens`` says whether the kernels are the weights or the update since the run's first
        snapshot; ``order`` is the layer's position in the model."""
        layer = report.name
        proportions = np.array([report.proportions[c] for c in CLUSTERS], np.float32)
        clustered = np.array([getattr(report, name) for name in fmt.CLUSTERED_FIELDS], np.float64)
        prefix = "" if lens == fmt.WEIGHTS else f"{lens}."
        values = [
            self._tensor(fmt.PROPORTIONS, layer, proportions, lens, order),
            self._tensor(fmt.CLUSTERED_FRACTION, layer, clustered, lens, order),
            *(self._scalar(fmt.scalar_tag(prefix + name, layer), getattr(report, name)) for name in fmt.SCALAR_MEASURES),
        ]
        if report.null_proportions:
            nulls = [[report.null_proportions.get(null, {}).get(c, np.nan) for c in CLUSTERS] for null in fmt.NULLS]
            values.append(self._tensor(fmt.NULL_PROPORTIONS, layer, np.array(nulls, np.float32), lens, order))
        if lens == fmt.WEIGHTS:
            values.append(self._tensor(fmt.TOTAL_ACTIVATION, layer, _activation(report), lens, order))
            values.extend(self._scalar(fmt.scalar_tag("proportion", layer, c), p) for c, p in zip(CLUSTERS, proportions))
        result = report.result
        if result is not None:
            values.append(self._tensor(fmt.CODE_HISTOGRAM, layer, _code_histogram(result), lens, order))
            if kernels is not None:
                values.append(self._sprite(layer, kernels, result.labels, max_kernels, _details(result), lens, order))
        self._write(step, values)

    def write_sprite(
        self,
        step: int,
        layer: str,
        kernels: Any,
        labels: Sequence[str],
        max_kernels: int = 64,
        *,
        result: ClassificationResult | None = None,
        lens: str = fmt.WEIGHTS,
        order: int | None = None,
    ) -> None:
        """Only the kernel sprite of a layer (e.g. less often than the figures); with the
        layer's classification ``result``, the same sprite :meth:`write_layer` writes."""
        details = None if result is None else _details(result)
        self._write(step, [self._sprite(layer, kernels, labels, max_kernels, details, lens, order)])

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
            "intervals": [
                {"label": label, "start": a, "end": b, "threshold_min": low, "threshold_max": high}
                for (label, a, b), (low, high) in zip(spectrum.intervals(), spectrum.interval_thresholds())
            ],
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

    def write_first_layer(
        self, step: int, weight: Any, report: Mapping[str, Any], max_filters: int = 64
    ) -> None:
        """The first-layer lens of the model's stem at ``step``: its filters ``[out, in, kh,
        kw]`` as a picture and its report (``FirstLayerReport.to_json()``, validated here as a
        reader will), with the whitening score and the reflections also as stock scalars."""
        png, grid = filter_grid(_numpy(weight), max_filters=max_filters)
        blob = fmt.encode_json({**report, "grid": grid})
        try:
            checked = fmt.decode_blob(fmt.parse_metadata(fmt.summary_metadata(fmt.FIRST_LAYER, "")), "report", blob)
        except fmt.FormatError as err:
            raise KernelWatchError(f"cannot write the first-layer report: {err}") from err
        layer, reflections = checked["layer"], checked["reflections"]
        figures = {
            "whitening": checked["whitening"],
            "sharpness": reflections["sharpness"],
            "noise": reflections["noise"],
            **{f"colour.{c}": v for c, v in enumerate(reflections["colour"])},
        }
        self._write(
            step,
            [
                self._blobs(fmt.FIRST_LAYER, layer, [png, blob]),
                *(
                    self._scalar(fmt.scalar_tag(fmt.FIRST_LAYER, layer, name), value)
                    for name, value in figures.items()
                    if value is not None
                ),
            ],
        )

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
        """Everything written so far is in the event file already: each write reaches it before
        returning. Kept for callers that flush; never raises."""

    def close(self) -> None:
        """Close the file; later calls do nothing. :class:`KernelWatchError` if closing fails
        (the file is closed all the same)."""
        if not self._closed:
            self._closed = True
            try:
                self._file.close()
            except OSError as err:
                raise KernelWatchError(f"cannot close the event file in {self.log_dir!r}: {err}") from err

    def __enter__(self) -> EventWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- helpers -------------------------------------------------------------------------------

    def _value(
        self, tag: str, metadata: Callable[[], summary_pb2.SummaryMetadata], tensor: Any
    ) -> summary_pb2.Summary.Value:
        value = summary_pb2.Summary.Value(tag=tag, tensor=tensor)
        # Loaders take a series' metadata from its first event only, as TensorFlow writes it;
        # built only then (building it for every value was a tenth of a snapshot's CPU time).
        if tag not in self._described:
            value.metadata.CopyFrom(metadata())
        return value

    def _tensor(
        self, kind: str, layer: str, array: np.ndarray, lens: str = fmt.WEIGHTS, order: int | None = None
    ) -> summary_pb2.Summary.Value:
        tag = fmt.make_tag(kind, layer, lens)
        metadata = lambda: fmt.summary_metadata(kind, layer, lens=lens, order=order)  # noqa: E731
        return self._value(tag, metadata, tensor_proto(array))

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
        tensor = tensor_proto(np.array(blobs, dtype=object))
        return self._value(
            tag, lambda: fmt.summary_metadata(kind, layer, kernel_size, lens=lens, order=order), tensor
        )

    def _sprite(
        self,
        layer: str,
        kernels: Any,
        labels: Sequence[str],
        max_kernels: int,
        details: Mapping[str, np.ndarray] | None,
        lens: str,
        order: int | None,
    ) -> summary_pb2.Summary.Value:
        png, layout = kernel_sprite(_numpy(kernels), labels, max_kernels=max_kernels, details=details)
        return self._blobs(fmt.SPRITE, layer, [png, fmt.encode_json(layout)], lens=lens, order=order)

    def _scalar(self, tag: str, number: float) -> summary_pb2.Summary.Value:
        return self._value(tag, _scalar_metadata, tensor_proto(np.float32(number)))

    def _write(self, step: int, values: list[summary_pb2.Summary.Value]) -> None:
        if not isinstance(step, (int, np.integer)) or isinstance(step, bool):
            raise KernelWatchError(f"step must be an integer, got {step!r}")
        if not -(2**63) <= int(step) < 2**63:
            raise KernelWatchError(f"step {step} does not fit TensorBoard's int64 steps")
        self._add(event_pb2.Event(wall_time=time.time(), step=int(step), summary=summary_pb2.Summary(value=values)))
        self._described.update(value.tag for value in values)

    def _add(self, event: event_pb2.Event) -> None:
        if self._closed:
            raise KernelWatchError(f"this EventWriter for {self.log_dir!r} is closed")
        try:
            self._file.write(tf_record(event.SerializeToString()))
        except OSError as err:
            raise KernelWatchError(f"cannot write TensorBoard events to {self.log_dir!r}: {err}") from err


try:  # TensorBoard's own file counter: no name shared with its writers' files in this process
    from tensorboard.summary.writer.event_file_writer import _global_uid

    _next_file_number = _global_uid.get
except ImportError:  # pragma: no cover - a TensorBoard without it
    _file_numbers = itertools.count()
    _file_numbers_lock = threading.Lock()

    def _next_file_number() -> int:
        with _file_numbers_lock:
            return next(_file_numbers)


class _EventFile:
    """A new event file written with plain ``os.write`` calls.

    One ``write`` per event. A write that fails (``ENOSPC``, ``EFBIG``, ``EIO``) first cuts the
    file back to the end of the last whole event, then raises: a full disk leaves no torn
    record behind, and the events before it stay readable.
    """

    def __init__(self, log_dir: str):
        n = _next_file_number()
        name = f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}.{os.getpid()}.{n}.kernelwatch"
        self.path = os.path.join(log_dir, name)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0) | getattr(os, "O_CLOEXEC", 0)
        self._fd: int | None = os.open(self.path, flags, 0o666)
        self._size = 0  # bytes of whole events in the file

    def write(self, data: bytes) -> None:
        if self._fd is None:
            raise OSError("the event file is closed")
        view = memoryview(data)
        try:
            while view:
                written = os.write(self._fd, view)
                if written <= 0:
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                view = view[written:]
        except OSError:
            try:
                os.ftruncate(self._fd, self._size)
                os.lseek(self._fd, self._size, os.SEEK_SET)
            except OSError:
                pass  # TensorBoard's loaders skip a torn last record anyway
            raise
        self._size += len(data)

    def flush(self) -> None:
        pass  # os.write leaves nothing in this process

    def close(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)

    def __del__(self) -> None:
        try:
            self.close()
        except OSError:
            pass

    def discard(self) -> None:
        """Close and remove the file (its first event could not be written)."""
        try:
            self.close()
            os.unlink(self.path)
        except OSError:
            pass


def tf_record(data: bytes) -> bytes:
    """``data`` framed as a TFRecord, as TensorBoard's loaders read event files: its length,
    the length's masked CRC-32C, the data and the data's masked CRC-32C. (TensorBoard's own
    writer computes the CRCs in pure Python without TensorFlow: most of a snapshot's CPU time.)

    >>> from tensorboard.summary.writer.record_writer import RecordWriter
    >>> import io; buffer = io.BytesIO(); RecordWriter(buffer).write(b"event")
    >>> tf_record(b"event") == buffer.getvalue()
    True
    """
    length = struct.pack("<Q", len(data))
    return length + struct.pack("<I", _masked_crc(length)) + data + struct.pack("<I", _masked_crc(data))


def _scalar_metadata() -> summary_pb2.SummaryMetadata:
    metadata = scalar_metadata.create_summary_metadata(display_name=None, description=None)
    metadata.data_class = summary_pb2.DATA_CLASS_SCALAR
    return metadata


#: TensorFlow's dtype enum of the numpy dtypes kernelwatch writes.
_DTYPES = {
    np.dtype(np.float32): types_pb2.DT_FLOAT,
    np.dtype(np.float64): types_pb2.DT_DOUBLE,
    np.dtype(np.int64): types_pb2.DT_INT64,
}


def tensor_proto(array: Any) -> tensor_pb2.TensorProto:
    """``tensor_util.make_tensor_proto(array)``, the same bytes, without its generic checks for
    the arrays kernelwatch writes (float32 scalars, float32/float64/int64 arrays, arrays of
    bytes): those checks cost more than the rest of encoding a snapshot.

    >>> from tensorboard.util import tensor_util
    >>> all(tensor_proto(a) == tensor_util.make_tensor_proto(a) for a in
    ...     [np.float32(0.5), np.arange(6.0).reshape(2, 3), np.array([b"png", b"{}"], dtype=object)])
    True
    """
    array = np.asarray(array)
    dims = [tensor_shape_pb2.TensorShapeProto.Dim(size=n) for n in array.shape]
    shape = tensor_shape_pb2.TensorShapeProto(dim=dims)
    if array.dtype == object and all(isinstance(b, bytes) for b in array.flat):
        return tensor_pb2.TensorProto(dtype=types_pb2.DT_STRING, tensor_shape=shape, string_val=list(array.flat))
    dtype = _DTYPES.get(array.dtype)
    if array.ndim == 0 and dtype == types_pb2.DT_FLOAT:
        return tensor_pb2.TensorProto(dtype=dtype, tensor_shape=shape, float_val=[float(array)])
    if dtype is None or array.size <= 1:  # make_tensor_proto writes these as values, not content
        return tensor_util.make_tensor_proto(array)
    content = array.astype(array.dtype.newbyteorder("<")).tobytes()
    return tensor_pb2.TensorProto(dtype=dtype, tensor_shape=shape, tensor_content=content)


def _masked_crc(data: bytes) -> int:
    crc = google_crc32c.value(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _check_log_dir(log_dir: str) -> None:
    """Refuse a directory that TensorBoard's default loader could list but not serve blobs of:
    its run names are paths under ``--logdir``, and any directory of the path may become part of
    one, so every directory of the absolute path is checked.

    >>> _check_log_dir('runs/lr "0.1"')
    Traceback (most recent call last):
    ...
    kernelwatch.errors.KernelWatchError: cannot log to 'runs/lr "0.1"': the directory name 'lr "0.1"' holds '"', which TensorBoard's data server cannot read back in a run name, so the KernelWatch tab would show no sprites, spectra or anomalies of this run. Rename that directory without quotes, backslashes or control characters.
    """
    for part in Path(os.path.abspath(log_dir)).parts:
        char = fmt.unkeyable(part)
        if char is not None:
            raise KernelWatchError(
                f"cannot log to {log_dir!r}: the directory name {part!r} holds {char!r}, which TensorBoard's data "
                "server cannot read back in a run name, so the KernelWatch tab would show no sprites, spectra or "
                "anomalies of this run. Rename that directory without quotes, backslashes or control characters."
            )


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
    # np.histogram's bins ([a, b), the last [a, b]) found once for all kernels, then counted.
    bins = np.searchsorted(_CODE_EDGES, np.nan_to_num(result.codes, nan=-1.0), side="right") - 1
    bins[bins == CODE_BINS] = CODE_BINS - 1
    inside = (bins >= 0) & (bins < CODE_BINS)
    rows = (result.clustered, result.valid & ~result.clustered)
    return np.stack([np.bincount(bins[r & inside], minlength=CODE_BINS) for r in rows]).astype(np.int64)


def _details(result: ClassificationResult) -> dict[str, np.ndarray]:
    """The per-kernel numbers each sprite cell carries."""
    return {"dissimilarity": result.dissimilarity, "code": result.codes}


def _numpy(kernels: Any) -> np.ndarray:
    if hasattr(kernels, "detach"):  # torch, without importing it
        kernels = kernels.detach().float().cpu().numpy()
    return np.asarray(kernels)
