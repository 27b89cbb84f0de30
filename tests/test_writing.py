"""The event writer, read back with TensorBoard's own loaders: the Python event accumulator,
the multiplexer data provider, and the default fast loader (the Rust data server)."""

import json
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from tensorboard import context
from tensorboard.backend.event_processing import data_provider, event_file_loader, plugin_event_multiplexer
from tensorboard.backend.event_processing.plugin_event_accumulator import EventAccumulator
from tensorboard.compat.proto import summary_pb2
from tensorboard.util import tensor_util

from kernelwatch import format as fmt
from kernelwatch import patterns
from kernelwatch._config import CLUSTERS
from kernelwatch.analysis import analyze_layer
from kernelwatch.errors import KernelWatchError
from kernelwatch.metrics import layer_quality
from kernelwatch.spectrum import Spectrum
from kernelwatch.writing import CODE_BINS, EventWriter

DW_LAYERS = ("stages.0.blocks.1.conv_dw", "odd/name")
STEPS = (0, 10, 20)
CTX = context.RequestContext()


def small_spectrum() -> Spectrum:
    """The shipped 5x5 spectrum, or a stand-in built from the pattern library."""
    try:
        return Spectrum.pretrained(kernel_size=5)
    except KernelWatchError:
        parts = [patterns.generate(family, 40, 5, rng=0) for family in patterns.FAMILIES]
        prototypes = np.concatenate([p[0] for p in parts])
        labels = np.concatenate([p[1] for p in parts])
        codes = np.linspace(0, 1, len(labels), dtype=np.float32)
        return Spectrum(kernel_size=5, codes=codes, prototypes=prototypes, labels=labels, threshold=0.2)


