"""Lightning: one callback drives every schedule (and LayerOut) per optimizer step, also under ``ddp_spawn``.

::

    from timm_drop.integrations.lightning import TimmDropCallback

    trainer = L.Trainer(max_epochs=10, callbacks=[TimmDropCallback(layerout=LayerOut(seed=0))])

At ``on_train_start`` (in every process) a :class:`~timm_drop.drive.Driver` hooks the first optimizer over
``trainer.estimated_stepping_batches`` (accumulation and ``max_steps`` included), starting from
``trainer.global_step`` so a resumed fit continues the same curve. LayerOut epochs follow the step count with
``steps_per_epoch`` defaulting to Lightning's epoch length; pass LayerOut unbound (it binds to the
LightningModule in each process, and an unbound LayerOut pickles for spawned workers).
"""

from __future__ import annotations

from typing import Any

try:
    from lightning.pytorch.callbacks import Callback
except ImportError:  # the standalone package
    from pytorch_lightning.callbacks import Callback

from timm_drop.integrations._common import optimizer_steps, start_driver
from timm_drop.layerout import LayerOut

__all__ = ["TimmDropCallback"]


class TimmDropCallback(Callback):
    """Drive timm_drop schedules (and optionally LayerOut) from a Lightning ``Trainer``."""

    def __init__(self, layerout: LayerOut | None = None, *, steps_per_epoch: int | None = None) -> None:
        self.layerout = layerout
        self.steps_per_epoch = steps_per_epoch
        self.driver = None

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        if not trainer.optimizers:
            raise RuntimeError("TimmDropCallback: the Trainer has no optimizer to hook")
        steps_per_epoch = self.steps_per_epoch
        if steps_per_epoch is None:
            steps_per_epoch = optimizer_steps(trainer.num_training_batches, trainer.accumulate_grad_batches)
        self.driver = start_driver(
            pl_module,
            trainer.optimizers[0],
            trainer.estimated_stepping_batches,
            trainer.global_step,
            layerout=self.layerout,
            steps_per_epoch=steps_per_epoch,
        )

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        if self.driver is not None:
            self.driver.remove()
            self.driver = None
