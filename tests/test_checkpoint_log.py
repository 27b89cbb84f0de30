"""`kernelwatch analyze CKPT ... --log-dir DIR`: checkpoints a user already has, as one run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from kernelwatch import cli
from kernelwatch import format as fmt
from kernelwatch.checkpoint_log import CheckpointLog, log_checkpoints
from kernelwatch.errors import KernelWatchError
from kernelwatch.monitor import KernelWatch
from kernelwatch.update_lens import REFERENCE_FILE

from test_monitor import net, read, train_epoch


def checkpoints(tmp_path: Path, epochs: int = 3) -> list[str]:
    """State dicts of ``net()`` after 0, 1, 2, ... epochs of training, as files."""
    model, paths = net(), []
    for epoch in range(epochs):
        if epoch:
            train_epoch(model, epoch)
        paths.append(str(tmp_path / f"epoch{epoch}.pt"))
        torch.save(model.state_dict(), paths[-1])
    return paths


def cli_run(capsys, *args: str) -> tuple[int, str, str]:
    code = cli.main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_three_checkpoints_make_one_run_that_summary_reads_back(tmp_path, capsys):
    paths = checkpoints(tmp_path)
    log_dir = tmp_path / "run"
    code, out, err = cli_run(capsys, "analyze", *paths, "--log-dir", str(log_dir), "--steps", "0,50,100")
    assert code == 0, err
    assert "all " in out  # the last checkpoint's table
    assert [line.split(":")[0] for line in err.splitlines()[:3]] == ["step 0", "step 50", "step 100"]

    code, out, err = cli_run(capsys, "summary", "--json", str(log_dir))
    assert code == 0, err
    runs = json.loads(out)["runs"]
    assert list(runs) == ["."]
    layers = runs["."]["layers"]
    assert list(layers) == ["1", "3"]  # model order
    for layer in layers.values():
        series = layer["series"]
        assert [point["step"] for point in series] == [0, 50, 100]
        assert series[0]["update"] is None  # the first checkpoint is the update lens's reference
        assert all(point["update"] is not None for point in series[1:])
        assert all(0 <= point["null_clustered_fraction"] <= 1 for point in series)
    assert (log_dir / REFERENCE_FILE).is_file()


def test_the_run_holds_what_the_monitor_writes(tmp_path):
    """Same model, same steps: the records of a watched training and of its checkpoints agree."""
    paths = checkpoints(tmp_path)
    model = net()
    # Sprites and quality metrics at every snapshot, as the checkpoints write them.
    with KernelWatch(tmp_path / "watched", every=1, sprite_every=1, quality_every=1) as watch:
        for epoch in range(3):
            if epoch:
                train_epoch(model, epoch)
            watch.on_epoch_end(model, epoch)
    log_checkpoints(paths, tmp_path / "logged")

    watched, logged = read(tmp_path / "watched"), read(tmp_path / "logged")
    assert set(watched) == set(logged)
    assert fmt.make_tag(fmt.CLUSTERED_FRACTION, "1", fmt.UPDATE) in logged
    for tag, records in watched.items():
        assert [step for step, _ in records] == [step for step, _ in logged[tag]], tag
        for (_, a), (_, b) in zip(records, logged[tag]):
            if tag == fmt.make_tag(fmt.FIRST_LAYER, "0"):  # the same filters; the monitor's report
                assert a[0] == b[0]  # measures them against sampled inputs, a checkpoint's the prior
            elif a.dtype == object:  # sprites, spectra and anomalies: bytes
                assert a.tolist() == b.tolist(), tag
            else:
                np.testing.assert_allclose(a, b, rtol=1e-6, err_msg=tag)


def test_a_model_and_a_state_dict_give_the_same_reports(tmp_path):
    model = net()
    with CheckpointLog(tmp_path / "a") as run:
        from_module = run.add(0, model)
    with CheckpointLog(tmp_path / "b") as run:
        from_state_dict = run.add(0, model.state_dict())
    assert from_module.to_dict() == from_state_dict.to_dict()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--steps", "0,1"], "--steps gives 2 step(s) for 3 checkpoint(s)"),
        (["--steps", "0,x,2"], "expected integers separated by commas"),
        (["--steps", "0,2,2"], "steps must be >= 0 and increase"),
        (["--steps=-1,2,3"], "steps must be >= 0 and increase"),
    ],
)
def test_bad_steps_are_one_line_and_exit_2(tmp_path, capsys, extra, message):
    paths = checkpoints(tmp_path)
    code, out, err = cli_run(capsys, "analyze", *paths, "--log-dir", str(tmp_path / "run"), *extra)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_other_bad_uses_are_one_line_and_exit_2(tmp_path, capsys):
    paths = checkpoints(tmp_path, epochs=2)
    cases = [
        ([*paths], "2 checkpoints: write them as one run with --log-dir DIR"),
        ([paths[0], "--steps", "3"], "--steps goes with --log-dir"),
        ([paths[0], str(tmp_path / "missing.pt"), "--log-dir", str(tmp_path / "r")], "checkpoint not found"),
        ([paths[0], "--weights", paths[1]], "--weights only goes with a timm:NAME target"),
    ]
    for args, message in cases:
        code, out, err = cli_run(capsys, "analyze", *args)
        assert code == 2 and err.count("\n") == 1 and message in err, (args, err)

    assert cli_run(capsys, "analyze", *paths, "--log-dir", str(tmp_path / "run"))[0] == 0
    code, _, err = cli_run(capsys, "analyze", *paths, "--log-dir", str(tmp_path / "run"))
    assert code == 2 and "holds a run already" in err


def test_a_checkpoint_without_depthwise_layers_stops_the_run_with_its_step(tmp_path, capsys):
    paths = checkpoints(tmp_path, epochs=1)
    torch.save({"conv.weight": torch.randn(8, 3, 3, 3)}, tmp_path / "plain.pt")
    code, _, err = cli_run(capsys, "analyze", paths[0], str(tmp_path / "plain.pt"), "--log-dir", str(tmp_path / "r"))
    assert code == 2 and err.count("\n") == 2  # the first step's line, then the error
    assert "step 1 (" in err and "no depthwise convolutions found" in err and "holds the steps before" in err


def test_an_even_sized_layer_is_skipped_with_its_reason_and_the_others_written(tmp_path):
    model = torch.nn.Sequential(*net(), torch.nn.Conv2d(16, 16, 4, padding=2, groups=16))  # layer "4": 4x4
    with CheckpointLog(tmp_path / "run") as run:
        report = run.add(0, model)
    assert [layer.name for layer in report.layers] == ["1", "3"]
    assert set(report.skipped) == {"4"} and "4x4" in report.skipped["4"]
    tags = set(read(tmp_path / "run"))
    assert {fmt.make_tag(fmt.PROPORTIONS, layer) for layer in ("1", "3")} <= tags
    assert fmt.make_tag(fmt.PROPORTIONS, "4") not in tags


def test_steps_must_increase_in_the_api(tmp_path):
    with CheckpointLog(tmp_path / "run") as run:
        run.add(5, net())
        with pytest.raises(KernelWatchError, match="steps must increase"):
            run.add(5, net())


@pytest.mark.slow
def test_timm_weights_count_as_checkpoints(tmp_path, capsys):
    import timm

    from kernelwatch.init import dog_

    paths = []
    for seed in range(2):
        torch.manual_seed(seed)
        model = dog_(timm.create_model("mobilenetv3_small_050", pretrained=False))
        paths.append(str(tmp_path / f"w{seed}.pt"))
        torch.save(model.state_dict(), paths[-1])
    args = ["--weights", paths[0], "--weights", paths[1], "--log-dir", str(tmp_path / "run")]
    code, _, err = cli_run(capsys, "analyze", "timm:mobilenetv3_small_050", *args)
    assert code == 0, err
    code, out, _ = cli_run(capsys, "summary", "--json", str(tmp_path / "run"))
    series = json.loads(out)["runs"]["."]["layers"]["blocks.0.0.conv_dw"]["series"]
    assert [point["step"] for point in series] == [0, 1]
