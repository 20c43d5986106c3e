"""Resuming a multi-process run: every process takes the same decisions, so none goes on alone into a collective.

A process's own view of the run directory can differ from the others' (a loaded machine: process 0 still holding
the run's lock while process 1 already starts the next slice of a time-sliced job; a file that one node sees
damaged). Every decision taken before the processes meet in a collective (the output-directory check, the listing
of checkpoints, their verification, their restore) is therefore agreed: the processes exchange what each saw and
all continue from the same checkpoint, or all stop with the same error naming the file and the process. A process
that decided alone left the others waiting in a collective it never entered ("Connection closed by peer"), or
worse, resumed from another checkpoint than they did.

Each scenario below makes one process's view differ on purpose (a slow lock release, a failed verification or
restore, a refused output directory) in 2 real gloo processes started by torchrun.
"""

from __future__ import annotations

import contextlib
import io
import json
import sys
import time
from pathlib import Path

import pytest
from scripts import torchrun
from tiny import tiny_run

#: the newest checkpoint of the run, the one process 1 sees damaged in the scenarios below
NEWEST = "epoch_0002"
SCENARIOS = ("time_slice", "latest_seen_damaged", "path_seen_damaged", "latest_not_restorable", "output_dir")


def _cfg(out: Path):
    from timm_drop.training import load_config

    return load_config(tiny_run(name="agree", seed=3, output_dir=str(out), train={"cpu": True}))


def _two_epochs(out: Path) -> None:
    """The run the resume scenarios start from: epochs 1 and 2 checkpointed (``epoch_0001``, ``epoch_0002``)."""
    from timm_drop.training import Trainer

    if not (out / "checkpoints" / NEWEST).is_dir():
        Trainer(_cfg(out), resume="latest" if (out / "checkpoints").is_dir() else None).fit()


def _setup(out: Path, resume: str, fit: bool = False) -> dict:
    """``Trainer(resume=...).setup()`` on this process (``fit``: and the rest of the run): the epoch it resumed
    from and what process 0 printed, or the error."""
    from timm_drop.training import Trainer

    said = io.StringIO()
    trainer = None
    try:
        with contextlib.redirect_stdout(said):
            trainer = Trainer(_cfg(out), resume=resume).setup()
            epoch = trainer.state.epoch
            if fit:
                trainer.fit()
        return {"epoch": epoch, "said": said.getvalue()}
    except Exception as e:  # noqa: BLE001 - the scenario reports it
        return {"error": type(e).__name__, "message": str(e), "said": said.getvalue()}
    finally:
        if trainer is not None:
            trainer.run_dir.release()


@contextlib.contextmanager
def _on_process(rank: int, which: int, owner: object, name: str, replacement):
    """``owner.name`` replaced by ``replacement`` on process ``which`` only (this is process ``rank``)."""
    kept = getattr(owner, name)
    if rank == which:
        setattr(owner, name, replacement)
    try:
        yield kept
    finally:
        setattr(owner, name, kept)


def _time_slice(out: Path, rank: int) -> dict:
    """One epoch, then the next slice in the same processes, while process 0 is slow to release the run's lock."""
    from timm_drop.training import Trainer
    from timm_drop.training.run_dir import RunDir

    def slow_release(self):
        if self._lock_fh is not None:
            time.sleep(3)  # a loaded machine: the other process is long past the end of the run
        release(self)

    with _on_process(rank, 0, RunDir, "release", slow_release) as release:
        Trainer(_cfg(out)).fit(max_epochs=1)
    return _setup(out, "latest", fit=True)


def _seen_damaged(out: Path, rank: int, resume: str) -> dict:
    import timm_drop.training.checkpoint as checkpoint

    def damaged_here(path, num_processes):
        if Path(path).name == NEWEST:
            return f"{Path(path) / 'model.safetensors'} does not match its recorded sha256 (corrupted)"
        return verify(path, num_processes)

    with _on_process(rank, 1, checkpoint, "verify_checkpoint", damaged_here) as verify:
        return _setup(out, resume)


