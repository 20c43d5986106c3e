"""Mid-epoch checkpoints (``checkpoint.every_steps``) and their exact resume.

The acceptance test kills a real training process with SIGKILL in the middle of an epoch, right after one of its
step checkpoints is complete, resumes it with ``--resume latest`` and compares the final weights (and EMA, and the
epoch's reported metrics) bit for bit with a run that was never interrupted and never wrote a step checkpoint. The
config exercises every piece of state a mid-epoch resume must carry: the data position and augmentation stream,
the global RNG (DropBlock masks), the LR schedule (cosine), a scheduled regularizer (DropBlock's linear ramp, moved
by the driver), LayerOut's frozen set of the current epoch (with its norm counters), EMA, gradient accumulation and
the partial epoch's loss/accuracy sums.

Runs are tiny (digits at 8x8 px, a CIFAR ResNet-20) so the file stays fast on 2 cores.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from scripts import kill_when, torchrun
from tiny import LINEAR_RAMP, dropblock_stage_rule, tiny_run, write_image_folder

import timm_drop  # noqa: F401  (registers the CIFAR models)
from timm_drop.training import ConfigError, Trainer, load_config
from timm_drop.training.checkpoint import CheckpointError, CheckpointManager, load_weights

REPO = Path(__file__).resolve().parents[2]

RUN = tiny_run(
    name="midepoch",
    seed=5,
    regularizer={"rules": [dropblock_stage_rule(0.3, [1, 2], schedule=LINEAR_RAMP)]},
    data={
        "batch_size": 8,
        "eval_batch_size": 32,
        "train_subset": 64,
        "eval_subset": 32,
        "augment": {"crop_padding": 1, "hflip": True, "cutout": 2},
    },
    optim={"momentum": 0.9, "weight_decay": 5e-4},
    sched={"name": "cosine"},
    # 8 micro-batches of 8 images, accumulated in pairs: 4 optimizer steps per epoch
    train={"grad_accum_steps": 2, "ema": {"enabled": True, "decay": 0.9}},
    # freeze_norm: the frozen layers' norms keep their statistics (and counters) for the epoch
    layerout={"freeze_probs": "random", "seed": 1, "freeze_norm": True},
    log={"log_interval": 1},
    checkpoint={"total_limit": 3, "every_steps": 1},
)

#: the step checkpoint the child is killed after: optimizer step 6 = the 2nd of epoch 2's 4 steps
TARGET = "epoch_0002_step_00000006"


def cfg_for(out: Path, **checkpoint):
    raw = json.loads(json.dumps(RUN))
    raw["output_dir"] = str(out)
    raw["checkpoint"].update(checkpoint)
    return load_config(raw)


def rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def ema_state(out: Path) -> dict[str, torch.Tensor]:
    state = torch.load(out / "checkpoints" / "epoch_0002" / "timm_drop_state.pt", weights_only=True)
    return state["ema"]


def assert_same_run(ref: Path, out: Path) -> None:
    a, b = load_weights(ref / "last_model.pth"), load_weights(out / "last_model.pth")
    assert a.keys() == b.keys()
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"weights differ after resume: {differ[:5]}"
    ea, eb = ema_state(ref), ema_state(out)
    assert ea.keys() == eb.keys() and all(torch.equal(ea[k], eb[k]) for k in ea)
    keys = ["epoch", "step", "train_loss", "train_top1", "eval_loss", "eval_top1", "ema_eval_loss", "lr"]
    keys += ["frozen_fraction", "reg_strength"]
    assert [[r[k] for k in keys] for r in rows(ref)] == [[r[k] for k in keys] for r in rows(out)]


def stop_after(trainer: Trainer, name: str) -> None:
    """Interrupt ``trainer`` (KeyboardInterrupt, in this process) right after it completes checkpoint ``name``."""
    real_save = trainer.ckpt.save

    def save_then_stop(*args, **kwargs):
        path = real_save(*args, **kwargs)
        if path.name == name:
            raise KeyboardInterrupt
        return path

    trainer.ckpt.save = save_then_stop


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The uninterrupted run, without any step checkpoint (writing one must not change the run either)."""
    out = tmp_path_factory.mktemp("midepoch") / "reference"
    Trainer(cfg_for(out, every_steps=None)).fit()
    return out


