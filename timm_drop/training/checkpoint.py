"""Crash-safe epoch and mid-epoch checkpoints.

Layout of a run directory::

    <output_dir>/config.yaml              resolved config (what ran)
    <output_dir>/metrics.jsonl, summary.csv, curves.png
    <output_dir>/best_model.pth           weights of the best eval epoch (plain state_dict)
    <output_dir>/last_model.pth           weights after the last finished epoch
    <output_dir>/checkpoints/epoch_0007/  full training state (Accelerate ``save_state``: model, optimizer, scaler,
                                          per-process RNG) + ``timm_drop_state.pt`` (epoch/step counters, LayerOut,
                                          EMA, best metric) + ``manifest.json`` (size + sha256 of each file)
    <output_dir>/checkpoints/epoch_0008_step_00001234/
                                          a mid-epoch checkpoint (``checkpoint.every_steps``) taken inside epoch 8
                                          after optimizer step 1234: the same files, plus one
                                          ``timm_drop_rank_<r>.pt`` per process (its data position, augmentation
                                          generators and the partial epoch's metric sums)
    <output_dir>/.timm_drop_run.json      marker: the entries above that the recipe created (:class:`RunDir`)

A checkpoint is written into ``checkpoints/.tmp-epoch_0007`` and only renamed to its final name (an atomic
``os.replace`` on one filesystem) once every process has written its part and the manifest has been written last,
so a kill during a write can never leave a half-written "latest". Checkpoints are ordered by training progress
(``epoch_0007`` < ``epoch_0008_step_*`` by step < ``epoch_0008``); rotation deletes the oldest complete ones, of
either kind, beyond ``total_limit`` only after the new one is in place. The rename alone does not protect against
what happens to the files later (a disk, a copy, a sync cut short, a power loss before the data reached the disk),
so resume checks every file against the manifest before loading anything (:func:`verify_checkpoint`).

The marker and the rest of the output-directory protection live in :mod:`timm_drop.training.run_dir`.

Loading: Accelerate's ``load_state`` reads weights from safetensors and the optimizer/RNG files with
``torch.load(weights_only=True)``; our own state and the exported weights are loaded with ``weights_only=True``
too. (Accelerate's ``register_for_checkpointing`` would have loaded custom state with ``weights_only=False``, which
is why the recipe keeps its state in its own file instead.)
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from timm_drop.errors import TimmDropError
from timm_drop.training.files import (
    file_mode,
    remove_leftover,
    replace_file,
    replace_with,
    staging_dir,
    writing,
)

__all__ = [
    "CheckpointError",
    "CheckpointManager",
    "agreed_problem",
    "checkpoint_name",
    "load_weights",
    "save_weights",
    "verify_checkpoint",
]

STATE_FILE = "timm_drop_state.pt"
#: a mid-epoch checkpoint's per-process state (``{rank}``: the process index)
PROCESS_STATE_FILE = "timm_drop_rank_{rank}.pt"
_NAME = re.compile(r"^epoch_(\d{4,})(?:_step_(\d{8,}))?$")


def checkpoint_name(epoch: int, step: int | None = None) -> str:
    """``epoch_0007`` (the end of epoch 7) or ``epoch_0008_step_00001234`` (inside epoch 8, after optimizer step
    1234)."""
    return f"epoch_{epoch:04d}" if step is None else f"epoch_{epoch:04d}_step_{step:08d}"


def _order(match: re.Match) -> tuple[int, int, int]:
    # inside an epoch by step, then its end
    epoch, step = match.group(1), match.group(2)
    return (int(epoch), 0, int(step)) if step is not None else (int(epoch), 1, 0)


def save_weights(state_dict: dict[str, torch.Tensor], path: str | os.PathLike) -> None:
    """Atomically write a plain ``state_dict`` (CPU tensors) to ``path`` (see :mod:`timm_drop.training.files`)."""
    cpu = {k: v.detach().cpu() for k, v in state_dict.items()}
    replace_file(path, lambda f: torch.save(cpu, f))


def save_weights_safetensors(
    state_dict: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str] | None = None
) -> None:
    """Atomically write ``state_dict`` as ``.safetensors`` (no pickle; timm's ``pretrained_cfg_overlay=dict(file=)``
    and ``safetensors.torch.load_file`` read it), with ``metadata`` (strings) beside ``format: pt``. Tied tensors
    are stored once per key, so every key loads strictly."""
    from safetensors.torch import save_file

    seen: set[tuple[int, int]] = set()
    tensors = {}
    for k, v in state_dict.items():
        v = v.detach().cpu().contiguous()
        ident = (v.untyped_storage().data_ptr(), v.storage_offset())
        # safetensors refuses tensors sharing memory; a copy keeps every key loadable with strict=True
        owns_storage = v.untyped_storage().nbytes() == v.numel() * v.element_size()
        tensors[k] = v if owns_storage and ident not in seen else v.clone()
        seen.add(ident)
    replace_with(path, lambda tmp: save_file(tensors, tmp, metadata={**(metadata or {}), "format": "pt"}))


def load_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read weights written by :func:`save_weights` (``weights_only=True``: a weights file cannot run code)."""
    return torch.load(path, map_location="cpu", weights_only=True)


