"""Read kernelwatch records through a TensorBoard data provider and shape them as JSON: the
dashboard's routes and ``kernelwatch summary``.

Only a data provider is used (never the multiplexer), so this works with TensorBoard's
default fast loader. Every record is validated on its own (:mod:`kernelwatch.format`): a
malformed or newer-version series becomes an entry in ``errors`` and the rest of the run is
still shown. Every answer is bounded (errors, snapshots, anomaly flags, spectra), so that none
passes 1 MB. Torch-free, like the format it reads.
"""

from __future__ import annotations

import bisect
import logging
import math
import re
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from tensorboard import errors as tb_errors
from tensorboard.data import provider as tb_provider

from kernelwatch import format as fmt
from kernelwatch.sprites import CLUSTER_COLOURS

logger = logging.getLogger(__name__)

#: Ask for every point; the data provider's own reservoir is the only limit.
_ALL = 1_000_000
#: TensorBoard's reservoir sizes for a third-party plugin without ``--samples_per_plugin``:
#: the fast loader keeps 100 tensors / 10 blob sequences per series, the Python loader 10 tensors.
DEFAULT_LIMITS = {fmt.TENSOR: (10, 100), fmt.BLOB_SEQUENCE: (10,)}
SAMPLING_FLAG = f"--samples_per_plugin={fmt.PLUGIN_NAME}=0"
#: Seconds a listing is reused. The dashboard asks ~5 routes at once, and TensorBoard reloads
#: logs every 5 s by default, so a listing this old is as fresh as the data behind it.
INDEX_TTL = 2.0
#: Seconds an older listing is still answered from while the runs are listed again aside: the
#: listing of a run of 5,000 layers (25,000 series) takes half a second, which no answer waits for.
INDEX_STALE = 10.0
# What the reader keeps of what it read, keyed by series version (RunIndex.versions), so never
# stale. A call to TensorBoard's data server takes about 40 ms however small its answer, so a
# dashboard that asks again, or for another step of a series, should not wait on one.
#: Points of blob sequences, and decoded tensor points.
_CACHED_SERIES_POINTS = 100_000
_CACHED_POINTS = 100_000
#: Decoded blobs, and heat maps and anomaly lists (made once per version of their records:
#: every dashboard asks for them when it opens a run), in bytes of their JSON; decoded JSON
#: takes several times its bytes in memory, so it counts _JSON_COST times.
_CACHED_BLOB_BYTES = 32 << 20
_CACHED_VIEW_BYTES = 32 << 20
_JSON_COST = 8
#: The stock scalars plugin, and the points per series TensorBoard keeps of it by default.
_SCALARS = "scalars"
_SCALAR_LIMIT = 1000
#: The content field naming the entries of each tensor kind the timeline shows.
_AXIS = {fmt.PROPORTIONS: "clusters", fmt.CLUSTERED_FRACTION: "fields", fmt.NULL_PROPORTIONS: "nulls", fmt.QUALITY: "metrics"}
#: Figures of a layer's ``clustered_fraction`` record the heat map can show.
MEASURES = fmt.SCALAR_MEASURES
#: Kinds written for classified (depthwise) layers only; quality is written for every conv.
_DEPTHWISE_KINDS = (fmt.PROPORTIONS, fmt.CLUSTERED_FRACTION, fmt.TOTAL_ACTIVATION, fmt.CODE_HISTOGRAM, fmt.SPRITE)
_LAYER_KINDS = (*_DEPTHWISE_KINDS, fmt.QUALITY)
#: What TensorBoard's own conversion of a tensor (``tensor_util.make_ndarray``, run on every point
#: as it is read) raises for a malformed one: values that do not fill its shape, an unknown or
#: unsupported dtype (TypeError, KeyError), a huge shape broadcast from one value.
_UNCONVERTIBLE = (ValueError, TypeError, KeyError, IndexError, MemoryError, OverflowError)

# Bounds of one answer, so that none passes 1 MB whatever the log holds (the plugin refuses any
# answer that would). Realistic logs stay far below them.
#: Messages in an answer's ``errors`` (each clipped), then one saying how many more there are.
MAX_ERRORS = 50
_MAX_MESSAGE = 500
#: Snapshots per timeline series; a longer one is thinned evenly and listed in ``sampled``.
MAX_POINTS = 2000
#: Layers x snapshots of a heat map; beyond it the snapshots are thinned evenly.
MAX_HEATMAP_CELLS = 100_000
#: Anomaly flags per answer, newest snapshots first, and the bytes of their JSON.
MAX_ANOMALIES = 2000
MAX_ANOMALY_BYTES = 600_000
#: Bytes of the spectrum infos of one answer.
MAX_SPECTRUM_BYTES = 600_000
#: First-layer energy profiles per answer (snapshots evenly spread, the latest included), and
#: points of each (principal components log-spaced: the profile is drawn on log-log axes).
MAX_PROFILES = 6
MAX_PROFILE_POINTS = 256
# Bounds of the work of one answer, whatever the run holds: listing 10^5 points takes the data
# server seconds, and every blob is a call of its own. A longer series is read as TensorBoard's
# sample of that many points (``downsample``: spread over the run, the latest kept).
#: Points of a sprite or first-layer series an answer lists (its slider's steps).
MAX_LISTED = 2000
#: Snapshots whose anomaly records one answer reads: the newest listed.
MAX_ANOMALY_RECORDS = 200
#: First-layer reports read for one answer's timeline and profiles.
MAX_FIRST_LAYER_REPORTS = 50
#: Threads reading one answer's blobs. Each answer has its own, so that a small run's answers
#: never wait behind a big run's reads.
_READ_THREADS = 4
#: Parsed metadata contents kept, so that listing the runs again parses only new series (a run
#: of 5,000 layers has 25,000).
_CACHED_CONTENTS = 200_000


class NotFound(LookupError):
    """A run, layer, step or kernel size that the log directory does not have."""


