"""KernelWatch on real models, read back with TensorBoard's event accumulator: schedules,
records, signals, crashes, resume, anomalies and bad input."""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.plugin_event_accumulator import EventAccumulator
from tensorboard.util import tensor_util
from torch import nn

import kernelwatch
from kernelwatch import format as fmt
from kernelwatch.analysis import analyze_layer
from kernelwatch.anomalies import AnomalyConfig, AnomalyError
from kernelwatch.errors import KernelWatchError
from kernelwatch.extraction import extract_depthwise
from kernelwatch.init import dog_
from kernelwatch.metrics import layer_quality
from kernelwatch.monitor import KernelWatch, _off_device, log_schedule
from kernelwatch.spectrum import Spectrum
from kernelwatch.update_lens import REFERENCE_FILE

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}

# Shared by this file and the scripts it runs in child processes.
NET = """
import torch
from torch import nn

def net(channels=16):
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, channels, 3, padding=1),
        nn.Conv2d(channels, channels, 5, padding=2, groups=channels),
        nn.ReLU(),
        nn.Conv2d(channels, channels, 3, padding=1, groups=channels),
    )

def train_epoch(model, epoch):
    # Seeded by epoch, so that a resumed run retraces an uninterrupted one exactly.
    generator = torch.Generator().manual_seed(epoch)
    optimiser = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(2):
        x = torch.randn(4, 3, 8, 8, generator=generator)
        loss = (model(x) - x.mean(1, keepdim=True)).pow(2).mean()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
"""
exec(NET)  # defines net() and train_epoch()

DW = ("1", "3")
CONVS = ("0", "1", "3")


def layer_tags() -> set[str]:
    kinds = (fmt.PROPORTIONS, fmt.CLUSTERED_FRACTION, fmt.TOTAL_ACTIVATION, fmt.CODE_HISTOGRAM, fmt.SPRITE)
    tags = {fmt.make_tag(kind, layer) for kind in kinds for layer in DW}
    return tags | {fmt.make_tag(fmt.QUALITY, layer) for layer in CONVS} | {fmt.make_tag(fmt.ANOMALIES)}


def read(log_dir: Path, prefix: str = "kernelwatch/") -> dict[str, list[tuple[int, np.ndarray]]]:
    """Every record under ``log_dir`` whose tag starts with ``prefix`` (default: kernelwatch's
    own, "": the stock scalars too): tag -> [(step, value)], as TensorBoard reads it."""
    acc = EventAccumulator(str(log_dir), size_guidance={"tensors": 0})
    acc.Reload()
    return {
        tag: [(e.step, tensor_util.make_ndarray(e.tensor_proto)) for e in acc.Tensors(tag)]
        for tag in acc.Tags()["tensors"]
        if tag.startswith(prefix)
    }


def steps(records: dict, tag: str) -> list[int]:
    return [step for step, _ in records[tag]]


def assert_steps(log_dir: Path, expected: list[int]) -> dict:
    records = read(log_dir)
    assert layer_tags() <= set(records)
    for tag in layer_tags():
        assert steps(records, tag) == expected, tag
    return records


def run_epochs(watch: KernelWatch, model: nn.Module, epochs) -> list[int]:
    taken = []
    for epoch in epochs:
        if epoch:
            train_epoch(model, epoch)
        if watch.on_epoch_end(model, epoch):
            taken.append(epoch)
    return taken


def test_every_n_records_match_the_weights_at_each_snapshot(tmp_path):
    model = net()
    expected = {}
    with KernelWatch(tmp_path, every=2, sprite_every=1, quality_every=1) as watch:
        for epoch in range(6):
            if epoch:
                train_epoch(model, epoch)
            expected[epoch] = {name: m.weight.detach().clone() for name, m in model.named_modules() if name in CONVS}
            watch.on_epoch_end(model, epoch)
    assert watch.steps == (0, 2, 4, 5)  # 5: the last call, taken at close
    records = assert_steps(tmp_path, [0, 2, 4, 5])
    spectra = {k: Spectrum.pretrained(k) for k in (3, 5)}
    for step in (0, 2, 4, 5):
        weights = expected[step]
        for layer in DW:
            report = analyze_layer(layer, weights[layer].squeeze(1), spectra[weights[layer].shape[-1]])
            written = dict(records[fmt.make_tag(fmt.PROPORTIONS, layer)])[step]
            np.testing.assert_allclose(written, [report.proportions[c] for c in kernelwatch.CLUSTERS], rtol=1e-6)
            counts = dict(records[fmt.make_tag(fmt.CLUSTERED_FRACTION, layer)])[step]
            assert counts.tolist() == pytest.approx([getattr(report, f) for f in fmt.CLUSTERED_FIELDS], nan_ok=True)
            assert counts[:4].tolist() == [report.clustered_fraction, 16, 0, weights[layer].shape[-1]]
            # The update lens: the cumulative update since the first snapshot, none at the first.
            update_tag = fmt.make_tag(fmt.CLUSTERED_FRACTION, layer, lens=fmt.UPDATE)
            if step == 0:
                assert step not in dict(records[update_tag])
                continue
            update = (weights[layer] - expected[0][layer]).squeeze(1)
            update_report = analyze_layer(layer, update, spectra[update.shape[-1]])
            written = dict(records[update_tag])[step]
            assert written.tolist() == pytest.approx([getattr(update_report, f) for f in fmt.CLUSTERED_FIELDS])
        for layer in CONVS:
            quality = layer_quality(weights[layer])
            written = dict(records[fmt.make_tag(fmt.QUALITY, layer)])[step]
            np.testing.assert_allclose(written, [quality[m] for m in fmt.QUALITY_METRICS], equal_nan=True)
    # The spectrum of each kernel size once per run, at the first snapshot.
    assert steps(records, fmt.make_tag(fmt.SPECTRUM, 3)) == steps(records, fmt.make_tag(fmt.SPECTRUM, 5)) == [0]
    # Weights moved between snapshots, so the records must differ.
    quality = records[fmt.make_tag(fmt.QUALITY, "0")]
    assert not np.array_equal(quality[0][1], quality[-1][1])