#: every process's value, in process order (``agree(value)``); a collective, so every process calls it alike
Agree = Callable[[Any], list[Any]]


def alone(value: Any) -> list[Any]:
    """:data:`Agree` for a run of one process."""
    return [value]


def agreed_problem(problems: list[str | None]) -> str | None:
    """What every process concludes from every process's problem (None: none has one): the first process's
    problem, naming that process when the others saw none, so every process reports the same text."""
    found = [(rank, problem) for rank, problem in enumerate(problems) if problem is not None]
    if not found:
        return None
    rank, problem = found[0]
    if len(found) == len(problems):
        return problem
    return f"{problem} (seen by process {', '.join(str(r) for r, _ in found)} of {len(problems)})"


class CheckpointManager:
    def __init__(self, output_dir: str | os.PathLike, total_limit: int = 2) -> None:
        self.root = Path(output_dir) / "checkpoints"
        self.total_limit = total_limit

    def list(self) -> list[Path]:
        """Complete checkpoints (epoch and mid-epoch ones), oldest first in training order."""
        if not self.root.is_dir():
            return []
        found = [(_order(m), p) for p in self.root.iterdir() if (m := _NAME.match(p.name)) and p.is_dir()]
        return [p for _, p in sorted(found)]

    def latest(self) -> Path | None:
        ckpts = self.list()
        return ckpts[-1] if ckpts else None

    def resolve(
        self,
        resume: str,
        num_processes: int = 1,
        log: Callable[[str], None] = print,
        restore: Callable[[Path], None] | None = None,
        agree: Agree = alone,
    ) -> Path:
        """The checkpoint to continue from: verified against its manifest, then given to ``restore`` (which raises
        :class:`CheckpointError` when the checkpoint cannot continue this run).

        ``"latest"``: the newest checkpoint of this run that verifies and restores; each newer one that does not is
        reported through ``log`` (which file failed or why it cannot be restored, which checkpoint is used
        instead). A path: that checkpoint folder, or :class:`CheckpointError` naming the file or the reason.

        In a run of several processes, every process calls this with ``agree`` (every process's value, in process
        order: a collective). The processes then decide together at each step (the checkpoints listed, each one's
        verification, each restore): a checkpoint that one process cannot use is refused by all, so they all
        continue from the same checkpoint or all raise the same error, and they all call ``agree`` equally often.
        A process deciding alone would resume from another checkpoint than the others, or leave them waiting in
        a collective it never enters.
        """
        if resume == "latest":
            # every process's listing: a checkpoint that one process does not see fails its verification there
            names = {name for listed in agree([p.name for p in self.list()]) for name in listed}
            ckpts = sorted((self.root / n for n in names), key=lambda p: _order(_NAME.match(p.name)))
            if not ckpts:
                raise FileNotFoundError(f"--resume latest: no complete checkpoint under {self.root}")
            failed = []
            for path in reversed(ckpts):
                problem = self._unusable(path, num_processes, restore, agree)
                if problem is None:
                    if failed:
                        log(
                            "warning: --resume latest: "
                            + "; ".join(failed)
                            + f"; resuming from {path} instead (the newest checkpoint that verifies and restores)"
                        )
                    return path
                failed.append(f"checkpoint {path} {problem}")
            raise CheckpointError("--resume latest: no checkpoint can be used: " + "; ".join(failed))
        path = Path(resume)
        not_one = None
        if not (path / STATE_FILE).is_file() and not (path / MANIFEST).is_file():
            not_one = f"--resume {resume!r}: not a timm_drop checkpoint folder (no {STATE_FILE}, no {MANIFEST})"
        not_one = agreed_problem(agree(not_one))
        if not_one is not None:
            raise FileNotFoundError(not_one)
        problem = self._unusable(path, num_processes, restore, agree)
        if problem is not None:
            raise CheckpointError(f"--resume {resume!r}: checkpoint {problem}")
        return path

    @staticmethod
    def _unusable(
        path: Path, num_processes: int, restore: Callable[[Path], None] | None, agree: Agree
    ) -> str | None:
        """Why ``path`` cannot continue this run on some process (``"fails verification: ..."``, ``"cannot be
        restored: ..."``), or None once ``restore`` took it on every process. Every process restores only a
        checkpoint that every process verified (a restore may itself be a collective)."""
        problem = agreed_problem(agree(verify_checkpoint(path, num_processes)))
        if problem is not None:
            return f"fails verification: {problem}"
        if restore is None:
            return None
        try:
            restore(path)
        except CheckpointError as e:
            problem = str(e)
        problem = agreed_problem(agree(problem))
        return None if problem is None else f"cannot be restored: {problem}"

    def save(
        self,
        accelerator,
        epoch: int,
        extra_state: dict[str, Any],
        *,
        step: int | None = None,
        process_state: dict[str, Any] | None = None,
    ) -> Path:
        """Write a checkpoint on all processes; returns its final path.

        Without ``step``: the checkpoint of finished ``epoch``. With ``step``: a mid-epoch checkpoint inside
        ``epoch`` (1-based) after optimizer step ``step``, where every process also writes ``process_state`` (its
        own: data position, generators, partial sums) to :data:`PROCESS_STATE_FILE`. The manifest (size + sha256
        of every file) is written last, atomically, after every process has written its part and every file is
        flushed to disk; only then is the folder renamed to its final name.
        """
        if (step is None) != (process_state is None):
            raise ValueError("CheckpointManager.save: a mid-epoch checkpoint needs step and process_state")
        final = self.root / checkpoint_name(epoch, step)
        tmp = self.root / f".tmp-{final.name}"
        if accelerator.is_main_process:
            with writing(self.root):
                self.root.mkdir(parents=True, exist_ok=True)
            staging_dir(tmp)  # a new folder, whatever a killed write (or anything else) left at its name
        accelerator.wait_for_everyone()
        with writing(tmp):
            accelerator.save_state(str(tmp))
            if process_state is not None:
                torch.save(process_state, tmp / PROCESS_STATE_FILE.format(rank=accelerator.process_index))
            if accelerator.is_main_process:
                torch.save(extra_state, tmp / STATE_FILE)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            with writing(tmp):
                mode = file_mode()  # safetensors writes its files 0o600; the run's other files are 0o666 - umask
                for p in tmp.rglob("*"):
                    if p.is_file() and not p.is_symlink():
                        os.chmod(p, mode)
                write_manifest(tmp, num_processes=accelerator.num_processes, mid_epoch=step is not None)
                if final.exists() or final.is_symlink():  # re-saving an epoch (e.g. after resuming from an earlier one)
                    trash = self.root / f".old-{final.name}"
                    remove_leftover(trash)
                    os.replace(final, trash)
                    os.replace(tmp, final)
                    remove_leftover(trash)
                else:
                    os.replace(tmp, final)
                _fsync_dir(self.root)
                for old in self.list()[: -self.total_limit]:
                    remove_leftover(old)
        accelerator.wait_for_everyone()
        return final

    @staticmethod
    def load(accelerator, path: str | os.PathLike) -> dict[str, Any]:
        """Restore a checkpoint that :meth:`resolve` verified; a library error still names the checkpoint.

        Returns the run's state (:data:`STATE_FILE`); for a mid-epoch checkpoint, this process's own state is
        under ``"process_state"``."""
        path = Path(path)
        try:
            accelerator.load_state(str(path))
            state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)
            own = path / PROCESS_STATE_FILE.format(rank=accelerator.process_index)
            if own.is_file():
                state["process_state"] = torch.load(own, map_location="cpu", weights_only=True)
            return state
        except (RuntimeError, ValueError, KeyError, OSError, EOFError) as e:
            raise CheckpointError(
                f"cannot restore it into this run ({type(e).__name__}: {str(e)[:500]}); was it written by a run "
                "with another model or optimizer?"
            ) from e