@dataclass
class RunIndex:
    """The kernelwatch series of one run: ``(kind, subject, lens) -> tag``, plus unreadable ones."""

    run: str
    tags: dict[tuple[str, str | int | None, str], str] = field(default_factory=dict)
    infos: dict[str, fmt.RecordInfo] = field(default_factory=dict)
    orders: dict[str, int] = field(default_factory=dict)
    max_step: int = 0
    last_update: float = 0.0
    errors: list[str] = field(default_factory=list)
    #: tag -> (max step, max wall time) in the listing: a series whose version is unchanged holds
    #: the same points, so what was read of it can be reused.
    versions: dict[str, tuple[int, float]] = field(default_factory=dict)
    entry: dict[str, Any] = field(default_factory=dict, repr=False)

    def describe(self) -> None:
        """Make :attr:`entry`, the run in the ``runs`` answer, once per listing: the dashboard
        asks for it every 5 s, and sorting 5,000 layers takes tens of ms."""
        self.entry = {
            "run": self.run,
            "layers": self.layers(),
            "lenses": self.lenses(),
            "spectra": sorted(s for (kind, s, _) in self.tags if kind == fmt.SPECTRUM),
            "has_anomalies": self.has(fmt.ANOMALIES),
            "first_layer": self.layers([fmt.FIRST_LAYER]),
            "max_step": self.max_step,
            "updated": self.last_update,
            "errors": _bounded(self.errors),
        }

    def layers(self, kinds: Iterable[str] = _DEPTHWISE_KINDS, lens: str = fmt.WEIGHTS) -> list[str]:
        """Layers with records of any of ``kinds`` in ``lens`` (by default the classified,
        depthwise ones), in the model's order where the writer recorded it."""
        kinds = set(kinds)
        found = {s for (kind, s, ls) in self.tags if kind in kinds and ls == lens and isinstance(s, str)}
        return sorted(found, key=lambda layer: (self.orders.get(layer, _UNORDERED), _natural(layer)))

    def lenses(self) -> list[str]:
        return [lens for lens in fmt.LENSES if any(ls == lens for (_, _, ls) in self.tags)]

    def tag(self, kind: str, subject: str | int | None = None, lens: str = fmt.WEIGHTS) -> str:
        try:
            return self.tags[kind, subject, lens]
        except KeyError:
            what = f"{kind} of {subject!r}" if subject is not None else kind
            lens_note = f" in the {lens} lens" if lens != fmt.WEIGHTS else ""
            raise NotFound(f"run {self.run!r} has no {what} records{lens_note}") from None

    def has(self, kind: str, subject: str | int | None = None, lens: str = fmt.WEIGHTS) -> bool:
        return (kind, subject, lens) in self.tags


