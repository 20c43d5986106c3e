"""Run directories: --overwrite removes only what a timm_drop run recorded creating, only after every check;
failed starts leave nothing that blocks the corrected rerun."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from scripts import load_script

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = str(REPO / "recipes" / "configs" / "quickstart.yaml")
# the quickstart cut to a few seconds: 64 digits at 8 px, one epoch
FAST = [
    "data.image_size=8",
    "data.train_subset=64",
    "data.eval_subset=32",
    "data.batch_size=32",
    "data.augment.crop_padding=1",
    "regularizer.rules.0.stage_params={1: {block_size: 3}, 2: {block_size: 3}, 3: {block_size: 1}}",
    "train.epochs=2",
    "sched.warmup_epochs=0",
    "log.progress_bar=false",
    "log.plot=false",
    "checkpoint.total_limit=2",
]


def train_cli():
    return load_script("recipes/train.py").main


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_overwrite_never_deletes_a_directory_that_is_not_a_timm_drop_run(in_tmp, capsys):
    # the reproduction: a config.yaml alone does not make a directory ours
    (in_tmp / "d" / "src").mkdir(parents=True)
    (in_tmp / "d" / "config.yaml").write_text("lr: 1\n")
    (in_tmp / "d" / "src" / "main.py").write_text("keep\n")
    rc = train_cli()(["--config", QUICKSTART, "--overwrite", "output_dir=d", "model.name=bogus"])
    assert rc == 2
    assert (in_tmp / "d" / "src" / "main.py").read_text() == "keep\n"
    assert (in_tmp / "d" / "config.yaml").read_text() == "lr: 1\n"
    # even with a valid config: no marker, nothing is provably ours, nothing is removed
    rc = train_cli()(["--config", QUICKSTART, "--overwrite", "output_dir=d", *FAST])
    err = capsys.readouterr().err
    assert rc == 2 and "d" in err and ".timm_drop_run.json" in err
    assert (in_tmp / "d" / "src" / "main.py").read_text() == "keep\n"
    assert (in_tmp / "d" / "config.yaml").read_text() == "lr: 1\n"


def test_overwrite_removes_only_the_listed_entries_after_every_check(in_tmp, capsys):
    main = train_cli()
    assert main(["--config", QUICKSTART, "output_dir=r", *FAST, "train.epochs=1", "log.mask_every=1"]) == 0
    run = in_tmp / "r"
    marker = json.loads((run / ".timm_drop_run.json").read_text())
    made = {"config.yaml", "metrics.jsonl", "checkpoints", "result.json", "last_model.pth", "masks"}
    assert made <= set(marker["entries"]) and (run / "masks" / "epoch_001.png").is_file()
    (run / "masks" / "my_figure.png").write_text("mine\n")
    # user files placed in the run afterwards, and a symlink the run's marker lists
    (run / "notes.txt").write_text("mine\n")
    outside = in_tmp / "outside"
    outside.mkdir()
    (outside / "precious.txt").write_text("keep\n")
    (run / "checkpoints" / "my_analysis").mkdir()
    (run / "best_model.pth").unlink()
    os.symlink(outside, run / "best_model.pth")
    first_config = (run / "config.yaml").read_text()

    # a bad config is refused before anything is removed
    assert main(["--config", QUICKSTART, "--overwrite", "output_dir=r", *FAST, "model.name=bogus"]) == 2
    assert "model.name" in capsys.readouterr().err
    assert (run / "config.yaml").read_text() == first_config and (run / "metrics.jsonl").is_file()
    assert (run / "checkpoints" / "epoch_0001").is_dir()

    assert (
        main(["--config", QUICKSTART, "--overwrite", "output_dir=r", *FAST, "train.epochs=1", "seed=5"]) == 0
    )
    assert (run / "notes.txt").read_text() == "mine\n"
    assert (run / "checkpoints" / "my_analysis").is_dir()
    assert (run / "masks" / "my_figure.png").read_text() == "mine\n"
    assert not (run / "masks" / "epoch_001.png").exists()  # this run draws no masks; the old figure is gone
    assert (outside / "precious.txt").read_text() == "keep\n"  # the link was removed as a link
    assert "seed: 5" in (run / "config.yaml").read_text()
    assert len([ln for ln in (run / "metrics.jsonl").read_text().splitlines() if ln]) == 1


def test_overwrite_refuses_when_an_unlisted_entry_would_be_replaced(in_tmp, capsys):
    main = train_cli()
    assert main(["--config", QUICKSTART, "output_dir=r", *FAST, "train.epochs=1", "log.plot=false"]) == 0
    (in_tmp / "r" / "curves.png").write_text("not ours")  # not listed (plot was off)
    assert main(["--config", QUICKSTART, "--overwrite", "output_dir=r", *FAST, "train.epochs=1"]) == 2
    assert "curves.png" in capsys.readouterr().err
    assert (in_tmp / "r" / "curves.png").read_text() == "not ours"
    assert (in_tmp / "r" / "metrics.jsonl").is_file()


@pytest.mark.parametrize(
    "bad,field",
    [
        (["model.name=bogus_net"], "model.name"),
        (["seed=-1"], "seed"),
        (["seed=4294967296"], "seed"),
        (["data.batch_size=1000"], "data.batch_size"),
        (["--resume", "nowhere/epoch_0003"], "nowhere/epoch_0003"),
    ],
)
def test_a_failed_start_creates_nothing_and_the_corrected_rerun_runs(in_tmp, capsys, bad, field):
    main = train_cli()
    assert main(["--config", QUICKSTART, "output_dir=r", *FAST, "train.epochs=1", *bad]) == 2
    err = capsys.readouterr().err
    assert field in err and "Traceback" not in err
    assert not (in_tmp / "r").exists()
    assert main(["--config", QUICKSTART, "output_dir=r", *FAST, "train.epochs=1"]) == 0


def test_a_start_that_failed_inside_the_first_epoch_does_not_block_the_corrected_rerun(in_tmp, capsys):
    main = train_cli()
    # diverges in epoch 1: the run directory exists, but no epoch finished and no checkpoint was written
    assert main(["--config", QUICKSTART, "output_dir=r", *FAST, "train.epochs=1", "optim.lr=1e30"]) == 3
    err = capsys.readouterr().err
    assert "non-finite training loss" in err and "no checkpoint was written yet" in err
    assert "--resume latest" not in err  # there is nothing to resume
    (in_tmp / "r" / "notes.txt").write_text("mine\n")
    assert main(["--config", QUICKSTART, "output_dir=r", *FAST, "train.epochs=1"]) == 0
    out = capsys.readouterr().out
    assert "never finished an epoch" in out
    assert (in_tmp / "r" / "notes.txt").read_text() == "mine\n"
    assert "optim:\n  name: sgd\n  lr: 0.05" in (in_tmp / "r" / "config.yaml").read_text()


def test_resume_path_from_another_model_is_refused_before_creating_anything(in_tmp, capsys):
    main = train_cli()
    assert main(["--config", QUICKSTART, "output_dir=a", *FAST, "train.epochs=1"]) == 0
    ckpt = str(in_tmp / "a" / "checkpoints" / "epoch_0001")
    rc = main(["--config", QUICKSTART, "output_dir=b", *FAST, "model.name=resnet32_cifar", "--resume", ckpt])
    err = capsys.readouterr().err
    assert rc == 2 and "epoch_0001" in err and "Traceback" not in err
    assert not (in_tmp / "b").exists()
    assert main(["--config", QUICKSTART, "output_dir=b", *FAST, "train.epochs=2", "--resume", ckpt]) == 0
    assert [p.name for p in sorted((in_tmp / "b" / "checkpoints").iterdir())] == ["epoch_0002"]


def test_a_run_that_may_still_be_running_is_not_replaced(in_tmp, capsys):
    import subprocess
    import sys

    main = train_cli()
    assert main(["--config", QUICKSTART, "output_dir=r", *FAST, "train.epochs=1", "optim.lr=1e30"]) == 3
    run = in_tmp / "r"
    assert (run / ".timm_drop_run.lock").is_file()
    # another process running in it holds its lock: neither a rerun, --overwrite nor --resume touches it
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import fcntl, sys, time; f = open(sys.argv[1], 'a'); fcntl.flock(f, fcntl.LOCK_EX); "
            "print('held', flush=True); time.sleep(120)",
            str(run / ".timm_drop_run.lock"),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        for flags in ([], ["--overwrite"], ["--resume", "latest"]):
            assert main(["--config", QUICKSTART, "output_dir=r", *FAST, "train.epochs=1", *flags]) == 2
            assert "still running" in capsys.readouterr().err
        assert (run / "config.yaml").is_file()
    finally:
        holder.kill()
        holder.wait()
    # killed: the kernel released its lock, so the failed start is replaced by the corrected rerun
    marker_path = run / ".timm_drop_run.json"
    marker = json.loads(marker_path.read_text())
    # started on another host (a shared filesystem, where a lock proves nothing): only --overwrite replaces it
    marker_path.write_text(json.dumps({**marker, "host": "some-other-host"}))
    assert main(["--config", QUICKSTART, "output_dir=r", *FAST, "train.epochs=1"]) == 2
    assert "may still be running there" in capsys.readouterr().err
    marker_path.write_text(json.dumps(marker))
    assert main(["--config", QUICKSTART, "output_dir=r", *FAST, "train.epochs=1"]) == 0


# -- writes stay inside the run -----------------------------------------------------------------------------------

#: every temporary the recipe writes at the top of a run directory (and the lock it opens)
TEMPORARIES = [
    "config.yaml.tmp",
    "metrics.jsonl.tmp",
    "summary.csv.tmp",
    "result.json.tmp",
    ".timm_drop_run.json.tmp",
    "last_model.pth.tmp",
    "last_model.safetensors.tmp",
    "best_model.pth.tmp",
    "best_model.safetensors.tmp",
    "curves.png.tmp.png",
]


def _stopped_after_one_epoch(main, run_args: list[str], run: Path) -> None:
    """A 2-epoch run as a job stopped after its first epoch leaves it (the second epoch's outputs removed)."""
    import shutil

    assert main(run_args) == 0
    shutil.rmtree(run / "checkpoints" / "epoch_0002")
    first = (run / "metrics.jsonl").read_text().splitlines(keepends=True)[0]
    (run / "metrics.jsonl").write_text(first)


def test_resume_never_writes_through_symlinks_planted_in_the_run(in_tmp):
    """Symlinks named like the recipe's temporaries (and its lock and checkpoint staging folder) point outside the
    run: the resumed run writes none of their targets and its own files stay regular files."""
    main = train_cli()
    args = ["--config", QUICKSTART, "output_dir=r", *FAST, "log.plot=true"]
    run = in_tmp / "r"
    _stopped_after_one_epoch(main, args, run)
    outside = in_tmp / "outside"
    outside.mkdir()
    for name in TEMPORARIES[:5]:  # existing files outside
        (outside / name).write_text("precious\n")
        os.symlink(outside / name, run / name)
    for name in TEMPORARIES[5:] + [".timm_drop_run.lock"]:  # links to nothing: writing through would create them
        (run / name).unlink(missing_ok=True)
        os.symlink(outside / ("new_" + name), run / name)
    (outside / "staged").mkdir()
    (outside / "staged" / "keep.txt").write_text("precious\n")
    os.symlink(outside / "staged", run / "checkpoints" / ".tmp-epoch_0002")

    assert main([*args, "--resume", "latest"]) == 0
    assert sorted(p.name for p in outside.iterdir()) == sorted(TEMPORARIES[:5] + ["staged"])
    assert all((outside / name).read_text() == "precious\n" for name in TEMPORARIES[:5])
    assert [p.name for p in (outside / "staged").iterdir()] == ["keep.txt"]
    for name in ("config.yaml", "metrics.jsonl", "summary.csv", "result.json", ".timm_drop_run.json",
                 "last_model.pth", "last_model.safetensors", "curves.png"):  # fmt: skip
        assert (run / name).is_file() and not (run / name).is_symlink(), name
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 2
    assert (run / "checkpoints" / "epoch_0002" / "manifest.json").is_file()


def test_a_home_relative_output_dir_and_data_root_are_expanded(in_tmp, monkeypatch, capsys):
    import numpy as np

    home = in_tmp / "home"
    (home / "data").mkdir(parents=True)
    monkeypatch.setenv("HOME", str(home))
    rng = np.random.default_rng(0)
    np.savez(home / "data" / "d.npz", x_train=rng.integers(0, 255, (64, 8, 8, 3), dtype=np.uint8),
             y_train=np.arange(64) % 4, x_test=rng.integers(0, 255, (16, 8, 8, 3), dtype=np.uint8),
             y_test=np.arange(16) % 4)  # fmt: skip
    rc = train_cli()(["--config", QUICKSTART, *FAST, "train.epochs=1", "output_dir=~/runs/q",
                      "data.dataset=npz", "data.root=~/data/d.npz"])  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    assert not (in_tmp / "~").exists()  # no folder literally named "~" in the working directory
    assert (home / "runs" / "q" / "last_model.pth").is_file()
    assert f"outputs in {home / 'runs' / 'q'}" in capsys.readouterr().out
    saved = (home / "runs" / "q" / "config.yaml").read_text()
    assert f"output_dir: {home / 'runs' / 'q'}" in saved and f"root: {home / 'data' / 'd.npz'}" in saved
