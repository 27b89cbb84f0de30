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
import struct
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
    or None, "anomalies": [...], "errors": [...]}}, "errors": [...]}`` for every run under
    ``log_dir``; layers in model order.

    Each run is loaded on its own: a run TensorBoard's loader cannot read (an event file whose
    record claims more bytes than memory holds, an unreadable file) is listed with the file and
    the reason in its ``errors``, and the other runs are summarised. Directories that cannot be
    read are listed in the top-level ``errors``. A run's name is its directory's path under
    ``log_dir``, bytes that are not UTF-8 escaped (``\\xff``)."""
    path = Path(log_dir)
    if not str(log_dir):  # Path("") is the working directory
        raise KernelWatchError("the log directory is empty: pass a directory of TensorBoard logs")
    if not path.is_dir():
        raise KernelWatchError(f"{str(path)!r} is not a directory of TensorBoard logs")
    run_dirs, errors = _run_directories(path)
    runs: dict[str, Any] = {}
    unread: dict[str, str] = {}
    for name, run_dir in run_dirs.items():
        try:
            runs.update(_summarise_run(path, run_dir, name))
        except Exception as err:  # TensorBoard's loader fails a run in many ways; the others go on
            unread[name] = _unloadable(run_dir, err)
    if not runs:
        problems = [f"run {name}: {reason}" for name, reason in sorted(unread.items())] + errors
        reason = f"; {problems[0]}" if problems else ""
        raise KernelWatchError(f"no kernelwatch records could be read under {_shown(str(path))!r}{reason}")
    for name, reason in unread.items():
        runs[name] = {"layers": {}, "first_layer": None, "anomalies": [], "errors": [reason]}
    return {"format_version": fmt.FORMAT_VERSION, "runs": dict(sorted(runs.items())), "errors": errors}


def _summarise_run(log_dir: Path, run_dir: str, name: str) -> dict[str, Any]:
    """``{name: summary}`` of one run directory, read with TensorBoard's loader (every snapshot
    kept); ``{}`` when it holds no kernelwatch records."""
    from tensorboard import context
    from tensorboard.backend.event_processing import data_provider, plugin_event_multiplexer

    from kernelwatch.reading import Reader

    # 0 keeps every point: the summary must not show TensorBoard's sample of the snapshots.
    multiplexer = plugin_event_multiplexer.EventMultiplexer(tensor_size_guidance={fmt.PLUGIN_NAME: 0, "scalars": 0})
    multiplexer.AddRun(run_dir, name=name)
    # The accumulator itself, not multiplexer.Reload(), which logs an OSError and goes on.
    multiplexer.GetAccumulator(name).Reload()
    reader = Reader(data_provider.MultiplexerDataProvider(multiplexer, str(log_dir)), sampling_hint=0)
    return reader.summary(context.RequestContext(), eid="")["runs"]


def _run_directories(log_dir: Path) -> tuple[dict[str, str], list[str]]:
    """``{run name: directory}`` of every directory under ``log_dir`` holding an event file (as
    TensorBoard finds runs), and a message for each directory that cannot be read."""
    from tensorboard.backend.event_processing import io_wrapper

    runs, errors = {}, []

    def unreadable(err: OSError) -> None:
        errors.append(f"cannot read the directory {_shown(err.filename or '?')!r}: {err.strerror or err}")

    for directory, _, files in os.walk(log_dir, onerror=unreadable):
        if any(io_wrapper.IsSummaryEventsFile(os.path.join(directory, file)) for file in files):
            runs[_shown(os.path.relpath(directory, log_dir))] = directory
    return runs, errors


def _unloadable(run_dir: str, err: Exception) -> str:
    """Why TensorBoard's loader could not read a run: out of memory, the event file whose record
    claims more bytes than the file holds (TensorBoard's data server stops serving every run at
    such a file: docs/plugin.md); else the exception."""
    for file in sorted(os.listdir(run_dir)) if isinstance(err, MemoryError) else ():
        claim = _oversized_record(os.path.join(run_dir, file))
        if claim is not None:
            return (
                f"TensorBoard cannot read the event file {_shown(file)!r} ({claim}); move it out of the log "
                "directory and restart TensorBoard (docs/plugin.md, \"A damaged event file\")"
            )
    return f"TensorBoard cannot read this run ({type(err).__name__}: {_shown(str(err))[:300]})"


def _oversized_record(path: str) -> str | None:
    """Where an event file's record claims more bytes than the file holds, under a header whose
    checksum holds (so that TensorBoard's loaders believe it), or None."""
    from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c

    try:
        size = os.path.getsize(path)
        with open(path, "rb") as file:
            offset = 0
            while offset + 12 <= size:
                file.seek(offset)
                header = file.read(12)
                length, checksum = struct.unpack("<QI", header)
                if checksum != masked_crc32c(header[:8]):
                    return None  # a damaged header: the loaders stop there
                if length > size - offset - 12:
                    return f"its record at byte {offset:,} claims {length:,} bytes, and {size - offset - 12:,} follow"
                offset += 12 + length + 4
    except OSError:
        return None
    return None


def _shown(name: str) -> str:
    r"""A name from the file system as text that prints: bytes that are not UTF-8 escaped.

    >>> _shown(os.fsdecode(b"run\xff"))
    'run\\xff'
    """
    return os.fsencode(name).decode("utf-8", "backslashreplace")


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
    lines += [f"unreadable: {error}" for error in summary["errors"]]
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
