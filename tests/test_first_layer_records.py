"""The first-layer lens in the monitor, the event format, the reader, the summary and the alert:
records written by real KernelWatch trainings, read back through TensorBoard's own loader and
the plugin's routes; hand-made hostile records refused with a message."""

from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from kernelwatch import KernelWatch
from kernelwatch import format as fmt
from kernelwatch.errors import KernelWatchError
from kernelwatch.anomalies import AnomalyConfig, FirstLayerShift
from kernelwatch.first_layer import first_layer_report, reflections
from kernelwatch.input_sample import PatchSampler, sample_patches
from kernelwatch.sprites import PNG_SIGNATURE
from kernelwatch.summary import format_summary, summarise
from kernelwatch.writing import EventWriter

import test_plugin_backend as backend

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str, path: Path):
    # --import-mode=importlib: sibling test modules are not importable by name.
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module




def stem_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 4, stride=2), nn.GELU(), nn.Conv2d(16, 16, 5, padding=2, groups=16),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4),
    )  # fmt: skip


def train(model: nn.Module, watch: KernelWatch, steps: int, channels_last: bool = False) -> None:
    optimiser = torch.optim.AdamW(model.parameters(), lr=1e-2)
    generator = torch.Generator().manual_seed(1)
    for step in range(steps + 1):
        watch.snapshot(model, step)
        if step == steps:
            break
        x = torch.randn(8, 3, 40, 40, generator=generator)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        loss = model(x).square().mean()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        if step % 5 == 0:  # an evaluation pass: not sampled
            model.eval()
            with torch.no_grad():
                model(torch.full((2, 3, 40, 40), 7.0))
            model.train()


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, nn.Module]:
    log_dir = tmp_path_factory.mktemp("first_layer") / "run"
    model = stem_net()
    with KernelWatch(log_dir, every=10, handle_sigterm=False) as watch:
        train(model, watch, 30, channels_last=True)
    return log_dir, model


def test_the_monitor_writes_the_stem_against_sampled_inputs(trained):
    log_dir, model = trained
    client = backend.make_client(log_dir.parent)
    runs = {r["run"]: r for r in backend.get_json(client, "runs")["runs"]}
    assert runs["run"]["first_layer"] == ["0"]
    body = backend.get_json(client, "first_layer?run=run")
    assert body["layer"] == "0" and body["steps"] == [0, 10, 20, 30] and body["step"] == 30 and body["errors"] == []
    timeline = body["timeline"]
    # The first snapshot comes before any forward pass: the prior; then the sampled inputs.
    assert timeline["source"] == ["prior", "data", "data", "data"]
    report = body["report"]
    assert report["n_patches"] > 0 and report["kernel_size"] == [4, 4] and report["stride"] == [2, 2]
    assert report["grid"] == {"n_filters": 16, "n_shown": 16, "columns": 8, "cell_size": 32}
    assert len(report["reflections"]["colour"]) == 3 and "eigenvalues" not in report
    # The stem's own reflections at that step, against the inputs it saw (standard normal: each
    # principal component holds about as much variance, where the prior's fall steeply).
    assert report["reflections"] == reflections(model[0].weight.detach().numpy())
    eigenvalues = body["profiles"][-1]["eigenvalues"]
    assert 0.7 < min(eigenvalues) <= max(eigenvalues) < 1.4, eigenvalues
    assert len(body["profiles"]) == 4 and all(len(p["energy_profile"]) == 48 for p in body["profiles"])
    assert sum(body["profiles"][-1]["energy_profile"]) == pytest.approx(1, abs=1e-6)
    png = client.get(f"{backend.PREFIX}/first_layer.png?run=run&layer=0&step=10")
    assert png.status_code == 200 and png.get_data().startswith(PNG_SIGNATURE)
    assert backend.get_json(client, "first_layer?run=run&step=20")["step"] == 20
    backend.get_json(client, "first_layer?run=run&step=21", code=404)
    # Also as stock scalars, and in `kernelwatch summary`.
    summary = summarise(log_dir.parent)["runs"]["run"]["first_layer"]
    assert summary["step"] == 30 and summary["source"] == "data"
    assert summary["whitening"] == report["whitening"] and summary["reflections"] == report["reflections"]
    assert "first layer 0 at step 30: whitening" in format_summary(summarise(log_dir.parent))