def anomalies_at(step: int) -> list[dict]:
    if step == 10:
        return []
    return [
        {"layer": DW_LAYERS[0], "kind": "collapse", "severity": "warning", "message": "one pattern dominates",
         "numbers": {"share": 0.75, "step": step, "nan": float("nan")}},
        {"layer": None, "kind": "drift", "severity": "info", "message": "spectrum drift", "numbers": {}},
    ]  # fmt: skip


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A run of three snapshots of two depthwise layers and one regular conv; what was written."""
    run_dir = tmp_path_factory.mktemp("logs") / "run1"
    spectrum = small_spectrum()
    # These layers are tiny; torch's thread pool only adds spin-waiting on a busy 2-core runner.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        stem = torch.nn.Conv2d(3, 16, 3)
        written = {"spectrum": spectrum, "reports": {}, "quality": {}}
        with EventWriter(run_dir) as writer:
            assert writer.write_spectrum(0, spectrum)
            assert not writer.write_spectrum(10, spectrum)  # once per run
            for step in STEPS:
                for i, layer in enumerate(DW_LAYERS):
                    clean, _ = patterns.generate_mixture(96, 5, rng=step + i, noise=0.2)
                    kernels = clean.copy()
                    kernels[3, 2, 2] = np.nan
                    report = analyze_layer(layer, torch.from_numpy(kernels), spectrum)
                    writer.write_layer(step, report, torch.from_numpy(kernels))
                    written["reports"][step, layer] = report
                quality = {"stem.conv": layer_quality(stem.weight), DW_LAYERS[0]: layer_quality(clean)}
                for layer, values in quality.items():
                    writer.write_quality(step, layer, values)
                    written["quality"][step, layer] = values
                writer.write_anomalies(step, anomalies_at(step))
                writer.flush()
    finally:
        torch.set_num_threads(threads)
    written["dir"] = run_dir
    return written


def expected_tags() -> set[str]:
    tags = {fmt.make_tag(fmt.SPECTRUM, 5), fmt.make_tag(fmt.ANOMALIES)}
    for layer in DW_LAYERS:
        kinds = (fmt.PROPORTIONS, fmt.CLUSTERED_FRACTION, fmt.NULL_PROPORTIONS, fmt.TOTAL_ACTIVATION, fmt.CODE_HISTOGRAM, fmt.SPRITE)
        tags |= {fmt.make_tag(kind, layer) for kind in kinds}
    return tags | {fmt.make_tag(fmt.QUALITY, layer) for layer in ("stem.conv", DW_LAYERS[0])}


def check_tensor(run, info: fmt.RecordInfo, step: int, value: np.ndarray) -> None:
    """A tensor record as read back equals what the writer was given."""
    named = fmt.decode_tensor(info, value)
    if info.kind == fmt.QUALITY:
        assert named == pytest.approx(run["quality"][step, info.layer], nan_ok=True)
        return
    report = run["reports"][step, info.layer]
    if info.kind == fmt.PROPORTIONS:
        assert named == pytest.approx(report.proportions, rel=1e-6)
    elif info.kind == fmt.CLUSTERED_FRACTION:
        assert named == pytest.approx(
            {name: getattr(report, name) for name in fmt.CLUSTERED_FIELDS}, rel=1e-12
        ) and named["n_kernels"] == 96 and named["kernel_size"] == 5  # fmt: skip
        assert report.n_invalid >= 1
        # DoG-family kernels: far nearer their prototypes than their shuffled copies, and than
        # smooth random kernels of their smoothness.
        assert named["median_dissimilarity"] < 0.5 * named["null_median_dissimilarity"]
        assert named["clustered_fraction"] > 10 * named["null_clustered_fraction"]
        assert named["median_dissimilarity"] < 0.7 * named["smooth_null_median_dissimilarity"]
        assert named["clustered_fraction"] > 2 * named["smooth_null_clustered_fraction"]
    elif info.kind == fmt.NULL_PROPORTIONS:
        assert named == {null: pytest.approx(report.null_proportions[null], rel=1e-6) for null in fmt.NULLS}
        assert sum(named["shuffled"].values()) == pytest.approx(report.null_clustered_fraction, rel=1e-6)
        assert sum(named["smooth"].values()) == pytest.approx(report.smooth_null_clustered_fraction, rel=1e-6)
    elif info.kind == fmt.TOTAL_ACTIVATION:
        assert named.keys() == report.total_activation.keys()
        for cluster, stats in named.items():
            assert stats == pytest.approx(report.total_activation[cluster])
    elif info.kind == fmt.CODE_HISTOGRAM:
        result = report.result
        assert value.shape == (2, CODE_BINS) and value.dtype == np.int64
        assert named["clustered"].sum() == result.clustered.sum()
        assert named["unclustered"].sum() == (result.valid & ~result.clustered).sum()
        bins = np.minimum((result.codes[result.clustered] * CODE_BINS).astype(int), CODE_BINS - 1)
        assert named["clustered"].tolist() == np.bincount(bins, minlength=CODE_BINS).tolist()


def check_blobs(run, info: fmt.RecordInfo, step: int, blobs: list[bytes]) -> None:
    named = fmt.decode_blobs(info, blobs)
    if info.kind == fmt.ANOMALIES:
        expected = json.loads(fmt.encode_json(anomalies_at(step)))
        assert named["anomalies"] == expected and (not expected or expected[0]["numbers"]["nan"] is None)
    elif info.kind == fmt.SPRITE:
        layout = named["layout"]
        assert png_size(named["png"]) == (layout["width"], layout["height"])
        labels = run["reports"][step, info.layer].result.labels
        assert layout["n_kernels"] == 96 and layout["n_shown"] == 64
        assert all(cell["label"] == labels[cell["index"]] for cell in layout["cells"])
    else:
        spectrum, meta = run["spectrum"], named["info"]
        assert step == 0 and info.kernel_size == meta["kernel_size"] == 5
        assert png_size(named["png"]) == (meta["strip"]["width"], meta["strip"]["height"])
        assert meta["threshold"] == spectrum.threshold and meta["n_codes"] == spectrum.n_codes
        assert [(i["label"], i["start"], i["end"]) for i in meta["intervals"]] == spectrum.intervals()
        assert [(i["threshold_min"], i["threshold_max"]) for i in meta["intervals"]] == spectrum.interval_thresholds()
        assert all(cell["code"] == pytest.approx(spectrum.codes[cell["index"]]) for cell in meta["strip"]["cells"])


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def check_stock_scalars(run, scalars: dict[str, list[tuple[int, float]]]) -> None:
    for (step, layer), report in run["reports"].items():
        assert (step, pytest.approx(report.clustered_fraction)) in scalars[fmt.scalar_tag("clustered_fraction", layer)]
        for cluster in CLUSTERS:
            points = scalars[fmt.scalar_tag("proportion", layer, cluster)]
            assert (step, pytest.approx(report.proportions[cluster])) in points
    for (step, layer), quality in run["quality"].items():
        for name, value in quality.items():
            assert (step, pytest.approx(value)) in scalars[fmt.scalar_tag("quality", layer, name)]


def test_event_accumulator_reads_every_record(run):
    acc = EventAccumulator(str(run["dir"]), size_guidance={"tensors": 0})
    acc.Reload()
    tags = set(acc.Tags()["tensors"])
    assert {t for t in tags if not t.startswith("kernelwatch.")} == expected_tags()
    assert set(acc.PluginTagToContent(fmt.PLUGIN_NAME)) == expected_tags()
    for tag in expected_tags():
        info = fmt.parse_metadata(acc.SummaryMetadata(tag))
        assert fmt.make_tag(info.kind, info.kernel_size if info.kind == fmt.SPECTRUM else info.layer) == tag
        events = acc.Tensors(tag)
        assert [e.step for e in events] == ([0] if info.kind == fmt.SPECTRUM else list(STEPS))
        for event in events:
            array = tensor_util.make_ndarray(event.tensor_proto)
            if info.data_class == fmt.TENSOR:
                check_tensor(run, info, event.step, array)
            else:
                check_blobs(run, info, event.step, list(array))
    scalar_tags = [t for t in tags if t.startswith("kernelwatch.")]
    assert all(acc.SummaryMetadata(t).plugin_data.plugin_name == "scalars" for t in scalar_tags)
    value = tensor_util.make_ndarray
    check_stock_scalars(run, {t: [(e.step, value(e.tensor_proto).item()) for e in acc.Tensors(t)] for t in scalar_tags})


def read_all(provider, run, experiment_id: str = "") -> None:
    """Check every record and stock scalar through a ``DataProvider``, as the plugin will."""
    plugin = fmt.PLUGIN_NAME
    listed = provider.list_tensors(CTX, experiment_id=experiment_id, plugin_name=plugin)["run1"]
    blob_listed = provider.list_blob_sequences(CTX, experiment_id=experiment_id, plugin_name=plugin)["run1"]
    assert set(listed) | set(blob_listed) == expected_tags() and not set(listed) & set(blob_listed)
    tensors = provider.read_tensors(CTX, experiment_id=experiment_id, plugin_name=plugin, downsample=1000)["run1"]
    for tag, series in listed.items():
        info = fmt.parse_content(series.plugin_content, fmt.TENSOR)
        assert [d.step for d in tensors[tag]] == list(STEPS)
        for datum in tensors[tag]:
            check_tensor(run, info, datum.step, datum.numpy)
    sequences = provider.read_blob_sequences(CTX, experiment_id=experiment_id, plugin_name=plugin, downsample=1000)
    for tag, series in blob_listed.items():
        info = fmt.parse_content(series.plugin_content, fmt.BLOB_SEQUENCE)
        assert len(sequences["run1"][tag]) == (1 if info.kind == fmt.SPECTRUM else len(STEPS))
        for datum in sequences["run1"][tag]:
            blobs = [provider.read_blob(CTX, blob_key=ref.blob_key) for ref in datum.values]
            check_blobs(run, info, datum.step, blobs)
    scalars = provider.read_scalars(CTX, experiment_id=experiment_id, plugin_name="scalars", downsample=1000)["run1"]
    check_stock_scalars(run, {tag: [(d.step, d.value) for d in points] for tag, points in scalars.items()})


def test_multiplexer_data_provider_reads_every_record(run):
    multiplexer = plugin_event_multiplexer.EventMultiplexer(tensor_size_guidance={fmt.PLUGIN_NAME: 0})
    multiplexer.AddRunsFromDirectory(str(run["dir"].parent))
    multiplexer.Reload()
    read_all(data_provider.MultiplexerDataProvider(multiplexer, str(run["dir"].parent)), run)


def rust_server_binary() -> str | None:
    try:
        from tensorboard_data_server import server_binary
    except ImportError:
        return None
    return server_binary()


class RustDataServer:
    """TensorBoard's default fast loader (the data server), as `tensorboard` starts it."""

    def __init__(self, log_dir: Path, work_dir: Path, samples_per_plugin: str = ""):
        import grpc
        from tensorboard.data import grpc_provider

        port_file = work_dir / f"port-{time.monotonic_ns()}"
        args = [rust_server_binary(), f"--logdir={log_dir}", "--reload=once", "--port=0", f"--port-file={port_file}",
                f"--samples-per-plugin={samples_per_plugin}", "--die-after-stdin"]  # fmt: skip
        self.process = subprocess.Popen(args, stdin=subprocess.PIPE, stderr=subprocess.DEVNULL)
        deadline = time.time() + 20
        while not (port_file.exists() and port_file.read_text().endswith("\n")):
            assert time.time() < deadline and self.process.poll() is None, "data server did not start"
            time.sleep(0.05)
        self.channel = grpc.insecure_channel(f"localhost:{int(port_file.read_text())}")
        self.provider = grpc_provider.GrpcDataProvider("", grpc_provider.make_stub(self.channel))

    def wait_for(self, tag: str, steps: int) -> None:
        deadline = time.time() + 20
        while True:
            series = self.provider.read_blob_sequences(
                CTX, experiment_id="", plugin_name=fmt.PLUGIN_NAME, downsample=1000
            ).get("run1", {})
            if len(series.get(tag, [])) >= steps or time.time() > deadline:
                return
            time.sleep(0.1)

    def close(self) -> None:
        self.channel.close()
        self.process.stdin.close()
        self.process.wait(timeout=10)


