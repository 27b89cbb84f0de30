"""KernelWatch under ``accelerate launch`` with two CPU processes (gloo): DDP, FSDP2 and FSDP1.

Both ranks must exit 0, only the main process may write (one event file), and what it writes
must equal a single-process run of the same training (tests/scripts/monitor_run.py).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from kernelwatch.update_lens import REFERENCE_FILE

from tensorboard_server import free_port
from test_monitor import read

SCRIPT = Path(__file__).resolve().parent / "scripts" / "monitor_run.py"
ROOT = SCRIPT.parents[2]
# One thread per process: two ranks share this runner's cores.
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
STEPS = [0, 2, 4, 5]


def run(command: list[str]) -> str:
    done = subprocess.run(command, capture_output=True, text=True, env=ENV, timeout=180)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> dict:
    log_dir = tmp_path_factory.mktemp("single")
    assert f"rank 0 steps {STEPS}" in run([sys.executable, str(SCRIPT), str(log_dir), "ddp"])
    return read(log_dir, prefix="")


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ddp", "fsdp", "fsdp1"])
def test_two_ranks_one_writer_same_results(tmp_path, single, mode):
    # accelerate starts several CPU processes only through --multi_gpu (its --cpu flag means one
    # process); the script's Accelerator(cpu=True) then joins them with gloo.
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    launch += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    launch += ["--main_process_port", str(free_port())]
    output = run([*launch, str(SCRIPT), str(tmp_path), mode])
    # Both ranks kept the same timeline (under FSDP both gathered at every snapshot).
    assert f"rank 0 steps {STEPS}" in output and f"rank 1 steps {STEPS}" in output
    files = sorted(p.name for p in tmp_path.rglob("*") if p.is_file())
    # One event file and the update lens's reference, both from the main process.
    assert len(files) == 2 and files[0].startswith("events.out.tfevents.") and files[1] == REFERENCE_FILE
    records = read(tmp_path, prefix="")
    assert records.keys() == single.keys() and len(records) > 30
    for tag, series in single.items():
        assert [step for step, _ in records[tag]] == [step for step, _ in series], tag
        for (_, value), (_, expected) in zip(records[tag], series):
            np.testing.assert_array_equal(value, expected, err_msg=tag)
