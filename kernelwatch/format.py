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
import re
import reprlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple
from urllib.parse import quote, unquote

import numpy as np
from tensorboard.compat.proto import summary_pb2

from kernelwatch._config import CLUSTERS
from kernelwatch.errors import KernelWatchError
from kernelwatch.sprites import PNG_SIGNATURE

PLUGIN_NAME = "kernelwatch"
#: Bump on any change an older reader would misread; adding optional JSON keys is no such change.
FORMAT_VERSION = 3
#: Versions this reader decodes. Version 1 lacks the lens, the layer order and the structure
#: measures of ``clustered_fraction`` records; they read back as ``weights``, None and None.
#: Version 2 lacks the smooth null (its figures read back as None) and ``null_proportions``.
READABLE_VERSIONS = (1, 2, 3)

# What a per-layer record describes: the kernels themselves, or the cumulative update since
# the run's first snapshot (``W_t - W_first``: what training wrote into them).
WEIGHTS = "weights"
UPDATE = "update"
LENSES = (WEIGHTS, UPDATE)

# Record kinds. Per layer (tensors): five figures from classification, plus quality metrics.
PROPORTIONS = "proportions"
CLUSTERED_FRACTION = "clustered_fraction"
NULL_PROPORTIONS = "null_proportions"
TOTAL_ACTIVATION = "total_activation"
CODE_HISTOGRAM = "code_histogram"
QUALITY = "quality"
# Blob sequences: a layer's kernel sprite, a spectrum (per kernel size), the run's anomalies
# and the first-layer lens of the model's stem (its filters as a picture, and its report).
SPRITE = "sprite"
SPECTRUM = "spectrum"
ANOMALIES = "anomalies"
FIRST_LAYER = "first_layer"

TENSOR = summary_pb2.DATA_CLASS_TENSOR
BLOB_SEQUENCE = summary_pb2.DATA_CLASS_BLOB_SEQUENCE

#: Version 2 adds the kernel size and the structure measures: the median dissimilarity to the
#: nearest prototype and the null level (the same kernels spatially shuffled, classified);
#: version 3 the smooth null (smooth random kernels of the layer's smoothness, classified).
CLUSTERED_FIELDS = (
    "clustered_fraction",
    "n_kernels",
    "n_invalid",
    "kernel_size",
    "median_dissimilarity",
    "null_clustered_fraction",
    "null_median_dissimilarity",
    "smooth_null_clustered_fraction",
    "smooth_null_median_dissimilarity",
)
#: The two nulls, in the rows of a ``null_proportions`` record (see :mod:`kernelwatch.structure`).
NULLS = ("shuffled", "smooth")
#: Figures of a ``clustered_fraction`` record also written as stock scalars (the heat map's
#: measures; update-lens ones prefixed ``update.``).
SCALAR_MEASURES = (
    "clustered_fraction",
    "median_dissimilarity",
    "null_clustered_fraction",
    "null_median_dissimilarity",
    "smooth_null_clustered_fraction",
    "smooth_null_median_dissimilarity",
)
ACTIVATION_STATS = ("count", "mean", "q1", "median", "q3")
HISTOGRAM_ROWS = ("clustered", "unclustered")
QUALITY_METRICS = ("sparsity", "variance_entropy", "orthogonality")
SEVERITIES = ("info", "warning", "error")
#: Steps are TensorBoard's int64 event steps, and not negative.
MAX_STEP = 2**63 - 1
ANOMALY_KEYS = ("layer", "kind", "severity", "message", "numbers")

