"""The event format: tags, metadata and payloads round-trip; anything else is a FormatError."""

import subprocess
import sys

import numpy as np
import pytest
from tensorboard.compat.proto import summary_pb2

from kernelwatch import format as fmt
from kernelwatch.errors import KernelWatchError

LAYER_NAMES = ["stages.0.blocks.1.conv_dw", "odd/name", "100%/x%2F", "", "module.blöck.0", "a//b/", 'q"\\b']
LAYER_KINDS = [k for k in fmt.KINDS if k not in (fmt.SPECTRUM, fmt.ANOMALIES)]


def test_format_imports_without_torch():
    code = "import sys; sys.modules['torch'] = None; import kernelwatch.format, kernelwatch.sprites; print('ok')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_constants():
    assert fmt.PLUGIN_NAME == "kernelwatch" and fmt.FORMAT_VERSION == 3
    assert issubclass(fmt.FormatError, KernelWatchError)
    assert set(fmt.KINDS) == {
        "proportions", "clustered_fraction", "null_proportions", "total_activation", "code_histogram",
        "sprite", "spectrum", "anomalies", "quality", "first_layer",
    }  # fmt: skip


@pytest.mark.parametrize("layer", LAYER_NAMES)
@pytest.mark.parametrize("kind", LAYER_KINDS)
def test_layer_tags_round_trip(kind, layer):
    tag = fmt.make_tag(kind, layer)
    assert tag.startswith(f"kernelwatch/{kind}/") and tag.count("/") == 2
    assert fmt.parse_tag(tag) == fmt.Tag(kind, layer)


def test_dotted_names_stay_readable_and_run_level_tags():
    assert fmt.make_tag(fmt.SPRITE, "features.3.conv.0") == "kernelwatch/sprite/features.3.conv.0"
    assert fmt.parse_tag(fmt.make_tag(fmt.SPECTRUM, 7)) == fmt.Tag("spectrum", "7x7")
    assert fmt.parse_tag("kernelwatch/anomalies") == fmt.Tag("anomalies", None)


@pytest.mark.parametrize(
    "tag",
    ["scalars/x", "kernelwatch", "kernelwatch/nope/x", "kernelwatch/proportions", "kernelwatch/anomalies/x",
     "kernelwatch/proportions/a/b", "kernelwatch.clustered_fraction/x"],
)  # fmt: skip
def test_foreign_or_malformed_tags_are_rejected(tag):
    with pytest.raises(fmt.FormatError):
        fmt.parse_tag(tag)


@pytest.mark.parametrize(
    "kind, subject",
    [("nope", "x"), (fmt.PROPORTIONS, None), (fmt.ANOMALIES, "x"), (fmt.SPECTRUM, "5"), (fmt.SPECTRUM, 0)],
)
def test_make_tag_rejects_wrong_subjects(kind, subject):
    with pytest.raises(fmt.FormatError):
        fmt.make_tag(kind, subject)


def test_scalar_tags_escape_the_layer():
    assert fmt.scalar_tag("clustered_fraction", "a/b") == "kernelwatch.clustered_fraction/a%2Fb"
    assert fmt.scalar_tag("quality", "conv1", "sparsity") == "kernelwatch.quality/conv1/sparsity"


@pytest.mark.parametrize("kind", fmt.KINDS)
def test_metadata_round_trips_with_data_class(kind):
    kwargs = {"kernel_size": 5} if kind == fmt.SPECTRUM else {} if kind == fmt.ANOMALIES else {"layer": "a/b.c"}
    meta = fmt.summary_metadata(kind, **kwargs)
    assert meta.plugin_data.plugin_name == "kernelwatch"
    blob = kind in (fmt.SPRITE, fmt.SPECTRUM, fmt.ANOMALIES, fmt.FIRST_LAYER)
    assert meta.data_class == (summary_pb2.DATA_CLASS_BLOB_SEQUENCE if blob else summary_pb2.DATA_CLASS_TENSOR)
    # Through the wire format, as TensorBoard's loaders see it.
    info = fmt.parse_metadata(summary_pb2.SummaryMetadata.FromString(meta.SerializeToString()))
    assert (info.version, info.kind, info.layer, info.kernel_size) == (
        fmt.FORMAT_VERSION, kind, kwargs.get("layer"), kwargs.get("kernel_size")
    )  # fmt: skip
    assert info.data_class == meta.data_class


def test_metadata_lists_the_axes():
    info = fmt.parse_metadata(fmt.summary_metadata(fmt.TOTAL_ACTIVATION, "dw"))
    assert info.fields["clusters"][0] == "on-centre" and len(info.fields["clusters"]) == 9
    assert info.fields["stats"] == ["count", "mean", "q1", "median", "q3"]
    assert fmt.parse_metadata(fmt.summary_metadata(fmt.SPRITE, "dw")).fields["blobs"] == ["png", "layout"]


def _meta(content: bytes, data_class=summary_pb2.DATA_CLASS_TENSOR, plugin="kernelwatch"):
    return summary_pb2.SummaryMetadata(
        plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name=plugin, content=content), data_class=data_class
    )