@pytest.mark.parametrize(
    ("kwargs", "calls", "expected"),
    [
        ({"schedule": [0, 3, 7]}, range(9), [0, 3, 7, 8]),
        ({"schedule": [5]}, range(1, 7), [1, 5, 6]),  # the first call always snapshots
        ({"schedule": "log", "total_epochs": 20, "n_snapshots": 5}, range(21), [0, 1, 2, 4, 9, 20]),
        ({}, range(3), [0, 1, 2]),
    ],
)
def test_schedules(tmp_path, kwargs, calls, expected):
    if kwargs.get("schedule") == "log":
        assert log_schedule(20, 5) == expected
    model = net()
    watch = KernelWatch(tmp_path, **kwargs, sprite_every=1, quality_every=1)
    with torch.no_grad():
        for epoch in calls:
            model[1].weight.add_(0.01)
            watch.on_epoch_end(model, epoch)
    watch.close()
    watch.close()  # idempotent
    assert watch.steps == tuple(expected)
    assert_steps(tmp_path, expected)


def test_step_based_snapshots_and_on_train_end(tmp_path):
    model = net()
    watch = KernelWatch(tmp_path, every=10, sprite_every=1, quality_every=1)
    taken = [step for step in range(36) if watch.snapshot(model, step)]
    assert taken == [0, 10, 20, 30]
    assert not watch.snapshot(model, 30)  # a step never snapshots twice
    assert not watch.snapshot(model, 33, force=True)  # nor goes back
    assert watch.snapshot(model, 37, force=True)
    watch.on_train_end(model, 40)
    watch.close()
    assert_steps(tmp_path, [0, 10, 20, 30, 37, 40])
    with pytest.raises(KernelWatchError, match="closed"):
        watch.snapshot(model, 50)


def test_an_exception_in_the_with_block_flushes_and_propagates(tmp_path):
    model = net()
    with pytest.raises(RuntimeError, match="diverged"):
        with KernelWatch(tmp_path, every=3, queue_size=8, sprite_every=1, quality_every=1) as watch:
            run_epochs(watch, model, range(5))
            raise RuntimeError("diverged")
    # 4 was skipped and stays so: no final snapshot after an error.
    assert_steps(tmp_path, [0, 3])


SIGTERM_CHILD = NET + """
import sys, time
from kernelwatch import KernelWatch
model = net(64)
watch = KernelWatch(sys.argv[1], every=1, queue_size=16, sprite_every=1, quality_every=1)
with torch.no_grad():
    for step in range(8):
        model[1].weight.add_(0.01)
        watch.snapshot(model, step)
print("queued", flush=True)
time.sleep(60)
"""


THREADS_CHILD = NET + """
import sys, threading, torch
from kernelwatch.monitor import KernelWatch, _use_one_torch_thread

torch.set_num_threads(2)
model = net(channels=64)
start = {k: v.clone() for k, v in model.state_dict().items()}

def weights_after_training():
    model.load_state_dict(start)
    for epoch in (1, 2):
        train_epoch(model, epoch)
    return [p.detach().clone() for p in model.parameters()]

alone = weights_after_training()
with KernelWatch(sys.argv[1], sprite_every=1, quality_every=1) as watch:
    watch.snapshot(model, 0)
    watch.flush()  # the worker has run torch ops and stays alive
    watched = weights_after_training()
    main_threads = torch.get_num_threads()
seen = {}
def one():
    _use_one_torch_thread()
    seen["worker"] = torch.get_num_threads()
    later = threading.Thread(target=lambda: seen.setdefault("later", torch.get_num_threads()))
    later.start()
    later.join()
worker = threading.Thread(target=one)
worker.start()
worker.join()
print(main_threads, seen["worker"], seen["later"], all(torch.equal(a, b) for a, b in zip(alone, watched)))
"""


