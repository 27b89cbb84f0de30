"""The work of one dashboard answer is bounded whatever the run holds (issue 25): no route reads
a series whole, every list it answers is bounded, a run of many layers is listed in one pass,
and a small run's answers never wait behind a big run's reads.

The bounds are set small here, on logs of a few hundred snapshots; TensorBoard's own data
provider reads them (the Python loader's, counting what it is asked). The figures for 10^5
snapshots and 5,000 layers are in ``benchmarks/bench_plugin_bounds.py``.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from tensorboard import context
from tensorboard.backend.event_processing import data_provider, plugin_event_multiplexer

from kernelwatch import format as fmt
from kernelwatch import reading
from kernelwatch.first_layer import first_layer_report
from kernelwatch.sprites import PNG_SIGNATURE

from test_plugin_fuzz import FLAG, GOOD_CF, LAYOUT, PNG, B, T, _json, arr, blobs, content, tag, write_run

SNAPSHOTS = 300
BOUNDS = {"MAX_POINTS": 20, "MAX_LISTED": 20, "MAX_ANOMALY_RECORDS": 10, "MAX_FIRST_LAYER_REPORTS": 5}
REPORT = fmt.encode_json(first_layer_report(np.random.default_rng(0).standard_normal((8, 3, 3, 3)), layer="stem").to_json())
CTX = context.RequestContext()


class CountingProvider(data_provider.MultiplexerDataProvider):
    """TensorBoard's data provider over its Python loader, recording the ``downsample`` of every
    read and counting blob reads; ``hold`` makes the blob reads of one run wait until released."""

    def __init__(self, logdir: Path):
        multiplexer = plugin_event_multiplexer.EventMultiplexer(
            tensor_size_guidance={fmt.PLUGIN_NAME: 0, "scalars": 0}
        )
        multiplexer.AddRunsFromDirectory(str(logdir))
        multiplexer.Reload()
        super().__init__(multiplexer, str(logdir))
        self.downsamples: list[tuple[str, int]] = []
        self.blob_reads = 0
        self.held_run: str | None = None
        self.waiting = threading.Semaphore(0)  # one release per held read that started waiting
        self.release = threading.Event()

    def _counted(self, name: str, **kwargs: Any) -> Any:
        self.downsamples.append((name, kwargs["downsample"]))
        return getattr(super(), name)(**kwargs)

    def read_tensors(self, ctx=None, **kwargs):
        return self._counted("read_tensors", ctx=ctx, **kwargs)

    def read_scalars(self, ctx=None, **kwargs):
        return self._counted("read_scalars", ctx=ctx, **kwargs)

    def read_blob_sequences(self, ctx=None, **kwargs):
        return self._counted("read_blob_sequences", ctx=ctx, **kwargs)

    def read_blob(self, ctx=None, *, blob_key):
        self.blob_reads += 1
        if self.held_run is not None and data_provider._decode_blob_key(blob_key)[2] == self.held_run:
            self.waiting.release()
            self.release.wait()
        return super().read_blob(ctx, blob_key=blob_key)


def long_run(directory: Path, snapshots: int = SNAPSHOTS, layers: int = 1) -> None:
    """``snapshots`` of ``layers`` layers (figures, stock scalars, sprites), a stem's first-layer
    records and an anomaly record each, a flag at every tenth."""
    records = []
    for step in range(snapshots):
        first = step == 0
        for i in range(layers):
            layer = f"l{i}"
            records.append((tag(fmt.CLUSTERED_FRACTION, layer), content(fmt.CLUSTERED_FRACTION, layer) if first else None, T, GOOD_CF, step))
            records.append((tag(fmt.SPRITE, layer), content(fmt.SPRITE, layer) if first else None, B, blobs(PNG, _json(LAYOUT)), step))
        records.append((tag(fmt.FIRST_LAYER, "stem"), content(fmt.FIRST_LAYER, "stem") if first else None, B, blobs(PNG, REPORT), step))
        flags = [FLAG] if step % 10 == 0 else []
        records.append((tag(fmt.ANOMALIES), content(fmt.ANOMALIES) if first else None, B, blobs(_json(flags)), step))
    write_run(directory, records)


@pytest.fixture
def bounds(monkeypatch) -> None:
    for name, value in BOUNDS.items():
        monkeypatch.setattr(reading, name, value)


@pytest.fixture(scope="module")
def long_log(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bounds")
    long_run(root / "long")
    return root


def test_no_route_reads_a_series_whole_and_every_list_is_bounded(long_log, bounds):
    provider = CountingProvider(long_log)
    reader = reading.Reader(provider, sampling_hint=0)
    steps = list(range(SNAPSHOTS))

    def answer(view, *args, reads: int, **kwargs) -> dict:
        provider.downsamples.clear()
        before = provider.blob_reads
        body = view(CTX, "", "long", *args, **kwargs)
        assert all(n <= BOUNDS["MAX_LISTED"] + 1 for _, n in provider.downsamples), provider.downsamples
        assert provider.blob_reads - before <= reads
        return body

    timeline = answer(reader.timeline, "l0", reads=0)
    points = timeline[fmt.CLUSTERED_FRACTION]["steps"]
    assert len(points) == BOUNDS["MAX_POINTS"] and points[-1] == SNAPSHOTS - 1 and set(points) <= set(steps)
    assert timeline["thinned"] == [fmt.CLUSTERED_FRACTION]

    heatmap = answer(reader.heatmap, reads=0)
    assert len(heatmap["steps"]) == len(heatmap["values"][0]) == BOUNDS["MAX_POINTS"] and heatmap["thinned"]
    assert heatmap["steps"][-1] == SNAPSHOTS - 1 and all(v is not None for v in heatmap["values"][0])

    anomalies = answer(reader.anomalies, reads=BOUNDS["MAX_ANOMALY_RECORDS"])
    assert len(anomalies["checked_steps"]) == BOUNDS["MAX_ANOMALY_RECORDS"]
    assert anomalies["checked_steps"][-1] == SNAPSHOTS - 1
    assert {flag["step"] for flag in anomalies["anomalies"]} <= {s for s in anomalies["checked_steps"] if s % 10 == 0}
    assert anomalies["checked_steps"] == sorted(anomalies["checked_steps"])[-10:]  # the newest listed
    assert "the flags of 10 snapshots with anomaly records are shown, the newest of a sample of 20" in anomalies["errors"][0]

    sprite = answer(reader.sprite, "l0", None, reads=1)
    assert len(sprite["steps"]) == BOUNDS["MAX_LISTED"] and sprite["step"] == SNAPSHOTS - 1 and sprite["thinned"]
    middle = sprite["steps"][len(sprite["steps"]) // 2]
    assert answer(reader.sprite, "l0", middle, reads=1)["step"] == middle  # a step the slider offers
    assert answer(reader.sprite_png, "l0", middle, reads=1).startswith(PNG_SIGNATURE)

    # The selected report, and at most MAX_FIRST_LAYER_REPORTS for the figures over time.
    first = answer(reader.first_layer, None, None, reads=1 + BOUNDS["MAX_FIRST_LAYER_REPORTS"])
    assert len(first["steps"]) == BOUNDS["MAX_LISTED"] and first["thinned"]
    assert len(first["timeline"]["steps"]) == BOUNDS["MAX_FIRST_LAYER_REPORTS"] and first["timeline"]["steps"][-1] == SNAPSHOTS - 1
    assert first["profiles"][-1]["step"] == SNAPSHOTS - 1

    answer(reader.spectrum, reads=0)
    summary = reader.summary(CTX, "")  # `kernelwatch summary` lists everything, as it says
    assert len(summary["runs"]["long"]["anomalies"]) == SNAPSHOTS // 10


def test_a_heat_map_of_one_layer_over_many_snapshots_is_thinned_not_refused(long_log, bounds):
    """Before: 100,000 cells of one layer passed MAX_HEATMAP_CELLS unthinned, an answer over 1 MB."""
    from test_plugin_backend import get_json, make_client

    heatmap = get_json(make_client(long_log), "heatmap?run=long&measure=median_dissimilarity")
    assert len(heatmap["steps"]) == BOUNDS["MAX_POINTS"] and heatmap["thinned"]
    assert heatmap["values"] == [[0.4] * BOUNDS["MAX_POINTS"]]


def test_a_thinned_heat_map_cell_holds_its_layers_latest_value_since_the_column_before(tmp_path, monkeypatch):
    """Layers whose snapshots differ keep their values when the steps are thinned to columns."""
    monkeypatch.setattr(reading, "MAX_POINTS", 3)
    records = []
    for layer, steps in (("a", (0, 2, 4, 6)), ("b", (1, 5))):
        for i, step in enumerate(steps):
            value = arr(np.array([step / 10, 16, 0, 5, 0.4, 0.1, 0.6, 0.2, 0.5]))
            records.append((tag(fmt.CLUSTERED_FRACTION, layer), content(fmt.CLUSTERED_FRACTION, layer) if i == 0 else None, T, value, step))
    write_run(tmp_path / "run", records)
    heatmap = reading.Reader(CountingProvider(tmp_path), 0).heatmap(CTX, "", "run")
    assert heatmap["thinned"] and heatmap["steps"] == [0, 2, 6]  # 6 steps in all, thinned evenly to 3
    assert heatmap["values"] == [[0.0, 0.2, 0.6], [None, 0.1, 0.5]]


def test_a_small_runs_answers_do_not_wait_behind_a_big_runs_reads(tmp_path):
    long_run(tmp_path / "big", snapshots=40)
    long_run(tmp_path / "small", snapshots=3)
    provider = CountingProvider(tmp_path)
    reader = reading.Reader(provider, sampling_hint=0)
    provider.held_run = "big"
    big = threading.Thread(target=reader.anomalies, args=(CTX, "", "big"), daemon=True)
    big.start()
    try:
        for _ in range(4):  # the big run's reads are under way, and held
            assert provider.waiting.acquire(timeout=30)
        time.sleep(0.5)  # and all of them asked for
        answers: dict[str, Any] = {}
        small = threading.Thread(target=lambda: answers.update(
            anomalies=reader.anomalies(CTX, "", "small"), first_layer=reader.first_layer(CTX, "", "small")), daemon=True)
        small.start()
        small.join(timeout=30)
        assert not small.is_alive(), "the small run's answers waited for the big run's reads"
        assert answers["anomalies"]["checked_steps"] == [0, 1, 2] and answers["first_layer"]["steps"] == [0, 1, 2]
    finally:
        provider.release.set()
        big.join(timeout=60)
    assert not big.is_alive()


class CountingTags(dict):
    iterations = 0

    def __iter__(self):
        CountingTags.iterations += 1
        return super().__iter__()


def test_a_runs_layers_are_listed_in_one_pass_over_its_series(tmp_path):
    """Before: one pass per layer, 18 s for 5,000 layers."""
    layers = 300
    records = [(tag(kind, f"l{i}"), content(kind, f"l{i}"), kind_class, value)
               for i in range(layers)
               for kind, kind_class, value in ((fmt.CLUSTERED_FRACTION, T, GOOD_CF), (fmt.SPRITE, B, blobs(PNG, _json(LAYOUT))))]  # fmt: skip
    write_run(tmp_path / "wide", records)
    reader = reading.Reader(CountingProvider(tmp_path), 0)
    index = reader.run_index(CTX, "", "wide")
    index.tags, CountingTags.iterations = CountingTags(index.tags), 0
    body = reader.layers(CTX, "", "wide")
    assert [entry["layer"] for entry in body["layers"]] == [f"l{i}" for i in range(layers)]
    assert all(entry["kinds"] == [fmt.CLUSTERED_FRACTION, fmt.SPRITE] for entry in body["layers"])
    assert CountingTags.iterations <= 2


def test_listing_the_runs_again_parses_only_new_series(tmp_path, monkeypatch):
    """The listing is made again every INDEX_TTL seconds; 25,000 series took a second to parse."""
    long_run(tmp_path / "run", snapshots=2, layers=20)
    reader = reading.Reader(CountingProvider(tmp_path), 0)
    parsed = []
    parse = fmt.parse_content
    monkeypatch.setattr(fmt, "parse_content", lambda *args: parsed.append(args) or parse(*args))
    monkeypatch.setattr(reading, "INDEX_TTL", 0.0)
    monkeypatch.setattr(reading, "INDEX_STALE", 0.0)
    first = reader.runs(CTX, "")
    assert len(parsed) == 42  # 20 layers x 2 kinds, the stem and the anomalies
    assert reader.runs(CTX, "") == first and len(parsed) == 42


def test_no_answer_waits_for_the_runs_to_be_listed_again(tmp_path, monkeypatch):
    """Listing a run of 5,000 layers again takes half a second: answers go on with the last
    listing meanwhile (up to INDEX_STALE seconds old), and the next ones get the new one."""
    long_run(tmp_path / "run", snapshots=2)
    provider = CountingProvider(tmp_path)
    reader = reading.Reader(provider, 0)
    assert reader.runs(CTX, "")["runs"][0]["max_step"] == 1
    time.sleep(1.0)  # TensorBoard reads a directory's event files in the order of their names' seconds
    long_run(tmp_path / "run", snapshots=4)  # a second event file: steps 0 to 3 again
    provider._multiplexer.Reload()
    listed, release = threading.Event(), threading.Event()
    list_tensors = provider.list_tensors

    def held(*args, **kwargs):
        listed.set()
        release.wait()
        return list_tensors(*args, **kwargs)

    monkeypatch.setattr(provider, "list_tensors", held)
    monkeypatch.setattr(reading, "INDEX_TTL", 0.0)
    answers = []
    asking = threading.Thread(target=lambda: answers.append(reader.runs(CTX, "")), daemon=True)
    asking.start()
    try:
        assert listed.wait(timeout=30)  # the runs are being listed again...
        asking.join(timeout=30)
        assert not asking.is_alive() and answers[0]["runs"][0]["max_step"] == 1  # ... and no answer waits
    finally:
        release.set()
    for _ in range(300):
        if reader.runs(CTX, "")["runs"][0]["max_step"] == 3:
            break
        time.sleep(0.1)
    assert reader.runs(CTX, "")["runs"][0]["max_step"] == 3


def test_the_runs_answer_is_made_once_per_listing(tmp_path, monkeypatch):
    """The dashboard asks ``runs`` every 5 s; sorting a run of 5,000 layers took it tens of ms."""
    long_run(tmp_path / "run", snapshots=2, layers=3)
    reader = reading.Reader(CountingProvider(tmp_path), 0)
    calls = []
    layers = reading.RunIndex.layers
    monkeypatch.setattr(reading.RunIndex, "layers", lambda self, *args: calls.append(args) or layers(self, *args))
    first = reader.runs(CTX, "")
    assert first["runs"][0]["layers"] == ["l0", "l1", "l2"] and calls
    made = len(calls)
    assert reader.runs(CTX, "") == first and len(calls) == made
