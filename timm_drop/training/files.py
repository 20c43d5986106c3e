"""Writing a run's files: never through a path that is already there, never half-written, with the usual mode.

Every file the recipe writes into a run directory goes through :func:`replace_file`: the content is written to a
temporary beside it, created exclusively (``O_CREAT | O_EXCL | O_NOFOLLOW``: an existing path, and a symlink above
all, is never opened), then renamed over the file (``os.replace``, atomic on one filesystem; it replaces a link
there as a link). The temporary's name belongs to the recipe (``<name>.tmp``, listed in the run's marker before it
is made), so whatever sits at that name (the debris of a killed write, or a planted link) is removed as an entry
(a link as a link, its target untouched) before the temporary is created. Files get the mode a plain ``open``
gives them (``0o666`` less the umask), also those that a library writes with its own private temporary
(safetensors: ``0o600``).

A write that fails is turned into a :class:`WriteError` naming the file and the reason, with "no space left on
device" said as such (torch's zip writer reports a full disk as ``unexpected pos ...``, safetensors as
``StorageFull``), and the temporary is removed: what was there before stays intact.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

from timm_drop.errors import TimmDropError

__all__ = [
    "NOFOLLOW",
    "WriteError",
    "describe",
    "disk_full",
    "file_mode",
    "open_exclusive",
    "remove_leftover",
    "replace_file",
    "replace_with",
    "staging_dir",
    "writing",
]

#: ``open`` flags: never through a symlink at the last component (0 where the platform has no such flag)
NOFOLLOW = getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
_CREATE = os.O_CREAT | os.O_EXCL | NOFOLLOW


class WriteError(TimmDropError, RuntimeError):
    """A file of the run could not be written (no space left, read-only, something in the way); names the file."""


def file_mode() -> int:
    """The mode ``open()`` gives a new file: ``0o666`` less the process's umask."""
    try:  # Linux states the umask; setting it to read it would briefly change it for every thread
        with open("/proc/self/status") as f:
            mask = next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError, IndexError):
        mask = os.umask(0)
        os.umask(mask)
    return 0o666 & ~mask


def open_exclusive(path: str | os.PathLike, flags: int = os.O_WRONLY) -> int:
    """A new file at ``path``, never an existing one and never through a symlink (``FileExistsError`` otherwise)."""
    return os.open(path, flags | _CREATE, 0o666)


def _clear(path: Path) -> None:
    """Remove what sits at a name the recipe owns (a file, or a link as a link); a folder there is in the way."""
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        path.unlink()
    elif path.exists():
        raise WriteError(f"{path} is a folder where the recipe writes a temporary file; move it away")


def replace_file(
    path: str | os.PathLike,
    write: Callable[[IO[bytes]], Any],
    *,
    temp: str | os.PathLike | None = None,
    sync: bool = False,
) -> None:
    """Write ``path`` atomically: ``write(f)`` fills a fresh temporary (``temp``, default ``<path>.tmp``) that is
    then renamed over ``path``; ``sync``: flushed to the disk before the rename."""
    path = Path(path)
    tmp = Path(temp) if temp is not None else path.with_name(path.name + ".tmp")
    with writing(path):
        _clear(tmp)
        try:
            with os.fdopen(open_exclusive(tmp), "wb") as f:
                write(f)
                if sync:
                    f.flush()
                    os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise


def replace_with(path: str | os.PathLike, save: Callable[[str], Any]) -> None:
    """Like :func:`replace_file` for a library that writes a path itself, privately and atomically (safetensors'
    ``save_file``: its own exclusive temporary, renamed over the name): ``save(tmp)``, then the usual mode, then
    the rename."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with writing(path):
        _clear(tmp)
        try:
            save(str(tmp))
            if tmp.is_symlink() or not tmp.is_file():  # pragma: no cover - a library that followed a link
                raise WriteError(f"{tmp} is not the file just written")
            os.chmod(tmp, file_mode())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise


def remove_leftover(path: Path) -> None:
    """Remove an entry the recipe made (a checkpoint folder, a staging folder): a link as a link, never what it
    points to."""
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        path.unlink()
    elif path.exists():
        shutil.rmtree(path)


def staging_dir(path: Path) -> None:
    """A fresh, empty folder at ``path`` (a checkpoint being written), replacing the leftover of a killed write."""
    with writing(path):
        remove_leftover(path)
        path.mkdir()


#: how the writers the recipe uses word a full disk (ENOSPC, EDQUOT: os error 28, 122) and a file-size limit (EFBIG:
#: 27); torch's zip writer only says that a write came up short (``unexpected pos``, ``file write failed``)
_NO_SPACE = ("no space left", "storagefull", "os error 28", "quota exceeded", "os error 122")
_TOO_LARGE = ("file too large", "os error 27")
_SHORT = ("unexpected pos", "file write failed")


def _chain(exc: BaseException | None) -> Iterator[BaseException]:
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def _says(exc: BaseException, codes: tuple[int, ...], words: tuple[str, ...]) -> bool:
    return any(
        (isinstance(e, OSError) and e.errno in codes) or any(w in str(e).lower() for w in words) for e in _chain(exc)
    )


def disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` (or what caused it) is a write refused for space or size, in any writer's wording."""
    return _says(exc, (errno.ENOSPC, errno.EDQUOT, errno.EFBIG), _NO_SPACE + _TOO_LARGE + _SHORT)


def describe(exc: BaseException) -> str:
    """Why a write failed, in words: "no space left on device" for a full disk however the writer put it."""
    if _says(exc, (errno.EFBIG,), _TOO_LARGE):
        return "file too large (the file-size limit, ulimit -f)"
    if _says(exc, (errno.ENOSPC, errno.EDQUOT), _NO_SPACE):
        return "no space left on device"
    if _says(exc, (), _SHORT):
        import resource

        limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
        if limit == resource.RLIM_INFINITY:
            return "no space left on device (a write came up short)"
        return f"no space left on device, or the file-size limit of {limit} bytes (ulimit -f): a write came up short"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return f"{type(exc).__name__}: {exc}"


@contextlib.contextmanager
def writing(path: str | os.PathLike) -> Iterator[None]:
    """Turn a failed write of ``path`` (an ``OSError``, or a library's error for a full disk) into a
    :class:`WriteError` naming it."""
    try:
        yield
    except WriteError:
        raise
    except Exception as e:
        if isinstance(e, OSError) or disk_full(e):
            raise WriteError(f"cannot write {path}: {describe(e)}") from e
        raise
