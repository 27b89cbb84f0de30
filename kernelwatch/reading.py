"""Read kernelwatch records through a TensorBoard data provider and shape them as JSON: the
dashboard's routes and ``kernelwatch summary``.

Only a data provider is used (never the multiplexer), so this works with TensorBoard's
default fast loader. Every record is judged on its own: a malformed or newer-version series
becomes an entry in ``errors`` and the rest of the run is still shown. Torch-free, like the
format it reads.
"""

from __future__ import annotations

import re
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from tensorboard.data import provider as tb_provider

from kernelwatch import format as fmt
from kernelwatch.sprites import CLUSTER_COLOURS

#: Ask for every point; the data provider's own reservoir is the only limit.
_ALL = 1_000_000
#: TensorBoard's reservoir sizes for a third-party plugin without ``--samples_per_plugin``:
#: the fast loader keeps 100 tensors / 10 blob sequences per series, the Python loader 10 tensors.
DEFAULT_LIMITS = {fmt.TENSOR: (10, 100), fmt.BLOB_SEQUENCE: (10,)}
SAMPLING_FLAG = f"--samples_per_plugin={fmt.PLUGIN_NAME}=0"
#: Seconds a listing is reused. The dashboard asks ~5 routes at once, and TensorBoard reloads
#: logs every 5 s by default, so a listing this old is as fresh as the data behind it.
INDEX_TTL = 2.0
_CACHED_ANOMALY_RECORDS = 20_000
#: The stock scalars plugin, and the points per series TensorBoard keeps of it by default.
_SCALARS = "scalars"
_SCALAR_LIMIT = 1000
#: The content field naming the entries of each tensor kind the timeline shows.
_AXIS = {fmt.PROPORTIONS: "clusters", fmt.CLUSTERED_FRACTION: "fields", fmt.QUALITY: "metrics"}
#: Figures of a layer's ``clustered_fraction`` record the heat map can show.
MEASURES = ("clustered_fraction", "median_dissimilarity", "null_clustered_fraction", "null_median_dissimilarity")
#: Kinds written for classified (depthwise) layers only; quality is written for every conv.
_DEPTHWISE_KINDS = (fmt.PROPORTIONS, fmt.CLUSTERED_FRACTION, fmt.TOTAL_ACTIVATION, fmt.CODE_HISTOGRAM, fmt.SPRITE)
_LAYER_KINDS = (*_DEPTHWISE_KINDS, fmt.QUALITY)


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
        # Decoded anomaly blobs by (blob key, wall time): a heat map over 200 snapshots would
        # otherwise read 200 blobs per request. Bounded; blobs are immutable per key.
        self._anomaly_cache: OrderedDict[tuple[str, float], list[dict[str, Any]]] = OrderedDict()
        self._cache_lock = threading.Lock()
        self._indexes: dict[str, tuple[float, dict[str, RunIndex]]] = {}
        self._pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="kernelwatch-read")

    # -- listing -------------------------------------------------------------------------------

    def index(self, ctx: Any, eid: str) -> dict[str, RunIndex]:
        """Every run with kernelwatch series, from the provider's listings (no data read);
        reused for :data:`INDEX_TTL` seconds."""
        now = time.monotonic()
        with self._cache_lock:
            cached = self._indexes.get(eid)
        if cached and now - cached[0] < INDEX_TTL:
            return cached[1]
        runs: dict[str, RunIndex] = {}
        listers = ((fmt.TENSOR, self._provider.list_tensors), (fmt.BLOB_SEQUENCE, self._provider.list_blob_sequences))
        for data_class, lister in listers:
            for run, series in lister(ctx, experiment_id=eid, plugin_name=fmt.PLUGIN_NAME).items():
                _add_series(runs.setdefault(run, RunIndex(run)), data_class, series)
        runs = dict(sorted(runs.items()))
        with self._cache_lock:
            self._indexes[eid] = (now, runs)
        return runs

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
        runs = [
            {
                "run": index.run,
                "layers": index.layers(),
                "lenses": index.lenses(),
                "spectra": sorted(s for (kind, s, _) in index.tags if kind == fmt.SPECTRUM),
                "has_anomalies": index.has(fmt.ANOMALIES),
                "max_step": index.max_step,
                "updated": index.last_update,
                "errors": index.errors,
            }
            for index in self.index(ctx, eid).values()
        ]
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
        layers = [
            {
                "layer": layer,
                "kinds": sorted({kind for (kind, s, _) in index.tags if s == layer}),
                "lenses": [lens for lens in fmt.LENSES if index.has(fmt.CLUSTERED_FRACTION, layer, lens)],
            }
            for layer in index.layers(_LAYER_KINDS)
        ]
        return {"run": run, "layers": layers, "errors": index.errors}

    def timeline(self, ctx: Any, eid: str, run: str, layer: str, lens: str = fmt.WEIGHTS) -> dict[str, Any]:
        """Cluster proportions, clustered fraction with the structure measures, and (weights
        lens) quality metrics of a layer over time."""
        index = self.run_index(ctx, eid, run)
        kinds = [k for k in (fmt.PROPORTIONS, fmt.CLUSTERED_FRACTION, fmt.QUALITY) if index.has(k, layer, lens)]
        if not kinds:
            raise NotFound(f"run {run!r} has no timeline records for layer {layer!r} in the {lens} lens")
        data, errors = self._tensors(ctx, eid, index, [index.tag(k, layer, lens) for k in kinds])
        out: dict[str, Any] = {"run": run, "layer": layer, "lens": lens, "errors": index.errors + errors, "sampled": []}
        for kind in kinds:
            tag = index.tag(kind, layer, lens)
            points = data.get(tag, [])
            if self._at_limit(fmt.TENSOR, len(points)):
                out["sampled"].append(kind)
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
        series = self._scalar_series(ctx, eid, run, lens, measure, layers)
        rest = [layer for layer in layers if layer not in series]
        tags = {layer: index.tag(fmt.CLUSTERED_FRACTION, layer, lens) for layer in rest}
        data, errors = self._tensors(ctx, eid, index, tags.values())
        sampled = 0
        for layer, tag in tags.items():
            points = data.get(tag, [])
            sampled += self._at_limit(fmt.TENSOR, len(points))
            series[layer] = [(step, value[measure]) for step, value in points]
        steps = sorted({step for points in series.values() for step, _ in points})
        column = {step: i for i, step in enumerate(steps)}
        # A dense layers x steps matrix (null where a layer lacks a snapshot): half the bytes
        # of [x, y, value] triples.
        values = []
        for layer in layers:
            row: list[float | None] = [None] * len(steps)
            for step, value in series[layer]:
                row[column[step]] = _round(value)
            values.append(row)
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
            "errors": index.errors + errors,
        }

    def anomalies(self, ctx: Any, eid: str, run: str) -> dict[str, Any]:
        """Every anomaly flag of a run, newest snapshot first, each with its step."""
        index = self.run_index(ctx, eid, run)
        tag = index.tag(fmt.ANOMALIES)
        series = self._blob_series(ctx, eid, run, tag)
        info = index.infos[tag]
        # One blob per snapshot, read concurrently: 200 sequential reads take over a second.
        found = list(self._pool.map(lambda datum: self._anomalies_of(ctx, info, datum), series))
        flags, errors = [], []
        for datum, result in zip(series, found):
            if isinstance(result, fmt.FormatError):
                errors.append(f"{tag} at step {datum.step}: {result}")
            else:
                flags.extend({**flag, "step": datum.step} for flag in result)
        flags.sort(key=lambda f: (-f["step"], -fmt.SEVERITIES.index(f["severity"])))
        checked = [datum.step for datum in series]
        sampled = self._at_limit(fmt.BLOB_SEQUENCE, len(series))
        return {"run": run, "anomalies": flags, "checked_steps": checked, "sampled": sampled, "errors": errors}

    def sprite(
        self, ctx: Any, eid: str, run: str, layer: str, step: int | None, lens: str = fmt.WEIGHTS
    ) -> dict[str, Any]:
        """The layout of a layer's sprite at ``step`` (the latest if None) and all sprite steps."""
        index = self.run_index(ctx, eid, run)
        tag = index.tag(fmt.SPRITE, layer, lens)
        series = self._blob_series(ctx, eid, run, tag)
        datum = _at_step(series, step, f"sprite of {layer!r}")
        names = index.infos[tag].fields["blobs"]
        layout = fmt.decode_json(self._read(ctx, datum.values[names.index("layout")].blob_key))
        return {
            "run": run,
            "layer": layer,
            "lens": lens,
            "step": datum.step,
            "steps": [d.step for d in series],
            "layout": layout,
            "sampled": self._at_limit(fmt.BLOB_SEQUENCE, len(series)),
        }

    def sprite_png(
        self, ctx: Any, eid: str, run: str, layer: str, step: int | None, lens: str = fmt.WEIGHTS
    ) -> bytes:
        index = self.run_index(ctx, eid, run)
        tag = index.tag(fmt.SPRITE, layer, lens)
        datum = _at_step(self._blob_series(ctx, eid, run, tag), step, f"sprite of {layer!r}")
        return self._png(ctx, index.infos[tag], datum)

    def spectrum(self, ctx: Any, eid: str, run: str) -> dict[str, Any]:
        """Every spectrum of the run (one per kernel size): its latest info JSON."""
        index = self.run_index(ctx, eid, run)
        spectra, errors = [], []
        for size in sorted(s for (kind, s, _) in index.tags if kind == fmt.SPECTRUM):
            tag = index.tag(fmt.SPECTRUM, size)
            series = self._blob_series(ctx, eid, run, tag)
            if not series:
                continue
            datum = series[-1]
            names = index.infos[tag].fields["blobs"]
            try:
                info = fmt.decode_json(self._read(ctx, datum.values[names.index("info")].blob_key))
            except (fmt.FormatError, IndexError) as err:
                errors.append(f"{tag}: {err}")
                continue
            spectra.append({"kernel_size": size, "step": datum.step, "info": info})
        return {"run": run, "spectra": spectra, "errors": index.errors + errors}

    def spectrum_png(self, ctx: Any, eid: str, run: str, kernel_size: int) -> bytes:
        index = self.run_index(ctx, eid, run)
        tag = index.tag(fmt.SPECTRUM, kernel_size)
        series = self._blob_series(ctx, eid, run, tag)
        if not series:
            raise NotFound(f"run {run!r} has no spectrum for {kernel_size}x{kernel_size} kernels")
        return self._png(ctx, index.infos[tag], series[-1])

    def summary(self, ctx: Any, eid: str) -> dict[str, Any]:
        """What the log holds, per run, layer (in model order) and step: the figures of both
        lenses and every anomaly flag. The JSON of ``kernelwatch summary --json``."""
        runs: dict[str, Any] = {}
        for run, index in self.index(ctx, eid).items():
            layers = [layer for layer in index.layers() if index.has(fmt.CLUSTERED_FRACTION, layer)]
            tags = {
                (layer, lens): index.tag(fmt.CLUSTERED_FRACTION, layer, lens)
                for layer in layers
                for lens in fmt.LENSES
                if index.has(fmt.CLUSTERED_FRACTION, layer, lens)
            }
            data, errors = self._tensors(ctx, eid, index, tags.values())
            out: dict[str, Any] = {}
            for layer in layers:
                weights = data.get(tags[layer, fmt.WEIGHTS], [])
                update = dict(data.get(tags.get((layer, fmt.UPDATE)), []))
                last = weights[-1][1] if weights else {}
                out[layer] = {
                    "kernel_size": _integer(last.get("kernel_size")),
                    "n_kernels": _integer(last.get("n_kernels")),
                    "series": [
                        {"step": step, **_figures(value), "update": _figures(update[step]) if step in update else None}
                        for step, value in weights
                    ],
                }
            anomalies = self.anomalies(ctx, eid, run) if index.has(fmt.ANOMALIES) else {"anomalies": [], "errors": []}
            runs[run] = {
                "layers": out,
                "anomalies": [
                    {key: flag[key] for key in ("step", "layer", "kind", "severity", "message", "numbers")}
                    for flag in sorted(anomalies["anomalies"], key=lambda f: f["step"])
                ],
                "errors": index.errors + errors + anomalies["errors"],
            }
        return {"format_version": fmt.FORMAT_VERSION, "runs": runs}

    # -- helpers -------------------------------------------------------------------------------

    def _tensors(
        self, ctx: Any, eid: str, index: RunIndex, tags: Iterable[str]
    ) -> tuple[dict[str, list[tuple[int, Any]]], list[str]]:
        """``tag -> [(step, decoded)]`` for tensor tags of a run; undecodable points become errors."""
        tags = list(tags)
        if not tags:
            return {}, []
        read = self._provider.read_tensors(
            ctx,
            experiment_id=eid,
            plugin_name=fmt.PLUGIN_NAME,
            downsample=_ALL,
            run_tag_filter=tb_provider.RunTagFilter(runs=[index.run], tags=tags),
        ).get(index.run, {})
        out: dict[str, list[tuple[int, Any]]] = {}
        errors: list[str] = []
        for tag in tags:
            info, points = index.infos[tag], []
            for datum in read.get(tag, []):
                try:
                    points.append((datum.step, fmt.decode_tensor(info, datum.numpy)))
                except fmt.FormatError as err:
                    errors.append(f"{tag} at step {datum.step}: {err}")
            out[tag] = points
        return out, errors

    def _scalar_series(
        self, ctx: Any, eid: str, run: str, lens: str, measure: str, layers: list[str]
    ) -> dict[str, list[tuple[int, float]]]:
        """A measure from the writer's stock scalars: ten times faster to read than tensors
        through the fast loader. Layers without them, or whose series fills the scalars'
        reservoir (so may be sampled), are left for the tensor records."""
        prefix = "" if lens == fmt.WEIGHTS else f"{lens}."
        tags = {fmt.scalar_tag(prefix + measure, layer): layer for layer in layers}
        read = self._provider.read_scalars(
            ctx,
            experiment_id=eid,
            plugin_name=_SCALARS,
            downsample=_ALL,
            run_tag_filter=tb_provider.RunTagFilter(runs=[run], tags=list(tags)),
        ).get(run, {})
        return {
            tags[tag]: [(point.step, point.value) for point in points]
            for tag, points in read.items()
            if tag in tags and 0 < len(points) < _SCALAR_LIMIT
        }

    def _blob_series(self, ctx: Any, eid: str, run: str, tag: str) -> list[tb_provider.BlobSequenceDatum]:
        read = self._provider.read_blob_sequences(
            ctx,
            experiment_id=eid,
            plugin_name=fmt.PLUGIN_NAME,
            downsample=_ALL,
            run_tag_filter=tb_provider.RunTagFilter(runs=[run], tags=[tag]),
        )
        return list(read.get(run, {}).get(tag, []))

    def _read(self, ctx: Any, blob_key: str) -> bytes:
        return self._provider.read_blob(ctx, blob_key=blob_key)

    def _png(self, ctx: Any, info: fmt.RecordInfo, datum: tb_provider.BlobSequenceDatum) -> bytes:
        names = info.fields["blobs"]
        if len(datum.values) != len(names):
            raise fmt.FormatError(f"{info.kind} record has {len(datum.values)} blobs, expected {names}")
        png = self._read(ctx, datum.values[names.index("png")].blob_key)
        if not png.startswith(b"\x89PNG\r\n\x1a\n"):
            raise fmt.FormatError(f"{info.kind} record at step {datum.step} holds no PNG")
        return png

    def _anomalies_of(
        self, ctx: Any, info: fmt.RecordInfo, datum: tb_provider.BlobSequenceDatum
    ) -> list[dict[str, Any]] | fmt.FormatError:
        """A snapshot's flags, or the FormatError that makes them unreadable (returned, not
        raised, so that one bad snapshot does not hide the others)."""
        if len(datum.values) != 1:
            return fmt.FormatError(f"anomalies record has {len(datum.values)} blobs, expected 1")
        key = (datum.values[0].blob_key, datum.wall_time)
        with self._cache_lock:
            if key in self._anomaly_cache:
                self._anomaly_cache.move_to_end(key)
                return self._anomaly_cache[key]
        try:
            flags = fmt.decode_blobs(info, [self._read(ctx, key[0])])["anomalies"]
        except fmt.FormatError as err:
            return err
        with self._cache_lock:
            self._anomaly_cache[key] = flags
            while len(self._anomaly_cache) > _CACHED_ANOMALY_RECORDS:
                self._anomaly_cache.popitem(last=False)
        return flags

    def _at_limit(self, data_class: int, count: int) -> bool:
        """Whether a series fills TensorBoard's reservoir, i.e. snapshots may have been dropped."""
        if self._hint == 0:
            return False
        return count in ((self._hint,) if self._hint else DEFAULT_LIMITS[data_class])


