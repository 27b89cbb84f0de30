"""Train timm's ConvNeXt-Atto from scratch on synthetic shapes, with step-based KernelWatch snapshots.

    python examples/train_timm_convnext.py [--epochs 4] [--snapshot-every 20] [--log-dir runs/convnext_atto] [--quick]

CPU only; ``pretrained=False``, so nothing is downloaded. ConvNeXt-Atto has 18 depthwise 7x7
layers (1,840 kernels). Snapshots are taken every ``--snapshot-every`` optimizer steps, at the
step number, plus the initial and the final weights.
"""

from __future__ import annotations

import argparse

import timm
import torch
from synthetic import SHAPES, shapes_dataset
from torch import nn

from kernelwatch import KernelWatch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--snapshot-every", type=int, default=20, help="optimizer steps between snapshots")
    parser.add_argument("--log-dir", default="runs/convnext_atto")
    parser.add_argument("--quick", action="store_true", help="a tiny run (about 35 s on two CPU cores), e.g. to try the setup")
    args = parser.parse_args()
    n_images, epochs, every = (128, 2, 2) if args.quick else (2048, args.epochs, args.snapshot_every)

    torch.manual_seed(0)
    loader = torch.utils.data.DataLoader(shapes_dataset(n_images, size=64), batch_size=32, shuffle=True)
    model = timm.create_model("convnext_atto", pretrained=False, num_classes=len(SHAPES))
    # channels_last: depthwise convolutions train 4-5x faster on CPU in it (backward especially).
    model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)

    step = 0
    # close() (on leaving the block) also snapshots the final weights if the schedule skipped them.
    with KernelWatch(log_dir=args.log_dir, every=every) as watch:
        watch.snapshot(model, step)  # the initial kernels, before any training
        for epoch in range(1, epochs + 1):
            model.train()
            for images, labels in loader:
                images = images.to(memory_format=torch.channels_last)
                loss = nn.functional.cross_entropy(model(images), labels)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                step += 1
                watch.snapshot(model, step)  # only every `every` steps does it copy anything
            print(f"epoch {epoch} (step {step}): last batch loss {loss.item():.3f}")

    print(f"kernelwatch events in {args.log_dir} (snapshots at steps {list(watch.steps)})")
    print(f"view them with: tensorboard --logdir {args.log_dir} --samples_per_plugin=kernelwatch=0")


if __name__ == "__main__":
    main()