# The child trains through the public entry point named on its command line and, once the target step checkpoint
# is complete (renamed into place), announces it and waits to be killed: the kill lands mid-epoch, not racing
# the end of the epoch.
CHILD = textwrap.dedent(
    """
    import sys, time
    from timm_drop.training.checkpoint import CheckpointManager

    entry, cfg_file, sentinel, target = sys.argv[1:5]
    real_save = CheckpointManager.save

    def save_then_wait(self, *args, **kwargs):
        path = real_save(self, *args, **kwargs)
        if path.name == target:
            open(sentinel, "w").close()
            time.sleep(120)
        return path

    CheckpointManager.save = save_then_wait
    if entry == "cli":
        import runpy
        sys.argv = ["train.py", "--config", cfg_file]
        runpy.run_path(%r, run_name="__main__")
    else:
        from timm_drop.training import load_config, train
        train(load_config(cfg_file))
    """
)


def kill_mid_epoch(tmp_path: Path, entry: str) -> Path:
    out = tmp_path / "killed"
    cfg_file = tmp_path / "cfg.json"  # JSON is YAML
    cfg_file.write_text(json.dumps({**RUN, "output_dir": str(out)}))
    script = tmp_path / "child.py"
    script.write_text(CHILD % str(REPO / "recipes" / "train.py"))
    sentinel = tmp_path / "checkpointed"
    kill_when(sentinel, script, [entry, str(cfg_file), str(sentinel), TARGET], what=TARGET)
    return out


@pytest.mark.parametrize("entry", ["cli", "api"])
def test_kill_9_mid_epoch_then_resume_latest_ends_bit_identical(reference, tmp_path, entry):
    out = kill_mid_epoch(tmp_path, entry)
    names = [p.name for p in CheckpointManager(out).list()]
    # killed inside epoch 2: its end-of-epoch checkpoint and metrics row never happened
    assert names[-1] == TARGET and "epoch_0002" not in names
    assert [r["epoch"] for r in rows(out)] == [1]
    resumed = Trainer(cfg_for(out), resume="latest")
    resumed.setup()
    assert (resumed.state.epoch, resumed.state.step) == (1, 6)
    resumed.fit()
    assert resumed.state.epoch == 2 and resumed.state.step == 8
    assert_same_run(reference, out)


def test_interrupt_after_every_step_checkpoint_resumes_to_the_same_run(reference, tmp_path):
    """Stop the run right after a step checkpoint of the first and of the last epoch (the kill test: the middle)."""
    for stop_at in (1, 7):
        out = tmp_path / f"stop{stop_at}"
        trainer = Trainer(cfg_for(out)).setup()
        stop_after(trainer, f"epoch_{1 + (stop_at > 4):04d}_step_{stop_at:08d}")
        with pytest.raises(KeyboardInterrupt):
            trainer.fit()
        Trainer(cfg_for(out), resume="latest").fit()
        assert_same_run(reference, out)


def test_a_step_checkpoint_at_an_epochs_last_batch_resumes_into_that_epochs_end(reference, tmp_path):
    # checkpoint.every: 2 -> epoch 1 writes no epoch checkpoint, so step 4 (its last) gets a step checkpoint; the
    # resumed run has no batch left in epoch 1 and goes straight to its eval, metrics row and weights
    out = tmp_path / "run"
    trainer = Trainer(cfg_for(out, every=2, every_steps=4)).setup()
    stop_after(trainer, "epoch_0001_step_00000004")
    with pytest.raises(KeyboardInterrupt):
        trainer.fit()
    metrics = out / "metrics.jsonl"
    assert not metrics.exists() or not metrics.read_text().strip()  # epoch 1 never ended
    Trainer(cfg_for(out, every=2, every_steps=4), resume="latest").fit()
    assert_same_run(reference, out)