def test_the_worker_runs_one_torch_thread_and_leaves_training_alone(tmp_path):
    """The worker's ops use one torch thread; the training thread keeps its count, so its
    results are bit for bit those of a run without KernelWatch, and threads started later
    get the process's count."""
    done = subprocess.run([sys.executable, "-c", THREADS_CHILD, str(tmp_path)], capture_output=True, text=True,
                          env=ENV, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["2", "1", "2", "True"]


WAIT_CHILD = NET + """
import os, sys, torch
from kernelwatch.monitor import KernelWatch, _trains_on_every_core
cores = len(os.sched_getaffinity(0))
model = net(64)
torch.set_num_threads(cores)
with KernelWatch(sys.argv[1], every=1) as watch:
    written = []
    for step in range(3):
        train_epoch(model, step)
        watch.snapshot(model, step)
        written.append(watch._written)  # without flush(): what the worker completed by now
fewer = None
if cores > 1:
    torch.set_num_threads(cores - 1)
    fewer = _trains_on_every_core(model)
print(written, _trains_on_every_core(torch.nn.Conv2d(1, 1, 1, device="meta")), fewer)
"""


def test_a_cpu_training_on_every_core_waits_for_each_snapshot(tmp_path):
    """The worker would take a core from a CPU training that uses them all (whose other OpenMP
    threads then spin): snapshot() returns once its snapshot is written. With a core to spare,
    or a model elsewhere, it does not wait."""
    done = subprocess.run([sys.executable, "-c", WAIT_CHILD, str(tmp_path)], capture_output=True, text=True,
                          env=ENV, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    written, meta, fewer = done.stdout.rsplit("]", 1)[0] + "]", *done.stdout.rsplit("]", 1)[1].split()
    assert written == "[0, 1, 2]" and meta == "False" and fewer in ("False", "None")


def test_sigterm_writes_every_queued_snapshot(tmp_path):
    command = [sys.executable, "-c", SIGTERM_CHILD, str(tmp_path)]
    child = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=ENV)
    try:
        assert child.stdout.readline().strip() == "queued"
        child.send_signal(signal.SIGTERM)
        assert child.wait(timeout=60) == -signal.SIGTERM  # the default action still ends it
    finally:
        child.kill()
    assert_steps(tmp_path, list(range(8)))


def test_sigterm_handler_chains_to_the_previous_one(tmp_path):
    seen = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: seen.append(signum))
    try:
        model = net()
        watch = KernelWatch(tmp_path, every=1, queue_size=8, sprite_every=1, quality_every=1)
        run_epochs(watch, model, range(3))
        os.kill(os.getpid(), signal.SIGTERM)
        assert seen == [signal.SIGTERM]
        assert_steps(tmp_path, [0, 1, 2])  # written before close
        watch.close()
        assert signal.getsignal(signal.SIGTERM) is not watch._on_sigterm
    finally:
        signal.signal(signal.SIGTERM, previous)


SIGKILL_CHILD = NET + """
import sys
from kernelwatch import KernelWatch
model, n = net(), int(sys.argv[2])
watch = KernelWatch(sys.argv[1], every=1, sprite_every=1, quality_every=1)
step = 0
with torch.no_grad():
    while True:
        model[1].weight.add_(0.01)
        watch.snapshot(model, step)
        if step == n - 1:
            watch.flush()
            print("flushed", flush=True)
        step += 1
"""


def test_sigkill_keeps_every_completed_snapshot(tmp_path):
    child = subprocess.Popen(
        [sys.executable, "-c", SIGKILL_CHILD, str(tmp_path), "4"], stdout=subprocess.PIPE, text=True, env=ENV
    )
    try:
        assert child.stdout.readline().strip() == "flushed"
        time.sleep(0.3)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=10)
    records = read(tmp_path)
    # The anomalies record closes a snapshot: every snapshot up to its last one is complete.
    completed = steps(records, fmt.make_tag(fmt.ANOMALIES))
    assert completed == list(range(len(completed))) and len(completed) >= 4
    for tag in layer_tags():
        assert steps(records, tag)[: len(completed)] == completed, tag


CRASHED_RUN = NET + """
import os, sys
from kernelwatch import KernelWatch
log_dir, checkpoint = sys.argv[1], sys.argv[2]
model = net()
watch = KernelWatch(log_dir, every=2, sprite_every=1, quality_every=1)
for epoch in range(7):
    if epoch:
        train_epoch(model, epoch)
    watch.on_epoch_end(model, epoch)
    if epoch == 4:
        torch.save({"model": model.state_dict(), "watch": watch.state_dict()}, checkpoint)
watch.flush()
os._exit(0)  # dies after epoch 6 was written, without closing: the run resumes from epoch 4
"""


def test_a_resumed_run_continues_the_timeline(tmp_path):
    reference_dir, resumed_dir, checkpoint = tmp_path / "reference", tmp_path / "resumed", tmp_path / "ckpt.pt"
    reference = net()
    with KernelWatch(reference_dir, every=2, sprite_every=1, quality_every=1) as watch:
        run_epochs(watch, reference, range(10))
    subprocess.run([sys.executable, "-c", CRASHED_RUN, str(resumed_dir), str(checkpoint)], check=True, env=ENV)
    assert assert_steps(resumed_dir, [0, 2, 4, 6])  # what the crashed run left
    # TensorBoard reads a directory's files in the order of the creation second in their names:
    # a resumed run's file must not start within the same second as the crashed run's.
    time.sleep(1.0)
    state = torch.load(checkpoint, weights_only=True)
    model = net()
    model.load_state_dict(state["model"])
    watch = KernelWatch(resumed_dir, every=2, sprite_every=1, quality_every=1)
    watch.load_state_dict(state["watch"])
    assert not watch.snapshot(model, 4)  # already in the restored timeline
    assert run_epochs(watch, model, range(5, 10)) == [6, 8]
    watch.close()
    for name, value in reference.state_dict().items():
        torch.testing.assert_close(model.state_dict()[name], value, rtol=0, atol=0, msg=name)
    assert watch.steps == (0, 2, 4, 6, 8, 9)
    expected = assert_steps(reference_dir, [0, 2, 4, 6, 8, 9])
    resumed = assert_steps(resumed_dir, [0, 2, 4, 6, 8, 9])  # 6 once: the crashed run's is dropped
    for tag in layer_tags() - {fmt.make_tag(fmt.SPRITE, layer) for layer in DW}:
        for (_, a), (_, b) in zip(expected[tag], resumed[tag]):
            np.testing.assert_array_equal(a, b, err_msg=tag)
    # The update lens keeps the first snapshot of the crashed run as its reference.
    for layer in DW:
        tag = fmt.make_tag(fmt.CLUSTERED_FRACTION, layer, lens=fmt.UPDATE)
        assert steps(expected, tag) == steps(resumed, tag) == [2, 4, 6, 8, 9]
        for (_, a), (_, b) in zip(expected[tag], resumed[tag]):
            np.testing.assert_array_equal(a, b, err_msg=tag)
    with pytest.raises(KernelWatchError, match="before the first snapshot"):
        watch.load_state_dict(state["watch"])


