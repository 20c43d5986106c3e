"""Crash-safe epoch and mid-epoch checkpoints, and output-directory protection.

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

The marker is what makes a directory provably a run: ``--overwrite`` removes only what it lists, and a directory
without one (a ``config.yaml`` alone proves nothing) is never removed.

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
from timm_drop.training.config import ConfigError, diff_configs
from timm_drop.training.files import (
    NOFOLLOW,
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
    "RunDir",
    "agreed_problem",
    "check_output_dir",
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

#: the marker that makes a directory provably a timm_drop run: it lists what the recipe created there
MARKER = ".timm_drop_run.json"
#: held (``flock``) by the process running the run: the kernel releases it when that process ends, however it ends
LOCK = ".timm_drop_run.lock"
#: the folders the recipe creates, and the only entries inside them that ``remove_run`` removes
_RUN_FOLDERS = {
    "checkpoints": re.compile(r"^(\.tmp-|\.old-)?epoch_\d{4,}(_step_\d{8,})?$"),
    "masks": re.compile(r"^epoch_\d{3,}\.png$"),  # log.mask_every (training.mask_log)
    "trackers": re.compile(r"^timm_drop$"),  # log.trackers: Accelerate's run folder (setup.TRACKER_PROJECT)
}


def _atomic_suffixes(name: str) -> tuple[str, ...]:
    # the temporaries of the recipe's atomic writes (left behind by a kill mid-write)
    return (name, name + ".tmp") if not name.endswith(".png") else (name, name + ".tmp.png")


#: every entry the recipe may create at the top of a run directory; a marker can never name anything else
RUN_ENTRIES = frozenset(
    n
    for base in (
        *("config.yaml", "metrics.jsonl", "summary.csv", "curves.png", "result.json"),
        *(f"{kind}_model.{ext}" for kind in ("best", "last") for ext in ("pth", "safetensors")),
    )
    for n in _atomic_suffixes(base)
) | set(_RUN_FOLDERS)
# MetricsLog writes its temporaries with with_suffix(): metrics.jsonl.tmp / summary.csv.tmp (covered above)


class RunDir:
    """A run directory and the marker listing the entries the recipe created in it.

    ``claim(name)`` records an entry *before* the recipe creates it; ``remove_run()`` (``--overwrite``, or a
    start that never finished an epoch) removes exactly the claimed entries: never anything unlisted, never a
    symlink's target, and inside ``checkpoints/`` and ``masks/`` only what the recipe names there. A directory
    without a marker (made by hand, or by a version before markers) is never removed.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.marker = self.path / MARKER
        self._entries: list[str] | None = None
        self._lock_fh: Any = None

    def read_marker(self) -> dict[str, Any] | None:
        if self.marker.is_symlink() or not self.marker.is_file():
            return None
        try:
            data = read_json(self.marker)
        except ValueError as e:
            raise ConfigError(
                f"output_dir: {str(self.marker)!r} is unreadable ({e}); not touching {self.path}"
            ) from e
        entries = data.get("entries") if isinstance(data, dict) else None
        if not isinstance(entries, list) or not all(isinstance(e, str) for e in entries):
            raise ConfigError(f"output_dir: {str(self.marker)!r} is malformed; not touching {self.path}")
        # only names the recipe itself could have made; anything else in a (hand-edited) marker is ignored
        data["entries"] = [e for e in entries if e in RUN_ENTRIES]
        return data

    def start(self) -> None:
        """Begin a run here (main process): create the directory and a fresh marker (this process as owner)."""
        self.path.mkdir(parents=True, exist_ok=True)
        self._entries = []
        self._write()

    def adopt(self) -> None:
        """Continue a run here (resume): keep its marker; a run without one stays unmarked (never removable)."""
        data = self.read_marker()
        self._entries = None if data is None else data["entries"]
        if data is not None:
            self._write()  # this process now owns the run

    def claim(self, *names: str) -> None:
        if self._entries is None:
            return
        new = [n for n in names if n not in self._entries]
        if new:
            for n in new:
                if n not in RUN_ENTRIES:  # pragma: no cover - programming error
                    raise ValueError(f"{n!r} is not a run-directory entry")
            self._entries += new
            self._write()

    def _write(self) -> None:
        import json
        import socket

        assert self._entries is not None
        data = {
            "format": 1,
            "created_by": "timm_drop recipes (timm_drop.training)",
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "entries": self._entries,
        }
        replace_file(self.marker, lambda f: f.write(json.dumps(data, indent=1).encode()))

    def unlisted(self, data: dict[str, Any]) -> list[str]:
        listed = set(data["entries"]) | {MARKER, MARKER + ".tmp", LOCK}
        return sorted(p.name for p in self.path.iterdir() if p.name not in listed)

    def remove_run(self, data: dict[str, Any]) -> None:
        """Remove the entries ``data`` (the marker) lists, then the marker; everything else stays."""
        for name in data["entries"]:
            p = self.path / name
            if p.is_symlink() or (p.exists() and not p.is_dir()):
                p.unlink()  # a link is removed as a link: its target is never touched
            elif p.is_dir():
                if name not in _RUN_FOLDERS:  # pragma: no cover - every folder entry has its pattern
                    continue
                for child in p.iterdir():
                    if _RUN_FOLDERS[name].match(child.name):
                        remove_leftover(child)
                if not any(p.iterdir()):
                    p.rmdir()
        for name in (MARKER + ".tmp", MARKER):
            if (self.path / name).exists() or (self.path / name).is_symlink():
                (self.path / name).unlink()

    def owner(self, data: dict[str, Any]) -> str:
        """``"running"`` while a Trainer holds this run's lock (released when it ends, or when its process dies:
        an ``flock``), ``"stopped"`` otherwise; ``"unknown"`` for a run started on another host (a shared
        filesystem, where the lock proves nothing)."""
        import socket

        if data.get("host") != socket.gethostname():
            return "unknown"
        return "running" if self._lock_is_held() else "stopped"

    def _lock_is_held(self) -> bool:
        lock = self.path / LOCK
        if not lock.is_file() or lock.is_symlink():
            return False
        try:
            import fcntl
        except ImportError:  # pragma: no cover - no flock (Windows): nothing to probe
            return False
        # read-only: probing changes nothing (and works in a directory this user cannot write)
        with os.fdopen(os.open(lock, os.O_RDONLY | NOFOLLOW), "rb") as fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            fcntl.flock(fh, fcntl.LOCK_UN)
        return False

    def acquire(self) -> None:
        """Hold this run's lock until :meth:`release` or the end of this process (main process only)."""
        try:
            import fcntl
        except ImportError:  # pragma: no cover
            return
        lock = self.path / LOCK
        with writing(lock):
            if lock.is_symlink():  # never opened through: the recipe's lock is a plain file
                lock.unlink()
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | NOFOLLOW, 0o666)
        fh = os.fdopen(fd, "rb+")  # held open for the run's lifetime
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.close()
            raise ConfigError(
                f"output_dir: {str(self.path)!r} is in use by a run that is still running; refusing to touch it"
            ) from None
        self._lock_fh = fh

    def release(self) -> None:
        if self._lock_fh is not None:
            import fcntl

            # unlock explicitly: forked data-loader workers still alive share the open file (and so the lock),
            # which closing it here alone would not release
            fcntl.flock(self._lock_fh, fcntl.LOCK_UN)
            self._lock_fh.close()
            self._lock_fh = None


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


