"""The kernelwatch event format, shared by the writer and the TensorBoard plugin.

Torch-free on purpose: the plugin process imports this module and may have no torch. See
``docs/format.md`` for the full description of tags, record kinds and payloads.

>>> tag = make_tag(PROPORTIONS, "stages.0.blocks.1.conv_dw")
>>> tag, parse_tag(tag)
('kernelwatch/proportions/stages.0.blocks.1.conv_dw', Tag(kind='proportions', subject='stages.0.blocks.1.conv_dw', lens='weights'))
>>> info = parse_metadata(summary_metadata(PROPORTIONS, layer="stages.0.blocks.1.conv_dw", lens=UPDATE))
>>> info.kind, info.layer, info.lens, info.fields["clusters"][:2]
('proportions', 'stages.0.blocks.1.conv_dw', 'update', ['on-centre', 'off-centre'])
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple
from urllib.parse import unquote

import numpy as np
from tensorboard.compat.proto import summary_pb2

from kernelwatch._config import CLUSTERS
from kernelwatch.errors import KernelWatchError

PLUGIN_NAME = "kernelwatch"
#: Bump on any change an older reader would misread; adding optional JSON keys is no such change.
FORMAT_VERSION = 2
#: Versions this reader decodes. Version 1 lacks the lens, the layer order and the structure
#: measures of ``clustered_fraction`` records; they read back as ``weights``, None and None.
READABLE_VERSIONS = (1, 2)

# What a per-layer record describes: the kernels themselves, or the cumulative update since
# the run's first snapshot (``W_t - W_first``: what training wrote into them).
WEIGHTS = "weights"
UPDATE = "update"
LENSES = (WEIGHTS, UPDATE)

# Record kinds. Per layer (tensors): four figures from classification, plus quality metrics.
PROPORTIONS = "proportions"
CLUSTERED_FRACTION = "clustered_fraction"
TOTAL_ACTIVATION = "total_activation"
CODE_HISTOGRAM = "code_histogram"
QUALITY = "quality"
# Blob sequences: a layer's kernel sprite, a spectrum (per kernel size) and the run's anomalies.
SPRITE = "sprite"
SPECTRUM = "spectrum"
ANOMALIES = "anomalies"

TENSOR = summary_pb2.DATA_CLASS_TENSOR
BLOB_SEQUENCE = summary_pb2.DATA_CLASS_BLOB_SEQUENCE

#: Version 2 adds the kernel size and the structure measures: the median dissimilarity to the
#: nearest prototype and the null level (the same kernels spatially shuffled, classified).
CLUSTERED_FIELDS = (
    "clustered_fraction",
    "n_kernels",
    "n_invalid",
    "kernel_size",
    "median_dissimilarity",
    "null_clustered_fraction",
    "null_median_dissimilarity",
)
ACTIVATION_STATS = ("count", "mean", "q1", "median", "q3")
HISTOGRAM_ROWS = ("clustered", "unclustered")
QUALITY_METRICS = ("sparsity", "variance_entropy", "orthogonality")
SEVERITIES = ("info", "warning", "error")
ANOMALY_KEYS = ("layer", "kind", "severity", "message", "numbers")

#: Per kind: data class, what the tag's subject is, and the fixed content fields of version 1.
_KINDS: dict[str, tuple[int, str, dict[str, Any]]] = {
    PROPORTIONS: (TENSOR, "layer", {"clusters": list(CLUSTERS)}),
    CLUSTERED_FRACTION: (TENSOR, "layer", {"fields": list(CLUSTERED_FIELDS)}),
    TOTAL_ACTIVATION: (TENSOR, "layer", {"clusters": list(CLUSTERS), "stats": list(ACTIVATION_STATS)}),
    CODE_HISTOGRAM: (TENSOR, "layer", {"rows": list(HISTOGRAM_ROWS), "range": [0.0, 1.0]}),
    QUALITY: (TENSOR, "layer", {"metrics": list(QUALITY_METRICS)}),
    SPRITE: (BLOB_SEQUENCE, "layer", {"blobs": ["png", "layout"]}),
    SPECTRUM: (BLOB_SEQUENCE, "kernel_size", {"blobs": ["png", "info"]}),
    ANOMALIES: (BLOB_SEQUENCE, "none", {"blobs": ["anomalies"]}),
}
KINDS: tuple[str, ...] = tuple(_KINDS)
#: Kinds that the update lens writes too (its kernels' activation and quality mean nothing).
UPDATE_KINDS = (PROPORTIONS, CLUSTERED_FRACTION, CODE_HISTOGRAM, SPRITE)
#: The content fields naming each axis of a tensor record.
_TENSOR_AXES = {
    PROPORTIONS: ("clusters",),
    CLUSTERED_FRACTION: ("fields",),
    QUALITY: ("metrics",),
    TOTAL_ACTIVATION: ("clusters", "stats"),
    CODE_HISTOGRAM: ("rows",),
}


class FormatError(KernelWatchError):
    """A tag, metadata or payload that is not valid kernelwatch format (or from a newer version)."""


class Tag(NamedTuple):
    kind: str
    subject: str | None  # a layer name, "<k>x<k>" for a spectrum, None for anomalies
    lens: str = WEIGHTS


@dataclass(frozen=True)
class RecordInfo:
    """Parsed ``plugin_data.content``: the kind, its layer (or kernel size), per-kind fields,
    the lens of a per-layer record and the layer's position in the model (None if unknown)."""

    version: int
    kind: str
    layer: str | None
    kernel_size: int | None
    fields: dict[str, Any]
    lens: str = WEIGHTS
    order: int | None = None

    @property
    def data_class(self) -> int:
        return _KINDS[self.kind][0]


