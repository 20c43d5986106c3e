"""Output-directory protection: the marker that makes a directory provably a run, the lock of the process
running it, and the checks before a run starts.

The marker (``.timm_drop_run.json``) lists the entries the recipe created (:class:`RunDir`): ``--overwrite``
removes only what it lists, and a directory without one (a ``config.yaml`` alone proves nothing) is never removed.
The lock (``.timm_drop_run.lock``, ``flock``) is held by the process running the run; the kernel releases it when
that process ends, however it ends. :func:`check_output_dir` decides what a new run may do with its directory.
The layout of a run directory is in :mod:`timm_drop.training.checkpoint`.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path
from typing import Any

from timm_drop.training.checkpoint import CheckpointManager, read_json
from timm_drop.training.config import ConfigError, diff_configs
from timm_drop.training.files import NOFOLLOW, remove_leftover, replace_file, writing

__all__ = ["LOCK", "MARKER", "RUN_ENTRIES", "RunDir", "check_output_dir"]

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
        # read-only: probing changes nothing (and works in a directory this user cannot write). A shared lock: it
        # conflicts with a run's exclusive one only, not with the probes of the launch's other processes, which
        # check the directory at the same moment
        with os.fdopen(os.open(lock, os.O_RDONLY | NOFOLLOW), "rb") as fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_SH | fcntl.LOCK_NB)
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
        for wait in (0.0, 0.05, 0.2, 0.5, None):  # another process's probe holds a shared lock for an instant
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if wait is None:
                    fh.close()
                    raise ConfigError(
                        f"output_dir: {str(self.path)!r} is in use by a run that is still running; refusing to "
                        "touch it"
                    ) from None
                time.sleep(wait)
        self._lock_fh = fh

    def release(self) -> None:
        if self._lock_fh is not None:
            import fcntl

            # unlock explicitly: forked data-loader workers still alive share the open file (and so the lock),
            # which closing it here alone would not release
            fcntl.flock(self._lock_fh, fcntl.LOCK_UN)
            self._lock_fh.close()
            self._lock_fh = None


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
