"""The ``kernelwatch`` command: run the ``demo``, ``analyze`` a checkpoint or timm model,
``summary`` of a log, ``pretrain`` a spectrum.

Exit codes: 0 success, 2 bad input or any other failure (with a one-line message on stderr;
``KERNELWATCH_DEBUG=1`` shows the traceback of unexpected failures instead).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from kernelwatch._config import DEFAULT_N_CODES, DEFAULT_SEED
from kernelwatch.checkpoint_file import check_checkpoint_file
from kernelwatch.errors import KernelWatchError

#: The one timm model source taken besides registry names: a local model folder (``config.json``).
_TIMM_LOCAL_SOURCE = "local-dir"


def _load_targets(targets: list[str], weights: list[str]) -> Iterator[tuple[str, Any]]:
    """``(name, checkpoint)`` for each checkpoint to analyse: a path, or a ``timm:NAME`` model
    (once per ``--weights`` file), loaded only when its turn comes. Every input is checked
    first, before torch and timm are imported (seconds), so that mistakes are refused at once."""
    if weights and (len(targets) > 1 or not targets[0].startswith("timm:")):
        raise KernelWatchError("--weights only goes with a timm:NAME target (one, with one or more --weights)")
    for target in targets:
        if target.startswith("timm:"):
            _check_timm_name(target[len("timm:") :])
        else:
            check_checkpoint_file(target)
    for path in weights:
        check_checkpoint_file(path)
    return _loaded_targets(targets, weights)


def _loaded_targets(targets: list[str], weights: list[str]) -> Iterator[tuple[str, Any]]:
    for target in targets:
        if not target.startswith("timm:"):
            yield target, target
            continue
        name = target[len("timm:") :]
        model = _build_timm_model(name)
        if not weights:
            print(
                f"note: {name} is randomly initialised (kernelwatch never downloads weights; "
                "pass --weights FILE for trained ones)",
                file=sys.stderr,
            )
            yield target, model
        for path in weights:
            _load_weights(model, name, path)
            yield path, model


def _check_timm_name(name: str) -> None:
    """Refuse names that make timm fetch something: kernelwatch never downloads."""
    if not name:
        raise KernelWatchError("timm: needs an architecture name, e.g. timm:convnext_atto")
    source, has_source, location = name.partition(":")
    if has_source and source.lower() == _TIMM_LOCAL_SOURCE:
        _check_timm_model_folder(location)
    elif has_source or "/" in name or "\\" in name:
        # hf-hub:, hf_hub:, bare Hub ids (older timm strips "owner/") and whatever timm adds next.
        raise KernelWatchError(
            f"timm:{name} names a model to download, and kernelwatch never downloads: pass a local "
            "checkpoint file, or timm:ARCH --weights FILE with a timm architecture name"
        )


def _check_timm_model_folder(folder: str) -> None:
    if not os.path.isdir(folder):
        raise KernelWatchError(f"timm:{_TIMM_LOCAL_SOURCE}:{folder}: no such folder")
    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise KernelWatchError(
            f"timm:{_TIMM_LOCAL_SOURCE}:{folder}: the folder has no config.json, so it is no timm model folder"
        )


def _build_timm_model(name: str) -> Any:
    """The timm architecture ``name``, randomly initialised."""
    # timm 1.0 fetches nothing for a registry name with pretrained=False; offline mode keeps that
    # true should timm change. huggingface_hub reads the variable on import, hence before timm's.
    os.environ["HF_HUB_OFFLINE"] = "1"
    import timm

    try:
        return timm.create_model(name, pretrained=False)
    except Exception as err:  # unknown names and bad model folders surface as many exception types
        reason = f"missing key {err}" if isinstance(err, KeyError) else _first_line(err)
        raise KernelWatchError(f"timm cannot build {name!r}: {reason}") from err


def _load_weights(model: Any, name: str, weights: str) -> None:
    from kernelwatch.extraction import load_checkpoint

    state_dict = load_checkpoint(weights)
    try:
        missing, unexpected = model.load_state_dict(state_dict, strict=False)
    except RuntimeError as err:  # shape mismatches, one line each after a heading
        mismatches = str(err).strip().splitlines()[1:] or [str(err)]
        raise KernelWatchError(
            f"{weights} does not fit timm:{name}: {mismatches[0].strip()}"
            + (f" (and {len(mismatches) - 1} more)" if len(mismatches) > 1 else "")
        ) from err
    if unexpected or missing:
        raise KernelWatchError(
            f"{weights} does not fit timm:{name}: {len(missing)} missing, {len(unexpected)} unexpected keys"
        )


def _analyze(args: argparse.Namespace) -> int:
    weights = args.weights or []
    n_checkpoints = len(weights) or len(args.targets)
    if args.log_dir == "":
        raise KernelWatchError("--log-dir is empty: pass the directory to write the run to")
    if n_checkpoints > 1 and args.log_dir is None:
        raise KernelWatchError(
            f"{n_checkpoints} checkpoints: write them as one run with --log-dir DIR, or analyse one at a time"
        )
    if args.steps is not None and args.log_dir is None:
        raise KernelWatchError("--steps goes with --log-dir")
    if args.threshold is not None and args.log_dir is not None:
        raise KernelWatchError("--threshold goes without --log-dir (a run is written with the spectra's own thresholds)")
    # A cosine dissimilarity, 1 - cos: NaN, a negative or an infinite threshold clusters nothing
    # or everything without a word.
    if args.threshold is not None and not 0 < args.threshold <= 2:
        raise KernelWatchError(
            f"--threshold {args.threshold}: expected a cosine dissimilarity (1 - cos) above 0 and at most 2"
        )
    steps = _parse_steps(args.steps, n_checkpoints)
    if args.plot:
        from kernelwatch.plots import check_plot_file

        check_plot_file(args.plot)
    targets = _load_targets(args.targets, weights)
    with _library_warnings_silenced():
        if args.log_dir is not None:
            from kernelwatch.analysis import first_layer_of

            report, target = _write_run(targets, args.log_dir, steps)
            depthwise = {layer.name for layer in report.layers} | set(report.skipped)
            report.first_layer, report.first_layer_note = first_layer_of(target, depthwise)
        else:
            from kernelwatch.analysis import analyze

            _, target = next(targets)
            report = analyze(target, threshold=args.threshold)
        if args.plot:
            from kernelwatch.extraction import extract_depthwise
            from kernelwatch.plots import plot_report

            plot_report(report, extract_depthwise(target), args.plot)
    if args.json:
        json.dump(report.to_dict(), sys.stdout, indent=2)
        print()
    else:
        print(report.format_table())
    return 0


def _parse_steps(text: str | None, n_checkpoints: int) -> list[int]:
    """``--steps 0,500,1000``: one increasing step >= 0 per checkpoint; default 0, 1, 2, ..."""
    if text is None:
        return list(range(n_checkpoints))
    try:
        steps = [int(step) for step in text.split(",")]
    except ValueError:
        raise KernelWatchError(f"--steps {text!r}: expected integers separated by commas, e.g. 0,500,1000") from None
    if len(steps) != n_checkpoints:
        raise KernelWatchError(f"--steps gives {len(steps)} step(s) for {n_checkpoints} checkpoint(s)")
    if steps[0] < 0 or any(b <= a for a, b in zip(steps, steps[1:])):
        raise KernelWatchError(f"--steps {text!r}: steps must be >= 0 and increase")
    return steps


def _write_run(targets: Iterator[tuple[str, Any]], log_dir: str, steps: list[int]) -> tuple[Any, Any]:
    """Write each checkpoint as a snapshot of one run in ``log_dir``, a line each on stderr;
    the last one's report and checkpoint."""
    from kernelwatch.checkpoint_log import CheckpointLog

    with CheckpointLog(log_dir) as run:
        for step, (name, target) in zip(steps, targets):
            try:
                report = run.add(step, target)
            except KernelWatchError as err:
                kept = f"; {log_dir} holds the steps before" if step != steps[0] else ""
                raise KernelWatchError(f"step {step} ({name}): {err}{kept}") from err
            flags = sum(1 for anomaly in run.anomalies if anomaly.step == step)
            print(
                f"step {step}: {name}: {100 * report.clustered_fraction:.1f}% of {report.n_kernels} kernels "
                f"clustered, {flags} anomaly flag(s)",
                file=sys.stderr,
            )
    print(f"wrote {len(steps)} step(s) to {log_dir}: tensorboard --logdir {log_dir}", file=sys.stderr)
    return report, target


