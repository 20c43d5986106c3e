"""Resume verifies every file it restores (sizes + sha256 recorded at save time, in ``manifest.json``).

A real short run (digits, CIFAR ResNet-20 at 8 px, DropBlock, so the RNG state matters) is damaged the ways a disk,
a copy or a kill damages it: truncated, overwritten with garbage, deleted. ``--resume PATH`` stops naming the file;
``--resume latest`` falls back to the newest checkpoint that verifies, says so, and continues the same run.
"""

from __future__ import annotations

import json
import shutil
import textwrap
from pathlib import Path

import pytest
import torch
from scripts import kill_when, load_script
from tiny import dropblock_stage_rule, tiny_run

from timm_drop.training import Trainer, load_config
from timm_drop.training.checkpoint import CheckpointError, CheckpointManager, load_weights

REPO = Path(__file__).resolve().parents[2]

RUN = tiny_run(
    name="verify",
    seed=7,
    regularizer={"rules": [dropblock_stage_rule(drop_prob=0.3, stages=[1])]},
    data={
        "eval_batch_size": 32,
        "train_subset": 48,
        "eval_subset": 32,
        "augment": {"crop_padding": 1, "hflip": False, "cutout": 2},
    },
    sched={"name": "constant"},
    train={"epochs": 4},
    log={"log_interval": 1},
    checkpoint={"total_limit": 2},
)