def test_the_sampler_is_bounded_skips_evaluation_and_is_removed_on_close(tmp_path):
    model = stem_net()
    with KernelWatch(tmp_path, every=100, handle_sigterm=False) as watch:
        train(model, watch, 60)
        sampler = watch._sampler
        sample = sampler.sample()
    assert not model[0]._forward_pre_hooks  # removed at close
    assert sampler.calls == 60  # training-mode calls only
    assert len(sample) == 30 and tuple(sample.crops[0].shape) == (2, 3, 18, 18)  # every 2nd call, 8x8 positions
    patches = sample_patches(sample, (4, 4), (2, 2))
    assert patches.shape == (30 * 2 * 64, 48)
    assert np.abs(patches).max() < 7  # the evaluation pass's constant 7 was never sampled
    # The reservoir keeps at most max_patches: later crops replace random earlier ones.
    stem = nn.Conv2d(3, 4, 4, stride=4)
    small = PatchSampler(stem, max_patches=256, every=1, images=1)
    for i in range(50):
        stem(torch.full((3, 3, 64, 64), float(i)))
    kept = sorted(int(c[0, 0, 0, 0]) for c in small.sample().crops)
    assert len(kept) == 4 and kept[-1] >= 40  # follows the data
    small.remove()


def test_the_sampler_takes_half_precision_inputs(tmp_path):
    stem = nn.Conv2d(3, 8, 3).to(torch.bfloat16)
    sampler = PatchSampler(stem, every=1)
    stem(torch.randn(4, 3, 20, 20, dtype=torch.bfloat16))
    patches = sample_patches(sampler.sample(), (3, 3), (1, 1))
    assert patches.dtype == np.float32 and patches.shape == (2 * 64, 27)
    sampler.remove()


def test_a_model_whose_first_conv_is_depthwise_logs_one_line_and_carries_on(tmp_path, caplog):
    model = nn.Sequential(nn.Conv2d(8, 8, 5, groups=8), nn.Conv2d(8, 4, 1))
    with caplog.at_level(logging.INFO, logger="kernelwatch"), KernelWatch(tmp_path, handle_sigterm=False) as watch:
        for step in range(3):
            watch.snapshot(model, step)
            model(torch.randn(2, 8, 12, 12))
    lines = [r.getMessage() for r in caplog.records if "first-layer" in r.getMessage()]
    assert lines == ["kernelwatch: no first-layer lens for this model (its first conv '0' is depthwise)"]
    assert watch.steps == (0, 1, 2) and not model[0]._forward_pre_hooks
    runs = backend.get_json(backend.make_client(tmp_path.parent), "runs")["runs"]
    assert [(r["first_layer"], r["layers"]) for r in runs if r["run"] == tmp_path.name] == [([], ["0"])]


UNREPORTABLE_STEMS = [
    pytest.param(65, 3, "a stem of 65 input channels is over the first-layer lens's limit of 64", id="65-channels"),
    pytest.param(4, 33, "a 4x33x33 stem has 4,356 values per patch, over the first-layer lens's limit of 4,096", id="4x33x33"),
]


