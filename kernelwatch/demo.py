"""``kernelwatch demo``: a self-contained training that shows kernelwatch at work, offline, on CPU.

Several small ConvMixers (7x7 depthwise convs) train side by side on generated dead-leaves
images, each arm a TensorBoard run watched by a :class:`~kernelwatch.KernelWatch`:

- ``default``: PyTorch's default initialisation, AdamW; the baseline.
- ``dog-init``: depthwise kernels initialised with DoG patterns (appendix F, :func:`kernelwatch.init.dog_`).
- ``small-init``: depthwise kernels of the default initialisation scaled by 0.1, so that what
  training adds is not hidden under the initial noise.
- ``memorise``: 256 fixed crops with random labels and no weight decay (appendix H).

The task: which of ``n_classes`` generated images a random crop came from. Every image is a
dead-leaves picture (occluding ellipses or squares, power-law radii, blurred) with its own
scale, shape, orientation and blur statistics, so the labels are learnable from spatial
structure and the crops have the falling power spectrum of natural images. Nothing is
downloaded; generation takes well under a second and is deterministic with the seed.

The arms train in turns of a few steps each, so TensorBoard shows them progressing together.
Training uses torch's default number of threads. Where other jobs keep a core busy, OpenMP
threads that spin while they wait slow it down several times over; ``kernelwatch demo`` sets
``OMP_WAIT_POLICY=PASSIVE`` before torch loads (unless set already); callers of
:func:`run_demo` can do the same.
``benchmarks/measure_demo.py`` measures what each arm shows.
"""

from __future__ import annotations

import logging
import math
import os
import shlex
import sys
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import torch
from torch import nn

from kernelwatch.errors import KernelWatchError
from kernelwatch.format import MAX_STEP

#: The arms, in the order they train in each turn.
ARMS: tuple[str, ...] = ("default", "dog-init", "small-init", "memorise")


@dataclass(frozen=True)
class DemoConfig:
    """Everything that sets the demo's training; :data:`DEFAULT` and :data:`QUICK` are the two
    shipped ones."""

    steps: int = 250  # optimiser steps per arm
    width: int = 64  # channels of the ConvMixer
    depth: int = 4  # blocks, one depthwise conv each
    kernel_size: int = 7
    patch: int = 2  # stem stride: 32 px crops give 16 x 16 feature maps
    batch: int = 64
    crop: int = 32
    n_classes: int = 16  # generated images, one per label
    image_size: int = 192
    lr: float = 2e-3
    depthwise_lr_scale: float = 0.8  # learning rate of the depthwise kernels: lr times this
    weight_decay: float = 0.05
    warmup: int = 10  # steps of linear learning-rate warm-up
    turn: int = 10  # steps an arm trains before the next arm's turn
    memorise_crops: int = 256
    small_init_scale: float = 0.1
    arms: tuple[str, ...] = ARMS


#: The default demo: about 2 minutes 10 s on 2 idle CPU cores (``benchmarks/measure_demo.py``).
#: The depthwise kernels learn at 0.8 times the rate of the rest: DoG-initialised kernels then
#: stay above 80 % clustered while the default arm's update still shows its structure.
DEFAULT = DemoConfig()
#: ``--quick``: a smoke test of about 10 s (slower when another training shares the cores).
QUICK = DemoConfig(steps=20, width=32, depth=2, batch=32, n_classes=8, image_size=96, turn=5, memorise_crops=64)


# -- data -------------------------------------------------------------------------------------


