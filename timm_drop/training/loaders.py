"""The recipes' loaders: batches of one split for one process, normalised (and, training, augmented) on the device.

Every loader takes one :class:`LoaderOptions` (the ``data:`` section, which split, device, seed, rank/world,
normalisation, channels-last, batch multiple); :func:`build_loaders` makes the training and eval pair a config
asks for. Tensor datasets (digits, cifar, npz; read by :mod:`timm_drop.training.datasets`) can live on the
accelerator (``data.device_resident``): a :class:`DeviceLoader` draws a per-epoch permutation, shards it by rank and
augments whole batches there, so the loader is never the bottleneck. Image folders and HF datasets are decoded by
the workers of a :class:`WorkerLoader`, webdataset shards are read as a stream by a :class:`StreamLoader`.

Every random choice of the data stream comes from generators seeded by ``(seed, epoch)`` (the permutation:
identical on every rank) and ``(seed, epoch, rank)`` (augmentation), so a run resumed at an epoch boundary sees
exactly the batches the uninterrupted run saw. A training loader's :meth:`~_Resumable.state_dict` is its position
inside the epoch (batches yielded, augmentation generators' states); :meth:`~_Resumable.load_state_dict` makes its
next pass over that epoch yield exactly the remaining batches, in order and augmented as they would have been (a
mid-epoch resume: ``checkpoint.every_steps``).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch
from timm.data import DEFAULT_CROP_PCT
from timm.data import IMAGENET_DEFAULT_MEAN as IMAGENET_MEAN
from timm.data import IMAGENET_DEFAULT_STD as IMAGENET_STD

from timm_drop.datasets import ArrayData
from timm_drop.seeding import mix_seed, seeded_generator
from timm_drop.training.augment import cutout, random_crop, random_erasing, random_hflip
from timm_drop.training.config import DataConfig
from timm_drop.training.datasets import (
    IMAGE_CHANNELS,
    STREAM_DATASETS,
    default_stats,
    image_folder,
    load_arrays,
    missing_classes,
    split_folder,
    subset_indices,
    train_batches,
)
from timm_drop.training.workers import seed_worker_rngs

__all__ = [
    "DeviceLoader",
    "FolderLoader",
    "LoaderOptions",
    "StreamLoader",
    "WorkerLoader",
    "build_loaders",
    "pil_transform",
    "shard_indices",
]


@dataclass(frozen=True)
class LoaderOptions:
    """How a loader serves one split to one process (every loader class takes one)."""

    #: the run's ``data:`` section: batch sizes, augmentation, workers, subsets, image size
    data: DataConfig
    #: the training split (shuffled by ``(seed, epoch)``, augmented, whole batches) or the eval split (in order,
    #: padded so every rank runs the same number of batches, the padding masked)
    train: bool
    #: where batches are normalised and augmented (and where a device-resident dataset lives)
    device: torch.device
    #: the run's seed: data order from ``(seed, epoch)``, augmentation from ``(seed, epoch, rank)``
    seed: int
    #: this process's index among the ``world`` processes that share each epoch
    rank: int = 0
    world: int = 1
    #: normalisation statistics in [0, 1] pixel units (RGB)
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    #: yield channels-last image tensors (``train.channels_last``)
    channels_last: bool = False
    #: the training batches of an epoch are a multiple of this (``train.grad_accum_steps``)
    batch_multiple: int = 1


def shard_indices(
    n: int, epoch_gen: torch.Generator | None, rank: int, world: int, *, pad: bool
) -> torch.Tensor:
    """This rank's share of ``range(n)``, shuffled by ``epoch_gen`` (identical on every rank) or in order.

    ``pad=False`` (training): every rank gets ``n // world`` indices (a few samples skipped per epoch, different
    ones each epoch). ``pad=True`` (eval): every rank gets ``ceil(n / world)`` entries, the padding encoded as
    ``index + n`` so the consumer can mask it out of metrics.
    """
    order = torch.randperm(n, generator=epoch_gen) if epoch_gen is not None else torch.arange(n)
    if pad:
        per = -(-n // world)
        extra = per * world - n
        order = torch.cat([order, order[:extra] + n]) if extra else order
    else:
        per = n // world
        order = order[: per * world]
    return order[rank::world][:per]


class _Normalizer:
    def __init__(self, mean, std, device, channels_last: bool) -> None:
        self.mean = torch.tensor(mean, device=device, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(std, device=device, dtype=torch.float32).view(1, -1, 1, 1)
        self.channels_last = channels_last

    def __call__(self, x_nchw_float01: torch.Tensor) -> torch.Tensor:
        x = (x_nchw_float01 - self.mean) / self.std
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        return x.contiguous(memory_format=fmt)


class _ShardedLoader:
    """What both loaders share: per-rank sharding, batch sizes, normalisation on ``device`` and the epoch."""

    def _setup(self, n: int, options: LoaderOptions, where: str = "") -> None:
        """Serve ``n`` images as ``options`` say; ``where`` names the data in a too-few-images message."""
        o = self.options = options
        self.n = n
        #: what the run should say about this data before training (printed as ``note:`` lines)
        self.notes: list[str] = []
        self.cfg, self.train, self.device = o.data, o.train, o.device
        self.seed, self.rank, self.world, self.epoch = o.seed, o.rank, o.world, 0
        self.batch_size = o.data.batch_size if o.train else o.data.eval_batch_size
        self.batch_multiple = o.batch_multiple
        self.norm = _Normalizer(o.mean, o.std, o.device, o.channels_last)
        self.mean, self.std = tuple(float(v) for v in o.mean), tuple(float(v) for v in o.std)
        self.n_batches = (
            train_batches(n, o.data, o.world, o.batch_multiple, where)
            if o.train
            else math.ceil(math.ceil(n / o.world) / self.batch_size)
        )

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def worker_key(self) -> int:
        """The seed of this epoch's worker augmentation stream, a pure function of ``(seed, epoch, rank)``."""
        return self.epoch_key(self.epoch)

    def epoch_key(self, epoch: int) -> int:
        return mix_seed(self.seed, epoch, self.rank, 2)

    def __len__(self) -> int:
        return self.n_batches