#: Per kind: data class, what the tag's subject is, and its content fields in the current version.
_KINDS: dict[str, tuple[int, str, dict[str, Any]]] = {
    PROPORTIONS: (TENSOR, "layer", {"clusters": list(CLUSTERS)}),
    CLUSTERED_FRACTION: (TENSOR, "layer", {"fields": list(CLUSTERED_FIELDS)}),
    NULL_PROPORTIONS: (TENSOR, "layer", {"nulls": list(NULLS), "clusters": list(CLUSTERS)}),
    TOTAL_ACTIVATION: (TENSOR, "layer", {"clusters": list(CLUSTERS), "stats": list(ACTIVATION_STATS)}),
    CODE_HISTOGRAM: (TENSOR, "layer", {"rows": list(HISTOGRAM_ROWS), "range": [0.0, 1.0]}),
    QUALITY: (TENSOR, "layer", {"metrics": list(QUALITY_METRICS)}),
    SPRITE: (BLOB_SEQUENCE, "layer", {"blobs": ["png", "layout"]}),
    SPECTRUM: (BLOB_SEQUENCE, "kernel_size", {"blobs": ["png", "info"]}),
    ANOMALIES: (BLOB_SEQUENCE, "none", {"blobs": ["anomalies"]}),
    FIRST_LAYER: (BLOB_SEQUENCE, "layer", {"blobs": ["png", "report"]}),
}
KINDS: tuple[str, ...] = tuple(_KINDS)
#: The content fields an older version wrote differently; the others are as in the current one.
_OLDER_FIELDS: dict[int, dict[str, dict[str, Any]]] = {
    1: {CLUSTERED_FRACTION: {"fields": list(CLUSTERED_FIELDS[:3])}},
    2: {CLUSTERED_FRACTION: {"fields": list(CLUSTERED_FIELDS[:7])}},
}
#: The version that introduced each kind younger than version 1.
_SINCE = {NULL_PROPORTIONS: 3}
#: Kinds that the update lens writes too (its kernels' activation and quality mean nothing).
UPDATE_KINDS = (PROPORTIONS, CLUSTERED_FRACTION, NULL_PROPORTIONS, CODE_HISTOGRAM, SPRITE)
#: The content fields naming each axis of a tensor record.
_TENSOR_AXES = {
    PROPORTIONS: ("clusters",),
    CLUSTERED_FRACTION: ("fields",),
    NULL_PROPORTIONS: ("nulls", "clusters"),
    QUALITY: ("metrics",),
    TOTAL_ACTIVATION: ("clusters", "stats"),
    CODE_HISTOGRAM: ("rows",),
}

#: The blobs that are PNGs; the others are JSON.
PNG_BLOBS = ("png",)

# Bounds of what a reader accepts; a record outside them is a FormatError naming the bound, so
# that no record can exhaust the plugin or bloat its answers (docs/format.md, "Validation").
#: Bytes of a record's ``plugin_data.content``.
MAX_CONTENT_BYTES = 16 * 1024
#: Bytes of one JSON blob: a sprite layout, a spectrum info, or one snapshot's anomaly list.
MAX_JSON_BYTES = 512 * 1024
#: Nesting of any JSON value, checked before it is parsed (Python's parser recurses).
MAX_JSON_DEPTH = 32
#: Characters of a layer name, and of any other name in a record.
MAX_NAME_LENGTH = 1024
#: Characters of an anomaly's message.
MAX_TEXT_LENGTH = 4096
MAX_KERNEL_SIZE = 255
#: Entries of a first-layer report's profiles: a stem's ``in_channels x kh x kw``.
MAX_FIRST_LAYER_DIM = 4096
#: Input channels of a first-layer report (one colour reflection each).
MAX_IN_CHANNELS = 64
#: Where a first-layer report's patch statistics came from: sampled inputs, or the prior.
FIRST_LAYER_SOURCES = ("data", "prior")
MAX_HISTOGRAM_BINS = 1024
#: The only colours a reader passes on; any other (a CSS ``url()``, a name) becomes FALLBACK_COLOUR.
COLOUR = re.compile(r"#[0-9a-fA-F]{6}")
FALLBACK_COLOUR = "#999999"


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


#: Percent-escaped in a tag's layer: "%" and "/", so that tags parse, and the quote, backslash and
#: control characters, which TensorBoard's data server cannot read back in a blob key. Everything
#: else is kept, so that dotted module names stay readable in TensorBoard.
_ESCAPED = re.compile(r'[%/"\\\x00-\x1f\x7f-\x9f]')
#: What TensorBoard's data server (tensorboard-data-server 0.7.2) cannot read back in a blob key:
#: it parses the run and tag of a key without unescaping JSON, so it refuses these in either.
_UNKEYABLE = re.compile(r'["\\\x00-\x1f]')


def _escape(name: str) -> str:
    return _ESCAPED.sub(lambda match: quote(match.group(), safe=""), name)


def unkeyable(name: str) -> str | None:
    """The first character of a run or tag name that TensorBoard's data server cannot read back
    in a blob key (so it serves no sprite, spectrum or anomalies of that run or tag), or None.

    >>> unkeyable('runs/lr "0.1"'), unkeyable("runs/lr=0.1 ö")
    ('"', None)
    """
    match = _UNKEYABLE.search(name)
    return match.group() if match else None


def check_step(step: Any) -> int:
    """``step`` as an int, if it is an integer TensorBoard can hold as a step and not negative.

    >>> check_step(np.int64(3))
    3
    """
    if isinstance(step, bool) or not isinstance(step, (int, np.integer)):
        raise KernelWatchError(f"step must be an integer, got {step!r}")
    step = int(step)
    if not 0 <= step <= MAX_STEP:
        raise KernelWatchError(f"step must be >= 0 and < 2**63 (TensorBoard's steps are int64), got {step}")
    return step


