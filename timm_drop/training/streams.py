"""Hugging Face ``datasets`` (``data.dataset: hfds``) and webdataset shards (``wds``) as timm datasets.

Both come from timm's readers, so images are decoded the way ``timm.data.create_dataset`` decodes them; the loaders
around them (sharding, epochs, normalisation) are the recipe's, in :mod:`timm_drop.training.loaders`. This module needs
the ``streaming`` extra (``datasets``, ``webdataset``); nothing imports it unless a config names one of the two.

* **hfds** is random access: a dataset id goes through ``create_dataset("hfds/<id>")`` (``data.root`` = its cache
  dir); a folder written by ``save_to_disk`` is opened memory-mapped by ``datasets.load_from_disk`` (``load_dataset``
  would copy it into a cache, or refuse a single saved split) and read through timm's ``ReaderHfds`` item logic.
* **wds** is a stream: ``create_dataset("wds/", split=<shards>)``. timm shuffles shards by ``(seed, epoch)`` and
  samples in a buffer seeded per worker; :class:`EpochStream` re-seeds that buffer (and the worker's augmentation
  RNGs) from ``(seed, epoch, rank, worker)`` at every epoch, so persistent workers and a resumed run agree.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import torch

from timm_drop.training.config import ConfigError, DataConfig
from timm_drop.training.workers import seed_worker_rngs, worker_seed

__all__ = ["EpochStream", "hfds_dataset", "hfds_peek", "wds_dataset", "wds_num_samples"]


def _require(package: str) -> None:
    import importlib.util

    if importlib.util.find_spec(package) is None:
        raise ConfigError(f"data.dataset: needs the {package!r} package: pip install 'timm_drop[streaming]'")


# -- hfds ----------------------------------------------------------------------------------------------------


def _saved_folder(cfg: DataConfig, split: str) -> str:
    return os.path.join(str(cfg.root), split)


def _load_saved(cfg: DataConfig, split: str, key: str):
    """One split of a ``save_to_disk`` folder, memory-mapped."""
    import datasets

    path = _saved_folder(cfg, split)
    if not os.path.isdir(path):
        found = sorted(p for p in os.listdir(cfg.root) if os.path.isdir(os.path.join(cfg.root, p)))
        raise ConfigError(
            f"data.hfds.{key}: no split {split!r} in {cfg.root} (a save_to_disk folder; splits found: {found})"
        )
    ds = datasets.load_from_disk(path)
    if isinstance(ds, datasets.DatasetDict):
        raise ConfigError(f"data.hfds.{key}: {path} holds several splits ({list(ds)}); name one of them")
    return ds


def _check_columns(ds, cfg: DataConfig) -> None:
    cols = list(ds.column_names)
    for key in ("image_key", "label_key"):
        name = getattr(cfg.hfds, key)
        if name not in cols:
            raise ConfigError(f"data.hfds.{key}: no column {name!r} (columns: {cols})")


def _num_classes(ds, label_key: str) -> int:
    """ClassLabel names when the column has them; at least the largest label + 1 (read without the images)."""
    from timm.data.readers._hfds import get_class_labels

    labels = ds.select_columns([label_key])[label_key]
    return max(len(get_class_labels(ds.info, label_key)), int(max(labels)) + 1 if len(labels) else 0)


def _saved_reader(ds, split: str, image_key: str, label_key: str):
    """timm's ``ReaderHfds`` over an already opened dataset (its own constructor calls ``load_dataset``)."""
    import datasets
    from timm.data.readers._hfds import get_class_labels
    from timm.data.readers.reader import Reader
    from timm.data.readers.reader_hfds import ReaderHfds
    from timm.data.readers.targets import parse_target_keys

    reader = ReaderHfds.__new__(ReaderHfds)
    Reader.__init__(reader)
    reader.root, reader.split = None, split
    # undecoded bytes: timm's ImageDataset decodes (and converts to RGB) in the loader workers
    reader.dataset = ds.cast_column(image_key, datasets.Image(decode=False))
    reader.image_key, reader.label_key = image_key, label_key
    reader.target_keys, reader.dense_target = parse_target_keys(label_key), False
    reader.class_to_idx = get_class_labels(ds.info, label_key)
    reader._source_names = {i: n for n, i in reader.class_to_idx.items()}
    reader.remap_class, reader.split_info, reader.additional_features = False, None, None
    reader.num_samples = len(ds)
    return reader


def hfds_dataset(cfg: DataConfig, train: bool, transform) -> tuple[torch.utils.data.Dataset, int]:
    """timm's ``ImageDataset`` for one split and the number of classes its labels need."""
    _require("datasets")
    from timm.data import ImageDataset, create_dataset

    h = cfg.hfds
    key = "train_split" if train else "eval_split"
    split = getattr(h, key)
    if h.name is None:
        ds = _load_saved(cfg, split, key)
        _check_columns(ds, cfg)
        reader = _saved_reader(ds, split, h.image_key, h.label_key)
        return ImageDataset(None, reader=reader, transform=transform), _num_classes(ds, h.label_key)
    try:
        out = create_dataset(
            f"hfds/{h.name}",
            root=cfg.root,
            split=split,
            input_key=h.image_key,
            target_key=h.label_key,
            transform=transform,
        )
    except (ValueError, KeyError) as e:
        raise ConfigError(f"data.hfds: {h.name!r} split {split!r}: {e}") from e
    return out, _num_classes(out.reader.dataset, h.label_key)


