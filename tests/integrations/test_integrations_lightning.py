"""Lightning: the callback drives schedules and LayerOut, single process and ddp_spawn with 2 CPU processes."""

from __future__ import annotations

import json

import pytest
import torch

L = pytest.importorskip("lightning", reason="lightning is a dev extra (pip install -e .[dev])")

import timm_drop  # noqa: E402
from timm_drop import LayerOut  # noqa: E402
from timm_drop.integrations.lightning import TimmDropCallback  # noqa: E402
from timm_drop.regularizers import Regularizer  # noqa: E402

# ddp_spawn pickles the LightningModule: stage sites are hook insertions, shortcut sites block-local rewrites.
SPEC = {
    "rules": [
        {
            "regularizer": "dropblock",
            "label": "pl dropblock",
            "params": {"drop_prob": 0.2, "block_size": 3},
            "sites": ["stage", "shortcut"],
            "schedule": {"kind": "linear", "start": 0.0, "end": 1.0},
        }
    ]
}


class _Module(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = timm_drop.create_model("resnet10t", SPEC, num_classes=3)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


class _Recorder(L.Callback):
    """Per optimizer step: schedule strength, LayerOut epoch and frozen set; written per rank when a dir is given."""

    def __init__(self, layerout=None, out_dir=None) -> None:
        self.layerout = layerout
        self.out_dir = out_dir
        self.steps: dict[int, dict] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        reg = next(m for m in pl_module.modules() if isinstance(m, Regularizer))
        row = {"strength": round(reg.strength.item(), 6)}
        if self.layerout is not None:
            row["epoch"] = self.layerout.epoch
            row["frozen"] = self.layerout.frozen_names
        self.steps[trainer.global_step] = row

    def on_train_end(self, trainer, pl_module):
        if self.out_dir is not None:
            with open(f"{self.out_dir}/rank{trainer.global_rank}.json", "w") as f:
                json.dump(self.steps, f)


def _data(n: int = 8):
    g = torch.Generator().manual_seed(0)
    ds = torch.utils.data.TensorDataset(torch.rand(n, 3, 32, 32, generator=g), torch.randint(0, 3, (n,), generator=g))
    return torch.utils.data.DataLoader(ds, batch_size=2)


def _trainer(**kw):
    base = dict(
        accelerator="cpu",
        max_epochs=2,
        accumulate_grad_batches=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    return L.Trainer(**{**base, **kw})


def test_lightning_callback_drives_schedules_and_layerout_epochs():
    lo = LayerOut(freeze_probs="random", seed=2)
    recorder = _Recorder(lo)
    module = _Module()
    _trainer(devices=1, callbacks=[TimmDropCallback(layerout=lo), recorder]).fit(module, _data())
    # 4 batches per epoch, accumulation 2: 2 optimizer steps per epoch, 4 in all
    assert [recorder.steps[k]["strength"] for k in (1, 2, 3, 4)] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert [recorder.steps[k]["epoch"] for k in (1, 2, 3, 4)] == [0, 1, 1, 2]
    assert [h["epoch"] for h in lo.history][:2] == [0, 1]
    assert not lo._hooks  # detached with the driver at on_train_end


def test_lightning_without_the_callback_runs_at_full_strength():
    recorder = _Recorder()
    with pytest.warns(UserWarning, match="pl dropblock"):
        _trainer(devices=1, max_epochs=1, callbacks=[recorder]).fit(_Module(), _data(4))
    assert recorder.steps[1]["strength"] == 1.0


def test_lightning_ddp_spawn_two_processes_stay_in_step(tmp_path):
    lo = LayerOut(freeze_probs="random", seed=2)
    trainer = _trainer(
        devices=2,
        strategy="ddp_spawn",
        callbacks=[TimmDropCallback(layerout=lo), _Recorder(lo, str(tmp_path))],
    )
    trainer.fit(_Module(), _data())
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    # 8 samples over 2 ranks, batch 2: 2 batches per epoch per rank, accumulation 2: 1 optimizer step per epoch
    assert ranks[0] == ranks[1]
    assert [ranks[0][k]["strength"] for k in ("1", "2")] == pytest.approx([0.5, 1.0])
    assert [ranks[0][k]["epoch"] for k in ("1", "2")] == [1, 2]