def make_tag(kind: str, subject: str | int | None = None, lens: str = WEIGHTS) -> str:
    """``kernelwatch/[update/]<kind>[/<subject>]``: subject is the layer's qualified name
    (``/``, ``%``, ``"``, ``\\`` and control characters percent-escaped), the kernel size for a
    spectrum, nothing for anomalies; records of the update lens carry ``update/`` before their kind.

    >>> make_tag(SPECTRUM, 5), make_tag(ANOMALIES), make_tag(SPRITE, "odd/name\\x00", lens=UPDATE)
    ('kernelwatch/spectrum/5x5', 'kernelwatch/anomalies', 'kernelwatch/update/sprite/odd%2Fname%00')
    """
    scope = _kind(kind)[1]
    _check_lens(kind, lens)
    if lens == UPDATE:
        return f"{PLUGIN_NAME}/{UPDATE}/{kind}/{_escape(_layer(subject, kind))}"
    if scope == "none":
        if subject is not None:
            raise FormatError(f"{kind} records take no subject, got {subject!r}")
        return f"{PLUGIN_NAME}/{kind}"
    if scope == "kernel_size":
        k = _kernel_size(subject)
        return f"{PLUGIN_NAME}/{kind}/{k}x{k}"
    return f"{PLUGIN_NAME}/{kind}/{_escape(_layer(subject, kind))}"


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
    data_class, scope, _ = _kind(kind)
    _check_lens(kind, lens)
    if scope == "layer":
        layer = _layer(layer, kind)
    elif layer is not None:
        raise FormatError(f"{kind} records take no layer")
    if scope == "kernel_size":
        kernel_size = _kernel_size(kernel_size)
    elif kernel_size is not None:
        raise FormatError(f"{kind} records take no kernel size")
    content = {"version": FORMAT_VERSION, "kind": kind, "layer": layer, "kernel_size": kernel_size}
    content.update(content_fields(kind))
    if scope == "layer":
        content["lens"] = lens
        if order is not None:
            content["order"] = _order(order)
    return summary_pb2.SummaryMetadata(
        plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name=PLUGIN_NAME, content=encode_json(content)),
        data_class=data_class,
    )


def content_fields(kind: str, version: int = FORMAT_VERSION) -> dict[str, Any]:
    """The content fields of a ``kind`` record in format ``version``: the names of its axes or
    blobs (and a histogram's range), exactly as a writer of that version writes them.

    >>> content_fields(CLUSTERED_FRACTION, version=1)
    {'fields': ['clustered_fraction', 'n_kernels', 'n_invalid']}
    """
    return {**_kind(kind)[2], **_OLDER_FIELDS.get(version, {}).get(kind, {})}


def parse_metadata(metadata: summary_pb2.SummaryMetadata) -> RecordInfo:
    """Read back what :func:`summary_metadata` wrote; :class:`FormatError` when it is not
    kernelwatch content, is malformed, or comes from a newer format version."""
    if metadata.plugin_data.plugin_name != PLUGIN_NAME:
        raise FormatError(f"not kernelwatch metadata (plugin {_short(metadata.plugin_data.plugin_name)})")
    return parse_content(metadata.plugin_data.content, metadata.data_class)


def parse_content(content: bytes, data_class: int | None = None) -> RecordInfo:
    """Parse and validate ``plugin_data.content`` alone, as a data provider's ``plugin_content``
    gives it; with ``data_class`` (of the listing it came from), check that it matches the kind.
    Every field is checked against the schema of the record's version (:func:`check_fields`).

    >>> parse_content(b'{"version": 1, "kind": "anomalies", "blobs": ["anomalies"]}').kind
    'anomalies'
    """
    content = decode_json(content, MAX_CONTENT_BYTES)
    if not isinstance(content, dict):
        raise FormatError("kernelwatch metadata content is not a JSON object")
    version = content.get("version")
    if not _is_int(version) or version < 1:
        raise FormatError(f"kernelwatch metadata has no valid version: {_short(version)}")
    if version > max(READABLE_VERSIONS):
        raise FormatError(
            f"kernelwatch format version {_short(version)} is newer than this reader's ({FORMAT_VERSION}); "
            "upgrade kernelwatch to read it"
        )
    kind = content.get("kind")
    if not isinstance(kind, str) or kind not in _KINDS or version < _SINCE.get(kind, 1):
        raise FormatError(f"unknown kernelwatch record kind {_short(kind)} in format version {version}")
    expected, scope, _ = _KINDS[kind]
    if data_class is not None and data_class != expected:
        raise FormatError(f"{kind} record has data class {data_class}, expected {expected}")
    layer, kernel_size = content.get("layer"), content.get("kernel_size")
    if not (_is_name(layer) if scope == "layer" else layer is None):
        raise FormatError(f"{kind} record has an invalid layer (at most {MAX_NAME_LENGTH} characters): {_short(layer)}")
    if scope == "kernel_size":
        _kernel_size(kernel_size)
    elif kernel_size is not None:
        raise FormatError(f"{kind} record has an invalid kernel size: {_short(kernel_size)}")
    fields = check_fields(kind, version, content)
    lens, order = content.get("lens", WEIGHTS), content.get("order")
    if not isinstance(lens, str) or lens not in LENSES or (lens == UPDATE and kind not in UPDATE_KINDS):
        raise FormatError(f"{kind} record has an invalid lens: {_short(lens)}")
    if order is not None and (not _is_int(order) or not 0 <= order < 2**31):
        raise FormatError(f"{kind} record has an invalid layer order: {_short(order)}")
    return RecordInfo(version, kind, layer, kernel_size, fields, lens, order)


