"""The recipe's mask figures: ``log.mask_every: N`` draws the regularizers' masks on a fixed eval batch every N-th
epoch, with timm_drop's public figure function :func:`timm_drop.viz.render_masks` (training uses viz, not the
reverse)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["log_epoch_masks"]


def log_epoch_masks(trainer: Any, epoch: int, num_images: int = 2) -> Path | None:
    """Every ``log.mask_every`` epochs: the mask grid of a fixed batch (the first eval images) at the run's current
    schedule strength, written to ``<output_dir>/masks/epoch_NNN.png`` by the main process.

    Runs on a copy of the unwrapped model inside ``fork_rng`` (see :func:`~timm_drop.viz.render_masks`), so training
    (weights, BatchNorm statistics, the random stream that draws the next masks) is exactly what it is without it.
    """
    every = getattr(trainer.cfg.log, "mask_every", 0) or 0
    if every <= 0 or (epoch + 1) % every or not trainer.is_main or trainer.cfg.regularizer is None:
        return None
    from timm_drop.viz import render_masks

    batch = getattr(trainer, "_viz_batch", None)
    if batch is None:
        x = next(iter(trainer.eval_loader))[0]
        batch = x[:num_images].detach().float().contiguous().clone()
        trainer._viz_batch = batch
    path = Path(trainer.out) / "masks" / f"epoch_{epoch + 1:03d}.png"
    render_masks(
        trainer.unwrapped,
        None,
        batch,
        seed=trainer.cfg.seed,
        progress=None,
        out=path,
        label=f"epoch {epoch + 1}",
    )
    return path
