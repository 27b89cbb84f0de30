"""The KernelWatch TensorBoard plugin's routes, through TensorBoard's own WSGI app and data
provider, on logs written by KernelWatch and EventWriter (plus hand-made malformed ones).

``write_logs`` is shared with tests/test_plugin_e2e.py."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from urllib.parse import quote

import numpy as np
import pytest
from tensorboard.backend import application
from tensorboard.backend.event_processing import data_provider, plugin_event_multiplexer
from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.plugins import base_plugin
from tensorboard.summary.writer.event_file_writer import EventFileWriter
from tensorboard.util import tensor_util
from werkzeug.test import Client

from kernelwatch import format as fmt
from kernelwatch import patterns
from kernelwatch._config import CLUSTERS
from kernelwatch_tensorboard.kernelwatch_plugin import KernelWatchPlugin

PREFIX = "/data/plugin/kernelwatch"
DW = "stages.0.blocks.1.conv_dw"
# '"' and '\\' too: the format escapes them, since TensorBoard's data server cannot read them in a blob tag.
HOSTILE_LAYER = '<img src=x onerror=window.__xss=1> "q" \\b'
HOSTILE_RUN = "run <b>&amp; 'quoted'</b>"
STEPS = (0, 10, 20, 30)


def _train_with_kernelwatch(log_dir: Path) -> None:
    """A DoG-initialised two-block depthwise net, trained briefly under KernelWatch."""
    import torch

    from kernelwatch import KernelWatch
    from kernelwatch.init import dog_

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 32, 3, padding=1),
        torch.nn.Conv2d(32, 32, 5, padding=2, groups=32),
        torch.nn.ReLU(),
        torch.nn.Conv2d(32, 32, 5, padding=2, groups=32),
    )
    dog_(model, seed=0)
    optimiser = torch.optim.SGD(model.parameters(), lr=0.5)
    with KernelWatch(log_dir, every=1, handle_sigterm=False) as watch:
        for epoch in range(5):
            watch.on_epoch_end(model, epoch)
            for _ in range(3):
                x = torch.randn(8, 3, 16, 16)
                loss = (model(x) - x.mean(1, keepdim=True)).pow(2).mean()
                optimiser.zero_grad()
                loss.backward()
                optimiser.step()


def _write_controlled_run(log_dir: Path, layers: tuple[str, ...], seed: int) -> None:
    """EventWriter records with known anomalies, so marks and the list can be checked."""
    import torch

    from kernelwatch.analysis import analyze_layer
    from kernelwatch.metrics import layer_quality
    from kernelwatch.spectrum import Spectrum
    from kernelwatch.writing import EventWriter

    spectrum = Spectrum.pretrained(kernel_size=5)
    with EventWriter(log_dir) as writer:
        writer.write_spectrum(0, spectrum)
        for step in STEPS:
            for i, layer in enumerate(layers):
                kernels, _ = patterns.generate_mixture(48, 5, rng=seed + step + i, noise=0.05 * step / 10)
                writer.write_layer(step, analyze_layer(layer, torch.from_numpy(kernels), spectrum), kernels)
                writer.write_quality(step, layer, layer_quality(kernels))
            flags = [
                {"layer": layers[0], "kind": "collapse", "severity": "warning", "message": "one pattern dominates",
                 "numbers": {"share": 0.75}},
                {"layer": layers[-1], "kind": "dead", "severity": "error", "message": "kernels died <b>",
                 "numbers": {"n": 3, "nan": float("nan")}},
                {"layer": None, "kind": "drift", "severity": "info", "message": "run-wide", "numbers": {}},
            ] if step == 20 else []  # fmt: skip
            writer.write_anomalies(step, flags)


def _write_raw(log_dir: Path, tag: str, content: bytes, data_class: int, array: np.ndarray) -> None:
    """One hand-made record, for formats the writer would refuse to produce."""
    log_dir.mkdir(parents=True, exist_ok=True)
    writer = EventFileWriter(str(log_dir), filename_suffix=".kernelwatch")
    metadata = summary_pb2.SummaryMetadata(
        plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name=fmt.PLUGIN_NAME, content=content),
        data_class=data_class,
    )
    value = summary_pb2.Summary.Value(tag=tag, tensor=tensor_util.make_tensor_proto(array), metadata=metadata)
    writer.add_event(event_pb2.Event(step=5, wall_time=1.0, summary=summary_pb2.Summary(value=[value])))
    writer.close()


def write_logs(root: Path) -> Path:
    """Runs: ``train`` (KernelWatch), ``alpha`` and ``beta`` (EventWriter, for side by side),
    one with HTML in its run and layer names, and three with unreadable kernelwatch data."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny layers; threads only spin on a busy 2-core runner
    try:
        # A separate process: KernelWatch installs atexit hooks and a worker thread.
        code = (
            f"import sys, pathlib; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
            "import test_plugin_backend as t; "
            f"t._train_with_kernelwatch(pathlib.Path({str(root / 'train')!r}))"
        )
        subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1])
        _write_controlled_run(root / "alpha", (DW, "odd/name", "stages.1.blocks.0.conv_dw"), seed=0)
        _write_controlled_run(root / "beta", (DW, "odd/name"), seed=100)
        _write_controlled_run(root / HOSTILE_RUN, (HOSTILE_LAYER,), seed=7)
    finally:
        torch.set_num_threads(threads)
    proportions = fmt.make_tag(fmt.PROPORTIONS, "dw")
    newer = json.dumps({"version": 99, "kind": "proportions", "layer": "dw", "clusters": list(CLUSTERS)}).encode()
    _write_raw(root / "newer_version", proportions, newer, fmt.TENSOR, np.zeros(9, np.float32))
    _write_raw(root / "not_json", proportions, b"{oops", fmt.TENSOR, np.zeros(9, np.float32))
    _write_raw(root / "bad_shape", proportions, fmt.summary_metadata(fmt.PROPORTIONS, "dw").plugin_data.content,
               fmt.TENSOR, np.zeros(4, np.float32))  # fmt: skip
    return root