@pytest.mark.parametrize(("channels", "k", "reason"), UNREPORTABLE_STEMS)
def test_a_stem_the_lens_cannot_report_is_said_once_and_everything_else_is_watched(tmp_path, caplog, channels, k, reason):
    """Before: the worker failed at step 0 and no layer got another snapshot; the 4x33x33 stem
    also stalled the training for 31 s (issue 25)."""
    model = nn.Sequential(nn.Conv2d(channels, 8, k), nn.Conv2d(8, 8, 3, padding=1, groups=8))
    with caplog.at_level(logging.INFO, logger="kernelwatch"), KernelWatch(tmp_path, handle_sigterm=False) as watch:
        for step in range(3):
            watch.snapshot(model, step)
            model(torch.randn(2, channels, 40, 40))
    lines = [r.getMessage() for r in caplog.records if "first-layer" in r.getMessage() or r.levelno >= logging.ERROR]
    assert lines == [f"kernelwatch: no first-layer lens for this model ({reason}); every other record is written"]
    assert not model[0]._forward_pre_hooks  # no patches sampled for a report that cannot be made
    summary = summarise(tmp_path)["runs"]["."]
    assert [point["step"] for point in summary["layers"]["1"]["series"]] == [0, 1, 2] and summary["first_layer"] is None
    # A checkpoint of such a model, as `kernelwatch analyze --log-dir` writes it.
    from kernelwatch.checkpoint_log import log_checkpoints

    (report,) = log_checkpoints([model.state_dict()], tmp_path / "checkpoint")
    assert report.layers[0].name == "1" and summarise(tmp_path / "checkpoint")["runs"]["."]["first_layer"] is None
    with pytest.raises(KernelWatchError, match=reason):
        first_layer_report(model[0].weight)


def test_first_layer_false_writes_no_first_layer_records(tmp_path):
    model = stem_net()
    with KernelWatch(tmp_path, handle_sigterm=False, first_layer=False) as watch:
        train(model, watch, 2)
    assert not model[0]._forward_pre_hooks
    runs = backend.get_json(backend.make_client(tmp_path.parent), "runs")["runs"]
    assert [r["first_layer"] for r in runs if r["run"] == tmp_path.name] == [[]]


# -- hostile records ----------------------------------------------------------------------------


def good_report() -> dict:
    weight = np.random.default_rng(0).standard_normal((8, 3, 3, 3))
    return first_layer_report(weight, layer="stem", stride=(1, 1)).to_json()


def spoil(report: dict, how: str) -> dict:
    report = json.loads(json.dumps(report))
    if how == "long profile":
        report["energy_profile"] += [0.1]
    elif how == "colour count":
        report["reflections"]["colour"] = [1.0]
    elif how == "string number":
        report["whitening"] = "NaN"
    elif how == "huge stem":
        report.update(in_channels=64, kernel_size=[9, 9])
    elif how == "missing key":
        del report["eigenvalues"]
    elif how == "bad source":
        report["source"] = "<script>"
    elif how == "infinite":
        report["eigenvalues"][0] = 1e999
    return report


HOSTILE = {
    "long profile": "energy_profile has 28 entries, expected in_channels x kh x kw = 27",
    "colour count": "1 colour values for 3 channels",
    "string number": "whitening must be a finite number",
    "huge stem": "5,184 dimensions per patch, over the limit of 4,096",
    "missing key": "lacks ['eigenvalues']",
    "bad source": "source must be one of ('data', 'prior')",
    "infinite": "must be a finite number",
}


@pytest.mark.parametrize("how", sorted(HOSTILE))
def test_a_hostile_report_is_a_message_not_a_crash(tmp_path, how):
    with EventWriter(tmp_path / "good") as writer:
        writer.write_first_layer(0, np.ones((8, 3, 3, 3)), good_report())
    png = backend.np.array([PNG_SIGNATURE + b"rest", json.dumps(spoil(good_report(), how)).encode()], dtype=object)
    content = fmt.summary_metadata(fmt.FIRST_LAYER, "stem").plugin_data.content
    backend._write_raw(tmp_path / "bad", fmt.make_tag(fmt.FIRST_LAYER, "stem"), content, fmt.BLOB_SEQUENCE, png)
    client = backend.make_client(tmp_path)
    error = backend.get_json(client, "first_layer?run=bad", code=422)["error"]
    assert HOSTILE[how] in error, error
    assert backend.get_json(client, "first_layer?run=good")["report"]["layer"] == "stem"  # the other run is served
    summary = summarise(tmp_path)["runs"]
    assert summary["bad"]["first_layer"] is None and HOSTILE[how] in summary["bad"]["errors"][0]
    with EventWriter(tmp_path / "refused") as writer:
        if how == "infinite":  # the writer writes it as null, as every NaN and Inf
            writer.write_first_layer(0, np.ones((8, 3, 3, 3)), spoil(good_report(), how))
        else:
            with pytest.raises(KernelWatchError, match="cannot write the first-layer report"):
                writer.write_first_layer(0, np.ones((8, 3, 3, 3)), spoil(good_report(), how))


