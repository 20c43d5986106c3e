"""The Accelerate training loop: outputs, per-optimizer-step schedules, exact resume, NaN stop, crash-safe checkpoints.

Runs are tiny (digits at 8x8 px, a CIFAR ResNet-20, a few optimizer steps) so the whole file stays fast on 2 cores.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
from scripts import load_script
from tiny import LINEAR_RAMP, dropblock_stage_rule, tiny_run

import timm_drop  # noqa: F401  (registers the CIFAR models)
from timm_drop.regularizers.base import Regularizer
from timm_drop.training import NonFiniteLossError, Trainer, load_config
from timm_drop.training.checkpoint import CheckpointManager, load_weights

REPO = Path(__file__).resolve().parents[2]

TINY = tiny_run(
    name="tiny",
    seed=3,
    regularizer={"rules": [dropblock_stage_rule(stages=[1, 2], schedule=LINEAR_RAMP)]},
    data={
        "eval_batch_size": 32,
        "train_subset": 64,
        "eval_subset": 40,
        "augment": {"crop_padding": 1, "hflip": False, "cutout": 2},
    },
    optim={"momentum": 0.9, "weight_decay": 5e-4},
    sched={"name": "multistep", "milestones": [1], "gamma": 0.1},
    train={"label_smoothing": 0.1, "grad_accum_steps": 2, "ema": {"enabled": True, "decay": 0.9}},
    layerout={"freeze_probs": "random", "seed": 1},
    log={"log_interval": 1, "plot": True},
    checkpoint={"total_limit": 1},
)


def tiny_cfg(out: Path, **over):
    raw = json.loads(json.dumps(TINY))
    raw["output_dir"] = str(out)
    for k, v in over.items():
        raw[k] = v
    return load_config(raw)


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "full"
    trainer = Trainer(tiny_cfg(out))
    summary = trainer.fit()
    return trainer, summary, out


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_run_writes_config_metrics_summary_curves_and_weights(full_run):
    trainer, summary, out = full_run
    assert (out / "config.yaml").is_file() and (out / "curves.png").read_bytes()[:4] == b"\x89PNG"
    rows = _rows(out)
    assert [r["epoch"] for r in rows] == [1, 2] and all("frozen_fraction" in r for r in rows)
    assert all(r["eval_images"] == 40 for r in rows)  # every eval image counted once
    header = (out / "summary.csv").read_text().splitlines()[0].split(",")
    assert header[:6] == ["epoch", "train_loss", "eval_loss", "eval_top1", "eval_top5", "lr"]
    assert [p.name for p in CheckpointManager(out).list()] == ["epoch_0002"]  # rotation, total_limit 1
    # exported weights load with weights_only=True into a plain timm model, strictly: regularizers add no keys
    plain = timm.create_model("resnet20_cifar", num_classes=10)
    plain.load_state_dict(load_weights(out / "best_model.pth"), strict=True)
    plain.load_state_dict(load_weights(out / "last_model.pth"), strict=True)
    assert summary["best_top1"] == max(r["eval_top1"] for r in rows)


def test_schedules_advance_once_per_optimizer_step_not_per_micro_batch(full_run):
    trainer, _, out = full_run
    rows = _rows(out)
    # 64 images / batch 16 = 4 micro-batches = 2 optimizer steps per epoch (grad_accum 2)
    assert trainer.steps_per_epoch == 2 and [r["step"] for r in rows] == [2, 4]
    # linear schedule on progress = step / total_steps: 0.5 after epoch 1 (1.0 if it counted micro-batches)
    assert [r["reg_strength"] for r in rows] == pytest.approx([0.5, 1.0])
    # milestone 1 = after one finished epoch (MultiStepLR semantics): epoch 2 runs at 0.1x
    assert [r["lr"] for r in rows] == pytest.approx([0.05, 0.005])
    before = [float(m.strength) for m in trainer.unwrapped.modules() if isinstance(m, Regularizer)]
    trainer.evaluate()
    after = [float(m.strength) for m in trainer.unwrapped.modules() if isinstance(m, Regularizer)]
    assert before == after and trainer.state.step == 4


def test_metrics_log_each_rules_strength_and_realised_drop_fraction(full_run):
    _, _, out = full_run
    rows = _rows(out)
    assert [r["rule1_strength"] for r in rows] == pytest.approx([0.5, 1.0])
    # DropBlock at drop_prob 0.2 x strength: the last training forward of epoch 2 ran at 0.2 x 0.75 (step 3 of 4)
    assert 0.0 < rows[0]["rule1_drop_fraction"] < rows[1]["rule1_drop_fraction"] < 0.35
    assert "rule1_drop_fraction" in (out / "summary.csv").read_text().splitlines()[0]


def test_ema_copy_keeps_its_own_regularizers(full_run):
    trainer, _, out = full_run
    ours = [m for m in trainer.unwrapped.modules() if isinstance(m, Regularizer)]
    ema = [m for m in trainer.ema.module.modules() if isinstance(m, Regularizer)]
    assert len(ours) == len(ema) == 2 and not {id(m) for m in ours} & {id(m) for m in ema}
    assert all("ema_eval_top1" in r for r in _rows(out))


def _reg_strengths(model: torch.nn.Module) -> list[float]:
    return [float(m.strength) for m in model.modules() if isinstance(m, Regularizer)]


def test_recipe_drives_schedules_of_the_model_and_its_ema_through_timm_drop_drive(tmp_path):
    trainer = Trainer(tiny_cfg(tmp_path / "driven"))
    trainer.fit(max_epochs=1)
    driver = trainer.driver  # the recipe uses the same public timm_drop.drive users call
    # 2 optimizer steps (4 micro-batches, grad_accum 2) of total 4: linear schedule at 0.5 on both models
    assert driver.step == trainer.state.step == 2 and driver.total_steps == trainer.total_steps == 4
    assert _reg_strengths(trainer.unwrapped) == _reg_strengths(trainer.ema.module) == [pytest.approx(0.5)] * 2
    trainer.optimizer.step()  # the optimizer step hook moves both, no trainer bookkeeping involved
    assert driver.step == 3
    assert _reg_strengths(trainer.unwrapped) == _reg_strengths(trainer.ema.module) == [pytest.approx(0.75)] * 2


def test_resume_from_a_checkpoint_without_driver_state_continues_from_its_step(full_run, tmp_path, monkeypatch):
    # checkpoints written before the recipe used drive() carry no "driver" entry: the schedule resumes at the
    # restored optimizer step, as it did then
    _, _, full_out = full_run
    out = tmp_path / "old"
    saved = Trainer._extra_state
    monkeypatch.setattr(Trainer, "_extra_state", lambda self: {k: v for k, v in saved(self).items() if k != "driver"})
    Trainer(tiny_cfg(out)).fit(max_epochs=1)
    monkeypatch.undo()
    resumed = Trainer(tiny_cfg(out), resume="latest").setup()
    assert resumed.driver.step == resumed.state.step == 2
    assert _reg_strengths(resumed.unwrapped) == _reg_strengths(resumed.ema.module) == [pytest.approx(0.5)] * 2
    resumed.fit()
    assert [r["reg_strength"] for r in _rows(out)] == [r["reg_strength"] for r in _rows(full_out)]


def test_resume_continues_the_same_curve_and_weights(full_run, tmp_path):
    _, _, full_out = full_run
    out = tmp_path / "split"
    Trainer(tiny_cfg(out)).fit(max_epochs=1)
    assert [p.name for p in CheckpointManager(out).list()] == ["epoch_0001"]
    resumed = Trainer(tiny_cfg(out), resume="latest")
    resumed.fit()
    assert resumed.state.epoch == 2
    keys = [
        "epoch",
        "step",
        "train_loss",
        "train_top1",
        "eval_loss",
        "eval_top1",
        "ema_eval_loss",
        "lr",
        "frozen_fraction",
        "reg_strength",
    ]
    a, b = _rows(full_out), _rows(out)
    assert [[r[k] for k in keys] for r in a] == [[r[k] for k in keys] for r in b]
    wa, wb = load_weights(full_out / "last_model.pth"), load_weights(out / "last_model.pth")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_resume_with_a_changed_config_is_refused(full_run):
    _, _, out = full_run
    with pytest.raises(ValueError, match=r"differs in \['optim.lr'\]"):
        Trainer(tiny_cfg(out, optim={"name": "sgd", "lr": 0.5}), resume="latest").setup()


def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path):
    out = tmp_path / "nan"
    trainer = Trainer(tiny_cfg(out, layerout=None, train={"epochs": 3})).setup()

    def poison(module, args, output):
        if trainer.state.step >= 2 * trainer.steps_per_epoch - 1:  # inside epoch 2
            return output * float("nan")
        return output

    trainer.unwrapped.get_classifier().register_forward_hook(poison)
    with pytest.raises(NonFiniteLossError, match=r"non-finite training loss .*epoch_0001"):
        trainer.fit()
    assert [p.name for p in CheckpointManager(out).list()] == ["epoch_0001"]
    assert [r["epoch"] for r in _rows(out)] == [1]
    # the kept checkpoint is complete and loadable: a resumed trainer restores epoch 1
    resumed = Trainer(tiny_cfg(out, layerout=None, train={"epochs": 3}), resume="latest").setup()
    assert resumed.state.epoch == 1 and torch.isfinite(next(resumed.unwrapped.parameters())).all()


def test_half_written_checkpoints_are_never_the_latest(tmp_path):
    mgr = CheckpointManager(tmp_path)
    for name in ("epoch_0001", "epoch_0002", ".tmp-epoch_0003", "epoch_0004.partial"):
        (tmp_path / "checkpoints" / name).mkdir(parents=True)
    assert mgr.latest().name == "epoch_0002"
    with pytest.raises(FileNotFoundError, match="not a timm_drop checkpoint"):
        mgr.resolve(str(tmp_path / "checkpoints" / "epoch_0002"))


def test_cli_rejects_a_bad_key_before_any_work(tmp_path, capsys):

    script = load_script("recipes/train.py")
    argv = [
        "--config",
        str(REPO / "recipes/configs/quickstart.yaml"),
        f"output_dir={tmp_path / 'x'}",
        "train.epoch=3",
    ]
    assert script.main(argv) == 2
    assert "train.epoch: unknown key; did you mean train.epochs" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_gradient_clipping_never_counts_layerout_frozen_gradients(tmp_path):
    # In grad-nulling mode (DDP / compile) frozen layers still get gradients from backward; the clipping norm
    # must be computed without them, or LayerOut would shrink the trainable layers' steps.
    cfg = tiny_cfg(
        tmp_path / "clip",
        layerout={"freeze_probs": "random", "seed": 1, "skip_backward": False},
        train={"epochs": 1, "clip_grad_norm": 1.0},
    )
    trainer = Trainer(cfg).setup()
    clip = trainer.accelerator.clip_grad_norm_
    seen = []

    def spy(params, max_norm, *args, **kwargs):
        params = list(params)
        frozen = {id(p) for p in trainer.layerout._frozen_params}
        seen.append((len(frozen), sum(p.grad is not None for p in params if id(p) in frozen)))
        return clip(params, max_norm, *args, **kwargs)

    trainer.accelerator.clip_grad_norm_ = spy
    trainer.fit()
    assert seen and all(n_frozen > 0 for n_frozen, _ in seen)
    assert all(with_grad == 0 for _, with_grad in seen)
