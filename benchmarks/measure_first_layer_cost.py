"""What the first-layer lens costs on timm's ``convnext_atto`` (a 4x4 stride-4 stem, 3 -> 40).

- Training thread: the stem's forward pre-hook (:class:`kernelwatch.input_sample.PatchSampler`)
  on a batch of ``--batch`` 224x224 images, per call: a sampled call (a crop copied off the
  device), a skipped one, and their mean at the default cadence (every 2nd call); beside the
  CPU time of one forward pass of the model on that batch, the reference measured in the same run.
- Worker: per snapshot, with a full sample, the patches, the report, the filter picture and
  the record written, and the reflections of the stem's update (anomaly rule (e)).

CPU time of the measuring thread (``time.thread_time``), on one torch thread. Run through
``/work/bin/quiet`` (about 30 s)::

    python benchmarks/measure_first_layer_cost.py
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np
import timm
import torch

from kernelwatch.first_layer import find_stem, first_layer_report, reflections
from kernelwatch.input_sample import PatchSampler, sample_patches
from kernelwatch.writing import EventWriter


def per_call(fn, n: int) -> float:
    """Mean CPU seconds of ``fn()`` over ``n`` calls (after one warm-up call)."""
    fn()
    start = time.thread_time()
    for _ in range(n):
        fn()
    return (time.thread_time() - start) / n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--calls", type=int, default=2000)
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = timm.create_model("convnext_atto", pretrained=False).train()
    name, stem = find_stem(model)
    x = torch.randn(args.batch, 3, 224, 224).contiguous(memory_format=torch.channels_last)

    sampled = PatchSampler(stem, every=1)
    hook_sampled = per_call(lambda: sampled._hook(stem, (x,)), args.calls)
    sampled.remove()
    skipping = PatchSampler(stem, every=args.calls * 10)
    skipping._hook(stem, (x,))  # its one sampled call
    hook_skipped = per_call(lambda: skipping._hook(stem, (x,)), args.calls)
    skipping.remove()
    with torch.no_grad():
        forward = per_call(lambda: model(x), 3)
    default = (hook_sampled + hook_skipped) / 2

    sampler = PatchSampler(stem, every=1)
    for _ in range(64):  # fills the reservoir (32 entries of 2 crops)
        sampler._hook(stem, (x,))
    sample = sampler.sample()
    sampler.remove()
    weight = stem.weight.detach().clone()
    previous = weight + 0.01 * torch.randn_like(weight)
    timings: dict[str, list[float]] = {"patches": [], "report": [], "record": [], "update reflections": []}
    with tempfile.TemporaryDirectory() as log_dir, EventWriter(log_dir) as writer:
        for step in range(20):
            start = time.thread_time()
            patches = sample_patches(sample, stem.kernel_size, stem.stride)
            after_patches = time.thread_time()
            report = first_layer_report(weight, patches, layer=name, stride=tuple(stem.stride))
            after_report = time.thread_time()
            writer.write_first_layer(step, weight, report.to_json())
            after_record = time.thread_time()
            reflections((weight - previous).numpy())
            done = time.thread_time()
            for key, seconds in zip(timings, (after_patches - start, after_report - after_patches,
                                              after_record - after_report, done - after_record)):  # fmt: skip
                timings[key].append(seconds)
    medians = {key: float(np.median(values)) for key, values in timings.items()}

    print(f"convnext_atto stem {name!r}: {tuple(stem.weight.shape)}, stride {tuple(stem.stride)}; "
          f"batch {args.batch}x3x224x224 channels_last, 1 torch thread")  # fmt: skip
    print(f"training thread, pre-hook per call: sampled {1e6 * hook_sampled:.1f} us, skipped "
          f"{1e6 * hook_skipped:.2f} us, every 2nd sampled (default) {1e6 * default:.1f} us")  # fmt: skip
    print(f"  reference: one forward pass {1e3 * forward:.0f} ms CPU; hook / forward = {default / forward:.2e}")
    print(f"worker per snapshot ({len(patches)} patches): " + ", ".join(
        f"{key} {1e3 * value:.2f} ms" for key, value in medians.items()) + f"; total {1e3 * sum(medians.values()):.2f} ms")  # fmt: skip


if __name__ == "__main__":
    main()
