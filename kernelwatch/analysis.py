"""Analyse every depthwise layer of a model or checkpoint against the shipped spectra, and its
stem with the first-layer lens (:mod:`kernelwatch.first_layer`).

>>> import torch, kernelwatch as kw
>>> model = torch.nn.Sequential(torch.nn.Conv2d(8, 8, 5, groups=8), torch.nn.Conv2d(8, 4, 1))
>>> report = kw.analyze(model)
>>> [layer.name for layer in report.layers], report.layers[0].n_kernels
(['0'], 8)
>>> report.first_layer is None, report.first_layer_note  # the first convolution is depthwise: no stem
(True, '')
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from kernelwatch import format as fmt
from kernelwatch._config import CLUSTERS
from kernelwatch.classification import ClassificationResult
from kernelwatch.errors import KernelWatchError
from kernelwatch.extraction import extract_depthwise, load_checkpoint
from kernelwatch.first_layer import FirstLayerReport, analyze_first_layer, stem_weight
from kernelwatch.kernel_sizes import SizeApproach, spectrum_size, unservable_reason
from kernelwatch.metrics import cluster_proportions, total_activation
from kernelwatch.spectrum import Spectrum
from kernelwatch.structure import ANALYSIS_NULL_KERNELS, Nulls, classify_with_null, median_dissimilarity


@dataclass
class LayerReport:
    """One depthwise layer: how many kernels, how many clustered, and into what; with the
    structure measures of :mod:`kernelwatch.structure` against its two nulls (NaN and empty
    where not measured) and how its kernels met the spectrum (``approach``, see
    :mod:`kernelwatch.kernel_sizes`). ``null_proportions`` holds each null's family shares."""

    name: str
    kernel_size: int
    n_kernels: int
    n_invalid: int
    clustered_fraction: float
    proportions: dict[str, float]
    total_activation: dict[str, dict[str, float]]
    dilation: tuple[int, int] | None = None
    median_dissimilarity: float = math.nan
    null_clustered_fraction: float = math.nan
    null_median_dissimilarity: float = math.nan
    smooth_null_clustered_fraction: float = math.nan
    smooth_null_median_dissimilarity: float = math.nan
    null_proportions: dict[str, dict[str, float]] = field(default_factory=dict)
    approach: str = "native"
    result: ClassificationResult | None = field(default=None, repr=False, compare=False)

    @property
    def chance_fraction(self) -> float:
        """The clustered fraction chance gives: the stricter null's (NaN if not measured)."""
        chance = fmt.chance_fraction(self.null_clustered_fraction, self.smooth_null_clustered_fraction)
        return math.nan if chance is None else chance

    @property
    def structure_above_chance(self) -> float:
        """The clustered fraction less :attr:`chance_fraction` (NaN if not measured)."""
        return self.clustered_fraction - self.chance_fraction

    @property
    def families_above_chance(self) -> dict[str, float | None]:
        """Each family's share less the stricter null's share of it (empty if not measured)."""
        return fmt.families_above_chance(self.proportions, self.null_proportions) if self.null_proportions else {}

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("result")
        out["structure_above_chance"] = self.structure_above_chance
        out["families_above_chance"] = self.families_above_chance
        return out