def test_step_checkpoints_are_listed_in_training_order_and_rotated_together(tmp_path):
    out = tmp_path / "run"
    Trainer(cfg_for(out, total_limit=100)).fit()
    names = [p.name for p in CheckpointManager(out).list()]
    # every optimizer step but the epoch ends, which the epoch checkpoints cover
    assert names == [
        "epoch_0001_step_00000001",
        "epoch_0001_step_00000002",
        "epoch_0001_step_00000003",
        "epoch_0001",
        "epoch_0002_step_00000005",
        "epoch_0002_step_00000006",
        "epoch_0002_step_00000007",
        "epoch_0002",
    ]
    limited = tmp_path / "limited"
    Trainer(cfg_for(limited, total_limit=3)).fit()
    assert [p.name for p in CheckpointManager(limited).list()] == names[-3:]


def test_resume_latest_falls_back_past_a_damaged_step_checkpoint(reference, tmp_path, capsys):
    out = tmp_path / "run"
    trainer = Trainer(cfg_for(out)).setup()
    stop_after(trainer, TARGET)
    with pytest.raises(KeyboardInterrupt):
        trainer.fit()
    # the per-process data/metrics state is covered by the manifest like every other file
    rank_file = out / "checkpoints" / TARGET / "timm_drop_rank_0.pt"
    rank_file.write_bytes(rank_file.read_bytes()[:-7])
    with pytest.raises(CheckpointError, match="timm_drop_rank_0.pt"):
        Trainer(cfg_for(out), resume=str(out / "checkpoints" / TARGET)).setup()
    resumed = Trainer(cfg_for(out), resume="latest")
    resumed.setup()
    said = capsys.readouterr().out
    assert f"{TARGET}/timm_drop_rank_0.pt" in said and "epoch_0002_step_00000005" in said
    assert resumed.state.step == 5
    resumed.fit()
    assert_same_run(reference, out)


def test_an_explicit_step_checkpoint_folder_needs_its_per_process_state(tmp_path):
    out = tmp_path / "run"
    trainer = Trainer(cfg_for(out)).setup()
    trainer.fit(max_epochs=1)
    ckpt = out / "checkpoints" / "epoch_0001_step_00000002"
    # a step checkpoint whose per-process state was never written (and so is not in its manifest)
    manifest = json.loads((ckpt / "manifest.json").read_text())
    del manifest["files"]["timm_drop_rank_0.pt"]
    (ckpt / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="timm_drop_rank_0.pt"):
        Trainer(cfg_for(out), resume=str(ckpt)).setup()


# -- the data position ------------------------------------------------------------------------------------------


