"""Datasets and loaders for the recipes.

Sources (``data.dataset``):

* ``digits`` — the embedded default: scikit-learn's bundled ``load_digits`` (1,797 real 8x8 handwritten digits
  shipped inside the sklearn wheel; no network, no download), upsampled bilinearly to ``image_size`` and
  repeated to 3 channels; fixed stratified split (20% test, ``random_state=0``).
* ``cifar10`` / ``cifar100`` — with ``download: true`` torchvision downloads and MD5-verifies the archive; otherwise
  ``root`` must hold the python-pickle layout (``cifar-10-batches-py/`` or ``cifar-100-python/``), read with a
  restricted unpickler that only admits numpy arrays (the CIFAR format is a pickle; a data file must not be able
  to run code). Re-exported pickles (``../shared/data/export_cifar10.py``) fail torchvision's MD5 check, so
  they are read this way.
* ``npz`` — decoded arrays ``x_train (N,H,W,C) uint8, y_train, x_test, y_test`` (optional ``classes``), or the
  JPEG-buffer format (``{split}_jpeg``, ``{split}_offsets``, ``{split}_labels``, ``classes``).
* ``imagefolder`` — ``root/train/<class>/*`` and ``root/val/`` (or ``test/``), decoded by workers.
* ``hfds`` — a Hugging Face ``datasets`` folder (``save_to_disk``) or dataset id, random access, decoded by workers
  (:mod:`timm_drop.training.streams`).
* ``wds`` — webdataset tar shards, a stream: the epoch is ``data.wds.train_samples`` long (shards have no length),
  shards are split over ranks x workers, and there is no fixed subset and no device residency.

What is known about a dataset without reading it (classes, split sizes, usual statistics) is stated once, in
:data:`DATASET_FACTS`; :func:`peek_dataset` adds what an index can tell cheaply (a folder listing, a label array),
and :func:`train_batches` is the one count of training batches per epoch, for the loaders and the dry run alike.

Tensor datasets (digits, cifar, npz) can live on the accelerator (``data.device_resident``): a
:class:`DeviceLoader` draws a per-epoch permutation, shards it by rank and augments whole batches there, so the
loader is never the bottleneck. Every random choice of the data stream comes from generators seeded by
``(seed, epoch)`` (the permutation: identical on every rank) and ``(seed, epoch, rank)`` (augmentation), so a
run resumed at an epoch boundary sees exactly the batches the uninterrupted run saw. A training loader's
:meth:`~_ShardedLoader.state_dict` is its position inside the epoch (batches yielded, augmentation generators'
states); :meth:`~_ShardedLoader.load_state_dict` makes its next pass over that epoch yield exactly the remaining
batches, in order and augmented as they would have been (a mid-epoch resume: ``checkpoint.every_steps``).
"""

from __future__ import annotations

import io
import math
import os
import pickle
import re
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from timm.data import DEFAULT_CROP_PCT
from timm.data import IMAGENET_DEFAULT_MEAN as IMAGENET_MEAN
from timm.data import IMAGENET_DEFAULT_STD as IMAGENET_STD

from timm_drop.errors import TimmDropError
from timm_drop.models.cifar import CIFAR_MEAN, CIFAR_STD
from timm_drop.seeding import mix_seed, seeded_generator
from timm_drop.training.augment import cutout, random_crop, random_erasing, random_hflip
from timm_drop.training.config import DataConfig

#: every loader yields RGB images (grayscale data is repeated to 3 channels), so models see 3 input channels
IMAGE_CHANNELS = 3

__all__ = [
    "DATASET_FACTS",
    "STREAM_DATASETS",
    "ArrayData",
    "DataError",
    "DatasetFacts",
    "DeviceLoader",
    "FolderLoader",
    "StreamLoader",
    "WorkerLoader",
    "build_loaders",
    "load_arrays",
    "peek_dataset",
    "seeded_generator",
    "train_batches",
]


@dataclass(frozen=True)
class DatasetFacts:
    """What is known about a named dataset without reading it."""

    num_classes: int
    train_size: int
    eval_size: int
    #: normalisation statistics in [0, 1] pixel units; None = the training split's own
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None


