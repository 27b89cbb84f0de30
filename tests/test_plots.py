"""`kernelwatch analyze ... --plot FILE.png`: the paper's figures in one PNG."""

from __future__ import annotations

import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from kernelwatch import cli
from kernelwatch.init import dog_

pytest.importorskip("matplotlib")


def png_size(path: Path) -> tuple[int, int]:
    """Width and height from the PNG's IHDR chunk."""
    header = path.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n" and header[12:16] == b"IHDR"
    return struct.unpack(">II", header[16:24])


def assert_drawn(path: Path) -> None:
    """At least 800 x 400, and not blank: many colours, inked in every quarter (four panels)."""
    from matplotlib.image import imread

    width, height = png_size(path)
    assert width >= 800 and height >= 400
    pixels = imread(path)[..., :3]
    assert len(np.unique(pixels.reshape(-1, 3).round(2), axis=0)) > 100
    h, w = pixels.shape[0] // 2, pixels.shape[1] // 2
    for quarter in (pixels[:h, :w], pixels[:h, w:], pixels[h:, :w], pixels[h:, w:]):
        assert (quarter < 0.9).any(axis=-1).mean() > 0.02  # more than a title or an empty frame


def save_dog_model(tmp_path: Path) -> str:
    torch.manual_seed(0)
    model = dog_(torch.nn.Sequential(
        torch.nn.Conv2d(3, 64, 3), torch.nn.Conv2d(64, 64, 5, groups=64), torch.nn.Conv2d(64, 64, 3, groups=64)
    ))  # fmt: skip
    path = str(tmp_path / "dog.pt")
    torch.save(model.state_dict(), path)
    return path


def test_plot_of_a_dog_initialised_model(tmp_path, capsys):
    plot = tmp_path / "figures.png"
    assert cli.main(["analyze", save_dog_model(tmp_path), "--plot", str(plot)]) == 0
    assert "all " in capsys.readouterr().out  # the table as without --plot
    assert_drawn(plot)


def test_a_model_without_clustered_kernels_still_plots(tmp_path):
    """Random weights (almost nothing clustered) must not break a panel."""
    torch.manual_seed(0)
    torch.save({"dw.weight": torch.randn(16, 1, 5, 5)}, tmp_path / "random.pt")
    assert cli.main(["analyze", str(tmp_path / "random.pt"), "--plot", str(tmp_path / "r.png")]) == 0
    assert png_size(tmp_path / "r.png") >= (800, 400)


def test_without_matplotlib_the_message_says_how_to_install_it(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    path = save_dog_model(tmp_path)
    assert cli.main(["analyze", path, "--plot", str(tmp_path / "f.png")]) == 2
    out = capsys.readouterr()
    assert out.out == "" and out.err.count("\n") == 1  # refused before the analysis
    assert 'pip install "kernelwatch[plots]"' in out.err


@pytest.mark.parametrize(("name", "message"), [("f.jpg", "name the file *.png"), ("no/such/f.png", "no such folder")])
def test_bad_plot_files_are_refused_first(tmp_path, capsys, name, message):
    assert cli.main(["analyze", save_dog_model(tmp_path), "--plot", str(tmp_path / name)]) == 2
    out = capsys.readouterr()
    assert out.out == "" and out.err.count("\n") == 1 and message in out.err


@pytest.mark.slow
def test_plot_of_a_dog_initialised_efficientnet_b0(tmp_path, capsys):
    import timm

    torch.manual_seed(0)
    path = tmp_path / "b0.pt"
    torch.save(dog_(timm.create_model("efficientnet_b0", pretrained=False)).state_dict(), path)
    plot = tmp_path / "b0.png"
    assert cli.main(["analyze", str(path), "--plot", str(plot)]) == 0, capsys.readouterr().err
    assert_drawn(plot)
