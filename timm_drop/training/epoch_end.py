"""What happens at the end of every epoch: a list of small named hooks the loop calls in order.

Each hook is ``hook(trainer, epoch, row)``: ``epoch`` is the 0-based index of the epoch just trained (as
``LayerOut.start_epoch`` gets it), ``row`` the epoch's metrics so far (``epoch`` in it is 1-based), which a hook may
add to. :data:`EPOCH_END_HOOKS` is the built-in order; a :class:`~timm_drop.training.loop.Trainer` copies it into
``trainer.epoch_end_hooks``, where a user's hook appended runs after all of them:

1. :func:`evaluate_epoch`: eval top-1/top-5/loss every ``train.eval_every`` epochs and at the last one (and the EMA's);
2. :func:`record_frozen_fraction`: LayerOut's frozen share of the model's parameters this epoch;
3. :func:`record_regularizers`: mean schedule strength and each rule's strength and realised drop fraction;
4. :func:`record_progress`: the finished-epoch counter and the best eval top-1 so far;
5. :func:`append_metrics`: ``metrics.jsonl`` / ``summary.csv`` (main process);
6. :func:`log_trackers`: the row's scalars to ``log.trackers`` (step = epoch);
7. :func:`save_epoch_weights`: ``last_model.*``, and ``best_model.*`` when the epoch improved;
8. :func:`save_epoch_checkpoint`: the epoch checkpoint every ``checkpoint.every`` epochs and at the last one;
9. :func:`print_epoch_line`: the one-line epoch summary;
10. :func:`draw_epoch_masks`: ``masks/epoch_NNN.png`` every ``log.mask_every`` epochs.

LayerOut's own epoch step (``start_epoch`` / ``end_epoch``) brackets the training part of the epoch, before these.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from timm_drop.training.checkpoint import save_weights, save_weights_safetensors
from timm_drop.training.mask_log import log_epoch_masks
from timm_drop.training.metrics import flat_scalars
from timm_drop.training.setup import regularizer_modules

__all__ = ["EPOCH_END_HOOKS", "EpochEndHook", "epoch_line"]

#: ``hook(trainer, epoch, row)``: see the module docstring
EpochEndHook = Callable[[Any, int, dict[str, Any]], None]


def evaluate_epoch(trainer: Any, epoch: int, row: dict[str, Any]) -> None:
    """Eval metrics (``eval_*``, and ``ema_eval_*`` with an EMA) on evaluation epochs."""
    t = trainer.cfg.train
    if (epoch + 1) % t.eval_every == 0 or epoch + 1 == t.epochs:
        row.update(trainer.evaluate())
        if trainer.ema is not None:
            trainer._agree_ema_buffers()
            row.update({f"ema_{k}": v for k, v in trainer.evaluate(trainer.ema.module).items()})


def record_frozen_fraction(trainer: Any, epoch: int, row: dict[str, Any]) -> None:
    """The paper's figure: share of all trainable parameters LayerOut froze this epoch (and of its units)."""
    frozen = trainer.epoch_frozen
    if frozen is not None:
        row["frozen_fraction"], row["frozen_fraction_units"] = frozen


def record_regularizers(trainer: Any, epoch: int, row: dict[str, Any]) -> None:
    """Mean schedule strength of the model's regularizers, and per rule its strength and realised drop fraction."""
    regs = regularizer_modules(trainer.unwrapped)
    if regs:
        row["reg_strength"] = sum(float(r.strength) for r in regs) / len(regs)
        from timm_drop.summary import summary

        for n, rule in enumerate(summary(trainer.unwrapped).rules, 1):
            row[f"rule{n}_strength"] = rule.multiplier
            row[f"rule{n}_drop_fraction"] = rule.drop_fraction


def record_progress(trainer: Any, epoch: int, row: dict[str, Any]) -> None:
    """The epoch counts as finished; the best eval top-1 (and its epoch) follow it."""
    state = trainer.state
    state.epoch = epoch + 1
    top1 = row.get("eval_top1")
    if top1 is not None and top1 > state.best_top1:
        state.best_top1, state.best_epoch = top1, epoch + 1


