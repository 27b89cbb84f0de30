"""A malformed log never breaks the KernelWatch dashboard.

The fuzz tests start one real ``tensorboard`` (default fast loader, the Rust data server) on a
log directory holding a good run beside runs of hostile records: the ones reported (JSON nested
1000 deep, renamed or wrong content lists, missing blobs, string tensors, 200,000 cluster names,
names the data server cannot key, CSS in colours) and more (random garbage, wrong data classes,
huge, empty and negative shapes, NaN/Inf, non-UTF-8, newer versions, wrong lenses, duplicated
tags, oversized anomaly lists, ...). Every route is asked for every run and layer, and with
malformed query strings: no answer is a 5xx, none takes 5 s, no JSON answer passes 1 MB, and
the good run is still served in full.

The tests before them check the validation and the write-time rules without TensorBoard.
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import numpy as np
import pytest
from tensorboard.compat.proto import event_pb2, summary_pb2, tensor_pb2, tensor_shape_pb2, types_pb2
from tensorboard.summary.writer.event_file_writer import EventFileWriter
from tensorboard.util import tensor_util

from kernelwatch import cli
from kernelwatch import format as fmt
from kernelwatch import reading
from kernelwatch.errors import KernelWatchError
from kernelwatch.sprites import kernel_sprite, spectrum_strip
from kernelwatch.summary import summarise

import test_plugin_backend as backend
from tensorboard_server import TensorBoard

ROUTE_SECONDS = 5.0
MAX_JSON = 1_000_000
DW = backend.DW

# -- hand-made records ------------------------------------------------------------------------

T, B = fmt.TENSOR, fmt.BLOB_SEQUENCE
_DROP = object()
PNG, LAYOUT = kernel_sprite(np.random.default_rng(0).standard_normal((16, 5, 5)), ["on-centre"] * 8 + ["other"] * 8)
STRIP_PNG, STRIP = spectrum_strip(np.random.default_rng(1).standard_normal((40, 5, 5)), ["on-centre", "other"] * 20, n=4)
INFO = {"kernel_size": 5, "threshold": 0.2, "method": "autoencoder", "n_codes": 40,
        "intervals": [{"label": "on-centre", "start": 0.0, "end": 0.5}, {"label": "other", "start": 0.5, "end": 1.0}],
        "strip": {**STRIP, "cells": [{**c, "code": 0.1} for c in STRIP["cells"]]}}  # fmt: skip
FLAG = {"layer": "dw", "kind": "collapse", "severity": "warning", "message": "one dominates", "numbers": {"share": 0.8}}
DEEP = b"[" * 1000 + b"]" * 1000


def content(kind: str, layer: str = "dw", **changes) -> bytes:
    """A record's metadata content as the writer makes it (a spectrum's for 5x5 kernels), for
    ``layer`` and with ``changes`` (``_DROP`` removes a key), which no writer would accept."""
    run_level = kind in (fmt.SPECTRUM, fmt.ANOMALIES)
    metadata = fmt.summary_metadata(kind, None if run_level else "dw", 5 if kind == fmt.SPECTRUM else None)
    value = json.loads(metadata.plugin_data.content)
    if not run_level or layer != "dw":
        changes = {"layer": layer, **changes}
    for key, new in changes.items():
        value.pop(key) if new is _DROP else value.__setitem__(key, new)
    return json.dumps(value).encode()


def arr(value, dtype=None) -> tensor_pb2.TensorProto:
    return tensor_util.make_tensor_proto(np.asarray(value, dtype=dtype))


def blobs(*items: bytes) -> tensor_pb2.TensorProto:
    return tensor_util.make_tensor_proto(np.array(list(items), dtype=object))


def raw_tensor(dtype: int, shape: list[int], **values) -> tensor_pb2.TensorProto:
    dims = [tensor_shape_pb2.TensorShapeProto.Dim(size=n) for n in shape]
    return tensor_pb2.TensorProto(dtype=dtype, tensor_shape=tensor_shape_pb2.TensorShapeProto(dim=dims), **values)


def write_run(directory: Path, records: list[tuple]) -> None:
    """``(tag, content, data_class, tensor[, step])`` records, each its own event; ``content``
    None writes no metadata. The writer's name checks are bypassed on purpose."""
    directory.mkdir(parents=True, exist_ok=True)
    writer = EventFileWriter(str(directory), filename_suffix=".kernelwatch")
    for tag, data, data_class, tensor, *step in records:
        value = summary_pb2.Summary.Value(tag=tag, tensor=tensor)
        if data is not None:
            value.metadata.CopyFrom(
                summary_pb2.SummaryMetadata(
                    plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name=fmt.PLUGIN_NAME, content=data),
                    data_class=data_class,
                )
            )
        at = step[0] if step else 1
        writer.add_event(event_pb2.Event(step=at, wall_time=1.0 + at, summary=summary_pb2.Summary(value=[value])))
    writer.close()


def tag(kind: str, subject="dw") -> str:
    return fmt.make_tag(kind, 5 if kind == fmt.SPECTRUM else None if kind == fmt.ANOMALIES else subject)


def sprite_record(layout=LAYOUT, png=PNG, layer="dw", name=None, **changes) -> tuple:
    return (name or tag(fmt.SPRITE, layer), content(fmt.SPRITE, layer, **changes), B, blobs(png, _json(layout)))


def _json(value) -> bytes:
    return value if isinstance(value, bytes) else fmt.encode_json(value)


