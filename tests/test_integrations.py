"""The HF Trainer and Lightning adapters: real tiny fits on CPU, events read back with TensorBoard."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

from kernelwatch import format as fmt
from kernelwatch import integrations

DW_LAYER = "body.1"


def tiny_body() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.Conv2d(8, 8, 5, padding=2, groups=8),  # the depthwise layer watched
        nn.GELU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 2),
    )


def random_data(n: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return torch.randn(n, 3, 16, 16, generator=gen), torch.randint(0, 2, (n,), generator=gen)


def snapshot_steps(log_dir: Path, layer: str = DW_LAYER) -> list[int]:
    """The steps at which ``layer``'s proportions were written, read back by TensorBoard."""
    acc = EventAccumulator(str(log_dir), size_guidance={"tensors": 0})
    acc.Reload()
    return [event.step for event in acc.Tensors(fmt.make_tag(fmt.PROPORTIONS, layer))]


def test_import_is_lazy():
    code = (
        "import sys, kernelwatch.integrations as i; i.is_transformers_available(); i.is_lightning_available(); "
        "print(sorted(m for m in ('transformers', 'lightning', 'pytorch_lightning') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_missing_framework_names_the_package(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: None)
    integrations._trainer_callback_class.cache_clear()
    integrations._lightning_callback_class.cache_clear()
    try:
        with pytest.raises(ImportError, match="pip install transformers"):
            integrations.KernelWatchTrainerCallback
        with pytest.raises(ImportError, match="pip install lightning"):
            integrations.KernelWatchLightningCallback
    finally:
        integrations._trainer_callback_class.cache_clear()
        integrations._lightning_callback_class.cache_clear()
    with pytest.raises(AttributeError):
        integrations.NoSuchCallback


def test_hf_trainer_snapshots_every_epoch(tmp_path):
    pytest.importorskip("transformers")
    from transformers import Trainer, TrainingArguments

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = tiny_body()

        def forward(self, pixel_values, labels=None):
            logits = self.body(pixel_values)
            return {"loss": nn.functional.cross_entropy(logits, labels), "logits": logits}

    class Data(torch.utils.data.Dataset):
        def __init__(self):
            self.x, self.y = random_data()

        def __len__(self):
            return len(self.y)

        def __getitem__(self, i):
            return {"pixel_values": self.x[i], "labels": self.y[i]}

    callback = integrations.KernelWatchTrainerCallback()  # default log_dir: <output_dir>/kernelwatch
    args = TrainingArguments(
        output_dir=str(tmp_path), num_train_epochs=2, per_device_train_batch_size=8, use_cpu=True,
        report_to=[], save_strategy="no", logging_strategy="no", disable_tqdm=True,
    )  # fmt: skip
    Trainer(model=Net(), args=args, train_dataset=Data(), callbacks=[callback]).train()
    assert callback.watch is None  # closed at on_train_end
    assert snapshot_steps(tmp_path / "kernelwatch") == [0, 1, 2]


@pytest.fixture
def lightning_fit():
    pl = pytest.importorskip("lightning.pytorch")

    class Net(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.body = tiny_body()

        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.cross_entropy(self.body(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    def fit(root: Path, epochs: int, callback, ckpt_path=None):
        trainer = pl.Trainer(
            max_epochs=epochs, accelerator="cpu", devices=1, logger=False, default_root_dir=str(root),
            enable_progress_bar=False, enable_model_summary=False, callbacks=[callback],
            enable_checkpointing=ckpt_path is None,
        )  # fmt: skip
        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*random_data()), batch_size=8)
        trainer.fit(Net(), loader, ckpt_path=ckpt_path)
        return trainer

    return fit


def test_lightning_snapshots_every_epoch_and_resumes(tmp_path, lightning_fit):
    log_dir = tmp_path / "kw"
    first = integrations.KernelWatchLightningCallback(log_dir)
    trainer = lightning_fit(tmp_path / "first", 2, first)
    assert snapshot_steps(log_dir) == [0, 1, 2]
    (checkpoint,) = Path(trainer.checkpoint_callback.dirpath).glob("*.ckpt")
    saved = torch.load(checkpoint, weights_only=False)["callbacks"]
    assert [state["steps"] for key, state in saved.items() if "KernelWatch" in key] == [[0, 1, 2]]

    resumed = integrations.KernelWatchLightningCallback(log_dir)
    lightning_fit(tmp_path / "resumed", 3, resumed, ckpt_path=checkpoint)
    assert resumed.watch.steps == (0, 1, 2, 3)
    assert snapshot_steps(log_dir) == [0, 1, 2, 3]


def test_hf_callback_ranks_and_resume(tmp_path):
    """Called directly: a non-zero process without torch.distributed writes nothing; a resumed
    run (global_step > 0 at on_train_begin) skips epoch 0 and ends mid-epoch on the next one."""
    pytest.importorskip("transformers")
    from types import SimpleNamespace

    model, args = tiny_body(), SimpleNamespace(output_dir=str(tmp_path))
    other = integrations.KernelWatchTrainerCallback(tmp_path / "other")
    other.on_train_begin(args, SimpleNamespace(is_world_process_zero=False, global_step=0), None, model=model)
    other.on_epoch_end(args, SimpleNamespace(epoch=1.0), None, model=model)
    assert other.watch is None and not (tmp_path / "other").exists()

    resumed = integrations.KernelWatchTrainerCallback(tmp_path / "resumed")
    resumed.on_train_begin(args, SimpleNamespace(is_world_process_zero=True, global_step=8), None, model=model)
    resumed.on_epoch_end(args, SimpleNamespace(epoch=3.0), None, model=model)
    resumed.on_train_end(args, SimpleNamespace(epoch=3.5), None, model=model)
    assert snapshot_steps(tmp_path / "resumed", layer="1") == [3, 4]