#: datasets read as streams (:class:`StreamLoader`): no length of their own and no way to start an epoch at batch k,
#: so no mid-epoch checkpoints
STREAM_DATASETS: frozenset[str] = frozenset({"wds"})

DATASET_FACTS: dict[str, DatasetFacts] = {
    # sklearn's 1,797 digits, split 80/20 stratified (random_state=0)
    "digits": DatasetFacts(10, 1437, 360),
    # the CIFAR models' pretrained_cfg states the CIFAR-10 statistics; CIFAR-100's are the usual ones
    "cifar10": DatasetFacts(10, 50_000, 10_000, CIFAR_MEAN, CIFAR_STD),
    "cifar100": DatasetFacts(100, 50_000, 10_000, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}


class DataError(TimmDropError, ValueError):
    """Data that cannot be used (an image that does not decode, arrays of the wrong shape, dtype or range); the
    message names the file or array."""

    def __str__(self) -> str:
        text = super().__str__()
        # raised in a loader worker, it comes back to the main process wrapped in the worker's traceback
        if "Original Traceback" in text:
            return re.split(rf"\n(?:[\w.]+\.)?{type(self).__name__}: ", text)[-1].strip()
        return text


@dataclass
class ArrayData:
    """One split as uint8 channels-last images and int64 labels."""

    x: np.ndarray  # (N, H, W, C) uint8
    y: np.ndarray  # (N,) int64
    classes: list[str]


# -- sources -------------------------------------------------------------------------------------------------


def _digits(train: bool, image_size: int) -> ArrayData:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = d.images.astype(np.float32) / 16.0  # pixel values are 0..16
    idx_tr, idx_te = train_test_split(np.arange(len(x)), test_size=0.2, random_state=0, stratify=d.target)
    idx = idx_tr if train else idx_te
    t = torch.from_numpy(x[idx])[:, None]
    t = F.interpolate(t, size=(image_size, image_size), mode="bilinear", align_corners=False)
    t = (t.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).repeat(1, 1, 1, 3)
    return ArrayData(t.numpy(), d.target[idx].astype(np.int64), [str(c) for c in d.target_names])


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles plain containers and numpy arrays only; anything else (e.g. os.system) is refused."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }

    def find_class(self, module: str, name: str):  # noqa: D401
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name} from a CIFAR batch file")


def _read_cifar_pickle(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"data.root: CIFAR file missing: {path}")
    with open(path, "rb") as f:
        d = _NumpyOnlyUnpickler(f, encoding="bytes").load()
    return {(k.decode() if isinstance(k, bytes) else k): v for k, v in d.items()}


