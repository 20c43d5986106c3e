"""Resume accepts harmless differences: the run dir's spelling or location, a metrics line cut short by a kill,
and a run that is already finished (its results are kept, not replaced by an empty epoch)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from tiny import tiny_run

from timm_drop.training import Trainer, load_config

RUN = tiny_run(
    name="robust",
    seed=1,
    data={
        "eval_batch_size": 32,
        "eval_subset": 32,
        "augment": {"crop_padding": 1, "hflip": False},
    },
    sched={"name": "constant"},
)


def cfg(output_dir: str, **over):
    raw = json.loads(json.dumps(RUN))
    raw["output_dir"] = output_dir
    raw.update(over)
    return load_config(raw)


@pytest.fixture(scope="module")
def one_epoch(tmp_path_factory):
    """A run stopped after 1 of its 2 epochs, made with a relative output_dir (``runs/x``)."""
    base = tmp_path_factory.mktemp("robust")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(base)
        Trainer(cfg("runs/x")).fit(max_epochs=1)
    return base / "runs" / "x"


@pytest.mark.parametrize("spelling", ["absolute", "dot-relative", "moved"])
def test_the_same_run_dir_spelled_differently_or_moved_resumes(one_epoch, tmp_path, monkeypatch, spelling):
    work = tmp_path / "w"
    shutil.copytree(one_epoch, work / "runs" / "x")
    monkeypatch.chdir(work)
    if spelling == "absolute":
        out = str(work / "runs" / "x")
    elif spelling == "dot-relative":
        out = "./runs/x"
    else:
        (work / "runs" / "x").rename(work / "elsewhere")
        out = "elsewhere"
    trainer = Trainer(cfg(out), resume="latest")
    trainer.fit()
    assert trainer.state.epoch == 2
    rows = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]


def test_a_changed_setting_is_still_refused(one_epoch, tmp_path, monkeypatch):
    shutil.copytree(one_epoch, tmp_path / "x")
    with pytest.raises(ValueError, match=r"differs in \['optim.lr'\]"):
        Trainer(cfg(str(tmp_path / "x"), optim={"name": "sgd", "lr": 0.5}), resume="latest").setup()


def test_a_partial_last_metrics_line_is_dropped_with_a_note(one_epoch, tmp_path, capsys):
    out = tmp_path / "x"
    shutil.copytree(one_epoch, out)
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"epoch": 2, "step": 4, "train_lo')  # a kill while epoch 2's row was being appended
    trainer = Trainer(cfg(str(out)), resume="latest")
    trainer.fit()
    assert "dropped a partial last line" in capsys.readouterr().err
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]


def test_a_corrupt_metrics_line_before_the_end_is_an_error_naming_the_line(one_epoch, tmp_path):
    out = tmp_path / "x"
    shutil.copytree(one_epoch, out)
    good = (out / "metrics.jsonl").read_text()
    (out / "metrics.jsonl").write_text("{not json\n" + good)
    with pytest.raises(ValueError, match=r"metrics.jsonl:1: not a JSON metrics row"):
        Trainer(cfg(str(out)), resume="latest").setup()


def test_resuming_a_finished_run_keeps_its_final_metrics(one_epoch, tmp_path):
    out = tmp_path / "x"
    shutil.copytree(one_epoch, out)
    Trainer(cfg(str(out)), resume="latest").fit()
    before = json.loads((out / "result.json").read_text())
    assert before["last"]["epoch"] == 2 and "eval_top1" in before["last"]
    summary = Trainer(cfg(str(out)), resume="latest").fit()
    after = json.loads((out / "result.json").read_text())
    assert after["last"] == before["last"] and summary["last"] == before["last"]
    assert after["best_top1"] == before["best_top1"]