def _summary(args: argparse.Namespace) -> int:
    from kernelwatch import format as fmt
    from kernelwatch.summary import format_summary, summarise

    summary = summarise(args.log_dir)
    print(fmt.encode_json(summary).decode() if args.json else format_summary(summary))
    return 0


@contextmanager
def _library_warnings_silenced() -> Iterator[None]:
    """The table and the error message name every layer left out; the library's warning would repeat it."""
    logger = logging.getLogger("kernelwatch")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _pretrain(args: argparse.Namespace) -> int:
    from kernelwatch.pretrain import pretrain, pretrain_kmeans

    prefix = {"autoencoder": "spectrum", "kmeans": "kmeans", "paper": "paper"}[args.method]
    output = Path(args.output or f"{prefix}_k{args.kernel_size}.npz")

    def log(message: str) -> None:
        end = "" if message.startswith("\r") else "\n"
        print(message, end=end, file=sys.stderr, flush=True)

    if args.method == "kmeans":
        pretrain_kmeans(args.kernel_size, output, seed=args.seed, log=log)
    else:
        pretrain(
            args.kernel_size,
            output,
            epochs=args.epochs,
            n_synthetic=args.synthetic,
            n_codes=args.codes,
            seed=args.seed,
            log=log,
            paper=args.method == "paper",
        )
    return 0