def cfg_for(out: Path):
    raw = json.loads(json.dumps(RUN))
    raw["output_dir"] = str(out)
    return load_config(raw)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A run stopped after 3 of its 4 epochs (a time-sliced job): checkpoints of epochs 2 and 3."""
    out = tmp_path_factory.mktemp("verify") / "run"
    Trainer(cfg_for(out)).fit(max_epochs=3)
    assert [p.name for p in CheckpointManager(out).list()] == ["epoch_0002", "epoch_0003"]
    return out


@pytest.fixture(scope="module")
def reference_weights(finished_run, tmp_path_factory):
    """Final weights of the same run resumed from its intact newest checkpoint."""
    out = copy_run(finished_run, tmp_path_factory.mktemp("verify") / "intact")
    Trainer(cfg_for(out), resume="latest").fit()
    return load_weights(out / "last_model.pth")


def copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, symlinks=True)
    return dst


def damage(path: Path, how: str) -> None:
    if how == "truncated":
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif how == "garbage":
        size = path.stat().st_size
        path.write_bytes(bytes((i * 37 + 11) % 256 for i in range(size)))  # same size, other bytes
    elif how == "deleted":
        path.unlink()
    else:  # pragma: no cover
        raise ValueError(how)


CASES = [
    ("random_states_0.pkl", "truncated"),
    ("random_states_0.pkl", "garbage"),
    ("random_states_0.pkl", "deleted"),
    ("model.safetensors", "truncated"),
    ("model.safetensors", "garbage"),
    ("model.safetensors", "deleted"),
    ("optimizer.bin", "truncated"),
    ("optimizer.bin", "garbage"),
    ("optimizer.bin", "deleted"),
    ("timm_drop_state.pt", "truncated"),
    ("timm_drop_state.pt", "deleted"),
    ("manifest.json", "truncated"),
    ("manifest.json", "deleted"),
]
EXPECTED = {"deleted": "missing", "truncated": "truncated", "garbage": "sha256"}


def test_checkpoint_files_are_the_ones_the_cases_damage(finished_run):
    names = {p.name for p in (finished_run / "checkpoints" / "epoch_0003").iterdir()}
    assert {f for f, _ in CASES} | {"manifest.json"} <= names


@pytest.mark.parametrize("name,how", CASES)
def test_explicit_resume_path_stops_naming_the_damaged_file(finished_run, tmp_path, name, how):
    out = copy_run(finished_run, tmp_path / "run")
    ckpt = out / "checkpoints" / "epoch_0003"
    damage(ckpt / name, how)
    with pytest.raises(CheckpointError) as ei:
        Trainer(cfg_for(out), resume=str(ckpt)).setup()
    msg = str(ei.value)
    assert name in msg and "epoch_0003" in msg
    assert "different number of processes" not in msg
    assert ("malformed" if (name, how) == ("manifest.json", "truncated") else EXPECTED[how]) in msg


@pytest.mark.parametrize("name,how", CASES)
def test_resume_latest_falls_back_to_the_newest_checkpoint_that_verifies(
    finished_run, tmp_path, capsys, name, how
):
    out = copy_run(finished_run, tmp_path / "run")
    damage(out / "checkpoints" / "epoch_0003" / name, how)
    trainer = Trainer(cfg_for(out), resume="latest").setup()
    assert trainer.state.epoch == 2
    said = capsys.readouterr().out
    assert f"epoch_0003/{name}" in said and "resuming from" in said and "epoch_0002" in said


def test_fallback_continues_the_same_run_bit_for_bit(finished_run, reference_weights, tmp_path):
    # the silent wrong result: a garbage RNG file resumed with rc=0 and another random stream
    out = copy_run(finished_run, tmp_path / "run")
    damage(out / "checkpoints" / "epoch_0003" / "random_states_0.pkl", "garbage")
    Trainer(cfg_for(out), resume="latest").fit()
    b = load_weights(out / "last_model.pth")
    assert all(torch.equal(reference_weights[k], b[k]) for k in reference_weights)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4]


def test_cli_names_the_file_and_exits_2_when_no_checkpoint_verifies(finished_run, tmp_path, capsys):
    out = copy_run(finished_run, tmp_path / "run")
    for ck in ("epoch_0002", "epoch_0003"):
        damage(out / "checkpoints" / ck / "random_states_0.pkl", "deleted")
    mod = load_script("recipes/train.py")
    cfg_file = tmp_path / "cfg.json"  # JSON is YAML
    cfg_file.write_text(json.dumps({**RUN, "output_dir": str(out)}))
    assert mod.main(["--config", str(cfg_file), "--resume", "latest"]) == 2
    err = capsys.readouterr().err
    assert (
        "epoch_0002/random_states_0.pkl is missing" in err
        and "epoch_0003/random_states_0.pkl is missing" in err
    )


@pytest.mark.parametrize(
    "field,value,said",
    [
        ("size", "as text", "has size"),  # the size, as a string: once "has 1094304 bytes, 1094304 were written"
        ("size", True, "has size"),
        ("sha256", 12, "has sha256"),
        ("path", "../../config.yaml", "not a path inside the checkpoint"),
    ],
)
def test_a_malformed_manifest_entry_is_named_as_such(finished_run, tmp_path, capsys, field, value, said):
    out = copy_run(finished_run, tmp_path / "run")
    ckpt = out / "checkpoints" / "epoch_0003"
    manifest = json.loads((ckpt / "manifest.json").read_text())
    rec = manifest["files"]["model.safetensors"]
    if field == "path":
        manifest["files"][value] = manifest["files"].pop("model.safetensors")
    else:
        rec[field] = str(rec[field]) if value == "as text" else value
    (ckpt / "manifest.json").write_text(json.dumps(manifest))
    mod = load_script("recipes/train.py")
    cfg_file = tmp_path / "cfg.json"  # JSON is YAML
    cfg_file.write_text(json.dumps({**RUN, "output_dir": str(out)}))
    assert mod.main(["--config", str(cfg_file), "--resume", str(ckpt)]) == 2
    err = capsys.readouterr().err
    assert "manifest.json is malformed" in err and said in err and "were written" not in err, err


CHILD = textwrap.dedent(
    """
    import os, sys, time, torch
    from timm_drop.training import checkpoint
    sentinel = sys.argv[2]
    real_save = torch.save

    def slow_save(obj, f, *a, **k):
        # the third epoch's own state file: announce, then write slowly enough to be killed mid-checkpoint
        if str(f).endswith(os.path.join(".tmp-epoch_0003", checkpoint.STATE_FILE)):
            open(sentinel, "w").close()
            time.sleep(60)
        return real_save(obj, f, *a, **k)

    torch.save = slow_save
    sys.argv = ["train.py", "--config", sys.argv[1]]
    import runpy
    runpy.run_path(%r, run_name="__main__")
    """
)


def test_kill_9_mid_checkpoint_resumes_from_the_previous_complete_one(reference_weights, tmp_path):
    out = tmp_path / "killed"
    cfg_file = tmp_path / "cfg.json"
    cfg_file.write_text(json.dumps({**RUN, "output_dir": str(out)}))
    script = tmp_path / "child.py"
    script.write_text(CHILD % str(REPO / "recipes" / "train.py"))
    sentinel = tmp_path / "in_checkpoint"
    kill_when(sentinel, script, [str(cfg_file), str(sentinel)], what="its third checkpoint")
    assert (out / "checkpoints" / ".tmp-epoch_0003").is_dir()
    trainer = Trainer(cfg_for(out), resume="latest")
    trainer.fit()
    assert trainer.state.epoch == 4
    b = load_weights(out / "last_model.pth")
    assert all(torch.equal(reference_weights[k], b[k]) for k in reference_weights)
    assert not (out / "checkpoints" / ".tmp-epoch_0003").exists()
