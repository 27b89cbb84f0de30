"""Training-framework adapters for :class:`~kernelwatch.monitor.KernelWatch`. See ``docs/integrations.md``.

- ``KernelWatchTrainerCallback``: a ``transformers.TrainerCallback`` for the HF ``Trainer``.
- ``KernelWatchLightningCallback``: a Lightning ``Callback`` (``lightning.pytorch``, else
  ``pytorch_lightning``).

Both snapshot before training and, by default, after every epoch, at the epoch number as the
TensorBoard step. With ``every_n_steps=N`` or ``schedule="log", total_steps=S`` they count
optimizer steps instead and write at the global step, the step of the framework's own loss
curves. They close the watch when training ends. Each class exists only when its framework is
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


def _watch_kwargs(
    every_n_steps: int | None, total_steps: int | None, watch_kwargs: dict[str, Any]
) -> tuple[bool, dict[str, Any]]:
    """Whether an adapter snapshots on the global-step axis, and :class:`KernelWatch`'s arguments.

    >>> _watch_kwargs(100, None, {})
    (True, {'every': 100})
    >>> _watch_kwargs(None, 5000, {"schedule": "log"})
    (True, {'schedule': 'log', 'total_epochs': 5000})
    >>> _watch_kwargs(None, None, {"every": 2})
    (False, {'every': 2})
    """
    if every_n_steps is None and total_steps is None:
        return False, dict(watch_kwargs)
    clash = sorted({"every", "total_epochs"} & watch_kwargs.keys())
    if clash:
        raise TypeError(f"give every_n_steps=/total_steps= (optimizer steps) or {clash} (epochs), not both")
    if total_steps is not None and watch_kwargs.get("schedule") != "log":
        raise TypeError('total_steps= is the length of a log schedule: pass schedule="log" with it')
    kwargs = dict(watch_kwargs)
    if every_n_steps is not None:
        kwargs["every"] = every_n_steps
    if total_steps is not None:
        kwargs["total_epochs"] = total_steps  # KernelWatch's last epoch or step
    return True, kwargs


@functools.cache
def _trainer_callback_class() -> type:
    if not is_transformers_available():
        raise ImportError(
            "KernelWatchTrainerCallback needs the Hugging Face Trainer: pip install transformers"
        )
    from transformers import TrainerCallback

    from kernelwatch.monitor import KernelWatch

    class KernelWatchTrainerCallback(TrainerCallback):
        """Snapshots the model of an HF ``Trainer`` run: before training and after each epoch
        (TensorBoard step: the epoch), or with ``every_n_steps=N`` / ``schedule="log",
        total_steps=S`` at optimizer steps (TensorBoard step: ``state.global_step``, as the
        Trainer's own scalars).

        ``log_dir`` defaults to ``<output_dir>/kernelwatch``; ``watch_kwargs`` go to
        :class:`KernelWatch` (``every=``, ``schedule=``, ``raise_on=``, ...). The watch lives
        from ``on_train_begin`` to ``on_train_end`` and is ``self.watch`` meanwhile. A run
        resumed from a checkpoint skips the epoch-0 snapshot and continues at its epoch; on the
        step axis it snapshots the restored weights at the restored global step.
        """

        def __init__(
            self,
            log_dir: str | os.PathLike[str] | None = None,
            *,
            every_n_steps: int | None = None,
            total_steps: int | None = None,
            **watch_kwargs: Any,
        ):
            self.log_dir = log_dir
            self.by_step, self.watch_kwargs = _watch_kwargs(every_n_steps, total_steps, watch_kwargs)
            self.watch: KernelWatch | None = None

        def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
            if not _takes_part(state.is_world_process_zero):
                return
            log_dir = self.log_dir if self.log_dir is not None else os.path.join(args.output_dir, "kernelwatch")
            self.watch = KernelWatch(log_dir, **self.watch_kwargs)
            # The Trainer restores its state before this hook, so global_step > 0 means resumed.
            if self.by_step:
                self.watch.snapshot(model, state.global_step)
            elif state.global_step == 0:
                self.watch.on_epoch_end(model, 0)

        def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
            # Called after each optimizer step, global_step already counting it.
            if self.watch is not None and self.by_step:
                self.watch.snapshot(model, state.global_step)

        def on_epoch_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
            if self.watch is not None and not self.by_step:
                self.watch.on_epoch_end(model, round(state.epoch))

        def on_train_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
            if self.watch is not None:
                # A run stopped mid-epoch (max_steps) logs its final weights as the epoch it was in.
                step = state.global_step if self.by_step else math.ceil(state.epoch - 1e-6)
                self.watch.on_train_end(model, step)
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
        """Snapshots the module of a Lightning ``fit``: before training and after each training
        epoch (TensorBoard step: the epoch), or with ``every_n_steps=N`` / ``schedule="log",
        total_steps=S`` at optimizer steps (TensorBoard step: ``trainer.global_step``).

        ``log_dir`` defaults to ``<trainer.log_dir>/kernelwatch``; ``watch_kwargs`` go to
        :class:`KernelWatch`. The watch's timeline is saved in Lightning checkpoints, so a
        resumed fit continues it.
        """

        def __init__(
            self,
            log_dir: str | os.PathLike[str] | None = None,
            *,
            every_n_steps: int | None = None,
            total_steps: int | None = None,
            **watch_kwargs: Any,
        ):
            self.log_dir = log_dir
            self.by_step, self.watch_kwargs = _watch_kwargs(every_n_steps, total_steps, watch_kwargs)
            self.watch: KernelWatch | None = None
            self._resume: dict[str, Any] | None = None
            self._global_step = -1  # the last global step seen: accumulating batches repeat it

        def on_train_start(self, trainer: Any, pl_module: Any) -> None:
            # trainer.log_dir is a broadcast: every rank has to ask for it.
            log_dir = self.log_dir if self.log_dir is not None else os.path.join(trainer.log_dir, "kernelwatch")
            if not _takes_part(trainer.is_global_zero):
                return
            self.watch = KernelWatch(log_dir, **self.watch_kwargs)
            self._global_step = trainer.global_step
            if self._resume:
                self.watch.load_state_dict(self._resume)
                self._resume = None
            elif trainer.global_step == 0:
                self.watch.on_epoch_end(pl_module, 0)

        def on_train_batch_end(self, trainer: Any, pl_module: Any, *args: Any, **kwargs: Any) -> None:
            # global_step counts optimizer steps, this batch's included (the weights are W_step).
            if self.watch is not None and self.by_step and trainer.global_step != self._global_step:
                self._global_step = trainer.global_step
                self.watch.snapshot(pl_module, trainer.global_step)

        def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
            if self.watch is not None and not self.by_step:
                # current_epoch still counts from 0 here: the epoch just finished is number + 1.
                self.watch.on_epoch_end(pl_module, trainer.current_epoch + 1)

        def on_train_end(self, trainer: Any, pl_module: Any) -> None:
            if self.watch is not None:
                step = trainer.global_step if self.by_step else trainer.current_epoch
                self.watch.on_train_end(pl_module, step)

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
