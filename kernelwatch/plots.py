"""The paper's figures for any model, in one PNG: ``kernelwatch analyze ... --plot FILE.png``.

Four panels: the share of each cluster per depthwise layer as stacked bars (Fig. 7 and 11),
the total activation (sum of a kernel's weights) per cluster as box plots (Fig. 10), the
spectrum of the model's most common kernel size with its labelled intervals and where the
model's kernels land on it (Fig. 3), and sample kernels of each cluster (Fig. 5). Kernels are
drawn as in the dashboard's sprites: each scaled by its own max |w|, blue negative, red positive.

Needs matplotlib (``pip install "kernelwatch[plots]"``), imported only here, with the Agg
backend: no display.

>>> import tempfile, torch, kernelwatch as kw
>>> model = kw.init.dog_(torch.nn.Sequential(torch.nn.Conv2d(32, 32, 5, groups=32)))
>>> with tempfile.TemporaryDirectory() as tmp:
...     plot_report(kw.analyze(model), kw.extract_depthwise(model), f"{tmp}/figures.png").stat().st_size > 0
True
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from kernelwatch._config import CLUSTERS
from kernelwatch.errors import KernelWatchError
from kernelwatch.metrics import family
from kernelwatch.sprites import CLUSTER_COLOURS, colourise

INSTALL_HINT = 'pip install "kernelwatch[plots]"'
#: Sample kernels drawn per cluster.
SAMPLES_PER_CLUSTER = 10
#: Prototypes drawn along the spectrum.
SPECTRUM_PROTOTYPES = 20
#: Intervals of the spectrum at least this wide (in code units) are named on the plot.
MIN_LABELLED_INTERVAL = 0.07


def check_plot_file(path: str | os.PathLike[str]) -> None:
    """Refuse, before any work, a plot file matplotlib cannot write: missing matplotlib, a name
    not ending in ``.png``, a folder that does not exist."""
    _pyplot()
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise KernelWatchError(f"--plot {str(path)!r}: the figures are written as PNG; name the file *.png")
    if not path.parent.is_dir():
        raise KernelWatchError(f"--plot {str(path)!r}: no such folder {str(path.parent)!r}")


def plot_report(report: Any, kernels: Mapping[str, Any], path: str | os.PathLike[str]) -> Path:
    """Draw the four panels for ``report`` (an :class:`~kernelwatch.AnalysisReport` whose layers
    hold their classification) and the layers' ``[C, k, k]`` ``kernels``; write ``path``."""
    plt = _pyplot()
    layers = [layer for layer in report.layers if layer.result is not None and layer.name in kernels]
    if not layers:
        raise KernelWatchError("nothing to plot: no analysed layer with its kernels")
    weights = {layer.name: np.asarray(kernels[layer.name], dtype=np.float64) for layer in layers}
    sizes: Counter[int] = Counter()
    for layer in layers:
        sizes[layer.kernel_size] += layer.n_kernels
    k = sizes.most_common(1)[0][0]  # the spectrum and the samples show the most common size

    figure = plt.figure(figsize=(16, 10), dpi=100, layout="constrained")
    grid = figure.add_gridspec(2, 2)
    _proportions(figure.add_subplot(grid[0, 0]), layers)
    _total_activation(figure.add_subplot(grid[0, 1]), layers, weights)
    _spectrum(figure, grid[1, 0], [layer for layer in layers if layer.kernel_size == k], k)
    _samples(figure.add_subplot(grid[1, 1]), [layer for layer in layers if layer.kernel_size == k], weights, k)
    figure.suptitle(
        f"{report.n_kernels} depthwise kernels in {len(layers)} layer(s), "
        f"{100 * report.clustered_fraction:.1f}% clustered",
        fontsize=14,
    )
    path = Path(path)
    try:
        figure.savefig(path)
    except OSError as err:
        raise KernelWatchError(f"cannot write the plot {str(path)!r}: {err}") from err
    finally:
        plt.close(figure)
    return path


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise KernelWatchError(f"--plot needs matplotlib: {INSTALL_HINT}") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _proportions(ax: Any, layers: list[Any]) -> None:
    """Fig. 7 and 11: each cluster's share of a layer's kernels, stacked; the gap to 100 % is
    the kernels that fit no cluster."""
    x = np.arange(1, len(layers) + 1)
    bottom = np.zeros(len(layers))
    for cluster in CLUSTERS:
        shares = np.array([100 * layer.proportions[cluster] for layer in layers])
        if shares.any():
            ax.bar(x, shares, bottom=bottom, color=CLUSTER_COLOURS[cluster], label=cluster, width=0.8)
            bottom += shares
    ax.set_xticks(x, [f"{i}\n{layer.kernel_size}x{layer.kernel_size}" for i, layer in zip(x, layers)], fontsize=7)
    ax.set_xlim(0.4, len(layers) + 0.6)
    ax.set_ylim(0, 100)
    ax.set_xlabel("depthwise layer (model order) and kernel size")
    ax.set_ylabel("% of the layer's kernels")
    ax.set_title("Cluster proportions per layer (Fig. 7, 11)")
    if bottom.any():
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))


