"""``log.trackers``: Accelerate's trackers get the same per-epoch scalars as ``metrics.jsonl`` (TensorBoard read back
from its event file); ``metrics.jsonl`` stays."""

from __future__ import annotations

import json

import pytest
from tiny import dropblock_stage_rule, tiny_run

import timm_drop  # noqa: F401
from timm_drop.training import ConfigError, Trainer, load_config


def _raw(tmp_path, trackers):
    return tiny_run(
        name="tb",
        output_dir=str(tmp_path / "run"),
        regularizer={"rules": [dropblock_stage_rule(drop_prob=0.1)]},
        layerout={"freeze_probs": "random", "seed": 1},
        log={"trackers": trackers},
        checkpoint={"total_limit": 1},
    )


def test_tensorboard_event_file_holds_the_metrics_jsonl_scalars(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    Trainer(load_config(_raw(tmp_path, ["tensorboard"]))).fit()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2
    # Accelerate's run folder (its hparams go to a sub-folder of their own)
    events = sorted(out.glob("trackers/timm_drop/events.out.tfevents.*"))
    assert len(events) == 1, list(out.rglob("*"))
    acc = EventAccumulator(str(events[0]))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for key in ("train_loss", "eval_top1", "lr", "frozen_fraction", "reg_strength"):
        assert key in rows[0] and key in tags, key
        logged = [(e.step, e.value) for e in acc.Scalars(key)]
        assert logged == [(r["epoch"], pytest.approx(r[key], rel=1e-6)) for r in rows], key


def test_trackers_directory_is_part_of_the_run_and_overwrite_replaces_it(tmp_path):
    Trainer(load_config(_raw(tmp_path, ["tensorboard"]))).fit()
    out = tmp_path / "run"
    marker_names = json.dumps(sorted(p.name for p in out.iterdir()))
    assert "trackers" in marker_names
    Trainer(load_config(_raw(tmp_path, ["tensorboard"])), overwrite=True).fit()
    assert len(list(out.glob("trackers/timm_drop/events.out.tfevents.*"))) == 1


def test_unknown_tracker_is_a_config_error_naming_the_field():
    with pytest.raises(ConfigError, match=r"log\.trackers\[0\]: 'tensorbord'.*did you mean 'tensorboard'"):
        load_config({"log": {"trackers": ["tensorbord"]}})


def test_a_tracker_that_is_not_installed_is_a_config_error():
    import importlib.util

    if importlib.util.find_spec("dvclive") is not None:
        pytest.skip("dvclive is installed here")
    with pytest.raises(ConfigError, match=r"log\.trackers\[0\]: 'dvclive' .*not installed"):
        load_config({"log": {"trackers": ["dvclive"]}})


def test_mlflow_run_holds_the_metrics_jsonl_scalars(tmp_path, monkeypatch):
    mlflow = pytest.importorskip("mlflow", reason="mlflow is not installed (pip install mlflow-skinny)")
    # a local store the user names, as one does without a tracking server (MLflow 3 asks for an explicit opt-in
    # to the file store; its default, sqlite in the working directory, needs the full mlflow package)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "mlruns").as_uri())
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    monkeypatch.chdir(tmp_path)
    Trainer(load_config(_raw(tmp_path, ["mlflow"]))).fit()
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    client = mlflow.tracking.MlflowClient()
    [exp] = [e for e in client.search_experiments() if e.name == "timm_drop"]
    [run] = client.search_runs([exp.experiment_id])
    assert run.info.run_name == "tb" and run.info.status == "FINISHED"
    assert run.data.params["optim.lr"] == "0.05"  # the config, flattened
    for key in ("train_loss", "eval_top1", "lr", "frozen_fraction", "reg_strength"):
        logged = [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, key)]
        assert logged == [(r["epoch"], pytest.approx(r[key], rel=1e-6)) for r in rows], key
