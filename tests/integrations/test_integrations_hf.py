"""Hugging Face Trainer + TimmWrapperForImageClassification: the callback drives schedules and LayerOut."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="transformers is a dev extra (pip install -e .[dev])")

import timm_drop  # noqa: E402
from timm_drop import LayerOut  # noqa: E402
from timm_drop.create import REGISTERED_NAME  # noqa: E402
from timm_drop.integrations.hf import TimmDropCallback  # noqa: E402
from timm_drop.regularizers import Regularizer  # noqa: E402

SPEC = {
    "rules": [
        {
            "regularizer": "dropblock",
            "label": "hf dropblock",
            "params": {"drop_prob": 0.2, "block_size": 3},
            "sites": ["stage"],
            "schedule": {"kind": "linear", "start": 0.0, "end": 1.0},
        }
    ]
}


class _Images(torch.utils.data.Dataset):
    def __init__(self, n: int = 8) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = torch.rand(n, 3, 32, 32, generator=g)
        self.y = torch.randint(0, 3, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict:
        return {"pixel_values": self.x[i], "labels": self.y[i]}


class _Recorder(transformers.TrainerCallback):
    def __init__(self, model, layerout=None) -> None:
        self.regs = [m for m in model.modules() if isinstance(m, Regularizer)]
        self.layerout = layerout
        self.strengths: list[float] = []
        self.epochs: list[int] = []
        self.frozen_moved: list[bool] = []
        self._before: dict = {}

    def on_step_begin(self, args, state, control, **kw):
        if self.layerout is not None:
            self._before = {id(p): p.detach().clone() for p in self.layerout.frozen_parameters}
            self._frozen = list(self.layerout.frozen_parameters)

    def on_step_end(self, args, state, control, **kw):
        self.strengths.append(self.regs[0].strength.item())
        if self.layerout is not None:
            self.epochs.append(self.layerout.epoch)
            self.frozen_moved.append(any(not torch.equal(p.detach(), self._before[id(p)]) for p in self._frozen))


def _trainer(tmp_path, callbacks, max_steps=4):
    config = transformers.TimmWrapperConfig(
        architecture=REGISTERED_NAME, num_labels=3, model_args={"model": "resnet10t", "spec": SPEC}
    )
    model = transformers.TimmWrapperForImageClassification(config)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=max_steps,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        learning_rate=0.05,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    return model, lambda cbs: transformers.Trainer(model=model, args=args, train_dataset=_Images(), callbacks=cbs)


def test_timm_wrapper_config_builds_the_regularized_model_by_name():
    config = transformers.TimmWrapperConfig(
        architecture=REGISTERED_NAME, num_labels=3, model_args={"model": "resnet10t", "spec": SPEC}
    )
    model = transformers.TimmWrapperForImageClassification(config)
    assert len([m for m in model.modules() if isinstance(m, Regularizer)]) == 4
    assert model.timm_model.pretrained_cfg["timm_drop"]["model"] == "resnet10t"


def test_hf_trainer_callback_drives_schedules_per_optimizer_step(tmp_path):
    model, make = _trainer(tmp_path, None)
    recorder = _Recorder(model)
    trainer = make([TimmDropCallback(), recorder])
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # a driven schedule never warns "never driven"
        warnings.filterwarnings("ignore", message="(?!.*never driven)")
        trainer.train()
    assert recorder.strengths == pytest.approx([0.25, 0.5, 0.75, 1.0])  # 4 steps of 2 micro-batches each
    assert not trainer.optimizer.optimizer._optimizer_step_post_hooks  # removed at on_train_end


def test_hf_trainer_without_the_callback_runs_at_full_strength(tmp_path):
    model, make = _trainer(tmp_path, None, max_steps=1)
    recorder = _Recorder(model)
    with pytest.warns(UserWarning, match="hf dropblock"):
        make([recorder]).train()
    assert recorder.strengths == [1.0]


def test_hf_trainer_callback_runs_layerout_epochs(tmp_path):
    model, make = _trainer(tmp_path, None)
    lo = LayerOut(freeze_probs="random", seed=1)  # unbound: the callback binds it to the Trainer's model
    recorder = _Recorder(model, lo)
    make([TimmDropCallback(layerout=lo), recorder]).train()
    # 8 images, batch 2, accumulation 2: 2 optimizer steps per epoch
    assert recorder.epochs == [0, 1, 1, 2]
    assert [h["epoch"] for h in lo.history][:2] == [0, 1] and all(h["n_frozen"] for h in lo.history)
    assert recorder.frozen_moved == [False] * 4
    assert timm_drop.summary(model).rules[0].position == "progress 1"


_LOAD_IN_A_FRESH_PROCESS = """
import json, sys, torch, transformers
import timm_drop
folder, loader = sys.argv[1], sys.argv[2]
cls = getattr(transformers, loader)
model = cls.from_pretrained(folder)
ref = torch.load(folder + "/reference.pt")
regs = [m for m in model.modules() if isinstance(m, timm_drop.Regularizer)]
with torch.no_grad():
    model.eval()
    same_eval = torch.equal(model(pixel_values=ref["x"]).logits, ref["eval"])
    model.train()
    torch.manual_seed(7)
    same_train = torch.equal(model(pixel_values=ref["x"]).logits, ref["train"])
print(json.dumps({
    "class": type(model).__name__, "regularizers": len(regs), "same_eval": same_eval, "same_train": same_train,
    "strengths": sorted({float(r.strength) for r in regs}), "counts": sorted({int(r.schedule_count) for r in regs}),
    "spec": model.timm_model.pretrained_cfg["timm_drop"]["spec"],
}))
"""


@pytest.mark.parametrize("loader", ["TimmWrapperForImageClassification", "AutoModelForImageClassification"])
def test_save_pretrained_then_from_pretrained_in_a_fresh_process_restores_the_regularized_model(tmp_path, loader):
    # transformers 5 builds the model on the meta device inside from_pretrained, then loads the weights
    import json
    import subprocess
    import sys

    from scripts import child_env

    config = transformers.TimmWrapperConfig(
        architecture=REGISTERED_NAME, num_labels=3, model_args={"model": "resnet10t", "spec": SPEC}
    )
    torch.manual_seed(0)
    model = transformers.TimmWrapperForImageClassification(config)
    model.save_pretrained(tmp_path)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        model.eval()
        reference = {"x": x, "eval": model(pixel_values=x).logits}
        model.train()
        torch.manual_seed(7)
        reference["train"] = model(pixel_values=x).logits
    assert not torch.equal(reference["train"], model.eval()(pixel_values=x).logits)
    torch.save(reference, tmp_path / "reference.pt")
    done = subprocess.run(
        [sys.executable, "-c", _LOAD_IN_A_FRESH_PROCESS, str(tmp_path), loader],
        capture_output=True, text=True, env=child_env(), timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got["class"] == "TimmWrapperForImageClassification"
    assert got["regularizers"] == 4 and got["strengths"] == [1.0] and got["counts"] == [0]
    assert got["same_eval"] and got["same_train"]
    assert got["spec"] == timm_drop.load_spec(SPEC).to_dict()