@pytest.mark.skipif(rust_server_binary() is None, reason="tensorboard-data-server is not installed")
def test_default_fast_loader_reads_every_record(run, tmp_path):
    server = RustDataServer(run["dir"].parent, tmp_path)
    try:
        server.wait_for(fmt.make_tag(fmt.ANOMALIES), len(STEPS))
        read_all(server.provider, run)
    finally:
        server.close()


@pytest.mark.skipif(rust_server_binary() is None, reason="tensorboard-data-server is not installed")
def test_fast_loader_keeps_every_snapshot_only_with_the_sampling_flag(tmp_path):
    kernels, labels = patterns.generate_mixture(16, 3, rng=0)
    with EventWriter(tmp_path / "logs" / "run1") as writer:
        for step in range(15):
            writer.write_sprite(step, "dw", kernels, labels)
    tag = fmt.make_tag(fmt.SPRITE, "dw")
    for flag, expected in [("", 10), (f"{fmt.PLUGIN_NAME}=all", 15)]:
        server = RustDataServer(tmp_path / "logs", tmp_path, flag)
        try:
            server.wait_for(tag, expected)
            series = server.provider.read_blob_sequences(
                CTX, experiment_id="", plugin_name=fmt.PLUGIN_NAME, downsample=1000
            )["run1"][tag]
            assert len(series) == expected and series[-1].step == 14
        finally:
            server.close()