@pytest.fixture(scope="module")
def logs(tmp_path_factory) -> Path:
    return write_logs(tmp_path_factory.mktemp("plugin_logs"))


def make_client(logdir: Path, hint: int | None = 0) -> Client:
    multiplexer = plugin_event_multiplexer.EventMultiplexer(
        tensor_size_guidance={fmt.PLUGIN_NAME: hint if hint is not None else 10}
    )
    multiplexer.AddRunsFromDirectory(str(logdir))
    multiplexer.Reload()
    provider = data_provider.MultiplexerDataProvider(multiplexer, str(logdir))
    context = base_plugin.TBContext(
        data_provider=provider, sampling_hints={fmt.PLUGIN_NAME: hint} if hint is not None else {}
    )
    plugin = KernelWatchPlugin(context)
    return Client(application.TensorBoardWSGI([plugin], data_provider=provider))


@pytest.fixture(scope="module")
def client(logs) -> Client:
    return make_client(logs)


def get_json(client: Client, route: str, code: int = 200) -> dict:
    response = client.get(f"{PREFIX}/{route}")
    assert response.status_code == code, response.get_data(as_text=True)
    assert response.headers["Content-Type"].startswith("application/json")
    return json.loads(response.get_data())


def q(value: str) -> str:
    return quote(value, safe="")


def test_runs_lists_every_run_and_reports_unreadable_ones(client):
    body = get_json(client, "runs")
    runs = {r["run"]: r for r in body["runs"]}
    assert {"train", "alpha", "beta", HOSTILE_RUN, "newer_version", "not_json"} <= set(runs)
    assert body["format_version"] == fmt.FORMAT_VERSION and body["sampling"]["keeps_all"]
    assert runs["alpha"]["layers"] == sorted((DW, "odd/name", "stages.1.blocks.0.conv_dw"))
    assert runs["alpha"]["spectra"] == [5] and runs["alpha"]["errors"] == []
    assert runs["train"]["layers"] == ["1", "3"] and runs["train"]["spectra"] == [5]
    assert "newer than this reader" in runs["newer_version"]["errors"][0]
    assert "invalid JSON" in runs["not_json"]["errors"][0]
    assert runs[HOSTILE_RUN]["layers"] == [HOSTILE_LAYER]


def test_layers_and_timeline(client):
    layers = get_json(client, "layers?run=alpha")["layers"]
    assert {entry["layer"] for entry in layers} == {DW, "odd/name", "stages.1.blocks.0.conv_dw"}
    assert fmt.SPRITE in layers[0]["kinds"]
    # The regular stem conv has quality metrics only: listed here, not among the classified layers.
    train = {entry["layer"]: entry["kinds"] for entry in get_json(client, "layers?run=train")["layers"]}
    assert train["0"] == [fmt.FIRST_LAYER, fmt.QUALITY] and fmt.PROPORTIONS in train["1"]
    body = get_json(client, f"timeline?run=alpha&layer={q('odd/name')}")
    assert body["proportions"]["steps"] == list(STEPS)
    series = body["proportions"]["series"]
    assert list(series) == list(CLUSTERS) and all(len(v) == len(STEPS) for v in series.values())
    fraction = body["clustered_fraction"]["series"]["clustered_fraction"]
    assert [sum(vals) for vals in zip(*series.values())] == pytest.approx(fraction, abs=1e-5)
    assert body["quality"]["steps"] == list(STEPS) and body["sampled"] == [] and body["errors"] == []


