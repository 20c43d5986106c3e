"""Create by name (timm_drop.create_model / timm.create_model('timm_drop_regularized', ...)); the spec travels
with the model through save_for_hf and local-dir loading."""

from __future__ import annotations

import json

import pytest
import timm
import torch
from torch import nn

import timm_drop
from timm_drop.create import CFG_KEY, REGISTERED_NAME
from timm_drop.regularizers import Regularizer

SPEC = {
    "rules": [
        {
            "regularizer": "dropblock",
            "label": "db",
            "params": {"drop_prob": 0.2, "block_size": 3},
            "sites": ["stage"],
            "stages": [3, 4],
            "schedule": {"kind": "linear", "start": 0.0, "end": 1.0},
        },
        {"regularizer": "droppath", "params": {"drop_prob": 0.1}, "sites": ["residual"]},
    ]
}


def _table(model: nn.Module) -> list[tuple]:
    return [(e.site, e.regularizer, e.params, e.schedule, e.insertion) for e in timm_drop.applied_plans(model)[-1].entries]


def _eval_out(model: nn.Module) -> torch.Tensor:
    torch.manual_seed(0)
    with torch.no_grad():
        return model.eval()(torch.rand(2, 3, 32, 32))


def test_create_model_builds_the_timm_model_with_the_spec_applied():
    model = timm_drop.create_model("resnet10t", spec=SPEC, num_classes=5)
    bare = timm.create_model("resnet10t", num_classes=5)
    assert type(model) is type(bare) and model.num_classes == 5
    assert set(model.state_dict()) == set(bare.state_dict())
    assert {e.regularizer for e in timm_drop.applied_plans(model)[-1].entries} == {"dropblock", "droppath"}
    assert _table(model) == _table(timm_drop.apply_regularizer(bare, SPEC))
    assert model.pretrained_cfg["architecture"] == REGISTERED_NAME
    assert model.pretrained_cfg[CFG_KEY]["model"] == "resnet10t"
    assert timm_drop.load_spec(model.pretrained_cfg[CFG_KEY]["spec"]) == timm_drop.load_spec(SPEC)


def test_unmodified_script_can_build_it_with_timm_create_model_and_kwargs(tmp_path):
    path = tmp_path / "spec.yaml"
    path.write_text(timm_drop.load_spec(SPEC).to_yaml())
    model = timm.create_model(REGISTERED_NAME, model="resnet10t", spec=str(path), num_classes=3)
    assert len(timm_drop.applied_plans(model)[-1].entries) == len(timm_drop.applied_plans(timm_drop.create_model("resnet10t", SPEC, num_classes=3))[-1].entries)
    with pytest.raises(ValueError, match="model="):
        timm.create_model(REGISTERED_NAME, spec=SPEC)
    with pytest.raises(ValueError, match="spec="):
        timm.create_model(REGISTERED_NAME, model="resnet10t")


def test_pretrained_weights_load_before_the_rewrite(tmp_path):
    donor = timm.create_model("resnet10t", num_classes=4)
    ckpt = tmp_path / "weights.pth"
    torch.save(donor.state_dict(), ckpt)
    model = timm_drop.create_model(
        "resnet10t", spec=SPEC, pretrained=True, num_classes=4, pretrained_cfg_overlay={"file": str(ckpt), "num_classes": 4}
    )
    for k, v in donor.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
    torch.testing.assert_close(_eval_out(model), _eval_out(donor))


def test_save_for_hf_then_local_dir_rebuilds_the_same_regularized_model(tmp_path):
    from timm.models import save_for_hf

    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(timm_drop.load_spec(SPEC).to_yaml())
    model = timm.create_model(REGISTERED_NAME, model="resnet10t", spec=str(spec_file), num_classes=3)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)  # weights differ from any fresh init
    save_for_hf(model, tmp_path / "saved")
    spec_file.unlink()  # the folder carries the spec by value
    config = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert config["architecture"] == REGISTERED_NAME

    for load in (timm.create_model, timm_drop.create_model):
        again = load(f"local-dir:{tmp_path / 'saved'}", pretrained=True)
        assert _table(again) == _table(model)
        for k, v in model.state_dict().items():
            assert torch.equal(again.state_dict()[k], v), k
        torch.testing.assert_close(_eval_out(again), _eval_out(model))
        regs = [m for m in again.modules() if isinstance(m, Regularizer)]
        assert regs and all(r.training is False for r in regs)  # eval'd by _eval_out; still there
        again.train()
        torch.manual_seed(1)
        x = torch.rand(2, 3, 32, 32)
        assert not torch.equal(again(x), again(x))  # it still regularizes