def _demo(args: argparse.Namespace) -> int:
    # OpenMP threads that wait sleep instead of spinning (read when torch loads): with another
    # job busy on a core, spinning made the demo's 2-thread training 5 to 9 times slower.
    if "torch" not in sys.modules:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from kernelwatch.demo import run_demo, tensorboard_command

    try:
        summary = run_demo(args.log_dir, quick=args.quick, steps=args.steps, seed=args.seed)
    except KeyboardInterrupt:
        print(f"\ninterrupted; the snapshots taken so far are in {args.log_dir}", file=sys.stderr)
        return 130
    # Structure above chance: the clustered share less the stricter null's (docs/spectra.md).
    print(f"{'arm':<12} {'accuracy':>8} {'clustered':>9} {'above chance':>12} {'update clustered':>16} {'above chance':>12}")
    for name, arm in summary["arms"].items():
        print(
            f"{name:<12} {arm['accuracy']:>8.1%} {arm['clustered']:>9.1%} {arm['above_chance']:>+12.1%} "
            f"{arm['update_clustered']:>16.1%} {arm['update_above_chance']:>+12.1%}"
        )
    print(f"{summary['steps']} steps per arm in {summary['seconds']:.0f} s; open it with:")
    print(f"  {tensorboard_command(args.log_dir)}")
    return 0


#: What ``kernelwatch --help`` says, and each subcommand's help and description.
DESCRIPTION = "Classify the depthwise-convolution kernels of a model into Difference-of-Gaussians patterns."
_HELP = {
    "demo": "train small CNNs on generated images, watched (offline, CPU, a few minutes)",
    "analyze": "classify the depthwise kernels of checkpoints or a timm model; read their stem",
    "summary": "what a kernelwatch log holds, per run, layer and step",
    "pretrain": "train a spectrum (fetches the training weights with pip)",
}
_ANALYZE_EXAMPLES = """examples:
  kernelwatch analyze model.pt
  kernelwatch analyze timm:convnext_atto --weights convnext_atto.pth --plot figures.png
  kernelwatch analyze e0.pt e5.pt e10.pt --log-dir runs/ckpts --steps 0,5,10"""