@pytest.mark.parametrize("damage", ["empty", "truncated"])
def test_a_damaged_update_reference_restarts_the_update_lens_and_the_training_goes_on(tmp_path, caplog, damage):
    """Before: a 0-byte reference raised EOFError, a truncated one BadZipFile, out of
    load_state_dict into the training (issue 25)."""
    model = net()
    with KernelWatch(tmp_path, every=1, handle_sigterm=False) as watch:
        run_epochs(watch, model, range(3))
        state = watch.state_dict()
    reference = tmp_path / REFERENCE_FILE
    reference.write_bytes(b"" if damage == "empty" else reference.read_bytes()[:300])
    time.sleep(1.0)  # the resumed run's event file must sort after the first one's
    watch = KernelWatch(tmp_path, every=1, handle_sigterm=False)
    with caplog.at_level(logging.WARNING, logger="kernelwatch"):
        watch.load_state_dict(state)
    assert f"cannot read the update lens's reference {str(reference)!r}" in caplog.text
    assert "the update lens restarts from this run's first snapshot" in caplog.text
    assert run_epochs(watch, model, range(3, 6)) == [3, 4, 5]
    watch.close()
    records = read(tmp_path)
    assert steps(records, fmt.make_tag(fmt.CLUSTERED_FRACTION, "1")) == [0, 1, 2, 3, 4, 5]
    # The reference is the resumed run's first snapshot (3), which has no update of its own.
    assert steps(records, fmt.make_tag(fmt.CLUSTERED_FRACTION, "1", lens=fmt.UPDATE)) == [1, 2, 4, 5]


def dog_model() -> nn.Module:
    return dog_(nn.Sequential(*[nn.Conv2d(32, 32, 5, padding=2, groups=32) for _ in range(5)]), seed=0)


def test_anomalies_are_logged_hooked_written_and_raised_on_the_training_thread(tmp_path, caplog):
    model = dog_model()
    hooked = []
    watch = KernelWatch(
        tmp_path, on_anomaly=lambda a: hooked.append((a, threading.current_thread())), raise_on="warning"
    )
    watch.snapshot(model, 0)
    watch.flush()
    assert hooked == []
    with torch.no_grad():
        model[2].weight.normal_()  # one layer's kernels become noise
    with caplog.at_level(logging.WARNING, logger="kernelwatch"):
        flagged = []
        for step in (1, 2):  # memorisation-like holds from the second snapshot in a row on
            watch.snapshot(model, step)
            with pytest.raises(AnomalyError) as raised:
                watch.flush()  # raised by the next call once the worker is done, not from the worker
            flagged += [(a.step, a.layer, a.kind) for a in raised.value.anomalies]
    assert flagged == [(1, "2", "regression"), (2, "2", "memorisation"), (2, "2", "regression")]
    assert [(a.layer, a.kind, thread) for a, thread in hooked] == [(*f[1:], threading.main_thread()) for f in flagged]
    assert any("'2' looks memorisation-like" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)
    watch.close()
    records = read(tmp_path)
    written = {step: fmt.decode_json(value[0]) for step, value in records[fmt.make_tag(fmt.ANOMALIES)]}
    assert written[0] == [] and [(a["step"], a["layer"], a["kind"]) for step in (1, 2) for a in written[step]] == flagged


def test_with_strict_a_worker_failure_is_raised_on_the_training_thread(tmp_path):
    model = dog_model()
    # A bad threshold only fails when the worker applies it.
    watch = KernelWatch(tmp_path, anomaly_config=AnomalyConfig(null_levels={5: "high"}), strict=True)
    watch.snapshot(model, 0)
    with pytest.raises(KernelWatchError, match="background worker failed") as raised:
        watch.flush()
    assert isinstance(raised.value.__cause__, ValueError)
    assert not watch.snapshot(model, 1)  # disabled: nothing taken, no second error
    watch.close()
    assert fmt.make_tag(fmt.ANOMALIES) not in read(tmp_path)


def test_a_worker_failure_is_logged_once_and_the_watch_stops(tmp_path, caplog):
    model = dog_model()
    watch = KernelWatch(tmp_path, anomaly_config=AnomalyConfig(null_levels={5: "high"}))
    with caplog.at_level(logging.WARNING, logger="kernelwatch"):
        watch.snapshot(model, 0)
        watch.flush()  # nothing raised on the training thread
        assert not watch.snapshot(model, 1)
        watch.close()
    (error,) = caplog.records
    assert error.levelno == logging.ERROR and "failed at step 0 (ValueError: " in error.getMessage()
    assert f"no snapshot of this run was completed in {str(tmp_path)!r}" in error.getMessage()
    assert isinstance(error.exc_info[1], ValueError)  # not an OSError: a bug, logged with its traceback


def test_no_depthwise_layers_fail_at_the_first_snapshot(tmp_path):
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 1))
    watch = KernelWatch(tmp_path, sprite_every=1, quality_every=1)  # the model is not known yet
    with pytest.raises(KernelWatchError, match="no depthwise convolutions in Sequential"):
        watch.snapshot(model, 0)
    watch.close()


