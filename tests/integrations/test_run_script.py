"""What the README's timm train.py command relies on: `python -m timm_drop.run SCRIPT` registers
timm_drop_regularized before an unmodified script runs, train.py's `--model-kwargs` strings build the model, and a
self-counting schedule moves with training forwards only (the script never calls timm_drop)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import timm_drop

ROOT = Path(__file__).resolve().parents[2]

# Mirrors timm train.py: argparse with timm.utils.ParseKwargs, the same create_model call, a loop with no
# timm_drop call, eval forwards for validation. It never imports timm_drop.
SCRIPT = '''
import argparse, json, sys
import torch
from timm import utils
from timm.models import create_model

p = argparse.ArgumentParser()
p.add_argument("--model")
p.add_argument("--model-kwargs", nargs="*", default={}, action=utils.ParseKwargs)
args = p.parse_args()
model = create_model(args.model, pretrained=False, in_chans=None, num_classes=4, drop_rate=0.0,
                     drop_path_rate=None, drop_block_rate=None, global_pool=None, bn_momentum=None, bn_eps=None,
                     scriptable=False, checkpoint_path=None, **args.model_kwargs)
opt = torch.optim.SGD(model.parameters(), lr=0.01)
seen = []
regs = [m for m in model.modules() if hasattr(m, "schedule_count")]
for step in range(4):
    model.train()
    torch.nn.functional.cross_entropy(model(torch.rand(2, 3, 32, 32)), torch.tensor([0, 1])).backward()
    opt.step(); opt.zero_grad()
    seen.append(regs[0].strength.item())
    model.eval()
    with torch.no_grad():
        model(torch.rand(2, 3, 32, 32))
json.dump({"seen": seen, "counts": sorted({int(r.schedule_count) for r in regs}), "n": len(regs),
           "arch": model.pretrained_cfg["architecture"]}, open(sys.argv[0] + ".json", "w"))
'''


def test_run_module_lets_an_unmodified_script_train_a_regularized_model_by_name(tmp_path):
    script = tmp_path / "train_like.py"
    script.write_text(SCRIPT)
    spec = tmp_path / "spec.yaml"
    spec.write_text(
        "rules:\n  - regularizer: dropblock\n    params: {drop_prob: 0.2, block_size: 3}\n    sites: [stage]\n"
        "    schedule: {kind: linear, start: 0.0, end: 1.0}\n"
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "timm_drop.run", str(script), "--model", "timm_drop_regularized",
           "--model-kwargs", "model=resnet10t", f"spec={spec}", "schedule_steps=4"]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(Path(str(script) + ".json").read_text())
    assert out["n"] == 4 and out["arch"] == "timm_drop_regularized"
    assert out["seen"] == [0.0, 0.25, 0.5, 0.75]  # strength used by training forwards 1..4; eval never counts
    assert out["counts"] == [4]
    assert "never driven" not in proc.stderr


def test_run_module_reports_a_missing_script(capsys):
    from timm_drop.run import main

    assert main(["no_such_script.py"]) == 2
    assert "no_such_script.py" in capsys.readouterr().err
    assert timm_drop.create.REGISTERED_NAME == "timm_drop_regularized"
