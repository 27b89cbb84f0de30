"""The examples run end to end (``--quick``) and leave readable kernelwatch events behind."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from kernelwatch import format as fmt
from kernelwatch.update_lens import REFERENCE_FILE

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def run_example(args: list[str], cwd: Path, env: dict[str, str] | None = None) -> str:
    done = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def snapshot_steps(log_dir: Path, layer: str) -> list[int]:
    acc = EventAccumulator(str(log_dir), size_guidance={"tensors": 0})
    acc.Reload()
    return [event.step for event in acc.Tensors(fmt.make_tag(fmt.PROPORTIONS, layer))]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("script", "layer", "steps"),
    [
        ("train_plain.py", "stages.0.conv_dw", [0, 1, 2]),
        ("train_accelerate.py", "stages.0.conv_dw", list(range(9))),  # log-spaced over 8 steps: all
        ("train_timm_convnext.py", "stages.0.blocks.0.conv_dw", [0, 2, 4, 6, 8]),
    ],
)
def test_example_quick(tmp_path, script, layer, steps):
    log_dir = tmp_path / "run"
    out = run_example([sys.executable, str(EXAMPLES / script), "--quick", "--log-dir", str(log_dir)], tmp_path)
    assert f"tensorboard --logdir {log_dir} --samples_per_plugin=kernelwatch=0" in out
    assert snapshot_steps(log_dir, layer) == steps


@pytest.mark.slow
def test_accelerate_example_two_processes(tmp_path):
    """Under ``accelerate launch`` with two CPU processes, only the main one writes."""
    log_dir = tmp_path / "run"
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    launch += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    env = {**os.environ, "ACCELERATE_USE_CPU": "1"}  # gloo processes instead of GPUs
    run_example([*launch, str(EXAMPLES / "train_accelerate.py"), "--quick", "--log-dir", str(log_dir)], tmp_path, env)
    # One event file and the update lens's reference, both from the main process.
    files = sorted(p.name for p in log_dir.iterdir())
    assert len(files) == 2 and files[0].startswith("events.out.tfevents.") and files[1] == REFERENCE_FILE
    assert snapshot_steps(log_dir, "stages.0.conv_dw") == list(range(5))  # 2 epochs of 2 steps per process