def check_fields(kind: str, version: int, content: Mapping[str, Any]) -> dict[str, Any]:
    """The content fields of a record: each must hold exactly the names its kind has in its
    version, in any order (readers take the order from the record, not from their constants),
    and a histogram's range must be ``[0, 1]``.

    >>> check_fields(QUALITY, 2, {"metrics": ["orthogonality", "sparsity", "variance_entropy"]})
    {'metrics': ['orthogonality', 'sparsity', 'variance_entropy']}
    >>> check_fields(QUALITY, 2, {"metrics": [{"a": 1}]})
    Traceback (most recent call last):
    ...
    kernelwatch.format.FormatError: quality record's metrics must be ['sparsity', 'variance_entropy', 'orthogonality'] in any order, got [{'a': 1}]
    """
    known = content_fields(kind, version)
    missing = [key for key in known if key not in content]
    if missing:
        raise FormatError(f"{kind} record lacks fields {missing}")
    for key, names in known.items():
        value = content[key]
        ok = isinstance(value, list) and len(value) == len(names)
        if ok and all(isinstance(name, str) for name in names):
            ok = all(isinstance(v, str) for v in value) and set(value) == set(names)
        elif ok:
            ok = all(_is_number(v) for v in value) and value == names
        if not ok:
            order = " in any order" if all(isinstance(name, str) for name in names) else ""
            raise FormatError(f"{kind} record's {key} must be {names}{order}, got {_short(value)}")
    return {key: content[key] for key in known}


# -- payloads --------------------------------------------------------------------------------


def encode_json(value: Any) -> bytes:
    """Compact UTF-8 JSON; numpy values become plain numbers, NaN/Inf become ``null``
    (browsers' ``JSON.parse`` rejects ``NaN``).

    >>> encode_json({"x": np.float32(0.5), "y": float("nan"), "z": (1, 2)})
    b'{"x":0.5,"y":null,"z":[1,2]}'
    """
    try:  # the C encoder, when there is no NaN or Inf to replace (most answers)
        return json.dumps(value, allow_nan=False, separators=(",", ":"), default=_numpy_value).encode()
    except (ValueError, TypeError):
        return json.dumps(_plain(value), allow_nan=False, separators=(",", ":")).encode()


def decode_json(data: bytes | str, limit: int = MAX_JSON_BYTES) -> Any:
    """Parse UTF-8 JSON of at most ``limit`` bytes and :data:`MAX_JSON_DEPTH` levels;
    :class:`FormatError` for anything else."""
    if isinstance(data, str):
        data = data.encode("utf-8", "surrogatepass")
    if not isinstance(data, bytes):
        raise FormatError(f"expected JSON bytes in kernelwatch record, got {type(data).__name__}")
    check_size(data, limit)
    check_depth(data)
    try:
        return json.loads(data.decode("utf-8"))
    except ValueError as err:  # UnicodeDecodeError and JSONDecodeError
        raise FormatError(f"invalid JSON in kernelwatch record: {str(err)[:200]}") from err


def check_size(data: bytes, limit: int) -> None:
    """Refuse a JSON blob or metadata content over ``limit`` bytes before reading it."""
    if len(data) > limit:
        raise FormatError(f"kernelwatch record holds {len(data):,} bytes of JSON, over the limit of {limit:,}")


_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_OPENING, _CLOSING = np.frombuffer(b"[{", np.uint8), np.frombuffer(b"]}", np.uint8)


def check_depth(data: bytes, limit: int = MAX_JSON_DEPTH) -> None:
    """Refuse JSON nested more than ``limit`` deep before it is parsed: Python's parser
    recurses, and 2 KB of brackets raise RecursionError. Brackets inside strings do not count.

    >>> check_depth(b'{"a": [[1], "[[[["]}', limit=3)
    >>> check_depth(b"[" * 40 + b"]" * 40)
    Traceback (most recent call last):
    ...
    kernelwatch.format.FormatError: kernelwatch record holds JSON nested 40 deep, over the limit of 32
    """
    if data.count(b"[") + data.count(b"{") <= limit:
        return
    codes = np.frombuffer(_JSON_STRING.sub(b"", data), np.uint8)
    depth = int(np.cumsum(np.isin(codes, _OPENING).astype(np.int64) - np.isin(codes, _CLOSING)).max(initial=0))
    if depth > limit:
        raise FormatError(f"kernelwatch record holds JSON nested {depth} deep, over the limit of {limit}")


