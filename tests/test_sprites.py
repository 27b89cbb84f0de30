"""Sprites and spectrum strips: valid PNGs whose pixels and layouts say what they should."""

import json
import struct
import zlib

import numpy as np
import pytest

from kernelwatch import patterns
from kernelwatch.errors import KernelWatchError
from kernelwatch.sprites import (
    CLUSTER_COLOURS,
    GROUPS,
    PNG_SIGNATURE,
    colourise,
    encode_png,
    kernel_sprite,
    spectrum_strip,
)

WHITE, GREY = [255, 255, 255], [150, 150, 150]


def decode_png(data: bytes) -> np.ndarray:
    """Minimal reader for the PNGs we write (8-bit RGB or palette, filter 0), checking every CRC;
    RGB pixels either way."""
    assert data[:8] == PNG_SIGNATURE
    pos, chunks = 8, {}
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        assert struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])[0] == zlib.crc32(kind + body)
        chunks[kind] = chunks.get(kind, b"") + body
        pos += 12 + length
    width, height, depth, colour_type = struct.unpack(">IIBB", chunks[b"IHDR"][:10])
    assert depth == 8 and colour_type in (2, 3) and b"IEND" in chunks
    channels = 3 if colour_type == 2 else 1
    raw = np.frombuffer(zlib.decompress(chunks[b"IDAT"]), np.uint8).reshape(height, 1 + channels * width)
    assert (raw[:, 0] == 0).all()
    if colour_type == 2:
        return raw[:, 1:].reshape(height, width, 3)
    palette = np.frombuffer(chunks[b"PLTE"], np.uint8).reshape(-1, 3)
    assert len(palette) <= 256 and raw[:, 1:].max() < len(palette)
    return palette[raw[:, 1:]]


def hex_rgb(colour: str) -> list[int]:
    return [int(colour[i : i + 2], 16) for i in (1, 3, 5)]


def test_encode_png_round_trips():
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (7, 5, 3), dtype=np.uint8)
    assert (decode_png(encode_png(rgb)) == rgb).all()
    palette, indices = rng.integers(0, 256, (256, 3), dtype=np.uint8), rng.integers(0, 256, (7, 5), dtype=np.uint8)
    assert (decode_png(encode_png(indices, palette)) == palette[indices]).all()


def test_colour_map_is_diverging_and_centred_on_zero():
    rgb = colourise(np.array([[-4.0, -2.0, 0.0, 2.0, 4.0]]))[0]
    assert rgb[2].tolist() == WHITE
    assert rgb[0, 2] > rgb[0, 0] and rgb[4, 0] > rgb[4, 2]  # blue negative, red positive
    assert (rgb[1] > rgb[0]).all()  # half the peak is paler than the peak
    # Scaled per kernel: the same pattern at any amplitude gets the same colours.
    assert (colourise(np.array([[-0.01, 0.0, 0.02]])) == colourise(np.array([[-1.0, 0.0, 2.0]]))).all()
    assert colourise(np.zeros((3, 3))).reshape(-1, 3).tolist() == [WHITE] * 9
    assert colourise(np.array([[1.0, np.nan], [np.inf, 0.0]])).reshape(-1, 3).tolist() == [GREY] * 4


def labelled_kernels():
    kernels, labels = patterns.generate_mixture(150, 5, rng=0, noise=0.05)
    labels = labels.astype(object)
    labels[:20] = "unclustered"
    kernels[20, 1, 1], labels[20] = np.nan, "invalid"
    return kernels, labels.astype(str)


def test_sprite_groups_samples_and_draws_cells():
    kernels, labels = labelled_kernels()
    png, layout = kernel_sprite(kernels, labels, max_kernels=64)
    image = decode_png(png)
    assert image.shape == (layout["height"], layout["width"], 3)
    assert json.loads(json.dumps(layout)) == layout
    assert layout["n_kernels"] == 150 and layout["n_shown"] == len(layout["cells"]) == 64
    assert layout["kernel_size"] == 5 and layout["cell_size"] == 5 * layout["pixels_per_weight"] >= 24

    groups = [g["label"] for g in layout["groups"]]
    family = np.array([label.split("/")[0] for label in labels])
    assert groups == [g for g in GROUPS if g in set(family)]  # every group shown, in order
    for g in layout["groups"]:
        assert g["count"] == int(np.sum(family == g["label"])) and g["shown"] >= 1
        assert g["colour"] == CLUSTER_COLOURS[g["label"]]
        band = image[g["y"] : g["y"] + g["height"], g["x"] : g["x"] + g["width"]]
        assert (band == hex_rgb(g["colour"])).all()

    indices = [c["index"] for c in layout["cells"]]
    assert len(set(indices)) == 64
    assert [c["label"] for c in layout["cells"]] == [labels[i] for i in indices]
    ranks = [GROUPS.index(c["label"].split("/")[0]) for c in layout["cells"]]
    assert ranks == sorted(ranks)
    cell, scale = layout["cell_size"], layout["pixels_per_weight"]
    for c in layout["cells"]:
        drawn = image[c["y"] : c["y"] + cell, c["x"] : c["x"] + cell]
        assert (drawn[::scale, ::scale] == colourise(kernels[c["index"]])).all()
    assert GREY in [image[c["y"], c["x"]].tolist() for c in layout["cells"] if c["label"] == "invalid"]