ZEROS9 = arr(np.zeros(9, np.float32))
GOOD_CF = arr(np.array([0.5, 64, 0, 5, 0.4, 0.1, 0.6, 0.2, 0.5]))
#: Layer names with characters ``str.isdigit`` takes for digits and ``int`` refuses, in the order
#: the dashboard lists them.
UNICODE_DIGIT_LAYERS = ["conv1²", "conv2", "conv10", "①"]
#: Valid JSON, and beyond a float's range: ``math.isfinite`` raises OverflowError for it.
HUGE_INT = 10**4000


def first_layer_report(**changes) -> bytes:
    """A first-layer report of a 3x3x3 stem, as the writer writes it, with ``changes``."""
    from kernelwatch.first_layer import first_layer_report as report

    value = report(np.random.default_rng(0).standard_normal((8, 3, 3, 3)), layer="stem").to_json()
    return json.dumps({**value, **changes}).encode()


@functools.cache
def hostile_runs() -> dict[str, list[tuple]]:
    """Run name -> records. Each run holds one or a few kinds of damage."""
    rng = np.random.default_rng(0)
    deep_content = content(fmt.PROPORTIONS)[:-1] + b', "x": ' + DEEP + b"}"
    bad_colours = json.loads(_json(LAYOUT))
    bad_colours["groups"][0]["colour"] = "url(https://evil.example/x)"
    bad_colours["groups"][-1]["colour"] = "red; background: url(x)"
    bad_info = json.loads(_json(INFO))
    bad_info["strip"]["colours"] = {"on-centre": "url(javascript:alert(1))", "other": "#12345g"}
    many_flags = [{**FLAG, "message": f"flag {i}"} for i in range(3000)]
    # fmt: off
    return {
        # -- reported --
        "deep_metadata": [(tag(fmt.PROPORTIONS), deep_content, T, ZEROS9)],
        "deep_blobs": [
            (tag(fmt.ANOMALIES), content(fmt.ANOMALIES), B, blobs(DEEP)),
            sprite_record(layout=DEEP),
            (tag(fmt.SPECTRUM), content(fmt.SPECTRUM), B, blobs(STRIP_PNG, b'{"x":' + DEEP + b"}")),
        ],
        "renamed_fields": [
            (tag(fmt.CLUSTERED_FRACTION), content(fmt.CLUSTERED_FRACTION, fields=list("abcdefg")), T, GOOD_CF),
            (tag(fmt.PROPORTIONS), content(fmt.PROPORTIONS), T, ZEROS9),
        ],
        "png_only": [
            (tag(fmt.SPRITE), content(fmt.SPRITE, blobs=["png"]), B, blobs(PNG)),
            (tag(fmt.SPECTRUM), content(fmt.SPECTRUM, blobs=["png"]), B, blobs(STRIP_PNG)),
        ],
        "one_blob": [(tag(fmt.SPRITE), content(fmt.SPRITE), B, blobs(PNG))],
        "string_tensor": [(tag(fmt.PROPORTIONS), content(fmt.PROPORTIONS), T, arr([b"x"] * 9, object))],
        "dict_clusters": [(tag(fmt.PROPORTIONS), content(fmt.PROPORTIONS, clusters=[{"a": 1}] * 9), T, ZEROS9)],
        "many_clusters": [
            (tag(fmt.PROPORTIONS), content(fmt.PROPORTIONS, clusters=[f"c{i}" for i in range(200_000)]), T,
             arr(np.zeros(200_000, np.float32))),
        ],
        'quote"run': [sprite_record(), (tag(fmt.ANOMALIES), content(fmt.ANOMALIES), B, blobs(b"[]"))],
        "nul_layer": [sprite_record(layer="a\x00b", name="kernelwatch/sprite/a\x00b")],
        "css_colour": [sprite_record(layout=bad_colours), (tag(fmt.SPECTRUM), content(fmt.SPECTRUM), B, blobs(STRIP_PNG, _json(bad_info)))],
        # -- metadata --
        "garbage_metadata": [(f"kernelwatch/proportions/g{i}", rng.bytes(int(rng.integers(0, 300))), T, ZEROS9) for i in range(20)]
        + [(f"kernelwatch/sprite/g{i}", rng.bytes(64), B, blobs(PNG, b"{}")) for i in range(5)],
        "many_bad_series": [(f"kernelwatch/proportions/bad{i}", b"{oops", T, ZEROS9) for i in range(300)],
        "wrong_data_class": [
            (tag(fmt.PROPORTIONS), content(fmt.PROPORTIONS), B, blobs(b"x")),
            (tag(fmt.SPRITE), content(fmt.SPRITE), T, ZEROS9),
            (tag(fmt.QUALITY), content(fmt.QUALITY), summary_pb2.DATA_CLASS_SCALAR, arr(np.float32(1))),
            (tag(fmt.ANOMALIES), content(fmt.ANOMALIES), summary_pb2.DATA_CLASS_UNKNOWN, blobs(b"[]")),
        ],
        "versions": [
            (tag(fmt.PROPORTIONS, "v99"), content(fmt.PROPORTIONS, "v99", version=99), T, ZEROS9),
            (tag(fmt.PROPORTIONS, "v0"), content(fmt.PROPORTIONS, "v0", version=0), T, ZEROS9),
            (tag(fmt.PROPORTIONS, "vstr"), content(fmt.PROPORTIONS, "vstr", version="2"), T, ZEROS9),
            (tag(fmt.PROPORTIONS, "vbool"), content(fmt.PROPORTIONS, "vbool", version=True), T, ZEROS9),
            (tag(fmt.PROPORTIONS, "vnone"), content(fmt.PROPORTIONS, "vnone", version=_DROP), T, ZEROS9),
            (tag(fmt.PROPORTIONS, "vbig"), content(fmt.PROPORTIONS, "vbig", version=10**400), T, ZEROS9),
        ],
        "encodings": [
            (tag(fmt.PROPORTIONS, "latin1"), '{"version":2,"kind":"proportions","layer":"d\xe9"}'.encode("latin-1"), T, ZEROS9),
            (tag(fmt.PROPORTIONS, "utf16"), content(fmt.PROPORTIONS, "utf16").decode().encode("utf-16"), T, ZEROS9),
            (tag(fmt.PROPORTIONS, "nan"), b'{"version":NaN}', T, ZEROS9),
            (tag(fmt.PROPORTIONS, "list"), b"[1, 2]", T, ZEROS9),
            (tag(fmt.PROPORTIONS, "empty"), b"", T, ZEROS9),
        ],
        "lenses_and_orders": [
            (tag(fmt.PROPORTIONS, "gradient"), content(fmt.PROPORTIONS, "gradient", lens="gradient"), T, ZEROS9),
            (tag(fmt.QUALITY, "uq"), content(fmt.QUALITY, "uq", lens="update"), T, arr(np.zeros(3))),
            (tag(fmt.PROPORTIONS, "lensdict"), content(fmt.PROPORTIONS, "lensdict", lens={"a": 1}), T, ZEROS9),
            (tag(fmt.PROPORTIONS, "neg"), content(fmt.PROPORTIONS, "neg", order=-1), T, ZEROS9),
            (tag(fmt.PROPORTIONS, "ostr"), content(fmt.PROPORTIONS, "ostr", order="3"), T, ZEROS9),
            (tag(fmt.PROPORTIONS, "long"), content(fmt.PROPORTIONS, "x" * 5000), T, ZEROS9),
            (tag(fmt.PROPORTIONS, "nolayer"), content(fmt.PROPORTIONS, layer=_DROP), T, ZEROS9),
            (tag(fmt.SPECTRUM), content(fmt.SPECTRUM, kernel_size=0), B, blobs(STRIP_PNG, _json(INFO))),
            ("kernelwatch/spectrum/9x9", content(fmt.SPECTRUM, kernel_size=True), B, blobs(STRIP_PNG, _json(INFO))),
            ("kernelwatch/spectrum/7x7", content(fmt.SPECTRUM, kernel_size=10**6), B, blobs(STRIP_PNG, _json(INFO))),
            ("kernelwatch/anomalies/x", content(fmt.ANOMALIES, layer="x"), B, blobs(b"[]")),
            (tag(fmt.CODE_HISTOGRAM, "range"), content(fmt.CODE_HISTOGRAM, "range", range=[0, 2]), T, arr(np.zeros((2, 50)))),
            (tag(fmt.PROPORTIONS, "dupnames"), content(fmt.PROPORTIONS, "dupnames", clusters=["other"] * 9), T, ZEROS9),
        ],
        # -- payloads --
        "shapes": [
            (tag(fmt.PROPORTIONS, "empty"), content(fmt.PROPORTIONS, "empty"), T, arr(np.zeros(0, np.float32))),
            (tag(fmt.PROPORTIONS, "negative"), content(fmt.PROPORTIONS, "negative"), T,
             raw_tensor(types_pb2.DT_FLOAT, [-3, 3], tensor_content=np.zeros(9, np.float32).tobytes())),
            (tag(fmt.PROPORTIONS, "broadcast"), content(fmt.PROPORTIONS, "broadcast"), T,
             raw_tensor(types_pb2.DT_FLOAT, [2**31, 2**31], float_val=[0.5])),
            (tag(fmt.PROPORTIONS, "short"), content(fmt.PROPORTIONS, "short"), T,
             raw_tensor(types_pb2.DT_FLOAT, [9], tensor_content=b"\x00" * 7)),
            (tag(fmt.PROPORTIONS, "huge"), content(fmt.PROPORTIONS, "huge"), T, arr(np.zeros(300_000, np.float32))),
            (tag(fmt.PROPORTIONS, "scalar"), content(fmt.PROPORTIONS, "scalar"), T, arr(np.float32(1))),
            (tag(fmt.PROPORTIONS, "dtype"), content(fmt.PROPORTIONS, "dtype"), T, raw_tensor(999, [9])),
            (tag(fmt.PROPORTIONS, "variant"), content(fmt.PROPORTIONS, "variant"), T, raw_tensor(types_pb2.DT_VARIANT, [9])),
            (tag(fmt.PROPORTIONS, "bool"), content(fmt.PROPORTIONS, "bool"), T, arr(np.ones(9, bool))),
            (tag(fmt.PROPORTIONS, "complex"), content(fmt.PROPORTIONS, "complex"), T, arr(np.ones(9, np.complex64))),
            (tag(fmt.TOTAL_ACTIVATION, "transposed"), content(fmt.TOTAL_ACTIVATION, "transposed"), T, arr(np.zeros((5, 9)))),
            (tag(fmt.CODE_HISTOGRAM, "bins"), content(fmt.CODE_HISTOGRAM, "bins"), T, arr(np.zeros((2, 5000), np.int64))),
            (tag(fmt.CODE_HISTOGRAM, "nobins"), content(fmt.CODE_HISTOGRAM, "nobins"), T, arr(np.zeros((2, 0), np.int64))),
            (tag(fmt.CLUSTERED_FRACTION, "ok"), content(fmt.CLUSTERED_FRACTION, "ok"), T, GOOD_CF),
        ],
        "nan_inf": [
            (tag(fmt.PROPORTIONS), content(fmt.PROPORTIONS), T, arr(np.array([np.nan, np.inf, -np.inf, 0, 0, 0, 0, 0, 1], np.float32))),
            (tag(fmt.CLUSTERED_FRACTION), content(fmt.CLUSTERED_FRACTION), T, arr(np.full(7, np.nan))),
            (tag(fmt.QUALITY), content(fmt.QUALITY), T, arr(np.array([np.inf, np.nan, -np.inf]))),
        ],
        "bad_blobs": [
            sprite_record(png=b"GIF89a not a png"),
            sprite_record(layer="nokeys", layout={"cells": []}),
            sprite_record(layer="nan", layout=_json(LAYOUT).replace(b'"width":353', b'"width":NaN')),
            sprite_record(layer="types", layout={**LAYOUT, "cells": "x"}),
            sprite_record(layer="latin1", layout='{"x": "\xe9"}'.encode("latin-1")),
            sprite_record(layer="big", layout=b'["' + b"x" * 600_000 + b'"]'),
            (tag(fmt.SPRITE, "zero"), content(fmt.SPRITE, "zero"), B, blobs()),
            (tag(fmt.SPRITE, "three"), content(fmt.SPRITE, "three"), B, blobs(PNG, _json(LAYOUT), b"x")),
            (tag(fmt.SPRITE, "floats"), content(fmt.SPRITE, "floats"), B, arr(np.zeros(2, np.float32))),
            (tag(fmt.SPECTRUM), content(fmt.SPECTRUM), B, blobs(STRIP_PNG, b"not json")),
        ],
        "bad_anomalies": [
            (tag(fmt.ANOMALIES), content(fmt.ANOMALIES), B, blobs(_json([{**FLAG, "severity": "fatal"}])), 1),
            (tag(fmt.ANOMALIES), None, B, blobs(b'{"not": "a list"}'), 2),
            (tag(fmt.ANOMALIES), None, B, blobs(_json([{**FLAG, "message": "m" * 10_000}])), 3),
            (tag(fmt.ANOMALIES), None, B, blobs(_json([{**FLAG, "numbers": {"x": "1"}}])), 4),
            (tag(fmt.ANOMALIES), None, B, blobs(b"\xff\xfe"), 5),
            (tag(fmt.ANOMALIES), None, B, blobs(), 6),
            (tag(fmt.ANOMALIES), None, B, blobs(b"[]", b"[]"), 7),
            (tag(fmt.ANOMALIES), None, B, blobs(_json([FLAG, {**FLAG, "layer": None, "numbers": {"n": None}}])), 8),
        ],
        "many_flags": [(tag(fmt.ANOMALIES), content(fmt.ANOMALIES), B, blobs(_json(many_flags[i::3])), i) for i in range(3)],
        "duplicates": [
            (tag(fmt.PROPORTIONS, "x"), content(fmt.PROPORTIONS, "x"), T, ZEROS9),
            (tag(fmt.PROPORTIONS, "x") + "_copy", content(fmt.PROPORTIONS, "x"), T, arr(np.ones(9, np.float32))),
            # An older writer's unescaped tag beside the current one: the current one is served.
            sprite_record(layer="a\tb", name="kernelwatch/sprite/a\tb"),
            sprite_record(layer="a\tb"),
        ],
        "mixed": [
            (tag(fmt.PROPORTIONS, "good"), content(fmt.PROPORTIONS, "good"), T, ZEROS9),
            (tag(fmt.CLUSTERED_FRACTION, "good"), content(fmt.CLUSTERED_FRACTION, "good"), T, GOOD_CF),
            (tag(fmt.PROPORTIONS, "bad"), content(fmt.PROPORTIONS, "bad"), T, arr(np.zeros(4, np.float32))),
            (tag(fmt.CLUSTERED_FRACTION, "bad"), content(fmt.CLUSTERED_FRACTION, "bad"), T, arr(np.zeros((7, 2)))),
            (tag(fmt.QUALITY, "bad"), content(fmt.QUALITY, "bad"), T, raw_tensor(types_pb2.DT_FLOAT, [3], tensor_content=b"\x00")),
            (tag(fmt.SPRITE, "good"), content(fmt.SPRITE, "good"), B, blobs(PNG, _json(LAYOUT))),
            ("kernelwatch/" + "t" * 10_000, content(fmt.PROPORTIONS, "longtag"), T, ZEROS9),
            ("kernelwatch/proportions/nometa", None, T, ZEROS9),
        ],
        # -- issue 25 --
        "unicode_digits": [(tag(fmt.CLUSTERED_FRACTION, name), content(fmt.CLUSTERED_FRACTION, name), T, GOOD_CF)
                           for name in UNICODE_DIGIT_LAYERS],
        "huge_int": [
            sprite_record(layout={**LAYOUT, "width": HUGE_INT}),
            (tag(fmt.FIRST_LAYER, "stem"), content(fmt.FIRST_LAYER, "stem"), B, blobs(PNG, _json(first_layer_report(whitening=HUGE_INT))), 1),
            (tag(fmt.FIRST_LAYER, "stem"), None, B, blobs(PNG, _json(first_layer_report())), 2),
        ],
        "long": [
            (tag(kind, "dw"), content(kind, "dw") if step == 0 else None, T, value, step)
            for step in range(2500)
            for kind, value in ((fmt.PROPORTIONS, ZEROS9), (fmt.CLUSTERED_FRACTION, GOOD_CF))
        ],
    }
    # fmt: on