class CheckpointError(TimmDropError, RuntimeError):
    """A checkpoint that fails verification or cannot be restored; the message names the file."""


MANIFEST = "manifest.json"


def _sha256(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def write_manifest(folder: Path, num_processes: int, mid_epoch: bool = False) -> None:
    """Record size and sha256 of every file under ``folder`` (flushed to disk first) in ``manifest.json``;
    ``mid_epoch``: the checkpoint needs every process's :data:`PROCESS_STATE_FILE` (verification checks it)."""
    import json

    files = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.name not in (MANIFEST, MANIFEST + ".tmp"):
            with open(p, "rb+") as f:
                os.fsync(f.fileno())
            files[p.relative_to(folder).as_posix()] = {"size": p.stat().st_size, "sha256": _sha256(p)}
    record = {"format": 1, "num_processes": num_processes, "files": files}
    if mid_epoch:
        record["mid_epoch"] = True
    replace_file(folder / MANIFEST, lambda f: f.write(json.dumps(record, indent=1).encode()), sync=True)
    _fsync_dir(folder)


def _mid_epoch(path: Path, manifest: dict[str, Any]) -> bool:
    named = _NAME.match(path.name)
    return bool(manifest.get("mid_epoch")) or (named is not None and named.group(2) is not None)


def is_mid_epoch(path: str | os.PathLike) -> bool:
    """Whether the (verified) checkpoint at ``path`` was taken inside an epoch: its manifest or its name says so.
    Only such a checkpoint has a data position; an epoch's end has none."""
    path = Path(path)
    return _mid_epoch(path, read_json(path / MANIFEST))


def _is_count(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _malformed_entry(rel: str, rec: Any) -> str | None:
    """What is wrong with one ``files`` entry of a manifest (None: a relative path inside the checkpoint, with an
    integer size and a sha256 hex string, as :func:`write_manifest` writes them)."""
    parts = Path(rel).parts
    if not parts or Path(rel).is_absolute() or ".." in parts:
        return "is not a path inside the checkpoint"
    if not isinstance(rec, dict):
        return f"is {rec!r}, not {{size, sha256}}"
    if not _is_count(rec.get("size")):
        return f"has size {rec.get('size')!r}, not a number of bytes"
    sha = rec.get("sha256")
    if not (isinstance(sha, str) and re.fullmatch(r"[0-9a-f]{64}", sha)):
        return f"has sha256 {sha!r}, not 64 hex digits"
    return None


def verify_checkpoint(path: str | os.PathLike, num_processes: int) -> str | None:
    """None if every file the manifest lists is there with its recorded size and checksum; else the problem,
    naming the file."""
    path = Path(path)
    mpath = path / MANIFEST
    if not mpath.is_file():
        return f"{mpath} is missing (the checkpoint was not completely written, or predates verified checkpoints)"
    try:
        manifest = read_json(mpath)
        files = manifest["files"]
        written_by = manifest["num_processes"]
        assert isinstance(files, dict) and files, "'files' is not a non-empty mapping"
        assert _is_count(written_by) and written_by, f"'num_processes' is {written_by!r}, not a positive integer"
    except (ValueError, KeyError, TypeError, AssertionError) as e:
        return f"{mpath} is unreadable or malformed ({type(e).__name__}: {e})"
    for rel, rec in files.items():
        problem = _malformed_entry(rel, rec)
        if problem is not None:
            return f"{mpath} is malformed: the entry {rel!r} {problem}"
        p = path / rel
        if p.is_symlink() or not p.is_file():
            return f"{p} is missing (listed in {MANIFEST})"
        size = p.stat().st_size
        if size != rec["size"]:
            return f"{p} has {size} bytes, {rec['size']} were written (truncated or replaced)"
        if _sha256(p) != rec["sha256"]:
            return f"{p} does not match its recorded sha256 (corrupted)"
    if STATE_FILE not in files:
        return f"{mpath} does not list {STATE_FILE}"
    if _mid_epoch(path, manifest):
        # a mid-epoch checkpoint continues each process at its own data position
        for rank in range(written_by):
            name = PROCESS_STATE_FILE.format(rank=rank)
            if name not in files:
                return f"{mpath} does not list {name} (a mid-epoch checkpoint needs every process's state)"
    if written_by != num_processes:
        return (
            f"written by {written_by} process(es), this run has {num_processes}: the per-process RNG states "
            "(random_states_*.pkl) would not continue the same run"
        )
    return None


# -- run directories ---------------------------------------------------------------------------------------


#: the largest marker or manifest read (a real one is a few KiB)
_JSON_LIMIT = 1 << 22


def read_json(path: Path) -> Any:
    """A small JSON file of the recipe's (marker, manifest); ``ValueError`` saying what is wrong with it (unreadable,
    too large, not JSON, nested too deeply for the parser)."""
    import json

    try:
        size = path.stat().st_size
        if size > _JSON_LIMIT:
            raise ValueError(f"{size} bytes, more than the {_JSON_LIMIT} a recipe's own file has")
        return json.loads(path.read_text())
    except RecursionError:
        raise ValueError("nested too deeply to be one of the recipe's files") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(str(e)) from e
