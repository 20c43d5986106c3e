"""Image-folder loaders keep their worker processes across epochs (``persistent_workers``), and the augmentation
stream stays a pure function of ``(seed, epoch, rank)``: a loader started at epoch 1 (a resumed run) yields what
the long-lived one yields at epoch 1."""

from __future__ import annotations

import torch
from tiny import write_image_folder

import timm_drop  # noqa: F401
from timm_drop.training import Trainer, load_config


def _trainer(tmp_path, name):
    raw = {
        "output_dir": str(tmp_path / name),
        "model": {"name": "resnet20_cifar"},
        "data": {
            "dataset": "imagefolder",
            "root": str(tmp_path / "imgs"),
            "image_size": 8,
            "batch_size": 2,
            "num_workers": 2,
            "augment": {"random_resized_crop": True, "hflip": True, "crop_padding": 0},
        },
        "train": {"epochs": 2},
        "log": {"progress_bar": False, "plot": False},
    }
    return Trainer(load_config(raw)).setup()


def _epoch(loader, epoch):
    loader.set_epoch(epoch)
    batches = list(loader)
    pids = sorted(w.pid for w in loader.loader._iterator._workers)
    return torch.cat([x for x, _ in batches]), pids


def test_workers_survive_epochs_and_the_stream_depends_only_on_the_epoch(tmp_path):
    write_image_folder(tmp_path / "imgs")
    long = _trainer(tmp_path, "long")
    assert long.train_loader.loader.persistent_workers and long.eval_loader.loader.persistent_workers
    x0, pids0 = _epoch(long.train_loader, 0)
    x1, pids1 = _epoch(long.train_loader, 1)
    assert pids0 == pids1 and len(pids0) == 2
    assert not torch.equal(x0, x1)
    fresh = _trainer(tmp_path, "fresh")
    y1, _ = _epoch(fresh.train_loader, 1)
    assert torch.equal(x1, y1)


def test_fit_stops_its_worker_processes_when_it_returns(tmp_path):
    # workers that outlive fit() idle until the loader is garbage-collected, and one freed in a reference cycle
    # waits out torch's 5 s join timeout per worker at interpreter exit
    import multiprocessing

    write_image_folder(tmp_path / "imgs")
    before = {p.pid for p in multiprocessing.active_children()}
    trainer = _trainer(tmp_path, "run")

    def running_workers():
        return [p for p in multiprocessing.active_children() if p.pid not in before and p.is_alive()]

    trainer.fit(max_epochs=1)  # a time slice: the next fit() must start workers again
    assert not running_workers(), f"fit() returned with {len(running_workers())} data worker process(es) running"
    trainer.fit()
    assert [r["epoch"] for r in trainer.metrics.rows] == [1, 2]
    assert not running_workers()