def append_metrics(trainer: Any, epoch: int, row: dict[str, Any]) -> None:
    """One row of ``metrics.jsonl`` and ``summary.csv`` (main process)."""
    if trainer.is_main:
        trainer.metrics.append(row)


def log_trackers(trainer: Any, epoch: int, row: dict[str, Any]) -> None:
    """The row's scalars to the configured trackers, at step = epoch."""
    if trainer.cfg.log.trackers:
        trainer.accelerator.log(flat_scalars(row), step=row["epoch"])


def save_epoch_weights(trainer: Any, epoch: int, row: dict[str, Any]) -> None:
    """``last_model.pth`` / ``.safetensors``, and ``best_model.*`` when this epoch set the best top-1."""
    # the full weights: a collective under FSDP (gathered to the main process), the model's own otherwise
    sd = trainer.accelerator.get_state_dict(trainer.unwrapped)
    if not trainer.is_main:
        return
    stems = ["last_model"]
    if trainer.state.best_epoch == epoch + 1 and trainer.cfg.checkpoint.save_best:  # record_progress: improved
        stems.append("best_model")
    for stem in stems:
        for name in (f"{stem}.pth", f"{stem}.safetensors"):
            trainer.run_dir.claim(name, name + ".tmp")
        save_weights(sd, trainer.out / f"{stem}.pth")
        save_weights_safetensors(sd, trainer.out / f"{stem}.safetensors")


def save_epoch_checkpoint(trainer: Any, epoch: int, row: dict[str, Any]) -> None:
    """The full training state (Accelerate's and ours) when an epoch checkpoint is due."""
    if trainer._epoch_checkpoint_due(epoch):
        if trainer.is_main:
            trainer.run_dir.claim("checkpoints")
        trainer.ckpt.save(trainer.accelerator, epoch + 1, trainer._extra_state())


def print_epoch_line(trainer: Any, epoch: int, row: dict[str, Any]) -> None:
    """The epoch's one-line summary (main process)."""
    trainer.accelerator.print(epoch_line(row, trainer.cfg.train.epochs))


def draw_epoch_masks(trainer: Any, epoch: int, row: dict[str, Any]) -> None:
    """``masks/epoch_NNN.png`` when ``log.mask_every`` asks for it (:func:`log_epoch_masks`)."""
    if trainer.cfg.log.mask_every:
        if trainer.is_main:
            trainer.run_dir.claim("masks")
        log_epoch_masks(trainer, epoch)


#: the built-in epoch-end hooks, in the order the loop calls them
EPOCH_END_HOOKS: tuple[EpochEndHook, ...] = (
    evaluate_epoch,
    record_frozen_fraction,
    record_regularizers,
    record_progress,
    append_metrics,
    log_trackers,
    save_epoch_weights,
    save_epoch_checkpoint,
    print_epoch_line,
    draw_epoch_masks,
)


def epoch_line(r: dict[str, Any], epochs: int) -> str:
    """``epoch   4/6  train_loss ...  lr ...  reg ...  14.0s (100 img/s)``: an epoch row as one printed line."""
    parts = [
        f"epoch {r['epoch']:>3}/{epochs}",
        f"train_loss {r['train_loss']:.4f}",
        f"train_top1 {r['train_top1']:6.2f}",
    ]
    if "eval_top1" in r:
        parts += [f"eval_loss {r['eval_loss']:.4f}", f"eval_top1 {r['eval_top1']:6.2f}"]
    if "ema_eval_top1" in r:
        parts.append(f"ema_top1 {r['ema_eval_top1']:6.2f}")
    parts.append(f"lr {r['lr']:.4g}")
    if "frozen_fraction" in r:
        parts.append(f"frozen {100 * r['frozen_fraction']:.1f}%")
    if "reg_strength" in r:
        parts.append(f"reg {r['reg_strength']:.3f}")
    parts.append(f"{r['epoch_time_s']:.1f}s ({r['train_images_per_s']:.0f} img/s)")
    return "  ".join(parts)
