"""Train a small depthwise CNN on synthetic shapes with Hugging Face Accelerate, watched by KernelWatch.

    python examples/train_accelerate.py [--epochs 8] [--log-dir runs/accelerate] [--quick]
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 examples/train_accelerate.py --quick

Given the accelerator, KernelWatch is rank-aware: every process makes the same calls, and only
the main one copies, classifies and writes. Snapshots count optimizer steps (log-spaced over
the run, dense early), at the global step, the step to log the loss at
(``accelerator.log({"loss": ...}, step=step)``) so that both line up in TensorBoard.
"""

from __future__ import annotations

import argparse

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from synthetic import DepthwiseNet, shapes_dataset
from torch import nn

from kernelwatch import KernelWatch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--log-dir", default="runs/accelerate")
    parser.add_argument("--quick", action="store_true", help="a tiny run (about 15 s on two CPU cores), e.g. to try the setup")
    args = parser.parse_args()
    n_images, epochs = (256, 2) if args.quick else (4096, args.epochs)

    accelerator = Accelerator()
    set_seed(0)
    loader = torch.utils.data.DataLoader(shapes_dataset(n_images), batch_size=64, shuffle=True)
    model = DepthwiseNet()
    # channels_last: depthwise convolutions train 4-5x faster on CPU in it (backward especially).
    model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)

    total_steps = epochs * len(loader)  # len(loader): this process's batches per epoch
    watch = KernelWatch(log_dir=args.log_dir, schedule="log", total_epochs=total_steps, accelerator=accelerator)
    step = 0  # the global step: optimizer steps so far
    watch.snapshot(model, step)  # the initial kernels, before any training
    for epoch in range(1, epochs + 1):
        model.train()
        for images, labels in loader:
            images = images.to(memory_format=torch.channels_last)
            loss = nn.functional.cross_entropy(model(images), labels)
            optimizer.zero_grad()
            accelerator.backward(loss)
            optimizer.step()
            step += 1
            watch.snapshot(model, step)  # on every rank; the schedule decides, only the main one writes
        accelerator.print(f"epoch {epoch} (step {step}): last batch loss {loss.item():.3f}")
    watch.close()

    accelerator.print(f"kernelwatch events in {args.log_dir}")
    accelerator.print(f"view them with: tensorboard --logdir {args.log_dir} --samples_per_plugin=kernelwatch=0")
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    main()