def test_a_first_layer_record_with_a_png_that_is_not_one_or_three_blobs(tmp_path):
    content = fmt.summary_metadata(fmt.FIRST_LAYER, "stem").plugin_data.content
    tag = fmt.make_tag(fmt.FIRST_LAYER, "stem")
    report = json.dumps(good_report()).encode()
    backend._write_raw(tmp_path / "gif", tag, content, fmt.BLOB_SEQUENCE, np.array([b"GIF89a", report], dtype=object))
    backend._write_raw(tmp_path / "three", tag, content, fmt.BLOB_SEQUENCE, np.array([b"a", b"b", b"c"], dtype=object))
    client = backend.make_client(tmp_path)
    assert "is not a PNG" in client.get(f"{backend.PREFIX}/first_layer.png?run=gif&layer=stem").get_data(as_text=True)
    assert "3 blobs, expected 2" in backend.get_json(client, "first_layer?run=three", code=422)["error"]


# -- the alert ----------------------------------------------------------------------------------


def test_the_shift_rule_needs_two_snapshots_in_a_row_against_the_early_baseline():
    shift = FirstLayerShift(AnomalyConfig())
    flagged = [bool(shift.figures({"update noise": v, "input detail": d}))
               for v, d in [(0.25, 0.01), (0.27, 0.011), (0.26, 0.01), (0.40, 0.01), (0.27, 0.01),  # one-off: no flag
                            (0.27, 0.031), (0.26, 0.032), (0.26, 0.01)]]  # fmt: skip
    assert flagged == [False, False, False, False, False, False, True, False]


@pytest.mark.slow
def test_a_pipeline_that_starts_adding_noise_half_way_is_flagged_and_the_control_is_not(tmp_path):
    bench = _load("measure_first_layer_shift", ROOT / "benchmarks" / "measure_first_layer_shift.py")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a small CNN: more threads only spin on a busy runner
    try:
        noisy, _ = bench.train(str(tmp_path / "noise"), "noise", seed=0, steps=200, every=20)
        control, _ = bench.train(str(tmp_path / "none"), "none", seed=0, steps=200, every=20)
    finally:
        torch.set_num_threads(threads)
    assert control == [] and noisy and 100 < noisy[0] <= 160, (noisy, control)
    flags = backend.get_json(backend.make_client(tmp_path), "anomalies?run=noise")["anomalies"]
    shift = [f for f in flags if f["kind"] == "first_layer_shift"]
    assert shift and shift[-1]["layer"] == "0" and "input_detail" in shift[-1]["numbers"]
    assert "sees different data than at the start of the run" in shift[-1]["message"]


def test_inputs_with_nan_skip_the_first_layer_record_with_one_warning(tmp_path, caplog):
    model = stem_net()
    with KernelWatch(tmp_path, every=2, handle_sigterm=False) as watch:
        for step in range(5):
            watch.snapshot(model, step)
            model(torch.full((2, 3, 40, 40), float("nan")))
    warnings = [r.getMessage() for r in caplog.records if "first-layer record" in r.getMessage()]
    assert len(warnings) == 1 and "NaN" in warnings[0] and watch.steps == (0, 2, 4)
    body = backend.get_json(backend.make_client(tmp_path.parent), f"first_layer?run={tmp_path.name}")
    assert body["steps"] == [0]  # before any input; the depthwise layers' records go on
    assert len(backend.get_json(backend.make_client(tmp_path.parent), f"anomalies?run={tmp_path.name}")["checked_steps"]) == 3