def check_anomalies(anomalies: Any) -> list[dict[str, Any]]:
    """Validate a list of anomaly flags: dicts with ``layer`` (str or None), ``kind``,
    ``severity`` (one of :data:`SEVERITIES`), ``message`` and ``numbers`` (name -> number or None),
    its names at most :data:`MAX_NAME_LENGTH` and its message :data:`MAX_TEXT_LENGTH` characters.

    >>> flag = {"layer": "dw", "kind": "dead", "severity": "warning", "message": "m", "numbers": {"n": 3}}
    >>> check_anomalies([flag]) == [flag]
    True
    """
    if not isinstance(anomalies, list):
        raise FormatError(f"anomalies must be a list, got {type(anomalies).__name__}")
    for item in anomalies:
        if not isinstance(item, dict) or any(key not in item for key in ANOMALY_KEYS):
            raise FormatError(f"an anomaly must be a dict with keys {ANOMALY_KEYS}, got {_short(item)}")
        numbers = item["numbers"]
        ok = (
            (item["layer"] is None or _is_name(item["layer"]))
            and _is_name(item["kind"])
            and isinstance(item["severity"], str)
            and item["severity"] in SEVERITIES
            and isinstance(item["message"], str)
            and len(item["message"]) <= MAX_TEXT_LENGTH
            and isinstance(numbers, dict)
            and all(_is_name(k) and (v is None or _is_number(v)) for k, v in numbers.items())
        )
        if not ok:
            raise FormatError(
                f"malformed anomaly (severity must be one of {SEVERITIES}, names at most {MAX_NAME_LENGTH} "
                f"and the message {MAX_TEXT_LENGTH} characters): {_short(item)}"
            )
    return anomalies


# The JSON blobs' schemas: the keys every writer wrote, with what each holds. A reader passes on
# these keys only, colours only as "#rrggbb".
_NUMBER, _NAME, _COLOUR = "number", "name", "colour"


class _Optional(NamedTuple):
    """A key a writer may leave out; its value may be null."""

    schema: Any


_RECT = {"x": _NUMBER, "y": _NUMBER, "width": _NUMBER, "height": _NUMBER}
_CELL = {"x": _NUMBER, "y": _NUMBER, "index": _NUMBER, "label": _NAME}
#: A sprite cell's kernel: its dissimilarity to the nearest prototype and that prototype's code.
_KERNEL_DETAILS = {"dissimilarity": _Optional(_NUMBER), "code": _Optional(_NUMBER)}
_GRID = dict.fromkeys(("width", "height", "kernel_size", "pixels_per_weight", "cell_size"), _NUMBER)
SPRITE_LAYOUT: dict[str, Any] = {
    **_GRID,
    **dict.fromkeys(("gap", "columns", "n_kernels", "n_shown"), _NUMBER),
    "cells": [{**_CELL, **_KERNEL_DETAILS}],
    "groups": [{"label": _NAME, "colour": _COLOUR, "count": _NUMBER, "shown": _NUMBER, **_RECT}],
}
SPECTRUM_INFO: dict[str, Any] = {
    "kernel_size": _NUMBER,
    "threshold": _NUMBER,
    "method": _NAME,
    "n_codes": _NUMBER,
    # The thresholds within each interval (a spectrum may set them per family or per code).
    "intervals": [
        {
            "label": _NAME,
            "start": _NUMBER,
            "end": _NUMBER,
            "threshold_min": _Optional(_NUMBER),
            "threshold_max": _Optional(_NUMBER),
        }
    ],
    "strip": {
        **_GRID,
        "n_prototypes": _NUMBER,
        "cells": [{**_CELL, "code": _NUMBER}],
        "band": _RECT,
        "colours": {_NAME: _COLOUR},  # a map from any name
    },
}
_PROFILE = [_Optional(_NUMBER)]
#: A first-layer report (``FirstLayerReport.to_json()``), with the filter grid's geometry.
FIRST_LAYER_REPORT: dict[str, Any] = {
    "layer": _NAME,
    "in_channels": _NUMBER,
    "kernel_size": [_NUMBER],
    "stride": [_NUMBER],
    "source": _NAME,
    "n_patches": _NUMBER,
    "eigenvalues": _PROFILE,
    "energy_profile": _PROFILE,
    "whitening_prediction": _PROFILE,
    "whitening": _Optional(_NUMBER),
    "reflections": {"sharpness": _Optional(_NUMBER), "noise": _Optional(_NUMBER), "colour": _PROFILE},
    "grid": _Optional({"n_filters": _NUMBER, "n_shown": _NUMBER, "columns": _NUMBER, "cell_size": _NUMBER}),
}
_BLOB_SCHEMAS = {"layout": SPRITE_LAYOUT, "info": SPECTRUM_INFO, "report": FIRST_LAYER_REPORT}


