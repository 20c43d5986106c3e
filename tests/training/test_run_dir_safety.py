"""Run directories: --overwrite removes only what a timm_drop run recorded creating, only after every check;
failed starts leave nothing that blocks the corrected rerun."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import pytest
import torch
from scripts import load_script

REPO = Path(__file__).resolve().parents[2]
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


def test_processes_probing_the_lock_at_once_do_not_see_each_other_as_a_running_run(tmp_path):
    """Every process of a launch checks the output directory at the same time: one process's probe of the lock
    must not look like a running run to another (a 2-process resume refused its own directory, under load)."""
    import fcntl
    import threading

    from timm_drop.training.run_dir import LOCK, RunDir

    run = RunDir(tmp_path)
    run.acquire()
    run.start()
    marker = run.read_marker()
    run.release()
    with open(tmp_path / LOCK, "rb") as other_probe:  # another process's probe, caught mid-way
        fcntl.flock(other_probe, fcntl.LOCK_SH | fcntl.LOCK_NB)
        assert run.owner(marker) == "stopped"
        # and the run starting right after every process checked still gets its lock once the probe lets go
        threading.Timer(0.2, fcntl.flock, (other_probe, fcntl.LOCK_UN)).start()
        run.acquire()
    assert run.owner(marker) == "running"
    run.release()


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


# -- failures while writing, and other ways a run stops ----------------------------------------------------------


@contextlib.contextmanager
def tmpfs(path: Path, size: str):
    """A real size-limited tmpfs mounted at ``path`` (root, where mounting is allowed; skipped otherwise)."""
    import subprocess

    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def _remount(path: Path, options: str) -> None:
    import subprocess

    subprocess.run(["mount", "-o", f"remount,{options}", str(path)], check=True)


def _run_size(run: Path) -> int:
    return sum(p.stat().st_size for p in run.rglob("*") if p.is_file())


def _assert_stopped_intact(err: str, run: Path, why: str) -> None:
    from timm_drop.training.checkpoint import verify_checkpoint

    assert err.startswith("error: ") and why in err and "Traceback" not in err, err
    ckpt = run / "checkpoints" / "epoch_0001"
    assert f"{ckpt}, is intact" in err and "--resume latest" in err
    assert verify_checkpoint(ckpt, 1) is None
    assert not [p.name for p in run.iterdir() if p.name.endswith((".tmp", ".tmp.png"))]  # no half-written file
    assert not [p.name for p in (run / "checkpoints").iterdir() if p.name.startswith((".tmp-", ".old-"))]


def test_a_full_disk_stops_the_run_with_one_error_line_and_resume_continues(in_tmp, capsys):
    """A real tmpfs that fills up during the second epoch: "no space left on device", the first epoch's
    checkpoint intact; with space again, --resume latest ends where the uninterrupted run ends."""
    import shutil

    from timm_drop.training.checkpoint import load_weights

    main = train_cli()
    args = ["--config", QUICKSTART, "output_dir=r", *FAST, "log.plot=true"]
    _stopped_after_one_epoch(main, args, in_tmp / "r")
    uninterrupted = load_weights(in_tmp / "r" / "last_model.pth")
    (in_tmp / "r" / "last_model.pth").unlink()
    mb = (_run_size(in_tmp / "r") + (1 << 20)) // (1 << 20) + 1  # the run and ~1 MiB: less than an epoch writes
    with tmpfs(in_tmp / "small", f"{mb}m") as disk:
        run = disk / "r"
        shutil.copytree(in_tmp / "r", run, symlinks=True)
        capsys.readouterr()
        resumed = ["--config", QUICKSTART, f"output_dir={run}", *FAST, "log.plot=true", "--resume", "latest"]
        assert main(resumed) == 4
        _assert_stopped_intact(capsys.readouterr().err, run, "no space left on device")
        _remount(disk, "size=256m")
        assert main(resumed) == 0
        final = load_weights(run / "last_model.pth")
        assert all(torch.equal(final[k], uninterrupted[k]) for k in uninterrupted)


RESUME_UNDER_LIMIT = """
import resource, runpy, sys
limit = int(sys.argv[1])
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
sys.argv = ["train.py", *sys.argv[2:]]
runpy.run_path({train!r}, run_name="__main__")
"""


def test_a_file_size_limit_stops_the_run_with_one_error_line_and_resume_continues(in_tmp, capsys):
    """RLIMIT_FSIZE (``ulimit -f``; any user can set it) below the size of a weights file: the write fails with
    EFBIG; the error says so and where the run stands, and without the limit --resume latest finishes the run."""
    import subprocess
    import sys

    from scripts import child_env

    from timm_drop.training.checkpoint import load_weights

    main = train_cli()
    args = ["--config", QUICKSTART, "output_dir=r", *FAST]
    run = in_tmp / "r"
    _stopped_after_one_epoch(main, args, run)
    uninterrupted = load_weights(run / "last_model.pth")
    script = in_tmp / "limited.py"
    script.write_text(RESUME_UNDER_LIMIT.format(train=str(REPO / "recipes" / "train.py")))
    env = {**child_env(), "PYTHONDONTWRITEBYTECODE": "1"}
    limit = str(run.joinpath("last_model.pth").stat().st_size // 2)
    child = subprocess.run([sys.executable, str(script), limit, *args, "--resume", "latest"], cwd=in_tmp, env=env,
                           capture_output=True, text=True, timeout=600)  # fmt: skip
    assert child.returncode == 4, child.stderr[-3000:]
    _assert_stopped_intact(child.stderr.strip().splitlines()[-1], Path("r"), "file-size limit")
    assert main([*args, "--resume", "latest"]) == 0
    final = load_weights(run / "last_model.pth")
    assert all(torch.equal(final[k], uninterrupted[k]) for k in uninterrupted)


def _read_only(path: Path):
    """Make ``path`` (a tmpfs mount for root, whom permissions do not stop) read-only."""
    if os.geteuid() == 0:
        _remount(path, "ro")
    else:
        for p in [path, *path.rglob("*")]:
            if p.is_dir():
                p.chmod(0o555)


def test_a_read_only_output_dir_is_one_error_line_before_any_work(in_tmp, capsys):
    main = train_cli()
    with tmpfs(in_tmp / "ro", "64m") as disk:
        assert main(["--config", QUICKSTART, f"output_dir={disk / 'r'}", *FAST]) == 0
        before = {p: p.stat().st_mtime_ns for p in disk.rglob("*")}
        _read_only(disk)
        capsys.readouterr()
        for target, flags in ((disk / "new", []), (disk / "r", ["--resume", "latest"]), (disk / "r", ["--overwrite"])):
            rc = main(["--config", QUICKSTART, f"output_dir={target}", *FAST, *flags])
            err = capsys.readouterr().err
            assert rc == 2 and err.startswith("error: output_dir") and "Traceback" not in err, err
            assert "read-only" in err or "permission" in err
        assert {p: p.stat().st_mtime_ns for p in disk.rglob("*")} == before
        _remount(disk, "rw")


def test_a_marker_nested_too_deeply_is_an_error_line_not_a_recursion_error(in_tmp, capsys):
    run = in_tmp / "r"
    run.mkdir()
    (run / "config.yaml").write_text("name: x\n")
    (run / ".timm_drop_run.json").write_text("[" * 200_000 + "]" * 200_000)
    for flags in ([], ["--overwrite"], ["--resume", "latest"]):
        rc = train_cli()(["--config", QUICKSTART, "output_dir=r", *FAST, *flags])
        err = capsys.readouterr().err
        assert rc == 2 and ".timm_drop_run.json" in err and "Traceback" not in err, err
    assert sorted(p.name for p in run.iterdir()) == [".timm_drop_run.json", "config.yaml"]


def test_ctrl_c_says_how_to_continue_and_resume_continues(in_tmp, capsys, monkeypatch):
    """Ctrl-C in the second epoch: no traceback, the last checkpoint named with --resume latest, exit code 130."""
    from timm_drop.training import loop

    main = train_cli()
    args = ["--config", QUICKSTART, "output_dir=r", *FAST]
    real = loop.Trainer.train_one_epoch

    def ctrl_c_in_epoch_2(self, epoch):
        if epoch == 1:
            raise KeyboardInterrupt
        return real(self, epoch)

    with monkeypatch.context() as m:
        m.setattr(loop.Trainer, "train_one_epoch", ctrl_c_in_epoch_2)
        assert main(args) == 130
    err = capsys.readouterr().err
    assert err.startswith("interrupted: ") and f"{Path('r') / 'checkpoints' / 'epoch_0001'}, is intact" in err
    assert "--resume latest" in err and "Traceback" not in err, err
    assert main([*args, "--resume", "latest"]) == 0


def test_every_output_file_has_the_usual_mode(in_tmp):
    """The weights (safetensors writes 0600 by itself) are as readable as every other output: 0666 less the
    umask."""
    old = os.umask(0o022)
    try:
        assert train_cli()(["--config", QUICKSTART, "output_dir=r", *FAST, "train.epochs=1", "log.plot=true"]) == 0
    finally:
        os.umask(old)
    modes = {p.relative_to(in_tmp / "r").as_posix(): p.stat().st_mode & 0o777
             for p in (in_tmp / "r").rglob("*") if p.is_file()}  # fmt: skip
    assert "last_model.safetensors" in modes and "checkpoints/epoch_0001/model.safetensors" in modes
    assert {k: m for k, m in modes.items() if m != 0o644} == {}