GOOD = (
    b'{"version":1,"kind":"quality","layer":"c","kernel_size":null,'
    b'"metrics":["sparsity","variance_entropy","orthogonality"]}'
)


@pytest.mark.parametrize(
    "meta, message",
    [
        (_meta(GOOD, plugin="scalars"), "not kernelwatch"),
        (_meta(b"\xff{not json"), "invalid JSON"),
        (_meta(b"[1, 2]"), "not a JSON object"),
        (_meta(GOOD.replace(b'"version":1', b'"version":"1"')), "no valid version"),
        (_meta(GOOD.replace(b'"version":1', b'"version":4')), "newer than this reader"),
        (_meta(GOOD.replace(b"{", b'{"lens":"update",', 1)), "invalid lens"),
        (_meta(GOOD.replace(b"{", b'{"lens":"gradient",', 1)), "invalid lens"),
        (_meta(GOOD.replace(b"{", b'{"order":-1,', 1)), "invalid layer order"),
        (_meta(GOOD.replace(b"{", b'{"order":"3",', 1)), "invalid layer order"),
        (_meta(GOOD.replace(b"quality", b"qualia")), "unknown kernelwatch record kind"),
        # Version 3 introduced the nulls' proportions: a version-2 record of that kind is forged.
        (_meta(b'{"version":2,"kind":"null_proportions","layer":"c","kernel_size":null,'
               b'"nulls":["shuffled","smooth"],"clusters":[]}'), "unknown kernelwatch record kind"),
        (_meta(GOOD, data_class=summary_pb2.DATA_CLASS_BLOB_SEQUENCE), "data class"),
        (_meta(GOOD, data_class=summary_pb2.DATA_CLASS_UNKNOWN), "data class"),
        (_meta(GOOD.replace(b'"layer":"c"', b'"layer":null')), "invalid layer"),
        (_meta(GOOD.replace(b'"metrics"', b'"metric"')), "lacks fields"),
    ],
)
def test_bad_metadata_raises_format_error(meta, message):
    assert fmt.parse_metadata(_meta(GOOD)).kind == "quality"
    with pytest.raises(fmt.FormatError, match=message):
        fmt.parse_metadata(meta)


def test_unknown_json_keys_are_ignored():
    info = fmt.parse_metadata(_meta(GOOD.replace(b"{", b'{"future_key":[1],', 1)))
    assert "future_key" not in info.fields


def test_json_is_strict_and_plain():
    assert fmt.decode_json(fmt.encode_json({"a": np.arange(2), "b": [np.inf, np.float64(2.5)]})) == {
        "a": [0, 1], "b": [None, 2.5]
    }  # fmt: skip
    with pytest.raises(fmt.FormatError):
        fmt.decode_json(b"NaN-ish")


def test_decode_tensor_names_and_checks_shapes():
    info = fmt.parse_metadata(fmt.summary_metadata(fmt.TOTAL_ACTIVATION, "dw"))
    value = np.full((9, 5), np.nan)
    value[:, 0] = 0
    value[2] = [3, 1.0, 0.5, 1.0, 1.5]
    stats = {"count": 3, "mean": 1.0, "q1": 0.5, "median": 1.0, "q3": 1.5}
    assert fmt.decode_tensor(info, value) == {"on-cross": stats}
    hist = fmt.parse_metadata(fmt.summary_metadata(fmt.CODE_HISTOGRAM, "dw"))
    assert fmt.decode_tensor(hist, np.ones((2, 7)))["unclustered"].tolist() == [1] * 7
    for info, bad in [(info, np.zeros((9, 4))), (hist, np.zeros(2)), (hist, np.zeros((3, 7)))]:
        with pytest.raises(fmt.FormatError, match="shape"):
            fmt.decode_tensor(info, bad)
    with pytest.raises(fmt.FormatError, match="not tensors"):
        fmt.decode_tensor(fmt.parse_metadata(fmt.summary_metadata(fmt.SPRITE, "dw")), np.zeros(2))


def test_decode_blobs():
    from kernelwatch.sprites import kernel_sprite

    sprite = fmt.parse_metadata(fmt.summary_metadata(fmt.SPRITE, "dw"))
    png, layout = kernel_sprite(np.random.default_rng(0).standard_normal((4, 3, 3)), ["other"] * 4)
    assert fmt.decode_blobs(sprite, [png, fmt.encode_json(layout)]) == {"png": png, "layout": layout}
    # Validated, not just parsed: a truncated PNG signature and a layout lacking its keys are refused.
    with pytest.raises(fmt.FormatError, match="not a PNG"):
        fmt.decode_blobs(sprite, [b"\x89PNG", fmt.encode_json(layout)])
    with pytest.raises(fmt.FormatError, match="lacks"):
        fmt.decode_blobs(sprite, [png, b'{"cells":[]}'])
    with pytest.raises(fmt.FormatError, match="1 blobs, expected 2"):
        fmt.decode_blobs(sprite, [png])
    with pytest.raises(fmt.FormatError, match="invalid JSON"):
        fmt.decode_blobs(sprite, [png, b"{"])
    with pytest.raises(fmt.FormatError, match="not blob sequences"):
        fmt.decode_blobs(fmt.parse_metadata(fmt.summary_metadata(fmt.QUALITY, "c")), [b""])