# -- tags ------------------------------------------------------------------------------------


def _escape(name: str) -> str:
    # Only "%", "/" and the quote and backslash TensorBoard's data server cannot read back in a
    # blob tag are escaped, so dotted module names stay readable in TensorBoard.
    return name.replace("%", "%25").replace("/", "%2F").replace('"', "%22").replace("\\", "%5C")


def make_tag(kind: str, subject: str | int | None = None, lens: str = WEIGHTS) -> str:
    """``kernelwatch/[update/]<kind>[/<subject>]``: subject is the layer's qualified name
    (``/``, ``%``, ``"`` and ``\\`` percent-escaped), the kernel size for a spectrum, nothing
    for anomalies; records of the update lens carry ``update/`` before their kind.

    >>> make_tag(SPECTRUM, 5), make_tag(ANOMALIES), make_tag(SPRITE, "odd/name", lens=UPDATE)
    ('kernelwatch/spectrum/5x5', 'kernelwatch/anomalies', 'kernelwatch/update/sprite/odd%2Fname')
    """
    scope = _kind(kind)[1]
    _check_lens(kind, lens)
    if lens == UPDATE:
        return f"{PLUGIN_NAME}/{UPDATE}/{kind}/{_escape(subject)}"
    if scope == "none":
        if subject is not None:
            raise FormatError(f"{kind} records take no subject, got {subject!r}")
        return f"{PLUGIN_NAME}/{kind}"
    if scope == "kernel_size":
        k = _kernel_size(subject)
        return f"{PLUGIN_NAME}/{kind}/{k}x{k}"
    if not isinstance(subject, str):
        raise FormatError(f"{kind} records need a layer name, got {subject!r}")
    return f"{PLUGIN_NAME}/{kind}/{_escape(subject)}"


def parse_tag(tag: str) -> Tag:
    """Inverse of :func:`make_tag`; :class:`FormatError` for anything else."""
    parts = tag.split("/")
    if len(parts) == 4 and parts[:2] == [PLUGIN_NAME, UPDATE] and parts[2] in UPDATE_KINDS:
        return Tag(parts[2], unquote(parts[3]), UPDATE)
    if parts[0] != PLUGIN_NAME or len(parts) not in (2, 3) or parts[1] not in _KINDS:
        raise FormatError(f"not a kernelwatch tag: {tag!r}")
    kind, scope = parts[1], _KINDS[parts[1]][1]
    if (scope == "none") != (len(parts) == 2):
        raise FormatError(f"malformed kernelwatch tag for {kind}: {tag!r}")
    return Tag(kind, unquote(parts[2]) if len(parts) == 3 else None)


def scalar_tag(figure: str, layer: str, name: str | None = None) -> str:
    """Tag of a stock scalar: ``kernelwatch.<figure>/<layer>[/<name>]``, so the Scalars
    dashboard groups each figure in a section of its own.

    >>> scalar_tag("proportion", "blocks.0.dw", "on-centre")
    'kernelwatch.proportion/blocks.0.dw/on-centre'
    """
    return f"{PLUGIN_NAME}.{figure}/{_escape(layer)}" + (f"/{name}" if name else "")


# -- metadata --------------------------------------------------------------------------------


