"""The recipes' data, one import away: datasets (:mod:`timm_drop.training.datasets`: sources, facts, peeks) and
loaders (:mod:`timm_drop.training.loaders`: one :class:`LoaderOptions` per loader, :func:`build_loaders`).

``from timm_drop.training.data import ...`` keeps working for every name that lived here before the split; the
training loop reads :func:`build_loaders` through this module.
"""

from timm_drop.datasets import ArrayData
from timm_drop.seeding import seeded_generator
from timm_drop.training.datasets import (
    DATASET_FACTS,
    IMAGE_CHANNELS,
    STREAM_DATASETS,
    DataError,
    DatasetFacts,
    DatasetPeek,
    default_stats,
    image_folder,
    load_arrays,
    missing_classes,
    open_image,
    peek_dataset,
    subset_indices,
    train_batches,
)
from timm_drop.training.loaders import (
    DeviceLoader,
    FolderLoader,
    LoaderOptions,
    StreamLoader,
    WorkerLoader,
    build_loaders,
    pil_transform,
    shard_indices,
)
from timm_drop.training.workers import seed_worker_rngs, worker_seed

__all__ = [
    "DATASET_FACTS",
    "IMAGE_CHANNELS",
    "STREAM_DATASETS",
    "ArrayData",
    "DataError",
    "DatasetFacts",
    "DatasetPeek",
    "DeviceLoader",
    "FolderLoader",
    "LoaderOptions",
    "StreamLoader",
    "WorkerLoader",
    "build_loaders",
    "default_stats",
    "image_folder",
    "load_arrays",
    "missing_classes",
    "open_image",
    "peek_dataset",
    "pil_transform",
    "seed_worker_rngs",
    "seeded_generator",
    "shard_indices",
    "subset_indices",
    "train_batches",
    "worker_seed",
]