def _finished_any_epoch(out: Path) -> bool:
    # a mid-epoch checkpoint counts: it is progress that --resume can continue, not the debris of a failed start
    if CheckpointManager(out).list():
        return True
    metrics = out / "metrics.jsonl"
    return metrics.is_file() and any(line.strip() for line in metrics.read_text().splitlines())


def _check_writable(out: Path) -> None:
    """:class:`ConfigError` unless this process can create files in ``out`` (or in the folder it will be made in)."""
    where = out
    while not where.exists() and where != where.parent:
        where = where.parent
    if os.access(where, os.W_OK | os.X_OK):
        return
    try:
        read_only = bool(os.statvfs(where).f_flag & os.ST_RDONLY)
    except OSError:  # pragma: no cover - no statvfs
        read_only = False
    why = "it is on a read-only file system" if read_only else "this user has no write permission there"
    raise ConfigError(f"output_dir: cannot write into {str(where)!r}: {why}; choose another output_dir")


def _check_resume_config(out: Path, saved: Path, config: dict) -> None:
    """:class:`ConfigError` unless ``config`` continues the run whose resolved config is ``saved``."""
    from timm_drop.yaml_io import YAMLInputError, load_yaml_bounded

    try:
        old = load_yaml_bounded(saved.read_text(), str(saved))[0] or {}
    except (OSError, UnicodeDecodeError, YAMLInputError) as e:
        raise ConfigError(f"output_dir: cannot read the saved config ({e}); cannot check the resume") from e
    if not isinstance(old, dict):
        raise ConfigError(f"output_dir: {str(saved)!r} is not a config mapping; cannot check the resume")
    # output_dir: the directory being resumed *is* the run, however it is spelled (absolute, ./runs/x, moved)
    ignore = ("log.", "checkpoint.", "description", "data.num_workers", "output_dir")
    diffs = [k for k in diff_configs(old, config) if not k.startswith(ignore)]
    if diffs:
        raise ConfigError(
            f"output_dir: {str(out)!r} holds a run with a different config (differs in {diffs}); resuming it with this "
            "config would not continue the same run. Use another output_dir or the saved config.yaml"
        )