def write_fuzz_logs(root: Path) -> Path:
    backend._write_controlled_run(root / "good", (DW, "odd/name"), seed=0)
    for name, records in hostile_runs().items():
        write_run(root / name, records)
    return root


# -- validation and write-time rules (no TensorBoard) -----------------------------------------


@pytest.mark.parametrize("layer", ["a\x00b", "tab\there", "new\nline", "del\x7f", "c1\x85", 'q"\\%/', "\x1f" * 3])
def test_control_characters_are_escaped_in_tags_and_round_trip(layer):
    for kind, lens in ((fmt.SPRITE, fmt.WEIGHTS), (fmt.SPRITE, fmt.UPDATE), (fmt.PROPORTIONS, fmt.WEIGHTS)):
        made = fmt.make_tag(kind, layer, lens)
        assert fmt.unkeyable(made) is None and not any(ord(c) < 32 or 127 <= ord(c) < 160 for c in made)
        assert fmt.parse_tag(made) == fmt.Tag(kind, layer, lens)
    assert fmt.unkeyable(fmt.scalar_tag("clustered_fraction", layer)) is None


@pytest.mark.parametrize("name", ['lr "0.1"', "back\\slash", "nul\x00", "tab\t", "new\nline"])
def test_writer_refuses_a_log_dir_the_data_server_cannot_serve(tmp_path, name):
    from kernelwatch.writing import EventWriter

    with pytest.raises(KernelWatchError, match="Rename that directory") as err:
        EventWriter(tmp_path / name / "run")
    assert repr(name) in str(err.value)
    assert not (tmp_path / name).exists() or not any((tmp_path / name).rglob("events*"))


