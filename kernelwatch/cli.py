"""The ``kernelwatch`` command: ``analyze`` a checkpoint or timm model, ``summary`` of a log,
``pretrain`` a spectrum.

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


def _load_target(target: str, weights: str | None) -> Any:
    """A checkpoint path, or ``timm:NAME`` built without downloading anything."""
    # Inputs are checked before torch and timm are imported (seconds), so that mistakes are refused at once.
    if not target.startswith("timm:"):
        if weights:
            raise KernelWatchError("--weights only goes with a timm:NAME target")
        check_checkpoint_file(target)
        return target
    name = target[len("timm:") :]
    _check_timm_name(name)
    if weights is not None:
        check_checkpoint_file(weights)
    model = _build_timm_model(name)
    if weights is None:
        print(
            f"note: {name} is randomly initialised (kernelwatch never downloads weights; "
            "pass --weights FILE for trained ones)",
            file=sys.stderr,
        )
        return model
    _load_weights(model, name, weights)
    return model


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
    target = _load_target(args.target, args.weights)
    from kernelwatch.analysis import analyze

    with _library_warnings_silenced():
        report = analyze(target)
    if args.json:
        json.dump(report.to_dict(), sys.stdout, indent=2)
        print()
    else:
        print(report.format_table())
    return 0


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

    output = Path(args.output or f"spectrum_k{args.kernel_size}.npz")

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
        )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kernelwatch", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    analyze = commands.add_parser("analyze", help="classify the depthwise kernels of a checkpoint or timm model")
    analyze.add_argument("target", help="checkpoint file (.pt/.pth/.bin) or timm:NAME")
    analyze.add_argument("--weights", help="state dict to load into a timm:NAME model")
    analyze.add_argument("--json", action="store_true", help="print the report as JSON")
    analyze.set_defaults(run=_analyze)

    summary = commands.add_parser("summary", help="what a kernelwatch log holds, per run, layer and step")
    summary.add_argument("log_dir", help="a run's log directory, or a directory of runs")
    summary.add_argument("--json", action="store_true", help="print the summary as JSON")
    summary.set_defaults(run=_summary)

    pretrain = commands.add_parser("pretrain", help="train a spectrum (fetches the training weights with pip)")
    pretrain.add_argument("--kernel-size", type=int, required=True, choices=(3, 5, 7))
    pretrain.add_argument("--method", choices=("autoencoder", "kmeans"), default="autoencoder")
    pretrain.add_argument("--output", help="spectrum file to write (default spectrum_k<K>.npz)")
    pretrain.add_argument("--epochs", type=int, help="default: the shipped spectrum's recipe")
    pretrain.add_argument("--synthetic", type=int, help="synthetic kernels added to the real ones (default: recipe)")
    pretrain.add_argument("--codes", type=int, default=DEFAULT_N_CODES)
    pretrain.add_argument("--seed", type=int, default=DEFAULT_SEED)
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
