"""What a kernelwatch log holds, read with TensorBoard's own loader: ``kernelwatch summary``.

Torch-free: the same reader the dashboard uses, over TensorBoard's event multiplexer with every
snapshot kept.

>>> import tempfile
>>> from kernelwatch.writing import EventWriter
>>> with tempfile.TemporaryDirectory() as log_dir:
...     with EventWriter(f"{log_dir}/run1") as writer:
...         writer.write_anomalies(3, [])
...     summarise(log_dir)["runs"]["run1"]["anomalies"]
[]
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from kernelwatch import format as fmt
from kernelwatch.errors import KernelWatchError


def summarise(log_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """``{"runs": {RUN: {"layers": {LAYER: {"kernel_size", "n_kernels", "series": [{"step",
    "clustered_fraction", "median_dissimilarity", "null_clustered_fraction",
    "null_median_dissimilarity", "smooth_null_clustered_fraction",
    "smooth_null_median_dissimilarity", "structure_above_chance", "update": {...} or None}],
    "families_above_chance": {"weights": {"step", FAMILY: share above chance} or None, "update":
    ...}}}, "first_layer": {"layer", "step", "source", "n_patches", "whitening", "reflections"}
    or None, "anomalies": [...], "errors": [...]}}}`` for every run under ``log_dir``; layers in
    model order."""
    from tensorboard import context
    from tensorboard.backend.event_processing import data_provider, plugin_event_multiplexer

    from kernelwatch.reading import Reader

    path = Path(log_dir)
    if not path.is_dir():
        raise KernelWatchError(f"{str(path)!r} is not a directory of TensorBoard logs")
    # 0 keeps every point: the summary must not show TensorBoard's sample of the snapshots.
    multiplexer = plugin_event_multiplexer.EventMultiplexer(tensor_size_guidance={fmt.PLUGIN_NAME: 0, "scalars": 0})
    multiplexer.AddRunsFromDirectory(str(path))
    multiplexer.Reload()
    reader = Reader(data_provider.MultiplexerDataProvider(multiplexer, str(path)), sampling_hint=0)
    summary = reader.summary(context.RequestContext(), eid="")
    if not summary["runs"]:
        raise KernelWatchError(f"no kernelwatch records under {str(path)!r}")
    return summary


def format_summary(summary: dict[str, Any]) -> str:
    """A table per run: each layer's figures at its first and last snapshot (``first>last``),
    at the last the chance level (the stricter null's) and the structure above chance of both
    lenses; then the families above chance and the anomalies."""
    head = ("layer", "k", "kernels", "steps", "clust%", "chance%", "above", "median dissim", "chance",
            "update clust%", "chance%", "above")  # fmt: skip
    lines = []
    for run, content in summary["runs"].items():
        rows = [head]
        for name, layer in content["layers"].items():
            if not layer["series"]:
                continue
            first, last = layer["series"][0], layer["series"][-1]
            update = last["update"] or {}
            rows.append((
                name,
                _text(layer["kernel_size"], "d"),
                _text(layer["n_kernels"], "d"),
                f"{first['step']}>{last['step']}",
                f"{_pct(first['clustered_fraction'])}>{_pct(last['clustered_fraction'])}",
                _pct(_chance_fraction(last)),
                _pct(last["structure_above_chance"]),
                f"{_text(first['median_dissimilarity'], '.3f')}>{_text(last['median_dissimilarity'], '.3f')}",
                _text(fmt.chance_dissimilarity(last["null_median_dissimilarity"], last["smooth_null_median_dissimilarity"]), ".3f"),
                _pct(update.get("clustered_fraction")),
                _pct(_chance_fraction(update)),
                _pct(update.get("structure_above_chance")),
            ))  # fmt: skip
        widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
        lines.append(f"run {run}")
        for row in rows:
            lines.append("  " + "  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths))))
        for lens in fmt.LENSES:
            families = _families_above_chance(content["layers"].values(), lens)
            if families:
                shares = ", ".join(f"{family} {100 * value:+.1f}" for family, value in families.items())
                lines.append(f"  families above chance at the last snapshot ({lens}, % of all kernels): {shares}")
        first = content.get("first_layer")
        if first:
            reflections = first["reflections"]
            colour = ", ".join(_text(c, ".3f") for c in reflections["colour"])
            lines.append(
                f"  first layer {first['layer']} at step {first['step']}: whitening {_text(first['whitening'], '.3f')}, "
                f"sharpness {_text(reflections['sharpness'], '.3f')}, noise {_text(reflections['noise'], '.3f')}, "
                f"colour [{colour}] (patches: {first['source']}, {first['n_patches']})"
            )
        lines += [f"  step {flag['step']} [{flag['severity']}] {flag['message']}" for flag in content["anomalies"]]
        lines += [f"  unreadable: {error}" for error in content["errors"]]
    return "\n".join(lines)


def _families_above_chance(layers: Iterable[dict[str, Any]], lens: str) -> dict[str, float]:
    """Each family's share above chance in ``lens`` at the layers' last snapshots, weighted by
    their kernels."""
    weighted: dict[str, float] = {}
    total = 0
    for layer in layers:
        above, n = layer["families_above_chance"][lens], layer["n_kernels"]
        if above is None or not n:
            continue
        total += n
        for family, value in above.items():
            if family != "step" and value is not None:
                weighted[family] = weighted.get(family, 0.0) + value * n
    return {family: value / total for family, value in weighted.items()}


def _chance_fraction(figures: dict[str, Any]) -> float | None:
    return fmt.chance_fraction(figures.get("null_clustered_fraction"), figures.get("smooth_null_clustered_fraction"))


def _text(value: float | None, spec: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return format(value, spec)


def _pct(value: float | None) -> str:
    return _text(None if value is None else 100 * value, ".1f")


__all__ = ["format_summary", "summarise"]