def test_timeline_from_a_kernelwatch_run(client):
    body = get_json(client, "timeline?run=train&layer=1")
    assert body["proportions"]["steps"] == [0, 1, 2, 3, 4]
    # A DoG-initialised layer starts out almost entirely clustered.
    assert body["clustered_fraction"]["series"]["clustered_fraction"][0] > 0.8


def test_heatmap(client):
    body = get_json(client, "heatmap?run=alpha")
    assert body["steps"] == list(STEPS) and body["layers"] == sorted((DW, "odd/name", "stages.1.blocks.0.conv_dw"))
    assert len(body["values"]) == 3 and body["sampled_layers"] == 0
    # Read from the stock scalars; they agree with the plugin's own tensor records.
    for layer, row in zip(body["layers"], body["values"]):
        timeline = get_json(client, f"timeline?run=alpha&layer={q(layer)}")
        assert row == pytest.approx(timeline["clustered_fraction"]["series"]["clustered_fraction"], abs=1e-4)


V1_CLUSTERED = (
    b'{"version":1,"kind":"clustered_fraction","layer":"dw","kernel_size":null,'
    b'"fields":["clustered_fraction","n_kernels","n_invalid"]}'
)


def test_heatmap_of_a_version_1_log_without_stock_scalars_reads_the_tensor_records(tmp_path):
    tag = fmt.make_tag(fmt.CLUSTERED_FRACTION, "dw")
    _write_raw(tmp_path / "run1", tag, V1_CLUSTERED, fmt.TENSOR, np.array([0.25, 8.0, 0.0]))
    client = make_client(tmp_path)
    body = get_json(client, "heatmap?run=run1")
    assert body["layers"] == ["dw"] and body["steps"] == [5] and body["values"] == [[0.25]]
    assert body["errors"] == []
    # Measures version 1 did not write are missing, not errors.
    body = get_json(client, "heatmap?run=run1&measure=median_dissimilarity")
    assert body["values"] == [[None]] and body["errors"] == []


def test_anomalies_list(client):
    body = get_json(client, "anomalies?run=alpha")
    assert body["checked_steps"] == list(STEPS) and not body["sampled"]
    flags = body["anomalies"]
    assert [f["severity"] for f in flags] == ["error", "warning", "info"]
    assert all(f["step"] == 20 for f in flags) and flags[0]["numbers"] == {"n": 3, "nan": None}


def test_sprite_and_png(client):
    layer = q("odd/name")
    body = get_json(client, f"sprite?run=alpha&layer={layer}")
    assert body["steps"] == list(STEPS) and body["step"] == 30
    assert body["layout"]["n_kernels"] == 48 and body["layout"]["cells"]
    at_10 = get_json(client, f"sprite?run=alpha&layer={layer}&step=10")
    assert at_10["step"] == 10
    png = client.get(f"{PREFIX}/sprite.png?run=alpha&layer={layer}&step=10")
    assert png.status_code == 200 and png.headers["Content-Type"] == "image/png"
    assert png.get_data()[:8] == b"\x89PNG\r\n\x1a\n"
    get_json(client, f"sprite?run=alpha&layer={layer}&step=11", code=404)


def test_spectrum(client):
    (spectrum,) = get_json(client, "spectrum?run=alpha")["spectra"]
    assert spectrum["kernel_size"] == 5 and spectrum["info"]["intervals"][0]["start"] == 0.0
    png = client.get(f"{PREFIX}/spectrum.png?run=alpha&kernel_size=5")
    assert png.status_code == 200 and png.get_data()[:4] == b"\x89PNG"
    assert client.get(f"{PREFIX}/spectrum.png?run=alpha&kernel_size=3").status_code == 404


@pytest.mark.parametrize(
    "route, code, message",
    [
        ("timeline?run=nope&layer=x", 404, "no kernelwatch data"),
        ("timeline?run=alpha&layer=missing", 404, "no timeline records"),
        ("timeline?run=alpha", 400, "missing query parameter 'layer'"),
        ("sprite?run=alpha&layer=odd%2Fname&step=abc", 400, "must be an integer"),
        ("heatmap?run=newer_version", 200, "newer than this reader"),
        ("timeline?run=bad_shape&layer=dw", 200, "has shape (4,)"),
    ],
)
def test_bad_requests_and_bad_data_are_messages_not_500s(client, route, code, message):
    body = get_json(client, route, code=code)
    assert message in json.dumps(body)