def test_writer_accepts_names_the_data_server_reads(tmp_path):
    from kernelwatch.writing import EventWriter

    with EventWriter(tmp_path / "lr=0.1 'x' <b> ö %20 \x7f") as writer:
        writer.write_anomalies(0, [])


def test_layer_names_over_the_limit_are_refused_at_write_time():
    with pytest.raises(fmt.FormatError, match="more than 1024"):
        fmt.summary_metadata(fmt.PROPORTIONS, "x" * (fmt.MAX_NAME_LENGTH + 1))
    with pytest.raises(fmt.FormatError, match="more than 1024"):
        fmt.make_tag(fmt.SPRITE, "x" * (fmt.MAX_NAME_LENGTH + 1), fmt.UPDATE)
    name = "\U0001f600" * fmt.MAX_NAME_LENGTH  # the widest name still fits the content limit
    assert len(fmt.summary_metadata(fmt.SPRITE, name).plugin_data.content) <= fmt.MAX_CONTENT_BYTES


@pytest.mark.parametrize(
    "data, message",
    [
        (b"[" * 2000 + b"]" * 2000, "nested 2000 deep"),
        (b'{"a":' * 33 + b"1" + b"}" * 33, "nested 33 deep"),
        (b'"' + b"x" * (fmt.MAX_JSON_BYTES) + b'"', "over the limit"),
        (b"\xff", "invalid JSON"),
        ("\ufeff[]".encode("utf-16"), "invalid JSON"),
        (b"[1e99999]", None),
        (b"[" + b"9" * 5000 + b"]", "invalid JSON"),
    ],
)
def test_decode_json_bounds(data, message):
    if message is None:
        assert fmt.decode_json(data) == [float("inf")]
        return
    with pytest.raises(fmt.FormatError, match=message):
        fmt.decode_json(data)