def _blur(image: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of an ``[H, W, C]`` image, wrapping at the borders."""
    if sigma <= 0:
        return image
    radius = max(1, int(math.ceil(3 * sigma)))
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    taps /= taps.sum()
    out = np.zeros_like(image)
    for offset, tap in zip(range(-radius, radius + 1), taps):
        out += tap * np.roll(image, offset, axis=0)
    image, out = out, np.zeros_like(image)
    for offset, tap in zip(range(-radius, radius + 1), taps):
        out += tap * np.roll(image, offset, axis=1)
    return out


def dead_leaves(
    rng: np.random.Generator,
    size: int,
    *,
    exponent: float = 3.0,
    r_min: float = 1.5,
    r_max: float | None = None,
    aspect: float = 1.0,
    angle: float = 0.0,
    angle_jitter: float = 0.2,
    square: bool = False,
    blur: float = 0.7,
    coverage: float = 4.0,
) -> np.ndarray:
    """A dead-leaves image ``[3, size, size]`` (float32): occluding ellipses (or rotated
    rectangles) of random colour, radii drawn from ``p(r) ~ r**-exponent`` on ``[r_min, r_max]``,
    elongated ``aspect`` times along ``angle`` (radians, jittered), then blurred. Its power
    spectrum falls off like a natural image's; the scale, shape and orientation statistics are
    what one image's crops have in common."""
    r_max = size / 4 if r_max is None else r_max
    # Inverse CDF of the truncated power law; enough leaves to cover every pixel ``coverage`` times.
    a = 1.0 - exponent
    lo, hi = r_min**a, r_max**a
    mean_area = np.mean(math.pi * aspect * (lo + (hi - lo) * rng.random(4096)) ** (2 / a))
    n = int(coverage * size * size / mean_area)
    radii = (lo + (hi - lo) * rng.random(n)) ** (1 / a)
    centres = rng.random((n, 2)) * size
    angles = angle + angle_jitter * rng.standard_normal(n)
    # Mostly luminance, slightly tinted: neighbouring colour channels correlate as in photos.
    colours = rng.random((n, 1)) ** 1.5 * (0.7 + 0.3 * rng.random((n, 3)))
    image = np.full((size, size, 3), 0.5, dtype=np.float32)
    for r, (cy, cx), theta, colour in zip(radii, centres, angles, colours):
        reach = r * aspect
        y0, y1 = max(0, int(cy - reach)), min(size, int(cy + reach) + 1)
        x0, x1 = max(0, int(cx - reach)), min(size, int(cx + reach) + 1)
        if y0 >= y1 or x0 >= x1:
            continue
        dy = np.arange(y0, y1)[:, None] + 0.5 - cy
        dx = np.arange(x0, x1)[None, :] + 0.5 - cx
        c, s = math.cos(theta), math.sin(theta)
        u, v = (dx * c + dy * s) / aspect, -dx * s + dy * c
        inside = (np.maximum(abs(u), abs(v)) if square else np.hypot(u, v)) < r
        image[y0:y1, x0:x1][inside] = colour
    return np.ascontiguousarray(_blur(image, blur).transpose(2, 0, 1))


def make_images(n_classes: int, size: int, seed: int, per_class: int = 1) -> torch.Tensor:
    """Dead-leaves images, ``per_class`` for each class, each class with its own scale, shape,
    orientation and blur statistics; ``[n_classes, 3, size, size]`` for one image per class,
    else ``[n_classes, per_class, 3, size, size]``; normalised to zero mean and unit variance.

    >>> make_images(2, 16, seed=0, per_class=3).shape
    torch.Size([2, 3, 3, 16, 16])
    """
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(n_classes):
        elongated = rng.random() < 0.6
        statistics = {
            "exponent": rng.uniform(2.4, 3.4),
            "r_min": rng.uniform(1.0, 2.5),
            "aspect": rng.uniform(1.8, 4.0) if elongated else 1.0,
            "angle": rng.uniform(0, math.pi),
            "square": rng.random() < 0.35,
            "blur": rng.uniform(0.8, 1.8),
        }
        images.append([dead_leaves(rng, size, **statistics) for _ in range(per_class)])
    images = torch.from_numpy(np.stack(images))
    images = (images - images.mean()) / images.std()
    return images[:, 0] if per_class == 1 else images


def sample_crops(
    images: torch.Tensor, n: int, crop: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` random ``crop x crop`` crops (half of them turned by 180 degrees, which keeps the
    orientation statistics) and the index of the image each came from."""
    n_images, _, height, width = images.shape
    labels = torch.randint(n_images, (n,), generator=generator)
    ys = torch.randint(height - crop + 1, (n,), generator=generator)
    xs = torch.randint(width - crop + 1, (n,), generator=generator)
    flip = torch.rand(n, generator=generator) < 0.5
    corners = zip(labels.tolist(), ys.tolist(), xs.tolist())
    crops = torch.stack([images[i, :, y : y + crop, x : x + crop] for i, y, x in corners])
    crops[flip] = crops[flip].flip(-1, -2)
    return crops, labels


# -- model ------------------------------------------------------------------------------------


class Block(nn.Module):
    """A ConvMixer block: ``x + BN(GELU(depthwise(x)))``, then ``BN(GELU(pointwise(.)))``."""

    def __init__(self, width: int, kernel_size: int):
        super().__init__()
        self.depthwise = nn.Conv2d(width, width, kernel_size, padding=kernel_size // 2, groups=width)
        self.norm1 = nn.BatchNorm2d(width)
        self.pointwise = nn.Conv2d(width, width, 1)
        self.norm2 = nn.BatchNorm2d(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.norm1(nn.functional.gelu(self.depthwise(x)))
        return self.norm2(nn.functional.gelu(self.pointwise(x)))


class ConvMixer(nn.Module):
    """ConvMixer (Trockman and Kolter, "Patches are all you need?"): a patch stem, ``depth``
    blocks, global average pooling and a linear classifier."""

    def __init__(self, width: int, depth: int, kernel_size: int = 7, patch: int = 2, n_classes: int = 16):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, patch, stride=patch), nn.GELU(), nn.BatchNorm2d(width))
        self.blocks = nn.Sequential(*[Block(width, kernel_size) for _ in range(depth)])
        self.head = nn.Linear(width, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


def _depthwise(model: nn.Module) -> dict[str, nn.Conv2d]:
    return {name: m for name, m in model.named_modules() if isinstance(m, nn.Conv2d) and m.groups > 1}


def build_model(config: DemoConfig, arm: str, seed: int) -> nn.Module:
    """The ConvMixer of ``arm``: the same default initialisation (from ``seed``) for every arm,
    then ``dog-init`` and ``small-init`` change the depthwise kernels. In ``channels_last``
    memory format, where depthwise convolutions train several times faster on CPU."""
    with torch.random.fork_rng(devices=[]):  # leaves the caller's random state alone
        torch.manual_seed(seed)
        model = ConvMixer(config.width, config.depth, config.kernel_size, config.patch, config.n_classes)
    if arm == "dog-init":
        from kernelwatch.init import dog_

        dog_(model, seed=seed)
    elif arm == "small-init":
        with torch.no_grad():
            for conv in _depthwise(model).values():
                conv.weight.mul_(config.small_init_scale)
    return model.to(memory_format=torch.channels_last)


def snapshot_schedule(steps: int) -> list[int]:
    """Steps to snapshot: log-spaced over the first tenth of the run (patterns form fast), then
    every tenth.

    >>> snapshot_schedule(250)
    [0, 1, 2, 3, 5, 7, 11, 17, 25, 50, 75, 100, 125, 150, 175, 200, 225, 250]
    """
    tenth = max(1, steps // 10)
    early = {int(p) for p in np.round(np.geomspace(1, tenth, 9)) if p < tenth}
    return sorted({0, steps, *early, *range(tenth, steps + 1, tenth)})


@dataclass
class Arm:
    """One arm of the demo: its model, optimiser, data and watch, and how it went."""

    name: str
    model: nn.Module
    optimizer: torch.optim.Optimizer
    generator: torch.Generator
    watch: Any  # KernelWatch
    scalars: Any  # SummaryWriter for loss and accuracy
    fixed: tuple[torch.Tensor, torch.Tensor] | None = None  # memorise: its crops and random labels
    first: dict[str, torch.Tensor] = field(default_factory=dict)  # depthwise kernels at step 0
    step: int = 0
    seconds: float = 0.0
    loss: float = float("nan")  # over the arm's last turn
    accuracy: float = float("nan")


def _optimizer(model: nn.Module, config: DemoConfig, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW; weight decay on conv and linear weights only (not on biases and norms), the
    depthwise kernels at their own learning rate."""
    depthwise = {id(conv.weight) for conv in _depthwise(model).values()}
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for p in model.parameters():
        groups.setdefault((p.ndim > 1, id(p) in depthwise), []).append(p)
    return torch.optim.AdamW(
        [
            {
                "params": params,
                "weight_decay": weight_decay if decay else 0.0,
                "lr_scale": config.depthwise_lr_scale if dw else 1.0,
            }
            for (decay, dw), params in groups.items()
        ],
        lr=config.lr,
    )


def _make_arm(
    name: str, config: DemoConfig, images: torch.Tensor, log_dir: Path, seed: int, bar: _Progress
) -> Arm:
    from torch.utils.tensorboard import SummaryWriter

    from kernelwatch.monitor import KernelWatch

    model = build_model(config, name, seed)
    memorise = name == "memorise"
    optimizer = _optimizer(model, config, 0.0 if memorise else config.weight_decay)
    # The same batches for every arm but memorise: they differ by initialisation only.
    generator = torch.Generator().manual_seed(seed + 1)
    fixed = None
    if memorise:
        fixed_generator = torch.Generator().manual_seed(seed + 2)
        crops, _ = sample_crops(images, config.memorise_crops, config.crop, fixed_generator)
        fixed = crops, torch.randint(config.n_classes, (config.memorise_crops,), generator=fixed_generator)
    run_dir = log_dir / name
    watch = KernelWatch(
        run_dir,
        schedule=snapshot_schedule(config.steps),
        on_anomaly=lambda anomaly: bar.anomaly(name, anomaly),
        handle_sigterm=False,
    )
    scalars = SummaryWriter(str(run_dir), filename_suffix=".demo")
    first = {n: c.weight.detach().reshape(-1, *c.kernel_size).clone() for n, c in _depthwise(model).items()}
    arm = Arm(name, model, optimizer, generator, watch, scalars, fixed, first)
    watch.snapshot(model, 0)
    return arm


def _train_turn(arm: Arm, config: DemoConfig, images: torch.Tensor, steps: int) -> None:
    """``steps`` optimiser steps of one arm, each followed by a snapshot if the schedule says so."""
    start = time.perf_counter()
    model, losses, correct = arm.model.train(), [], []
    for _ in range(steps):
        arm.step += 1
        for group in arm.optimizer.param_groups:
            group["lr"] = group["lr_scale"] * config.lr * min(1.0, arm.step / max(config.warmup, 1))
        if arm.fixed is not None:
            index = torch.randint(len(arm.fixed[0]), (config.batch,), generator=arm.generator)
            x, y = arm.fixed[0][index], arm.fixed[1][index]
        else:
            x, y = sample_crops(images, config.batch, config.crop, arm.generator)
        logits = model(x.contiguous(memory_format=torch.channels_last))
        loss = nn.functional.cross_entropy(logits, y)
        arm.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        arm.optimizer.step()
        losses.append(loss.item())
        correct.append((logits.argmax(1) == y).float().mean().item())
        arm.watch.snapshot(model, arm.step)
    arm.loss, arm.accuracy = float(np.mean(losses)), float(np.mean(correct))
    arm.scalars.add_scalar("demo/train_loss", arm.loss, arm.step)
    arm.scalars.add_scalar("demo/train_accuracy", arm.accuracy, arm.step)
    arm.seconds += time.perf_counter() - start


def check_log_dir(log_dir: str | os.PathLike[str], arms: tuple[str, ...] = ARMS) -> Path:
    """Create ``log_dir`` if needed and check that it is writable and holds no earlier demo
    run (whose events TensorBoard would mix with the new ones); raise :class:`KernelWatchError` if not."""
    path = Path(log_dir)
    if not str(log_dir):  # Path("") is the working directory
        raise KernelWatchError("the log dir is empty: pass a directory for the runs")
    try:
        if path.exists() and not path.is_dir():
            raise KernelWatchError(f"log dir {str(path)!r} exists and is not a directory")
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".kernelwatch-demo-write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise KernelWatchError(f"cannot write to log dir {str(path)!r}: {err.strerror or err}") from err
    used = [name for name in arms if (path / name).is_dir() and any((path / name).glob("events.out.tfevents.*"))]
    if used:
        raise KernelWatchError(
            f"{str(path / used[0])!r} already holds TensorBoard events; give an empty or new --log-dir"
        )
    return path


def tensorboard_command(log_dir: str | os.PathLike[str]) -> str:
    """The command that opens the demo's runs in TensorBoard, keeping every snapshot."""
    return f"tensorboard --logdir {shlex.quote(str(log_dir))} --samples_per_plugin=kernelwatch=0"


class _Progress:
    """A plain-text progress bar on a stream: redrawn in place on a terminal, one line per
    tenth of the run otherwise (logs, CI). :meth:`message` prints a line above the bar."""

    def __init__(self, total: int, stream: TextIO | None, width: int = 24):
        self.total, self.stream, self.width = total, stream, width
        self.start = time.perf_counter()
        self.tty = stream is not None and stream.isatty()
        self.last_tenth = -1
        self.line = ""
        self.closed = False
        self.lock = threading.Lock()  # kernelwatch's workers log through message()

    def update(self, done: int, arms: list[Arm]) -> None:
        if self.stream is None:
            return
        tenth = 10 * done // max(self.total, 1)
        if not self.tty and tenth == self.last_tenth:
            return
        self.last_tenth = tenth
        elapsed = time.perf_counter() - self.start
        left = elapsed / done * (self.total - done) if done else float("nan")
        filled = self.width * done // max(self.total, 1)
        losses = "  ".join(f"{a.name} {a.loss:.2f}" for a in arms if not math.isnan(a.loss))
        line = (
            f"[{'#' * filled}{'.' * (self.width - filled)}] {100 * done // max(self.total, 1):3d}%  "
            f"{_clock(elapsed)} elapsed, ~{_clock(left)} left" + (f"  | train loss: {losses}" if losses else "")
        )
        with self.lock:
            self.line = line
            self.stream.write(f"\r{line}\033[K" if self.tty else line + "\n")
            self.stream.flush()

    def message(self, text: str) -> None:
        if self.stream is None:
            return
        with self.lock:
            redraw = self.tty and not self.closed
            self.stream.write(f"\r{text}\033[K\n{self.line}" if redraw else text + "\n")
            self.stream.flush()

    def anomaly(self, arm: str, anomaly: Any) -> None:
        """An anomaly flagged by ``arm``'s watch (warnings and errors; info is left out)."""
        if anomaly.severity != "info":
            self.message(f"{arm}, step {anomaly.step}: {anomaly.message}")

    def close(self) -> None:
        with self.lock:
            if self.stream is not None and self.tty and not self.closed:
                self.stream.write("\n")
                self.stream.flush()
            self.closed = True


class _ProgressHandler(logging.Handler):
    """Shows kernelwatch's warnings above the progress bar instead of through it. Anomalies are
    left to :meth:`_Progress.anomaly`, which names the arm."""

    def __init__(self, bar: _Progress):
        super().__init__(logging.WARNING)
        self.bar = bar
        self.setFormatter(logging.Formatter("kernelwatch: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            if record.getMessage().startswith("kernelwatch step "):  # the monitor's anomaly line
                return
            self.bar.message(self.format(record))
        except Exception:  # noqa: BLE001 - logging must not break training
            self.handleError(record)


def _clock(seconds: float) -> str:
    if math.isnan(seconds):
        return "?:??"
    seconds = int(round(seconds))
    return f"{seconds // 60}:{seconds % 60:02d}"


def train_arms(
    log_dir: str | os.PathLike[str], config: DemoConfig = DEFAULT, seed: int = 0, progress: TextIO | None = None
) -> list[Arm]:
    """Train the arms of ``config`` in turns, each watched into ``log_dir/<arm>``, with a progress
    bar on ``progress`` if given; close every watch (also on an error or Ctrl-C) and return the
    arms, trained models included."""
    log_dir = check_log_dir(log_dir, config.arms)
    images = make_images(config.n_classes, config.image_size, seed)
    arms: list[Arm] = []
    bar = _Progress(config.steps * len(config.arms), progress)
    # Where logging is not set up, kernelwatch's warnings would go to stderr through the bar.
    logger = logging.getLogger("kernelwatch")
    handler = _ProgressHandler(bar) if progress is not None and not logger.hasHandlers() else None
    if handler is not None:
        logger.addHandler(handler)
    try:
        for name in config.arms:
            arms.append(_make_arm(name, config, images, log_dir, seed, bar))
        bar.update(0, arms)
        while arms[0].step < config.steps:
            for arm in arms:
                _train_turn(arm, config, images, min(config.turn, config.steps - arm.step))
                bar.update(sum(a.step for a in arms), arms)
    except BaseException:
        _close(arms, quiet=True)
        raise
    else:
        _close(arms, quiet=False)  # waits for the last snapshots to be written
    finally:
        bar.close()
        if handler is not None:
            logger.removeHandler(handler)
    return arms


def _close(arms: list[Arm], quiet: bool) -> None:
    """Close every arm's watch and writer; then raise the first failure unless ``quiet``."""
    errors = []
    for arm in arms:
        try:
            arm.watch.close()
        except Exception as err:  # noqa: BLE001 - close the others first
            errors.append(err)
        arm.scalars.close()
    if errors and not quiet:
        raise errors[0]


def run_demo(
    log_dir: str | os.PathLike[str],
    quick: bool = False,
    steps: int | None = None,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Train the demo's arms into ``log_dir`` (one TensorBoard run each) and return what ran.

    ``quick`` trains a tiny configuration (a smoke test of about 10 s); ``steps`` overrides the
    optimiser steps per arm; ``progress`` draws a progress bar on stderr. The result holds
    ``log_dir``, ``steps``, ``seconds`` (wall time) and per arm its ``steps``, training
    ``seconds``, final training ``loss`` and ``accuracy``, and the share of its depthwise kernels
    that are clustered at the end (``clustered``) and of their change since step 0
    (``update_clustered``), each with its structure above chance (``above_chance``,
    ``update_above_chance``: the share less the stricter null's, layer by layer). Raises
    :class:`KernelWatchError` for bad arguments.
    """
    config = QUICK if quick else DEFAULT
    if steps is not None:
        # Steps are TensorBoard's int64 steps.
        if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= MAX_STEP:
            raise KernelWatchError(f"steps must be an integer from 1 to 2**63 - 1, got {steps!r}")
        config = replace(config, steps=steps)
    # torch takes seeds below 2**64, and the arms use seed + 2 too.
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise KernelWatchError(f"seed must be an integer from 0 to 2**63 - 1, got {seed!r}")
    start = time.perf_counter()
    check_log_dir(log_dir, config.arms)
    if progress:
        print(
            f"kernelwatch demo: training {len(config.arms)} arms for {config.steps} steps each into {log_dir}; "
            f"watch them live with:\n  {tensorboard_command(log_dir)}",
            file=sys.stderr,
        )
    arms = train_arms(log_dir, config, seed, sys.stderr if progress else None)
    from kernelwatch.analysis import AnalysisReport, analyze_layer
    from kernelwatch.spectrum import Spectrum

    spectrum = Spectrum.pretrained(config.kernel_size)
    summary: dict[str, Any] = {"log_dir": str(log_dir), "steps": config.steps, "arms": {}}
    for arm in arms:
        last = {name: c.weight.detach().reshape(-1, *c.kernel_size) for name, c in _depthwise(arm.model).items()}
        weights = AnalysisReport([analyze_layer(name, kernels, spectrum) for name, kernels in last.items()], {})
        update = AnalysisReport(
            [analyze_layer(name, kernels - arm.first[name], spectrum, activation=False) for name, kernels in last.items()],
            {},
        )
        summary["arms"][arm.name] = {
            "steps": arm.step,
            "seconds": round(arm.seconds, 2),
            "loss": arm.loss,
            "accuracy": arm.accuracy,
            "clustered": weights.clustered_fraction,
            "above_chance": weights.structure_above_chance,
            "update_clustered": update.clustered_fraction,
            "update_above_chance": update.structure_above_chance,
        }
    summary["seconds"] = round(time.perf_counter() - start, 2)
    return summary


__all__ = ["ARMS", "DEFAULT", "QUICK", "DemoConfig", "build_model", "make_images", "run_demo", "train_arms"]
