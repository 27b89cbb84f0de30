"""CPU cost of the first-layer lens per snapshot, for the monitor's background worker.

For a ConvNeXt-like patchify stem (3x4x4 -> 96, stride 4) and a ResNet-like one (3x7x7 -> 64,
stride 2): sampling 4096 patches from a batch of 64 images of 224 x 224 (``image_patches``),
their principal components (``patch_pca``), the report from the weights with those components
cached, and the whole report from the patches. Process CPU time (median of repeats, one thread),
and the ratio to the stem's own forward pass on that batch, measured in the same run (the
target: the whole report well under 20 ms). Run it on a quiet machine::

    /work/bin/quiet env OMP_NUM_THREADS=1 python benchmarks/bench_first_layer.py
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from kernelwatch.first_layer import first_layer_report, image_patches, patch_pca


def cpu_ms(work: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.process_time()
        work()
        times.append(time.process_time() - start)
    return 1000 * float(np.median(times))


def main() -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    images = torch.randn(64, 3, 224, 224)
    print(f"{'stem':<22} {'patches':>8} {'pca':>7} {'cached':>7} {'report':>7} {'stem fwd':>9} {'report/fwd':>10}  (ms CPU)")
    for name, stem in (
        ("3x4x4->96 stride 4", nn.Conv2d(3, 96, 4, stride=4)),
        ("3x7x7->64 stride 2", nn.Conv2d(3, 64, 7, stride=2, padding=3)),
    ):
        weight = stem.weight.detach()
        patches = image_patches(images, stem.kernel_size, stem.stride, 4096)
        pca = patch_pca(patches)
        sample = cpu_ms(lambda: image_patches(images, stem.kernel_size, stem.stride, 4096), 20)
        components = cpu_ms(lambda: patch_pca(patches), 20)
        cached = cpu_ms(lambda: first_layer_report(weight, pca), 20)
        report = cpu_ms(lambda: first_layer_report(weight, patches), 20)
        with torch.no_grad():
            forward = cpu_ms(lambda: stem(images), 5)
        print(
            f"{name:<22} {sample:>8.2f} {components:>7.2f} {cached:>7.2f} {report:>7.2f} {forward:>9.1f} "
            f"{(sample + report) / forward:>10.3f}"
        )


if __name__ == "__main__":
    main()