@pytest.mark.parametrize(
    "path",
    [
        "/static/../kernelwatch_plugin.py",
        "/static/..%2Fkernelwatch_plugin.py",
        "/static/%2e%2e/%2e%2e/kernelwatch/format.py",
        "/static//etc/passwd",
        "/static/VENDORED.md",
        "/static/missing.js",
    ],
)
def test_static_routes_refuse_traversal(client, path):
    response = client.get(PREFIX + path)
    assert response.status_code in (400, 404)
    assert b"import" not in response.get_data()


def test_static_assets_are_served(client):
    index = client.get(f"{PREFIX}/index.js")
    assert index.status_code == 200 and index.headers["Content-Type"].startswith("text/javascript")
    assert b"export async function render" in index.get_data()
    library = client.get(f"{PREFIX}/static/echarts.esm.min.js")
    assert library.status_code == 200 and len(library.get_data()) > 500_000
    assert client.get(f"{PREFIX}/static/style.css").status_code == 200


def test_plugin_is_listed_as_an_iframe_tab(client):
    listing = json.loads(client.get("/data/plugins_listing").get_data())[fmt.PLUGIN_NAME]
    assert listing["enabled"] and listing["tab_name"] == "KernelWatch"
    assert listing["loading_mechanism"] == {"type": "IFRAME", "module_path": f"{PREFIX}/index.js"}


def test_sampled_series_are_flagged_without_the_flag(tmp_path):
    from kernelwatch.writing import EventWriter

    kernels, labels = patterns.generate_mixture(16, 3, rng=0)
    with EventWriter(tmp_path / "run1") as writer:
        for step in range(15):
            writer.write_sprite(step, "dw", kernels, labels)
    body = get_json(make_client(tmp_path, hint=None), "sprite?run=run1&layer=dw")
    assert body["sampled"] and len(body["steps"]) == 10 and body["steps"][-1] == 14
    assert not get_json(make_client(tmp_path, hint=0), "sprite?run=run1&layer=dw")["sampled"]


def test_plugin_imports_no_torch():
    code = "import sys, kernelwatch_tensorboard.kernelwatch_plugin; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1])


def test_entry_point_is_registered():
    from importlib.metadata import entry_points

    (entry,) = [e for e in entry_points(group="tensorboard_plugins") if e.name == fmt.PLUGIN_NAME]
    # The folder tb_plugin/ installs under a name of kernelwatch's own (an old install: pip install -e .).
    assert entry.value == "kernelwatch_tensorboard.kernelwatch_plugin:KernelWatchPlugin"
    assert entry.load() is KernelWatchPlugin


def test_a_malformed_anomaly_record_is_an_error_not_a_500(tmp_path):
    from kernelwatch.writing import EventWriter

    with EventWriter(tmp_path / "run1") as writer:
        writer.write_anomalies(1, [{"layer": "dw", "kind": "k", "severity": "info", "message": "ok", "numbers": {}}])
    content = fmt.summary_metadata(fmt.ANOMALIES).plugin_data.content
    # Same tag, so the loader keeps the first file's metadata; this record's blob is not JSON.
    bad = np.array([b"{bad"], dtype=object)
    _write_raw(tmp_path / "run1", fmt.make_tag(fmt.ANOMALIES), content, fmt.BLOB_SEQUENCE, bad)
    body = get_json(make_client(tmp_path), "anomalies?run=run1")
    assert [f["message"] for f in body["anomalies"]] == ["ok"]
    assert len(body["errors"]) == 1 and "invalid JSON" in body["errors"][0]


def test_the_layers_of_a_12_layer_run_are_listed_in_model_order(tmp_path):
    """A KernelWatch run of twelve depthwise layers (``convs.0`` ... ``convs.11``): every route
    lists them as the model holds them, not as strings sort (``convs.1, convs.10, convs.11, convs.2``)."""
    import torch

    from kernelwatch.monitor import KernelWatch

    model = torch.nn.Module()
    model.convs = torch.nn.ModuleList(torch.nn.Conv2d(8, 8, 3, groups=8) for _ in range(12))
    with KernelWatch(tmp_path / "run") as watch:
        watch.snapshot(model, 0)
    client = make_client(tmp_path)
    expected = [f"convs.{i}" for i in range(12)]
    assert [entry["layer"] for entry in get_json(client, "layers?run=run")["layers"]] == expected
    assert get_json(client, "heatmap?run=run")["layers"] == expected
    assert next(r for r in get_json(client, "runs")["runs"] if r["run"] == "run")["layers"] == expected