def _batches(loader, epoch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    loader.set_epoch(epoch)
    return [(x.clone(), y.clone()) for x, y in loader]


def _assert_batches_equal(a, b) -> None:
    assert len(a) == len(b)
    for (xa, ya), (xb, yb) in zip(a, b):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def _loader_resumes_with_the_remaining_batches(make_loader, epoch: int = 1, done: int = 3) -> None:
    full = make_loader()
    torch.manual_seed(0)  # both runs start from the same process RNG
    expected = _batches(full, epoch)
    assert len(expected) > done + 1
    first = make_loader()
    torch.manual_seed(0)
    first.set_epoch(epoch)
    it = iter(first)
    for _ in range(done):
        next(it)
    state = first.state_dict()
    # without workers, image-folder transforms draw from the global RNG, which the checkpoint carries
    rng = torch.get_rng_state()
    assert state["epoch"] == epoch and state["batch"] == done
    resumed = make_loader()  # a fresh process's loader
    resumed.load_state_dict(state)
    torch.set_rng_state(rng)
    resumed.set_epoch(epoch)
    _assert_batches_equal(expected[done:], [(x.clone(), y.clone()) for x, y in resumed])
    # the position applies to that epoch only: the next epoch starts at its first batch again
    rng = torch.get_rng_state()
    following = _batches(full, epoch + 1)
    torch.set_rng_state(rng)
    _assert_batches_equal(following, _batches(resumed, epoch + 1))


def _train_loader(cfg):
    """The run's training loader, as the recipe builds it (a fresh one: another process's)."""
    from timm_drop.training.data import build_loaders

    t = cfg.train
    return build_loaders(
        cfg.data, device=torch.device("cpu"), seed=cfg.seed, batch_multiple=t.grad_accum_steps
    )[0]


def test_tensor_loader_resumes_with_exactly_the_remaining_batches_in_order(tmp_path):
    def make():
        return _train_loader(cfg_for(tmp_path / "d"))

    _loader_resumes_with_the_remaining_batches(make)


def _folder_cfg(tmp_path: Path, name: str, workers: int, **checkpoint):
    raw = json.loads(json.dumps(RUN))
    raw["output_dir"] = str(tmp_path / name)
    raw["data"] = {
        "dataset": "imagefolder",
        "root": str(tmp_path / "imgs"),
        "image_size": 8,
        "batch_size": 2,
        "eval_batch_size": 8,
        "num_workers": workers,
        "augment": {"random_resized_crop": True, "hflip": True, "crop_padding": 0, "cutout": 2},
    }
    raw["train"]["epochs"] = 1
    raw["checkpoint"].update(checkpoint, every_steps=2)
    return load_config(raw)


@pytest.mark.parametrize("workers", [0, 2])
def test_image_folder_loader_resumes_with_exactly_the_remaining_batches_in_order(tmp_path, workers):
    write_image_folder(tmp_path / "imgs", n=10, size=10)

    def make():
        return _train_loader(_folder_cfg(tmp_path, "f", workers))

    _loader_resumes_with_the_remaining_batches(make)


def _stop_workers(trainer: Trainer) -> None:
    # drop the loaders now: left to the cycle collector, persistent workers take seconds each to stop
    trainer.train_loader.loader = trainer.eval_loader.loader = None


def test_image_folder_run_with_workers_resumes_mid_epoch_bit_identical(tmp_path):
    write_image_folder(tmp_path / "imgs", n=10, size=10)
    ref = tmp_path / "ref"
    trainer = Trainer(_folder_cfg(tmp_path, "ref", 2))
    trainer.fit()
    _stop_workers(trainer)
    out = tmp_path / "cut"
    trainer = Trainer(_folder_cfg(tmp_path, "cut", 2)).setup()
    stop_after(trainer, "epoch_0001_step_00000002")
    with pytest.raises(KeyboardInterrupt):
        trainer.fit()
    # the interrupted run's workers are still alive (its loader is): the run directory must be released anyway
    resumed = Trainer(_folder_cfg(tmp_path, "cut", 2), resume="latest")
    resumed.fit()
    _stop_workers(trainer)
    _stop_workers(resumed)
    a, b = load_weights(ref / "last_model.pth"), load_weights(out / "last_model.pth")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["train_loss"] for r in rows(ref)] == [r["train_loss"] for r in rows(out)]


# -- config -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [0, -3, 1.5, "often", True])
def test_every_steps_must_be_a_positive_integer_or_null(tmp_path, bad):
    raw = json.loads(json.dumps(RUN))
    raw["output_dir"] = str(tmp_path / "x")
    raw["checkpoint"]["every_steps"] = bad
    with pytest.raises(ConfigError, match=r"checkpoint\.every_steps: must be"):
        load_config(raw)
    assert not (tmp_path / "x").exists()


def test_every_steps_defaults_to_epoch_checkpoints_only(tmp_path):
    raw = json.loads(json.dumps(RUN))
    del raw["checkpoint"]["every_steps"]
    raw["output_dir"] = str(tmp_path / "x")
    assert load_config(raw).checkpoint.every_steps is None


def test_dry_run_prints_the_checkpoint_cadence(tmp_path, capsys):
    info = Trainer(cfg_for(tmp_path / "dry", every_steps=3), dry_run=True).fit()
    said = capsys.readouterr().out
    assert "checkpoints: every 1 epoch(s) and every 3 optimizer steps" in said
    assert "keeps the newest 3" in said
    assert info["checkpoint_every_steps"] == 3
    none = Trainer(cfg_for(tmp_path / "dry2", every_steps=None), dry_run=True).fit()
    assert none["checkpoint_every_steps"] is None
    assert "checkpoints: every 1 epoch(s) (no mid-epoch checkpoints)" in capsys.readouterr().out


