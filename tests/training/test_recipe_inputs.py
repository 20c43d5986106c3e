"""Recipe inputs: numbers like 1e-4 are numbers, flags and overrides mix in any order, bad LayerOut settings and
YAML alias bombs get a clear error naming the field or file instead of a raw traceback or unbounded memory."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from scripts import load_script

from timm_drop.training import ConfigError, load_config

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = str(REPO / "recipes" / "configs" / "quickstart.yaml")
FAST = [
    "data.image_size=8",
    "data.train_subset=32",
    "data.eval_subset=32",
    "data.batch_size=32",
    "data.augment.crop_padding=1",
    "regularizer=null",
    "train.epochs=1",
    "sched.warmup_epochs=0",
    "log.progress_bar=false",
    "log.plot=false",
]


def train_cli():
    return load_script("recipes/train.py").main


def test_override_numbers_in_exponent_form_are_numbers():
    cfg = load_config(
        None,
        [
            "optim.lr=1e-4",
            "optim.weight_decay=5e-4",
            "sched.warmup_lr=1E-5",
            "train.clip_grad_norm=1E3",
            "model.kwargs.drop_rate=1e-1",
            "model.kwargs.extra={a: [2e-2, '3e-3']}",
            "name='1e3'",  # quoted: stays a string
        ],
    )
    assert cfg.optim.lr == 1e-4 and cfg.optim.weight_decay == 5e-4 and cfg.sched.warmup_lr == 1e-5
    assert cfg.train.clip_grad_norm == 1000.0
    assert cfg.model.kwargs["drop_rate"] == 0.1 and cfg.model.kwargs["extra"] == {"a": [0.02, "3e-3"]}
    assert cfg.name == "1e3"


def test_config_file_numbers_in_exponent_form_are_numbers(tmp_path):
    (tmp_path / "c.yaml").write_text(
        "optim:\n  lr: 1e-4\n  weight_decay: 5e-4\n  betas: [0.9, 1E-3]\nmodel:\n  kwargs: {drop_rate: 1e-1}\n"
    )
    cfg = load_config(tmp_path / "c.yaml")
    assert (cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.betas) == (1e-4, 5e-4, [0.9, 1e-3])
    assert cfg.model.kwargs == {"drop_rate": 0.1}


def test_a_non_number_string_for_a_float_field_is_still_refused():
    with pytest.raises(ConfigError, match=r"optim.lr: must be a number, got str \('fast'\)"):
        load_config(None, ["optim.lr=fast"])


def test_freeze_probs_given_a_number_names_the_field():
    for bad in ("2.0", "[0.5, 2.0]"):
        with pytest.raises(ConfigError, match=r"^layerout.freeze_probs: must be a preset name or a list"):
            load_config(None, [f"layerout.freeze_probs={bad}"])


def test_flags_and_overrides_mix_in_any_order(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    main = train_cli()
    assert main(["--config", QUICKSTART, "output_dir=r", *FAST, "--dry-run"]) == 0
    assert not (tmp_path / "r").exists()  # a dry run writes nothing
    assert main(["output_dir=r", "--config", QUICKSTART, *FAST]) == 0
    assert main(["--config", QUICKSTART, "output_dir=r", *FAST, "--resume", "latest"]) == 0
    assert main(["--config", QUICKSTART, "output_dir=r", "--overwrite", *FAST, "seed=4"]) == 0
    assert "seed: 4" in (tmp_path / "r" / "config.yaml").read_text()
    assert main(["--config", QUICKSTART, "layerout.freeze_probs=2.0", "--dry-run"]) == 2
    assert "layerout.freeze_probs" in capsys.readouterr().err


def _bomb(levels: int) -> str:
    lines = [
        "model:",
        "  name: resnet20_cifar",
        "  kwargs:",
        '    a0: &a0 ["lol", "lol", "lol", "lol", "lol"]',
    ]
    for i in range(1, levels + 1):
        lines.append(f"    a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]")
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("levels", [6, 9])
def test_an_alias_bomb_in_model_kwargs_is_refused_quickly(tmp_path, levels):
    path = tmp_path / "bomb.yaml"
    path.write_text(_bomb(levels))
    assert path.stat().st_size < 700
    t0 = time.perf_counter()
    with pytest.raises(ConfigError) as ei:
        load_config(path)
    assert time.perf_counter() - t0 < 5.0
    assert "bomb.yaml" in str(ei.value) and "YAML nodes" in str(ei.value)


def test_an_alias_bomb_in_an_override_is_refused():
    bomb = (
        "{a: &a [x, x, x, x, x, x, x, x, x], "
        + ", ".join(
            f"b{i}: &b{i} [" + ", ".join([f"*{'a' if i == 0 else f'b{i - 1}'}"] * 9) + "]" for i in range(7)
        )
        + "}"
    )
    with pytest.raises(ConfigError, match="model.kwargs: cannot parse override value .*YAML nodes"):
        load_config(None, [f"model.kwargs={bomb}"])


def test_an_oversized_config_file_is_refused_before_reading_it(tmp_path):
    from timm_drop.yaml_io import DEFAULT_MAX_BYTES

    path = tmp_path / "huge.yaml"
    with open(path, "w") as f:
        f.write("description: x\n")
        f.write("#" * (DEFAULT_MAX_BYTES + 1) + "\n")
    with pytest.raises(ConfigError, match=r"--config: .*huge.yaml: file is \d+ bytes, over the limit"):
        load_config(path)