def raw_events(path: Path) -> list:
    return list(event_file_loader.EventFileLoader(str(path)).Load())


def event_file(log_dir: Path) -> Path:
    (path,) = log_dir.glob("events.out.tfevents.*.kernelwatch")
    return path


def test_metadata_is_written_once_per_tag(run):
    seen: dict[str, int] = {}
    for event in raw_events(event_file(run["dir"])):
        for value in event.summary.value:
            seen.setdefault(value.tag, 0)
            seen[value.tag] += value.HasField("metadata")
    assert set(seen.values()) == {1} and expected_tags() <= set(seen)


def write_steps(log_dir: Path, steps: range) -> Path:
    kernels, labels = patterns.generate_mixture(16, 3, rng=0)
    with EventWriter(log_dir) as writer:
        for step in steps:
            writer.write_sprite(step, "dw", kernels, labels)
            writer.write_quality(step, "dw", {"sparsity": 0.0, "variance_entropy": step / 10, "orthogonality": 0.5})
    return event_file(log_dir)


def quality_steps(log_dir: Path) -> list[int]:
    acc = EventAccumulator(str(log_dir), size_guidance={"tensors": 0})
    acc.Reload()
    return [e.step for e in acc.Tensors(fmt.make_tag(fmt.QUALITY, "dw"))]