def test_nan_weights_are_invalid_and_logged(tmp_path, caplog):
    model = net()
    with torch.no_grad():
        model[3].weight[:4] = float("nan")
    with caplog.at_level(logging.INFO, logger="kernelwatch"), KernelWatch(tmp_path) as watch:
        watch.snapshot(model, 0)
        watch.flush()
    assert any("'3' has 4 of 16 invalid kernels" in r.getMessage() for r in caplog.records)
    records = read(tmp_path)
    assert records[fmt.make_tag(fmt.CLUSTERED_FRACTION, "3")][0][1][2] == 4  # n_invalid
    assert np.isnan(records[fmt.make_tag(fmt.QUALITY, "3")][0][1][0])


def test_unwritable_log_dir_fails_at_construction(tmp_path):
    (tmp_path / "a_file").write_text("")
    with pytest.raises(KernelWatchError, match="cannot write TensorBoard events"):
        KernelWatch(tmp_path / "a_file" / "logs")


def test_unsupported_sizes_are_skipped_with_one_warning(tmp_path, caplog):
    model = nn.Sequential(
        nn.Conv2d(8, 8, 4, groups=8),
        nn.Conv2d(8, 8, 3, groups=8),
        nn.Conv2d(8, 8, (1, 3), groups=8),
        nn.Conv2d(8, 8, 9, groups=8),  # served by the 7x7 spectrum through its central area
    )
    with caplog.at_level(logging.WARNING, logger="kernelwatch"), KernelWatch(tmp_path, quality_every=1) as watch:
        for step in range(3):
            watch.snapshot(model, step)
    messages = [r.getMessage() for r in caplog.records]
    assert sum("no spectrum serves the kernels of 0 (4x4)" in m for m in messages) == 1
    assert sum("left out: 2: non-square kernel 1x3" in m for m in messages) == 1
    records = read(tmp_path)
    assert steps(records, fmt.make_tag(fmt.PROPORTIONS, "1")) == [0, 1, 2]
    assert steps(records, fmt.make_tag(fmt.PROPORTIONS, "3")) == [0, 1, 2]
    assert fmt.make_tag(fmt.PROPORTIONS, "0") not in records
    assert steps(records, fmt.make_tag(fmt.QUALITY, "0")) == [0, 1, 2]  # quality for every conv


def test_bad_arguments():
    with pytest.raises(KernelWatchError, match="either every= or schedule="):
        KernelWatch("unused", every=2, schedule=[1])
    with pytest.raises(KernelWatchError, match="needs total_epochs"):
        KernelWatch("unused", schedule="log")
    with pytest.raises(KernelWatchError, match="every must be an integer"):
        KernelWatch("unused", every=0)
    with pytest.raises(KernelWatchError, match="raise_on"):
        KernelWatch("unused", raise_on="fatal")
    assert not Path("unused").exists()


def test_public_api_and_state_dict(tmp_path):
    assert kernelwatch.KernelWatch is KernelWatch
    model = net()
    with KernelWatch(tmp_path, every=2, sprite_every=1, quality_every=1) as watch:
        run_epochs(watch, model, range(3))
        state = watch.state_dict()
        with pytest.raises(KernelWatchError, match="step must be an integer"):
            watch.snapshot(model, 2.5)
    assert state == {"version": 1, "calls": 3, "last_step": 2, "steps": [0, 2], "anomalies": state["anomalies"]}
    with pytest.raises(KernelWatchError, match="not a KernelWatch state"):
        with KernelWatch(tmp_path / "other") as other:
            other.load_state_dict({"version": 1})
    assert set(extract_depthwise(model)) == set(DW)


# -- monitoring never kills a training ------------------------------------------------------------

FULL_DISK_CHILD = NET + """
import logging, resource, signal, sys
from kernelwatch import KernelWatch
from kernelwatch.errors import KernelWatchError
logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s %(message)s")
# A real file-size limit: past it write() fails with EFBIG, as it fails with ENOSPC on a full disk.
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[1]), resource.RLIM_INFINITY))
for log_dir, strict in zip(sys.argv[2:], (False, True)):
    model = net()
    watch = KernelWatch(log_dir, every=1, strict=strict, sprite_every=1, quality_every=1)
    for epoch in range(5):
        if epoch:
            train_epoch(model, epoch)
        for call in (lambda: print("epoch", epoch, watch.on_epoch_end(model, epoch), flush=True), watch.flush):
            try:
                call()
            except KernelWatchError as err:  # strict: raised at the call after the failure
                print("raised", epoch, err, flush=True)
    watch.close()
    print("trained", all(bool(p.isfinite().all()) for p in model.parameters()), flush=True)
"""


def test_a_full_disk_stops_the_watch_not_the_training(tmp_path):
    """A full disk on the worker: one ERROR logged, the training goes on, the watch stops, and
    every snapshot written before stays readable. With strict=True: raised once, at the next call."""
    log_dirs = [tmp_path / "default", tmp_path / "strict"]
    limit = "100000"  # bytes: 2 to 3 snapshots (the 3x3 spectrum record, written once, holds 237 label runs)
    done = subprocess.run([sys.executable, "-c", FULL_DISK_CHILD, limit, *map(str, log_dirs)], capture_output=True,
                          text=True, env=ENV, timeout=180)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Traceback" not in done.stderr and "Exception in thread" not in done.stderr
    runs = done.stdout.split("trained ")
    assert runs[1].startswith("True") and runs[2].startswith("True")  # every epoch of both trained
    errors = [line for line in done.stderr.splitlines() if line.startswith("ERROR")]
    for log_dir, output in zip(log_dirs, (runs[0], runs[1].partition("\n")[2])):
        lines = output.splitlines()
        taken = [int(line.split()[1]) for line in lines if line.startswith("epoch") and line.endswith(" True")]
        records = read(log_dir)
        # Every snapshot completed before the file filled is readable, each whole.
        kept = steps(records, fmt.make_tag(fmt.ANOMALIES))
        assert len(kept) >= 2 and kept == list(range(len(kept)))
        for tag in layer_tags():
            assert steps(records, tag)[: len(kept)] == kept, tag
        failed_at = len(kept)  # the snapshot the file filled in
        assert taken == list(range(failed_at + 1)) and failed_at < 4  # later calls take nothing
        message = f"background worker failed at step {failed_at} (cannot write TensorBoard events to "
        message += f"{str(log_dir)!r}: [Errno 27] File too large); snapshots up to step {failed_at - 1} are in "
        message += f"{str(log_dir)!r}, and this watch writes nothing more"
        raised = [line for line in lines if line.startswith("raised")]
        if log_dir.name == "strict":  # raised once, at the next call; nothing logged
            assert len(raised) == 1 and raised[0].startswith(f"raised {failed_at} ") and message in raised[0]
        else:  # logged once; nothing raised
            assert raised == [] and len(errors) == 1 and message in errors[0] and "training goes on" in errors[0]
        assert not (log_dir / "kernelwatch.lock").exists()  # released at close