def _total_activation(ax: Any, layers: list[Any], weights: dict[str, np.ndarray]) -> None:
    """Fig. 10: the sum of each kernel's weights, per cluster over the whole model."""
    sums = np.concatenate([weights[layer.name].reshape(layer.n_kernels, -1).sum(axis=1) for layer in layers])
    families = np.concatenate([family(layer.result.labels) for layer in layers])
    shown = [c for c in CLUSTERS if np.any((families == c) & np.isfinite(sums))]
    ax.set_title("Total activation per cluster (Fig. 10; whiskers 1.5 IQR, no outliers)")
    if not shown:
        ax.text(0.5, 0.5, "no clustered kernels", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
        return
    data = [sums[(families == c) & np.isfinite(sums)] for c in shown]
    boxes = ax.boxplot(data, tick_labels=shown, patch_artist=True, showfliers=False, medianprops={"color": "black"})
    for box, cluster in zip(boxes["boxes"], shown):
        box.set_facecolor(CLUSTER_COLOURS[cluster])
    ax.axhline(0.0, color="grey", linewidth=0.8, linestyle="--")
    names = [c.replace("-derivative", "\nderivative") for c in shown]
    ax.set_xticks(range(1, len(shown) + 1), [f"{c}\n(n={len(d)})" for c, d in zip(names, data)], fontsize=8)
    ax.set_ylabel("total activation (sum of weights)")


def _spectrum(figure: Any, cell: Any, layers: list[Any], k: int) -> None:
    """Fig. 3: prototypes along the code axis, the labelled intervals, and how many of the
    model's kernels have their nearest prototype at each code."""
    from kernelwatch.spectrum import Spectrum

    spectrum = Spectrum.pretrained(k)
    rows = cell.subgridspec(3, 1, height_ratios=(1, 0.4, 2.5))
    strip, band, counts = (figure.add_subplot(rows[i]) for i in range(3))
    # Each prototype drawn square above its own code, so that it sits over its interval.
    width = 1.0 / SPECTRUM_PROTOTYPES
    picks = ((np.arange(SPECTRUM_PROTOTYPES) + 0.5) * spectrum.n_codes / SPECTRUM_PROTOTYPES).astype(int)
    for index, tile in zip(picks, colourise(spectrum.prototypes[picks])):
        centre = float(spectrum.codes[index])
        strip.imshow(tile, extent=(centre - 0.45 * width, centre + 0.45 * width, 0, 0.9 * width))
    strip.set_xlim(0, 1)
    strip.set_ylim(0, 0.9 * width)
    strip.set_axis_off()
    strip.set_title(f"The {k}x{k} spectrum: prototypes, labelled intervals, the model's kernels (Fig. 3)")

    half_step = 0.5 / max(spectrum.n_codes - 1, 1)
    for label, start, end in spectrum.intervals():
        name = label.split("/")[0]
        band.axvspan(start - half_step, end + half_step, color=CLUSTER_COLOURS[name], linewidth=0)
        if end - start >= MIN_LABELLED_INTERVAL:  # narrower ones go by their colour
            band.text((start + end) / 2, 0.5, name, ha="center", va="center", fontsize=7,
                      transform=band.get_xaxis_transform())  # fmt: skip
    band.set_xlim(0, 1)
    band.set_yticks([])
    band.set_xticks([])

    codes = np.concatenate([layer.result.codes[layer.result.clustered] for layer in layers])
    unclustered = np.concatenate([layer.result.codes[layer.result.valid & ~layer.result.clustered] for layer in layers])
    bins = np.linspace(0, 1, 51)
    counts.hist([codes, unclustered], bins=bins, stacked=True, color=["#4e79a7", "#bab0ac"],
                label=["clustered", "nearest code of unclustered"])  # fmt: skip
    counts.set_xlim(0, 1)
    counts.set_xlabel("code (position on the spectrum)")
    counts.set_ylabel("kernels")
    counts.legend(fontsize=8)


def _samples(ax: Any, layers: list[Any], weights: dict[str, np.ndarray], k: int) -> None:
    """Fig. 5: random clustered kernels of each cluster, a row each."""
    kernels = np.concatenate([weights[layer.name] for layer in layers])
    families = np.concatenate([family(layer.result.labels) for layer in layers])
    rng = np.random.default_rng(0)
    shown = [c for c in CLUSTERS if np.any(families == c)]
    pad = 1
    cell = k + pad
    mosaic = np.full((max(len(shown), 1) * cell, SAMPLES_PER_CLUSTER * cell, 3), 255, np.uint8)
    for row, cluster in enumerate(shown):
        members = np.flatnonzero(families == cluster)
        picks = rng.choice(members, size=min(SAMPLES_PER_CLUSTER, len(members)), replace=False)
        for col, tile in enumerate(colourise(kernels[picks])):
            mosaic[row * cell : row * cell + k, col * cell : col * cell + k] = tile
    ax.imshow(mosaic, interpolation="nearest")
    ax.set_yticks([row * cell + (k - 1) / 2 for row in range(len(shown))], shown, fontsize=9)
    ax.set_xticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)
    ax.set_title(f"Random {k}x{k} kernels of each cluster (Fig. 5; red positive, blue negative)")
    if not shown:
        ax.text(0.5, 0.5, "no clustered kernels", ha="center", va="center", transform=ax.transAxes)


__all__ = ["INSTALL_HINT", "check_plot_file", "plot_report"]