def test_a_torn_last_record_is_skipped_and_earlier_ones_read(tmp_path):
    path = write_steps(tmp_path, range(4))
    data = path.read_bytes()
    events = raw_events(path)
    last = len(events[-1].SerializeToString()) + 16  # TFRecord framing: length, 2 CRCs
    for cut in (len(data) - 1, len(data) - last // 2, len(data) - last + 5):
        path.write_bytes(data[:cut])
        assert quality_steps(tmp_path) == [0, 1, 2]
        assert len(raw_events(path)) == len(events) - 1


KILLED_WRITER = """
import sys, numpy as np
from kernelwatch.writing import EventWriter
writer = EventWriter(sys.argv[1])
quality = {"sparsity": 0.0, "variance_entropy": 0.9, "orthogonality": 0.5}
for step in range(5):
    writer.write_quality(step, "dw", quality)
writer.flush()
print("flushed", flush=True)
step = 5
while True:  # keep writing (large records) until killed
    writer.write_sprite(step, "dw", np.random.default_rng(step).standard_normal((64, 7, 7)), ["other"] * 64)
    writer.write_quality(step, "dw", quality)
    step += 1
"""


def test_records_flushed_before_a_sigkill_survive(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    child = subprocess.Popen(
        [sys.executable, "-c", KILLED_WRITER, str(tmp_path)], stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        assert child.stdout.readline().strip() == "flushed"
        time.sleep(0.5)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=10)
    steps = quality_steps(tmp_path)
    assert steps[:5] == [0, 1, 2, 3, 4] and steps == list(range(len(steps)))


def test_unwritable_log_dir_fails_at_construction(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(KernelWatchError, match="cannot write TensorBoard events"):
        EventWriter(blocker / "logs")


def test_lifecycle_and_bad_input(tmp_path):
    writer = EventWriter(tmp_path)
    with pytest.raises(KernelWatchError, match="step must be an integer"):
        writer.write_anomalies(1.5, [])
    with pytest.raises(KernelWatchError, match="severity"):
        writer.write_anomalies(1, [{"layer": None, "kind": "x", "severity": "bad", "message": "", "numbers": {}}])
    with pytest.raises(KernelWatchError, match="lacks"):
        writer.write_quality(1, "c", {"sparsity": 0.0})
    writer.write_anomalies(2, [])
    writer.close()
    writer.close()
    writer.flush()
    with pytest.raises(KernelWatchError, match="closed"):
        writer.write_anomalies(3, [])
    acc = EventAccumulator(str(tmp_path), size_guidance={"tensors": 0})
    acc.Reload()
    tag = fmt.make_tag(fmt.ANOMALIES)
    assert [e.step for e in acc.Tensors(tag)] == [2]
    # The failed writes before it did not swallow the series' metadata.
    assert fmt.parse_metadata(acc.SummaryMetadata(tag)).kind == fmt.ANOMALIES


def test_scalar_metadata_is_the_scalars_plugins(run):
    for event in raw_events(event_file(run["dir"])):
        for value in event.summary.value:
            if value.tag.startswith("kernelwatch.") and value.HasField("metadata"):
                assert value.metadata.plugin_data.plugin_name == "scalars"
                assert value.metadata.data_class == summary_pb2.DATA_CLASS_SCALAR
                assert tensor_util.make_ndarray(value.tensor).shape == ()