def check_json(value: Any, schema: Any, where: str) -> Any:
    """``value`` as ``schema`` describes it (:data:`SPRITE_LAYOUT`, :data:`SPECTRUM_INFO`):
    numbers finite, names strings of at most :data:`MAX_NAME_LENGTH` characters, keys the
    schema does not know left out, and any colour that is not ``#rrggbb`` replaced by
    :data:`FALLBACK_COLOUR`; :class:`FormatError` for a missing key or a wrong type.

    >>> check_json({"label": "on-centre", "colour": "url(x)", "extra": 1}, {"label": _NAME, "colour": _COLOUR}, "group")
    {'label': 'on-centre', 'colour': '#999999'}
    """
    if isinstance(schema, _Optional):
        return None if value is None else check_json(value, schema.schema, where)
    if schema == _COLOUR:
        return value if isinstance(value, str) and COLOUR.fullmatch(value) else FALLBACK_COLOUR
    if schema == _NUMBER:
        if not _is_finite(value):
            raise FormatError(f"{where} must be a finite number, got {_short(value)}")
        return value
    if schema == _NAME:
        if not _is_name(value):
            raise FormatError(f"{where} must be a string of at most {MAX_NAME_LENGTH} characters, got {_short(value)}")
        return value
    if isinstance(schema, list):
        if not isinstance(value, list):
            raise FormatError(f"{where} must be a list, got {_short(value)}")
        return [check_json(item, schema[0], f"{where}[{i}]") for i, item in enumerate(value)]
    if not isinstance(value, dict):
        raise FormatError(f"{where} must be an object, got {_short(value)}")
    if _NAME in schema:
        return {check_json(k, _NAME, where): check_json(v, schema[_NAME], f"{where}[{k!r}]") for k, v in value.items()}
    missing = [key for key, sub in schema.items() if key not in value and not isinstance(sub, _Optional)]
    if missing:
        raise FormatError(f"{where} lacks {missing}")
    return {key: check_json(value[key], sub, f"{where}.{key}") for key, sub in schema.items() if key in value}


def check_blob_count(info: RecordInfo, count: int) -> None:
    """A blob-sequence record holds one blob per name its metadata lists."""
    names = info.fields.get("blobs")
    if info.data_class != BLOB_SEQUENCE or names is None:
        raise FormatError(f"{info.kind} records are not blob sequences")
    if count != len(names):
        raise FormatError(f"{info.kind} record has {count} blobs, expected {len(names)} ({names})")


def decode_blob(info: RecordInfo, name: str, blob: Any) -> Any:
    """One blob of a record: a PNG's bytes (checked to be a PNG), or the parsed and validated
    JSON of a sprite layout, spectrum info or anomaly list.

    >>> decode_blob(parse_metadata(summary_metadata(ANOMALIES)), "anomalies", b"[]")
    []
    """
    if not isinstance(blob, bytes):
        raise FormatError(f"{info.kind} record's {name} blob is {type(blob).__name__}, not bytes")
    if name in PNG_BLOBS:
        if not blob.startswith(PNG_SIGNATURE):
            raise FormatError(f"{info.kind} record's {name} blob is not a PNG")
        return blob
    value = decode_json(blob)
    if name == "anomalies":
        return check_anomalies(value)
    value = check_json(value, _BLOB_SCHEMAS[name], f"{info.kind} {name}")
    return check_first_layer_report(value) if name == "report" else value


