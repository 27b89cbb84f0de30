"""The update lens: what training wrote into the kernels, ``W_t - W_first``.

From PyTorch's default initialisation a few hundred steps leave the weights dominated by their
random start, while the cumulative update since the first snapshot is already structured. The
monitor classifies that update as a lens of its own. The reference (each layer's kernels at the
first snapshot that had it) is saved beside the run's event files, so a resumed run keeps it.

>>> import tempfile, torch
>>> reference = UpdateReference()
>>> first = torch.zeros(4, 3, 3)
>>> reference.update("dw", first, step=0) is None  # the reference itself: no update yet
True
>>> reference.update("dw", first + 1, step=5).mean().item()
1.0
>>> with tempfile.TemporaryDirectory() as log_dir:
...     reference.save(log_dir)
...     UpdateReference.load(log_dir).steps
{'dw': 0}
"""

from __future__ import annotations

import json
import os
import zipfile
import zlib
from pathlib import Path

import numpy as np
import torch

from kernelwatch.errors import KernelWatchError

#: The reference's file in the run's log directory (TensorBoard ignores it).
REFERENCE_FILE = "kernelwatch-reference.npz"
#: What ``np.load`` raises for a damaged file: an empty one (EOFError), a truncated or
#: corrupted zip (BadZipFile, zlib.error), a member cut short, a header it cannot parse.
_UNREADABLE = (OSError, ValueError, KeyError, TypeError, EOFError, zipfile.BadZipFile, zlib.error)


class UpdateReference:
    """Each layer's ``[C, k, k]`` kernels at its first snapshot, and that snapshot's step."""

    def __init__(self) -> None:
        self.kernels: dict[str, torch.Tensor] = {}
        self.steps: dict[str, int] = {}
        self.changed = False

    def update(self, name: str, kernels: torch.Tensor, step: int) -> torch.Tensor | None:
        """``kernels`` minus the layer's reference; None at the reference's own step. A layer
        seen for the first time, or whose shape changed, takes ``kernels`` as its reference."""
        reference = self.kernels.get(name)
        if reference is None or reference.shape != kernels.shape:
            self.kernels[name], self.steps[name] = kernels.detach().to("cpu", torch.float32, copy=True), int(step)
            self.changed = True
            return None
        if step == self.steps[name]:
            return None
        return kernels.to(torch.float32) - reference.to(kernels.device)  # the GPU's when classified there

    def save(self, log_dir: str | os.PathLike[str]) -> None:
        """Write the reference to ``log_dir`` (atomically: a crash leaves the old file whole)."""
        path = Path(log_dir) / REFERENCE_FILE
        names = list(self.kernels)
        header = json.dumps({"layers": names, "steps": [self.steps[n] for n in names]})
        arrays = {f"k{i}": self.kernels[name].numpy() for i, name in enumerate(names)}
        partial = path.with_suffix(".partial")
        with open(partial, "wb") as f:
            np.savez(f, header=np.array(header), **arrays)
        os.replace(partial, path)
        self.changed = False

    @classmethod
    def load(cls, log_dir: str | os.PathLike[str]) -> UpdateReference:
        """The reference :meth:`save` wrote to ``log_dir``; :class:`KernelWatchError` if there
        is none or it cannot be read."""
        path = Path(log_dir) / REFERENCE_FILE
        reference = cls()
        try:
            with np.load(path, allow_pickle=False) as data:
                header = json.loads(str(data["header"]))
                for i, (name, step) in enumerate(zip(header["layers"], header["steps"])):
                    reference.kernels[str(name)] = torch.from_numpy(data[f"k{i}"].astype(np.float32))
                    reference.steps[str(name)] = int(step)
        except _UNREADABLE as err:
            raise KernelWatchError(f"cannot read the update lens's reference {str(path)!r}: {err}") from err
        return reference


__all__ = ["REFERENCE_FILE", "UpdateReference"]
