"""``kernelwatch demo``: the quick run leaves one watched TensorBoard run per arm, DoG-initialised
kernels stay clustered where default ones are not, and bad input exits 2 with one line."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.util import tensor_util

from kernelwatch import cli, demo
from kernelwatch import format as fmt

ROOT = Path(__file__).resolve().parents[1]
LAYERS = [f"blocks.{i}.depthwise" for i in range(demo.QUICK.depth)]


def clustered_by_step(run_dir: Path) -> dict[int, float]:
    """Model-wide clustered fraction per snapshot step, read back from the run's events."""
    acc = EventAccumulator(str(run_dir), size_guidance={"tensors": 0})
    acc.Reload()
    per_layer = []
    for layer in LAYERS:
        events = acc.Tensors(fmt.make_tag(fmt.CLUSTERED_FRACTION, layer))
        per_layer.append({e.step: tensor_util.make_ndarray(e.tensor_proto)[:2] for e in events})
    steps = sorted(per_layer[0])
    assert all(sorted(layer) == steps for layer in per_layer)
    # Kernel-weighted mean over the layers: [fraction, n_kernels] per layer.
    return {s: float(np.average([p[s][0] for p in per_layer], weights=[p[s][1] for p in per_layer])) for s in steps}


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """``kernelwatch demo --quick`` through the command line, as a user runs it. One torch thread:
    under CPU contention (other jobs on a 2-core machine) two OpenMP threads train several
    times slower; the figures do not depend on it."""
    log_dir = tmp_path_factory.mktemp("demo") / "runs"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-m", "kernelwatch.cli", "demo", "--quick", "--log-dir", str(log_dir)],
        capture_output=True, text=True, timeout=300, env=env, cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return log_dir, done


@pytest.mark.slow
def test_quick_demo_writes_a_watched_run_per_arm(quick_run):
    log_dir, done = quick_run
    assert sorted(p.name for p in log_dir.iterdir()) == sorted(demo.ARMS)
    schedule = demo.snapshot_schedule(demo.QUICK.steps)
    for arm in demo.ARMS:
        assert list((log_dir / arm).glob("events.out.tfevents.*.kernelwatch")), arm
        steps = sorted(clustered_by_step(log_dir / arm))
        assert steps == schedule, arm  # step 0, dense early, the last step
        assert len(steps) >= 5
    assert f"tensorboard --logdir {log_dir} --samples_per_plugin=kernelwatch=0" in done.stdout
    assert "100%" in done.stderr  # the progress bar ran to the end


@pytest.mark.slow
def test_quick_demo_dog_init_is_far_more_clustered_than_default(quick_run):
    log_dir, _ = quick_run
    dog, default = clustered_by_step(log_dir / "dog-init"), clustered_by_step(log_dir / "default")
    last = demo.QUICK.steps
    assert dog[0] >= 0.9 and dog[last] >= 0.8, dog
    assert default[0] <= 0.05 and default[last] <= 0.2, default
    assert dog[last] - default[last] >= 0.6


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--log-dir", "{file}/sub"], "cannot write to log dir"),
        (["--log-dir", "{file}"], "is not a directory"),
        (["--log-dir", "{used}"], "already holds TensorBoard events"),
        (["--log-dir", "{tmp}/new", "--steps", "0"], "steps must be an integer from 1 to 2**63 - 1, got 0"),
        (["--log-dir", "{tmp}/new", "--seed", "-1"], "seed must be an integer from 0 to 2**63 - 1, got -1"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(tmp_path, capsys, args, says):
    file = tmp_path / "a-file"
    file.write_text("")
    used = tmp_path / "used"
    (used / "memorise").mkdir(parents=True)
    (used / "memorise" / "events.out.tfevents.1.host.demo").write_bytes(b"")
    paths = {"file": file, "used": used, "tmp": tmp_path}
    code = cli.main(["demo", *(a.format(**paths) for a in args)])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("kernelwatch demo: error: ") and says in err, err
    assert not (tmp_path / "new").exists()


def test_generated_data_is_deterministic_and_learnable_in_shape():
    a, b = demo.make_images(3, 64, seed=5), demo.make_images(3, 64, seed=5)
    assert torch.equal(a, b) and a.shape == (3, 3, 64, 64)
    assert abs(float(a.mean())) < 1e-4 and abs(float(a.std()) - 1) < 1e-4
    assert not torch.equal(a, demo.make_images(3, 64, seed=6))
    crops, labels = demo.sample_crops(a, 8, 16, torch.Generator().manual_seed(0))
    assert crops.shape == (8, 3, 16, 16) and labels.shape == (8,) and int(labels.max()) < 3


def test_arms_start_from_the_same_default_kernels():
    config = demo.QUICK
    kernels = {arm: demo.build_model(config, arm, seed=0).blocks[0].depthwise.weight for arm in demo.ARMS}
    assert torch.equal(kernels["default"], kernels["memorise"])
    assert torch.allclose(kernels["small-init"], config.small_init_scale * kernels["default"])
    assert not torch.allclose(kernels["dog-init"], kernels["default"])
    assert demo.build_model(config, "default", seed=0).blocks[0].depthwise.weight.is_contiguous(
        memory_format=torch.channels_last
    )