def test_brackets_in_strings_do_not_count_as_depth():
    data = json.dumps({"label": "[" * 500, "escaped": '\\"[[[[' * 50}).encode()
    assert fmt.decode_json(data)["label"] == "[" * 500


def test_colours_and_schemas_of_json_blobs():
    sprite = fmt.parse_content(content(fmt.SPRITE))
    layout = json.loads(_json(LAYOUT))
    layout["groups"][0]["colour"] = "url(https://evil.example/x)"
    layout["groups"][1]["colour"] = ["#ffffff"]
    layout["extra"] = {"kept": False}
    out = fmt.decode_blob(sprite, "layout", _json(layout))
    assert [g["colour"] for g in out["groups"][:2]] == [fmt.FALLBACK_COLOUR] * 2 and "extra" not in out
    assert out["cells"] == LAYOUT["cells"]
    spectrum = fmt.parse_content(content(fmt.SPECTRUM))
    info = json.loads(_json(INFO))
    info["strip"]["colours"]["on-centre"] = "expression(alert(1))"
    assert fmt.decode_blob(spectrum, "info", _json(info))["strip"]["colours"]["on-centre"] == fmt.FALLBACK_COLOUR
    for broken, message in [({**info, "intervals": [{"label": 1, "start": 0, "end": 1}]}, "must be a string"),
                            ({**info, "threshold": None}, "finite number"), ({"strip": {}}, "lacks")]:  # fmt: skip
        with pytest.raises(fmt.FormatError, match=message):
            fmt.decode_blob(spectrum, "info", _json(broken))


@pytest.mark.parametrize("value", [np.array(["a"] * 9), np.ones(9, bool), np.ones(9, complex), np.ones((9, 1)), np.ones(3)])
def test_tensors_must_be_numbers_of_the_listed_shape(value):
    with pytest.raises(fmt.FormatError):
        fmt.decode_tensor(fmt.parse_content(content(fmt.PROPORTIONS)), value)


def test_field_lists_any_order_but_exactly_the_known_names():
    shuffled = fmt.parse_content(content(fmt.QUALITY, metrics=["orthogonality", "sparsity", "variance_entropy"]))
    assert fmt.decode_tensor(shuffled, np.array([0.7, 0.0, 0.9]))["orthogonality"] == 0.7
    for bad in (["sparsity"] * 3, ["sparsity", "variance_entropy"], [1, 2, 3], "sparsity", None):
        with pytest.raises(fmt.FormatError, match="metrics"):
            fmt.parse_content(content(fmt.QUALITY, metrics=bad))


