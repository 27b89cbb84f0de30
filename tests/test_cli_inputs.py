"""`kernelwatch analyze` on bad and unusual input, through the real command in a subprocess.

Every run must end with the expected exit code, at most one line on stderr and no traceback,
within 10 s, and without reaching for the network: a ``sitecustomize`` module put on the
subprocess's path makes every socket connection and name lookup fail, and records the attempt.
The 10 s are CPU seconds, so that a machine busy with other work does not fail the tests; a run
that waits on something instead is stopped by a 30 s wall-clock timeout.
"""

from __future__ import annotations

import json
import os
import resource
import struct
import subprocess
import sys
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from kernelwatch import cli

REPO = Path(__file__).resolve().parents[1]
CPU_LIMIT_S = 10
WALL_LIMIT_S = 30

NETWORK_GUARD = """
import os, socket

def _refuse(*args, **kwargs):
    with open(os.environ["KW_NETWORK_LOG"], "a") as log:
        log.write(repr(args)[:200] + "\\n")
    raise OSError("network use refused by tests/test_cli_inputs.py")

socket.socket.connect = socket.socket.connect_ex = _refuse
socket.create_connection = socket.getaddrinfo = _refuse
"""


@dataclass
class Run:
    returncode: int
    stdout: str
    stderr: str
    cpu_seconds: float
    network_attempts: str


@pytest.fixture
def run(tmp_path: Path) -> Callable[..., Run]:
    """Run ``python -m <args>`` with the worktree first on the path and the network guard on."""
    guard = tmp_path / "guard"
    guard.mkdir()
    (guard / "sitecustomize.py").write_text(NETWORK_GUARD)
    log = tmp_path / "network.log"
    path = [str(guard), str(REPO), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path), "KW_NETWORK_LOG": str(log)}
    env.pop("KERNELWATCH_DEBUG", None)

    def run(*args: str) -> Run:
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        out = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=WALL_LIMIT_S)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
        attempts = log.read_text() if log.exists() else ""
        return Run(out.returncode, out.stdout, out.stderr, cpu, attempts)

    return run


def analyze(run: Callable[..., Run], *args: str) -> Run:
    return command(run, "analyze", *args)


def command(run: Callable[..., Run], *args: str) -> Run:
    out = run("-m", "kernelwatch.cli", *args)
    assert "Traceback" not in out.stderr, out.stderr
    assert out.network_attempts == ""
    assert out.cpu_seconds < CPU_LIMIT_S
    return out


def refused(out: Run, command: str, *message: str) -> None:
    """Exit 2 with one line on stderr that says ``message``."""
    assert out.returncode == 2 and out.stdout == "", (out.returncode, out.stderr)
    assert out.stderr.startswith(f"kernelwatch {command}: error: ") and out.stderr.count("\n") == 1, out.stderr
    for part in message:
        assert part in out.stderr, out.stderr


# Checkpoint contents -------------------------------------------------------------------------


