"""Training-framework adapters for :class:`~kernelwatch.monitor.KernelWatch`. See ``docs/integrations.md``.

- ``KernelWatchTrainerCallback``: a ``transformers.TrainerCallback`` for the HF ``Trainer``.
- ``KernelWatchLightningCallback``: a Lightning ``Callback`` (``lightning.pytorch``, else
  ``pytorch_lightning``).

Both snapshot before training (epoch 0) and after every epoch, at the epoch number as the
step, and close the watch when training ends. Each class exists only when its framework is
installed; it is built on first access, so importing this module imports neither framework.

>>> from kernelwatch import integrations
>>> isinstance(integrations.is_transformers_available(), bool)
True
"""

from __future__ import annotations

import functools
import importlib.util
import math
import os
from typing import Any

import torch

__all__ = [
    "KernelWatchLightningCallback",
    "KernelWatchTrainerCallback",
    "is_lightning_available",
    "is_transformers_available",
]


def is_transformers_available() -> bool:
    """Whether ``transformers`` is installed (without importing it)."""
    return importlib.util.find_spec("transformers") is not None


def is_lightning_available() -> bool:
    """Whether ``lightning`` or ``pytorch_lightning`` is installed (without importing it)."""
    return any(importlib.util.find_spec(name) is not None for name in ("lightning", "pytorch_lightning"))


def _takes_part(is_global_zero: bool) -> bool:
    """Whether this process runs a watch. Under ``torch.distributed`` every rank must: sharded
    (FSDP) weights are gathered by a collective, and KernelWatch writes from rank 0 only."""
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    return is_global_zero or distributed


@functools.cache
def _trainer_callback_class() -> type:
    if not is_transformers_available():
        raise ImportError(
            "KernelWatchTrainerCallback needs the Hugging Face Trainer: pip install transformers"
        )
    from transformers import TrainerCallback

    from kernelwatch.monitor import KernelWatch

    class KernelWatchTrainerCallback(TrainerCallback):
        """Snapshots the model at epoch 0 and after each epoch of an HF ``Trainer`` run.

        ``log_dir`` defaults to ``<output_dir>/kernelwatch``; ``watch_kwargs`` go to
        :class:`KernelWatch` (``every=``, ``schedule=``, ``raise_on=``, ...). The watch lives
        from ``on_train_begin`` to ``on_train_end`` and is ``self.watch`` meanwhile. A run
        resumed from a checkpoint skips the epoch-0 snapshot and continues at its epoch.
        """

        def __init__(self, log_dir: str | os.PathLike[str] | None = None, **watch_kwargs: Any):
            self.log_dir = log_dir
            self.watch_kwargs = watch_kwargs
            self.watch: KernelWatch | None = None

        def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
            if not _takes_part(state.is_world_process_zero):
                return
            log_dir = self.log_dir if self.log_dir is not None else os.path.join(args.output_dir, "kernelwatch")
            self.watch = KernelWatch(log_dir, **self.watch_kwargs)
            # The Trainer restores its state before this hook, so global_step > 0 means resumed.
            if state.global_step == 0:
                self.watch.on_epoch_end(model, 0)

        def on_epoch_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
            if self.watch is not None:
                self.watch.on_epoch_end(model, round(state.epoch))

        def on_train_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
            if self.watch is not None:
                # A run stopped mid-epoch (max_steps) logs its final weights as the epoch it was in.
                self.watch.on_train_end(model, math.ceil(state.epoch - 1e-6))
                self.watch = None

    return KernelWatchTrainerCallback


@functools.cache
def _lightning_callback_class() -> type:
    if importlib.util.find_spec("lightning") is not None:
        from lightning.pytorch import Callback
    elif importlib.util.find_spec("pytorch_lightning") is not None:
        from pytorch_lightning import Callback
    else:
        raise ImportError("KernelWatchLightningCallback needs Lightning: pip install lightning")

    from kernelwatch.monitor import KernelWatch

    class KernelWatchLightningCallback(Callback):
        """Snapshots the module at epoch 0 and after each training epoch of a Lightning ``fit``.

        ``log_dir`` defaults to ``<trainer.log_dir>/kernelwatch``; ``watch_kwargs`` go to
        :class:`KernelWatch`. The watch's timeline is saved in Lightning checkpoints, so a
        resumed fit continues it.
        """

        def __init__(self, log_dir: str | os.PathLike[str] | None = None, **watch_kwargs: Any):
            self.log_dir = log_dir
            self.watch_kwargs = watch_kwargs
            self.watch: KernelWatch | None = None
            self._resume: dict[str, Any] | None = None

        def on_train_start(self, trainer: Any, pl_module: Any) -> None:
            # trainer.log_dir is a broadcast: every rank has to ask for it.
            log_dir = self.log_dir if self.log_dir is not None else os.path.join(trainer.log_dir, "kernelwatch")
            if not _takes_part(trainer.is_global_zero):
                return
            self.watch = KernelWatch(log_dir, **self.watch_kwargs)
            if self._resume:
                self.watch.load_state_dict(self._resume)
                self._resume = None
            elif trainer.global_step == 0:
                self.watch.on_epoch_end(pl_module, 0)

        def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
            if self.watch is not None:
                # current_epoch still counts from 0 here: the epoch just finished is number + 1.
                self.watch.on_epoch_end(pl_module, trainer.current_epoch + 1)

        def on_train_end(self, trainer: Any, pl_module: Any) -> None:
            if self.watch is not None:
                self.watch.on_train_end(pl_module, trainer.current_epoch)

        def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
            if self.watch is not None:
                # Flush what was taken, with no final snapshot (other ranks may never call again).
                self.watch.__exit__(type(exception), exception, exception.__traceback__)

        def state_dict(self) -> dict[str, Any]:
            return self.watch.state_dict() if self.watch is not None else {}

        def load_state_dict(self, state_dict: dict[str, Any]) -> None:
            # Lightning restores callbacks before on_train_start, where the watch is created.
            self._resume = dict(state_dict)

    return KernelWatchLightningCallback


_CLASSES = {
    "KernelWatchTrainerCallback": _trainer_callback_class,
    "KernelWatchLightningCallback": _lightning_callback_class,
}


def __getattr__(name: str) -> Any:
    if name in _CLASSES:
        return _CLASSES[name]()
    raise AttributeError(f"module 'kernelwatch.integrations' has no attribute {name!r}")