def test_model_by_name_with_schedule_steps_moves_in_a_loop_that_never_calls_timm_drop():
    model = timm.create_model(REGISTERED_NAME, model="resnet10t", spec=SPEC, schedule_steps=4, num_classes=3)
    assert model.pretrained_cfg[CFG_KEY]["spec"]["rules"][0]["schedule"]["steps"] == 4
    scheduled = [m for m in model.modules() if isinstance(m, Regularizer) and m.schedule is not None]
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    model.train()
    seen = []
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(5):  # a plain loop: forward, backward, step; no timm_drop call
            nn.functional.cross_entropy(model(torch.rand(2, 3, 32, 32)), torch.tensor([0, 1])).backward()
            opt.step()
            opt.zero_grad()
            seen.append(scheduled[0].strength.item())
    assert seen == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0])
    with pytest.raises(ValueError, match="schedule_steps"):
        timm_drop.create_model("resnet10t", SPEC, schedule_steps=0)


# -- a saved model's config.json is data -------------------------------------------------------------------------


def _saved(tmp_path, name: str = "resnet10t", **kwargs):
    from timm.models import save_for_hf

    torch.manual_seed(0)
    model = timm_drop.create_model(name, spec=SPEC, **kwargs)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)  # weights differ from any fresh init
    folder = tmp_path / "saved"
    save_for_hf(model, folder)
    return model, folder


def _edit_config(folder, change) -> None:
    path = folder / "config.json"
    config = json.loads(path.read_text())
    change(config)
    path.write_text(json.dumps(config))


def _set_stored_spec(value):
    def change(config):
        config["pretrained_cfg"][CFG_KEY]["spec"] = value
        config["model_args"]["spec"] = value

    return change


def test_a_spec_string_in_a_saved_config_is_never_read_as_a_path(tmp_path):
    _, folder = _saved(tmp_path)
    secret = tmp_path / "secret.txt"
    secret.write_text("root:x:0:0:do-not-quote-me\n")
    other = tmp_path / "other.yaml"  # a valid spec file that happens to exist on this machine
    other.write_text(timm_drop.load_spec({"rules": [{"regularizer": "dropout", "params": {"drop_prob": 0.1}, "sites": ["stage"]}]}).to_yaml())
    for value in (str(secret), str(other), "rules: [{regularizer: dropout, params: {drop_prob: 0.1}, sites: [stage]}]"):
        _edit_config(folder, _set_stored_spec(value))
        with pytest.raises(ValueError, match="mapping") as ei:
            timm.create_model(f"local-dir:{folder}", pretrained=True)
        assert "do-not-quote-me" not in str(ei.value) and "config.json" in str(ei.value)


@pytest.mark.slow
def test_a_fifo_named_as_the_spec_in_a_saved_config_does_not_block(tmp_path):
    import os
    import subprocess
    import sys

    from scripts import child_env

    _, folder = _saved(tmp_path)
    fifo = tmp_path / "pipe.yaml"
    os.mkfifo(fifo)
    _edit_config(folder, _set_stored_spec(str(fifo)))
    code = (
        "import sys, timm, timm_drop\n"
        "try:\n    timm.create_model('local-dir:' + sys.argv[1], pretrained=True)\n"
        "except ValueError as e:\n    print('refused:', e)\n"
    )
    done = subprocess.run([sys.executable, "-c", code, str(folder)], capture_output=True, text=True, timeout=120,
                          env=child_env())  # fmt: skip
    assert "refused:" in done.stdout and "mapping" in done.stdout, done.stderr[-2000:]


def test_a_spec_path_in_model_args_alone_is_refused(tmp_path):
    _, folder = _saved(tmp_path)
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(timm_drop.load_spec(SPEC).to_yaml())

    def change(config):
        del config["pretrained_cfg"][CFG_KEY]
        config["model_args"]["spec"] = str(spec_file)

    _edit_config(folder, change)
    with pytest.raises(ValueError, match="model_args.spec"):
        timm.create_model(f"local-dir:{folder}", pretrained=True)


def test_the_saved_base_model_must_be_a_registered_name(tmp_path):
    _, folder = _saved(tmp_path)
    _edit_config(folder, lambda c: c["pretrained_cfg"][CFG_KEY].update(model=f"local-dir:{tmp_path}"))
    with pytest.raises(ValueError, match="registered timm model"):
        timm.create_model(f"local-dir:{folder}", pretrained=True)


# -- the project's own CIFAR models load the caller's weights ----------------------------------------------------


def test_save_for_hf_then_local_dir_round_trips_a_cifar_model(tmp_path):
    model, folder = _saved(tmp_path, "resnet20_cifar", num_classes=7)
    for load in (timm.create_model, timm_drop.create_model):
        again = load(f"local-dir:{folder}", pretrained=True)
        assert _table(again) == _table(model)
        for k, v in model.state_dict().items():
            assert torch.equal(again.state_dict()[k], v), k
        torch.testing.assert_close(_eval_out(again), _eval_out(model))


def test_a_plain_cifar_model_round_trips_through_save_for_hf(tmp_path):
    from timm.models import save_for_hf

    model = timm.create_model("wrn20_4_cifar", num_classes=5)
    save_for_hf(model, tmp_path / "plain")
    again = timm.create_model(f"local-dir:{tmp_path / 'plain'}", pretrained=True)
    assert all(torch.equal(again.state_dict()[k], v) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="no pretrained weights"):
        timm.create_model("wrn20_4_cifar", pretrained=True)  # nothing named: still nothing to download