ANOMALY = {"layer": "dw", "kind": "collapse", "severity": "warning", "message": "m", "numbers": {"x": 1.5, "n": 3}}


@pytest.mark.parametrize(
    "bad",
    [
        {"not": "a list"},
        [{**ANOMALY, "severity": "fatal"}],
        [{k: v for k, v in ANOMALY.items() if k != "numbers"}],
        [{**ANOMALY, "numbers": {"x": "1"}}],
        [{**ANOMALY, "numbers": {"x": True}}],
        [{**ANOMALY, "layer": 3}],
        ["text"],
    ],
)
def test_check_anomalies(bad):
    assert fmt.check_anomalies([ANOMALY, {**ANOMALY, "layer": None, "numbers": {"x": None}}])
    with pytest.raises(fmt.FormatError):
        fmt.check_anomalies(bad)


@pytest.mark.parametrize("layer", LAYER_NAMES)
@pytest.mark.parametrize("kind", fmt.UPDATE_KINDS)
def test_update_lens_tags_and_metadata_round_trip(kind, layer):
    tag = fmt.make_tag(kind, layer, lens=fmt.UPDATE)
    assert tag.startswith(f"kernelwatch/update/{kind}/") and tag.count("/") == 3
    assert fmt.parse_tag(tag) == fmt.Tag(kind, layer, fmt.UPDATE)
    assert tag != fmt.make_tag(kind, layer)
    info = fmt.parse_metadata(fmt.summary_metadata(kind, layer, lens=fmt.UPDATE, order=4))
    assert (info.lens, info.order) == (fmt.UPDATE, 4)


def test_the_update_lens_has_no_activation_quality_or_run_level_records():
    for kind in (fmt.TOTAL_ACTIVATION, fmt.QUALITY, fmt.SPECTRUM, fmt.ANOMALIES):
        with pytest.raises(fmt.FormatError, match="update lens"):
            fmt.make_tag(kind, "dw", lens=fmt.UPDATE)
    with pytest.raises(fmt.FormatError, match="update lens"):
        fmt.summary_metadata(fmt.QUALITY, "dw", lens=fmt.UPDATE)
    with pytest.raises(fmt.FormatError):
        fmt.parse_tag("kernelwatch/update/quality/dw")


def test_version_1_records_still_read():
    """A version-1 clustered_fraction record (three fields, no lens, no order) reads back as
    the weights lens with the structure measures missing."""
    content = b'{"version":1,"kind":"clustered_fraction","layer":"dw","kernel_size":null,' \
        b'"fields":["clustered_fraction","n_kernels","n_invalid"]}'
    info = fmt.parse_metadata(_meta(content))
    assert (info.version, info.lens, info.order) == (1, fmt.WEIGHTS, None)
    decoded = fmt.decode_tensor(info, np.array([0.25, 64.0, 1.0]))
    assert decoded == {
        "clustered_fraction": 0.25, "n_kernels": 64.0, "n_invalid": 1.0, "kernel_size": None,
        "median_dissimilarity": None, "null_clustered_fraction": None, "null_median_dissimilarity": None,
        "smooth_null_clustered_fraction": None, "smooth_null_median_dissimilarity": None,
    }  # fmt: skip


def test_version_2_records_still_read():
    """A version-2 clustered_fraction record (seven fields) reads back with the smooth null missing."""
    fields = fmt.content_fields(fmt.CLUSTERED_FRACTION, version=2)
    assert fields == {"fields": list(fmt.CLUSTERED_FIELDS[:7])}
    content = fmt.encode_json({"version": 2, "kind": "clustered_fraction", "layer": "dw", "kernel_size": None, **fields})
    info = fmt.parse_metadata(_meta(content))
    decoded = fmt.decode_tensor(info, np.array([0.5, 64.0, 0.0, 5.0, 0.2, 0.01, 0.7]))
    assert decoded["null_median_dissimilarity"] == 0.7
    assert decoded["smooth_null_clustered_fraction"] is None and decoded["smooth_null_median_dissimilarity"] is None
    with pytest.raises(fmt.FormatError, match="shape"):  # a version-2 record with version 3's fields' values
        fmt.decode_tensor(info, np.zeros(9))


def test_null_proportions_decode_per_null_and_family():
    info = fmt.parse_metadata(fmt.summary_metadata(fmt.NULL_PROPORTIONS, "dw", lens=fmt.UPDATE))
    value = np.zeros((2, 9), np.float32)
    value[1, 4] = 0.25  # the smooth null's first derivatives
    decoded = fmt.decode_tensor(info, value)
    assert list(decoded) == ["shuffled", "smooth"] and decoded["smooth"]["first-derivative"] == 0.25
    assert fmt.families_above_chance({"first-derivative": 0.5, "on-centre": 0.125}, decoded) == {
        "first-derivative": 0.25, "on-centre": 0.125
    }  # fmt: skip
    with pytest.raises(fmt.FormatError, match="shape"):
        fmt.decode_tensor(info, np.zeros(9))
