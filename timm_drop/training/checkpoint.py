"""Crash-safe epoch checkpoints and output-directory protection.

Layout of a run directory::

    <output_dir>/config.yaml              resolved config (what ran)
    <output_dir>/metrics.jsonl, summary.csv, curves.png
    <output_dir>/best_model.pth           weights of the best eval epoch (plain state_dict)
    <output_dir>/last_model.pth           weights after the last finished epoch
    <output_dir>/checkpoints/epoch_0007/  full training state (Accelerate ``save_state``: model, optimizer, scaler,
                                          per-process RNG) + ``timm_drop_state.pt`` (epoch/step counters, LayerOut,
                                          EMA, best metric)

A checkpoint is written into ``checkpoints/.tmp-epoch_0007`` and only renamed to its final name (an atomic
``os.replace`` on one filesystem) once every process has written its part, so a kill during a write can never
leave a half-written "latest". Rotation deletes the oldest complete checkpoints beyond ``total_limit`` only after
the new one is in place.

Loading: Accelerate's ``load_state`` reads weights from safetensors and the optimizer/RNG files with
``torch.load(weights_only=True)``; our own state and the exported weights are loaded with ``weights_only=True``
too. (Accelerate's ``register_for_checkpointing`` would have loaded custom state with ``weights_only=False``, which
is why the recipe keeps its state in its own file instead.)
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from timm_drop.training.config import ConfigError, diff_configs

__all__ = ["CheckpointManager", "check_output_dir", "load_weights", "save_weights"]

STATE_FILE = "timm_drop_state.pt"
_NAME = re.compile(r"^epoch_(\d{4,})$")


def save_weights(state_dict: dict[str, torch.Tensor], path: str | os.PathLike) -> None:
    """Atomically write a plain ``state_dict`` (CPU tensors) to ``path``."""
    tmp = Path(str(path) + ".tmp")
    torch.save({k: v.detach().cpu() for k, v in state_dict.items()}, tmp)
    os.replace(tmp, path)


def load_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read weights written by :func:`save_weights` (``weights_only=True``: a weights file cannot run code)."""
    return torch.load(path, map_location="cpu", weights_only=True)


class CheckpointManager:
    def __init__(self, output_dir: str | os.PathLike, total_limit: int = 2) -> None:
        self.root = Path(output_dir) / "checkpoints"
        self.total_limit = total_limit

    def list(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        if not self.root.is_dir():
            return []
        found = [
            (int(m.group(1)), p) for p in self.root.iterdir() if (m := _NAME.match(p.name)) and p.is_dir()
        ]
        return [p for _, p in sorted(found)]

    def latest(self) -> Path | None:
        ckpts = self.list()
        return ckpts[-1] if ckpts else None

    def resolve(self, resume: str) -> Path:
        """``"latest"`` -> newest complete checkpoint of this run; otherwise a checkpoint folder path."""
        if resume == "latest":
            path = self.latest()
            if path is None:
                raise FileNotFoundError(f"--resume latest: no complete checkpoint under {self.root}")
            return path
        path = Path(resume)
        if not (path / STATE_FILE).is_file():
            raise FileNotFoundError(
                f"--resume {resume!r}: not a timm_drop checkpoint folder (no {STATE_FILE})"
            )
        return path

    def save(self, accelerator, epoch: int, extra_state: dict[str, Any]) -> Path:
        """Write the checkpoint of finished ``epoch`` on all processes; returns its final path."""
        final = self.root / f"epoch_{epoch:04d}"
        tmp = self.root / f".tmp-epoch_{epoch:04d}"
        if accelerator.is_main_process:
            self.root.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)  # leftover of a killed write
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp))
        if accelerator.is_main_process:
            torch.save(extra_state, tmp / STATE_FILE)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            if final.exists():  # re-saving an epoch (e.g. after resuming from an earlier one)
                trash = self.root / f".old-{final.name}"
                if trash.exists():
                    shutil.rmtree(trash)
                os.replace(final, trash)
                os.replace(tmp, final)
                shutil.rmtree(trash)
            else:
                os.replace(tmp, final)
            for old in self.list()[: -self.total_limit]:
                shutil.rmtree(old)
        accelerator.wait_for_everyone()
        return final

    @staticmethod
    def load(accelerator, path: str | os.PathLike) -> dict[str, Any]:
        path = Path(path)
        n = accelerator.num_processes
        missing = [i for i in range(n) if not (path / f"random_states_{i}.pkl").is_file()]
        if missing:
            # Accelerate silently skips missing RNG files; a resumed run would then not continue the same curve.
            raise FileNotFoundError(
                f"--resume {path}: no RNG state for process(es) {missing}; the checkpoint was written by "
                f"a run with a different number of processes"
            )
        accelerator.load_state(str(path))
        return torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)


def check_output_dir(
    output_dir: str | os.PathLike, config: dict, *, overwrite: bool, resume: str | None
) -> str:
    """Decide what to do with ``output_dir`` before any work starts (read-only; safe to run on every rank).

    Returns ``"new"`` (absent or empty), ``"overwrite"`` (a previous run's directory, to be replaced) or
    ``"resume"`` (this run's own directory). Raises :class:`ConfigError` when a different run would be clobbered.
    """
    import yaml

    out = Path(output_dir)
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        if resume == "latest":
            raise FileNotFoundError(f"--resume latest: output_dir {str(out)!r} holds no run to resume")
        return "new"
    if not out.is_dir():
        raise ConfigError(f"output_dir: {str(out)!r} exists and is not a directory")
    saved = out / "config.yaml"
    if not saved.is_file():
        raise ConfigError(
            f"output_dir: {str(out)!r} is not empty and holds no timm_drop run (no config.yaml); refusing to write "
            "into it (choose another output_dir)"
        )
    if overwrite:
        if resume is not None:
            raise ConfigError("--overwrite and --resume contradict each other: pick one")
        return "overwrite"
    if resume is None:
        raise ConfigError(
            f"output_dir: {str(out)!r} already holds a run; pass --resume latest to continue it or --overwrite to "
            "replace it (or choose another output_dir)"
        )
    old = yaml.safe_load(saved.read_text()) or {}
    ignore = ("log.", "checkpoint.", "description", "data.num_workers")
    diffs = [k for k in diff_configs(old, config) if not k.startswith(ignore)]
    if diffs:
        raise ConfigError(
            f"output_dir: {str(out)!r} holds a run with a different config (differs in {diffs}); resuming it with this "
            "config would not continue the same run. Use another output_dir or the saved config.yaml"
        )
    return "resume"
