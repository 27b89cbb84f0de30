"""Does kernelwatch tell a memorising training from a generalising one? A scaled-down appendix H
of the method paper, offline on a CPU, with the ground truth measured.

    python benchmarks/validate_memorisation.py [--cache DIR] [--seeds 0 1 2] [--archs convmixer mobilenet]

Task: which of 16 classes of generated dead-leaves images (each class its own scale, shape,
orientation and blur statistics, ``kernelwatch.demo.make_images``) a 32 x 32 crop comes from.
Each class has 6 training images and 2 held-out ones (128 px). Per architecture and seed, from
PyTorch's default initialisation, three arms:

- ``varied``: a fresh random crop of the training images for every example (never the same crop
  twice in practice), half of them turned by 180 degrees; real labels; weight decay 0.05;
- ``limited``: 256 crops drawn once from the training images, real labels, no augmentation, no
  weight decay;
- ``random-labels``: the same 256 crops with random labels, no augmentation, no weight decay.

AdamW (lr 2e-3, 10 steps of warm-up), batch 64, 600 steps; the fixed-set arms go on by hundreds
of steps until their training accuracy reaches 99 % (at most 1,500). A ``KernelWatch`` snapshots
each training at ``SNAPSHOTS`` (every default on). At each snapshot the script also measures the
training accuracy (the fixed set with its labels, or 512 fresh crops), the held-out accuracy (512
crops of the held-out images, real labels), each depthwise layer's update size ``|W_t - W_0| /
|W_0|`` and variance entropy, and the stem's first-layer report against the natural-image prior.

Architectures: ``convmixer``, the demo's (4 blocks of 64 7x7 depthwise kernels, patch 2), and
``mobilenet``, inverted residual blocks (expansion 2) with 3x3 and 5x5 depthwise layers of 64 to
128 kernels after a 3x3 stride-2 stem.

Trainings are cached in ``--cache`` (one KernelWatch run and a ``metrics.json`` per training);
the report is made from the cache, so a second run only reads. About 20 minutes of training per
architecture on 2 cores.

Report: per architecture and arm, accuracies and the generalisation gap; for every candidate
signal, per layer and model-wide, its AUROC of memorising against generalising runs at three
training lengths; then a rule chosen on one architecture and its rates on the other.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from kernelwatch import KernelWatch
from kernelwatch.demo import ConvMixer, make_images
from kernelwatch.first_layer import first_layer_report
from kernelwatch.metrics import layer_quality

ARMS = ("varied", "limited", "random-labels")
ARCHS = ("convmixer", "mobilenet")
N_CLASSES, IMAGE_SIZE, CROP = 16, 128, 32
TRAIN_IMAGES, HELD_OUT_IMAGES = 6, 2
FIXED_CROPS, EVAL_CROPS, BATCH = 256, 512, 64
STEPS, MAX_STEPS, TARGET_ACCURACY = 600, 1500, 0.99
SNAPSHOTS = (0, 10, 25, 50, 100, 150, 200, 300, 400, 500, 600)
LR, WARMUP, WEIGHT_DECAY = 2e-3, 10, 0.05


class InvertedResidual(nn.Module):
    """MobileNetV2's block: 1x1 expansion, k x k depthwise, 1x1 projection; a residual when shapes allow."""

    def __init__(self, cin: int, cout: int, kernel_size: int, stride: int, expansion: int = 2):
        super().__init__()
        mid = cin * expansion
        self.expand = nn.Sequential(nn.Conv2d(cin, mid, 1, bias=False), nn.BatchNorm2d(mid), nn.ReLU6())
        self.depthwise = nn.Conv2d(mid, mid, kernel_size, stride, kernel_size // 2, groups=mid, bias=False)
        self.norm = nn.Sequential(nn.BatchNorm2d(mid), nn.ReLU6())
        self.project = nn.Sequential(nn.Conv2d(mid, cout, 1, bias=False), nn.BatchNorm2d(cout))
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.project(self.norm(self.depthwise(self.expand(x))))
        return x + out if self.residual else out


class MobileNetLike(nn.Sequential):
    """A 3x3 stride-2 stem and six inverted residual blocks: depthwise 3x3 and 5x5, 64-128 kernels."""

    def __init__(self, n_classes: int):
        blocks = [(32, 32, 3, 1), (32, 48, 5, 2), (48, 48, 3, 1), (48, 64, 5, 1), (64, 64, 3, 2), (64, 64, 5, 1)]
        super().__init__(
            nn.Sequential(nn.Conv2d(3, 32, 3, 2, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU6()),
            *(InvertedResidual(*block) for block in blocks),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(64, n_classes),
        )


def build(arch: str, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = ConvMixer(64, 4, 7, 2, N_CLASSES) if arch == "convmixer" else MobileNetLike(N_CLASSES)
    return model.to(memory_format=torch.channels_last)


def depthwise(model: nn.Module) -> dict[str, nn.Conv2d]:
    return {name: m for name, m in model.named_modules() if isinstance(m, nn.Conv2d) and m.groups > 1}


def crops(images: torch.Tensor, n: int, generator: torch.Generator, turn: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` random crops of ``images`` ``[classes, per_class, 3, H, W]`` and their classes; half
    of them turned by 180 degrees when ``turn``."""
    classes, per_class, _, height, width = images.shape
    labels = torch.randint(classes, (n,), generator=generator)
    which = torch.randint(per_class, (n,), generator=generator)
    ys = torch.randint(height - CROP + 1, (n,), generator=generator)
    xs = torch.randint(width - CROP + 1, (n,), generator=generator)
    out = torch.stack(
        [images[c, i, :, y : y + CROP, x : x + CROP] for c, i, y, x in zip(*(t.tolist() for t in (labels, which, ys, xs)))]
    )
    if turn:
        flip = torch.rand(n, generator=generator) < 0.5
        out[flip] = out[flip].flip(-1, -2)
    return out.contiguous(memory_format=torch.channels_last), labels


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    correct = sum(int((model(x[i : i + 256]).argmax(1) == y[i : i + 256]).sum()) for i in range(0, len(x), 256))
    model.train()
    return correct / len(x)


def measure(model: nn.Module, first: dict[str, torch.Tensor], train: tuple, held_out: tuple) -> dict:
    """The figures of one snapshot besides KernelWatch's records."""
    layers = depthwise(model)
    stem = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    report = first_layer_report(stem.weight.detach(), stride=tuple(stem.stride))
    return {
        "train_accuracy": accuracy(model, *train),
        "held_out_accuracy": accuracy(model, *held_out),
        "update_size": {
            name: float((conv.weight.detach() - first[name]).norm() / first[name].norm()) for name, conv in layers.items()
        },
        "variance_entropy": {name: layer_quality(conv.weight.detach())["variance_entropy"] for name, conv in layers.items()},
        "whitening": report.whitening,
        "sharpness": report.reflections["sharpness"],
        "noise": report.reflections["noise"],
    }


def train(arch: str, arm: str, seed: int, run_dir: Path) -> dict:
    """One training, watched into ``run_dir``; returns (and writes) its metrics per snapshot."""
    images = make_images(N_CLASSES, IMAGE_SIZE, seed, per_class=TRAIN_IMAGES + HELD_OUT_IMAGES)
    train_images, held_out_images = images[:, :TRAIN_IMAGES], images[:, TRAIN_IMAGES:]
    held_out = crops(held_out_images, EVAL_CROPS, torch.Generator().manual_seed(seed + 100), turn=False)
    fixed_generator = torch.Generator().manual_seed(seed + 200)
    fixed = crops(train_images, FIXED_CROPS, fixed_generator, turn=False)
    if arm == "random-labels":
        fixed = (fixed[0], torch.randint(N_CLASSES, (FIXED_CROPS,), generator=fixed_generator))
    model = build(arch, seed)
    first = {name: conv.weight.detach().clone() for name, conv in depthwise(model).items()}
    decay = WEIGHT_DECAY if arm == "varied" else 0.0
    groups = [
        {"params": [p for p in model.parameters() if p.ndim > 1], "weight_decay": decay},
        {"params": [p for p in model.parameters() if p.ndim <= 1], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(groups, lr=LR)
    generator = torch.Generator().manual_seed(seed + 1)
    watch = KernelWatch(run_dir, schedule=list(range(0, MAX_STEPS + 1, 100)) + list(SNAPSHOTS), handle_sigterm=False)
    metrics: dict[str, dict] = {}
    step, start = 0, time.perf_counter()

    def snapshot(force: bool = False) -> None:
        watch.snapshot(model, step, force=force)
        if step in watch.steps:
            sample = fixed if arm != "varied" else crops(train_images, EVAL_CROPS, generator, turn=True)
            metrics[str(step)] = measure(model, first, sample, held_out)

    snapshot()
    while step < STEPS or (arm != "varied" and step < MAX_STEPS and metrics[max(metrics, key=int)]["train_accuracy"] < TARGET_ACCURACY):
        step += 1
        for group in optimizer.param_groups:
            group["lr"] = LR * min(1.0, step / WARMUP)
        if arm == "varied":
            x, y = crops(train_images, BATCH, generator, turn=True)
        else:
            index = torch.randint(FIXED_CROPS, (BATCH,), generator=generator)
            x, y = fixed[0][index], fixed[1][index]
        loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step in SNAPSHOTS or step % 100 == 0:
            snapshot()
    if str(step) not in metrics:
        snapshot(force=True)
    watch.close()
    out = {"arch": arch, "arm": arm, "seed": seed, "steps": step, "seconds": time.perf_counter() - start, "metrics": metrics}
    (run_dir / "metrics.json").write_text(json.dumps(out))
    return out


def trained(cache: Path, arch: str, arm: str, seed: int) -> dict:
    run_dir = cache / arch / f"{arm}-seed{seed}"
    done = run_dir / "metrics.json"
    if done.exists():
        return json.loads(done.read_text())
    if run_dir.exists():  # an interrupted training: start it again
        for path in sorted(run_dir.rglob("*"), reverse=True):
            path.unlink() if path.is_file() else path.rmdir()
    run_dir.mkdir(parents=True, exist_ok=True)
    print(f"training {arch} {arm} seed {seed} ...", flush=True)
    out = train(arch, arm, seed, run_dir)
    last = out["metrics"][str(out["steps"])]
    print(f"  {out['steps']} steps in {out['seconds']:.0f} s: train {last['train_accuracy']:.3f}, "
          f"held out {last['held_out_accuracy']:.3f}", flush=True)  # fmt: skip
    return out


# -- signals ------------------------------------------------------------------------------------

#: Families of the centre patterns (the paper's DoG on/off-centres and their 3x3-cross look-alikes).
CENTRES = ("on-centre", "off-centre", "on-cross", "off-cross")
DERIVATIVES = ("first-derivative", "second-derivative")


def records(run_dir: Path) -> dict[str, dict[str, dict[int, dict]]]:
    """``{lens: {layer: {step: figures}}}`` of a KernelWatch run, read back with TensorBoard's
    loader: each snapshot's clustered fraction, nulls, median dissimilarity and family shares."""
    from tensorboard import context
    from tensorboard.backend.event_processing import data_provider, plugin_event_multiplexer

    from kernelwatch import format as fmt
    from kernelwatch.reading import Reader

    multiplexer = plugin_event_multiplexer.EventMultiplexer(tensor_size_guidance={fmt.PLUGIN_NAME: 0, "scalars": 0})
    multiplexer.AddRun(str(run_dir), name="run")
    multiplexer.Reload()
    reader = Reader(data_provider.MultiplexerDataProvider(multiplexer, str(run_dir)), sampling_hint=0)
    ctx = context.RequestContext()
    index = reader.run_index(ctx, "", "run")
    out: dict[str, dict[str, dict[int, dict]]] = {}
    for lens in fmt.LENSES:
        for layer in index.layers(lens=lens):
            timeline = reader.timeline(ctx, "", "run", layer, lens)
            figures, shares, nulls = (timeline[kind] for kind in (fmt.CLUSTERED_FRACTION, fmt.PROPORTIONS, fmt.NULL_PROPORTIONS))
            steps = {}
            for i, step in enumerate(figures["steps"]):
                point = {name: values[i] for name, values in figures["series"].items()}
                j = shares["steps"].index(step)
                k = nulls["steps"].index(step)
                point["families"] = fmt.families_above_chance(
                    {c: v[j] for c, v in shares["series"].items()}, {n: v[k] for n, v in nulls["series"].items()}
                )
                steps[step] = point
            out.setdefault(lens, {})[layer] = steps
    return out


def layer_signals(point: dict) -> dict[str, float]:
    """Candidate signals of one layer and lens at one snapshot (higher: more structure)."""
    from kernelwatch import format as fmt

    cf = point["clustered_fraction"]
    chance = fmt.chance_fraction(point["null_clustered_fraction"], point["smooth_null_clustered_fraction"])
    medians = fmt.chance_dissimilarity(point["null_median_dissimilarity"], point["smooth_null_median_dissimilarity"])
    families = point["families"]
    return {
        "clustered": cf,
        "above chance": cf - chance,
        "above shuffled null": cf - point["null_clustered_fraction"],
        "closer than chance": medians - point["median_dissimilarity"],
        "closer than shuffled null": point["null_median_dissimilarity"] - point["median_dissimilarity"],
        "centres above chance": sum(families[c] or 0.0 for c in CENTRES),
        "derivatives above chance": sum(families[c] or 0.0 for c in DERIVATIVES),
    }


def run_signals(run_dir: Path, metrics: dict) -> dict[int, dict[str, dict[str, float]]]:
    """``{step: {"layers": {layer: {signal: value}}, "model": {signal: value}}}`` of one training:
    per layer both lenses' signals, update size and variance entropy; model-wide the mean over
    layers, the smallest layer's and the mean of the first half of layers, and the stem's figures."""
    found = records(run_dir)
    out = {}
    for step_key, measured in metrics.items():
        step = int(step_key)
        layers: dict[str, dict[str, float]] = {}
        for lens, by_layer in found.items():
            for layer, steps in by_layer.items():
                if step in steps:
                    signals = layer_signals(steps[step])
                    layers.setdefault(layer, {}).update({f"{lens}: {name}": value for name, value in signals.items()})
        for layer in layers:
            layers[layer]["weights: variance entropy (lower)"] = -measured["variance_entropy"][layer]
            layers[layer]["update size"] = measured["update_size"][layer]
        names = sorted({name for signals in layers.values() for name in signals})
        order = list(layers)
        early = order[: max(1, len(order) // 2)]
        model = {}
        for name in names:
            values = [layers[layer][name] for layer in order if name in layers[layer]]
            if len(values) == len(order):
                model[f"mean {name}"] = float(np.mean(values))
                model[f"min {name}"] = float(np.min(values))
                model[f"early {name}"] = float(np.mean([layers[layer][name] for layer in early]))
        for name in ("whitening", "sharpness", "noise"):
            model[f"stem {name}"] = measured[name]
        out[step] = {"layers": layers, "model": model}
    return out


def auroc(memorising: list[float], generalising: list[float]) -> float:
    """P(a generalising run's value > a memorising run's), ties counting half: 1 separates perfectly
    with memorising runs lower, 0.5 not at all, 0 reversed."""
    if not memorising or not generalising:
        return float("nan")
    wins = sum((g > m) + 0.5 * (g == m) for m in memorising for g in generalising)
    return wins / (len(memorising) * len(generalising))


def truth(measured: dict) -> str | None:
    """Memorising or generalising as measured: the generalisation gap (training less held-out
    accuracy) at least ``MEMORISING_GAP`` with training accuracy at least 0.5, or at most
    ``GENERALISING_GAP``; None in between."""
    gap = measured["train_accuracy"] - measured["held_out_accuracy"]
    if gap >= MEMORISING_GAP and measured["train_accuracy"] >= 0.5:
        return "memorising"
    if gap <= GENERALISING_GAP:
        return "generalising"
    return None


def flags(run_dir: Path) -> list[tuple[int, str | None, str]]:
    """``(step, layer, kind)`` of the memorisation and outlier flags the monitor's detector
    (every default) raises over a run's records, replayed snapshot by snapshot."""
    from kernelwatch.analysis import LayerReport
    from kernelwatch.anomalies import AnomalyDetector

    def report(name: str, point: dict) -> LayerReport:
        return LayerReport(
            name, int(point["kernel_size"]), int(point["n_kernels"]), int(point["n_invalid"]),
            point["clustered_fraction"], {}, {}, null_clustered_fraction=point["null_clustered_fraction"],
            smooth_null_clustered_fraction=point["smooth_null_clustered_fraction"],
        )  # fmt: skip

    found, detector, out = records(run_dir), AnomalyDetector(), []
    for step in sorted(next(iter(found["weights"].values()))):
        weights = {name: report(name, steps[step]) for name, steps in found["weights"].items()}
        updates = {name: report(name, steps[step]) for name, steps in found.get("update", {}).items() if step in steps}
        out += [(step, a.layer, a.kind) for a in detector.update(step, weights, updates) if a.kind in ("memorisation", "outlier")]
    return out


MEMORISING_GAP, GENERALISING_GAP = 0.3, 0.15
LENGTHS = (100, 300, 600)


def report(cache: Path, archs: list[str], seeds: list[int]) -> None:
    runs = {}
    for arch in archs:
        for seed in seeds:
            for arm in ARMS:
                run_dir = cache / arch / f"{arm}-seed{seed}"
                metrics = json.loads((run_dir / "metrics.json").read_text())
                runs[arch, arm, seed] = (metrics, run_signals(run_dir, metrics["metrics"]))
    print("## Accuracies (training / held out; the gap) at 100, 300 and 600 steps, and the last step\n")
    print("| arch | arm | seed | step 100 | step 300 | step 600 | last step | truth at 600 |")
    print("|---|---|---|---|---|---|---|---|")
    for (arch, arm, seed), (metrics, _) in runs.items():
        cells = []
        for step in (*LENGTHS, metrics["steps"]):
            m = metrics["metrics"][str(step)]
            cells.append(f"{m['train_accuracy']:.2f} / {m['held_out_accuracy']:.2f} ({m['train_accuracy'] - m['held_out_accuracy']:+.2f})")
        print(f"| {arch} | {arm} | {seed} | " + " | ".join(cells[:3]) + f" | {metrics['steps']}: {cells[3]} | "
              f"{truth(metrics['metrics']['600']) or 'neither'} |")  # fmt: skip
    print("\n## The memorisation rule (kernelwatch.anomalies, defaults), replayed over each run's snapshots\n")
    print("| arch | arm | seed | truth at 600 | memorisation flags (steps; None: the model) | outlier flags |")
    print("|---|---|---|---|---|---|")
    for (arch, arm, seed), (metrics, _) in runs.items():
        found = flags(cache / arch / f"{arm}-seed{seed}")
        cells = [", ".join(f"{step} {layer or 'model'}" for step, layer, kind in found if kind == wanted) or "none"
                 for wanted in ("memorisation", "outlier")]  # fmt: skip
        print(f"| {arch} | {arm} | {seed} | {truth(metrics['metrics']['600']) or 'neither'} | {cells[0]} | {cells[1]} |")
    for level in ("model", "layers"):
        print(f"\n## AUROC of memorising against generalising runs, {level} (1: memorising runs have less of it)\n")
        names = sorted({name for _, signals in runs.values() for name in signals[600][level]} if level == "model" else
                       {name for _, signals in runs.values() for layer in signals[600]["layers"].values() for name in layer})  # fmt: skip
        print("| signal | " + " | ".join(f"{arch} {step}" for arch in archs for step in LENGTHS) + " |")
        print("|---|" + "---|" * (len(archs) * len(LENGTHS)))
        for name in names:
            cells = []
            for arch in archs:
                for step in LENGTHS:
                    groups: dict[str, list[float]] = {"memorising": [], "generalising": []}
                    for (a, _, _), (metrics, signals) in runs.items():
                        label = truth(metrics["metrics"][str(step)]) if a == arch else None
                        if label is None:
                            continue
                        values = [signals[step]["model"].get(name)] if level == "model" else [
                            layer.get(name) for layer in signals[step]["layers"].values()]  # fmt: skip
                        groups[label] += [v for v in values if v is not None and math.isfinite(v)]
                    cells.append(f"{auroc(groups['memorising'], groups['generalising']):.2f}")
            print(f"| {name} | " + " | ".join(cells) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", default=os.path.expanduser("~/.cache/kernelwatch/validate_memorisation"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--archs", nargs="+", choices=ARCHS, default=list(ARCHS))
    args = parser.parse_args()
    cache = Path(args.cache)
    for arch in args.archs:
        for seed in args.seeds:
            for arm in ARMS:
                trained(cache, arch, arm, seed)
    report(cache, args.archs, args.seeds)


if __name__ == "__main__":
    main()