def test_steps_must_be_non_negative_int64(tmp_path):
    model = net()
    with pytest.raises(KernelWatchError, match="schedule"):
        KernelWatch(tmp_path / "other", schedule=[0, -5])
    with KernelWatch(tmp_path, every=1, sprite_every=1, quality_every=1) as watch:
        for bad in (2**63, -1, 2**64 + 3):
            with pytest.raises(KernelWatchError, match=r">= 0 and < 2\*\*63"):
                watch.snapshot(model, bad)  # raised at the call, not by the worker
        assert watch.snapshot(model, 0)
        assert watch.snapshot(model, np.int64(2**63 - 1))  # the largest step TensorBoard stores
        with pytest.raises(KernelWatchError, match=r"< 2\*\*63"):
            watch.on_train_end(model, 2**63)
    assert steps(read(tmp_path), fmt.make_tag(fmt.ANOMALIES)) == [0, 2**63 - 1]


def test_a_restarting_step_counter_is_warned_once(tmp_path, caplog):
    model = net()
    watch = KernelWatch(tmp_path, every=1, sprite_every=1, quality_every=1)
    with caplog.at_level(logging.DEBUG, logger="kernelwatch"):
        taken = [watch.snapshot(model, batch) for epoch in range(3) for batch in range(3)]
    assert taken == [True, True, True] + [False] * 6
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1
    assert "step 0 is not after the previous call's step 2" in warnings[0] and "global step" in warnings[0]
    state = watch.state_dict()
    watch.close()
    # A resumed run replaying the steps up to its checkpoint is not warned.
    caplog.clear()
    resumed = KernelWatch(tmp_path, every=1, sprite_every=1, quality_every=1)
    resumed.load_state_dict(state)
    with caplog.at_level(logging.WARNING, logger="kernelwatch"):
        assert [resumed.snapshot(model, step) for step in (1, 2, 3)] == [False, False, True]
        assert caplog.records == []
        assert not resumed.snapshot(model, 0)
    resumed.close()
    assert len(caplog.records) == 1 and "global step" in caplog.records[0].getMessage()


HOLDER_CHILD = NET + """
import sys, time
from kernelwatch import KernelWatch
watch = KernelWatch(sys.argv[1], every=1, sprite_every=1, quality_every=1)
watch.snapshot(net(), 0)
watch.flush()
print("holding", flush=True)
time.sleep(60)
"""


def test_two_watches_on_one_log_dir_are_reported(tmp_path, caplog):
    lock = tmp_path / "kernelwatch.lock"
    # Another live process: a warning naming both processes; strict: an error.
    child = subprocess.Popen([sys.executable, "-c", HOLDER_CHILD, str(tmp_path)], stdout=subprocess.PIPE,
                             text=True, env=ENV)  # fmt: skip
    try:
        assert child.stdout.readline().strip() == "holding"
        with caplog.at_level(logging.INFO, logger="kernelwatch"):
            second = KernelWatch(tmp_path, every=1, sprite_every=1, quality_every=1)
        (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert f"pid {child.pid} on host" in warning and f"this one (pid {os.getpid()} on host" in warning
        assert "duplicate steps" in warning and str(lock) in warning
        second.close()
        assert lock.exists()  # the other process's, left alone
        with pytest.raises(KernelWatchError, match=f"pid {child.pid} on host"):
            KernelWatch(tmp_path, every=1, strict=True, sprite_every=1, quality_every=1)
        # Killed without closing (SIGTERM: its handler flushes, then the process dies).
        child.send_signal(signal.SIGTERM)
        assert child.wait(timeout=60) == -signal.SIGTERM
    finally:
        child.kill()
    assert lock.exists()
    # A restarted run takes the stale lock over, without a warning.
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="kernelwatch"):
        first = KernelWatch(tmp_path, every=1, sprite_every=1, quality_every=1)
    assert [r.levelno for r in caplog.records] == [logging.INFO]
    assert f"took over the lock in {str(tmp_path)!r} of pid {child.pid}" in caplog.records[0].getMessage()
    assert f'"pid": {os.getpid()}' in lock.read_text()
    # A second watch in this process.
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="kernelwatch"):
        other = KernelWatch(tmp_path, every=1, sprite_every=1, quality_every=1)
    assert "another KernelWatch of this process already writes to" in caplog.records[0].getMessage()
    with pytest.raises(KernelWatchError, match="close the other watch first"):
        KernelWatch(tmp_path, every=1, strict=True, sprite_every=1, quality_every=1)
    other.close()
    first.close()
    assert not lock.exists()
    # A lock of another host cannot be checked: reported, and left for the user to delete.
    lock.write_text('{"pid": 1, "host": "elsewhere.example", "since": "2024-01-01 00:00:00", "command": "train.py"}')
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="kernelwatch"):
        KernelWatch(tmp_path, sprite_every=1, quality_every=1).close()
    assert "pid 1 on host elsewhere.example, since 2024-01-01 00:00:00: train.py" in caplog.records[0].getMessage()
    assert lock.exists()


