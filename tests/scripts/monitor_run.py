"""Train a tiny depthwise model for a few epochs under a KernelWatch, on one or more CPU processes.

Run by tests/test_distributed.py, alone (``python monitor_run.py LOG_DIR MODE``) or under
``accelerate launch --cpu --num_processes 2``. MODE is ``ddp`` (the model prepared by accelerate:
DistributedDataParallel), ``fsdp`` (FSDP2 ``fully_shard``: every weight split across ranks) or
``fsdp1`` (a FullyShardedDataParallel wrapper: one flat parameter split across ranks).
Every rank trains on the same batches, so all runs reach the same weights as one process.
"""

import gc
import sys

import torch
from accelerate import Accelerator
from torch import nn

from kernelwatch import KernelWatch


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.Conv2d(16, 16, 5, padding=2, groups=16),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1, groups=16),
    )


def main(log_dir: str, mode: str) -> None:
    accelerator = Accelerator(cpu=True)
    model = net()
    if mode == "fsdp" and accelerator.num_processes > 1:
        from torch.distributed.fsdp import fully_shard

        fully_shard(model)
    elif mode == "fsdp1" and accelerator.num_processes > 1:
        from torch.distributed.fsdp import FullyShardedDataParallel

        model = FullyShardedDataParallel(model, device_id=torch.device("cpu"))
    optimiser = torch.optim.SGD(model.parameters(), lr=0.1)
    if mode == "ddp":
        model, optimiser = accelerator.prepare(model, optimiser)
    watch = KernelWatch(log_dir, every=2, accelerator=accelerator)
    for epoch in range(6):
        generator = torch.Generator().manual_seed(epoch)
        for _ in range(2 if epoch else 0):
            x = torch.randn(4, 3, 8, 8, generator=generator)
            loss = (model(x) - x.mean(1, keepdim=True)).pow(2).mean()
            optimiser.zero_grad()
            accelerator.backward(loss)
            optimiser.step()
        watch.on_epoch_end(model, epoch)
    watch.close()  # under FSDP the final snapshot (epoch 5) gathers on every rank
    print(f"rank {accelerator.process_index} steps {list(watch.steps)}", flush=True)
    # Gloo processes were seen to abort at exit otherwise: a gloo worker thread drops a finished
    # all-gather's tensors after the gather returned, taking the GIL, which aborts the process
    # during interpreter finalization. So the sharded model goes, and every rank is past a
    # barrier, while the interpreter is alive (tests/test_extraction.py measured it).
    del model, optimiser
    gc.collect()
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    main(*sys.argv[1:])