def summary_metadata(
    kind: str,
    layer: str | None = None,
    kernel_size: int | None = None,
    *,
    lens: str = WEIGHTS,
    order: int | None = None,
) -> summary_pb2.SummaryMetadata:
    """``SummaryMetadata`` of a record: plugin name, JSON content and the matching data class.
    ``order`` is a per-layer record's position in the model, so readers list layers as the
    model does.

    >>> summary_metadata(SPECTRUM, kernel_size=5).data_class == BLOB_SEQUENCE
    True
    """
    data_class, scope, fields = _kind(kind)
    _check_lens(kind, lens)
    if (scope == "layer") != isinstance(layer, str):
        raise FormatError(f"{kind} records {'need a layer name' if scope == 'layer' else 'take no layer'}")
    if scope == "kernel_size":
        kernel_size = _kernel_size(kernel_size)
    elif kernel_size is not None:
        raise FormatError(f"{kind} records take no kernel size")
    content = {"version": FORMAT_VERSION, "kind": kind, "layer": layer, "kernel_size": kernel_size, **fields}
    if scope == "layer":
        content["lens"] = lens
        if order is not None:
            content["order"] = _order(order)
    return summary_pb2.SummaryMetadata(
        plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name=PLUGIN_NAME, content=encode_json(content)),
        data_class=data_class,
    )


def parse_metadata(metadata: summary_pb2.SummaryMetadata) -> RecordInfo:
    """Read back what :func:`summary_metadata` wrote; :class:`FormatError` when it is not
    kernelwatch content, is malformed, or comes from a newer format version."""
    if metadata.plugin_data.plugin_name != PLUGIN_NAME:
        raise FormatError(f"not kernelwatch metadata (plugin {metadata.plugin_data.plugin_name!r})")
    return parse_content(metadata.plugin_data.content, metadata.data_class)


def parse_content(content: bytes, data_class: int | None = None) -> RecordInfo:
    """Parse ``plugin_data.content`` alone, as a data provider's ``plugin_content`` gives it;
    with ``data_class`` (of the listing it came from), check that it matches the kind.

    >>> parse_content(b'{"version": 1, "kind": "anomalies", "blobs": ["anomalies"]}').kind
    'anomalies'
    """
    content = decode_json(content)
    if not isinstance(content, dict):
        raise FormatError("kernelwatch metadata content is not a JSON object")
    version = content.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise FormatError(f"kernelwatch metadata has no valid version: {version!r}")
    if version > max(READABLE_VERSIONS):
        raise FormatError(
            f"kernelwatch format version {version} is newer than this reader's ({FORMAT_VERSION}); "
            "upgrade kernelwatch to read it"
        )
    kind = content.get("kind")
    if kind not in _KINDS:
        raise FormatError(f"unknown kernelwatch record kind {kind!r}")
    expected, scope, fields = _KINDS[kind]
    if data_class is not None and data_class != expected:
        raise FormatError(f"{kind} record has data class {data_class}, expected {expected}")
    layer, kernel_size = content.get("layer"), content.get("kernel_size")
    if (scope == "layer") != isinstance(layer, str):
        raise FormatError(f"{kind} record has an invalid layer: {layer!r}")
    if (scope == "kernel_size") != isinstance(kernel_size, int):
        raise FormatError(f"{kind} record has an invalid kernel size: {kernel_size!r}")
    missing = [key for key in fields if not isinstance(content.get(key), list)]
    if missing:
        raise FormatError(f"{kind} record lacks fields {missing}")
    lens, order = content.get("lens", WEIGHTS), content.get("order")
    if lens not in LENSES or (lens == UPDATE and kind not in UPDATE_KINDS):
        raise FormatError(f"{kind} record has an invalid lens: {lens!r}")
    if order is not None and (not isinstance(order, int) or isinstance(order, bool) or order < 0):
        raise FormatError(f"{kind} record has an invalid layer order: {order!r}")
    return RecordInfo(version, kind, layer, kernel_size, {key: content[key] for key in fields}, lens, order)


# -- payloads --------------------------------------------------------------------------------


def encode_json(value: Any) -> bytes:
    """Compact UTF-8 JSON; numpy values become plain numbers, NaN/Inf become ``null``
    (browsers' ``JSON.parse`` rejects ``NaN``).

    >>> encode_json({"x": np.float32(0.5), "y": float("nan"), "z": (1, 2)})
    b'{"x":0.5,"y":null,"z":[1,2]}'
    """
    return json.dumps(_plain(value), allow_nan=False, separators=(",", ":")).encode()


def decode_json(data: bytes | str) -> Any:
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError) as err:
        raise FormatError(f"invalid JSON in kernelwatch record: {err}") from err