def test_reader_bounds(tmp_path, monkeypatch):
    """The bounds that keep answers under 1 MB, with small limits (werkzeug client, Python loader)."""
    records = [(tag(kind, f"l{i}"), content(kind, f"l{i}") if step == 0 else None, T, value, step)
               for i in range(4) for step in range(30)
               for kind, value in ((fmt.PROPORTIONS, ZEROS9), (fmt.CLUSTERED_FRACTION, GOOD_CF))]  # fmt: skip
    anomalies = content(fmt.ANOMALIES)
    records += [(tag(fmt.ANOMALIES), anomalies if s == 0 else None, B, blobs(_json([FLAG] * 3)), s) for s in range(30)]
    records += [(f"kernelwatch/proportions/bad{i}", b"{", T, ZEROS9) for i in range(80)]
    write_run(tmp_path / "run1", records)
    monkeypatch.setattr(reading, "MAX_POINTS", 10)
    monkeypatch.setattr(reading, "MAX_HEATMAP_CELLS", 40)
    monkeypatch.setattr(reading, "MAX_ANOMALIES", 20)
    client = backend.make_client(tmp_path)
    timeline = backend.get_json(client, "timeline?run=run1&layer=l0")
    assert len(timeline["proportions"]["steps"]) == 10 and timeline["proportions"]["steps"][-1] == 29
    assert set(timeline["sampled"]) == {fmt.PROPORTIONS, fmt.CLUSTERED_FRACTION}
    heatmap = backend.get_json(client, "heatmap?run=run1")
    assert len(heatmap["steps"]) == 10 and heatmap["sampled_layers"] == 4 and heatmap["steps"][-1] == 29
    assert len(heatmap["errors"]) == reading.MAX_ERRORS + 1 and "30 more" in heatmap["errors"][-1]
    anomalies = backend.get_json(client, "anomalies?run=run1")
    assert len(anomalies["anomalies"]) == 18 and anomalies["anomalies"][0]["step"] == 29
    assert "72 anomaly flags of older snapshots are not shown" in anomalies["errors"][0]
    assert len(anomalies["checked_steps"]) == 30


def test_layer_names_whose_digits_int_refuses_are_listed(tmp_path):
    """``str.isdigit`` holds for "²" and "①": a layer named "conv1²" made ``runs`` answer 422 for
    every run, and ``kernelwatch summary`` fail (issue 25)."""
    write_run(tmp_path / "odd", hostile_runs()["unicode_digits"])
    write_run(tmp_path / "good", [(tag(fmt.CLUSTERED_FRACTION), content(fmt.CLUSTERED_FRACTION), T, GOOD_CF)])
    runs = backend.get_json(backend.make_client(tmp_path), "runs")["runs"]
    assert {r["run"]: r["layers"] for r in runs} == {"good": ["dw"], "odd": UNICODE_DIGIT_LAYERS}
    assert list(summarise(tmp_path)["runs"]["odd"]["layers"]) == UNICODE_DIGIT_LAYERS


