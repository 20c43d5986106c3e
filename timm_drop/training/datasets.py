"""The recipes' datasets: what each source is, how one split is read, and what can be known without reading it.

Sources (``data.dataset``):

* ``digits`` — the embedded default (:mod:`timm_drop.datasets.digits`): scikit-learn's bundled ``load_digits``
  (1,797 real 8x8 handwritten digits shipped inside the sklearn wheel; no network, no download), upsampled
  bilinearly to ``image_size`` and repeated to 3 channels; fixed stratified split (20% test, ``random_state=0``).
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
The loaders that serve these splits are in :mod:`timm_drop.training.loaders`.
"""

from __future__ import annotations

import io
import os
import pickle
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN as IMAGENET_MEAN
from timm.data import IMAGENET_DEFAULT_STD as IMAGENET_STD

from timm_drop.datasets import ArrayData, digits_split
from timm_drop.errors import TimmDropError
from timm_drop.models.cifar import CIFAR_MEAN, CIFAR_STD
from timm_drop.training.config import DataConfig

#: every loader yields RGB images (grayscale data is repeated to 3 channels), so models see 3 input channels
IMAGE_CHANNELS = 3

__all__ = [
    "DATASET_FACTS",
    "IMAGE_CHANNELS",
    "STREAM_DATASETS",
    "ArrayData",
    "DataError",
    "DatasetFacts",
    "DatasetPeek",
    "default_stats",
    "image_folder",
    "load_arrays",
    "missing_classes",
    "open_image",
    "peek_dataset",
    "split_folder",
    "subset_indices",
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


#: datasets read as streams (:class:`~timm_drop.training.loaders.StreamLoader`): no length of their own and no way
#: to start an epoch at batch k, so no mid-epoch checkpoints
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


# -- sources -------------------------------------------------------------------------------------------------


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
        data = digits_split(train, cfg.image_size)
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
    listing = image_folder(str(split_folder(root, True)))
    image_folder(str(split_folder(root, False)), classes=listing.class_to_idx)  # its classes must be train's
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


# -- image folders -------------------------------------------------------------------------------------------


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


def split_folder(root: Path, train: bool) -> Path:
    """The training folder under ``root`` (``train/``), or the eval one (``val/``, ``validation/`` or ``test/``)."""
    names = ["train"] if train else ["val", "validation", "test"]
    for n in names:
        if (root / n).is_dir():
            return root / n
    raise FileNotFoundError(f"data.root: {root} has no {' or '.join(n + '/' for n in names)} folder")