class Reader:
    """JSON views of the log directory, as the plugin's routes serve them."""

    def __init__(self, data_provider: tb_provider.DataProvider, sampling_hint: int | None):
        self._provider = data_provider
        # 0 means "keep all"; None means TensorBoard's defaults apply.
        self._hint = sampling_hint
        self._cache_lock = threading.Lock()
        self._indexes: dict[str, tuple[float, dict[str, RunIndex]]] = {}
        self._listing = threading.Lock()
        self._series = _LRU(_CACHED_SERIES_POINTS)
        # By blob key and wall time: the anomalies of 200 snapshots are 200 blobs.
        self._blobs = _LRU(_CACHED_BLOB_BYTES)
        self._points = _LRU(_CACHED_POINTS)
        self._views = _LRU(_CACHED_VIEW_BYTES)
        self._contents = _LRU(_CACHED_CONTENTS)

    # -- listing -------------------------------------------------------------------------------

    def index(self, ctx: Any, eid: str) -> dict[str, RunIndex]:
        """Every run with kernelwatch series, from the provider's listings (no data read);
        reused for :data:`INDEX_TTL` seconds. Up to :data:`INDEX_STALE` seconds old it is
        answered from while a thread lists the runs again; older, one request lists them again
        while the others go on with the listing they have."""
        with self._cache_lock:
            cached = self._indexes.get(eid)
        age = time.monotonic() - cached[0] if cached else math.inf
        if age < INDEX_TTL:
            return cached[1]
        if not self._listing.acquire(blocking=cached is None):
            return cached[1]
        if age < INDEX_STALE:
            threading.Thread(target=self._list_aside, args=(ctx, eid), name="kernelwatch-list", daemon=True).start()
            return cached[1]
        try:
            with self._cache_lock:
                latest = self._indexes.get(eid)
            if latest is not cached and latest is not None:  # listed while this one waited
                return latest[1]
            return self._list(ctx, eid)
        finally:
            self._listing.release()

    def _list_aside(self, ctx: Any, eid: str) -> None:
        try:
            self._list(ctx, eid)
        except Exception as err:  # answers go on with the last listing; once it is too old, one says why
            logger.warning("kernelwatch: listing the runs failed: %s: %s", type(err).__name__, err)
        finally:
            self._listing.release()

    def _list(self, ctx: Any, eid: str) -> dict[str, RunIndex]:
        now = time.monotonic()
        runs: dict[str, RunIndex] = {}
        listers = ((fmt.TENSOR, self._provider.list_tensors), (fmt.BLOB_SEQUENCE, self._provider.list_blob_sequences))
        for data_class, lister in listers:
            for run, series in lister(ctx, experiment_id=eid, plugin_name=fmt.PLUGIN_NAME).items():
                _add_series(runs.setdefault(run, RunIndex(run)), data_class, series, self._parse)
        runs = dict(sorted(runs.items()))
        for index in runs.values():
            index.describe()
        with self._cache_lock:
            self._indexes[eid] = (now, runs)
        return runs

    def _parse(self, content: bytes, data_class: int) -> fmt.RecordInfo:
        """:func:`fmt.parse_content`, once per distinct content and data class."""
        key = (content, data_class)
        found = self._contents.get(key)
        if found is None:
            try:
                found = fmt.parse_content(content, data_class)
            except fmt.FormatError as err:
                found = str(err)
            self._contents.put(key, found, 1)
        if isinstance(found, str):
            raise fmt.FormatError(found)
        return found

    def run_index(self, ctx: Any, eid: str, run: str) -> RunIndex:
        # The full listing, not one filtered to the run: the fast loader answers a run-filtered
        # blob listing ten times slower (30 ms against 3 ms for 60 layers).
        index = self.index(ctx, eid).get(run)
        if index is None:
            raise NotFound(f"no kernelwatch data for run {run!r}")
        return index

    def sampling(self) -> dict[str, Any]:
        """What the frontend tells the user about TensorBoard's downsampling."""
        return {"keeps_all": self._hint == 0, "limit": self._hint, "flag": SAMPLING_FLAG}

    # -- views ---------------------------------------------------------------------------------

    def runs(self, ctx: Any, eid: str) -> dict[str, Any]:
        """Every run with its layers, lenses and spectra; ``updated`` is the wall time of its
        newest record, so the dashboard can open on the run that is training now."""
        runs = [index.entry for index in self.index(ctx, eid).values()]
        return {
            "format_version": fmt.FORMAT_VERSION,
            "sampling": self.sampling(),
            "colours": CLUSTER_COLOURS,
            "severities": fmt.SEVERITIES,
            "lenses": fmt.LENSES,
            "measures": MEASURES,
            "runs": runs,
        }

    def layers(self, ctx: Any, eid: str, run: str) -> dict[str, Any]:
        index = self.run_index(ctx, eid, run)
        kinds: dict[str, set[str]] = {}
        for kind, subject, _ in index.tags:
            kinds.setdefault(subject, set()).add(kind)
        layers = [
            {
                "layer": layer,
                "kinds": sorted(kinds[layer]),
                "lenses": [lens for lens in fmt.LENSES if index.has(fmt.CLUSTERED_FRACTION, layer, lens)],
            }
            for layer in index.layers(_LAYER_KINDS)
        ]
        return {"run": run, "layers": layers, "errors": _bounded(index.errors)}

    def timeline(self, ctx: Any, eid: str, run: str, layer: str, lens: str = fmt.WEIGHTS) -> dict[str, Any]:
        """Cluster proportions, clustered fraction with the structure measures, the nulls' family
        shares (``null_proportions``: per null, a ``{family: share}`` per step) and (weights
        lens) quality metrics of a layer over time."""
        index = self.run_index(ctx, eid, run)
        kinds = [k for k in _AXIS if index.has(k, layer, lens)]
        if not kinds:
            raise NotFound(f"run {run!r} has no timeline records for layer {layer!r} in the {lens} lens")
        data, errors = self._tensors(ctx, eid, index, [index.tag(k, layer, lens) for k in kinds], MAX_POINTS)
        out: dict[str, Any] = {"run": run, "layer": layer, "lens": lens, "sampled": [], "thinned": []}
        out["errors"] = _bounded(index.errors + errors)
        for kind in kinds:
            tag = index.tag(kind, layer, lens)
            points = data.get(tag, [])
            thinned = len(points) > MAX_POINTS
            if self._at_limit(fmt.TENSOR, len(points)) or thinned:
                out["sampled"].append(kind)
            if thinned:
                out["thinned"].append(kind)
                points = _thin(points, MAX_POINTS)
            names = fmt.CLUSTERED_FIELDS if kind == fmt.CLUSTERED_FRACTION else index.infos[tag].fields[_AXIS[kind]]
            out[kind] = {
                "steps": [step for step, _ in points],
                "series": {name: [value[name] for _, value in points] for name in names},
            }
        return out

    def heatmap(
        self, ctx: Any, eid: str, run: str, lens: str = fmt.WEIGHTS, measure: str = "clustered_fraction"
    ) -> dict[str, Any]:
        """One of :data:`MEASURES` for every layer at every snapshot of a lens."""
        if measure not in MEASURES:
            raise NotFound(f"unknown measure {measure!r}; expected one of {MEASURES}")
        index = self.run_index(ctx, eid, run)
        layers = [layer for layer in index.layers(lens=lens) if index.has(fmt.CLUSTERED_FRACTION, layer, lens)]
        # The writer writes the stock scalars in the event of a layer's clustered_fraction
        # record, so the versions of those records stand for all the heat map reads.
        versions = tuple(index.versions.get(index.tag(fmt.CLUSTERED_FRACTION, layer, lens)) for layer in layers)
        key = ("heatmap", eid, run, lens, measure, tuple(layers), versions)
        steps, values, sampled, thinned, errors = self._views.get_or_make(
            key, lambda: self._heatmap(ctx, eid, index, lens, measure, layers)
        )
        # Anomaly marks are drawn by the frontend from the anomalies route, which it asks for at
        # the same time: reading the anomaly blobs here too would make the heat map wait on them.
        return {
            "run": run,
            "lens": lens,
            "measure": measure,
            "layers": layers,
            "steps": steps,
            "values": values,
            "sampled_layers": sampled,
            "thinned": thinned,
            "errors": _bounded(index.errors + errors),
        }

    def _heatmap(
        self, ctx: Any, eid: str, index: RunIndex, lens: str, measure: str, layers: list[str]
    ) -> tuple[tuple[list[int], list[list[float | None]], int, bool, list[str]], int]:
        """``((steps, values, sampled layers, thinned, errors), cost)`` of a heat map: at most
        :data:`MAX_POINTS` columns and :data:`MAX_HEATMAP_CELLS` cells, each layer read as a
        sample of one more point than that (TensorBoard's: equally long series get the same
        steps), so that a longer series is never read whole."""
        columns = max(1, min(MAX_POINTS, MAX_HEATMAP_CELLS // max(len(layers), 1)))
        series = self._scalar_series(ctx, eid, index, lens, measure, layers, columns)
        rest = [layer for layer in layers if layer not in series]
        tags = {layer: index.tag(fmt.CLUSTERED_FRACTION, layer, lens) for layer in rest}
        data, errors = self._tensors(ctx, eid, index, tags.values(), columns)
        sampled = 0
        for layer, tag in tags.items():
            points = data.get(tag, [])
            sampled += self._at_limit(fmt.TENSOR, len(points))
            series[layer] = [(step, value[measure]) for step, value in points]
        steps = sorted({step for points in series.values() for step, _ in points})
        thinned = len(steps) > columns
        if thinned:
            steps, sampled = _thin(steps, columns), len(layers)
        # A dense layers x steps matrix (null where a layer lacks a snapshot): half the bytes
        # of [x, y, value] triples. A column holds a layer's latest value since the column
        # before: its very step, unless the steps were thinned.
        values = []
        for layer in layers:
            row: list[float | None] = [None] * len(steps)
            for step, value in series[layer]:
                row[bisect.bisect_left(steps, step)] = _round(value)
            values.append(row)
        return (steps, values, sampled, thinned, errors), _JSON_COST * 8 * (len(layers) + 1) * (len(steps) + 1)

    def anomalies(self, ctx: Any, eid: str, run: str, *, bounded: bool = True) -> dict[str, Any]:
        """The anomaly flags of a run, newest snapshot first, each with its step; ``bounded`` (as
        the dashboard asks), at most :data:`MAX_ANOMALIES` flags (:data:`MAX_ANOMALY_BYTES` of
        JSON) with a note on the rest."""
        index = self.run_index(ctx, eid, run)
        tag = index.tag(fmt.ANOMALIES)
        key = ("anomalies", eid, run, tag, index.versions.get(tag), bounded)
        made = self._views.get_or_make(key, lambda: self._anomalies(ctx, eid, index, bounded))
        flags, checked, sampled, errors = made
        return {"run": run, "anomalies": flags, "checked_steps": checked, "sampled": sampled, "errors": errors}

    def _anomalies(
        self, ctx: Any, eid: str, index: RunIndex, bounded: bool
    ) -> tuple[tuple[list[dict[str, Any]], list[int], bool, list[str]], int]:
        """``((flags, checked steps, sampled, errors), cost)`` of a run's anomalies; ``bounded``,
        of the newest :data:`MAX_ANOMALY_RECORDS` snapshots listed (:meth:`_listed`)."""
        tag = index.tag(fmt.ANOMALIES)
        if bounded:
            listed, thinned = self._listed(ctx, eid, index, tag)
            series = listed[-MAX_ANOMALY_RECORDS:]
        else:
            listed, thinned = self._blob_series(ctx, eid, index, tag), False
            series = listed
        info = index.infos[tag]
        # One blob per snapshot, read concurrently: 200 sequential reads take over a second.
        found = _concurrently(lambda datum: self._anomalies_of(ctx, index.run, tag, info, datum), series)
        flags, errors, size, omitted = [], [], 0, 0
        for datum, result in sorted(zip(series, found), key=lambda pair: -pair[0].step):
            if isinstance(result, fmt.FormatError):
                errors.append(f"{tag} at step {datum.step}: {result}")
                continue
            found_flags, nbytes = result
            full = len(flags) + len(found_flags) > MAX_ANOMALIES or size + nbytes > MAX_ANOMALY_BYTES
            if bounded and (omitted or full):
                omitted += len(found_flags)
            else:
                flags.extend({**flag, "step": datum.step} for flag in found_flags)
                size += nbytes
        flags.sort(key=lambda f: (-f["step"], -fmt.SEVERITIES.index(f["severity"])))
        if omitted:
            errors.insert(
                0,
                f"{omitted} anomaly flags of older snapshots are not shown: one answer holds at most "
                f"{MAX_ANOMALIES} flags ({MAX_ANOMALY_BYTES:,} bytes); `kernelwatch summary` lists them all",
            )
        if len(series) < len(listed):
            which = (
                f"the newest of a sample of {len(listed):,} spread over the run"
                if thinned
                else f"the newest of {len(listed):,}"
            )
            errors.insert(
                0,
                f"the flags of {len(series):,} snapshots with anomaly records are shown, {which}; "
                "`kernelwatch summary` lists them all",
            )
        checked = [datum.step for datum in series]
        sampled = self._at_limit(fmt.BLOB_SEQUENCE, len(listed))
        errors = _bounded(errors) if bounded else errors
        return (flags, checked, sampled, errors), _JSON_COST * (size + 16 * (len(flags) + len(checked)) + 1)

    def sprite(
        self, ctx: Any, eid: str, run: str, layer: str, step: int | None, lens: str = fmt.WEIGHTS
    ) -> dict[str, Any]:
        """The layout of a layer's sprite at ``step`` (the latest if None) and the sprite steps
        (:meth:`_listed`)."""
        index = self.run_index(ctx, eid, run)
        tag = index.tag(fmt.SPRITE, layer, lens)
        series, thinned = self._listed(ctx, eid, index, tag)
        datum = _at_step(series, step, f"sprite of {layer!r}", thinned)
        layout, _ = self._blob(ctx, run, tag, index.infos[tag], datum, "layout")
        return {
            "run": run,
            "layer": layer,
            "lens": lens,
            "step": datum.step,
            "steps": [d.step for d in series],
            "layout": layout,
            "sampled": self._at_limit(fmt.BLOB_SEQUENCE, len(series)) or thinned,
            "thinned": thinned,
        }

    def sprite_png(
        self, ctx: Any, eid: str, run: str, layer: str, step: int | None, lens: str = fmt.WEIGHTS
    ) -> bytes:
        index = self.run_index(ctx, eid, run)
        tag = index.tag(fmt.SPRITE, layer, lens)
        series, thinned = self._listed(ctx, eid, index, tag)
        datum = _at_step(series, step, f"sprite of {layer!r}", thinned)
        return self._blob(ctx, run, tag, index.infos[tag], datum, "png")[0]

    def first_layer(
        self, ctx: Any, eid: str, run: str, layer: str | None = None, step: int | None = None
    ) -> dict[str, Any]:
        """The first-layer lens of a run's stem (``layer``, or the run's first): the report at
        ``step`` (the latest if None) with the steps that have one (:meth:`_listed`), the
        whitening score and the reflections over up to :data:`MAX_FIRST_LAYER_REPORTS` of them,
        and the energy profile against the whitening prediction at up to :data:`MAX_PROFILES`."""
        index = self.run_index(ctx, eid, run)
        if layer is None:
            layers = index.layers([fmt.FIRST_LAYER])
            if not layers:
                raise NotFound(f"run {run!r} has no first_layer records")
            layer = layers[0]
        tag = index.tag(fmt.FIRST_LAYER, layer)
        series, thinned = self._listed(ctx, eid, index, tag)
        datum = _at_step(series, step, f"first_layer record of {layer!r}", thinned)
        key = ("first_layer", eid, run, tag, index.versions.get(tag))
        timeline, profiles, errors = self._views.get_or_make(key, lambda: self._first_layer(ctx, index, tag, series))
        # After the reports over time, among which the latest: read with them, not before them.
        report, _ = self._blob(ctx, run, tag, index.infos[tag], datum, "report")
        shown = {name: value for name, value in report.items() if name not in _PROFILES}
        return {
            "run": run,
            "layer": layer,
            "step": datum.step,
            "steps": [d.step for d in series],
            "report": shown,
            "timeline": timeline,
            "profiles": profiles,
            "sampled": self._at_limit(fmt.BLOB_SEQUENCE, len(series)) or thinned,
            "thinned": thinned,
            "errors": _bounded(index.errors + errors),
        }

    def _first_layer(
        self, ctx: Any, index: RunIndex, tag: str, series: list[tb_provider.BlobSequenceDatum]
    ) -> tuple[tuple[dict[str, Any], list[dict[str, Any]], list[str]], int]:
        """``((timeline, profiles, errors), cost)`` from the reports of a first-layer series, at
        most :data:`MAX_FIRST_LAYER_REPORTS` of them spread over it (the first and last kept)."""
        info = index.infos[tag]

        def read(datum: tb_provider.BlobSequenceDatum) -> dict[str, Any] | fmt.FormatError:
            try:
                return self._blob(ctx, index.run, tag, info, datum, "report")[0]
            except fmt.FormatError as err:
                return err

        series = _thin(series, MAX_FIRST_LAYER_REPORTS)
        found = _concurrently(read, series)
        errors = [f"{tag} at step {d.step}: {r}" for d, r in zip(series, found) if isinstance(r, fmt.FormatError)]
        reports = [(d.step, r) for d, r in zip(series, found) if not isinstance(r, fmt.FormatError)]
        channels = max((r["in_channels"] for _, r in reports), default=1)
        timeline = {
            "steps": [step for step, _ in reports],
            "source": [r["source"] for _, r in reports],
            "whitening": [r["whitening"] for _, r in reports],
            "sharpness": [r["reflections"]["sharpness"] for _, r in reports],
            "noise": [r["reflections"]["noise"] for _, r in reports],
            "colour": [r["reflections"]["colour"] for _, r in reports],
        }
        profiles = []
        for step, r in _thin(reports, MAX_PROFILES):
            components = _log_spaced(len(r["energy_profile"]), MAX_PROFILE_POINTS)
            profiles.append(
                {"step": step, "component": [i + 1 for i in components], "source": r["source"]}
                | {name: [r[name][i] for i in components] for name in _PROFILES}
            )
        size = 16 * (len(reports) * (5 + channels) + len(profiles) * 4 * MAX_PROFILE_POINTS)
        return (timeline, profiles, errors), _JSON_COST * size

    def first_layer_png(
        self, ctx: Any, eid: str, run: str, layer: str, step: int | None
    ) -> bytes:
        index = self.run_index(ctx, eid, run)
        tag = index.tag(fmt.FIRST_LAYER, layer)
        series, thinned = self._listed(ctx, eid, index, tag)
        datum = _at_step(series, step, f"first_layer record of {layer!r}", thinned)
        return self._blob(ctx, run, tag, index.infos[tag], datum, "png")[0]

    def spectrum(self, ctx: Any, eid: str, run: str) -> dict[str, Any]:
        """Every spectrum of the run (one per kernel size): its latest info JSON, as many as fit
        in :data:`MAX_SPECTRUM_BYTES`."""
        index = self.run_index(ctx, eid, run)
        spectra, errors, size = [], [], 0
        for k in sorted(s for (kind, s, _) in index.tags if kind == fmt.SPECTRUM):
            tag = index.tag(fmt.SPECTRUM, k)
            series = self._blob_series(ctx, eid, index, tag, 1)
            if not series:
                continue
            datum = series[-1]
            try:
                info, nbytes = self._blob(ctx, run, tag, index.infos[tag], datum, "info")
            except fmt.FormatError as err:
                errors.append(f"{tag}: {err}")
                continue
            size += nbytes
            if size > MAX_SPECTRUM_BYTES:
                errors.append(f"{tag}: not shown, the spectra of this run pass {MAX_SPECTRUM_BYTES:,} bytes")
                continue
            spectra.append({"kernel_size": k, "step": datum.step, "info": info})
        return {"run": run, "spectra": spectra, "errors": _bounded(index.errors + errors)}

    def spectrum_png(self, ctx: Any, eid: str, run: str, kernel_size: int) -> bytes:
        index = self.run_index(ctx, eid, run)
        tag = index.tag(fmt.SPECTRUM, kernel_size)
        series = self._blob_series(ctx, eid, index, tag, 1)
        if not series:
            raise NotFound(f"run {run!r} has no spectrum for {kernel_size}x{kernel_size} kernels")
        return self._blob(ctx, run, tag, index.infos[tag], series[-1], "png")[0]

    def summary(self, ctx: Any, eid: str) -> dict[str, Any]:
        """What the log holds, per run, layer (in model order) and step: the figures of both
        lenses with their structure above chance, each lens's families above chance at its last
        snapshot, and every anomaly flag. The JSON of ``kernelwatch summary --json``."""
        runs: dict[str, Any] = {}
        kinds = (fmt.CLUSTERED_FRACTION, fmt.PROPORTIONS, fmt.NULL_PROPORTIONS)
        for run, index in self.index(ctx, eid).items():
            layers = [layer for layer in index.layers() if index.has(fmt.CLUSTERED_FRACTION, layer)]
            tags = {
                (kind, layer, lens): index.tag(kind, layer, lens)
                for kind in kinds
                for layer in layers
                for lens in fmt.LENSES
                if index.has(kind, layer, lens)
            }
            data, errors = self._tensors(ctx, eid, index, tags.values())
            series = {key: data.get(tag, []) for key, tag in tags.items()}
            out: dict[str, Any] = {}
            for layer in layers:
                weights = series[fmt.CLUSTERED_FRACTION, layer, fmt.WEIGHTS]
                update = dict(series.get((fmt.CLUSTERED_FRACTION, layer, fmt.UPDATE), []))
                last = weights[-1][1] if weights else {}
                out[layer] = {
                    "kernel_size": _integer(last.get("kernel_size")),
                    "n_kernels": _integer(last.get("n_kernels")),
                    "series": [
                        {"step": step, **_figures(value), "update": _figures(update[step]) if step in update else None}
                        for step, value in weights
                    ],
                    "families_above_chance": {
                        lens: _families_above_chance(
                            series.get((fmt.PROPORTIONS, layer, lens), []),
                            series.get((fmt.NULL_PROPORTIONS, layer, lens), []),
                        )
                        for lens in fmt.LENSES
                    },
                }
            anomalies = {"anomalies": [], "errors": []}
            if index.has(fmt.ANOMALIES):
                anomalies = self.anomalies(ctx, eid, run, bounded=False)
            first_layer = None
            for stem in index.layers([fmt.FIRST_LAYER]):
                try:
                    first_layer = self._latest_first_layer(ctx, eid, index, stem)
                except fmt.FormatError as err:
                    errors.append(f"{index.tag(fmt.FIRST_LAYER, stem)}: {err}")
            runs[run] = {
                "layers": out,
                "first_layer": first_layer,
                "anomalies": [
                    {key: flag[key] for key in ("step", "layer", "kind", "severity", "message", "numbers")}
                    for flag in sorted(anomalies["anomalies"], key=lambda f: f["step"])
                ],
                "errors": index.errors + errors + anomalies["errors"],
            }
        return {"format_version": fmt.FORMAT_VERSION, "runs": runs}

    def _latest_first_layer(self, ctx: Any, eid: str, index: RunIndex, layer: str) -> dict[str, Any] | None:
        """The summary's first-layer entry: the stem's latest whitening and reflections."""
        tag = index.tag(fmt.FIRST_LAYER, layer)
        series = self._blob_series(ctx, eid, index, tag, 1)
        if not series:
            return None
        report, _ = self._blob(ctx, index.run, tag, index.infos[tag], series[-1], "report")
        keys = ("layer", "source", "n_patches", "whitening", "reflections")
        return {"step": series[-1].step, **{key: report[key] for key in keys}}

    # -- helpers -------------------------------------------------------------------------------

    def _tensors(
        self, ctx: Any, eid: str, index: RunIndex, tags: Iterable[str], limit: int | None = None
    ) -> tuple[dict[str, list[tuple[int, Any]]], list[str]]:
        """``tag -> [(step, decoded)]`` for tensor tags of a run; undecodable points become
        errors. With ``limit``, a series longer than that is TensorBoard's sample of one point
        more (so that the caller can tell), never read whole."""
        downsample = _ALL if limit is None else limit + 1
        keys = {tag: (eid, index.run, tag, index.versions.get(tag), downsample) for tag in tags}
        found = {tag: self._points.get(key) for tag, key in keys.items()}
        missing = [tag for tag, cached in found.items() if cached is None]
        if missing:
            try:
                read = self._read_tensors(ctx, eid, index.run, missing, downsample)
                unreadable = {}
            except _UNCONVERTIBLE:
                # TensorBoard converts every point as it reads them, so one malformed tensor
                # fails the whole read: read tag by tag to serve the others.
                read, unreadable = {}, {}
                for tag in missing:
                    try:
                        read.update(self._read_tensors(ctx, eid, index.run, [tag], downsample))
                    except _UNCONVERTIBLE as err:
                        unreadable[tag] = f"{tag}: TensorBoard cannot convert its tensors ({type(err).__name__}: {err})"
            for tag in missing:
                found[tag] = _decode_points(tag, index.infos[tag], read.get(tag, []), unreadable.get(tag))
                self._points.put(keys[tag], found[tag], len(found[tag][0]) + 1)
        return {tag: points for tag, (points, _) in found.items()}, [e for _, errors in found.values() for e in errors]

    def _read_tensors(self, ctx: Any, eid: str, run: str, tags: list[str], downsample: int) -> dict[str, list[Any]]:
        return self._provider.read_tensors(
            ctx,
            experiment_id=eid,
            plugin_name=fmt.PLUGIN_NAME,
            downsample=downsample,
            run_tag_filter=tb_provider.RunTagFilter(runs=[run], tags=tags),
        ).get(run, {})

    def _scalar_series(
        self, ctx: Any, eid: str, index: RunIndex, lens: str, measure: str, layers: list[str], limit: int
    ) -> dict[str, list[tuple[int, float]]]:
        """A measure from the writer's stock scalars: ten times faster to read than tensors
        through the fast loader. Layers without them, whose series fills the scalars'
        reservoir (so may be sampled) or is longer than ``limit`` (read as a sample of one point
        more), are left for the tensor records, which TensorBoard samples alike for every layer."""
        prefix = "" if lens == fmt.WEIGHTS else f"{lens}."
        tags = {fmt.scalar_tag(prefix + measure, layer): layer for layer in layers}
        try:
            found = self._provider.read_scalars(
                ctx,
                experiment_id=eid,
                plugin_name=_SCALARS,
                downsample=limit + 1,
                run_tag_filter=tb_provider.RunTagFilter(runs=[index.run], tags=list(tags)),
            ).get(index.run, {})
        except _UNCONVERTIBLE:  # a malformed scalar (Python loader): read the tensor records instead
            return {}
        return {
            tags[tag]: [(point.step, point.value) for point in points]
            for tag, points in found.items()
            if tag in tags and 0 < len(points) <= limit and len(points) < _SCALAR_LIMIT
        }

    def _blob_series(
        self, ctx: Any, eid: str, index: RunIndex, tag: str, limit: int | None = None
    ) -> list[tb_provider.BlobSequenceDatum]:
        """The points of a blob-sequence series; with ``limit``, TensorBoard's sample of at most
        that many (spread over the series, the latest kept)."""
        downsample = _ALL if limit is None else limit

        def read() -> tuple[list[tb_provider.BlobSequenceDatum], int]:
            series = self._provider.read_blob_sequences(
                ctx,
                experiment_id=eid,
                plugin_name=fmt.PLUGIN_NAME,
                downsample=downsample,
                run_tag_filter=tb_provider.RunTagFilter(runs=[index.run], tags=[tag]),
            )
            series = list(series.get(index.run, {}).get(tag, []))
            return series, len(series) + 1

        return self._series.get_or_make((eid, index.run, tag, index.versions.get(tag), downsample), read)

    def _listed(
        self, ctx: Any, eid: str, index: RunIndex, tag: str
    ) -> tuple[list[tb_provider.BlobSequenceDatum], bool]:
        """A slider's series (sprites, first-layer records): at most :data:`MAX_LISTED` points,
        spread over it with the first and last of TensorBoard's sample; whether it was thinned."""
        series = self._blob_series(ctx, eid, index, tag, MAX_LISTED + 1)
        if len(series) > MAX_LISTED:
            return _thin(series, MAX_LISTED), True
        return series, False

    def _blob(
        self, ctx: Any, run: str, tag: str, info: fmt.RecordInfo, datum: tb_provider.BlobSequenceDatum, name: str
    ) -> tuple[Any, int]:
        """Blob ``name`` of a blob-sequence point, read and validated (:func:`fmt.decode_blob`),
        with its size in an answer (its JSON's bytes); :class:`fmt.FormatError` when the record
        or TensorBoard cannot give it."""
        fmt.check_blob_count(info, len(datum.values))
        key = datum.values[info.fields["blobs"].index(name)].blob_key

        def read() -> tuple[tuple[Any, int], int]:
            try:
                blob = self._provider.read_blob(ctx, blob_key=key)
            except tb_errors.PublicError as err:
                raise fmt.FormatError(_unreadable_blob(run, tag, datum.step, err)) from err
            value = fmt.decode_blob(info, name, blob)
            if name in fmt.PNG_BLOBS:
                return (value, len(value)), len(value)
            size = len(fmt.encode_json(value))
            return (value, size), size * _JSON_COST

        # By wall time too: a resumed run that writes a step again has the same blob key.
        return self._blobs.get_or_make((key, datum.wall_time, name), read)

    def _anomalies_of(
        self, ctx: Any, run: str, tag: str, info: fmt.RecordInfo, datum: tb_provider.BlobSequenceDatum
    ) -> tuple[list[dict[str, Any]], int] | fmt.FormatError:
        """A snapshot's flags and the bytes of their JSON, or the FormatError that makes them
        unreadable (returned, not raised, so that one bad snapshot does not hide the others)."""
        try:
            return self._blob(ctx, run, tag, info, datum, "anomalies")
        except fmt.FormatError as err:
            return err

    def _at_limit(self, data_class: int, count: int) -> bool:
        """Whether a series fills TensorBoard's reservoir, i.e. snapshots may have been dropped."""
        if self._hint == 0:
            return False
        return count in ((self._hint,) if self._hint else DEFAULT_LIMITS[data_class])


def _concurrently(read: Callable[[Any], Any], items: list[Any]) -> list[Any]:
    """``[read(item) for item in items]`` on threads of this call's own: each blob is a call to
    the data server (tens of ms), and no answer waits on another answer's reads."""
    if len(items) < 2:
        return [read(item) for item in items]
    with ThreadPoolExecutor(max_workers=min(_READ_THREADS, len(items)), thread_name_prefix="kernelwatch-read") as pool:
        return list(pool.map(read, items))


def _decode_points(tag: str, info: fmt.RecordInfo, data: list[Any], unreadable: str | None) -> tuple[list, list[str]]:
    """``([(step, decoded)], errors)`` of a tensor series; undecodable points become errors."""
    points, errors = [], [unreadable] if unreadable else []
    for datum in data:
        try:
            points.append((datum.step, fmt.decode_tensor(info, datum.numpy)))
        except fmt.FormatError as err:
            errors.append(f"{tag} at step {datum.step}: {err}")
    return points, errors


class _LRU:
    """A thread-safe map that forgets its least recently used entries beyond a total cost.
    :meth:`get_or_make` makes a missing value once: callers that ask for it meanwhile wait for
    it rather than ask TensorBoard again, as ten dashboards opening a run at once would."""

    def __init__(self, budget: int):
        self._budget, self._cost = budget, 0
        self._entries: OrderedDict[Any, tuple[Any, int]] = OrderedDict()
        self._making: dict[Any, threading.Event] = {}
        self._lock = threading.Lock()

    def get(self, key: Any) -> Any:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            self._entries.move_to_end(key)
            return entry[0]

    def get_or_make(self, key: Any, make: Callable[[], tuple[Any, int]]) -> Any:
        """The value of ``key``, made by ``make() -> (value, cost)`` if missing."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
                return entry[0]
            making = self._making.get(key)
            if making is None:
                self._making[key] = threading.Event()
        if making is not None:  # another caller is making it
            making.wait()
            value = self.get(key)
            if value is not None:
                return value
            value, cost = make()  # that caller failed, or the value was too big to keep
            self.put(key, value, cost)
            return value
        try:
            value, cost = make()
            self.put(key, value, cost)
            return value
        finally:
            with self._lock:
                self._making.pop(key).set()

    def put(self, key: Any, value: Any, cost: int) -> None:
        if cost > self._budget:
            return
        with self._lock:
            old = self._entries.pop(key, None)
            self._cost += cost - (old[1] if old else 0)
            self._entries[key] = (value, cost)
            while self._cost > self._budget:
                self._cost -= self._entries.popitem(last=False)[1][1]


def _figures(value: dict[str, Any]) -> dict[str, Any]:
    """The summary's figures of one ``clustered_fraction`` record (None where not written), and
    its structure above chance."""
    figures = {name: value.get(name) for name in MEASURES}
    chance = fmt.chance_fraction(figures["null_clustered_fraction"], figures["smooth_null_clustered_fraction"])
    return figures | {"structure_above_chance": fmt.above_chance(figures["clustered_fraction"], chance)}


def _families_above_chance(
    proportions: list[tuple[int, dict[str, float]]], nulls: list[tuple[int, dict[str, dict[str, float]]]]
) -> dict[str, Any] | None:
    """``{"step", family: share above chance}`` at the last step that has both records, or None
    (logs before format version 3 have no ``null_proportions``)."""
    shares = dict(proportions)
    both = [step for step, _ in nulls if step in shares]
    if not both:
        return None
    step = both[-1]
    return {"step": step, **fmt.families_above_chance(shares[step], dict(nulls)[step])}


def _integer(value: float | None) -> int | None:
    # NaN and Inf have no integer (a malformed record may hold them).
    return None if value is None or not math.isfinite(value) else int(value)


def _round(value: float | None) -> float | None:
    # Four decimals are finer than any colour step, and halve the heat map's payload.
    return None if value is None or value != value else round(value, 4)


def _thin(items: list[Any], limit: int) -> list[Any]:
    """At most ``limit`` of ``items``, evenly spread, the first and the last kept.

    >>> _thin(list(range(10)), 4)
    [0, 3, 6, 9]
    """
    if len(items) <= limit:
        return items
    if limit < 2:
        return items[-1:]
    return [items[round(i * (len(items) - 1) / (limit - 1))] for i in range(limit)]


def _bounded(errors: list[str]) -> list[str]:
    """An answer's ``errors``: at most :data:`MAX_ERRORS` messages, each clipped, then one
    saying how many more there are."""
    clipped = [_clip(error, _MAX_MESSAGE) for error in errors[:MAX_ERRORS]]
    if len(errors) > MAX_ERRORS:
        clipped.append(f"... and {len(errors) - MAX_ERRORS} more unreadable records")
    return clipped


def _unreadable_blob(run: str, tag: str, step: int, err: Exception) -> str:
    """Why TensorBoard gave no blob; names the character when it is one its data server cannot
    key, and what to rename."""
    for what, name, fix in (
        ("run", run, "rename the run's directory"),
        ("tag", tag, "write the log again with a current kernelwatch, which escapes it in tags"),
    ):
        char = fmt.unkeyable(name)
        if char is not None:
            return (f"TensorBoard's data server cannot read the blobs of a {what} whose name holds {char!r} "
                    f"(a quote, backslash or control character): {fix}")
    return f"TensorBoard could not read a blob of {tag} at step {step}: {err}"


_PROFILES = ("eigenvalues", "energy_profile", "whitening_prediction")


def _log_spaced(n: int, limit: int) -> list[int]:
    """At most ``limit`` of the indices ``0..n-1``, evenly spread on a log scale of ``i + 1``
    (a log-log plot's x axis), the first and the last kept.

    >>> _log_spaced(5, 10), _log_spaced(1000, 6)
    ([0, 1, 2, 3, 4], [0, 3, 15, 62, 250, 999])
    """
    if n <= limit:
        return list(range(n))
    return sorted({int(round(x)) - 1 for x in np.geomspace(1, n, limit)})


def _at_step(
    series: list[tb_provider.BlobSequenceDatum], step: int | None, what: str, thinned: bool = False
) -> tb_provider.BlobSequenceDatum:
    if not series:
        raise NotFound(f"no {what} records")
    if step is None:
        return series[-1]
    for datum in series:
        if datum.step == step:
            return datum
    among = f" among the {len(series):,} read of a longer series (steps listed by this route)" if thinned else ""
    raise NotFound(f"no {what} at step {step}{among}")


def _add_series(
    index: RunIndex, data_class: int, series: dict[str, Any], parse: Callable[[bytes, int], fmt.RecordInfo]
) -> None:
    """Parse a run's listed series into ``index`` with ``parse`` (:func:`fmt.parse_content`);
    unreadable metadata becomes an error."""
    for tag, meta in series.items():
        index.max_step = max(index.max_step, meta.max_step)
        index.last_update = max(index.last_update, meta.max_wall_time)
        index.versions[tag] = (meta.max_step, meta.max_wall_time)
        try:
            info = parse(meta.plugin_content, data_class)
        except fmt.FormatError as err:
            index.errors.append(f"{_clip(tag)}: {err}")
            continue
        subject = info.kernel_size if info.kind == fmt.SPECTRUM else info.layer
        key = (info.kind, subject, info.lens)
        if key in index.tags:
            # Two series of one record (hand-made, or an older writer's unescaped tag beside the
            # current one): keep the one the current writer names.
            kept, dropped = sorted((index.tags[key], tag), key=lambda t: t != fmt.make_tag(*key))
            index.errors.append(f"{_clip(dropped)}: ignored, it holds the same records as {_clip(kept)}")
            if kept != tag:
                continue
            del index.infos[dropped]
        index.tags[key] = tag
        index.infos[tag] = info
        if info.order is not None and info.layer is not None:
            index.orders[info.layer] = info.order


def _clip(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


#: Layers of logs that recorded no order (format version 1) come after ordered ones.
_UNORDERED = 1 << 62


def _natural(name: str) -> list[Any]:
    """Sort key that puts ``convs.2`` before ``convs.10``. Numbers are runs of decimal digits
    (what ``int`` reads): ``str.isdigit`` also holds for ``²`` and ``①``, which ``int`` refuses.

    >>> sorted(["convs.10", "convs.2", "convs.1", "conv1²"], key=_natural)
    ['conv1²', 'convs.1', 'convs.2', 'convs.10']
    """
    return [(0, int(part), "") if part.isdecimal() else (1, 0, part) for part in re.split(r"(\d+)", name)]
