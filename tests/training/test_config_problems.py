"""Recipe configs report every problem at once, each with its dotted field and the file and line it came from."""

from __future__ import annotations

import re

import pytest

from timm_drop.training import ConfigError, load_config


def _where(err: ConfigError) -> list[tuple[str, str | None, int | None]]:
    return [(p.key, p.source and p.source.rsplit("/", 1)[-1], p.line) for p in err.problems]


def test_three_mistakes_in_three_sections_come_back_in_one_error(tmp_path):
    path = tmp_path / "three.yaml"
    path.write_text(
        "name: three_mistakes\n"
        "data:\n"
        "  dataset: digits\n"
        "  batch_size: 0\n"  # line 4
        "optim:\n"
        "  lr: -0.1\n"  # line 6
        "checkpoint:\n"
        "  every: 0\n"  # line 8
    )
    with pytest.raises(ConfigError) as ei:
        load_config(path)
    msg = str(ei.value)
    assert "3 problems" in msg
    for line, text in [
        (4, "data.batch_size: must be >= 1, got 0"),
        (6, "optim.lr: must be > 0, got -0.1"),
        (8, "checkpoint.every: must be >= 1, got 0"),
    ]:
        assert re.search(rf"^  - {re.escape(text)} \(\S*three\.yaml, line {line}\)$", msg, re.M), (text, msg)
    assert _where(ei.value) == [
        ("data.batch_size", "three.yaml", 4),
        ("optim.lr", "three.yaml", 6),
        ("checkpoint.every", "three.yaml", 8),
    ]


def test_wrong_types_and_unknown_keys_in_several_sections_are_all_reported(tmp_path):
    path = tmp_path / "types.yaml"
    path.write_text(
        "data:\n"
        "  dataset: mnist\n"  # line 2
        "optim:\n"
        "  lr: fast\n"  # line 4
        "train:\n"
        "  epoch: 3\n"  # line 6
        "  precision: fp8\n"  # line 7
    )
    with pytest.raises(ConfigError) as ei:
        load_config(path)
    msg = str(ei.value)
    assert "4 problems" in msg
    assert "data.dataset: must be one of" in msg and "optim.lr: must be a number, got str ('fast')" in msg
    assert "train.epoch: unknown key; did you mean train.epochs?" in msg
    assert "train.precision: must be one of" in msg
    assert sorted(_where(ei.value)) == [
        ("data.dataset", "types.yaml", 2),
        ("optim.lr", "types.yaml", 4),
        ("train.epoch", "types.yaml", 6),
        ("train.precision", "types.yaml", 7),
    ]


def test_a_single_mistake_keeps_its_message_and_adds_where_it_is(tmp_path):
    path = tmp_path / "one.yaml"
    path.write_text("optim:\n  name: sgd\n  lr: -0.1\n")
    with pytest.raises(ConfigError, match=r"^optim\.lr: must be > 0, got -0\.1 \(.*one\.yaml, line 3\)$"):
        load_config(path)


def test_a_mistake_inherited_from_a_base_file_names_the_base_file_and_line(tmp_path):
    (tmp_path / "base.yaml").write_text("seed: 1\ntrain:\n  epochs: 0\n")
    (tmp_path / "child.yaml").write_text("base: base.yaml\nlog:\n  log_interval: 0\n")
    with pytest.raises(ConfigError) as ei:
        load_config(tmp_path / "child.yaml")
    where = _where(ei.value)
    assert ("train.epochs", "base.yaml", 3) in where and ("log.log_interval", "child.yaml", 3) in where


def test_a_value_given_as_an_override_is_not_blamed_on_the_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  lr: 0.1\ntrain:\n  epochs: 0\n")
    with pytest.raises(ConfigError) as ei:
        load_config(path, ["optim.lr=-1"])
    assert ("optim.lr", "override optim.lr", None) in _where(ei.value)
    assert ("train.epochs", "c.yaml", 4) in _where(ei.value)
    assert "optim.lr: must be > 0, got -1.0 (override optim.lr)" in str(ei.value)


def test_a_follow_on_check_does_not_repeat_a_reported_mistake():
    # a negative lr would also put sched.min_lr (0) above it: only the lr itself is at fault
    with pytest.raises(ConfigError) as ei:
        load_config(None, ["optim.lr=-0.1", "data.augment.mixup=0.2", "data.batch_size=-3"])
    assert [p.key for p in ei.value.problems] == ["data.batch_size", "optim.lr"]


def test_a_key_given_twice_is_refused_with_both_problems_like_a_spec(tmp_path):
    # YAML keeps only the last value of a repeated key: silently training with the other one loses a setting
    (tmp_path / "base.yaml").write_text("optim:\n  lr: 0.1\n  lr: 0.2\n")
    path = tmp_path / "c.yaml"
    path.write_text("base: base.yaml\ntrain:\n  epochs: 3\n  epochs: 5\n")
    with pytest.raises(ConfigError) as ei:
        load_config(path)
    assert sorted(_where(ei.value)) == [("optim.lr", "base.yaml", 3), ("train.epochs", "c.yaml", 4)]
    assert "train.epochs: given twice; YAML would silently keep only the last one" in str(ei.value)