def _latest_not_restorable(out: Path, rank: int) -> dict:
    from timm_drop.training import Trainer
    from timm_drop.training.checkpoint import CheckpointError

    def refuse_newest(self, path):
        if Path(path).name == NEWEST:
            raise CheckpointError("its state does not fit this run (simulated on this process)")
        restore(self, path)

    with _on_process(rank, 1, Trainer, "_restore", refuse_newest) as restore:
        return _setup(out, "latest")


def _output_dir_refused(out: Path, rank: int) -> dict:
    import timm_drop.training.setup as setup
    from timm_drop.training import ConfigError

    def refuse(output_dir, *args, **kwargs):
        raise ConfigError(f"output_dir: {str(output_dir)!r} is in use (simulated on this process)")

    with _on_process(rank, 1, setup, "check_output_dir", refuse):
        return _setup(out, "latest")


def _worker(out_dir: str, scenarios: list[str]) -> None:
    import torch.distributed as dist
    from accelerate import PartialState

    state = PartialState(cpu=True)
    rank = state.process_index
    run = Path(out_dir) / "run"
    results = {}
    for name in scenarios:
        if name == "time_slice":
            results[name] = _time_slice(run, rank)
        else:
            state.wait_for_everyone()
            _two_epochs(run)
            state.wait_for_everyone()
            if name == "latest_seen_damaged":
                results[name] = _seen_damaged(run, rank, "latest")
            elif name == "path_seen_damaged":
                results[name] = _seen_damaged(run, rank, str(run / "checkpoints" / NEWEST))
            elif name == "latest_not_restorable":
                results[name] = _latest_not_restorable(run, rank)
            else:
                results[name] = _output_dir_refused(run, rank)
        # the next scenario starts only once process 0 has let go of the run (whatever this one did)
        state.wait_for_everyone()
    Path(out_dir, f"rank_{rank}.json").write_text(json.dumps(results))
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.slow
def test_processes_whose_views_differ_agree_on_the_checkpoint_or_stop_together(tmp_path):
    torchrun(__file__, [str(tmp_path), *SCENARIOS], timeout=300)
    ranks = [json.loads((tmp_path / f"rank_{r}.json").read_text()) for r in range(2)]
    newest = str(tmp_path / "run" / "checkpoints" / NEWEST)

    # the time-sliced job (benchmarks/fsdp_smoke.py's pattern): the next slice starts once the first has let go
    assert [r["time_slice"].get("epoch") for r in ranks] == [1, 1], [r["time_slice"] for r in ranks]

    # process 1 sees the newest checkpoint damaged: both continue from the older one, and process 0 says why
    seen = [r["latest_seen_damaged"] for r in ranks]
    assert [s.get("epoch") for s in seen] == [1, 1], seen
    warning = seen[0]["said"]
    assert newest in warning and "corrupted" in warning and "process 1" in warning, warning

    # the same checkpoint asked for by name: every process refuses it, with the same message naming file and process
    refused = [r["path_seen_damaged"] for r in ranks]
    assert [s.get("error") for s in refused] == ["CheckpointError", "CheckpointError"], refused
    assert refused[0]["message"] == refused[1]["message"]
    assert "model.safetensors" in refused[0]["message"] and "process 1" in refused[0]["message"]

    # a checkpoint that only process 1 cannot restore: both move on to the older one
    moved = [r["latest_not_restorable"] for r in ranks]
    assert [s.get("epoch") for s in moved] == [1, 1], moved
    assert "simulated on this process" in moved[0]["said"] and "process 1" in moved[0]["said"]

    # an output directory that only process 1 refuses: every process stops with that refusal
    stopped = [r["output_dir"] for r in ranks]
    assert [s.get("error") for s in stopped] == ["ConfigError", "ConfigError"], stopped
    assert all("simulated on this process" in s["message"] and "process 1" in s["message"] for s in stopped)


if __name__ == "__main__":
    _worker(sys.argv[1], sys.argv[2:] or list(SCENARIOS))
