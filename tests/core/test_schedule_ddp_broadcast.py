"""DDP's buffer broadcast keeps the schedule strength of every rank in step with rank 0's (README / docs and
``regularizers/base.py`` say so): the strength is a non-persistent buffer, which DDP broadcasts from rank 0 at
each training forward like BatchNorm's running statistics. Two real gloo processes, driven to different
progress on purpose."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import timm_drop

SPEC = {
    "rules": [
        {
            "regularizer": "dropout",
            "params": {"drop_prob": 0.5},
            "sites": "module",
            "name": "0",
            "schedule": {"kind": "linear", "start": 0.0, "end": 1.0},
        }
    ]
}


def _worker(rank: int, init: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    try:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        model = timm_drop.apply_regularizer(model, SPEC, example_input=torch.randn(2, 3, 8, 8))
        ddp = nn.parallel.DistributedDataParallel(model)  # broadcast_buffers=True, torch's default
        # each step's set_progress happens after the wrap; here the ranks disagree on purpose before the forward
        timm_drop.set_progress(model, 0.8 if rank == 0 else 0.1)
        (reg,) = [m for m in model.modules() if isinstance(m, timm_drop.Regularizer)]
        before = float(reg.strength)
        ddp.train()
        ddp(torch.randn(2, 3, 8, 8)).sum().backward()
        torch.save({"before": before, "after": float(reg.strength)}, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_broadcasts_rank_0s_schedule_strength_to_every_rank(tmp_path):
    mp.spawn(_worker, args=(f"file://{tmp_path}/pg", str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert (r0["before"], r1["before"]) == (pytest.approx(0.8), pytest.approx(0.1))  # driven apart on purpose
    assert r0["after"] == r1["after"] == r0["before"]  # rank 1 follows rank 0 after one training forward