def test_a_kernel_size_change_gets_its_own_series(tmp_path, caplog):
    model = net()
    wider = nn.Conv2d(16, 16, 7, padding=3, groups=16)
    with caplog.at_level(logging.WARNING, logger="kernelwatch"):
        watch = KernelWatch(tmp_path, every=1, sprite_every=1, quality_every=1)
        watch.snapshot(model, 0)
        watch.snapshot(model, 1)
        five, model[1] = model[1], wider
        watch.snapshot(model, 2)
        watch.snapshot(model, 3)
        model[1] = five
        watch.snapshot(model, 4)
        state = watch.state_dict()
        watch.close()
    (warning,) = [r.getMessage() for r in caplog.records]
    assert "layer '1' changed from 5x5 to 7x7 at step 2" in warning and "'1@7x7'" in warning
    assert state["kernel_sizes"] == {"1": [5, 5]}
    # Resumed: the 7x7 kernels continue their own series.
    resumed = KernelWatch(tmp_path, every=1, sprite_every=1, quality_every=1)
    resumed.load_state_dict(state)
    model[1] = wider
    resumed.snapshot(model, 5)
    resumed.close()
    records = read(tmp_path)
    for kind in (fmt.PROPORTIONS, fmt.CLUSTERED_FRACTION, fmt.SPRITE, fmt.QUALITY):
        assert steps(records, fmt.make_tag(kind, "1")) == [0, 1, 4], kind
        assert steps(records, fmt.make_tag(kind, "1@7x7")) == [2, 3, 5], kind
    assert records[fmt.make_tag(fmt.CLUSTERED_FRACTION, "1")][0][1][3] == 5  # kernel size
    assert records[fmt.make_tag(fmt.CLUSTERED_FRACTION, "1@7x7")][0][1][3] == 7
    # Each size's update lens starts at its own first snapshot.
    assert steps(records, fmt.make_tag(fmt.CLUSTERED_FRACTION, "1@7x7", lens=fmt.UPDATE)) == [3, 5]
    assert steps(records, fmt.make_tag(fmt.SPECTRUM, 7)) == [2, 5]  # and again by the resumed run


UNWRITABLE_CHILD = """
import resource, signal, sys
from kernelwatch import KernelWatch
from kernelwatch.errors import KernelWatchError
for log_dir in sys.argv[1:]:
    if log_dir.endswith("full"):  # nothing can be written: as a full disk at the start
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (0, resource.RLIM_INFINITY))
    try:
        KernelWatch(log_dir, sprite_every=1, quality_every=1)
    except KernelWatchError as err:
        print(err, flush=True)
"""


def test_an_unwritable_log_dir_is_one_clear_error_without_a_traceback(tmp_path):
    (tmp_path / "a_file").write_text("")
    (tmp_path / "read_only").mkdir(mode=0o500)
    log_dirs = [tmp_path / "a_file" / "logs", tmp_path / "full"]  # "full" last: it limits the process
    if os.geteuid() != 0:  # root writes anywhere
        log_dirs.insert(0, tmp_path / "read_only")
    done = subprocess.run([sys.executable, "-c", UNWRITABLE_CHILD, *map(str, log_dirs)], capture_output=True,
                          text=True, env=ENV, timeout=60)  # fmt: skip
    assert done.returncode == 0 and done.stderr == "", done.stderr  # no thread's traceback
    errors = done.stdout.splitlines()
    assert len(errors) == len(log_dirs)
    for log_dir, error in zip(log_dirs, errors):
        assert error.startswith(f"cannot write TensorBoard events to {str(log_dir)!r}: "), error
        assert not log_dir.is_dir() or list(log_dir.iterdir()) == []  # no lock, no empty event file
    assert errors[-1].endswith("File too large")


FSDP_FULL_DISK_CHILD = NET + """
import logging, os, resource, signal, sys
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from kernelwatch import KernelWatch
logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
dist.init_process_group("gloo")
rank = dist.get_rank()
model = net()
fully_shard(model, mesh=init_device_mesh("cpu", (2,)))
watch = KernelWatch(sys.argv[1], every=1, handle_sigterm=False, sprite_every=1, quality_every=1)
if rank == 0:  # only the writer's disk fills
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (100000, resource.RLIM_INFINITY))  # the 3x3 spectrum record holds 237 label runs
for epoch in range(5):
    if epoch:
        train_epoch(model, epoch)
    watch.on_epoch_end(model, epoch)
    watch.flush()
watch.close()
print("rank", rank, "trained", flush=True)
dist.barrier()
dist.destroy_process_group()
# The exit handlers (kernelwatch's among them) run; then no interpreter finalization, in which
# torch's gloo threads sometimes abort ("terminate called without an active exception", 1 run
# in about 6 here) after everything this test checks has happened.
import atexit
atexit._run_exitfuncs()
sys.stdout.flush()
os._exit(0)
"""


