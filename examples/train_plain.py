"""Train a small depthwise CNN on synthetic shapes with a plain PyTorch loop, watched by KernelWatch.

    python examples/train_plain.py [--epochs 8] [--log-dir runs/plain] [--quick]

CPU only, no downloads. One snapshot before training (epoch 0) and one after every epoch.
"""

from __future__ import annotations

import argparse

import torch
from synthetic import DepthwiseNet, shapes_dataset
from torch import nn

from kernelwatch import KernelWatch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--log-dir", default="runs/plain")
    parser.add_argument("--quick", action="store_true", help="a tiny run (about 20 s on two CPU cores), e.g. to try the setup")
    args = parser.parse_args()
    n_images, epochs = (256, 2) if args.quick else (4096, args.epochs)

    torch.manual_seed(0)
    loader = torch.utils.data.DataLoader(shapes_dataset(n_images), batch_size=64, shuffle=True)
    model = DepthwiseNet()
    # channels_last: depthwise convolutions train 4-5x faster on CPU in it (backward especially).
    model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)

    with KernelWatch(log_dir=args.log_dir, every=1) as watch:
        watch.on_epoch_end(model, 0)  # the initial kernels, before any training
        for epoch in range(1, epochs + 1):
            model.train()
            total_loss, correct = 0.0, 0
            for images, labels in loader:
                images = images.to(memory_format=torch.channels_last)
                logits = model(images)
                loss = nn.functional.cross_entropy(logits, labels)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                total_loss += loss.item() * len(labels)
                correct += int((logits.argmax(1) == labels).sum())
            print(f"epoch {epoch}: loss {total_loss / n_images:.3f}, accuracy {correct / n_images:.1%}")
            watch.on_epoch_end(model, epoch)

    print(f"kernelwatch events in {args.log_dir}")
    print(f"view them with: tensorboard --logdir {args.log_dir} --samples_per_plugin=kernelwatch=0")


if __name__ == "__main__":
    main()
