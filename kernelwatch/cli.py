"""The ``kernelwatch`` command: ``analyze`` a checkpoint or timm model, ``pretrain`` a spectrum, run the ``demo``.

Exit codes: 0 success, 2 bad input (with a one-line message on stderr).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from kernelwatch._config import DEFAULT_N_CODES, DEFAULT_SEED
from kernelwatch.errors import KernelWatchError


def _load_target(target: str, weights: str | None) -> Any:
    """A checkpoint path, or ``timm:NAME`` built without downloading anything."""
    if not target.startswith("timm:"):
        if weights:
            raise KernelWatchError("--weights only goes with a timm:NAME target")
        return target
    import timm

    name = target[len("timm:") :]
    try:
        model = timm.create_model(name, pretrained=False)
    except (RuntimeError, ValueError) as err:
        raise KernelWatchError(f"timm cannot build {name!r}: {err}") from err
    if weights is None:
        print(
            f"note: {name} is randomly initialised (kernelwatch never downloads weights; "
            "pass --weights FILE for trained ones)",
            file=sys.stderr,
        )
        return model
    from kernelwatch.extraction import load_checkpoint

    missing, unexpected = model.load_state_dict(load_checkpoint(weights), strict=False)
    if unexpected or missing:
        raise KernelWatchError(
            f"{weights} does not fit timm:{name}: {len(missing)} missing, {len(unexpected)} unexpected keys"
        )
    return model


def _analyze(args: argparse.Namespace) -> int:
    from kernelwatch.analysis import analyze

    report = analyze(_load_target(args.target, args.weights))
    if args.json:
        json.dump(report.to_dict(), sys.stdout, indent=2)
        print()
    else:
        print(report.format_table())
    return 0


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
    print(f"{'arm':<12} {'accuracy':>8} {'clustered':>9} {'update clustered':>16}")
    for name, arm in summary["arms"].items():
        print(f"{name:<12} {arm['accuracy']:>8.1%} {arm['clustered']:>9.1%} {arm['update_clustered']:>16.1%}")
    print(f"{summary['steps']} steps per arm in {summary['seconds']:.0f} s; open it with:")
    print(f"  {tensorboard_command(args.log_dir)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kernelwatch", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    analyze = commands.add_parser("analyze", help="classify the depthwise kernels of a checkpoint or timm model")
    analyze.add_argument("target", help="checkpoint file (.pt/.pth/.bin) or timm:NAME")
    analyze.add_argument("--weights", help="state dict to load into a timm:NAME model")
    analyze.add_argument("--json", action="store_true", help="print the report as JSON")
    analyze.set_defaults(run=_analyze)

    pretrain = commands.add_parser("pretrain", help="train a spectrum (fetches the training weights with pip)")
    pretrain.add_argument("--kernel-size", type=int, required=True, choices=(3, 5, 7))
    pretrain.add_argument("--method", choices=("autoencoder", "kmeans"), default="autoencoder")
    pretrain.add_argument("--output", help="spectrum file to write (default spectrum_k<K>.npz)")
    pretrain.add_argument("--epochs", type=int, help="default: the shipped spectrum's recipe")
    pretrain.add_argument("--synthetic", type=int, help="synthetic kernels added to the real ones (default: recipe)")
    pretrain.add_argument("--codes", type=int, default=DEFAULT_N_CODES)
    pretrain.add_argument("--seed", type=int, default=DEFAULT_SEED)
    pretrain.set_defaults(run=_pretrain)

    demo = commands.add_parser("demo", help="train small CNNs on generated images, watched (offline, CPU, ~2-3 min)")
    demo.add_argument("--log-dir", required=True, help="TensorBoard directory; one run per arm is written under it")
    demo.add_argument("--quick", action="store_true", help="a tiny configuration that runs in seconds")
    demo.add_argument("--steps", type=int, help="optimiser steps per arm (default 250; --quick: 20)")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(run=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except KernelWatchError as err:
        print(f"kernelwatch {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