def test_layerout_state_restores_the_epochs_frozen_set_and_norm_counters():
    """LayerOut resumed mid-epoch freezes the same units and, at the epoch's end, restores the norm counters of
    the epoch's start (not those of the moment it was resumed)."""
    import timm

    from timm_drop.layerout import LayerOut

    def fresh():
        torch.manual_seed(0)
        model = timm.create_model("resnet20_cifar", pretrained=False, num_classes=10)
        lo = LayerOut(freeze_probs="random", seed=1, freeze_norm=True).bind(model)
        return model, lo

    model, lo = fresh()
    lo.start_epoch(3)
    frozen = lo.frozen_names
    assert frozen
    model.train()
    for _ in range(2):
        model(torch.randn(4, 3, 8, 8))
    state = lo.state_dict()
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    lo.end_epoch()
    expected = {k: v.clone() for k, v in model.state_dict().items()}

    model2, lo2 = fresh()
    model2.load_state_dict(weights)  # the checkpoint's model: counters as they were mid-epoch
    lo2.load_state_dict(state)
    assert lo2.frozen_names == frozen and lo2.epoch == 3
    lo2.end_epoch()
    got = model2.state_dict()
    assert all(torch.equal(expected[k], got[k]) for k in expected)


def test_a_step_checkpoint_inside_an_accumulation_window_is_refused(tmp_path):
    trainer = Trainer(cfg_for(tmp_path / "r")).setup()
    with pytest.raises(CheckpointError, match="accumulation"):
        trainer._save_step_checkpoint(0, batch=3, sums=None)
    assert not (tmp_path / "r" / "checkpoints").exists()


def test_a_training_loader_without_a_position_is_refused_before_any_work(tmp_path, monkeypatch):
    import timm_drop.training.data as data

    class Positionless:
        """A loader that cannot say where it stands in its epoch (a stream, say)."""

        def __init__(self, inner):
            self.inner, self.mean, self.std = inner, inner.mean, inner.std

        def __len__(self):
            return len(self.inner)

        def __iter__(self):
            return iter(self.inner)

        def set_epoch(self, epoch):
            self.inner.set_epoch(epoch)

    real = data.build_loaders

    def build(*args, **kwargs):
        train, evaluation, classes = real(*args, **kwargs)
        return Positionless(train), evaluation, classes

    monkeypatch.setattr(data, "build_loaders", build)
    with pytest.raises(ConfigError, match=r"checkpoint\.every_steps: the training loader .* cannot resume"):
        Trainer(cfg_for(tmp_path / "r")).setup()
    assert not (tmp_path / "r").exists()
    Trainer(cfg_for(tmp_path / "r", every_steps=None)).setup()  # epoch checkpoints need no position


def test_a_run_with_only_step_checkpoints_is_kept_for_resume_not_restarted(tmp_path):
    out = tmp_path / "run"
    trainer = Trainer(cfg_for(out)).setup()
    stop_after(trainer, "epoch_0001_step_00000002")
    with pytest.raises(KeyboardInterrupt):
        trainer.fit()
    with pytest.raises(ConfigError, match="already holds a run; pass --resume latest"):
        Trainer(cfg_for(out)).setup()
    assert [p.name for p in CheckpointManager(out).list()] == [
        "epoch_0001_step_00000001",
        "epoch_0001_step_00000002",
    ]


def test_overwrite_removes_step_checkpoints_too(tmp_path):
    out = tmp_path / "run"
    Trainer(cfg_for(out)).fit(max_epochs=1)
    assert any("_step_" in p.name for p in (out / "checkpoints").iterdir())
    Trainer(cfg_for(out, every_steps=None), overwrite=True).fit(max_epochs=1)
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["epoch_0001"]
    shutil.rmtree(out)


# -- two processes ------------------------------------------------------------------------------------------------