@pytest.mark.slow
def test_under_fsdp_a_stopped_watch_still_gathers_with_the_other_ranks(tmp_path):
    """After the writer's failure the main rank still takes part in the gathers the other ranks
    enter at each snapshot, so no collective is left unmatched."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**ENV, "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
    ranks = [
        subprocess.Popen([sys.executable, "-c", FSDP_FULL_DISK_CHILD, str(tmp_path)], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env={**env, "RANK": str(rank)})  # fmt: skip
        for rank in range(2)
    ]
    try:
        outputs = [rank.communicate(timeout=150) for rank in ranks]
    finally:
        for rank in ranks:
            rank.kill()
    for rank, (process, (out, err)) in enumerate(zip(ranks, outputs)):
        assert process.returncode == 0 and f"rank {rank} trained" in out, err[-3000:]
    (error,) = [line for line in outputs[0][1].splitlines() if line.startswith("ERROR")]
    assert "snapshots up to step 1 are in" in error
    assert steps(read(tmp_path), fmt.make_tag(fmt.ANOMALIES)) == [0, 1]


def test_sprites_and_quality_at_their_cadence_complete_the_first_and_last_snapshot(tmp_path):
    """Sprites and quality metrics every third snapshot, at each series' first, and for the last
    snapshot at close: the very records a watch that writes everything writes at those steps."""
    model = net()
    full = KernelWatch(tmp_path / "full", sprite_every=1, quality_every=1)
    sparse = KernelWatch(tmp_path / "sparse", sprite_every=3, quality_every=3)
    for epoch in range(5):
        if epoch:
            train_epoch(model, epoch)
        full.on_epoch_end(model, epoch)
        sparse.on_epoch_end(model, epoch)
    full.close()
    sparse.close()
    everything, some = read(tmp_path / "full"), read(tmp_path / "sparse")
    assert set(some) == set(everything)
    for layer in DW:
        assert steps(some, fmt.make_tag(fmt.SPRITE, layer)) == [0, 3, 4]
        assert steps(some, fmt.make_tag(fmt.SPRITE, layer, fmt.UPDATE)) == [1, 3, 4]  # its first snapshot: 1
    for layer in CONVS:
        assert steps(some, fmt.make_tag(fmt.QUALITY, layer)) == [0, 3, 4]
    for tag, records in some.items():
        detail = fmt.parse_tag(tag).kind in (fmt.SPRITE, fmt.QUALITY)
        assert detail or steps(some, tag) == steps(everything, tag), tag
        written = dict(everything[tag])
        for step, value in records:
            if value.dtype == object:
                assert value.tolist() == written[step].tolist(), (tag, step)
            else:
                np.testing.assert_array_equal(value, written[step], err_msg=f"{tag} at {step}")


def write_both_ways(tmp_path, on_device) -> tuple[dict, dict]:
    """The records of two snapshots written from CPU kernels alone, and classified from
    ``on_device(kernels)`` (the CPU copies only drawn)."""
    from kernelwatch.anomalies import AnomalyDetector
    from kernelwatch.snapshot import SpectrumCache, write_snapshot
    from kernelwatch.update_lens import UpdateReference
    from kernelwatch.writing import EventWriter

    model = net()
    records = []
    for name, device in (("cpu", False), ("device", True)):
        spectra, reference, detector = SpectrumCache(), UpdateReference(), AnomalyDetector()
        with EventWriter(tmp_path / name) as writer:
            for step in (0, 1):
                kernels = extract_depthwise(model)
                weights = {n: m.weight.detach().clone() for n, m in model.named_modules() if n in CONVS}
                there = {n: on_device(k) for n, k in kernels.items()} if device else None
                write_snapshot(writer, step, kernels, weights, spectra, reference, detector, on_device=there)
                train_epoch(model, step + 1)
        records.append(read(tmp_path / name))
        model = net()
    return records[0], records[1]


def assert_same_records(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    for tag in a:
        for (step_a, x), (step_b, y) in zip(a[tag], b[tag], strict=True):
            assert step_a == step_b
            if x.dtype == object:
                assert x.tolist() == y.tolist(), tag
            else:
                np.testing.assert_allclose(x, y, rtol=1e-6, equal_nan=True, err_msg=tag)


def test_kernels_classified_from_another_copy_write_the_same_records(tmp_path):
    """The device path on CPU: classification from the ``on_device`` copies (the update lens
    against them too), sprites and activation from the CPU copies; the same records."""
    assert_same_records(*write_both_ways(tmp_path, lambda k: k.clone()))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_kernels_on_a_gpu_are_classified_there_with_the_same_records(tmp_path):
    assert_same_records(*write_both_ways(tmp_path, lambda k: k.cuda()))
    model = net().cuda()
    with KernelWatch(tmp_path / "watch") as watch:
        watch.on_epoch_end(model, 0)
        with torch.no_grad():
            model[1].weight.add_(0.01 * torch.randn_like(model[1].weight))
        watch.on_epoch_end(model, 1)
    assert steps(read(tmp_path / "watch"), fmt.make_tag(fmt.PROPORTIONS, "1")) == [0, 1]


@pytest.mark.parametrize(
    "dtype, memory_format",
    [(torch.float32, torch.contiguous_format), (torch.float32, torch.channels_last), (torch.bfloat16, torch.contiguous_format)],
)
def test_weight_copies_hold_the_weights_of_their_snapshot(dtype, memory_format):
    conv = nn.Conv2d(8, 8, 3, groups=8).to(dtype=dtype, memory_format=memory_format)
    copy = _off_device(conv.weight)
    before = conv.weight.detach().clone()
    with torch.no_grad():
        conv.weight.add_(1.0)  # training goes on in place while the worker reads the copy
    assert copy.dtype == dtype and copy.shape == conv.weight.shape and torch.equal(copy, before)
