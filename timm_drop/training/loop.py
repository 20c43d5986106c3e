"""The Accelerate training loop behind ``recipes/train.py``: :class:`Trainer` = :class:`~timm_drop.training.setup.
TrainerSetup` (everything before the first step) + the loop here + the epoch-end hooks of
:mod:`timm_drop.training.epoch_end` (evaluation, metrics, trackers, weights, checkpoint, log line, mask figures; a
list, ``trainer.epoch_end_hooks``, that a user's hook can join).

Clocks:

* the LR is a pure function of the optimizer-step counter (:class:`LRSchedule`), applied before every step;
* regularizer schedules (the model's and the EMA copy's) move through :func:`timm_drop.drive`, the optimizer step
  hook users call too: once per *optimizer* step that ran, never per micro-batch, never from eval, and not on a step
  the fp16 GradScaler skipped; the driver's step is saved in every checkpoint, so a resume continues the same curve;
* LayerOut's ``start_epoch(epoch)`` / ``end_epoch()`` bracket every epoch.

Mid-epoch checkpoints (``checkpoint.every_steps``) are taken right after an optimizer step (never inside a
gradient-accumulation window) and hold, besides an epoch checkpoint's state, each process's data position and
augmentation generators and the partial epoch's loss/accuracy sums; the global RNG streams are Accelerate's. A run
resumed from one continues the epoch at its next batch and reports the epoch's metrics as the uninterrupted run
does (``epoch_time_s`` adds the training time before and after the interruption).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from timm_drop.errors import TimmDropError
from timm_drop.training.checkpoint import CheckpointError, CheckpointManager
from timm_drop.training.config import ConfigError, TrainConfig
from timm_drop.training.epoch_end import EPOCH_END_HOOKS, EpochEndHook
from timm_drop.training.files import WriteError, replace_file
from timm_drop.training.metrics import plot_curves
from timm_drop.training.optim import LRSchedule, build_mixup, build_optimizer, optimizer_groups
from timm_drop.training.setup import TRACKER_PROJECT, TrainerSetup, TrainState

# LRSchedule, TrainState, TRACKER_PROJECT and the builders lived here before the loop was split: still importable
__all__ = [
    "TRACKER_PROJECT",
    "LRSchedule",
    "NonFiniteLossError",
    "RunInterrupted",
    "TrainState",
    "Trainer",
    "build_mixup",
    "build_optimizer",
    "optimizer_groups",
    "train",
]


class NonFiniteLossError(TimmDropError, RuntimeError):
    """The training loss became NaN/Inf; the run stopped without writing a checkpoint for that epoch."""


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C stopped the run; the message says where it stands (its last checkpoint, ``--resume latest``)."""