def depthwise_state_dict(k: int = 5, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """A stem, a depthwise and a pointwise conv, as a training script would save them."""
    torch.manual_seed(0)
    return {
        "stem.weight": torch.randn(16, 3, 3, 3, dtype=dtype),
        "dw.weight": torch.randn(16, 1, k, k, dtype=dtype),
        "dw.bias": torch.zeros(16, dtype=dtype),
        "pw.weight": torch.randn(32, 16, 1, 1, dtype=dtype),
    }


class RunsCodeWhenUnpickled:
    """Unpickling it creates the file named by ``marker``: proof that pickled code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def saved(content: object, **kwargs) -> Callable[[Path], str]:
    def make(directory: Path) -> str:
        torch.save(content, directory / "ckpt.pt", **kwargs)
        return str(directory / "ckpt.pt")

    return make


def written(data: bytes, name: str = "ckpt.pt") -> Callable[[Path], str]:
    def make(directory: Path) -> str:
        (directory / name).write_bytes(data)
        return str(directory / name)

    return make


def truncated(**save_kwargs) -> Callable[[Path], str]:
    def make(directory: Path) -> str:
        path = directory / "ckpt.pt"
        torch.save(depthwise_state_dict(), path, **save_kwargs)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        return str(path)

    return make


def needs_code(directory: Path) -> str:
    content = {"state_dict": depthwise_state_dict(), "extra": RunsCodeWhenUnpickled(directory / "pwned")}
    torch.save(content, directory / "ckpt.pt")
    return str(directory / "ckpt.pt")


def torchscript(directory: Path) -> str:
    with zipfile.ZipFile(directory / "ckpt.pt", "w") as archive:  # the entries torch.load looks at
        for entry in ("data.pkl", "constants.pkl", "code/__torch__.py", "version"):
            archive.writestr(f"archive/{entry}", b"")
    return str(directory / "ckpt.pt")


def huge_declared_tensors(directory: Path) -> str:
    """A few hundred bytes declaring 10^12 sparse and 9 * 10^9 expanded values."""
    indices, values = torch.zeros(4, 1, dtype=torch.long), torch.ones(1)
    sparse = torch.sparse_coo_tensor(indices, values, (10**6, 1, 1000, 1000), check_invariants=True)
    expanded = torch.zeros(1).expand(10**9, 1, 3, 3)
    torch.save({"sparse.weight": sparse, "expanded.weight": expanded}, directory / "ckpt.pt")
    return str(directory / "ckpt.pt")


def record_smaller_than_declared(directory: Path) -> str:
    """A zip checkpoint whose pickle declares a storage of 2^31 elements over a 576-byte record."""
    path = directory / "ckpt.pt"
    torch.save({"dw.weight": torch.zeros(16, 1, 3, 3)}, path)
    with zipfile.ZipFile(path) as archive:
        entries = {info.filename: archive.read(info) for info in archive.infolist()}
    pickle_entry = next(name for name in entries if name.endswith("data.pkl"))
    numel = struct.pack("<B", 16 * 9)  # BININT1 144: the storage's element count
    assert entries[pickle_entry].count(b"K" + numel) == 1
    entries[pickle_entry] = entries[pickle_entry].replace(b"K" + numel, b"J" + struct.pack("<i", 2**31 - 1))
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in entries.items():
            archive.writestr(name, data)
    return str(path)


def holding_itself(directory: Path) -> str:
    checkpoint: dict = {}
    checkpoint["model"] = checkpoint
    torch.save(checkpoint, directory / "ckpt.pt")
    return str(directory / "ckpt.pt")


def crc_damaged(directory: Path) -> str:
    """A zip checkpoint with one weight's byte flipped: the zip's CRC-32 no longer matches, and
    torch.load, which does not check it, would read a changed weight."""
    path = Path(saved(depthwise_state_dict())(directory))
    with zipfile.ZipFile(path) as archive:
        member = next(info for info in archive.infolist() if info.filename.endswith("/data/1"))  # dw.weight
    data = bytearray(path.read_bytes())
    name_length, extra_length = struct.unpack("<HH", data[member.header_offset + 26 : member.header_offset + 30])
    data[member.header_offset + 30 + name_length + extra_length + 17] ^= 0x40
    path.write_bytes(bytes(data))
    return str(path)


def dcp_folder(directory: Path) -> str:
    (directory / ".metadata").write_bytes(b"")
    return str(directory)


def same(target: str) -> Callable[[Path], str]:
    return lambda directory: target


REFUSED = [
    pytest.param(lambda d: str(d / "missing.pt"), ["checkpoint not found", "does not exist"], id="missing-file"),
    pytest.param(str, ["is a directory; pass the checkpoint file inside it"], id="directory"),
    pytest.param(dcp_folder, ["torch.distributed.checkpoint folder", "dcp_to_torch_save"], id="dcp-folder"),
    pytest.param(written(b""), ["the file is empty"], id="empty-file"),
    pytest.param(truncated(), ["truncated or damaged"], id="truncated-zip-checkpoint"),
    pytest.param(
        truncated(_use_new_zipfile_serialization=False), ["truncated or damaged"], id="truncated-legacy-checkpoint"
    ),
    pytest.param(written(b"epoch,loss\n1,0.5\n"), ["it is a text file"], id="text-file"),
    pytest.param(written(b"\x89PNG\r\n\x1a\n" + bytes(64), "x.png"), ["it is a PNG image"], id="png-image"),
    pytest.param(written(bytes(range(256)) * 4), ["not a PyTorch checkpoint", "corrupt"], id="random-bytes"),
    pytest.param(needs_code, ["io.open", "weights_only=False", "never does"], id="needs-pickled-code"),
    pytest.param(written(b"\x80\x04\x95" + bytes(40)), ["pickle that torch.save did not write"], id="plain-pickle"),
    pytest.param(torchscript, ["TorchScript archive"], id="torchscript"),
    pytest.param(huge_declared_tensors, ["layer sparse: weight [1000000, 1, 1000, 1000] declares"], id="huge-dims"),
    pytest.param(record_smaller_than_declared, ["truncated or damaged", "record size"], id="short-record"),
    pytest.param(crc_damaged, ["truncated or damaged", "fails its CRC-32 check"], id="crc-damaged-member"),
    pytest.param(holding_itself, ["holds no tensors"], id="dict-holding-itself"),
    pytest.param(
        saved(depthwise_state_dict(k=1)),
        ["layer dw: 1x1 kernel", "no spatial pattern", "odd sizes >= 3"],
        id="1x1-depthwise",
    ),
    pytest.param(saved(depthwise_state_dict(k=4)), ["layer dw: 4x4 kernels", "no spectrum"], id="even-kernel"),
    pytest.param(
        saved({"dw.weight": torch.randn(16, 1, 3, 5)}), ["layer dw: non-square kernel 3x5"], id="non-square-kernel"
    ),
    pytest.param(
        saved({"dw.weight": torch.ones(16, 1, 3, 3, dtype=torch.int32)}),
        ["torch.int32", "floating-point"],
        id="int-weights",
    ),
    pytest.param(
        saved({"conv.weight": torch.randn(8, 3, 3, 3), "squeezed.weight": torch.randn(16, 3, 3)}),
        ["no depthwise convolutions found"],
        id="no-depthwise-only-a-conv-and-a-3d-tensor",
    ),
    pytest.param(same("timm:hf-hub:foo/bar"), ["never downloads", "local checkpoint"], id="timm-hf-hub"),
    pytest.param(same("timm:hf_hub:foo/bar"), ["never downloads"], id="timm-hf_hub"),
    pytest.param(same("timm:foo/bar"), ["never downloads"], id="timm-hub-id-without-prefix"),
    pytest.param(same("timm:local-dir:/nonexistent"), ["/nonexistent: no such folder"], id="timm-local-dir-missing"),
    pytest.param(same("timm:"), ["needs an architecture name"], id="timm-without-name"),
]


@pytest.mark.parametrize(("make", "message"), REFUSED)
def test_bad_input_exits_2_with_one_line(run, tmp_path: Path, make, message: list[str]) -> None:
    target = make(tmp_path)
    out = analyze(run, target)
    assert out.returncode == 2, out.stderr
    assert out.stdout == ""
    assert out.stderr.startswith("kernelwatch analyze: error: ") and out.stderr.count("\n") == 1, out.stderr
    for part in message:
        assert part in out.stderr
    assert not (tmp_path / "pwned").exists()  # the pickled payload never ran


def test_a_bad_weights_file_is_refused_before_timm_is_imported(run, tmp_path: Path) -> None:
    (tmp_path / "w.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    out = analyze(run, "timm:convnext_atto", "--weights", str(tmp_path / "w.png"))
    assert out.returncode == 2 and "it is a PNG image" in out.stderr and out.stderr.count("\n") == 1
    assert out.cpu_seconds < 1  # neither torch nor timm imported: importing torch alone takes longer


def half_precision() -> dict[str, torch.Tensor]:
    weight = depthwise_state_dict()["dw.weight"]
    return {"dw.weight": weight.half(), "dw_bf16.weight": weight.bfloat16()}


ANALYSABLE = [
    pytest.param(saved(half_precision()), ["dw", "dw_bf16"], id="fp16-and-bf16"),
    pytest.param(saved({"dw.weight": depthwise_state_dict()["dw.weight"].to_sparse()}), ["dw"], id="sparse-weight"),
    pytest.param(saved({"epoch": 3, "model": {"state_dict": depthwise_state_dict()}}), ["dw"], id="nested-state-dict"),
    pytest.param(saved(depthwise_state_dict(), _use_new_zipfile_serialization=False), ["dw"], id="legacy-format"),
]


@pytest.mark.parametrize(("make", "layers"), ANALYSABLE)
def test_unusual_but_valid_checkpoints_are_analysed(run, tmp_path: Path, make, layers: list[str]) -> None:
    out = analyze(run, make(tmp_path))
    assert out.returncode == 0, out.stderr
    assert out.stderr == ""
    lines = out.stdout.splitlines()
    body = lines[2 : lines.index(lines[1], 2)]  # between the rules; the stem's line follows the total
    rows = {line.split()[0]: line.split()[1:4] for line in body}
    assert rows == {name: ["5", "16", "0"] for name in layers}  # k, kernels, invalid


def nan_inf_and_zero_kernels() -> dict[str, torch.Tensor]:
    state_dict = depthwise_state_dict()
    weight = state_dict["dw.weight"]
    weight[0] = float("nan")
    weight[1, 0, 2, 2] = float("inf")
    weight[2:4] = 0.0
    return state_dict


def test_invalid_kernels_are_visible_in_the_table_and_json(run, tmp_path: Path) -> None:
    path = saved(nan_inf_and_zero_kernels())(tmp_path)
    table = analyze(run, path)
    assert table.returncode == 0 and table.stderr == ""
    lines = table.stdout.splitlines()
    columns = lines[0].split()
    assert columns[:5] == ["layer", "k", "kernels", "invalid", "clust%"]
    layer = next(line for line in lines if line.startswith("dw ")).split()
    total = next(line for line in lines if line.startswith("all ")).split()
    assert layer[columns.index("invalid")] == "4"
    assert total[columns.index("invalid") - 1] == "4"  # the total row leaves k empty
    assert "note: 4 of 16 kernels are invalid (NaN/Inf, all-zero or constant)" in table.stdout

    report = json.loads(analyze(run, path, "--json").stdout)
    assert report["n_invalid"] == 4 and report["layers"][0]["n_invalid"] == 4


@pytest.mark.slow
def test_timm_model_is_built_offline(run) -> None:
    out = analyze(run, "timm:mobilenetv3_small_050")
    assert out.returncode == 0, out.stderr
    assert out.stderr.count("\n") == 1 and "randomly initialised" in out.stderr
    assert "blocks.1.0.conv_dw" in out.stdout


def test_the_network_guard_catches_connections(run) -> None:
    """Without this, a broken guard would let every no-network assertion above pass."""
    out = run("-c", "import socket; socket.create_connection(('example.org', 80), timeout=1)")
    assert out.returncode != 0 and "refused by tests/test_cli_inputs.py" in out.stderr
    assert "example.org" in out.network_attempts


def test_an_unexpected_failure_is_one_line_and_exit_2(monkeypatch, capsys, tmp_path: Path) -> None:
    def fail(target, **options):
        raise ZeroDivisionError("boom\nsecond line")

    monkeypatch.setattr("kernelwatch.analysis.analyze", fail)
    path = saved(depthwise_state_dict())(tmp_path)
    monkeypatch.delenv("KERNELWATCH_DEBUG", raising=False)
    assert cli.main(["analyze", path]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unexpected ZeroDivisionError: boom" in err and "KERNELWATCH_DEBUG=1" in err

    monkeypatch.setenv("KERNELWATCH_DEBUG", "1")
    with pytest.raises(ZeroDivisionError):
        cli.main(["analyze", path])


# Issue 25: what reached the catch-all "unexpected ..." line, or was accepted with exit 0 -------


def two_architectures(directory: Path) -> list[str]:
    """Checkpoints of a 5x5 and a 7x7 model with the same layer names."""
    return [saved(depthwise_state_dict(k=k))(directory / f"k{k}") for k in (5, 7)]


def test_checkpoints_of_two_architectures_are_not_merged_into_one_run(run, tmp_path: Path) -> None:
    (tmp_path / "k5").mkdir()
    (tmp_path / "k7").mkdir()
    out = analyze(run, *two_architectures(tmp_path), "--log-dir", str(tmp_path / "run"))
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.splitlines()[-1] == (
        f"kernelwatch analyze: error: step 1 ({tmp_path / 'k7' / 'ckpt.pt'}): layer dw has 7x7 kernels, but 5x5 at "
        f"step 0: the checkpoints of one run must be of one architecture; write the others to a --log-dir of their "
        f"own; {tmp_path / 'run'} holds the steps before"
    )
    from kernelwatch.summary import summarise

    series = summarise(tmp_path / "run")["runs"]["."]["layers"]["dw"]["series"]
    assert [point["step"] for point in series] == [0]  # what was written before is kept


def test_a_first_conv_of_1x1_kernels_and_a_kernel_of_255x255_are_analysed(run, tmp_path: Path) -> None:
    """Before: a ValueError ("negative strides") from the 1x1 first conv, and a 31.5 GiB matrix
    for the first-layer lens of a 255x255 depthwise kernel, which is no stem at all."""
    (tmp_path / "one").mkdir()
    (tmp_path / "big").mkdir()
    mediapipe_like = saved({"a.weight": torch.randn(8, 1, 1, 1), "b.weight": torch.randn(16, 1, 3, 3)})(tmp_path / "one")
    out = analyze(run, mediapipe_like)
    assert out.returncode == 0 and out.stderr == "", out.stderr
    assert "skipped a: 1x1 kernel" in out.stdout and out.stdout.splitlines()[2].split()[:3] == ["b", "3", "16"]
    out = analyze(run, saved({"dw.weight": torch.randn(4, 1, 255, 255)})(tmp_path / "big"))
    assert out.returncode == 0 and out.stderr == "", out.stderr
    assert "note: layer dw (255x255) read through its centre" in out.stdout and "first layer" not in out.stdout


def test_a_stem_over_the_lens_limits_is_one_line_of_the_table(run, tmp_path: Path) -> None:
    state_dict = {"stem.weight": torch.randn(8, 3, 63, 63), "dw.weight": torch.randn(16, 1, 3, 3)}
    out = analyze(run, saved(state_dict)(tmp_path))
    assert out.returncode == 0 and out.stderr == "", out.stderr
    assert out.stdout.splitlines()[-1] == (
        "first layer: first layer stem: a 3x63x63 stem has 11,907 values per patch, over the first-layer lens's "
        "limit of 4,096"
    )


@pytest.mark.parametrize("threshold", ["nan", "-1", "1e999", "0", "2.5"])
def test_a_threshold_that_is_no_cosine_dissimilarity_is_refused(run, tmp_path: Path, threshold: str) -> None:
    out = analyze(run, saved(depthwise_state_dict())(tmp_path), f"--threshold={threshold}")
    refused(out, "analyze", f"--threshold {float(threshold)}: expected a cosine dissimilarity (1 - cos) above 0")


def test_an_empty_log_dir_is_refused(run, tmp_path: Path) -> None:
    refused(analyze(run, saved(depthwise_state_dict())(tmp_path), "--log-dir", ""), "analyze", "--log-dir is empty")
    refused(command(run, "demo", "--quick", "--log-dir", ""), "demo", "the log dir is empty")
    refused(command(run, "summary", ""), "summary", "the log directory is empty")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--steps", str(10**30)], "steps must be an integer from 1 to 2**63 - 1, got " + str(10**30)),
        (["--seed", str(2**64)], f"seed must be an integer from 0 to 2**63 - 1, got {2**64}"),
    ],
)
def test_demo_arguments_out_of_range_are_refused_before_training(run, tmp_path: Path, args, message) -> None:
    refused(command(run, "demo", "--quick", "--log-dir", str(tmp_path / "demo"), *args), "demo", message)
    assert not list(tmp_path.rglob("events.out.tfevents.*"))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--codes", "0"], "codes must be an integer from 10 to 1,000,000, got 0"),
        (["--epochs", "-1"], "epochs must be an integer >= 1, got -1"),
        (["--synthetic", "-5"], "synthetic kernels must be an integer from 0 to 10,000,000, got -5"),
        (["--seed", "-1"], "seed must be an integer from 0 to 9,223,372,036,854,775,807, got -1"),
        (["--output", "{file}/spectrum.npz"], "cannot write the spectrum to '{file}/spectrum.npz': '{file}' is a file"),
        (["--output", "{dir}"], "cannot write the spectrum to '{dir}': it is a directory"),
    ],
)
def test_pretrain_refuses_bad_arguments_before_fetching_or_training(run, tmp_path: Path, args, message) -> None:
    """Before: --codes 0 failed after 84 s of training, an unwritable --output after all of it,
    and --epochs -1 wrote a spectrum of loss NaN. The network guard shows that nothing was fetched."""
    (tmp_path / "file").write_text("")
    where = {"file": tmp_path / "file", "dir": tmp_path}
    args = [arg.format(**where) for arg in args]
    out = command(run, "pretrain", "--kernel-size", "5", *args)
    refused(out, "pretrain", message.format(**where))
    assert not list(tmp_path.rglob("*.npz"))
