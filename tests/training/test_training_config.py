"""Recipe configs: loading, overrides, validation errors that name the key, output-dir protection, LR shapes."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import yaml
from scripts import load_script

from timm_drop.training.config import ConfigError, config_to_dict, load_config, save_config
from timm_drop.training.loop import LRSchedule
from timm_drop.training.run_dir import RunDir, check_output_dir

REPO = Path(__file__).resolve().parents[2]
CONFIGS = sorted((REPO / "recipes" / "configs").glob("*.yaml"))


def test_every_recipe_config_loads_and_validates():
    assert len(CONFIGS) >= 13
    for path in CONFIGS:
        cfg = load_config(path, check_paths=False)
        # the spec is resolved and inlined, so the saved config is self-contained
        assert cfg.regularizer is None or isinstance(cfg.regularizer, dict), path.name


def test_each_paper_config_sits_next_to_its_baseline():
    names = {p.stem for p in CONFIGS}
    for method, baseline in [
        ("corrdrop_resnet20_cifar10", "baseline_resnet20_cifar10"),
        ("selectscale_wrn20_4_cifar100", "baseline_wrn20_4_cifar100"),
        ("attentiondrop_resnet18_cifar10", "baseline_resnet18_cifar10"),
        ("layerout_vgg16_cifar10", "baseline_vgg16_cifar10"),
        ("layerout_resnet110_cifar10", "baseline_resnet110_cifar10"),
        ("dropblock_resnet50_imagenet", "baseline_resnet50_imagenet"),
    ]:
        assert method in names and baseline in names
        m = config_to_dict(load_config(REPO / "recipes/configs" / f"{method}.yaml", check_paths=False))
        b = config_to_dict(load_config(REPO / "recipes/configs" / f"{baseline}.yaml", check_paths=False))
        # same training recipe; only the regularizer / LayerOut and the names differ
        for section in ("model", "data", "optim", "sched", "train"):
            assert m[section] == b[section], (method, section)
        assert b["regularizer"] is None and b["layerout"] is None
        assert (m["regularizer"] is not None) or (m["layerout"] is not None)


def test_paper_hyperparameters_reach_the_config():
    c = load_config(REPO / "recipes/configs/corrdrop_resnet20_cifar10.yaml", check_paths=False)
    rule = c.regularizer["rules"][0]
    assert rule["regularizer"] == "corrdrop" and rule["params"]["drop_prob"] == 0.1
    assert {int(k): v["block_size"] for k, v in rule["stage_params"].items()} == {1: 9, 2: 7, 3: 5}
    assert c.sched.milestone_fractions == [0.4, 0.6, 0.8] and c.train.epochs == 200
    r110 = load_config(REPO / "recipes/configs/layerout_resnet110_cifar10.yaml", check_paths=False)
    assert r110.data.batch_size == 32 and r110.layerout["warmup_epochs"] == 20


def test_overrides_use_dotted_keys_yaml_values_and_list_indices():
    cfg = load_config(
        REPO / "recipes/configs/quickstart.yaml",
        [
            "train.epochs=3",
            "data.augment.cutout=4",
            "optim.nesterov=false",
            "regularizer.rules.0.params.drop_prob=0.2",
        ],
    )
    assert cfg.train.epochs == 3 and cfg.data.augment.cutout == 4 and cfg.optim.nesterov is False
    assert cfg.regularizer["rules"][0]["params"]["drop_prob"] == 0.2


@pytest.mark.parametrize(
    "override, key",
    [
        ("train.epoch=3", "train.epoch: unknown key; did you mean train.epochs"),
        ("train.precision=fp8", "train.precision: must be one of"),
        ("optim.lr=-0.1", "optim.lr: must be > 0"),
        ("data.batch_size=two", "data.batch_size: must be an integer"),
        ("data.dataset=mnist", "data.dataset: must be one of"),
        ("sched.milestones=[150, 400]", "sched.milestones"),
        ("layerout={freez_probs: random}", "layerout.freez_probs"),
        ("regularizer.rules.0.regularizer=corrdropp", "regularizer:"),
        ("data.dataset=npz", "data.root: is required"),
    ],
)
def test_bad_config_values_fail_early_naming_the_key(override, key):
    with pytest.raises(ConfigError) as e:
        load_config(REPO / "recipes/configs/quickstart.yaml", [override])
    assert key in str(e.value)


def test_spec_given_by_path_is_validated_and_inlined(tmp_path):
    spec = tmp_path / "s.yaml"
    spec.write_text("rules:\n  - regularizer: dropout\n    params: {drop_prob: 0.1}\n    sites: [stage]\n")
    cfg = load_config({"regularizer": str(spec)})
    assert cfg.regularizer["rules"][0]["regularizer"] == "dropout"
    with pytest.raises(ConfigError, match="regularizer: spec file not found"):
        load_config({"regularizer": str(tmp_path / "missing.yaml")})


def test_base_config_is_merged_and_child_keys_win(tmp_path):
    (tmp_path / "a.yaml").write_text(
        yaml.safe_dump({"optim": {"lr": 0.3, "momentum": 0.8}, "train": {"epochs": 7}})
    )
    (tmp_path / "b.yaml").write_text(yaml.safe_dump({"base": "a.yaml", "optim": {"lr": 0.05}}))
    cfg = load_config(tmp_path / "b.yaml")
    assert (cfg.optim.lr, cfg.optim.momentum, cfg.train.epochs) == (0.05, 0.8, 7)
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({"base": "c.yaml"}))
    with pytest.raises(ConfigError, match="circular"):
        load_config(tmp_path / "c.yaml")


def test_output_dir_never_clobbers_another_run_without_overwrite(tmp_path):
    cfg = load_config({"output_dir": str(tmp_path / "run")})
    d = config_to_dict(cfg)
    assert check_output_dir(tmp_path / "run", d, overwrite=False, resume=None) == "new"
    (tmp_path / "run").mkdir()
    save_config(cfg, tmp_path / "run" / "config.yaml")
    # a config.yaml alone does not make a directory ours: nothing may replace it
    for overwrite in (False, True):
        with pytest.raises(ConfigError, match="nothing in it is provably ours"):
            check_output_dir(tmp_path / "run", d, overwrite=overwrite, resume=None)
    run = RunDir(tmp_path / "run")
    run.start()
    run.claim("config.yaml", "metrics.jsonl")
    # a start that never finished an epoch is debris the corrected rerun replaces
    assert check_output_dir(tmp_path / "run", d, overwrite=False, resume=None) == "restart"
    (tmp_path / "run" / "metrics.jsonl").write_text('{"epoch": 1}\n')
    with pytest.raises(ConfigError, match="already holds a run"):
        check_output_dir(tmp_path / "run", d, overwrite=False, resume=None)
    assert check_output_dir(tmp_path / "run", d, overwrite=True, resume=None) == "overwrite"
    assert check_output_dir(tmp_path / "run", d, overwrite=False, resume="latest") == "resume"
    other = config_to_dict(load_config({"output_dir": str(tmp_path / "run"), "optim": {"lr": 0.5}}))
    with pytest.raises(ConfigError, match=r"differs in \['optim.lr'\]"):
        check_output_dir(tmp_path / "run", other, overwrite=False, resume="latest")
    # a non-empty folder that is not a run is never deleted, even with --overwrite
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "notes.txt").write_text("precious")
    with pytest.raises(ConfigError, match="holds no timm_drop run"):
        check_output_dir(tmp_path / "home", d, overwrite=True, resume=None)


def _sched(**over):
    raw = {"optim": {"lr": 0.1}, "train": {"epochs": 10}, "sched": over}
    return LRSchedule(load_config(raw), steps_per_epoch=10)


def test_multistep_fractions_decay_at_the_papers_epochs():
    s = _sched(name="multistep", milestone_fractions=[0.4, 0.6, 0.8], gamma=0.1)
    assert s(39) == pytest.approx(0.1) and s(40) == pytest.approx(0.01)
    assert s(59) == pytest.approx(0.01) and s(60) == pytest.approx(0.001) and s(99) == pytest.approx(1e-4)


def test_constant_warmup_holds_the_low_lr_then_jumps_like_resnet110():
    s = _sched(name="multistep", milestones=[5, 8], warmup_epochs=2, warmup_lr=0.01, warmup_mode="constant")
    assert s(0) == s(19) == pytest.approx(0.01)
    assert s(20) == pytest.approx(0.1) and s(50) == pytest.approx(0.01) and s(80) == pytest.approx(0.001)


def test_cosine_with_linear_warmup_ramps_up_then_anneals_to_min_lr():
    s = _sched(name="cosine", warmup_epochs=1, warmup_lr=0.0, min_lr=0.001)
    assert s(0) == pytest.approx(0.0) and s(5) == pytest.approx(0.05) and s(10) == pytest.approx(0.1)
    mid = 10 + 45  # halfway through the cosine part
    assert s(mid) == pytest.approx(0.001 + 0.5 * 0.099 * (1 + math.cos(math.pi * 0.5)))
    assert s(100) == pytest.approx(0.001)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_every_recipe_config_builds_in_a_dry_run(path):
    """Model + spec + LayerOut + optimizer + one stub forward/backward, without data files or outputs."""
    from timm_drop.training import Trainer

    over = ["output_dir=/nonexistent/never-written"]
    if "imagenet" in path.stem:
        # same model, spec sites and optimizer; a 64 px stub keeps the 224 px forward out of the test budget
        over.append("data.image_size=64")
    cfg = load_config(path, over, check_paths=False)
    info = Trainer(cfg, dry_run=True).fit()
    assert info["num_classes"] in (10, 100, 1000)
    assert (info["regularizers"] > 0 or info["layerout"]) == (
        cfg.regularizer is not None or cfg.layerout is not None
    )
    assert not Path("/nonexistent/never-written").exists()


def test_reproduce_table_variants_are_valid_configs():
    import json

    mod = load_script("recipes/reproduce.py")
    assert set(mod.VARIANTS) == {
        "baseline",
        "dropblock",
        "corrdrop",
        "selectscale",
        "attentiondrop",
        "layerout",
    }
    for v in mod.VARIANTS.values():
        cfg = load_config(
            REPO / "recipes/configs/baseline_resnet20_cifar10.yaml",
            [f"regularizer={json.dumps(v.get('regularizer'))}", f"layerout={json.dumps(v.get('layerout'))}"],
            check_paths=False,
        )
        assert (cfg.regularizer is None) != (cfg.layerout is None) or v == mod.VARIANTS["baseline"]


def test_imagenet_configs_checkpoint_within_the_hour_long_epoch():
    # an ImageNet epoch is ~1,250 optimizer steps at global batch 1024: a kill must not lose all of it
    for name in ("baseline_resnet50_imagenet", "dropblock_resnet50_imagenet"):
        cfg = load_config(REPO / "recipes/configs" / f"{name}.yaml", check_paths=False)
        assert cfg.checkpoint.every_steps is not None and cfg.checkpoint.every_steps < 1281167 // 1024, name
    # a webdataset stream cannot resume mid-epoch (the run refuses every_steps there), so its config opts out
    wds = load_config(REPO / "recipes/configs/baseline_resnet50_imagenet_wds.yaml", check_paths=False)
    assert wds.checkpoint.every_steps is None
