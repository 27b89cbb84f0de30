"""``kernelwatch summary`` on log directories that TensorBoard's loaders cannot read whole: each
run is read on its own, and a run, file or directory that cannot be read is named while the
others are summarised (issue 25). With the recovery docs/plugin.md gives for an event file that
stops TensorBoard's data server."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c

from kernelwatch import cli
from kernelwatch import format as fmt
from kernelwatch.errors import KernelWatchError
from kernelwatch.summary import summarise
from kernelwatch.writing import EventWriter
from kernelwatch_tensorboard.kernelwatch_plugin import DATA_SERVER_DOWN

from tensorboard_server import TensorBoard
from test_plugin_fuzz import T, arr, content, tag, write_run

ROOT = Path(__file__).resolve().parents[1]
#: A record header claiming 2^40 bytes, with the checksum of that length: TensorBoard's loaders
#: believe it and try to allocate a terabyte (the Rust data server aborts).
CLAIM = 2**40
DAMAGED_NAME = "events.out.tfevents.1.damaged"


def damaged_event_file(directory: Path) -> Path:
    directory.mkdir(parents=True)
    header = struct.pack("<Q", CLAIM)
    path = directory / DAMAGED_NAME
    path.write_bytes(header + struct.pack("<I", masked_crc32c(header)) + bytes(4))  # 16 bytes
    return path


def good_run(directory: Path) -> None:
    with EventWriter(directory) as writer:
        writer.write_anomalies(3, [{"layer": "dw", "kind": "collapse", "severity": "warning", "message": "m", "numbers": {}}])


def test_summary_names_a_damaged_event_file_and_summarises_the_other_runs(tmp_path, capsys):
    good_run(tmp_path / "a_good")
    damaged_event_file(tmp_path / "b_damaged")
    good_run(tmp_path / "c_good")
    assert cli.main(["summary", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "run a_good" in out and "run c_good" in out and out.count("step 3 [warning] m") == 2
    line = next(line for line in out.splitlines() if DAMAGED_NAME in line)
    assert f"claims {CLAIM:,} bytes" in line and "move it out of the log directory" in line
    summary = summarise(tmp_path)
    assert summary["runs"]["b_damaged"]["layers"] == {} and DAMAGED_NAME in summary["runs"]["b_damaged"]["errors"][0]
    with pytest.raises(KernelWatchError, match=DAMAGED_NAME):  # the only run: exit 2, naming the file
        summarise(tmp_path / "b_damaged")
    assert cli.main(["summary", str(tmp_path / "b_damaged")]) == 2
    assert DAMAGED_NAME in capsys.readouterr().err


@pytest.mark.slow
def test_the_documented_recovery_from_an_event_file_that_stops_the_data_server(tmp_path):
    """docs/plugin.md, "A damaged event file": the tab names the way out, `kernelwatch summary`
    names the file, and a TensorBoard restarted without it serves every run."""
    logs, kept = tmp_path / "logs", tmp_path / "kept"
    good_run(logs / "good")
    server = TensorBoard(logs, f"--samples_per_plugin={fmt.PLUGIN_NAME}=0", "--reload_interval=1")
    try:
        server.wait_for("runs", lambda body: [r["run"] for r in body["runs"]] == ["good"])
        damaged_event_file(logs / "damaged")  # while TensorBoard runs: its next reload reads it
        deadline, answer = time.monotonic() + 60, None
        while time.monotonic() < deadline:
            status, body, _, _ = server.get("runs")
            if status == 422:
                answer = json.loads(body)["error"]
                break
            time.sleep(0.5)
        assert answer == DATA_SERVER_DOWN
    finally:
        server.close()
    out = subprocess.run(
        [sys.executable, "-m", "kernelwatch.cli", "summary", str(logs)], capture_output=True, text=True, check=True
    ).stdout
    named = next(line for line in out.splitlines() if "TensorBoard cannot read the event file" in line)
    kept.mkdir()
    shutil.move(logs / "damaged" / named.split("'")[1], kept)
    server = TensorBoard(logs, f"--samples_per_plugin={fmt.PLUGIN_NAME}=0")
    try:
        server.wait_for("runs", lambda body: [r["run"] for r in body["runs"]] == ["good"])
        assert server.json("anomalies?run=good")["anomalies"][0]["message"] == "m"
    finally:
        server.close()


def test_a_run_directory_whose_name_is_not_utf8_is_summarised_under_an_escaped_name(tmp_path, capsys):
    """Before: "unexpected UnicodeEncodeError" for the whole parent directory (issue 25)."""
    good_run(tmp_path / "good")
    good_run(Path(os.fsdecode(os.fsencode(tmp_path) + b"/lat\xe9n")))
    assert cli.main(["summary", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "run good" in out and "run lat\\xe9n" in out
    assert cli.main(["summary", "--json", str(tmp_path)]) == 0
    assert set(json.loads(capsys.readouterr().out)["runs"]) == {"good", "lat\\xe9n"}


def test_inf_counts_in_a_clustered_fraction_record_read_as_unknown(tmp_path, capsys):
    """Before: ``int(inf)`` raised OverflowError in the summary (issue 25)."""
    value = arr(np.array([0.5, np.inf, 0, -np.inf, 0.4, 0.1, 0.6, 0.2, 0.5]))
    write_run(tmp_path / "run", [(tag(fmt.CLUSTERED_FRACTION), content(fmt.CLUSTERED_FRACTION), T, value)])
    layer = summarise(tmp_path)["runs"]["run"]["layers"]["dw"]
    assert layer["n_kernels"] is None and layer["kernel_size"] is None and layer["series"][0]["clustered_fraction"] == 0.5
    assert cli.main(["summary", str(tmp_path)]) == 0
    assert "n/a" in capsys.readouterr().out


@pytest.mark.skipif(os.geteuid() == 0 and shutil.which("setpriv") is None, reason="root reads any directory (setpriv drops it)")
def test_an_unreadable_directory_is_named_and_the_rest_summarised():
    """Before: "unexpected PermissionError" for the whole log directory (issue 25). Run as an
    unprivileged user, since root reads any directory."""
    base = Path(tempfile.mkdtemp(prefix="kernelwatch-unreadable-"))
    try:
        good_run(base / "good")
        (base / "locked").mkdir()
        good_run(base / "locked" / "run")
        for path in [base, *base.rglob("*")]:
            path.chmod(0o755 if path.is_dir() else 0o644)
        (base / "locked").chmod(0)
        drop = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"] if os.geteuid() == 0 else []
        env = {**os.environ, "PYTHONPATH": str(ROOT)}

        def summary(path: Path) -> subprocess.CompletedProcess:
            return subprocess.run([*drop, sys.executable, "-m", "kernelwatch.cli", "summary", str(path)],
                                  capture_output=True, text=True, env=env, cwd="/")  # fmt: skip

        out = summary(base)
        assert out.returncode == 0, out.stderr
        assert "run good" in out.stdout and f"unreadable: cannot read the directory '{base / 'locked'}'" in out.stdout
        out = summary(base / "locked")
        assert out.returncode == 2 and out.stderr.count("\n") == 1 and "Permission denied" in out.stderr, out.stderr
    finally:
        (base / "locked").chmod(0o755)
        shutil.rmtree(base)