@dataclass
class AnalysisReport:
    """Per-layer reports plus the layers that could not be analysed and why; the stem's
    first-layer report (against the natural-image prior), or None and why not."""

    layers: list[LayerReport]
    skipped: dict[str, str]
    first_layer: FirstLayerReport | None = None
    first_layer_note: str = ""

    @property
    def n_kernels(self) -> int:
        return sum(layer.n_kernels for layer in self.layers)

    @property
    def n_invalid(self) -> int:
        """Kernels with NaN/Inf values or no variation (all-zero, constant): never clustered."""
        return sum(layer.n_invalid for layer in self.layers)

    @property
    def clustered_fraction(self) -> float:
        """The paper's per-model "Filters Clustered" figure (Table 1, appendix L)."""
        clustered = sum(layer.clustered_fraction * layer.n_kernels for layer in self.layers)
        return clustered / max(self.n_kernels, 1)

    @property
    def structure_above_chance(self) -> float:
        """The layers' structure above chance, weighted by their kernels (NaN if a layer's
        nulls were not measured)."""
        above = sum(layer.structure_above_chance * layer.n_kernels for layer in self.layers)
        return above / max(self.n_kernels, 1)

    @property
    def proportions(self) -> dict[str, float]:
        total = max(self.n_kernels, 1)
        return {
            name: sum(layer.proportions[name] * layer.n_kernels for layer in self.layers) / total for name in CLUSTERS
        }

    @property
    def families_above_chance(self) -> dict[str, float]:
        """Each family's share less the stricter null's, weighted by the layers' kernels: which
        families survive smoothness (NaN where a layer's nulls were not measured)."""
        total = max(self.n_kernels, 1)
        above = [(layer.families_above_chance, layer.n_kernels) for layer in self.layers]
        return {
            name: sum(_or_nan(families.get(name)) * n for families, n in above) / total for name in CLUSTERS
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "n_kernels": self.n_kernels,
            "n_invalid": self.n_invalid,
            "clustered_fraction": self.clustered_fraction,
            "structure_above_chance": self.structure_above_chance,
            "proportions": self.proportions,
            "families_above_chance": self.families_above_chance,
            "layers": [layer.to_dict() for layer in self.layers],
            "skipped": self.skipped,
            "first_layer": self.first_layer.to_json() if self.first_layer else None,
            "first_layer_note": self.first_layer_note,
        }

    def format_table(self) -> str:
        """A fixed-width table: one row per layer, proportions in percent, then the total.
        ``above``: the clustered fraction less the stricter null's (structure above chance).

        Invalid kernels get a column of their own and a note: they count as not clustered, so a
        layer of NaN weights would otherwise read like one of random weights.
        """
        short = {
            "on-centre": "on-c",
            "off-centre": "off-c",
            "on-cross": "on-x",
            "off-cross": "off-x",
            "first-derivative": "d1",
            "second-derivative": "d2",
            "on-square": "on-sq",
            "off-square": "off-sq",
            "other": "other",
        }
        width = max([len("layer"), *(len(layer.name) for layer in self.layers)])

        def row(name: str, k: str, kernels: int, invalid: int, clustered: float, above: float, shares: dict[str, float]) -> str:
            return f"{name:<{width}}  {k:>2} {kernels:>7} {invalid:>7} {100 * clustered:>6.1f} {100 * above:>6.1f} " + " ".join(
                f"{100 * shares[c]:>6.1f}" for c in CLUSTERS
            )

        head = f"{'layer':<{width}}  {'k':>2} {'kernels':>7} {'invalid':>7} {'clust%':>6} {'above':>6} " + " ".join(
            f"{short[c]:>6}" for c in CLUSTERS
        )
        rows = [head, "-" * len(head)]
        for layer in self.layers:
            k = f"{layer.kernel_size}" + ("d" if layer.dilation else "")
            figures = (layer.clustered_fraction, layer.structure_above_chance, layer.proportions)
            rows.append(row(layer.name, k, layer.n_kernels, layer.n_invalid, *figures))
        rows.append("-" * len(head))
        figures = (self.clustered_fraction, self.structure_above_chance, self.proportions)
        rows.append(row("all", "", self.n_kernels, self.n_invalid, *figures))
        families = self.families_above_chance
        rows.append(f"{'above chance':<{width}}  {'':>2} {'':>7} {'':>7} {'':>6} {'':>6} " + " ".join(
            f"{100 * families[c]:>6.1f}" for c in CLUSTERS
        ))
        if self.n_invalid:
            rows.append(
                f"note: {self.n_invalid} of {self.n_kernels} kernels are invalid (NaN/Inf, all-zero or "
                "constant) and count as not clustered"
            )
        for layer in self.layers:
            if layer.approach != "native":
                k = layer.kernel_size
                rows.append(f"note: layer {layer.name} ({k}x{k}) read through its {layer.approach}")
        for name, reason in self.skipped.items():
            rows.append(f"skipped {name}: {reason}")
        if self.first_layer is not None:
            rows.append(format_first_layer(self.first_layer))
        elif self.first_layer_note:
            rows.append(f"first layer: {self.first_layer_note}")
        return "\n".join(rows)


def format_first_layer(report: FirstLayerReport) -> str:
    """One line: the stem, its whitening score and its reflections.

    >>> import numpy as np
    >>> from kernelwatch.first_layer import first_layer_report
    >>> w = np.random.default_rng(0).standard_normal((16, 3, 4, 4))
    >>> format_first_layer(first_layer_report(w, layer="stem", stride=(4, 4)))[:40]
    'first layer stem: 3x4x4, stride 4; white'
    """
    kh, kw = report.kernel_size
    sy, sx = report.stride
    stride = f"{sy}" if sy == sx else f"{sy}x{sx}"
    whitening = "n/a" if report.whitening is None else f"{report.whitening:.2f}"
    against = f"{report.n_patches} patches" if report.source == "data" else "natural-image prior"
    names = ("R", "G", "B") if report.in_channels == 3 else tuple(f"c{i}" for i in range(report.in_channels))
    colour = " ".join(f"{name} {value:.2f}" for name, value in zip(names, report.reflections["colour"]))
    return (
        f"first layer {report.layer or '<root>'}: {report.in_channels}x{kh}x{kw}, stride {stride}; whitening {whitening} "
        f"({against}); sharpness {report.reflections['sharpness']:.2f}, noise {report.reflections['noise']:.2f}, "
        f"colour {colour}"
    )


