"""The HF Trainer and Lightning adapters: real tiny fits on CPU, events read back with TensorBoard."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.util import tensor_util
from torch import nn

from kernelwatch import format as fmt
from kernelwatch import integrations
from kernelwatch.metrics import layer_quality

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


@pytest.fixture
def hf_train():
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

    def train(output_dir: Path, callback, epochs: int = 2, **args):
        """4 optimizer steps per epoch."""
        args = TrainingArguments(
            output_dir=str(output_dir), num_train_epochs=epochs, per_device_train_batch_size=8, use_cpu=True,
            save_strategy="no", disable_tqdm=True, **{"report_to": [], "logging_strategy": "no", **args},
        )  # fmt: skip
        trainer = Trainer(model=Net(), args=args, train_dataset=Data(), callbacks=[callback])
        trainer.train()
        return trainer

    return train


def test_hf_trainer_snapshots_every_epoch(tmp_path, hf_train):
    callback = integrations.KernelWatchTrainerCallback()  # default log_dir: <output_dir>/kernelwatch
    hf_train(tmp_path, callback)
    assert callback.watch is None  # closed at on_train_end
    assert snapshot_steps(tmp_path / "kernelwatch") == [0, 1, 2]


def test_hf_trainer_steps_are_global_steps(tmp_path, hf_train):
    """every_n_steps: snapshots at the Trainer's global steps, the steps of its own loss scalars."""
    callback = integrations.KernelWatchTrainerCallback(tmp_path / "kw", every_n_steps=5)
    trainer = hf_train(
        tmp_path / "out", callback, epochs=3, report_to=["tensorboard"], logging_strategy="steps", logging_steps=5
    )
    assert trainer.state.global_step == 12
    (hf_run,) = {path.parent for path in (tmp_path / "out").rglob("events.out.tfevents.*")}
    hf = EventAccumulator(str(hf_run))
    hf.Reload()
    loss_steps = [event.step for event in hf.Scalars("train/loss")]
    assert loss_steps == [5, 10]
    assert {5, 10} <= {event.step for event in hf.Scalars("train/epoch")}  # the epoch at those steps
    assert snapshot_steps(tmp_path / "kw") == [0, *loss_steps, trainer.state.global_step]


def test_hf_step_arguments_are_checked():
    pytest.importorskip("transformers")
    with pytest.raises(TypeError, match="not both"):
        integrations.KernelWatchTrainerCallback(every_n_steps=5, every=2)
    with pytest.raises(TypeError, match='schedule="log"'):
        integrations.KernelWatchTrainerCallback(total_steps=100)
    callback = integrations.KernelWatchTrainerCallback(schedule="log", total_steps=100)
    assert callback.by_step and callback.watch_kwargs == {"schedule": "log", "total_epochs": 100}


@pytest.fixture
def lightning_fit():
    pl = pytest.importorskip("lightning.pytorch")

    class Net(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.body = tiny_body()

        def training_step(self, batch, batch_idx):
            # Logged at Lightning's step for this batch: computed from the weights it trains on.
            self.log("dw_orthogonality", layer_quality(self.body[1].weight.detach())["orthogonality"])
            x, y = batch
            return nn.functional.cross_entropy(self.body(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    def fit(root: Path, epochs: int, callback, ckpt_path=None, **trainer_args):
        """4 optimizer steps per epoch."""
        trainer = pl.Trainer(
            max_epochs=epochs, accelerator="cpu", devices=1, default_root_dir=str(root),
            enable_progress_bar=False, enable_model_summary=False, callbacks=[callback],
            enable_checkpointing=ckpt_path is None, **{"logger": False, **trainer_args},
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


def test_lightning_steps_are_global_steps_and_resume(tmp_path, lightning_fit):
    """every_n_steps: the snapshot at step s holds the weights that Lightning's scalars at step s
    were computed from; a resumed fit continues the step timeline."""
    from lightning.pytorch.loggers import TensorBoardLogger

    log_dir = tmp_path / "kw"
    logger = TensorBoardLogger(tmp_path, name="lightning")
    # Quality metrics at every snapshot, to compare with Lightning's at each step.
    callback = integrations.KernelWatchLightningCallback(log_dir, every_n_steps=3, quality_every=1)
    trainer = lightning_fit(tmp_path / "first", 2, callback, logger=logger, log_every_n_steps=1)
    assert snapshot_steps(log_dir) == [0, 3, 6, trainer.global_step] == [0, 3, 6, 8]
    lightning = EventAccumulator(logger.log_dir)
    lightning.Reload()
    logged = {event.step: event.value for event in lightning.Scalars("dw_orthogonality")}
    watched = EventAccumulator(str(log_dir), size_guidance={"tensors": 0})
    watched.Reload()
    tag = fmt.scalar_tag("quality", DW_LAYER, "orthogonality")
    ours = {event.step: float(tensor_util.make_ndarray(event.tensor_proto)) for event in watched.Tensors(tag)}
    assert sorted(logged) == list(range(8)) and sorted(ours) == [0, 3, 6, 8]
    for step in (0, 3, 6):
        assert ours[step] == pytest.approx(logged[step], abs=1e-6)
    assert ours[3] != pytest.approx(logged[2], abs=1e-6) and ours[3] != pytest.approx(logged[4], abs=1e-6)

    (checkpoint,) = Path(trainer.checkpoint_callback.dirpath).glob("*.ckpt")
    resumed = integrations.KernelWatchLightningCallback(log_dir, every_n_steps=3)
    lightning_fit(tmp_path / "resumed", 3, resumed, ckpt_path=checkpoint)
    assert snapshot_steps(log_dir) == [0, 3, 6, 8, 9, 12]


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


def test_hf_callback_resumes_on_the_step_axis(tmp_path):
    """A resumed run snapshots the restored weights at the restored global step, then goes on."""
    pytest.importorskip("transformers")
    from types import SimpleNamespace

    model, args = tiny_body(), SimpleNamespace(output_dir=str(tmp_path))
    callback = integrations.KernelWatchTrainerCallback(tmp_path, every_n_steps=5)
    callback.on_train_begin(args, SimpleNamespace(is_world_process_zero=True, global_step=8), None, model=model)
    for step in (9, 10, 11):
        callback.on_step_end(args, SimpleNamespace(global_step=step), None, model=model)
        callback.on_epoch_end(args, SimpleNamespace(epoch=step / 4), None, model=model)  # no snapshot
    callback.on_train_end(args, SimpleNamespace(global_step=11, epoch=2.75), None, model=model)
    assert snapshot_steps(tmp_path, layer="1") == [8, 10, 11]