def test_sprite_is_deterministic_and_keeps_small_layers_whole():
    kernels, labels = labelled_kernels()
    assert kernel_sprite(kernels, labels) == kernel_sprite(kernels, labels)
    _, layout = kernel_sprite(kernels[:30], labels[:30], max_kernels=64)
    assert sorted(c["index"] for c in layout["cells"]) == list(range(30))


def test_sprite_subtypes_are_contiguous_within_their_family():
    kernels, labels = patterns.generate("first-derivative", 40, 3, rng=1)
    _, layout = kernel_sprite(kernels, labels, max_kernels=40)
    seen = [c["label"] for c in layout["cells"]]
    assert seen == sorted(seen) and len(layout["groups"]) == 1


def test_sprite_with_more_groups_than_room_keeps_the_largest():
    labels = np.array(["on-centre"] * 5 + ["off-centre"] * 3 + ["other"] * 2 + ["invalid"])
    _, layout = kernel_sprite(np.ones((11, 3, 3)), labels, max_kernels=2)
    assert [g["label"] for g in layout["groups"]] == ["on-centre", "off-centre"]


def test_unknown_labels_count_as_other():
    _, layout = kernel_sprite(np.ones((2, 3, 3)), ["mystery", "on-centre"])
    assert [g["label"] for g in layout["groups"]] == ["on-centre", "other"]


def test_sprite_rejects_bad_input():
    with pytest.raises(KernelWatchError):
        kernel_sprite(np.zeros((2, 3, 4)), ["a", "b"])
    with pytest.raises(KernelWatchError):
        kernel_sprite(np.zeros((2, 3, 3)), ["a"])
    with pytest.raises(KernelWatchError):
        kernel_sprite(np.zeros((2, 3, 3)), ["a", "b"], max_kernels=0)
    with pytest.raises(KernelWatchError):
        spectrum_strip(np.zeros((0, 3, 3)), [])


def test_large_kernels_stay_a_sensible_size():
    _, layout = kernel_sprite(np.ones((4, 31, 31)), ["other"] * 4)
    assert 32 <= layout["cell_size"] <= 64


def test_spectrum_strip_band_follows_the_code_axis():
    parts = [patterns.generate(f, 40, 5, rng=2) for f in ("on-centre", "first-derivative", "off-centre")]
    prototypes = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    png, layout = spectrum_strip(prototypes, labels, n=6)
    image = decode_png(png)
    assert image.shape == (layout["height"], layout["width"], 3)
    assert [c["index"] for c in layout["cells"]] == [10, 30, 50, 70, 90, 110]
    assert list(layout["colours"]) == ["on-centre", "off-centre", "first-derivative"]
    band = layout["band"]
    row = image[band["y"] + band["height"] // 2, band["x"] : band["x"] + band["width"]]
    thirds = np.array_split(row, 3)
    for third, name in zip(thirds, ["on-centre", "first-derivative", "off-centre"]):
        assert (third[2:-2] == hex_rgb(CLUSTER_COLOURS[name])).all()
    cell, scale = layout["cell_size"], layout["pixels_per_weight"]
    for c in layout["cells"]:
        drawn = image[c["y"] : c["y"] + cell, c["x"] : c["x"] + cell]
        assert (drawn[::scale, ::scale] == colourise(prototypes[c["index"]])).all()
        # The band under a cell shows that cell's own label.
        assert (image[band["y"], c["x"] + cell // 2] == hex_rgb(CLUSTER_COLOURS[c["label"].split("/")[0]])).all()


def test_sprite_cells_carry_per_kernel_details():
    kernels, labels = patterns.generate_mixture(12, 5, rng=0)
    codes = np.linspace(0.0, 1.0, 12)
    dissimilarity = np.full(12, 0.123456)
    dissimilarity[3] = np.nan  # an invalid kernel has none
    _, layout = kernel_sprite(kernels, labels, max_kernels=8, details={"code": codes, "dissimilarity": dissimilarity})
    for cell in layout["cells"]:
        assert cell["code"] == round(codes[cell["index"]], 4)
        assert cell["dissimilarity"] == (None if cell["index"] == 3 else 0.1235)
    json.dumps(layout, allow_nan=False)
    with pytest.raises(KernelWatchError, match="one number per kernel"):
        kernel_sprite(kernels, labels, details={"code": codes[:5]})
