"""Hugging Face ``transformers.Trainer``: one callback drives every schedule (and LayerOut) per optimizer step.

::

    from timm_drop.integrations.hf import TimmDropCallback

    model = TimmWrapperForImageClassification(config)
    timm_drop.apply_regularizer(model.timm_model, spec)        # before the Trainer is built
    trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[TimmDropCallback()])

The callback starts a :class:`~timm_drop.drive.Driver` on the Trainer's optimizer at ``on_train_begin`` (over
``state.max_steps``, from ``state.global_step``, so ``resume_from_checkpoint`` continues the same curve) and
removes it at ``on_train_end``. With ``layerout=LayerOut(...)`` (bound or not) it also runs LayerOut epochs from
the step count, ``steps_per_epoch`` defaulting to the Trainer's epoch length.
"""

from __future__ import annotations

from typing import Any

from transformers import TrainerCallback

from timm_drop.integrations._common import optimizer_steps, start_driver
from timm_drop.layerout import LayerOut

__all__ = ["TimmDropCallback"]


class TimmDropCallback(TrainerCallback):
    """Drive timm_drop schedules (and optionally LayerOut) from a ``transformers.Trainer``."""

    def __init__(self, layerout: LayerOut | None = None, *, steps_per_epoch: int | None = None) -> None:
        self.layerout = layerout
        self.steps_per_epoch = steps_per_epoch
        self.driver = None

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, optimizer: Any = None, **kw):
        if model is None or optimizer is None:
            raise RuntimeError("TimmDropCallback needs the Trainer's model and optimizer at on_train_begin")
        steps_per_epoch = self.steps_per_epoch
        loader = kw.get("train_dataloader")
        if steps_per_epoch is None and loader is not None and hasattr(loader, "__len__"):
            steps_per_epoch = optimizer_steps(len(loader), args.gradient_accumulation_steps)
        self.driver = start_driver(
            model,
            optimizer,
            state.max_steps,
            state.global_step,
            layerout=self.layerout,
            steps_per_epoch=steps_per_epoch,
        )

    def on_train_end(self, args: Any, state: Any, control: Any, **kw):
        if self.driver is not None:
            self.driver.remove()
            self.driver = None