class _Resumable:
    """A loader that can resume mid-epoch: it records how far the current pass got (batches yielded, the states
    of the generators that augmented them) and can start the next pass there."""

    epoch: int
    # position in the epoch being iterated (batches yielded, generators), and a position to resume from; the
    # class values stand until the first pass (the empty mapping is read-only: each pass assigns its own)
    _yielded: int = 0
    _generators: Mapping[str, torch.Generator] = MappingProxyType({})
    _resume_at: dict | None = None

    def state_dict(self) -> dict:
        """Where the current pass stands: its epoch, the batches yielded so far and the states of the generators
        that augmented them (CPU tensors). Taken between two batches, it resumes exactly there."""
        return {
            "epoch": self.epoch,
            "batch": self._yielded,
            "generators": {k: g.get_state() for k, g in self._generators.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        """Make the next pass (over ``state["epoch"]``) start after ``state["batch"]`` batches; later passes start
        at their first batch again."""
        batch = state["batch"]
        if not 0 <= batch <= len(self):
            raise ValueError(f"loader state: batch {batch} is outside this epoch's {len(self)} batches")
        self._resume_at = dict(state)

    def _begin(self, generators: dict[str, torch.Generator | None]) -> int:
        """Start a pass: the first batch to yield, and the generators restored where a resume point says."""
        self._generators = {k: g for k, g in generators.items() if g is not None}
        start, resume, self._resume_at = 0, self._resume_at, None
        if resume is not None:
            if resume["epoch"] != self.epoch:
                raise ValueError(
                    f"loader state: it resumes epoch {resume['epoch']}, but this pass is epoch {self.epoch}"
                )
            start = resume["batch"]
            for k, g in self._generators.items():
                g.set_state(resume["generators"][k])
        self._yielded = start
        return start


class DeviceLoader(_ShardedLoader, _Resumable):
    """Batches from a dataset held on ``device``; augmentation runs there on whole batches.

    Yields ``(images, labels)`` for training, ``(images, labels, valid)`` for eval (``valid`` masks the padding
    that gives every rank the same number of eval batches). Call :meth:`set_epoch` before each epoch.
    """

    def __init__(self, data: ArrayData, options: LoaderOptions) -> None:
        self._setup(len(data.y), options)
        self.x = torch.from_numpy(data.x).to(options.device)
        self.y = torch.from_numpy(data.y).to(options.device)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        if self.train:
            idx = shard_indices(
                self.n, seeded_generator("cpu", self.seed, self.epoch), self.rank, self.world, pad=False
            )
            aug_gen = seeded_generator(self.device, self.seed, self.epoch, self.rank, 1)
        else:
            idx = shard_indices(self.n, None, self.rank, self.world, pad=True)
            aug_gen = None
        start = self._begin({"aug": aug_gen})
        idx = idx.to(self.device)
        a = self.cfg.augment
        for b in range(start, len(self)):
            bi = idx[b * self.batch_size : (b + 1) * self.batch_size]
            valid = bi < self.n
            bi = bi % self.n
            x = self.x[bi].float().div_(255.0)  # (B, H, W, C)
            if self.train:
                x = random_crop(x, a.crop_padding, aug_gen)
                if a.hflip:
                    x = random_hflip(x, aug_gen)
            x = self.norm(x.permute(0, 3, 1, 2))
            if self.train:
                x = cutout(x, a.cutout, aug_gen)
                x = random_erasing(x, a.random_erasing, aug_gen)
                self._yielded = b + 1
                yield x, self.y[bi]
            else:
                self._yielded = b + 1
                yield x, self.y[bi], valid


class _IndexSampler(torch.utils.data.Sampler):
    def __init__(self, owner: WorkerLoader) -> None:
        self.owner = owner

    def __iter__(self):
        o = self.owner
        gen = seeded_generator("cpu", o.seed, o.epoch) if o.train else None
        idx = shard_indices(o.n, gen, o.rank, o.world, pad=not o.train)
        if o.train:
            idx = idx[: len(o) * o.batch_size]
        # a resumed pass skips the batches already trained without decoding them
        skip = o._skip_batches * o.batch_size
        # each index carries its epoch's key and its position in the epoch: workers seed each sample's
        # augmentation from them (see _PaddedDataset)
        key = o.worker_key()
        return iter([(i, key, skip + p) for p, i in enumerate(idx[skip:].tolist())])

    def __len__(self) -> int:
        return (len(self.owner) - self.owner._skip_batches) * self.owner.batch_size


class _PaddedDataset(torch.utils.data.Dataset):
    def __init__(self, ds, n: int) -> None:
        self.ds, self.n = ds, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, item: tuple[int, int, int]):
        i, key, pos = item
        if torch.utils.data.get_worker_info() is not None:
            # Each sample's augmentation is a pure function of (seed, epoch, rank, position in the epoch): not of
            # the worker that happens to load it, nor of what that worker loaded before (persistent workers
            # outlive the epoch; a run resumed mid-epoch skips batches and deals the rest to other workers). The
            # main process (num_workers=0) keeps its RNG untouched: the checkpoint's global RNG state covers it.
            seed_worker_rngs(mix_seed(key, pos))
        img, label = self.ds[i % self.n]
        return img, label, i < self.n


def pil_transform(cfg: DataConfig, train: bool, mean) -> Any:
    """The PIL -> uint8 tensor transform of worker-decoded data (imagefolder, hfds, wds); normalisation, Cutout and
    Random Erasing follow on the device."""
    from torchvision import transforms as T

    size, a = cfg.image_size, cfg.augment
    interp = T.InterpolationMode(cfg.interpolation or "bilinear")
    if train:
        tf = (
            [T.RandomResizedCrop(size, interpolation=interp)]
            if a.random_resized_crop
            else [T.Resize(size, interpolation=interp), T.CenterCrop(size)]
        )
        if not a.random_resized_crop and a.crop_padding:
            tf.append(T.RandomCrop(size, padding=a.crop_padding))
        if a.hflip:
            tf.append(T.RandomHorizontalFlip())
        if a.randaugment:
            from timm.data.auto_augment import rand_augment_transform
            from timm.data.transforms import str_to_pil_interp

            # timm's hparams for its own transforms: fill with the normalisation mean, translate 45% of size
            hp = {
                "translate_const": int(size * 0.45),
                "img_mean": tuple(min(255, round(255 * v)) for v in mean),
                "interpolation": str_to_pil_interp(cfg.interpolation or "bilinear"),
            }
            tf.append(rand_augment_transform(a.randaugment, hp))
    else:
        # ImageNet convention: resize to size/0.875 then centre-crop, when training used resized crops.
        # (data.crop_pct, e.g. a pretrained model's, decides when given; timm floors the same way)
        if cfg.crop_pct is not None:
            resize = math.floor(size / cfg.crop_pct)
        else:
            resize = int(round(size / DEFAULT_CROP_PCT)) if a.random_resized_crop else size
        tf = [T.Resize(resize, interpolation=interp), T.CenterCrop(size)]
    tf.append(T.PILToTensor())
    return T.Compose(tf)


class _WorkerFed:
    """What every worker-fed loader shares: normalisation, Cutout and Random Erasing on ``device``; closing."""

    loader: torch.utils.data.DataLoader

    def close(self) -> None:
        """Stop the persistent worker processes now (a later epoch starts new ones).

        Otherwise they stop when the loader is garbage-collected, and a loader freed as part of a reference cycle
        may lose its queues before the workers hear the stop: each then idles until torch's 5 s join timeout.
        """
        it = getattr(self.loader, "_iterator", None)  # torch keeps the persistent workers' iterator here
        if it is not None:
            it._shutdown_workers()
            self.loader._iterator = None

    def _device_batches(self, batches, aug_gen: torch.Generator | None = None) -> Iterator[tuple[torch.Tensor, ...]]:
        """Worker batches ``(uint8 images, labels, valid)`` normalised and (training) augmented on the device with
        ``aug_gen``, by default this epoch's own generator."""
        if aug_gen is None and self.train:
            aug_gen = seeded_generator(self.device, self.seed, self.epoch, self.rank, 3)
        a = self.cfg.augment
        for x, y, valid in batches:
            x = x.to(self.device, non_blocking=True).float().div_(255.0)
            y = y.to(self.device, non_blocking=True)
            x = self.norm(x)
            if self.train:
                x = cutout(x, a.cutout, aug_gen)
                x = random_erasing(x, a.random_erasing, aug_gen)
                yield x, y
            else:
                yield x, y, valid.to(self.device)


class WorkerLoader(_ShardedLoader, _Resumable, _WorkerFed):
    """A worker-backed loader over a random-access dataset of ``(uint8 CHW image, label)`` (image folders, HF
    datasets): the sampler shuffles by ``(seed, epoch)`` and shards by rank, workers decode and augment
    (:func:`pil_transform`), normalisation, Cutout and Random Erasing run on ``device``."""

    def __init__(
        self, dataset: torch.utils.data.Dataset, classes: list[str], options: LoaderOptions, where: str = ""
    ) -> None:
        cfg, device = options.data, options.device
        idx = subset_indices(len(dataset), cfg.train_subset if options.train else cfg.eval_subset)
        self.dataset = dataset if idx is None else torch.utils.data.Subset(dataset, idx.tolist())
        self.classes = list(classes)
        self._setup(len(self.dataset), options, where)
        self._gen = torch.Generator()
        self._skip_batches = 0
        self.loader = torch.utils.data.DataLoader(
            _PaddedDataset(self.dataset, self.n),
            batch_size=self.batch_size,
            sampler=_IndexSampler(self),
            num_workers=cfg.num_workers,
            pin_memory=device.type == "cuda",
            drop_last=False,
            generator=self._gen,
            # workers (and their decoders, file handles) live for the whole run instead of respawning every epoch
            persistent_workers=cfg.num_workers > 0,
        )

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        # Worker seeds derive from this generator: (seed, epoch, rank) fixes the augmentation stream.
        self._gen.manual_seed(self.worker_key())
        aug_gen = seeded_generator(self.device, self.seed, self.epoch, self.rank, 3) if self.train else None
        self._skip_batches = start = self._begin({"aug": aug_gen})
        try:
            for b, batch in enumerate(self._device_batches(self.loader, aug_gen), start):
                self._yielded = b + 1
                yield batch
        finally:
            self._skip_batches = 0


class FolderLoader(WorkerLoader):
    """:class:`WorkerLoader` over an image folder (``root/<class>/*``, torchvision's ``ImageFolder``); ``classes``:
    the training split's class indices, which an eval folder's folders are matched to by name."""

    def __init__(self, root: str, options: LoaderOptions, classes: dict[str, int] | None = None) -> None:
        self.folder = image_folder(root, pil_transform(options.data, options.train, options.mean), classes)
        super().__init__(self.folder, self.folder.classes, options, where=f" in {root}")


class StreamLoader(_ShardedLoader, _WorkerFed):
    """A worker-backed loader over a webdataset stream (:func:`timm_drop.training.streams.wds_dataset`).

    Training: ``len(self)`` batches of the rank's stream per epoch (the declared sample count, counted by
    :func:`train_batches`), shards shuffled by ``(seed, epoch)``, samples in a buffer seeded by
    ``(seed, epoch, rank, worker)``. Eval: the rank's shards read once, re-batched and padded with masked entries to
    ``len(self)`` batches so every rank runs the same number.
    """

    def __init__(self, options: LoaderOptions) -> None:
        from timm_drop.training.streams import EpochStream, wds_dataset

        cfg, train, device = options.data, options.train, options.device
        stream, n = wds_dataset(
            cfg, train, pil_transform(cfg, train, options.mean), seed=options.seed, rank=options.rank, world=options.world
        )
        self.stream = stream
        self._setup(n, options, where=f" (data.wds.train_samples={n})")
        self.loader = torch.utils.data.DataLoader(
            EpochStream(stream, self.epoch_key),
            batch_size=self.batch_size,
            num_workers=cfg.num_workers,
            pin_memory=device.type == "cuda",
            persistent_workers=cfg.num_workers > 0,
        )

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        self.stream.set_epoch(self.epoch)  # timm's shared counter: the shard shuffle, seen by persistent workers
        return self._device_batches(self._train_batches() if self.train else self._eval_batches())

    def _train_batches(self):
        it = iter(self.loader)
        for b in range(len(self)):
            try:
                x, y = next(it)
            except StopIteration:
                raise RuntimeError(
                    f"data.wds.train_samples: rank {self.rank}'s shards ran out after {b} of {len(self)} batches"
                ) from None
            yield x, y, None

    def _eval_batches(self):
        """Exactly ``eval_batch_size`` per batch whatever the workers' partial batches, padded to ``len(self)``."""
        quota, bs = math.ceil(self.n / self.world), self.batch_size
        xs, ys, count = [], [], 0
        for x, y in self.loader:
            count += len(y)
            if count > quota:
                raise RuntimeError(
                    f"data.wds.eval_samples: rank {self.rank}'s eval shards hold more than its share "
                    f"{quota} of {self.n} declared samples"
                )
            xs.append(x)
            ys.append(y)
            while sum(len(t) for t in ys) >= bs:
                x_all, y_all = torch.cat(xs), torch.cat(ys)
                yield x_all[:bs], y_all[:bs], torch.ones(bs, dtype=torch.bool)
                xs, ys = [x_all[bs:]], [y_all[bs:]]
        left = sum(len(t) for t in ys)
        emitted = (count - left) // bs
        if left:
            x_all, y_all = torch.cat(xs), torch.cat(ys)
            pad = bs - left
            # the padding repeats real images (any would do) and is masked out of the metrics
            yield (
                torch.cat([x_all, x_all[:1].expand(pad, *x_all.shape[1:])]),
                torch.cat([y_all, y_all[:1].expand(pad)]),
                torch.arange(bs) < left,
            )
            emitted += 1
        if emitted < len(self):
            shape = (bs, IMAGE_CHANNELS, self.cfg.image_size, self.cfg.image_size)
            blank = torch.zeros(shape, dtype=torch.uint8), torch.zeros(bs, dtype=torch.long)
            for _ in range(len(self) - emitted):
                yield (*blank, torch.zeros(bs, dtype=torch.bool))


def build_loaders(
    cfg: DataConfig,
    *,
    device: torch.device,
    seed: int,
    rank: int = 0,
    world: int = 1,
    channels_last: bool = False,
    batch_multiple: int = 1,
):
    """``(train_loader, eval_loader, num_classes)`` for the configured dataset."""
    resident = cfg.device_resident
    train = LoaderOptions(
        cfg,
        train=True,
        device=device,
        seed=seed,
        rank=rank,
        world=world,
        channels_last=channels_last,
        batch_multiple=batch_multiple,
    )
    if cfg.dataset in ("imagefolder", "hfds", "wds"):
        if resident is True:
            raise ValueError(
                f"data.device_resident: {cfg.dataset} data is decoded by loader workers; use false or auto"
            )
        mean, std = default_stats(cfg, None)
        return _worker_loaders(replace(train, mean=mean, std=std))
    train_data = load_arrays(cfg, True)
    eval_data = load_arrays(cfg, False)
    mean, std = default_stats(cfg, train_data.x)
    # Without device residency the arrays stay in host memory and batches are moved per step.
    dev = device if resident in ("auto", True) else torch.device("cpu")
    train = replace(train, device=dev, mean=mean, std=std)
    tr = DeviceLoader(train_data, train)
    ev = DeviceLoader(eval_data, _eval(train))
    num_classes = max(len(train_data.classes), int(train_data.y.max()) + 1)
    return tr, ev, num_classes


def _eval(train: LoaderOptions) -> LoaderOptions:
    """The eval split's options beside the training split's."""
    return replace(train, train=False, batch_multiple=1)


def _worker_loaders(train: LoaderOptions):
    """``(train_loader, eval_loader, num_classes)`` of data decoded by loader workers (imagefolder, hfds, wds)."""
    cfg = train.data
    if cfg.dataset in STREAM_DATASETS:
        return StreamLoader(train), StreamLoader(_eval(train)), cfg.num_classes
    if cfg.dataset == "hfds":
        from timm_drop.training.streams import hfds_dataset

        parts = [hfds_dataset(cfg, t, pil_transform(cfg, t, train.mean)) for t in (True, False)]
        num_classes = max(n for _, n in parts)
        (tr_ds, _), (ev_ds, _) = parts
        classes = [str(i) for i in range(num_classes)]
        return WorkerLoader(tr_ds, classes, train), WorkerLoader(ev_ds, classes, _eval(train)), num_classes
    root = Path(cfg.root)
    tr = FolderLoader(str(split_folder(root, True)), train)
    ev_root = str(split_folder(root, False))
    ev = FolderLoader(ev_root, _eval(train), classes=tr.folder.class_to_idx)
    missing = missing_classes(tr.folder, ev.folder)
    if missing:
        ev.notes.append(
            f"data.root: {ev_root} has no images of {len(missing)} of the {len(tr.classes)} training classes "
            f"({missing[:10]}{', ...' if len(missing) > 10 else ''}); eval scores the others only"
        )
    return tr, ev, len(tr.classes)