def _ddp_worker(out_dir: str) -> None:
    """In each of 2 torchrun processes: an uninterrupted run, the same run stopped after a mid-epoch checkpoint,
    and its resume; the per-process state (each rank's shard position and generators, its own partial sums)
    must bring both ranks back exactly."""
    from timm_drop.training import Trainer

    def cfg(name, **checkpoint):
        raw = json.loads(json.dumps(RUN))
        raw["output_dir"] = os.path.join(out_dir, name)
        raw["data"]["train_subset"] = (
            128  # 64 images a process: 4 optimizer steps per epoch, as in one process
        )
        raw["train"]["cpu"] = True
        raw["checkpoint"].update(checkpoint)
        return load_config(raw)

    ref = Trainer(cfg("ref", every_steps=None))
    ref.fit()
    cut = Trainer(cfg("cut")).setup()
    stop_after(cut, TARGET)
    try:
        cut.fit()
        raise AssertionError(f"the run was not stopped after {TARGET}")
    except KeyboardInterrupt:
        pass
    # process 0 has released the run directory's lock (fit's finally) before any process looks at it again
    cut.accelerator.wait_for_everyone()
    resumed = Trainer(cfg("cut"), resume="latest")
    resumed.setup()
    at = (resumed.state.epoch, resumed.state.step)
    resumed.fit()
    a, b = ref.unwrapped.state_dict(), resumed.unwrapped.state_dict()
    differ = []
    if ref.metrics is not None:
        timing = ("epoch_time_s", "train_images_per_s")
        ra, rb = ref.metrics.rows, resumed.metrics.rows
        # ema_eval_* too: checkpoints hold process 0's EMA, and every process evaluates process 0's EMA statistics
        differ = [
            (n, k, r[k], q.get(k))
            for n, (r, q) in enumerate(zip(ra, rb))
            for k in r
            if k not in timing and r[k] != q.get(k)
        ]
        differ += [] if len(ra) == len(rb) else [("rows", len(ra), len(rb))]
    result = {
        "rank": resumed.rank,
        "world": resumed.world,
        "resumed_at": at,
        "weights_equal": all(torch.equal(a[k], b[k]) for k in a),
        "rows_differ": differ,
    }
    Path(out_dir, f"result_{resumed.rank}.json").write_text(json.dumps(result))
    resumed.accelerator.wait_for_everyone()
    torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_two_processes_resume_mid_epoch_bit_identical(tmp_path):
    torchrun(__file__, [str(tmp_path)])
    results = [json.loads((tmp_path / f"result_{r}.json").read_text()) for r in range(2)]
    assert [r["world"] for r in results] == [2, 2]
    assert all(r["resumed_at"] == [1, 6] for r in results)
    assert all(r["weights_equal"] for r in results), results
    assert results[0]["rows_differ"] == [], results[0]["rows_differ"]
    timm_drop_rank_files = sorted(
        p.name for p in (tmp_path / "cut" / "checkpoints").glob("*_step_*/timm_drop_rank_*")
    )
    assert timm_drop_rank_files  # every kept step checkpoint has both processes' state
    assert len(timm_drop_rank_files) % 2 == 0


if __name__ == "__main__":
    _ddp_worker(sys.argv[1])


# -- resuming a resumed run ------------------------------------------------------------------------------------


def _cli_run(tmp_path: Path, **train) -> tuple[Path, list[str]]:
    """A config file for the recipe's command line: RUN over 3 epochs, a step checkpoint every step, all kept."""
    out = tmp_path / "run"
    raw = json.loads(json.dumps(RUN))
    raw["output_dir"] = str(out)
    raw["train"].update(epochs=3, **train)
    raw["checkpoint"].update(every_steps=1, total_limit=500)
    cfg_file = tmp_path / "cfg.json"  # JSON is YAML
    cfg_file.write_text(json.dumps(raw))
    return out, ["--config", str(cfg_file)]


def _keep(out: Path, checkpoints: list[str], metrics_lines: int) -> None:
    """What a run stopped at that point leaves: only ``checkpoints`` and the first ``metrics_lines`` rows."""
    for p in CheckpointManager(out).list():
        if p.name not in checkpoints:
            shutil.rmtree(p)
    lines = (out / "metrics.jsonl").read_text().splitlines(keepends=True)
    (out / "metrics.jsonl").write_text("".join(lines[:metrics_lines]))


