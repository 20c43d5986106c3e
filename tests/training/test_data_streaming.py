"""``data.dataset: hfds`` (a Hugging Face ``datasets`` folder written by ``save_to_disk``) and ``wds`` (webdataset tar
shards) train through the recipe: each test writes its own tiny data (no network), trains one epoch with
``Trainer`` and checks that the epoch holds every training image exactly once and that eval covers the eval split.

Every image is one flat colour whose red value encodes its index, so a normalised batch can be read back to the
indices it holds (JPEG keeps a flat colour within +-1).
"""

from __future__ import annotations

import io
import json
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scripts import torchrun

import timm_drop  # noqa: F401
from timm_drop.training import ConfigError, Trainer, load_config

if __name__ != "__main__":  # the torchrun workers below import only what they use
    datasets = pytest.importorskip(
        "datasets", reason="the streaming extra: pip install 'timm_drop[streaming]'"
    )
    pytest.importorskip("webdataset", reason="the streaming extra: pip install 'timm_drop[streaming]'")

N_TRAIN, N_EVAL, SIZE, CLASSES = 40, 12, 12, 4


def _image(i: int) -> Image.Image:
    return Image.new("RGB", (SIZE, SIZE), (4 * i + 3, 255 - 4 * i, (37 * i) % 256))


def _label(i: int) -> int:
    return i % CLASSES


def _indices(x: torch.Tensor, loader) -> list[int]:
    """The image indices in a normalised batch (read back from the red channel)."""
    red = x[:, 0].mean(dim=(1, 2)) * loader.std[0] + loader.mean[0]
    return [round((255 * r - 3) / 4) for r in red.tolist()]


def _hf_folder(root) -> None:
    feats = datasets.Features(
        {"img": datasets.Image(), "target": datasets.ClassLabel(names=[f"c{k}" for k in range(CLASSES)])}
    )

    def split(offset: int, n: int):
        ids = range(offset, offset + n)
        return datasets.Dataset.from_dict(
            {"img": [_image(i) for i in ids], "target": [_label(i) for i in ids]}, features=feats
        )

    datasets.DatasetDict({"train": split(0, N_TRAIN), "test": split(N_TRAIN, N_EVAL)}).save_to_disk(str(root))