def check_first_layer_report(report: dict[str, Any]) -> dict[str, Any]:
    """The rules of a first-layer report beyond :data:`FIRST_LAYER_REPORT`'s types: a kernel
    size and stride of two integers from 1 to :data:`MAX_KERNEL_SIZE`, at most
    :data:`MAX_IN_CHANNELS` channels, three profiles of ``in_channels x kh x kw`` (at most
    :data:`MAX_FIRST_LAYER_DIM`) entries, one colour per channel, a known source.

    >>> report = {"in_channels": 1, "kernel_size": [1, 2], "stride": [1, 1], "source": "data",
    ...           "n_patches": 9, "eigenvalues": [2.0, 1.0], "energy_profile": [0.5, 0.5],
    ...           "whitening_prediction": [0.4, None], "reflections": {"colour": [1.0]}}
    >>> check_first_layer_report(report) is report
    True
    >>> check_first_layer_report({**report, "energy_profile": [1.0]})
    Traceback (most recent call last):
    ...
    kernelwatch.format.FormatError: first_layer report's energy_profile has 1 entries, expected in_channels x kh x kw = 2
    """
    sizes = [report["kernel_size"], report["stride"]]
    if not all(len(pair) == 2 and all(_is_int(v) and 1 <= v <= MAX_KERNEL_SIZE for v in pair) for pair in sizes):
        raise FormatError(
            f"first_layer report's kernel size and stride must be two integers from 1 to {MAX_KERNEL_SIZE}, "
            f"got {_short(sizes)}"
        )
    channels = report["in_channels"]
    if not _is_int(channels) or not 1 <= channels <= MAX_IN_CHANNELS:
        raise FormatError(
            f"first_layer report's in_channels must be an integer from 1 to {MAX_IN_CHANNELS}, got {_short(channels)}"
        )
    dim = channels * report["kernel_size"][0] * report["kernel_size"][1]
    if dim > MAX_FIRST_LAYER_DIM:
        raise FormatError(
            f"first_layer report has {dim:,} dimensions per patch, over the limit of {MAX_FIRST_LAYER_DIM:,}"
        )
    for key in ("eigenvalues", "energy_profile", "whitening_prediction"):
        if len(report[key]) != dim:
            raise FormatError(
                f"first_layer report's {key} has {len(report[key])} entries, expected in_channels x kh x kw = {dim}"
            )
    if len(report["reflections"]["colour"]) != channels:
        n = len(report["reflections"]["colour"])
        raise FormatError(f"first_layer report has {n} colour values for {channels} channels")
    if report["source"] not in FIRST_LAYER_SOURCES or not _is_int(report["n_patches"]) or report["n_patches"] < 0:
        raise FormatError(
            f"first_layer report's source must be one of {FIRST_LAYER_SOURCES} and n_patches an integer >= 0, "
            f"got {_short(report['source'])} and {_short(report['n_patches'])}"
        )
    return report


def decode_blobs(info: RecordInfo, blobs: Sequence[bytes]) -> dict[str, Any]:
    """Name the blobs of a blob-sequence record and decode each (:func:`decode_blob`).

    >>> decode_blobs(parse_metadata(summary_metadata(ANOMALIES)), [b"[]"])
    {'anomalies': []}
    """
    check_blob_count(info, len(blobs))
    return {name: decode_blob(info, name, blob) for name, blob in zip(info.fields["blobs"], blobs)}


def check_tensor(info: RecordInfo, value: Any) -> np.ndarray:
    """A tensor record's payload: numbers (integers or floats, NaN and Inf allowed) of the shape
    its content lists give, a histogram with 1 to :data:`MAX_HISTOGRAM_BINS` bins."""
    axes = _TENSOR_AXES.get(info.kind)
    if axes is None:
        raise FormatError(f"{info.kind} records are not tensors")
    value = np.asarray(value)
    if value.dtype.kind not in "iuf":
        raise FormatError(f"{info.kind} record holds {value.dtype} values, expected numbers")
    expected = tuple(len(info.fields[axis]) for axis in axes)
    if info.kind == CODE_HISTOGRAM:  # its second axis is the bins, however many the writer chose
        ok = value.ndim == 2 and value.shape[0] == expected[0] and 1 <= value.shape[1] <= MAX_HISTOGRAM_BINS
        expected = (*expected, f"1..{MAX_HISTOGRAM_BINS} bins")
    else:
        ok = value.shape == expected
    if not ok:
        raise FormatError(f"{info.kind} record has shape {value.shape}, expected {expected} along {axes}")
    return value


def decode_tensor(info: RecordInfo, value: np.ndarray) -> dict[str, Any]:
    """Name the entries of a tensor record along the axes its metadata lists, once
    :func:`check_tensor` accepts it.

    Returns ``{cluster: share}``, ``{field: value}``, ``{metric: value}``, ``{cluster: {stat:
    value}}`` (clusters with no kernels left out), ``{null: {cluster: share}}`` or ``{row:
    counts}`` (histogram rows). A ``clustered_fraction`` record has every field of
    :data:`CLUSTERED_FIELDS`, None where an older writer did not write it.

    >>> decode_tensor(parse_metadata(summary_metadata(QUALITY, layer="c")), np.array([0.0, 0.9, 0.7]))
    {'sparsity': 0.0, 'variance_entropy': 0.9, 'orthogonality': 0.7}
    """
    value = check_tensor(info, value)
    names = info.fields[_TENSOR_AXES[info.kind][0]]
    if info.kind == CODE_HISTOGRAM:
        return {row: value[i] for i, row in enumerate(names)}
    if info.kind == TOTAL_ACTIVATION:
        stats = info.fields["stats"]
        return {c: dict(zip(stats, map(float, row))) for c, row in zip(names, value) if row[0] > 0}
    if info.kind == NULL_PROPORTIONS:
        return {null: dict(zip(info.fields["clusters"], map(float, row))) for null, row in zip(names, value)}
    decoded = {name: float(v) for name, v in zip(names, value)}
    if info.kind == CLUSTERED_FRACTION:
        return {name: decoded.get(name) for name in CLUSTERED_FIELDS}
    return decoded


