"""Classify 50,000 7x7 kernels against the shipped 10,000-code spectrum: indexed vs brute force.

The reference compares every kernel with every code in one float32 matmul (section 4.2 as
written); kernelwatch's index must give identical decisions, faster. Each side runs in its own
process so its peak memory (max RSS) is its own, and the two alternate over ``--rounds``: the
speed-up is the median of the rounds' ratios, so a slow minute of a shared machine falls on both
sides of one round rather than on one side of the comparison. Run:

    python benchmarks/bench_classify.py [--kernels 50000] [--rounds 3] [--repeats 3] [--noise-share 0.2]

The kernels are noisy synthetic DoG-family patterns plus a share of pure Gaussian noise
(unstructured kernels are the search's worst case).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import numpy as np
import torch


def make_kernels(n: int, noise_share: float, seed: int = 123) -> np.ndarray:
    from kernelwatch.pretrain import noisy_mixture

    rng = np.random.default_rng(seed)
    n_noise = int(round(n * noise_share))
    structured = noisy_mixture(n - n_noise, 7, rng)
    noise = rng.standard_normal((n_noise, 7, 7)).astype(np.float32)
    return np.concatenate([structured, noise])


def run_side(side: str, n: int, repeats: int, noise_share: float, exact: bool) -> dict:
    """Time one side in this process after one untimed call (the first call's memory is
    fresh from the system: 50 % slower on either side); returns decisions, timings and peak RSS."""
    import kernelwatch as kw
    from kernelwatch.classification import centre_and_normalise

    spectrum = kw.Spectrum.pretrained(kernel_size=7)
    kernels = make_kernels(n, noise_share)
    protos, _ = centre_and_normalise(torch.from_numpy(spectrum.prototypes))
    times = []
    for _ in range(1 + repeats):
        start = time.perf_counter()
        if side == "index":
            result = spectrum.classify(kernels, exact=exact)
            labels, dissimilarity, clustered = result.labels, result.dissimilarity, result.clustered
        else:
            unit, valid = centre_and_normalise(torch.from_numpy(kernels))
            sim, best = (unit @ protos.T).max(dim=1)  # all codes, one float32 matmul
            dissimilarity = (1.0 - sim).numpy()
            clustered = valid.numpy() & (dissimilarity <= spectrum.prototype_thresholds[best.numpy()])
            labels = np.where(clustered, spectrum.labels[best.numpy()], kw.UNCLUSTERED)
        times.append(time.perf_counter() - start)
    return {
        "seconds": times[1:],
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "labels": labels.tolist(),
        "clustered": np.asarray(clustered).tolist(),
        "dissimilarity": np.asarray(dissimilarity, dtype=float).tolist(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kernels", type=int, default=50_000)
    parser.add_argument("--rounds", type=int, default=3, help="alternating pairs of processes, one per side")
    parser.add_argument("--repeats", type=int, default=3, help="calls per process (their median counts)")
    parser.add_argument("--noise-share", type=float, default=0.2)
    parser.add_argument("--exact", action="store_true", help="exact distances for unclustered kernels too")
    parser.add_argument("--side", choices=("index", "brute"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        json.dump(run_side(args.side, args.kernels, args.repeats, args.noise_share, args.exact), sys.stdout)
        return

    def child(side: str) -> dict:
        cmd = [sys.executable, __file__, "--side", side, "--kernels", str(args.kernels)]
        cmd += ["--repeats", str(args.repeats), "--noise-share", str(args.noise_share)]
        cmd += ["--exact"] if args.exact else []
        return json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)

    seconds: dict[str, list[float]] = {"brute": [], "index": []}
    peak_rss: dict[str, float] = {"brute": 0.0, "index": 0.0}
    results: dict[str, dict] = {}
    for round_ in range(args.rounds):
        for side in ("brute", "index") if round_ % 2 == 0 else ("index", "brute"):
            results[side] = child(side)
            seconds[side].append(statistics.median(results[side]["seconds"]))
            peak_rss[side] = max(peak_rss[side], results[side]["peak_rss_mib"])
    brute, index = results["brute"], results["index"]
    ratios = [b / i for b, i in zip(seconds["brute"], seconds["index"])]
    t_brute, t_index = statistics.median(seconds["brute"]), statistics.median(seconds["index"])
    same_labels = np.mean(np.array(brute["labels"]) == np.array(index["labels"]))
    same_clustered = np.mean(np.array(brute["clustered"]) == np.array(index["clustered"]))
    clustered = np.array(brute["clustered"])
    diff = np.abs(np.array(brute["dissimilarity"]) - np.array(index["dissimilarity"]))
    mode = "exact=True" if args.exact else "default (exact=False)"
    print(f"kernels: {args.kernels} 7x7 ({args.noise_share:.0%} pure noise), spectrum: 10,000 codes, "
          f"torch threads: {torch.get_num_threads()}, classify {mode}, {args.rounds} rounds of {args.repeats} calls")
    print(f"brute force : {t_brute:.3f} s  {args.kernels / t_brute:>10,.0f} kernels/s  "
          f"peak RSS {peak_rss['brute']:.0f} MiB")
    print(f"kernelwatch : {t_index:.3f} s  {args.kernels / t_index:>10,.0f} kernels/s  "
          f"peak RSS {peak_rss['index']:.0f} MiB")
    print(f"speed-up    : {statistics.median(ratios):.1f}x (rounds: {', '.join(f'{r:.1f}x' for r in ratios)})")
    print(f"identical decisions: labels {same_labels:.4%}, clustered flags {same_clustered:.4%} "
          f"({clustered.mean():.1%} clustered)")
    print(f"max |dissimilarity difference|: clustered kernels {np.nanmax(diff[clustered]):.1e}, "
          f"all kernels {np.nanmax(diff):.1e}")


if __name__ == "__main__":
    main()