def test_an_epoch_resumed_mid_way_ends_in_a_checkpoint_that_resumes_again(tmp_path, capsys):
    """The issue's dead end: resume from the last step checkpoint of epoch 2, finish the epoch, stop again before
    the next step checkpoint. The epoch-2 checkpoint written in between must resume (it once kept the stale data
    position, and both ``--resume latest`` and ``--resume <it>`` refused it), and the run ends bit-identical."""
    from scripts import load_script

    main = load_script("recipes/train.py").main
    out, args = _cli_run(tmp_path)
    assert main(args) == 0
    uninterrupted = load_weights(out / "last_model.pth")
    # stopped inside epoch 2 after its last step checkpoint (step 7 of 4 + 4 steps)
    _keep(out, ["epoch_0001", "epoch_0002_step_00000007"], metrics_lines=1)
    assert main([*args, "--resume", "latest"]) == 0
    epoch2 = out / "checkpoints" / "epoch_0002"
    state = torch.load(epoch2 / "timm_drop_state.pt", weights_only=True)
    # (the check of the written state comes last: first the dead end itself)
    stale = state["train_state"]["batch"]
    # stopped again inside epoch 3, before its first step checkpoint: epoch 2's end is the newest
    _keep(out, ["epoch_0001", "epoch_0002_step_00000007", "epoch_0002"], metrics_lines=2)
    capsys.readouterr()
    assert main([*args, "--resume", str(epoch2)]) == 0, capsys.readouterr().err
    final = load_weights(out / "last_model.pth")
    assert all(torch.equal(final[k], uninterrupted[k]) for k in uninterrupted)
    _keep(out, ["epoch_0001", "epoch_0002_step_00000007", "epoch_0002"], metrics_lines=2)
    assert main([*args, "--resume", "latest"]) == 0, capsys.readouterr().err
    assert f"resumed from {epoch2} at epoch 2" in capsys.readouterr().out
    final = load_weights(out / "last_model.pth")
    assert all(torch.equal(final[k], uninterrupted[k]) for k in uninterrupted)
    assert stale == 0  # the end of an epoch has no position inside an epoch


def test_an_epoch_checkpoint_with_a_stale_data_position_still_resumes(tmp_path):
    """Epoch checkpoints written before the fix carry the batch position of the step checkpoint the epoch was
    resumed from; the end of an epoch has none, so that number is ignored."""
    from timm_drop.training.checkpoint import STATE_FILE, write_manifest

    out = tmp_path / "run"
    Trainer(cfg_for(out)).fit(max_epochs=1)
    ckpt = out / "checkpoints" / "epoch_0001"
    state = torch.load(ckpt / STATE_FILE, weights_only=True)
    state["train_state"]["batch"] = 3
    torch.save(state, ckpt / STATE_FILE)
    write_manifest(ckpt, num_processes=1)
    resumed = Trainer(cfg_for(out), resume="latest").setup()
    assert (resumed.state.epoch, resumed.state.batch) == (1, 0)
    resumed.run_dir.release()


def test_resume_latest_falls_back_past_a_checkpoint_that_verifies_but_cannot_be_restored(tmp_path, capsys):
    """Every file matches its manifest, yet the checkpoint cannot continue this run (here: its data position
    belongs to another epoch). ``--resume latest`` says why and continues from the newest one that can."""
    from timm_drop.training.checkpoint import write_manifest

    out = tmp_path / "run"
    trainer = Trainer(cfg_for(out)).setup()
    stop_after(trainer, TARGET)
    with pytest.raises(KeyboardInterrupt):
        trainer.fit()
    ckpt = out / "checkpoints" / TARGET
    rank_file = ckpt / "timm_drop_rank_0.pt"
    own = torch.load(rank_file, weights_only=True)
    own["loader"]["epoch"] = 0  # a position in epoch 1, where the checkpoint says epoch 2
    torch.save(own, rank_file)
    write_manifest(ckpt, num_processes=1, mid_epoch=True)
    with pytest.raises(CheckpointError, match=TARGET):
        Trainer(cfg_for(out), resume=str(ckpt)).setup()
    capsys.readouterr()
    resumed = Trainer(cfg_for(out), resume="latest").setup()
    said = capsys.readouterr().out
    assert TARGET in said and "epoch_0002_step_00000005" in said and "epoch" in said
    assert resumed.state.step == 5
    resumed.run_dir.release()
