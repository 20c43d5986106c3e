"""The recipe in 2 real processes on CPU (gloo), started with torchrun.

``accelerate launch --cpu --num_processes 2`` starts ONE process, and ``accelerate launch --multi_gpu`` on a box
without GPUs starts two processes that each believe they are alone, so
this test launches ``torchrun --nproc_per_node 2`` with ``train.cpu=true`` (Accelerate then runs MULTI_CPU over
gloo) and asserts the world size inside the workers. The workers check:

* the world is 2 processes and Accelerate is in MULTI_CPU mode;
* the training loss goes down;
* after training, every parameter is bit-identical on both ranks (DDP + LayerOut's rank-agreed frozen sets);
* a regularizer fed the same input draws different masks on the two ranks (per-rank RNG);
* LayerOut froze the same layers on both ranks in every epoch;
* evaluation counts every eval image exactly once across the ranks (``gather_for_metrics`` + padding mask).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest
from scripts import torchrun
from tiny import dropblock_stage_rule, tiny_run

CONFIG = tiny_run(
    name="ddp",
    seed=11,
    regularizer={"rules": [dropblock_stage_rule(stages=[1, 2])]},
    # blocks, not layers: the head is never frozen, so whether the loss falls in 18 steps does not hang on the
    # draw (with unit "layer", seeds that freeze the head in early epochs leave the loss near chance)
    layerout={"freeze_probs": "random", "unit": "block", "seed": 5},
    data={
        "batch_size": 32,
        "eval_batch_size": 32,
        "train_subset": 384,
        "eval_subset": 45,
        "augment": {"crop_padding": 1, "hflip": False},
    },
    optim={"momentum": 0.9, "weight_decay": 5e-4},
    sched={"name": "constant"},
    train={"epochs": 3, "cpu": True},
)


def _worker(out_dir: str) -> None:
    import torch
    from accelerate.utils import DistributedType

    from timm_drop.regularizers.base import Regularizer
    from timm_drop.training import Trainer, load_config

    raw = dict(CONFIG, output_dir=os.path.join(out_dir, "run"))
    trainer = Trainer(load_config(raw)).setup()
    acc = trainer.accelerator
    assert acc.num_processes == 2, f"expected 2 processes, got {acc.num_processes}"
    assert acc.distributed_type == DistributedType.MULTI_CPU, acc.distributed_type

    # Same input on both ranks; a regularizer in train mode must draw a different mask on each.
    reg = next(m for m in trainer.unwrapped.modules() if isinstance(m, Regularizer))
    was = reg.training
    reg.train()
    with torch.no_grad():
        kept = (reg(torch.ones(4, 8, 8, 8)) != 0).float()
    reg.train(was)
    masks = acc.gather(kept[None])
    masks_differ = not torch.equal(masks[0], masks[1])

    frozen_per_epoch: list[list[str]] = []
    start = trainer.layerout.start_epoch

    def recording_start(epoch):
        names = start(epoch)
        frozen_per_epoch.append(sorted(names))
        return names

    trainer.layerout.start_epoch = recording_start
    trainer.fit()

    flat = torch.cat([p.detach().reshape(-1) for p in trainer.unwrapped.parameters()])
    params = acc.gather(flat[None])
    weights_equal = torch.equal(params[0], params[1])
    frozen_all = [None, None]
    torch.distributed.all_gather_object(frozen_all, frozen_per_epoch)
    result = {
        "rank": acc.process_index,
        "world": acc.num_processes,
        "masks_differ": masks_differ,
        "weights_equal": weights_equal,
        "frozen_equal": frozen_all[0] == frozen_all[1],
        "frozen": frozen_per_epoch,
    }
    if acc.is_main_process:
        result["rows"] = trainer.metrics.rows
    Path(out_dir, f"result_{acc.process_index}.json").write_text(json.dumps(result))
    acc.wait_for_everyone()
    torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_two_process_gloo_training_keeps_ranks_in_sync_with_per_rank_masks(tmp_path):
    if shutil.which("torchrun") is None and not _has_module("torch.distributed.run"):
        pytest.skip("torchrun is not available")
    # the workers import this checkout's timm_drop, whatever copy is installed, and tests/ (this file imports tiny)
    torchrun(__file__, [str(tmp_path)])
    results = [json.loads((tmp_path / f"result_{r}.json").read_text()) for r in range(2)]
    assert [r["world"] for r in results] == [2, 2]
    assert all(r["masks_differ"] for r in results), "regularizer masks were identical on both ranks"
    assert all(r["weights_equal"] for r in results), "parameters diverged across ranks"
    assert all(r["frozen_equal"] for r in results), "LayerOut froze different layers on the two ranks"
    frozen = results[0]["frozen"]
    assert len(frozen) == 3 and any(frozen)  # LayerOut really froze something
    rows = results[0]["rows"]
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert rows[-1]["train_loss"] < rows[0]["train_loss"] - 0.05, [r["train_loss"] for r in rows]
    assert all(r["eval_images"] == 45 for r in rows)  # 45 images over 2 ranks: padded, then masked out


def _has_module(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


if __name__ == "__main__":
    _worker(sys.argv[1])