_EPILOG = "Exit codes: 0 success, 2 bad input or any other failure (one line on stderr)."


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kernelwatch", description=DESCRIPTION, epilog=_EPILOG)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, **kwargs: Any) -> argparse.ArgumentParser:
        description = _HELP[name][0].upper() + _HELP[name][1:] + "."
        return commands.add_parser(name, help=_HELP[name], description=description, **kwargs)

    demo = command("demo")
    demo.add_argument("--log-dir", required=True, help="TensorBoard directory; one run per arm is written under it")
    demo.add_argument("--quick", action="store_true", help="a tiny configuration, a smoke test (about 10 s)")
    demo.add_argument("--steps", type=int, help="optimiser steps per arm (default 250; --quick: 20)")
    demo.add_argument("--seed", type=int, default=0, help="random seed (default %(default)s)")
    demo.set_defaults(run=_demo)

    analyze = command("analyze", epilog=_ANALYZE_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    analyze.add_argument(
        "targets", nargs="+", metavar="TARGET", help="checkpoint file (.pt/.pth/.bin) or timm:NAME; several with --log-dir"
    )
    analyze.add_argument(
        "--weights", action="append", metavar="FILE", help="state dict to load into a timm:NAME model (repeatable)"
    )
    analyze.add_argument("--json", action="store_true", help="print the report (of the last checkpoint) as JSON")
    analyze.add_argument(
        "--threshold",
        type=float,
        metavar="X",
        help="one threshold for every code instead of the spectra's per-family (3x3: per-code) ones (the paper's: 0.2 for 5x5, 0.3 for 7x7)",
    )
    analyze.add_argument(
        "--log-dir", metavar="DIR", help="write the checkpoints as one run (a step each) to DIR for TensorBoard"
    )
    analyze.add_argument("--steps", metavar="S1,S2,...", help="the checkpoints' steps in the run (default 0,1,2,...)")
    analyze.add_argument(
        "--plot", metavar="FILE.png", help="draw the paper's figures for the (last) checkpoint (needs kernelwatch[plots])"
    )
    analyze.set_defaults(run=_analyze)

    summary = command("summary")
    summary.add_argument("log_dir", help="a run's log directory, or a directory of runs")
    summary.add_argument("--json", action="store_true", help="print the summary as JSON")
    summary.set_defaults(run=_summary)

    pretrain = command("pretrain")
    pretrain.add_argument("--kernel-size", type=int, required=True, choices=(3, 5, 7), help="kernel size to train for")
    pretrain.add_argument(
        "--method",
        choices=("autoencoder", "kmeans", "paper"),
        default="autoencoder",
        help="autoencoder (the shipped recipe), paper (the paper's recipe) or kmeans (3x3); default: %(default)s",
    )
    pretrain.add_argument("--output", help="spectrum file to write (default spectrum_k<K>.npz)")
    pretrain.add_argument("--epochs", type=int, help="default: the shipped spectrum's recipe")
    pretrain.add_argument("--synthetic", type=int, help="synthetic kernels added to the real ones (default: recipe)")
    pretrain.add_argument("--codes", type=int, default=DEFAULT_N_CODES, help="codes along the spectrum (default %(default)s)")
    pretrain.add_argument("--seed", type=int, default=DEFAULT_SEED, help="random seed (default %(default)s)")
    pretrain.set_defaults(run=_pretrain)

    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except KernelWatchError as err:
        return _fail(args.command, str(err))
    except BrokenPipeError:  # the output's reader stopped early (`| head`): nothing left to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Exception as err:  # last resort: whatever slipped through still gets one line, not a traceback
        if os.environ.get("KERNELWATCH_DEBUG") == "1":
            raise
        return _fail(
            args.command,
            f"unexpected {type(err).__name__}: {_first_line(err)} (KERNELWATCH_DEBUG=1 shows the traceback)",
        )


def _fail(command: str, message: str) -> int:
    """Print ``message`` as one line on stderr; exit code 2."""
    print(f"kernelwatch {command}: error: {' '.join(message.split())}", file=sys.stderr)
    return 2


def _first_line(err: BaseException) -> str:
    """The first line of an exception's message, without terminal colour codes."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(err))
    return next((line.strip() for line in text.splitlines() if line.strip()), "(no message)")[:300]


if __name__ == "__main__":
    sys.exit(main())
