"""Load the repository's scripts (recipes, benchmarks, examples) as modules, the way the tests exercise them."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[1]


def load_script(path: str | Path, name: str | None = None) -> ModuleType:
    """Execute the script at ``path`` (relative paths: from the repository root) as a fresh module.

    The module is registered in ``sys.modules`` under ``name`` while it runs, so dataclasses and pickling can
    resolve it.
    """
    path = Path(path) if Path(path).is_absolute() else REPO / path
    name = name or f"timm_drop_script_{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def child_env() -> dict[str, str]:
    """The environment for a child Python process that must compute bit-identically to this one: the same
    intra-op thread count (reductions split differently across threads) and this checkout's ``timm_drop``."""
    import os

    import torch

    return {
        **os.environ,
        "OMP_NUM_THREADS": str(torch.get_num_threads()),
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }


def kill_when(sentinel: Path, script: Path, args: list[str], *, what: str, timeout: float = 240.0) -> None:
    """Run ``script`` with ``args`` in a fresh interpreter (spawn-safe: nothing inherited from this process's state)
    and SIGKILL it as soon as it creates ``sentinel``; fails if it ends first or takes over ``timeout`` seconds.
    ``what`` names the moment the sentinel marks, for the failure messages."""
    import signal
    import subprocess
    import time

    child = subprocess.Popen([sys.executable, str(script), *args], cwd=script.parent, env=child_env())
    try:
        deadline = time.time() + timeout
        while not sentinel.exists():
            assert child.poll() is None, f"the child run ended (rc {child.returncode}) before {what}"
            assert time.time() < deadline, f"no {what} within {timeout:.0f} s"
            time.sleep(0.05)
        child.send_signal(signal.SIGKILL)
        assert child.wait(30) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(30)


def torchrun(script: Path | str, args: list[str], *, nproc: int = 2, timeout: float = 420) -> str:
    """``torchrun --standalone --nproc_per_node nproc script *args`` on CPU: gloo on the loopback, one thread a
    process, this checkout's ``timm_drop`` and ``tests/`` importable. Returns the launch's output (stdout and
    stderr); fails the calling test when the launch fails or hangs past ``timeout`` (its processes are stopped)."""
    import os
    import signal
    import subprocess

    import pytest

    env = dict(
        os.environ,
        OMP_NUM_THREADS="1",
        GLOO_SOCKET_IFNAME="lo",
        PYTHONUNBUFFERED="1",
        PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "tests"), os.environ.get("PYTHONPATH", "")]),
    )
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
    proc = subprocess.Popen(
        [*cmd, str(script), *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        # torchrun starts each worker in a session of its own and stops them itself on SIGTERM
        proc.terminate()
        try:
            output, _ = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            output, _ = proc.communicate()
        pytest.fail(f"the processes hung (stopped after {timeout:.0f} s):\n{output[-6000:]}")
    assert proc.returncode == 0, output[-8000:]
    return output