def _cifar(cfg: DataConfig, train: bool) -> ArrayData:
    hundred = cfg.dataset == "cifar100"
    root = Path(cfg.root) if cfg.root else Path("data")
    if cfg.download:
        import torchvision

        cls = torchvision.datasets.CIFAR100 if hundred else torchvision.datasets.CIFAR10
        ds = cls(str(root), train=train, download=True)
        return ArrayData(
            np.asarray(ds.data, dtype=np.uint8), np.asarray(ds.targets, dtype=np.int64), list(ds.classes)
        )
    sub = root / ("cifar-100-python" if hundred else "cifar-10-batches-py")
    if not sub.is_dir() and (root.name == sub.name):
        sub = root
    if not sub.is_dir():
        raise FileNotFoundError(
            f"data.root: {root} has no {sub.name}/ folder (python-pickle CIFAR layout); "
            "set data.download: true to fetch it with torchvision"
        )
    if hundred:
        d = _read_cifar_pickle(sub / ("train" if train else "test"))
        data, labels = d["data"], d["fine_labels"]
        meta = _read_cifar_pickle(sub / "meta")
        classes = [c.decode() if isinstance(c, bytes) else c for c in meta["fine_label_names"]]
    else:
        files = [f"data_batch_{i}" for i in range(1, 6)] if train else ["test_batch"]
        parts = [_read_cifar_pickle(sub / f) for f in files]
        data = np.concatenate([p["data"] for p in parts])
        labels = sum((list(p["labels"]) for p in parts), [])
        meta = _read_cifar_pickle(sub / "batches.meta")
        classes = [c.decode() if isinstance(c, bytes) else c for c in meta["label_names"]]
    x = np.asarray(data, dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return ArrayData(np.ascontiguousarray(x), np.asarray(labels, dtype=np.int64), classes)


def _decode_jpegs(buf: np.ndarray, offsets: np.ndarray, name: str, path: str) -> np.ndarray:
    from PIL import Image

    def one(i: int) -> np.ndarray:
        a, b = int(offsets[i]), int(offsets[i + 1])
        try:
            return np.asarray(Image.open(io.BytesIO(buf[a:b].tobytes())).convert("RGB"))
        except Exception as e:  # PIL raises several types for undecodable bytes
            raise DataError(f"data.root: {name} image {i} (bytes {a}..{b}) in {path} cannot be decoded: {e}") from None

    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as ex:
        images = list(ex.map(one, range(len(offsets) - 1)))
    shapes = {im.shape for im in images}
    if len(shapes) > 1:
        raise DataError(f"data.root: {name} in {path} holds images of different sizes {sorted(shapes)[:4]}")
    return np.stack(images)


#: the arrays of one split of an npz file: decoded images, or JPEG bytes with their offsets
_NPZ_LAYOUTS = ({"images": "x_{}", "labels": "y_{}"}, {"images": "{}_jpeg", "offsets": "{}_offsets", "labels": "{}_labels"})


def _npz_layout(keys: set[str], split: str, path: str) -> dict[str, str]:
    """The names of ``split``'s arrays in the file (``x_train``/``y_train`` or ``train_jpeg``/...)."""
    for layout in _NPZ_LAYOUTS:
        names = {k: v.format(split) for k, v in layout.items()}
        if names["images"] in keys:
            missing = sorted(n for n in names.values() if n not in keys)
            if missing:
                raise KeyError(f"data.root: {path} has {names['images']} but not {', '.join(missing)}")
            return names
    raise KeyError(
        f"data.root: {path} has neither x_{split}/y_{split} nor {split}_jpeg/{split}_offsets/{split}_labels "
        f"(keys: {sorted(keys)})"
    )


def _npz_labels(d: Any, path: str) -> tuple[dict[str, np.ndarray], list[str] | None, int]:
    """Both splits' labels (``{"train": ..., "test": ...}``), checked: 1-D integer class indices, none negative,
    within ``classes`` when the file names them, and the test labels within the training split's classes. Also
    the class names (or None) and the number of classes."""
    keys = set(d.files)
    classes = None
    if "classes" in keys:
        named = d["classes"]
        if named.ndim != 1:
            raise DataError(f"data.root: classes in {path} must be 1-D (one name per class), got shape {named.shape}")
        classes = [str(c) for c in named]
    labels: dict[str, np.ndarray] = {}
    for split in ("train", "test"):
        name = _npz_layout(keys, split, path)["labels"]
        y = d[name]
        if y.ndim != 1:
            raise DataError(f"data.root: {name} in {path} must be 1-D (one label per image), got shape {y.shape}")
        if y.dtype == np.bool_ or not np.issubdtype(y.dtype, np.integer):
            raise DataError(f"data.root: {name} in {path} must hold integer class indices, got dtype {y.dtype}")
        if len(y) and int(y.min()) < 0:
            raise DataError(f"data.root: {name} in {path} has a negative label ({int(y.min())})")
        labels[split] = y.astype(np.int64)
    train = labels["train"]
    if classes is not None:
        num_classes, within = len(classes), f"the {len(classes)} names in classes"
    else:
        num_classes = int(train.max()) + 1 if len(train) else 0
        train_name = _npz_layout(keys, "train", path)["labels"]
        within = f"the training split's {num_classes} classes (labels 0..{num_classes - 1} in {train_name})"
    for split, y in labels.items():
        if len(y) and int(y.max()) >= num_classes:
            name = _npz_layout(keys, split, path)["labels"]
            raise DataError(f"data.root: {name} in {path} has label {int(y.max())}, outside {within}")
    return labels, classes, num_classes


def _check_images(names: dict[str, str], shape: tuple[int, ...], dtype: np.dtype, count: int, path: str) -> None:
    """Decoded images must be uint8 (N, H, W) or (N, H, W, C) with C = 1 or 3, one per label."""
    name = names["images"]
    if dtype != np.uint8 or len(shape) not in (3, 4):
        raise DataError(f"data.root: {name} in {path} must be uint8 (N,H,W[,C]), got {dtype} {shape}")
    if len(shape) == 4 and shape[-1] not in (1, 3):
        hint = " (channels first? the layout is channels last)" if shape[1] in (1, 3) else ""
        raise DataError(
            f"data.root: {name} in {path} must have 1 or 3 channels, last: (N, H, W, C), got shape {shape}{hint}"
        )
    if shape[0] != count:
        raise DataError(
            f"data.root: {name} in {path} has {shape[0]} images but {names['labels']} has {count} labels: one each"
        )


def _check_offsets(names: dict[str, str], offsets: np.ndarray, n_bytes: int, count: int, path: str) -> None:
    """JPEG offsets: one more than the labels, rising strictly within the byte buffer."""
    name = names["offsets"]
    if offsets.ndim != 1 or not np.issubdtype(offsets.dtype, np.integer) or len(offsets) != count + 1:
        raise DataError(
            f"data.root: {name} in {path} must be {count + 1} integer offsets (one more than the {count} labels "
            f"in {names['labels']}), got {offsets.dtype} {offsets.shape}"
        )
    if count and (offsets[0] < 0 or offsets[-1] > n_bytes or np.any(np.diff(offsets) <= 0)):
        raise DataError(f"data.root: {name} in {path} must rise strictly within the {n_bytes} bytes of {names['images']}")


def _npz_header(d: Any, name: str) -> tuple[tuple[int, ...], np.dtype]:
    """An array's shape and dtype from its ``.npy`` header, without reading the data."""
    fmt = np.lib.format
    with d.zip.open(name + ".npy") as f:
        read = fmt.read_array_header_1_0 if fmt.read_magic(f) == (1, 0) else fmt.read_array_header_2_0
        shape, _, dtype = read(f)
    return tuple(shape), dtype


def _npz_images(d: Any, names: dict[str, str], path: str, count: int, *, decode: bool = True) -> np.ndarray | None:
    """One split's images as uint8 (N, H, W, C), C = 1 or 3, JPEG bytes decoded; ``count``: its number of labels.
    ``decode=False`` checks the layout only (shapes from the headers, offsets) and returns None."""
    name = names["images"]
    if "offsets" in names:
        shape, dtype = _npz_header(d, name)
        if dtype != np.uint8 or len(shape) != 1:
            raise DataError(f"data.root: {name} in {path} must be 1-D uint8 bytes, got {dtype} {shape}")
        offsets = d[names["offsets"]]
        _check_offsets(names, offsets, shape[0], count, path)
        return _decode_jpegs(d[name], offsets, name, path) if decode else None
    _check_images(names, *_npz_header(d, name), count, path)
    if not decode:
        return None
    x = d[name]
    return x[..., None] if x.ndim == 3 else x


def _npz(cfg: DataConfig, train: bool) -> ArrayData:
    split = "train" if train else "test"
    path = str(cfg.root)
    with np.load(path, allow_pickle=False) as d:
        labels, classes, num_classes = _npz_labels(d, path)
        y = labels[split]
        x = _npz_images(d, _npz_layout(set(d.files), split, path), path, len(y))
    if classes is None:
        classes = [str(i) for i in range(num_classes)]
    return ArrayData(np.ascontiguousarray(x), y, classes)


def subset_indices(n: int, subset: int | None) -> np.ndarray | None:
    """The sorted indices of a ``subset`` of ``range(n)``, or None for all of it.

    A fixed permutation (independent of the run seed) so runs with different seeds see the same subset.
    """
    if subset is None or subset >= n:
        return None
    return np.sort(np.random.default_rng(0).permutation(n)[:subset])


def load_arrays(cfg: DataConfig, train: bool) -> ArrayData:
    """Load one split of a tensor dataset as uint8 NHWC arrays (3 channels, ``image_size`` square)."""
    if cfg.dataset == "digits":
        data = _digits(train, cfg.image_size)
    elif cfg.dataset in ("cifar10", "cifar100"):
        data = _cifar(cfg, train)
    elif cfg.dataset == "npz":
        data = _npz(cfg, train)
    else:
        raise ValueError(f"data.dataset: {cfg.dataset!r} is not a tensor dataset")
    idx = subset_indices(len(data.y), cfg.train_subset if train else cfg.eval_subset)
    if idx is not None:
        data = ArrayData(data.x[idx], data.y[idx], data.classes)
    x = data.x
    if x.shape[-1] == 1:
        x = np.repeat(x, 3, axis=-1)
    if x.shape[1] != cfg.image_size or x.shape[2] != cfg.image_size:
        t = torch.from_numpy(x).permute(0, 3, 1, 2).float()
        mode = cfg.interpolation or "bilinear"
        t = F.interpolate(
            t, size=(cfg.image_size, cfg.image_size), mode=mode, antialias=mode != "nearest"
        )
        x = t.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()
    return ArrayData(x, data.y, data.classes)


def default_stats(cfg: DataConfig, train_x: np.ndarray | None) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Normalisation statistics: the config's, the dataset's usual ones (:data:`DATASET_FACTS`), ImageNet's for
    data decoded by workers, or the training split's own."""
    facts = DATASET_FACTS.get(cfg.dataset)
    if cfg.mean is not None and cfg.std is not None:
        mean, std = tuple(cfg.mean), tuple(cfg.std)
    elif facts is not None and facts.mean is not None:
        mean, std = facts.mean, facts.std
    elif train_x is None:
        mean, std = IMAGENET_MEAN, IMAGENET_STD
    else:
        xf = train_x.reshape(-1, train_x.shape[-1]).astype(np.float64) / 255.0
        mean, std = tuple(xf.mean(0).tolist()), tuple(np.maximum(xf.std(0), 1e-3).tolist())
    if cfg.mean is not None:
        mean = tuple(cfg.mean)
    if cfg.std is not None:
        std = tuple(cfg.std)
    if len(mean) == 1:
        mean = mean * 3
    if len(std) == 1:
        std = std * 3
    return mean, std


# -- sizes -----------------------------------------------------------------------------------------------------


def train_batches(n: int, cfg: DataConfig, world: int, batch_multiple: int = 1, where: str = "") -> int:
    """Training batches per epoch and process: ``n`` images split over ``world`` ranks, the remainder of each rank's
    share dropped (``drop_last``), whole accumulation groups of ``batch_multiple`` batches only."""
    per_rank = n // world
    if per_rank < cfg.batch_size * batch_multiple:
        raise ValueError(
            f"data.batch_size: {cfg.batch_size} x grad_accum {batch_multiple} exceeds the {per_rank} "
            f"training images per process{where}"
        )
    nb = per_rank // cfg.batch_size
    return nb - nb % batch_multiple


@dataclass(frozen=True)
class DatasetPeek:
    """What the dry run learns without decoding an image: training images (after ``train_subset``) and classes,
    None where only reading the data would tell (then ``unknown`` says why)."""

    train_size: int | None
    num_classes: int | None
    unknown: str = ""


def _peek_npz(path: str) -> tuple[int, int] | None:
    with np.load(path, allow_pickle=False) as d:
        if not any(k in d.files for k in ("y_train", "train_labels")):
            return None  # not our layout: the real run's loader says what is missing
        labels, _, num_classes = _npz_labels(d, path)
        for split, y in labels.items():  # the images' layout from their headers; nothing decoded
            _npz_images(d, _npz_layout(set(d.files), split, path), path, len(y), decode=False)
    return len(labels["train"]), num_classes


def _peek_folder(root: Path) -> tuple[int, int]:
    listing = image_folder(str(_folder_split(root, True)))
    image_folder(str(_folder_split(root, False)), classes=listing.class_to_idx)  # its classes must be train's
    return len(listing.samples), len(listing.classes)


def peek_dataset(cfg: DataConfig) -> DatasetPeek:
    """Training-set size and classes from :data:`DATASET_FACTS` or an index (a folder listing, the label array,
    a ``save_to_disk`` folder's row count, a declared webdataset size); nothing is decoded and nothing guessed."""
    facts = DATASET_FACTS.get(cfg.dataset)
    if facts is not None:
        n, classes = facts.train_size, facts.num_classes
    else:
        root = cfg.root
        found = None
        if cfg.dataset == "npz" and root is not None and os.path.isfile(root):
            found = _peek_npz(root)
        elif cfg.dataset == "imagefolder" and root is not None and (Path(root) / "train").is_dir():
            found = _peek_folder(Path(root))
        elif cfg.dataset == "hfds":
            from timm_drop.training.streams import hfds_peek

            found = hfds_peek(cfg)
        elif cfg.dataset == "wds" and root is not None:
            from timm_drop.training.streams import wds_num_samples

            count = wds_num_samples(cfg)
            found = None if count is None else (count, cfg.num_classes)
        if found is None:
            if cfg.dataset == "hfds" and cfg.hfds.name is not None:
                why = f"data.hfds.name={cfg.hfds.name!r} is not loaded by a dry run (it may need a download)"
            elif cfg.dataset == "wds":
                why = "no data.wds.train_samples and no _info.json under data.root"
            else:
                why = f"no {cfg.dataset} data to list at data.root={root!r}"
            return DatasetPeek(None, None, why)
        n, classes = found
    idx = subset_indices(n, cfg.train_subset)
    return DatasetPeek(n if idx is None else len(idx), classes)


# -- loaders -------------------------------------------------------------------------------------------------


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

    def _setup(
        self,
        n: int,
        cfg: DataConfig,
        *,
        train: bool,
        device: torch.device,
        seed: int,
        rank: int,
        world: int,
        mean,
        std,
        channels_last: bool,
        batch_multiple: int,
        where: str = "",
    ) -> None:
        self.n = n
        #: what the run should say about this data before training (printed as ``note:`` lines)
        self.notes: list[str] = []
        self.cfg, self.train, self.device = cfg, train, device
        self.seed, self.rank, self.world, self.epoch = seed, rank, world, 0
        self.batch_size = cfg.batch_size if train else cfg.eval_batch_size
        self.batch_multiple = batch_multiple
        self.norm = _Normalizer(mean, std, device, channels_last)
        self.mean, self.std = tuple(float(v) for v in mean), tuple(float(v) for v in std)
        self.n_batches = (
            train_batches(n, cfg, world, batch_multiple, where)
            if train
            else math.ceil(math.ceil(n / world) / self.batch_size)
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

    def __init__(
        self,
        data: ArrayData,
        cfg: DataConfig,
        *,
        train: bool,
        device: torch.device,
        seed: int,
        rank: int = 0,
        world: int = 1,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        channels_last: bool = False,
        batch_multiple: int = 1,
    ) -> None:
        self._setup(
            len(data.y),
            cfg,
            train=train,
            device=device,
            seed=seed,
            rank=rank,
            world=world,
            mean=mean,
            std=std,
            channels_last=channels_last,
            batch_multiple=batch_multiple,
        )
        self.x = torch.from_numpy(data.x).to(device)
        self.y = torch.from_numpy(data.y).to(device)

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


def seed_worker_rngs(s: int) -> None:
    """The global RNGs a worker's PIL/torchvision transforms draw from."""
    import random

    # the CPU generator only (a worker's transforms run on the CPU): torch.manual_seed also visits every
    # accelerator backend, which costs more than the decode of a small image
    torch.default_generator.manual_seed(s)
    random.seed(s)
    np.random.seed(s % 2**32)


def worker_seed(key: int, worker_id: int) -> int:
    """One loader worker's seed for an epoch key (a pure function of ``(seed, epoch, rank)``)."""
    return mix_seed(key, worker_id)


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
        self,
        dataset: torch.utils.data.Dataset,
        classes: list[str],
        cfg: DataConfig,
        *,
        train: bool,
        device: torch.device,
        seed: int,
        rank: int = 0,
        world: int = 1,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        channels_last: bool = False,
        batch_multiple: int = 1,
        where: str = "",
    ) -> None:
        idx = subset_indices(len(dataset), cfg.train_subset if train else cfg.eval_subset)
        self.dataset = dataset if idx is None else torch.utils.data.Subset(dataset, idx.tolist())
        self.classes = list(classes)
        self._setup(
            len(self.dataset),
            cfg,
            train=train,
            device=device,
            seed=seed,
            rank=rank,
            world=world,
            mean=mean,
            std=std,
            channels_last=channels_last,
            batch_multiple=batch_multiple,
            where=where,
        )
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


def open_image(path: str) -> Any:
    """An image file as RGB (torchvision's ``ImageFolder`` loader), or :class:`DataError` naming the file."""
    from PIL import Image

    try:
        with open(path, "rb") as f:
            return Image.open(f).convert("RGB")
    except Exception as e:  # PIL raises several types for undecodable files (OSError, SyntaxError, ValueError, ...)
        raise DataError(f"data.root: cannot decode image {path}: {e}; fix or remove the file") from None


def image_folder(root: str, transform: Any = None, classes: dict[str, int] | None = None) -> Any:
    """torchvision's ``ImageFolder`` over ``root`` with :func:`open_image`; ``classes``: the class indices to use
    (the training split's), matched to ``root``'s class folders by name. A folder not among them is an error."""
    import torchvision

    # empty class folders are kept: a class is a folder name, whether or not this split has images of it
    ds = torchvision.datasets.ImageFolder(root, transform=transform, loader=open_image, allow_empty=True)
    if classes is not None and ds.class_to_idx != classes:
        unknown = sorted(set(ds.classes) - set(classes))
        if unknown:
            raise DataError(
                f"data.root: {root} has class folder(s) {unknown[:10]} that the training split does not have "
                f"({len(classes)} classes: {sorted(classes)[:10]}{', ...' if len(classes) > 10 else ''}); the model "
                "has no output for them. Remove them, or add them to the training split"
            )
        ds.samples = [(p, classes[ds.classes[y]]) for p, y in ds.samples]
        ds.imgs, ds.targets = ds.samples, [y for _, y in ds.samples]
        ds.class_to_idx, ds.classes = dict(classes), sorted(classes, key=classes.__getitem__)
    return ds


def missing_classes(train: Any, evaluated: Any) -> list[str]:
    """The classes of the training folder that the eval folder has no image of."""
    seen = {y for _, y in evaluated.samples}
    return [c for c, i in train.class_to_idx.items() if i not in seen]


class FolderLoader(WorkerLoader):
    """:class:`WorkerLoader` over an image folder (``root/<class>/*``, torchvision's ``ImageFolder``); ``classes``:
    the training split's class indices, which an eval folder's folders are matched to by name."""

    def __init__(
        self,
        root: str,
        cfg: DataConfig,
        *,
        train: bool,
        mean=IMAGENET_MEAN,
        classes: dict[str, int] | None = None,
        **kw: Any,
    ) -> None:
        self.folder = image_folder(root, pil_transform(cfg, train, mean), classes)
        super().__init__(self.folder, self.folder.classes, cfg, train=train, mean=mean, where=f" in {root}", **kw)


class StreamLoader(_ShardedLoader, _WorkerFed):
    """A worker-backed loader over a webdataset stream (:func:`timm_drop.training.streams.wds_dataset`).

    Training: ``len(self)`` batches of the rank's stream per epoch (the declared sample count, counted by
    :func:`train_batches`), shards shuffled by ``(seed, epoch)``, samples in a buffer seeded by
    ``(seed, epoch, rank, worker)``. Eval: the rank's shards read once, re-batched and padded with masked entries to
    ``len(self)`` batches so every rank runs the same number.
    """

    def __init__(
        self,
        cfg: DataConfig,
        *,
        train: bool,
        device: torch.device,
        seed: int,
        rank: int = 0,
        world: int = 1,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        channels_last: bool = False,
        batch_multiple: int = 1,
    ) -> None:
        from timm_drop.training.streams import EpochStream, wds_dataset

        stream, n = wds_dataset(
            cfg, train, pil_transform(cfg, train, mean), seed=seed, rank=rank, world=world
        )
        self.stream = stream
        self._setup(
            n,
            cfg,
            train=train,
            device=device,
            seed=seed,
            rank=rank,
            world=world,
            mean=mean,
            std=std,
            channels_last=channels_last,
            batch_multiple=batch_multiple,
            where=f" (data.wds.train_samples={n})",
        )
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


def _folder_split(root: Path, train: bool) -> Path:
    names = ["train"] if train else ["val", "validation", "test"]
    for n in names:
        if (root / n).is_dir():
            return root / n
    raise FileNotFoundError(f"data.root: {root} has no {' or '.join(n + '/' for n in names)} folder")


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
    if cfg.dataset in ("imagefolder", "hfds", "wds"):
        if resident is True:
            raise ValueError(
                f"data.device_resident: {cfg.dataset} data is decoded by loader workers; use false or auto"
            )
        mean, std = default_stats(cfg, None)
        kw = dict(
            device=device, seed=seed, rank=rank, world=world, mean=mean, std=std, channels_last=channels_last
        )
        if cfg.dataset in STREAM_DATASETS:
            tr = StreamLoader(cfg, train=True, batch_multiple=batch_multiple, **kw)
            return tr, StreamLoader(cfg, train=False, **kw), cfg.num_classes
        if cfg.dataset == "hfds":
            from timm_drop.training.streams import hfds_dataset

            parts = [hfds_dataset(cfg, t, pil_transform(cfg, t, mean)) for t in (True, False)]
            num_classes = max(n for _, n in parts)
            (tr_ds, _), (ev_ds, _) = parts
            classes = [str(i) for i in range(num_classes)]
            tr = WorkerLoader(tr_ds, classes, cfg, train=True, batch_multiple=batch_multiple, **kw)
            return tr, WorkerLoader(ev_ds, classes, cfg, train=False, **kw), num_classes
        root = Path(cfg.root)
        tr = FolderLoader(
            str(_folder_split(root, True)), cfg, train=True, batch_multiple=batch_multiple, **kw
        )
        ev_root = str(_folder_split(root, False))
        ev = FolderLoader(ev_root, cfg, train=False, classes=tr.folder.class_to_idx, **kw)
        missing = missing_classes(tr.folder, ev.folder)
        if missing:
            ev.notes.append(
                f"data.root: {ev_root} has no images of {len(missing)} of the {len(tr.classes)} training classes "
                f"({missing[:10]}{', ...' if len(missing) > 10 else ''}); eval scores the others only"
            )
        return tr, ev, len(tr.classes)
    train_data = load_arrays(cfg, True)
    eval_data = load_arrays(cfg, False)
    mean, std = default_stats(cfg, train_data.x)
    # Without device residency the arrays stay in host memory and batches are moved per step.
    dev = device if resident in ("auto", True) else torch.device("cpu")
    kw = dict(seed=seed, rank=rank, world=world, mean=mean, std=std, channels_last=channels_last)
    tr = DeviceLoader(train_data, cfg, train=True, device=dev, batch_multiple=batch_multiple, **kw)
    ev = DeviceLoader(eval_data, cfg, train=False, device=dev, **kw)
    num_classes = max(len(train_data.classes), int(train_data.y.max()) + 1)
    return tr, ev, num_classes