class Trainer(TrainerSetup):
    """One training run. ``Trainer(cfg).fit()``; pieces are attributes so tests can reach in.

    ``epoch_end_hooks`` is the list of ``hook(trainer, epoch, row)`` called in order after every epoch's training
    (:data:`~timm_drop.training.epoch_end.EPOCH_END_HOOKS` first); append to it to act at each epoch's end.
    """

    def __init__(
        self,
        cfg: TrainConfig,
        *,
        overwrite: bool = False,
        resume: str | None = None,
        dry_run: bool = False,
    ) -> None:
        self.cfg, self.overwrite, self.resume, self.dry_run = cfg, overwrite, resume, dry_run
        self.state = TrainState()
        self.out = Path(cfg.output_dir)
        self.epoch_end_hooks: list[EpochEndHook] = list(EPOCH_END_HOOKS)
        self._setup_done = False
        self._dir_ready = False  # the run directory was prepared: something of this run may be on disk
        # this process's state from a mid-epoch checkpoint, until the resumed epoch starts from it
        self._resume_point: dict[str, Any] | None = None
        #: LayerOut's (model, units) frozen fractions of the epoch in progress, or None without LayerOut
        self.epoch_frozen: tuple[float, float] | None = None

    # -- steps -------------------------------------------------------------------------------------------------
    def _check_finite(self, value: torch.Tensor, where: str) -> None:
        bad = (~torch.isfinite(value.detach().float())).any().float().reshape(1)
        if self.world > 1:
            bad = self.accelerator.reduce(bad, reduction="sum")
        if bad.item() > 0:
            raise NonFiniteLossError(
                f"non-finite training loss ({where}, optimizer step {self.state.step}); stopping without saving this "
                "epoch. Lower optim.lr, set train.clip_grad_norm, or use train.precision=bf16; "
                + self._where_it_stands()
            )

    def _epoch_checkpoint_due(self, epoch: int) -> bool:
        return (epoch + 1) % self.cfg.checkpoint.every == 0 or epoch + 1 == self.cfg.train.epochs

    def _step_checkpoint_due(self, epoch: int, batch: int, n_batches: int) -> bool:
        """After an optimizer step: ``checkpoint.every_steps`` divides the step count, unless the epoch's own
        checkpoint follows at once."""
        n = self.cfg.checkpoint.every_steps
        if n is None or self.state.step % n:
            return False
        return not (batch == n_batches and self._epoch_checkpoint_due(epoch))

    def _save_step_checkpoint(self, epoch: int, batch: int, sums: tuple | None) -> None:
        """A mid-epoch checkpoint after ``batch`` micro-batches of ``epoch`` (an optimizer-step boundary):
        ``sums`` = this process's (loss sum, correct, images, seconds) of the epoch so far."""
        accum = self.cfg.train.grad_accum_steps
        if batch % accum:
            # the accumulated gradients of the open window are in no checkpoint: resuming there would lose them
            raise CheckpointError(
                f"a mid-epoch checkpoint after micro-batch {batch} would fall inside a gradient-accumulation window "
                f"(train.grad_accum_steps={accum}); checkpoints are taken only at optimizer-step boundaries"
            )
        loss_sum, correct, seen, elapsed = sums
        self._check_finite(loss_sum, f"epoch {epoch + 1}, before the checkpoint at step {self.state.step}")
        position = self.train_loader.state_dict()
        if (position["epoch"], position["batch"]) != (epoch, batch):  # a loader that loses its position
            raise CheckpointError(
                f"the training loader reports epoch {position['epoch']}, batch {position['batch']} where the loop is "
                f"at epoch {epoch}, batch {batch}: a mid-epoch checkpoint would not resume at the right batch"
            )
        own = {
            "loader": position,
            "sums": {"loss": loss_sum.item(), "correct": correct.item(), "seen": seen, "elapsed_s": elapsed},
        }
        if self.is_main:
            self.run_dir.claim("checkpoints")
        self.state.batch = batch
        try:
            self.ckpt.save(
                self.accelerator, epoch + 1, self._extra_state(), step=self.state.step, process_state=own
            )
        finally:
            self.state.batch = 0

    def train_one_epoch(self, epoch: int) -> dict[str, float]:
        from tqdm.auto import tqdm

        acc, cfg, t = self.accelerator, self.cfg, self.cfg.train
        self.model.train()
        self.train_loader.set_epoch(epoch)
        # a run resumed mid-epoch starts at its checkpoint's batch, with the sums of the batches before it
        start, own, self._resume_point = 0, self._resume_point, None
        sums = {"loss": 0.0, "correct": 0.0, "seen": 0, "elapsed_s": 0.0}
        if own is not None:
            start, sums = own["loader"]["batch"], own["sums"]
        loss_sum = torch.tensor(sums["loss"], device=self.device, dtype=torch.float64)
        correct = torch.tensor(sums["correct"], device=self.device, dtype=torch.float64)
        seen = sums["seen"]
        n_batches = len(self.train_loader)
        bar = tqdm(
            initial=start,
            total=n_batches,
            desc=f"epoch {epoch + 1}/{t.epochs}",
            leave=False,
            dynamic_ncols=True,
            disable=not (self.is_main and cfg.log.progress_bar),
        )
        check_every = cfg.log.log_interval * t.grad_accum_steps
        # the LR reported is the last one applied: a resumed epoch has applied it for the step before its checkpoint
        lr = self.lr_schedule(self.state.step - 1 if start else self.state.step)
        t0 = time.perf_counter() - sums["elapsed_s"]
        for i, (x, y) in enumerate(self.train_loader, start):
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            # soft targets when mixing; accuracy below still counts the unmixed labels
            target = y
            if self.mixup is not None:
                x, target = self.mixup(x, y)
            with acc.accumulate(self.model):
                out = self.model(x)
                loss = self.criterion(out.float(), target)
                acc.backward(loss)
                if acc.sync_gradients:
                    if t.clip_grad_norm is not None:
                        if self.layerout is not None:
                            # frozen gradients (kept under DDP/compile) must not count in the clipping norm
                            self.layerout.discard_frozen_grads()
                        acc.clip_grad_norm_(self.model.parameters(), t.clip_grad_norm)
                    lr = self.lr_schedule.apply(self.optimizer, self.state.step)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
            stepped = acc.sync_gradients
            if stepped:
                self.state.step += 1  # the schedules already moved in the optimizer step hook (self.driver)
                if self.ema is not None:
                    self.ema.update(self.unwrapped, step=self.state.step)
            with torch.no_grad():
                loss_sum += loss.detach().double() * y.shape[0]
                correct += (out.detach().argmax(-1) == y).sum().double()
            seen += y.shape[0]
            bar.update(1)
            if (i + 1) % check_every == 0:
                self._check_finite(loss, f"epoch {epoch + 1}, batch {i + 1}")
                bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{lr:.4g}")
            if stepped and self._step_checkpoint_due(epoch, i + 1, n_batches):
                self._save_step_checkpoint(epoch, i + 1, (loss_sum, correct, seen, time.perf_counter() - t0))
        bar.close()
        dt = time.perf_counter() - t0
        totals = torch.stack(
            [loss_sum, correct, torch.tensor(float(seen), device=self.device, dtype=torch.float64)]
        )
        if self.world > 1:
            totals = acc.reduce(totals, reduction="sum")
        self._check_finite(totals[0], f"epoch {epoch + 1} mean")
        n = totals[2].item()
        return {
            "train_loss": totals[0].item() / n,
            "train_top1": 100.0 * totals[1].item() / n,
            "lr": lr,
            "epoch_time_s": dt,
            "train_images_per_s": n / dt,
        }

    @torch.no_grad()
    def evaluate(self, model: nn.Module | None = None) -> dict[str, float]:
        """Top-1/top-5/loss over the eval split, every image counted once across ranks (``gather_for_metrics``)."""
        acc = self.accelerator
        model = self.model if model is None else model
        was_training = model.training
        model.eval()
        stats = []
        k = min(5, self.num_classes)
        for x, y, valid in self.eval_loader:
            x, y, valid = x.to(self.device), y.to(self.device), valid.to(self.device)
            with acc.autocast():
                out = model(x)
            out = out.float()
            loss = F.cross_entropy(out, y, reduction="none")
            top1 = (out.argmax(-1) == y).float()
            topk = (out.topk(k, dim=-1).indices == y[:, None]).any(-1).float()
            stats.append(torch.stack([loss, top1, topk, valid.float()], dim=1))
        local = torch.cat(stats) if stats else torch.zeros(0, 4, device=self.device)
        allstats = acc.gather_for_metrics(local)
        allstats = allstats[allstats[:, 3] > 0]
        model.train(was_training)
        n = max(1, allstats.shape[0])
        s = allstats[:, :3].sum(0) / n
        return {
            "eval_loss": s[0].item(),
            "eval_top1": 100.0 * s[1].item(),
            "eval_top5": 100.0 * s[2].item(),
            "eval_images": int(allstats.shape[0]),
        }

    # -- the run -------------------------------------------------------------------------------------------------
    def fit(self, max_epochs: int | None = None) -> dict[str, Any]:
        """Train to ``train.epochs`` (or only ``max_epochs`` more epochs: a time-sliced job, resumable later).

        A run stopped by Ctrl-C (:class:`RunInterrupted`), a write that failed (:class:`WriteError`: no space left,
        ...) or an image that does not decode (:class:`DataError`) ends with a message that says where the run
        stands: its last complete checkpoint (intact: written atomically before) and ``--resume latest``."""
        try:
            if not self._setup_done:
                self.setup()
            if self.dry_run:
                return self.dry_run_check()
            try:
                return self._fit(max_epochs)
            finally:
                self.run_dir.release()
                self.close_loaders()
        except BaseException as e:
            stopped = self._stopped(e)
            if stopped is None:
                raise
            raise stopped from e

    def _stopped(self, e: BaseException) -> BaseException | None:
        """``e`` restated with where the run stands, for the ways a run stops that say nothing of it themselves."""
        from timm_drop.training.data import DataError
        from timm_drop.training.files import describe, disk_full

        if isinstance(e, KeyboardInterrupt) and not isinstance(e, RunInterrupted):
            return RunInterrupted(f"stopped by Ctrl-C (KeyboardInterrupt); {self._where_it_stands()}")
        if isinstance(e, WriteError) or (isinstance(e, Exception) and disk_full(e)):
            text = str(e) if isinstance(e, WriteError) else f"a write failed: {describe(e)}"
            return WriteError(f"{text}; {self._where_it_stands()}")
        if isinstance(e, DataError) and self._dir_ready:
            return DataError(f"{e}; {self._where_it_stands()}")
        return None

    def _where_it_stands(self) -> str:
        """The run's last complete checkpoint and how to continue from it (or that there is none yet)."""
        if not self._dir_ready:
            return "the run had not started: nothing was written"
        latest = CheckpointManager(self.out).latest()
        if latest is None:  # nothing to resume: advising --resume latest would only fail
            return "no checkpoint was written yet: start the run again (--overwrite replaces this one)"
        return f"its last complete checkpoint, {latest}, is intact: continue the run with --resume latest"

    def _agree_ema_buffers(self) -> None:
        """Give every process process 0's EMA buffers (BatchNorm statistics), so the processes evaluate one EMA.

        DDP keeps the model's buffers in step by broadcasting process 0's at each forward, but the EMA copy is not
        DDP-wrapped: its statistics follow each process's own batches. Checkpoints hold process 0's EMA, so
        agreeing on it also makes a resumed run's EMA evaluation exact.
        """
        if self.world > 1:
            from accelerate.utils import broadcast

            for buf in self.ema.module.buffers():
                broadcast(buf, from_process=0)

    def close_loaders(self) -> None:
        """Stop the data loaders' worker processes; a later :meth:`fit` (``max_epochs`` slices) starts new ones."""
        for loader in (getattr(self, "train_loader", None), getattr(self, "eval_loader", None)):
            if hasattr(loader, "close"):
                loader.close()

    def _fit(self, max_epochs: int | None) -> dict[str, Any]:
        acc, cfg = self.accelerator, self.cfg
        acc.print(
            f"{cfg.name}: {cfg.model.name} on {cfg.data.dataset} ({self.num_classes} classes), {self.world} process(es) "
            f"on {self.device}, {self.steps_per_epoch} steps/epoch x {cfg.train.epochs} epochs, "
            f"{self.n_regularizers} regularizer module(s)"
            + (", LayerOut" if self.layerout is not None else "")
        )
        last = {}
        end = cfg.train.epochs if max_epochs is None else min(cfg.train.epochs, self.state.epoch + max_epochs)
        for epoch in range(self.state.epoch, end):
            row = self._train_epoch(epoch)
            for hook in self.epoch_end_hooks:
                hook(self, epoch, row)
            last = row
        return self._finish(last)

    def _train_epoch(self, epoch: int) -> dict[str, Any]:
        """The epoch's training part inside LayerOut's epoch step (``start_epoch`` / ``end_epoch``); its row."""
        self.epoch_frozen = None
        if self.layerout is not None:
            if self._resume_point is None:
                self.layerout.start_epoch(epoch)
            # else a mid-epoch checkpoint restored this epoch's frozen set (and its start's norm counters)
            self.epoch_frozen = (
                float(self.layerout.frozen_fraction_of_model),
                float(self.layerout.frozen_fraction),
            )
        try:
            row = {"epoch": epoch + 1, "step": 0}
            row.update(self.train_one_epoch(epoch))
        finally:
            if self.layerout is not None:
                self.layerout.end_epoch()
        row["step"] = self.state.step
        return row

    def _finish(self, last: dict[str, Any]) -> dict[str, Any]:
        """The run's summary: ``curves.png``, ``result.json``, the closing line; trackers flushed."""
        acc, cfg = self.accelerator, self.cfg
        if not last and self.metrics is not None and self.metrics.rows:
            # nothing left to train (a finished run resumed): report its last epoch, not an empty one
            last = dict(self.metrics.rows[-1])
        summary = {
            "best_top1": self.state.best_top1,
            "best_epoch": self.state.best_epoch,
            "last": last,
            "output_dir": str(self.out),
        }
        if self.is_main:
            rows = self.metrics.rows
            if cfg.log.plot and rows:
                self.run_dir.claim("curves.png", "curves.png.tmp.png")
                plot_curves(
                    rows, self.out / "curves.png", title=f"{cfg.name}: {cfg.model.name} on {cfg.data.dataset}"
                )
            self.run_dir.claim("result.json", "result.json.tmp")
            text = json.dumps(summary, indent=2)
            replace_file(self.out / "result.json", lambda f: f.write(text.encode()))
            if last:
                acc.print(
                    f"done: final eval top-1 {last.get('eval_top1', float('nan')):.2f}%, best "
                    f"{self.state.best_top1:.2f}% (epoch {self.state.best_epoch}); outputs in {self.out}"
                )
        # flush and close the trackers; not acc.end_training(), which also destroys the process group that the
        # caller (and the barrier below) may still use
        for tracker in acc.trackers:
            tracker.finish()
        # let go of the run directory before the processes part: once any process returns, the run is not held,
        # so the next slice of a time-sliced job (or a resume) that it starts finds the directory free
        self.run_dir.release()
        acc.wait_for_everyone()
        return summary

    def _checkpoint_cadence(self) -> str:
        c = self.cfg.checkpoint
        text = f"checkpoints: every {c.every} epoch(s)"
        if c.every_steps is None:
            text += " (no mid-epoch checkpoints)"
        else:
            text += (
                f" and every {c.every_steps} optimizer steps ({c.every_steps / self.steps_per_epoch:.3g} epochs of "
                f"{self.steps_per_epoch} steps)"
            )
        return text + f"; keeps the newest {c.total_limit} (epoch and step checkpoints together)"

    def dry_run_check(self) -> dict[str, Any]:
        """Build-only check: one train-mode forward of a stub batch, no optimizer step, nothing written."""
        x = torch.randn(self._stub_shape(), device=self.device)
        y = torch.zeros(len(x), dtype=torch.long, device=self.device)
        if self.cfg.train.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        self.model.train()
        with torch.no_grad():  # a build check: train-mode forward through every regularizer, no backward
            out = self.model(x)
        if out.shape != (2, self.num_classes):
            raise ConfigError(
                f"model.name: {self.cfg.model.name} gave logits {tuple(out.shape)}, expected (2, {self.num_classes})"
            )
        if self.mixup is not None:
            y = F.one_hot(y, self.num_classes).float()
        if not torch.isfinite(self.criterion(out.float(), y)):
            raise ConfigError(f"model.name: {self.cfg.model.name} gave a non-finite loss on a stub batch")
        n_params = sum(p.numel() for p in self.unwrapped.parameters())
        groups = optimizer_groups(self.optimizer, self.unwrapped)
        for i, g in enumerate(groups):
            self.accelerator.print(
                f"optimizer group {i}: {g['params']} tensors ({g['numel']} values), weight_decay={g['weight_decay']:g}, "
                f"lr_scale={g['lr_scale']:.4g}: {', '.join(g['names'])}"
            )
        info = {
            "model": self.cfg.model.name,
            "params": n_params,
            "regularizers": self.n_regularizers,
            "layerout": self.layerout is not None,
            "num_classes": self.num_classes,
            "steps_per_epoch": None if self.steps_per_epoch_unknown else self.steps_per_epoch,
            "lr_first": self.lr_schedule(0),
            "lr_last": None if self.steps_per_epoch_unknown else self.lr_schedule(max(0, self.total_steps - 1)),
        }
        printed = dict(info)
        if self.steps_per_epoch_unknown:
            printed["steps_per_epoch"] = f"unknown ({self.steps_per_epoch_unknown})"
        info["data_config"], info["optimizer_groups"] = self.data_config, groups
        info["checkpoint_every_steps"] = self.cfg.checkpoint.every_steps
        self.accelerator.print(self._checkpoint_cadence())
        self.accelerator.print("dry run ok: " + ", ".join(f"{k}={v}" for k, v in printed.items()))
        return info


def train(
    cfg: TrainConfig, *, overwrite: bool = False, resume: str | None = None, dry_run: bool = False
) -> dict:
    """Run (or dry-run) one config; returns a summary dict."""
    return Trainer(cfg, overwrite=overwrite, resume=resume, dry_run=dry_run).fit()


def _env_world_size() -> int:  # pragma: no cover - informational
    return int(os.environ.get("WORLD_SIZE", "1"))
