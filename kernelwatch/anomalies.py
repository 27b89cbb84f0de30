"""Anomaly flags on per-layer clustered fractions: memorisation-like layers, outlier layers,
regressions over time and invalid kernels; and on the model's stem, a shift of what its
updates reflect of the data or of the sampled inputs themselves (:class:`FirstLayerShift`). The thresholds and how they were measured are in
``docs/anomalies.md``.

:func:`detect` is a pure function of one snapshot's layer reports and the clustered fractions
of earlier snapshots; :class:`AnomalyDetector` keeps that history across calls (and across a
resumed run, through ``state_dict``).

>>> import torch, kernelwatch as kw
>>> model = torch.nn.Sequential(*[torch.nn.Conv2d(32, 32, 5, groups=32) for _ in range(5)])
>>> layers = {layer.name: layer for layer in kw.analyze(kw.init.dog_(model, seed=0)).layers}
>>> detect(step=0, layers=layers)
[]
>>> with torch.no_grad():
...     _ = model[2].weight.normal_()  # one layer's kernels become noise
>>> layers = {layer.name: layer for layer in kw.analyze(model).layers}
>>> [(a.layer, a.kind, a.severity) for a in detect(step=1, layers=layers)]
[('2', 'memorisation', 'warning')]
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Any

import numpy as np

from kernelwatch.errors import KernelWatchError
from kernelwatch.format import SEVERITIES, UPDATE, WEIGHTS

if TYPE_CHECKING:
    from kernelwatch.analysis import LayerReport
    from kernelwatch.first_layer import FirstLayerReport

#: What a flag can be about: rules (a) to (d) of docs/anomalies.md, and (e) the stem's shift.
KINDS = ("memorisation", "outlier", "regression", "invalid", "first_layer_shift")
#: Scales a median absolute deviation to a standard deviation under normality.
_MAD_TO_SD = 1.4826


@dataclass(frozen=True)
class Anomaly:
    """One flag: where and when, what kind, how bad, a sentence for people and its figures."""

    step: int
    layer: str | None  # None: the model as a whole
    kind: str
    severity: str
    message: str
    numbers: dict[str, float]

    def __post_init__(self) -> None:
        if self.kind not in KINDS or self.severity not in SEVERITIES:
            raise KernelWatchError(
                f"anomaly kind must be one of {KINDS} and severity one of {SEVERITIES}, "
                f"got {self.kind!r} and {self.severity!r}"
            )

    def to_dict(self) -> dict[str, Any]:
        """The record written to TensorBoard; passes :func:`kernelwatch.format.check_anomalies`."""
        return {
            "step": self.step,
            "layer": self.layer,
            "kind": self.kind,
            "severity": self.severity,
            "message": self.message,
            "numbers": dict(self.numbers),
        }


class AnomalyError(KernelWatchError):
    """Raised (by the monitor, under ``raise_on=``) for anomalies at or above a severity."""

    def __init__(self, anomalies: Sequence[Anomaly]):
        self.anomalies = list(anomalies)
        super().__init__("; ".join(f"[{a.severity}] {a.message}" for a in self.anomalies) or "no anomalies")


@dataclass(frozen=True)
class AnomalyConfig:
    """Every threshold of :func:`detect`. Defaults follow from the figures in
    ``docs/anomalies.md`` (``benchmarks/measure_anomaly_defaults.py``)."""

    structured_fraction: float = 0.2
    """A clustered fraction at or above this is "structured": the reference layers of (b) must
    reach it (as a median), and so must a layer's best earlier value for (c); for (a), and to
    tell whether the weights are structured, the same bound holds for the structure above
    chance (the clustered fraction less the null level). Measured: trained
    EfficientNet-Lite0/1/2 layers 0.177 clustered (0.156 above chance) at the lowest;
    random-init timm layers 0.031 at the most."""

    null_margin: float = 0.05
    """(a) A layer is at the null level when its clustered fraction is at most the null level
    (the stricter of its two nulls, or the spectrum's shuffled-kernel rate) plus this margin."""

    null_levels: Mapping[int, float] | None = None
    """Null level per kernel size; ``None`` takes ``shuffled_false_positive_rate`` from the
    provenance of the shipped spectra (3x3: 0.024, 5x5: 0.010, 7x7: 0.0004)."""

    window: int = 2
    """(b) Neighbours: up to this many layers of the same kernel size on each side."""

    min_neighbours: int = 2
    """(b) Fewer same-size neighbours than this: fall back to the nearest layers of any size;
    fewer still: no outlier test. Also the least number of other layers for rule (a)."""

    outlier_z: float = 3.5
    """(b) Flag when ``(neighbours' median - fraction) / max(1.4826 * MAD, mad_floor)`` is at
    least this."""

    mad_floor: float = 0.05
    """(b) Floor of the robust spread, so that near-identical neighbours do not make tiny
    dips significant."""

    outlier_ratio: float = 0.5
    """(b) ... and the layer's fraction is below this share of its neighbours' median."""

    regression_drop: float = 0.25
    """(c) Flag when a layer's fraction fell by at least this (absolute) below its best earlier
    value, that best value having been structured."""

    min_kernels: int = 16
    """Layers with fewer kernels are not judged by (a), (b), (c) nor used as references: their
    fraction moves in steps of more than 1/16."""

    invalid_warning_fraction: float = 0.25
    """(d) Any invalid kernel is flagged; "info" below this share of the layer, "warning" from it.
    Trained models have a few dead kernels: at most 4 of 32 (12.5 %) in a Lite layer."""

    invalid_error_fraction: float = 0.5
    """(d) "error" from this share on; such a layer is left out of (a), (b) and (c)."""

    shift_baseline: int = 3
    """(e) The run's own baseline: the median of the stem's first this many figures (each
    figure counted from its own first value)."""

    shift_reflection: float = 0.15
    """(e) Flag when the noise reflection of the stem's update since the previous snapshot is
    at least this far from its baseline. Measured (``benchmarks/measure_first_layer_shift.py``):
    healthy runs drifted up to 0.07 from it in 400 steps, a pipeline that started adding noise
    moved it by -0.08 to -0.14; so at that scale the input detail raised every flag."""

    shift_detail: float = 1.1
    """(e) Flag when the sampled inputs' detail (:func:`input_detail`), as
    ``|log(detail / baseline)|``, is at least this: a factor of 3 either way."""


def severity_at_least(anomaly: Anomaly, level: str) -> bool:
    """Whether ``anomaly`` is at least as severe as ``level`` ("info" < "warning" < "error").

    >>> flag = Anomaly(3, "dw", "outlier", "warning", "m", {})
    >>> severity_at_least(flag, "warning"), severity_at_least(flag, "error")
    (True, False)
    """
    if level not in SEVERITIES:
        raise KernelWatchError(f"unknown severity {level!r}; expected one of {SEVERITIES}")
    return SEVERITIES.index(anomaly.severity) >= SEVERITIES.index(level)


@lru_cache(maxsize=None)
def _shipped_null_level(kernel_size: int) -> float:
    from kernelwatch.spectrum import Spectrum  # imports torch; only needed here

    return float(Spectrum.pretrained_provenance(kernel_size)["shuffled_false_positive_rate"])


def _null_level(layer: LayerReport, config: AnomalyConfig) -> float:
    """The configured level for the layer's kernel size, else the largest of the layer's own
    measured nulls (its kernels shuffled, smooth random kernels of its smoothness) and the
    shipped spectrum's."""
    k = layer.kernel_size
    if config.null_levels is not None and k in config.null_levels:
        return float(config.null_levels[k])
    measured = layer.chance_fraction
    return max(_shipped_null_level(k), measured) if math.isfinite(measured) else _shipped_null_level(k)


def _above_chance(layer: LayerReport, config: AnomalyConfig) -> float:
    """The layer's clustered fraction less its null level."""
    return layer.clustered_fraction - _null_level(layer, config)


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def detect(
    step: int,
    layers: Mapping[str, LayerReport],
    history: Sequence[Mapping[str, float]] = (),
    config: AnomalyConfig | None = None,
    updates: Mapping[str, LayerReport] | None = None,
) -> list[Anomaly]:
    """Flag the layers of one snapshot; ``layers`` in model order (as :func:`kernelwatch.analyze`
    lists them), ``history`` the clustered fraction per layer of earlier snapshots, ``updates``
    the reports of the update lens (each layer's ``W_t - W_first``).

    While the weights are unstructured (their median structure above chance below
    ``structured_fraction``), the update lens is judged too: early in a training from a random
    start the weights are unstructured everywhere, but the updates are not. Rule (b) runs on each
    layer's update; rule (a) on the model (:func:`_memorising_model`): the first half of its
    layers take updates with no structure beyond chance while the later layers' are structured,
    what trainings that memorise a small dataset showed (docs/anomalies.md). A layer gets at most
    one flag of each kind, and one flagged memorisation-like is not flagged as an outlier too
    (same evidence, one flag).

    >>> from kernelwatch.analysis import LayerReport
    >>> dead = LayerReport("dw", 3, 32, 32, 0.0, {}, {})
    >>> [(a.kind, a.severity, a.numbers["invalid_fraction"]) for a in detect(5, {"dw": dead})]
    [('invalid', 'error', 1.0)]
    """
    config = config or AnomalyConfig()
    out: list[Anomaly] = []
    for name, layer in layers.items():
        if layer.n_invalid > 0:
            out.append(_invalid(step, name, layer, config))
    # Only layers whose fraction means something take part in the structure rules.
    judged = {
        name: layer
        for name, layer in layers.items()
        if layer.n_kernels >= config.min_kernels
        and layer.n_invalid < config.invalid_error_fraction * layer.n_kernels
    }
    flagged: set[str] = set()
    lenses = [(WEIGHTS, judged)]
    # The update lens stands in for the weights only while they are still unstructured: once
    # they are, they are judged themselves, and the update of a layer that was structured from
    # the start (a DoG initialisation) may rightly be small and patternless.
    weights_structured = judged and statistics.median(_above_chance(r, config) for r in judged.values()) >= (
        config.structured_fraction
    )
    if updates and not weights_structured:
        lenses.append((UPDATE, {name: updates[name] for name in judged if name in updates}))
        flag = _memorising_model(step, lenses[-1][1], config)
        if flag:
            out.append(flag)
    # One layer's update at chance is no memorisation on its own: a healthy layer learning late
    # looks the same; rule (a) judges the update lens model-wide (above).
    checks = [(_memorisation, WEIGHTS, judged)] + [(_outlier, lens, reports) for lens, reports in lenses]
    for rule, lens, reports in checks:
        for name, layer in reports.items():
            flag = None if name in flagged else rule(step, name, layer, reports, config, lens)
            if flag:
                flagged.add(name)
                out.append(flag)
    best: dict[str, float] = {}
    for snapshot in history:
        for name, fraction in snapshot.items():
            best[name] = max(best.get(name, -math.inf), fraction)
    for name, layer in judged.items():
        if name in best:
            flag = _regression(step, name, layer, best[name], config)
            if flag:
                out.append(flag)
    return out


def _invalid(step: int, name: str, layer: LayerReport, config: AnomalyConfig) -> Anomaly:
    share = layer.n_invalid / max(layer.n_kernels, 1)
    if share >= config.invalid_error_fraction:
        severity = "error"
    elif share >= config.invalid_warning_fraction:
        severity = "warning"
    else:
        severity = "info"
    return Anomaly(
        step, name, "invalid", severity,
        f"layer {name!r} has {layer.n_invalid} of {layer.n_kernels} invalid kernels ({_pct(share)}): "
        "NaN/Inf, all-zero or constant",
        {"n_invalid": float(layer.n_invalid), "n_kernels": float(layer.n_kernels), "invalid_fraction": share},
    )


def _memorisation(
    step: int, name: str, layer: LayerReport, judged: Mapping[str, LayerReport], config: AnomalyConfig, lens: str
) -> Anomaly | None:
    """Rule (a) on one layer of the weights (``lens`` is the rules' common signature's)."""
    null = _null_level(layer, config)
    fraction = layer.clustered_fraction
    if fraction > null + config.null_margin:
        return None
    others = [_above_chance(other, config) for key, other in judged.items() if key != name]
    if len(others) < config.min_neighbours:
        return None
    others_median = statistics.median(others)
    # Only against a structured model: early in training every layer sits at the null level.
    if others_median < config.structured_fraction:
        return None
    k = layer.kernel_size
    message = (
        f"layer {name!r} looks memorisation-like: {_pct(fraction)} of its {k}x{k} kernels are clustered, at the "
        f"{_pct(null)} that chance gives (its kernels shuffled, or smooth random kernels as smooth as they are), "
        f"while the other {len(others)} layers are a median {_pct(others_median)} above chance"
    )
    return Anomaly(
        step, name, "memorisation", "warning", message,
        {
            "clustered_fraction": fraction,
            "null_level": null,
            "shuffled_null": layer.null_clustered_fraction,
            "smooth_null": layer.smooth_null_clustered_fraction,
            "others_above_chance": others_median,
            "n_others": float(len(others)),
            "n_kernels": float(layer.n_kernels),
            "update_lens": 0.0,
        },
    )


def _memorising_model(step: int, updates: Mapping[str, LayerReport], config: AnomalyConfig) -> Anomaly | None:
    """Rule (a) on the update lens, for the model: the first half of its layers (in model
    order) take updates whose structure above chance is at most ``null_margin`` on average,
    while the median of the later layers' is at least ``structured_fraction``."""
    if len(updates) < 2 * config.min_neighbours:
        return None
    above = [_above_chance(layer, config) for layer in updates.values()]
    half = len(above) // 2
    early, late = statistics.fmean(above[:half]), statistics.median(above[half:])
    if early > config.null_margin or late < config.structured_fraction:
        return None
    names = list(updates)
    return Anomaly(
        step, None, "memorisation", "warning",
        f"the model looks memorisation-like: training writes no pattern into its first {half} depthwise layers "
        f"({names[0]!r} to {names[half - 1]!r}): their updates since the first snapshot are a mean "
        f"{_pct(early)} above chance (smooth or shuffled random kernels), while the later {len(above) - half} "
        f"layers' are a median {_pct(late)} above it. Trainings that memorised a small dataset did this; "
        "trainings that generalised wrote patterns into every layer (docs/anomalies.md)",
        {
            "early_above_chance": early,
            "late_above_chance": late,
            "n_early": float(half),
            "n_late": float(len(above) - half),
            "update_lens": 1.0,
        },
    )


def _neighbours(name: str, judged: Mapping[str, LayerReport], config: AnomalyConfig) -> list[float]:
    """Up to ``window`` layers each side among those of the same kernel size (their level
    differs by size: trained 3x3 layers cluster less than 5x5 ones), else among all."""
    k = judged[name].kernel_size
    for pool in ([key for key, layer in judged.items() if layer.kernel_size == k], list(judged)):
        i = pool.index(name)
        near = pool[max(i - config.window, 0) : i] + pool[i + 1 : i + 1 + config.window]
        if len(near) >= config.min_neighbours:
            return [judged[key].clustered_fraction for key in near]
    return []


def _outlier(
    step: int, name: str, layer: LayerReport, judged: Mapping[str, LayerReport], config: AnomalyConfig, lens: str
) -> Anomaly | None:
    near = _neighbours(name, judged, config)
    if not near:
        return None
    median = statistics.median(near)
    mad = statistics.median(abs(x - median) for x in near)
    spread = max(_MAD_TO_SD * mad, config.mad_floor)
    fraction = layer.clustered_fraction
    z = (median - fraction) / spread
    if median < config.structured_fraction or z < config.outlier_z or fraction >= config.outlier_ratio * median:
        return None
    what = "kernels are" if lens == WEIGHTS else "kernels' updates since the first snapshot are"
    return Anomaly(
        step, name, "outlier", "warning",
        f"layer {name!r} is an outlier among its neighbours: {_pct(fraction)} of its {what} "
        f"clustered against a median of {_pct(median)} in its {len(near)} neighbouring layers "
        f"(robust z {z:.1f})",
        {
            "clustered_fraction": fraction,
            "neighbours_median": median,
            "neighbours_mad": mad,
            "robust_z": z,
            "n_neighbours": float(len(near)),
            "update_lens": float(lens == UPDATE),
        },
    )


def _regression(step: int, name: str, layer: LayerReport, best: float, config: AnomalyConfig) -> Anomaly | None:
    fraction = layer.clustered_fraction
    drop = best - fraction
    if best < config.structured_fraction or drop < config.regression_drop:
        return None
    return Anomaly(
        step, name, "regression", "warning",
        f"layer {name!r} lost structure: its clustered fraction fell from {_pct(best)} (best so far) "
        f"to {_pct(fraction)}",
        {"clustered_fraction": fraction, "previous_best": best, "drop": drop},
    )


#: A flag of rule (e) must hold at this many snapshots in a row.
SHIFT_PERSISTENCE = 2
#: Fewer sampled patches than this give no input detail: a small sample's smallest variances
#: come out low (a training's first snapshots measured half the detail of its later ones).
MIN_DETAIL_PATCHES = 2048


def input_detail(report: FirstLayerReport) -> float | None:
    """The share of the input patches' variance in the second half of their principal
    components (the smallest): the finest detail of the data, which blur takes away and noise
    adds (on dead-leaves images, 5x5 patches: 5e-5, blurred by sigma 1.5 px 1e-6, with noise of
    half their standard deviation 0.09). None for a report against the prior, or against fewer
    than :data:`MIN_DETAIL_PATCHES` sampled patches.

    >>> from types import SimpleNamespace
    >>> input_detail(SimpleNamespace(source="data", n_patches=4096, eigenvalues=np.array([4.0, 2.0, 1.0, 1.0])))
    0.25
    """
    values = np.asarray(report.eigenvalues, dtype=np.float64)
    total = values.sum()
    if report.source != "data" or report.n_patches < MIN_DETAIL_PATCHES or not total > 0:
        return None
    return float(values[len(values) // 2 :].sum() / total)


class FirstLayerShift:
    """Rule (e): the run's own early baseline of the stem's figures, and each figure's
    departures from it. :meth:`update` takes a snapshot's report and the reflections of the
    stem's update since the previous snapshot (None at the first), and returns the figures
    beyond their threshold at this snapshot and at the :data:`SHIFT_PERSISTENCE` - 1 before.

    >>> shift = FirstLayerShift(AnomalyConfig())
    >>> for noise in (0.25, 0.27, 0.26, 0.27, 0.45, 0.48):
    ...     found = shift.figures({"update noise": noise})
    >>> found
    {'update noise': (0.48, 0.26)}
    """

    def __init__(self, config: AnomalyConfig):
        self.config = config
        self.early: dict[str, list[float]] = {}  # each figure's first values, up to the baseline's count
        self.streak: dict[str, int] = {}  # snapshots in a row beyond the threshold

    def figures(self, values: dict[str, float | None]) -> dict[str, tuple[float, float]]:
        """``{figure: (value, baseline)}`` of the figures that have been beyond their threshold
        for :data:`SHIFT_PERSISTENCE` snapshots in a row."""
        out = {}
        for name, value in values.items():
            if value is None or not math.isfinite(value):
                continue
            early = self.early.setdefault(name, [])
            if len(early) < self.config.shift_baseline:
                early.append(value)
                continue
            baseline = statistics.median(early)
            if name == "input detail":
                beyond = baseline > 0 and value > 0 and abs(math.log(value / baseline)) >= self.config.shift_detail
            else:
                beyond = abs(value - baseline) >= self.config.shift_reflection
            self.streak[name] = self.streak.get(name, 0) + 1 if beyond else 0
            if self.streak[name] >= SHIFT_PERSISTENCE:
                out[name] = (value, baseline)
        return out

    def update(
        self, step: int, report: FirstLayerReport, update: dict[str, Any] | None
    ) -> list[Anomaly]:
        # The update's sharpness and colour are left out: in healthy runs its sharpness rose by
        # 0.15 as training went on, and its colour shares swung by 0.3 between snapshots.
        values = {"input detail": input_detail(report), "update noise": None if update is None else update["noise"]}
        found = self.figures(values)
        if not found:
            return []
        what = "; ".join(
            f"{name} {value:.4g} against {baseline:.4g} at the start of the run" for name, (value, baseline) in found.items()
        )
        numbers = {}
        for name, (value, baseline) in found.items():
            key = name.replace(" ", "_")
            numbers[key], numbers[f"{key}_baseline"] = value, baseline
        return [
            Anomaly(
                step, report.layer, "first_layer_shift", "warning",
                f"the first layer {report.layer!r} sees different data than at the start of the run "
                f"(a pipeline that started blurring, adding noise or changing colours?): {what}, "
                f"for {SHIFT_PERSISTENCE} snapshots in a row",
                numbers,
            )
        ]

    def state_dict(self) -> dict[str, Any]:
        return {"early": {k: list(v) for k, v in self.early.items()}, "streak": dict(self.streak)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.early = {str(k): [float(x) for x in v] for k, v in state.get("early", {}).items()}
        self.streak = {str(k): int(v) for k, v in state.get("streak", {}).items()}


#: Kinds the monitor reports only when :func:`detect` raised them at the snapshot before too.
PERSISTENT = ("memorisation", "outlier")


class AnomalyDetector:
    """:func:`detect` with the history kept: each :meth:`update` compares with the best
    clustered fraction each layer reached at earlier updates, and reports a memorisation or
    outlier flag only when :func:`detect` raised it at the previous update too: in healthy
    trainings a layer can lag the others for a snapshot (the demo's small-init arm's weights and
    updates did).

    >>> from kernelwatch.analysis import LayerReport
    >>> detector = AnomalyDetector()
    >>> detector.update(0, {"dw": LayerReport("dw", 5, 64, 0, 0.6, {}, {})})
    []
    >>> [a.kind for a in detector.update(1, {"dw": LayerReport("dw", 5, 64, 0, 0.1, {}, {})})]
    ['regression']
    """

    def __init__(self, config: AnomalyConfig | None = None):
        self.config = config or AnomalyConfig()
        # Regression compares with the best earlier value only, so that is all the history kept.
        self.best: dict[str, float] = {}
        # (layer, kind) of the PERSISTENT flags detect() raised at the previous update.
        self.update_flags: set[tuple[str | None, str]] = set()
        self.first_layer = FirstLayerShift(self.config)

    def update(
        self,
        step: int,
        layers: Mapping[str, LayerReport],
        updates: Mapping[str, LayerReport] | None = None,
        first_layer: FirstLayerReport | None = None,
        stem_update: dict[str, Any] | None = None,
    ) -> list[Anomaly]:
        """Flags of one snapshot; with ``first_layer`` (the stem's report) and ``stem_update``
        (the reflections of the stem's update since the previous snapshot), also rule (e)."""
        found = detect(step, layers, [self.best], self.config, updates)
        raised = {(a.layer, a.kind) for a in found if a.kind in PERSISTENT}
        anomalies = [a for a in found if a.kind not in PERSISTENT or (a.layer, a.kind) in self.update_flags]
        self.update_flags = raised
        for name, layer in layers.items():
            self.best[name] = max(self.best.get(name, -math.inf), layer.clustered_fraction)
        if first_layer is not None:
            anomalies += self.first_layer.update(step, first_layer, stem_update)
        return anomalies

    def state_dict(self) -> dict[str, Any]:
        """JSON-able state: the best clustered fraction of each layer so far, and the update-lens
        flags of the last update."""
        return {
            "best": dict(self.best),
            "update_flags": [list(flag) for flag in sorted(self.update_flags, key=lambda f: (f[0] or "", f[1]))],
            "first_layer": self.first_layer.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from :meth:`state_dict`; the detector keeps its own config."""
        try:
            self.best = {str(name): float(value) for name, value in state["best"].items()}
            self.update_flags = {
                (None if layer is None else str(layer), str(kind)) for layer, kind in state.get("update_flags", [])
            }
            self.first_layer.load_state_dict(state.get("first_layer", {}))
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise KernelWatchError(f"not an AnomalyDetector state: {err}") from err