# -- chance ---------------------------------------------------------------------------------


def chance_fraction(shuffled: float | None, smooth: float | None) -> float | None:
    """The clustered fraction chance gives, by the stricter of the two nulls: the larger of
    theirs, or the one measured (logs before version 3 have no smooth null); None if neither.

    >>> chance_fraction(0.01, 0.3), chance_fraction(0.02, None), chance_fraction(float("nan"), None)
    (0.3, 0.02, None)
    """
    return _extreme(max, shuffled, smooth)


def chance_dissimilarity(shuffled: float | None, smooth: float | None) -> float | None:
    """The median dissimilarity chance gives, by the stricter of the two nulls: the smaller."""
    return _extreme(min, shuffled, smooth)


def above_chance(value: float | None, chance: float | None) -> float | None:
    """``value - chance``, or None if either is unknown: structure above chance (a clustered
    fraction or a family's share less the stricter null's).

    >>> above_chance(0.75, chance_fraction(0.02, 0.25))
    0.5
    """
    return None if value is None or chance is None or not math.isfinite(value) else value - chance


def families_above_chance(
    proportions: Mapping[str, float], nulls: Mapping[str, Mapping[str, float]]
) -> dict[str, float | None]:
    """Each family's share of the kernels less the larger of the two nulls' shares of it
    (``nulls`` as :func:`decode_tensor` reads a ``null_proportions`` record).

    >>> families_above_chance({"on-centre": 0.5}, {"shuffled": {"on-centre": 0.0}, "smooth": {"on-centre": 0.25}})
    {'on-centre': 0.25}
    """
    return {
        name: above_chance(share, chance_fraction(*(nulls.get(null, {}).get(name) for null in NULLS)))
        for name, share in proportions.items()
    }


def _extreme(pick: Any, *values: float | None) -> float | None:
    known = [v for v in values if v is not None and math.isfinite(v)]
    return pick(known) if known else None


def _kind(kind: str) -> tuple[int, str, dict[str, Any]]:
    if not isinstance(kind, str) or kind not in _KINDS:
        raise FormatError(f"unknown kernelwatch record kind {_short(kind)}; expected one of {KINDS}")
    return _KINDS[kind]


def _check_lens(kind: str, lens: str) -> None:
    if not isinstance(lens, str) or lens not in LENSES:
        raise FormatError(f"unknown lens {_short(lens)}; expected one of {LENSES}")
    if lens == UPDATE and kind not in UPDATE_KINDS:
        raise FormatError(f"the update lens has no {kind} records (it has {UPDATE_KINDS})")


def _layer(value: Any, kind: str) -> str:
    if not isinstance(value, str):
        raise FormatError(f"{kind} records need a layer name, got {_short(value)}")
    if len(value) > MAX_NAME_LENGTH:
        raise FormatError(f"{kind} record's layer name has {len(value):,} characters, more than {MAX_NAME_LENGTH}")
    return value


def _order(value: Any) -> int:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 0:
        raise FormatError(f"a layer's order must be an integer >= 0, got {value!r}")
    return int(value)


def _kernel_size(value: Any) -> int:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or not 1 <= value <= MAX_KERNEL_SIZE:
        raise FormatError(f"kernel size must be an integer from 1 to {MAX_KERNEL_SIZE}, got {_short(value)}")
    return int(value)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def _is_finite(value: Any) -> bool:
    """A number that is finite as a float. JSON holds integers of any length, and
    ``math.isfinite`` raises OverflowError for one beyond a float's range.

    >>> _is_finite(3), _is_finite(float("inf")), _is_finite(10**400), _is_finite(True)
    (True, False, False, False)
    """
    try:
        return _is_number(value) and math.isfinite(value)
    except OverflowError:
        return False


def _is_name(value: Any) -> bool:
    return isinstance(value, str) and len(value) <= MAX_NAME_LENGTH


_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother, _REPR.maxlong = 3, 60, 60, 40


def _short(value: Any, limit: int = 120) -> str:
    """A repr of a value from a record that is short whatever the record holds."""
    text = _REPR.repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _numpy_value(value: Any) -> Any:
    if isinstance(value, (np.ndarray, np.generic)):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


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