def hfds_peek(cfg: DataConfig) -> tuple[int, int] | None:
    """``(training images, classes)`` of a ``save_to_disk`` folder without decoding an image; None for a dataset
    id (finding its size may mean a download)."""
    if cfg.hfds.name is not None or cfg.root is None or not os.path.isdir(cfg.root):
        return None
    _require("datasets")
    ds = _load_saved(cfg, cfg.hfds.train_split, "train_split")
    _check_columns(ds, cfg)
    return len(ds), _num_classes(ds, cfg.hfds.label_key)


# -- wds -----------------------------------------------------------------------------------------------------


def _wds(cfg: DataConfig, train: bool, **kw: Any):
    _require("webdataset")
    from timm.data import create_dataset

    w = cfg.wds
    key = "train_split" if train else "eval_split"
    count = "train_samples" if train else "eval_samples"

    def create(n: int | None, training: bool, **more: Any):
        try:
            return create_dataset(
                "wds/",
                root=cfg.root,
                split=getattr(w, key),
                is_training=training,
                num_samples=n,
                input_key=w.image_key,
                target_key=w.label_key,
                **more,
            )
        except RuntimeError as e:  # timm: the split is neither a shard pattern nor in _info.json
            raise ConfigError(
                f"data.wds.{key}: {e} (give shards as a pattern, e.g. 'train-{{000..009}}.tar')"
            ) from e

    n = getattr(w, count)
    if n is None:
        # the count may come from _info.json: ask timm's reader in eval mode (it refuses a count-less training split)
        n = create(None, False).reader.num_samples
    if not n:
        raise ConfigError(
            f"data.wds.{count}: needed (shards have no length; or put the split's num_samples in "
            f"{os.path.join(str(cfg.root), '_info.json')})"
        )
    return create(n, train, **kw)


def wds_num_samples(cfg: DataConfig) -> int | None:
    """Training samples as declared (config or ``_info.json``; no shard is opened), None when not declared."""
    if cfg.wds.train_samples is not None:
        return cfg.wds.train_samples
    try:
        return _wds(cfg, True).reader.num_samples
    except ConfigError:
        return None


def wds_dataset(
    cfg: DataConfig, train: bool, transform, *, seed: int, rank: int, world: int
) -> tuple[torch.utils.data.IterableDataset, int]:
    """This rank's stream of one split (timm's ``IterableImageDataset``) and the split's declared sample count.

    Training shards are split over ``ranks x workers`` by timm; eval shards over ranks here, each rank reading its
    own shards once (timm's distributed eval would repeat samples to even the ranks out).
    """
    batch_size = cfg.batch_size if train else cfg.eval_batch_size
    ds = _wds(cfg, train, batch_size=batch_size, seed=seed, transform=transform)
    r = ds.reader
    shards = list(r.split_info.filenames)
    workers = max(1, cfg.num_workers)
    if train:
        if len(shards) < world * workers:
            raise ConfigError(
                f"data.num_workers: {len(shards)} training shard(s) cannot feed {world} process(es) x {workers} "
                "worker(s) (each reads whole shards); use fewer workers or more shards"
            )
        # the rank from the run, not only from torch.distributed (identical under a process group)
        r.dist_rank, r.dist_num_replicas = rank, world
    else:
        if world > 1 and len(shards) % world:
            raise ConfigError(
                f"data.wds.eval_split: {len(shards)} eval shard(s) do not split evenly over {world} processes; "
                "every process must read an equal share once"
            )
        r.split_info = dataclasses.replace(r.split_info, filenames=tuple(shards[rank::world]))
        r.dist_rank, r.dist_num_replicas = 0, 1
    ds.set_loader_cfg(num_workers=cfg.num_workers)
    return ds, r.num_samples


class EpochStream(torch.utils.data.IterableDataset):
    """A timm webdataset stream whose every epoch is a pure function of ``(seed, epoch, rank, worker)``.

    ``key_of_epoch(epoch)`` gives the epoch key; the epoch itself is read from timm's shared epoch counter
    (``set_epoch``), which persistent workers see.
    """

    def __init__(self, ds, key_of_epoch) -> None:
        self.ds, self.key_of_epoch = ds, key_of_epoch

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        r = self.ds.reader
        s = worker_seed(self.key_of_epoch(r.epoch_count.value), info.id if info is not None else 0)
        if info is not None:
            seed_worker_rngs(s)
        if r.worker_info is None and info is not None:
            r._lazy_init()  # first epoch in this worker: timm records the worker's place among all workers
        # rebuild the pipeline so its sample-shuffle buffer starts from this epoch's seed, not the last epoch's state
        r.worker_seed, r.ds = s, None
        r._lazy_init()
        return iter(self.ds)