def check_output_dir(
    output_dir: str | os.PathLike, config: dict, *, overwrite: bool, resume: str | None
) -> str:
    """Decide what to do with ``output_dir`` before any work starts (read-only; safe to run on every rank).

    Returns ``"new"`` (absent or empty), ``"overwrite"`` (a previous run's directory, to be replaced: only what
    its marker lists), ``"restart"`` (a run of ours that never finished an epoch: the debris of a failed start,
    replaced the same way) or ``"resume"`` (this run's own directory). Raises :class:`ConfigError` when anything
    not provably ours would be clobbered. Nothing is changed here: the caller acts only after every other check.
    """
    out = Path(output_dir)
    if overwrite and resume is not None:
        raise ConfigError("--overwrite and --resume contradict each other: pick one")
    if not out.exists() or (out.is_dir() and all(p.name == LOCK for p in out.iterdir())):
        if resume == "latest":
            raise FileNotFoundError(f"--resume latest: output_dir {str(out)!r} holds no run to resume")
        _check_writable(out)
        return "new"
    if not out.is_dir():
        raise ConfigError(f"output_dir: {str(out)!r} exists and is not a directory")
    _check_writable(out)
    run = RunDir(out)
    marker = run.read_marker()
    saved = out / "config.yaml"
    if marker is None and not saved.is_file():
        raise ConfigError(
            f"output_dir: {str(out)!r} is not empty and holds no timm_drop run (no {MARKER}, no config.yaml); "
            "refusing to write into it (choose another output_dir)"
        )
    owner = None if marker is None else run.owner(marker)
    if owner == "running":  # resuming it too: two processes would write the same files
        raise ConfigError(
            f"output_dir: {str(out)!r} is in use by a run that is still running (process {marker.get('pid')} "
            "holds its lock); refusing to touch it (choose another output_dir)"
        )
    if resume is None:
        if marker is None:
            what = "--overwrite cannot replace it" if overwrite else "refusing to replace it"
            raise ConfigError(
                f"output_dir: {str(out)!r} holds a config.yaml but no {MARKER} listing what a timm_drop run created "
                f"there, so nothing in it is provably ours: {what}. Remove what you no longer need yourself, or "
                "choose another output_dir"
            )
        clash = sorted(set(run.unlisted(marker)) & RUN_ENTRIES)
        if clash:
            raise ConfigError(
                f"output_dir: {str(out)!r} holds {clash}, which its {MARKER} does not list as created by the run; "
                "refusing to replace anything there (move them away or choose another output_dir)"
            )
        if overwrite:
            return "overwrite"
        if not _finished_any_epoch(out):
            if owner == "stopped":
                return "restart"
            raise ConfigError(
                f"output_dir: {str(out)!r} holds a run started on host {marker.get('host')!r} that has not finished "
                "an epoch; it may still be running there. Pass --overwrite to replace it (or choose another "
                "output_dir)"
            )
        raise ConfigError(
            f"output_dir: {str(out)!r} already holds a run; pass --resume latest to continue it or --overwrite to "
            "replace it (or choose another output_dir)"
        )
    if not saved.is_file():
        raise ConfigError(f"output_dir: {str(out)!r} holds no config.yaml; there is no run here to resume")
    _check_resume_config(out, saved, config)
    return "resume"