def _figures(value: dict[str, Any]) -> dict[str, Any]:
    """The summary's figures of one ``clustered_fraction`` record (None where not written)."""
    return {name: value.get(name) for name in MEASURES}


def _integer(value: float | None) -> int | None:
    return None if value is None or value != value else int(value)


def _round(value: float | None) -> float | None:
    # Four decimals are finer than any colour step, and halve the heat map's payload.
    return None if value is None or value != value else round(value, 4)


def _at_step(series: list[tb_provider.BlobSequenceDatum], step: int | None, what: str) -> tb_provider.BlobSequenceDatum:
    if not series:
        raise NotFound(f"no {what} records")
    if step is None:
        return series[-1]
    for datum in series:
        if datum.step == step:
            return datum
    raise NotFound(f"no {what} at step {step}")


def _add_series(index: RunIndex, data_class: int, series: dict[str, Any]) -> None:
    """Parse a run's listed series into ``index``; unreadable metadata becomes an error."""
    for tag, meta in series.items():
        index.max_step = max(index.max_step, meta.max_step)
        index.last_update = max(index.last_update, meta.max_wall_time)
        try:
            info = fmt.parse_content(meta.plugin_content, data_class)
        except fmt.FormatError as err:
            index.errors.append(f"{tag}: {err}")
            continue
        subject = info.kernel_size if info.kind == fmt.SPECTRUM else info.layer
        index.tags[info.kind, subject, info.lens] = tag
        index.infos[tag] = info
        if info.order is not None and info.layer is not None:
            index.orders[info.layer] = info.order


#: Layers of logs that recorded no order (format version 1) come after ordered ones.
_UNORDERED = 1 << 62


def _natural(name: str) -> list[Any]:
    """Sort key that puts ``convs.2`` before ``convs.10``.

    >>> sorted(["convs.10", "convs.2", "convs.1"], key=_natural)
    ['convs.1', 'convs.2', 'convs.10']
    """
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", name)]