def test_an_integer_beyond_a_float_is_one_unreadable_record(tmp_path, capsys):
    """4,000 digits are valid JSON, and made ``math.isfinite`` raise OverflowError: the first-layer
    route failed as a whole, and ``kernelwatch summary`` with "unexpected OverflowError" (issue 25)."""
    write_run(tmp_path / "huge_int", hostile_runs()["huge_int"])
    client = backend.make_client(tmp_path)
    body = backend.get_json(client, "first_layer?run=huge_int")  # the latest report is good
    assert body["steps"] == [1, 2] and body["timeline"]["steps"] == [2]
    assert "at step 1" in body["errors"][0] and "whitening must be a finite number" in body["errors"][0]
    assert "width must be a finite number" in backend.get_json(client, "sprite?run=huge_int&layer=dw", code=422)["error"]
    with pytest.raises(fmt.FormatError, match="finite number"):
        fmt.check_json(HUGE_INT, fmt._NUMBER, "x")
    write_run(tmp_path / "latest_huge", [
        (tag(fmt.FIRST_LAYER, "stem"), content(fmt.FIRST_LAYER, "stem"), B, blobs(PNG, first_layer_report(n_patches=HUGE_INT))),
    ])  # fmt: skip
    assert cli.main(["summary", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "first layer stem at step 2" in out and "n_patches must be a finite number" in out


def test_what_the_reader_keeps_follows_new_records(tmp_path, monkeypatch):
    """Caches are keyed by each series' version in the listing: new snapshots are served."""
    from tensorboard import context
    from tensorboard.backend.event_processing import data_provider, plugin_event_multiplexer

    def snapshot(step: int) -> list[tuple]:
        first = step == 0
        return [
            (tag(fmt.CLUSTERED_FRACTION), content(fmt.CLUSTERED_FRACTION) if first else None, T, GOOD_CF, step),
            (tag(fmt.ANOMALIES), content(fmt.ANOMALIES) if first else None, B, blobs(_json([FLAG])), step),
            (tag(fmt.SPRITE), content(fmt.SPRITE) if first else None, B, blobs(PNG, _json(LAYOUT)), step),
        ]

    write_run(tmp_path / "run1", snapshot(0))
    multiplexer = plugin_event_multiplexer.EventMultiplexer(tensor_size_guidance={fmt.PLUGIN_NAME: 0})
    multiplexer.AddRunsFromDirectory(str(tmp_path))
    multiplexer.Reload()
    reader = reading.Reader(data_provider.MultiplexerDataProvider(multiplexer, str(tmp_path)), sampling_hint=0)
    ctx = context.RequestContext()
    views = {
        "heatmap": lambda: reader.heatmap(ctx, "", "run1")["steps"],
        "anomalies": lambda: reader.anomalies(ctx, "", "run1")["checked_steps"],
        "sprite": lambda: reader.sprite(ctx, "", "run1", "dw", None)["steps"],
        "timeline": lambda: reader.timeline(ctx, "", "run1", "dw")["clustered_fraction"]["steps"],
    }
    assert all(view() == [0] for view in views.values())
    # A later second in the next file's name: TensorBoard reads a directory's files in name order
    # and skips a new one that sorts before the current one, as a file counter going from 9 to 10
    # within one second would (it depends on how many event files this process wrote before).
    time.sleep(1.0)
    write_run(tmp_path / "run1", snapshot(1))
    multiplexer.Reload()
    monkeypatch.setattr(reading, "INDEX_TTL", 0.0)
    monkeypatch.setattr(reading, "INDEX_STALE", 0.0)
    assert {name: view() for name, view in views.items()} == dict.fromkeys(views, [0, 1])


def test_concurrent_misses_make_a_value_once():
    import threading

    cache, made, start = reading._LRU(100), [], threading.Event()

    def make():
        made.append(1)
        time.sleep(0.2)
        return "value", 1

    def ask():
        start.wait()
        assert cache.get_or_make("key", make) == "value"

    threads = [threading.Thread(target=ask) for _ in range(8)]
    for thread in threads:
        thread.start()
    start.set()
    for thread in threads:
        thread.join()
    assert made == [1]
    cache.put("big", "x", 101)  # over the budget: not kept
    assert cache.get("big") is None and cache.get("key") == "value"


def test_an_unexpected_error_is_a_logged_4xx(tmp_path, monkeypatch, caplog):
    write_run(tmp_path / "run1", [(tag(fmt.PROPORTIONS), content(fmt.PROPORTIONS), T, ZEROS9)])
    client = backend.make_client(tmp_path)

    def broken(*args, **kwargs):
        raise RecursionError("maximum recursion depth exceeded")

    monkeypatch.setattr(reading.Reader, "timeline", broken)
    body = backend.get_json(client, "timeline?run=run1&layer=dw", code=422)
    assert "RecursionError" in body["error"] and "kernelwatch" in caplog.text
    monkeypatch.setattr(reading.Reader, "sprite_png", broken)
    assert client.get(f"{backend.PREFIX}/sprite.png?run=run1&layer=dw").status_code == 422
    monkeypatch.setattr(reading.Reader, "runs", lambda *a: {"x": "y" * 2_000_000})
    assert "over the plugin's limit" in backend.get_json(client, "runs", code=422)["error"]


# -- a real TensorBoard on a hostile log directory --------------------------------------------


def q(value: str) -> str:
    return quote(value, safe="")


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[TensorBoard]:
    logs = write_fuzz_logs(tmp_path_factory.mktemp("fuzz_logs"))
    server = TensorBoard(logs, f"--samples_per_plugin={fmt.PLUGIN_NAME}=0")
    try:
        # The fast loader reads in the background: wait for the last records of the largest runs.
        server.wait_for("runs", lambda b: {"good", *hostile_runs()} <= {r["run"] for r in b["runs"]})
        server.wait_for("timeline?run=long&layer=dw", lambda b: b["proportions"]["steps"][-1:] == [2499])
        server.wait_for("anomalies?run=good", lambda b: len(b["checked_steps"]) == len(backend.STEPS))
        yield server
    finally:
        server.close()


def _routes(server: TensorBoard) -> list[str]:
    """Every route for every run and layer (and lens, measure, step, kernel size)."""
    routes = ["runs", "index.js", "static/style.css"]
    runs = server.json("runs")["runs"]
    names = {r["run"] for r in runs} | set(hostile_runs()) | {"good", "no such run"}
    for run in sorted(names):
        r = q(run)
        listed = next((x for x in runs if x["run"] == run), {"layers": [], "spectra": []})
        status, body, _, _ = server.get(f"layers?run={r}")
        layers = {entry["layer"] for entry in json.loads(body)["layers"]} if status == 200 else set()
        layers |= set(listed["layers"]) | {"dw", "no such layer"}
        routes += [f"layers?run={r}", f"anomalies?run={r}", f"spectrum?run={r}"]
        routes += [f"heatmap?run={r}&lens={lens}&measure={m}" for lens in fmt.LENSES for m in reading.MEASURES]
        routes += [f"spectrum.png?run={r}&kernel_size={k}" for k in {*listed["spectra"], 5, 7, 9}]
        for layer in sorted(layers):
            arg = f"run={r}&layer={q(layer)}"
            for lens in fmt.LENSES:
                routes += [f"timeline?{arg}&lens={lens}", f"sprite?{arg}&lens={lens}", f"sprite.png?{arg}&lens={lens}"]
            routes += [f"sprite?{arg}&step=1", f"sprite.png?{arg}&step=1"]
    return routes


MALFORMED = [
    "timeline", "timeline?run=good", "timeline?run=good&layer=", "timeline?run=%ff%fe&layer=%00",
    "timeline?run=good&layer=" + q(DW) + "&lens=gradient", "timeline?run=good&layer=" + q(DW) + "&lens=%00",
    "heatmap", "heatmap?run=good&measure=%3Cscript%3E", "heatmap?run=good&lens=", "heatmap?run=good&run=mixed",
    "sprite?run=good&layer=" + q(DW) + "&step=abc", "sprite?run=good&layer=" + q(DW) + "&step=",
    "sprite?run=good&layer=" + q(DW) + "&step=-1", "sprite?run=good&layer=" + q(DW) + "&step=1e3",
    "sprite?run=good&layer=" + q(DW) + "&step=" + "9" * 40, "sprite.png?run=good&layer=%E2%28%A1&step=0",
    "spectrum.png?run=good", "spectrum.png?run=good&kernel_size=0", "spectrum.png?run=good&kernel_size=-5",
    "spectrum.png?run=good&kernel_size=abc", "spectrum.png?run=good&kernel_size=" + "9" * 40,
    "layers?run=" + "x" * 20_000, "anomalies", "anomalies?run=%00", "runs?%%%", "runs?run=good&&&=",
    "static/%00.js", "static/..%2F..%2Fkernelwatch%2Fformat.py", "static/" + "a" * 5000 + ".js",
    "static/", "index.js?x=%00", "no_such_route",
]  # fmt: skip


@pytest.mark.slow
def test_every_route_answers_every_run_without_5xx(server):
    routes = _routes(server) + MALFORMED
    failures = []
    for route in routes:
        status, body, kind, seconds = server.get(route)
        if status >= 500 or seconds > ROUTE_SECONDS:
            failures.append(f"{status} in {seconds:.1f} s: {route[:200]} -> {body[:200]!r}")
        if kind.startswith("application/json"):
            assert len(body) <= MAX_JSON, (route, len(body))
            json.loads(body)  # well-formed, whatever the record held
    assert not failures, "\n".join(failures)
    assert len(routes) > 1000


@pytest.mark.slow
def test_the_good_run_is_still_served_in_full(server):
    runs = {r["run"]: r for r in server.json("runs")["runs"]}
    good = runs["good"]
    assert good["layers"] == sorted((DW, "odd/name")) and good["spectra"] == [5] and good["has_anomalies"]
    assert good["errors"] == []
    for layer in good["layers"]:
        body = server.json(f"timeline?run=good&layer={q(layer)}")
        assert body["proportions"]["steps"] == list(backend.STEPS) and body["errors"] == []
        assert body["quality"]["steps"] == list(backend.STEPS)
        for step in backend.STEPS:
            assert server.json(f"sprite?run=good&layer={q(layer)}&step={step}")["layout"]["n_kernels"] == 48
            status, png, kind, _ = server.get(f"sprite.png?run=good&layer={q(layer)}&step={step}")
            assert status == 200 and kind == "image/png" and png.startswith(fmt.PNG_SIGNATURE)
    heatmap = server.json("heatmap?run=good")
    assert heatmap["steps"] == list(backend.STEPS) and all(v is not None for row in heatmap["values"] for v in row)
    anomalies = server.json("anomalies?run=good")
    assert [f["severity"] for f in anomalies["anomalies"]] == ["error", "warning", "info"] and not anomalies["errors"]
    (spectrum,) = server.json("spectrum?run=good")["spectra"]
    assert spectrum["info"]["strip"]["colours"] and server.get("spectrum.png?run=good&kernel_size=5")[0] == 200


@pytest.mark.slow
def test_the_reported_cases_answer_messages(server):
    runs = {r["run"]: r for r in server.json("runs")["runs"]}

    def errors(run: str) -> str:
        return " ".join(runs[run]["errors"])

    assert "nested 1001 deep" in errors("deep_metadata")
    assert "nested 1000 deep" in server.json("anomalies?run=deep_blobs")["errors"][0]
    status, body, _, _ = server.get("sprite?run=deep_blobs&layer=dw")
    assert status == 422 and b"nested" in body
    assert "nested" in server.json("spectrum?run=deep_blobs")["errors"][0]
    assert "fields must be" in errors("renamed_fields")
    assert "blobs must be" in errors("png_only")
    status, body, _, _ = server.get("sprite?run=one_blob&layer=dw")
    assert status == 422 and b"1 blobs, expected 2" in body
    assert "expected numbers" in server.json("timeline?run=string_tensor&layer=dw")["errors"][0]
    assert "clusters must be" in errors("dict_clusters")
    assert "over the limit of 16,384" in errors("many_clusters")
    unkeyable = (('quote"run', "dw", b"rename the run's directory"), ("nul_layer", "a\x00b", b"escapes it"))
    for run, layer, hint in unkeyable:
        status, body, _, _ = server.get(f"sprite?run={q(run)}&layer={q(layer)}")
        assert status == 422 and hint in body
    layout = server.json("sprite?run=css_colour&layer=dw")["layout"]
    assert {g["colour"] for g in layout["groups"]} <= {fmt.FALLBACK_COLOUR, *LAYOUT_COLOURS}
    assert layout["groups"][0]["colour"] == fmt.FALLBACK_COLOUR
    colours = server.json("spectrum?run=css_colour")["spectra"][0]["info"]["strip"]["colours"]
    assert set(colours.values()) == {fmt.FALLBACK_COLOUR}
    # Others of our own.
    assert len(runs["many_bad_series"]["errors"]) == reading.MAX_ERRORS + 1
    flags = server.json("anomalies?run=many_flags")
    assert len(flags["anomalies"]) <= reading.MAX_ANOMALIES and "not shown" in flags["errors"][0]
    bad = server.json("anomalies?run=bad_anomalies")
    assert [f["step"] for f in bad["anomalies"]] == [8, 8] and len(bad["errors"]) == 7
    duplicates = server.json("layers?run=duplicates")
    assert {entry["layer"] for entry in duplicates["layers"]} == {"x", "a\tb"} and len(duplicates["errors"]) == 2
    assert server.get(f"sprite.png?run=duplicates&layer={q('a' + chr(9) + 'b')}")[0] == 200
    mixed = server.json("timeline?run=mixed&layer=good")
    assert mixed["proportions"]["steps"] == [1] and mixed["clustered_fraction"]["series"]["clustered_fraction"] == [0.5]
    assert server.get("sprite.png?run=mixed&layer=good")[0] == 200
    assert server.json("timeline?run=nan_inf&layer=dw")["proportions"]["series"]["on-centre"] == [None]
    long = server.json("timeline?run=long&layer=dw")
    assert len(long["proportions"]["steps"]) == reading.MAX_POINTS and fmt.PROPORTIONS in long["sampled"]


LAYOUT_COLOURS = {g["colour"] for g in LAYOUT["groups"]}