def analyze_layer(
    name: str,
    kernels: torch.Tensor,
    spectrum: Spectrum,
    dilation: tuple[int, int] | None = None,
    activation: bool = True,
    threshold: float | None = None,
) -> LayerReport:
    """Classify one layer's ``[C, k, k]`` kernels and summarise them, with both nulls (of up to
    :data:`~kernelwatch.structure.ANALYSIS_NULL_KERNELS` kernels each); ``activation=False``
    skips the total-activation statistics (meaningless for an update); ``threshold`` replaces
    the spectrum's (see :meth:`Spectrum.classify`)."""
    approach = spectrum.approach_for(kernels)
    result, nulls = classify_with_null(
        kernels, spectrum, approach=approach, threshold=threshold, null_kernels=ANALYSIS_NULL_KERNELS
    )
    return layer_report(name, kernels, result, nulls, approach, dilation, activation)


def layer_report(
    name: str,
    kernels: torch.Tensor,
    result: ClassificationResult,
    nulls: Nulls,
    approach: SizeApproach,
    dilation: tuple[int, int] | None = None,
    activation: bool = True,
) -> LayerReport:
    """The :class:`LayerReport` of kernels already classified (with
    :func:`kernelwatch.structure.classify_many_with_null`, several layers at once)."""
    return LayerReport(
        name=name,
        kernel_size=kernels.shape[-1],
        n_kernels=len(result),
        n_invalid=int((~result.valid).sum()),
        clustered_fraction=float(result.clustered.mean()) if len(result) else 0.0,
        proportions=cluster_proportions(result.labels),
        total_activation=(total_activation(kernels.detach().cpu().numpy(), result.labels) if activation else {}),
        dilation=dilation,
        median_dissimilarity=median_dissimilarity(result),
        null_clustered_fraction=nulls.shuffled.clustered_fraction,
        null_median_dissimilarity=nulls.shuffled.median_dissimilarity,
        smooth_null_clustered_fraction=nulls.smooth.clustered_fraction,
        smooth_null_median_dissimilarity=nulls.smooth.median_dissimilarity,
        null_proportions={name: null.proportions for name, null in zip(fmt.NULLS, nulls) if null.proportions},
        approach=approach.describe(),
        result=result,
    )


def analyze(
    model_or_checkpoint: Any, spectra: dict[int, Spectrum] | None = None, threshold: float | None = None
) -> AnalysisReport:
    """Classify the kernels of every depthwise layer; layers no spectrum serves (even sizes)
    are skipped with the reason. Accepts what :func:`kernelwatch.extract_depthwise` accepts.
    ``spectra`` maps kernel sizes to spectra to use instead of the shipped ones; ``threshold``
    replaces every spectrum's, e.g. with the paper's (:data:`kernelwatch.PAPER_THRESHOLDS`).
    The stem gets :func:`kernelwatch.analyze_first_layer` (without data); a stem that cannot be
    analysed (NaN weights, say) leaves ``first_layer`` None with the reason, not an error."""
    if isinstance(model_or_checkpoint, (str, os.PathLike)):  # loaded once for both lenses
        model_or_checkpoint = load_checkpoint(model_or_checkpoint)
    layers = extract_depthwise(model_or_checkpoint)
    skipped = dict(layers.unsupported)
    if not layers and not skipped:
        raise KernelWatchError(
            "no depthwise convolutions found (nn.Conv2d with groups == in_channels > 1, "
            "or [C, 1, k, k] weights in a checkpoint)"
        )
    spectra = dict(spectra or {})
    reports = []
    for name, kernels in layers.items():
        k = kernels.shape[-1]
        if k not in spectra:
            reason = unservable_reason(k)
            if reason:
                skipped[name] = reason
                continue
            size = spectrum_size(k)
            spectra[k] = spectra[size] if size in spectra else Spectrum.pretrained(kernel_size=size)
        reports.append(analyze_layer(name, kernels, spectra[k], layers.dilated.get(name), threshold=threshold))
    if not reports:
        raise KernelWatchError(f"no depthwise layer could be analysed: {_reasons(skipped)}")
    first_layer, note = first_layer_of(model_or_checkpoint, depthwise={*layers, *layers.unsupported})
    return AnalysisReport(reports, skipped, first_layer, note)


def first_layer_of(model_or_checkpoint: Any, depthwise: set[str]) -> tuple[FirstLayerReport | None, str]:
    """The first-layer report of a model or state dict, or None and why. A first convolution
    among the ``depthwise`` layers is no stem (None, no reason: the table stays as it was for
    depthwise-only models), and is not measured; a stem that fails is reported, not raised."""
    try:
        if isinstance(model_or_checkpoint, (str, os.PathLike)):  # loaded once for both calls
            model_or_checkpoint = load_checkpoint(model_or_checkpoint)
        if stem_weight(model_or_checkpoint)[0] in depthwise:
            return None, ""
        return analyze_first_layer(model_or_checkpoint), ""
    except KernelWatchError as err:
        return None, str(err)


def _or_nan(value: float | None) -> float:
    return math.nan if value is None else value


def _reasons(skipped: dict[str, str], shown: int = 3) -> str:
    """The first few ``layer: reason`` pairs, so that a message stays one readable line."""
    listed = "; ".join(f"layer {name or '<root>'}: {reason}" for name, reason in list(skipped.items())[:shown])
    more = len(skipped) - shown
    return listed + (f"; and {more} more layer(s)" if more > 0 else "")