def _jpeg(i: int) -> bytes:
    buf = io.BytesIO()
    _image(i).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def _wds_shards(root) -> None:
    root.mkdir()

    def shard(name: str, ids) -> None:
        with tarfile.open(root / name, "w") as tar:
            for i in ids:
                for ext, payload in (("jpg", _jpeg(i)), ("cls", str(_label(i)).encode())):
                    info = tarfile.TarInfo(f"{i:06d}.{ext}")
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))

    shard("train-000000.tar", range(0, N_TRAIN // 2))
    shard("train-000001.tar", range(N_TRAIN // 2, N_TRAIN))
    shard("val-000000.tar", range(N_TRAIN, N_TRAIN + N_EVAL // 2))
    shard("val-000001.tar", range(N_TRAIN + N_EVAL // 2, N_TRAIN + N_EVAL))


def _raw(tmp_path, data: dict) -> dict:
    return {
        "output_dir": str(tmp_path / "run"),
        "model": {"name": "resnet20_cifar"},
        "data": {
            "image_size": SIZE,
            "batch_size": 10,
            "eval_batch_size": 5,
            "augment": {"crop_padding": 0, "hflip": False},
            **data,
        },
        "train": {"epochs": 1},
        "log": {"progress_bar": False, "plot": False},
    }


def _hfds_data(tmp_path, hfds: dict, **kw) -> dict:
    """The data section for the ``save_to_disk`` folder that :func:`_hf_folder` wrote under ``tmp_path / "hf"``."""
    return {"dataset": "hfds", "root": str(tmp_path / "hf"), "num_workers": 0, "hfds": hfds, **kw}


def _wds_data(tmp_path, **kw) -> dict:
    return {
        "dataset": "wds",
        "root": str(tmp_path / "shards"),
        "num_classes": CLASSES,
        "num_workers": 2,
        "wds": {
            "train_split": "train-{000000..000001}.tar",
            "train_samples": N_TRAIN,
            "eval_split": "val-{000000..000001}.tar",
            "eval_samples": N_EVAL,
        },
        **kw,
    }


def _epoch_indices(loader, epoch: int) -> tuple[list[int], list[int]]:
    loader.set_epoch(epoch)
    seen, labels = [], []
    for x, y in loader:
        seen += _indices(x, loader)
        labels += y.tolist()
    return seen, labels


def _check_one_epoch(trainer, *, dry_run_knows: bool = True) -> None:
    """Every training image once in epoch 0 (with its label), then a real one-epoch run that evaluates; the dry run
    of the same config counts the same steps per epoch without reading an image."""
    assert trainer.num_classes == CLASSES and trainer.steps_per_epoch == N_TRAIN // 10
    if dry_run_knows:
        dry = Trainer(trainer.cfg, dry_run=True).setup()
        assert (dry.steps_per_epoch, dry.num_classes) == (N_TRAIN // 10, CLASSES)
    seen, labels = _epoch_indices(trainer.train_loader, 0)
    assert sorted(seen) == list(range(N_TRAIN))
    assert labels == [_label(i) for i in seen]
    result = trainer.fit()
    last = result["last"]
    assert last["epoch"] == 1 and last["step"] == N_TRAIN // 10
    assert last["eval_images"] == N_EVAL and 0.0 <= last["eval_top1"] <= 100.0
    assert (trainer.out / "result.json").is_file()
    _close(trainer.train_loader, trainer.eval_loader)


def _close(*loaders) -> None:
    """Stop the loaders' workers now rather than at an arbitrary garbage collection in a later test."""
    for loader in loaders:
        loader.close()


def test_hfds_save_to_disk_folder_trains_one_epoch_seeing_each_image_once(tmp_path):
    _hf_folder(tmp_path / "hf")
    raw = _raw(tmp_path, _hfds_data(tmp_path, {"image_key": "img", "label_key": "target"}))
    _check_one_epoch(Trainer(load_config(raw)).setup())


def test_hfds_dataset_id_goes_through_timms_create_dataset(tmp_path, capsys):
    """``hfds.name``: anything ``datasets.load_dataset`` takes (here a local folder of parquet files, so no network)
    with ``data.root`` as its cache dir; the dry run does not load it and says the steps are unknown."""
    folder = tmp_path / "pq" / "data"
    folder.mkdir(parents=True)
    _hf_folder(tmp_path / "hf")
    saved = datasets.load_from_disk(str(tmp_path / "hf"))
    for split in ("train", "test"):
        saved[split].to_parquet(str(folder / f"{split}-00000-of-00001.parquet"))
    data = {
        "dataset": "hfds",
        "root": str(tmp_path / "cache"),
        "num_workers": 0,
        "hfds": {"name": str(tmp_path / "pq"), "image_key": "img", "label_key": "target"},
    }
    with pytest.raises(ConfigError, match="data.num_classes: needed for a dry run.*data.hfds.name"):
        Trainer(load_config(_raw(tmp_path, data), check_paths=False), dry_run=True).setup()
    data["num_classes"] = CLASSES
    info = Trainer(load_config(_raw(tmp_path, data), check_paths=False), dry_run=True).fit()
    assert info["steps_per_epoch"] is None and "steps_per_epoch=unknown" in capsys.readouterr().out
    trainer = Trainer(load_config(_raw(tmp_path, data))).setup()
    assert type(trainer.train_loader.dataset).__module__ == "timm.data.dataset"
    _check_one_epoch(trainer, dry_run_knows=False)


def test_hfds_eval_covers_the_eval_split_once_per_rank_share(tmp_path):
    from timm_drop.training.data import build_loaders

    _hf_folder(tmp_path / "hf")
    cfg = load_config(_raw(tmp_path, _hfds_data(tmp_path, {"image_key": "img", "label_key": "target"})))
    got = []
    for rank in range(2):
        _, ev, n_cls = build_loaders(cfg.data, device=torch.device("cpu"), seed=0, rank=rank, world=2)
        for x, _, valid in ev:
            got += [i for i, v in zip(_indices(x, ev), valid.tolist()) if v]
    assert n_cls == CLASSES and sorted(got) == list(range(N_TRAIN, N_TRAIN + N_EVAL))


def test_hfds_train_subset_is_a_fixed_subset_of_the_folder(tmp_path):
    _hf_folder(tmp_path / "hf")
    raw = _raw(tmp_path, _hfds_data(tmp_path, {"image_key": "img", "label_key": "target"}, train_subset=20))
    trainer = Trainer(load_config(raw)).setup()
    assert trainer.steps_per_epoch == 2
    a, _ = _epoch_indices(trainer.train_loader, 0)
    b, _ = _epoch_indices(trainer.train_loader, 1)
    assert len(set(a)) == 20 and set(a) == set(b) and a != b  # same subset, reshuffled each epoch


def test_wds_shards_train_one_epoch_seeing_each_image_once(tmp_path):
    _wds_shards(tmp_path / "shards")
    _check_one_epoch(Trainer(load_config(_raw(tmp_path, _wds_data(tmp_path)))).setup())


def test_wds_order_is_a_pure_function_of_seed_and_epoch_with_persistent_workers(tmp_path):
    """A run resumed at epoch 1 (fresh workers) reads epoch 1 in the order the long-lived workers read it."""
    _wds_shards(tmp_path / "shards")
    raw = _raw(tmp_path, _wds_data(tmp_path))
    long = Trainer(load_config(raw)).setup()
    assert long.train_loader.loader.persistent_workers
    e0, _ = _epoch_indices(long.train_loader, 0)
    e1, _ = _epoch_indices(long.train_loader, 1)
    assert sorted(e1) == list(range(N_TRAIN)) and e0 != e1
    raw["output_dir"] = str(tmp_path / "fresh")
    fresh = Trainer(load_config(raw)).setup()
    f1, _ = _epoch_indices(fresh.train_loader, 1)
    assert f1 == e1
    # closed workers restart on the next epoch with the same stream
    long.train_loader.close()
    assert _epoch_indices(long.train_loader, 1)[0] == e1
    _close(long.train_loader, fresh.train_loader)


def test_wds_ranks_read_disjoint_shards(tmp_path):
    from timm_drop.training.data import build_loaders

    _wds_shards(tmp_path / "shards")
    cfg = load_config(_raw(tmp_path, _wds_data(tmp_path, num_workers=1, batch_size=5)))
    per_rank, evals = [], []
    for rank in range(2):
        tr, ev, _ = build_loaders(cfg.data, device=torch.device("cpu"), seed=0, rank=rank, world=2)
        per_rank.append(_epoch_indices(tr, 0)[0])
        evals += [i for x, _, valid in ev for i, v in zip(_indices(x, ev), valid.tolist()) if v]
        assert len(tr) == N_TRAIN // 2 // 5
        _close(tr, ev)
    assert sorted(per_rank[0] + per_rank[1]) == list(range(N_TRAIN))
    assert sorted(evals) == list(range(N_TRAIN, N_TRAIN + N_EVAL))


def test_wds_eval_shards_that_do_not_split_over_the_ranks_name_the_key(tmp_path):
    from timm_drop.training.data import build_loaders

    _wds_shards(tmp_path / "shards")
    data = _wds_data(tmp_path, num_workers=0, batch_size=4)
    data["wds"]["eval_split"] = "val-000000.tar"  # one shard for two processes
    cfg = load_config(_raw(tmp_path, data))
    with pytest.raises(ConfigError, match="data.wds.eval_split"):
        build_loaders(cfg.data, device=torch.device("cpu"), seed=0, rank=0, world=2)


def test_wds_eval_pads_partial_worker_batches_to_the_declared_share(tmp_path):
    """Two workers' partial batches are re-batched to eval_batch_size; padding is masked; one pass is exact."""
    from timm_drop.training.data import build_loaders

    _wds_shards(tmp_path / "shards")
    cfg = load_config(_raw(tmp_path, _wds_data(tmp_path, eval_batch_size=5)))
    _, ev, _ = build_loaders(cfg.data, device=torch.device("cpu"), seed=0)
    batches = list(ev)
    assert len(batches) == len(ev) == 3 and all(len(y) == 5 for _, y, _ in batches)
    got = [i for x, _, v in batches for i, ok in zip(_indices(x, ev), v.tolist()) if ok]
    assert sorted(got) == list(range(N_TRAIN, N_TRAIN + N_EVAL))
    ev.close()


# -- settings that cannot work are refused, naming the key -------------------------------------------------


@pytest.mark.parametrize("dataset", ["hfds", "wds"])
def test_streaming_datasets_refuse_device_residency(tmp_path, dataset):
    raw = _raw(tmp_path, {**_wds_data(tmp_path), "dataset": dataset, "device_resident": True})
    with pytest.raises(ConfigError, match="data.device_resident"):
        load_config(raw, check_paths=False)


def test_wds_needs_num_classes_and_refuses_subsets(tmp_path):
    data = _wds_data(tmp_path, train_subset=10)
    del data["num_classes"]
    with pytest.raises(ConfigError) as e:
        load_config(_raw(tmp_path, data), check_paths=False)
    keys = {p.key for p in e.value.problems}
    assert keys == {"data.num_classes", "data.train_subset"}


def test_wds_without_a_sample_count_names_the_key(tmp_path):
    _wds_shards(tmp_path / "shards")
    data = _wds_data(tmp_path)
    del data["wds"]["train_samples"]
    with pytest.raises(ConfigError, match="data.wds.train_samples"):
        Trainer(load_config(_raw(tmp_path, data))).setup()
    assert not (tmp_path / "run").exists()


def test_wds_refuses_mid_epoch_checkpoints_by_name(tmp_path):
    """A stream cannot start at batch k of an epoch, so ``checkpoint.every_steps`` is refused before any work."""
    _wds_shards(tmp_path / "shards")
    raw = _raw(tmp_path, _wds_data(tmp_path)) | {"checkpoint": {"every_steps": 2}}
    for dry_run in (True, False):  # the dry run refuses what the run would
        with pytest.raises(ConfigError, match=r"checkpoint\.every_steps.*'wds'"):
            Trainer(load_config(raw), dry_run=dry_run).setup()
    assert not (tmp_path / "run").exists()


def test_wds_with_fewer_shards_than_workers_names_the_key(tmp_path):
    _wds_shards(tmp_path / "shards")
    data = _wds_data(tmp_path, num_workers=3)
    with pytest.raises(ConfigError, match="data.num_workers"):
        Trainer(load_config(_raw(tmp_path, data))).setup()


def test_hfds_unknown_column_names_the_key(tmp_path):
    _hf_folder(tmp_path / "hf")
    raw = _raw(tmp_path, _hfds_data(tmp_path, {"image_key": "image", "label_key": "target"}))
    with pytest.raises(ConfigError, match="data.hfds.image_key.*img"):
        Trainer(load_config(raw)).setup()


def test_hfds_missing_split_names_the_key(tmp_path):
    _hf_folder(tmp_path / "hf")
    raw = _raw(tmp_path, _hfds_data(tmp_path, {"image_key": "img", "label_key": "target", "eval_split": "validation"}))
    with pytest.raises(ConfigError, match="data.hfds.eval_split"):
        Trainer(load_config(raw)).setup()


def test_randaugment_is_allowed_for_worker_decoded_datasets(tmp_path):
    raw = _raw(
        tmp_path,
        {"dataset": "hfds", "root": str(tmp_path / "hf"), "augment": {"randaugment": "rand-m9-mstd0.5"}},
    )
    assert load_config(raw, check_paths=False).data.augment.randaugment == "rand-m9-mstd0.5"


def test_the_flat_colour_index_code_reads_back():
    """The flat-colour index code itself: every index reads back as itself after normalisation."""
    x = torch.stack([torch.from_numpy(np.array(_image(i))).permute(2, 0, 1).float() / 255 for i in range(52)])

    class Stats:
        mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)

    assert _indices((x - 0.5) / 0.25, Stats) == list(range(52))


# -- two real processes (torchrun, gloo): timm's reader under a process group ------------------------------


def _ddp_worker(out_dir: str) -> None:
    trainer = Trainer(
        load_config(
            _raw(Path(out_dir), _wds_data(Path(out_dir), num_workers=0, batch_size=5))
            | {"train": {"epochs": 1, "cpu": True}}
        )
    ).setup()
    acc = trainer.accelerator
    assert acc.num_processes == 2
    seen, _ = _epoch_indices(trainer.train_loader, 0)
    everyone = [None, None]
    torch.distributed.all_gather_object(everyone, seen)
    last = trainer.fit()["last"]
    Path(out_dir, f"result_{acc.process_index}.json").write_text(
        json.dumps({"seen": everyone, "steps": trainer.steps_per_epoch, "last": last})
    )
    acc.wait_for_everyone()
    torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_wds_in_two_processes_reads_each_shard_on_one_rank_and_evaluates_every_image_once(tmp_path):
    _wds_shards(tmp_path / "shards")
    torchrun(__file__, [str(tmp_path)], timeout=300)  # the workers import this checkout's timm_drop
    result = json.loads((tmp_path / "result_0.json").read_text())
    a, b = result["seen"]
    assert len(a) == len(b) == N_TRAIN // 2 and sorted(a + b) == list(range(N_TRAIN))
    assert result["steps"] == N_TRAIN // 2 // 5
    assert result["last"]["eval_images"] == N_EVAL  # gathered over the ranks, each image once


if __name__ == "__main__":
    _ddp_worker(sys.argv[1])