def check_anomalies(anomalies: Any) -> list[dict[str, Any]]:
    """Validate a list of anomaly flags: dicts with ``layer`` (str or None), ``kind``,
    ``severity`` (one of :data:`SEVERITIES`), ``message`` and ``numbers`` (name -> number or None).

    >>> flag = {"layer": "dw", "kind": "dead", "severity": "warning", "message": "m", "numbers": {"n": 3}}
    >>> check_anomalies([flag]) == [flag]
    True
    """
    if not isinstance(anomalies, list):
        raise FormatError(f"anomalies must be a list, got {type(anomalies).__name__}")
    for item in anomalies:
        if not isinstance(item, dict) or any(key not in item for key in ANOMALY_KEYS):
            raise FormatError(f"an anomaly must be a dict with keys {ANOMALY_KEYS}, got {item!r}")
        numbers = item["numbers"]
        ok = (
            (item["layer"] is None or isinstance(item["layer"], str))
            and isinstance(item["kind"], str)
            and item["severity"] in SEVERITIES
            and isinstance(item["message"], str)
            and isinstance(numbers, dict)
            and all(v is None or _is_number(v) for v in numbers.values())
        )
        if not ok:
            raise FormatError(f"malformed anomaly (severity must be one of {SEVERITIES}): {item!r}")
    return anomalies


def decode_blobs(info: RecordInfo, blobs: Sequence[bytes]) -> dict[str, Any]:
    """Name the blobs of a blob-sequence record; JSON blobs are parsed, ``png`` stays bytes.

    >>> decode_blobs(parse_metadata(summary_metadata(ANOMALIES)), [b"[]"])
    {'anomalies': []}
    """
    names = info.fields.get("blobs")
    if info.data_class != BLOB_SEQUENCE or names is None:
        raise FormatError(f"{info.kind} records are not blob sequences")
    if len(blobs) != len(names):
        raise FormatError(f"{info.kind} record has {len(blobs)} blobs, expected {len(names)} ({names})")
    out = {name: blob if name == "png" else decode_json(blob) for name, blob in zip(names, blobs)}
    if "anomalies" in out:
        check_anomalies(out["anomalies"])
    return out


def decode_tensor(info: RecordInfo, value: np.ndarray) -> dict[str, Any]:
    """Name the entries of a tensor record along the axes its metadata lists.

    Returns ``{cluster: share}``, ``{field: value}``, ``{metric: value}``, ``{cluster: {stat:
    value}}`` (clusters with no kernels left out) or ``{row: counts}`` (histogram rows). A
    ``clustered_fraction`` record has every field of :data:`CLUSTERED_FIELDS`, None where an
    older writer did not write it.

    >>> decode_tensor(parse_metadata(summary_metadata(QUALITY, layer="c")), np.array([0.0, 0.9, 0.7]))
    {'sparsity': 0.0, 'variance_entropy': 0.9, 'orthogonality': 0.7}
    """
    value = np.asarray(value)
    axes = _TENSOR_AXES.get(info.kind)
    if axes is None:
        raise FormatError(f"{info.kind} records are not tensors")
    expected = tuple(len(info.fields[axis]) for axis in axes)
    # A histogram's second axis is its bins, however many the writer chose.
    ndim = 2 if info.kind == CODE_HISTOGRAM else len(expected)
    if value.ndim != ndim or value.shape[: len(expected)] != expected:
        raise FormatError(f"{info.kind} record has shape {value.shape}, expected {expected} along {axes}")
    names = info.fields[axes[0]]
    if info.kind == CODE_HISTOGRAM:
        return {row: value[i] for i, row in enumerate(names)}
    if info.kind == TOTAL_ACTIVATION:
        stats = info.fields["stats"]
        return {c: dict(zip(stats, map(float, row))) for c, row in zip(names, value) if row[0] > 0}
    decoded = {name: float(v) for name, v in zip(names, value)}
    if info.kind == CLUSTERED_FRACTION:
        return {name: decoded.get(name) for name in CLUSTERED_FIELDS}
    return decoded


def _kind(kind: str) -> tuple[int, str, dict[str, Any]]:
    if kind not in _KINDS:
        raise FormatError(f"unknown kernelwatch record kind {kind!r}; expected one of {KINDS}")
    return _KINDS[kind]


def _check_lens(kind: str, lens: str) -> None:
    if lens not in LENSES:
        raise FormatError(f"unknown lens {lens!r}; expected one of {LENSES}")
    if lens == UPDATE and kind not in UPDATE_KINDS:
        raise FormatError(f"the update lens has no {kind} records (it has {UPDATE_KINDS})")


def _order(value: Any) -> int:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 0:
        raise FormatError(f"a layer's order must be an integer >= 0, got {value!r}")
    return int(value)


def _kernel_size(value: Any) -> int:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
        raise FormatError(f"kernel size must be a positive integer, got {value!r}")
    return int(value)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
