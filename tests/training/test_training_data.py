"""Recipe data: the embedded digits set, CIFAR/npz/ImageFolder readers, sharding, batched augmentation."""

from __future__ import annotations

import io
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from scripts import load_script

from timm_drop.training.augment import cutout, random_crop, random_erasing, random_hflip
from timm_drop.training.config import DataConfig, load_config
from timm_drop.training.data import (
    DeviceLoader,
    FolderLoader,
    LoaderOptions,
    build_loaders,
    load_arrays,
    shard_indices,
)

# The shared data sits beside the checkout (../shared/data); TIMM_DROP_SHARED_DATA points elsewhere.
SHARED = Path(
    os.environ.get("TIMM_DROP_SHARED_DATA", Path(__file__).resolve().parents[3] / "shared" / "data")
)
JPEG_NPZ = SHARED / "cifar10-jpeg.npz"
needs_cifar = pytest.mark.skipif(
    not JPEG_NPZ.is_file(), reason=f"{JPEG_NPZ} (shared CIFAR-10 JPEG export) is absent"
)


def _data_cfg(**kw) -> DataConfig:
    return load_config({"data": kw}).data


def test_digits_are_the_real_sklearn_digits_with_a_fixed_split():
    cfg = _data_cfg(dataset="digits", image_size=16)
    tr, te = load_arrays(cfg, True), load_arrays(cfg, False)
    assert tr.x.shape == (1437, 16, 16, 3) and te.x.shape == (360, 16, 16, 3) and tr.x.dtype == np.uint8
    assert sorted(set(tr.y.tolist())) == list(range(10))
    assert np.array_equal(load_arrays(cfg, True).y, tr.y)  # deterministic split
    # digits are dark-on-light strokes: both background (0) and ink (near 255) occur
    assert tr.x.min() == 0 and tr.x.max() >= 250


def test_training_shards_are_disjoint_equal_and_share_one_permutation():
    g = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    a, b = shard_indices(101, g(), 0, 2, pad=False), shard_indices(101, g(), 1, 2, pad=False)
    assert len(a) == len(b) == 50 and not set(a.tolist()) & set(b.tolist())


def test_eval_shards_cover_every_image_once_with_padding_masked():
    parts = [shard_indices(7, None, r, 3, pad=True) for r in range(3)]
    assert all(len(p) == 3 for p in parts)
    flat = torch.cat(parts)
    real = flat[flat < 7]
    assert sorted(real.tolist()) == list(range(7)) and (flat >= 7).sum() == 2


def test_device_loader_is_a_pure_function_of_seed_and_epoch():
    data = load_arrays(_data_cfg(dataset="digits", image_size=16), True)
    cfg = _data_cfg(
        dataset="digits", image_size=16, batch_size=64, augment={"cutout": 4, "random_erasing": 0.5}
    )
    mk = lambda: DeviceLoader(data, LoaderOptions(cfg, train=True, device=torch.device("cpu"), seed=5))  # noqa: E731
    l1, l2 = mk(), mk()
    l1.set_epoch(2)
    l2.set_epoch(2)
    x1, y1 = next(iter(l1))
    x2, y2 = next(iter(l2))
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    l2.set_epoch(3)
    assert not torch.equal(next(iter(l2))[0], x1)
    assert x1.shape == (64, 3, 16, 16) and len(l1) == 1437 // 64


def test_random_crop_shifts_content_within_the_padding():
    x = torch.arange(2 * 6 * 6, dtype=torch.float32).view(2, 6, 6, 1) + 1
    g = torch.Generator().manual_seed(0)
    offsets = set()
    for _ in range(40):
        out = random_crop(x, 2, g)
        for i in range(2):
            # locate the source pixel (i, 0, 0)+shift: every nonzero output equals a shifted input window
            nz = out[i, ..., 0]
            r, c = torch.nonzero(nz == x[i, 0, 0, 0], as_tuple=True)
            if len(r):
                dy, dx = int(r[0]), int(c[0])
                assert torch.equal(nz[dy:, dx:], x[i, : 6 - dy, : 6 - dx, 0])
                offsets.add((dy, dx))
            assert ((nz == 0) | (nz >= x[i].min())).all()
    assert len(offsets) >= 4  # several distinct shifts occur


def test_hflip_mirrors_about_half_the_images():
    x = torch.randn(2000, 4, 5, 3)
    out = random_hflip(x, torch.Generator().manual_seed(0))
    flipped = (out == x.flip(2)).flatten(1).all(1)
    assert 0.45 < flipped.float().mean() < 0.55 and ((out == x).flatten(1).all(1) | flipped).all()


def test_cutout_zeroes_one_clipped_square_per_image():
    x = torch.ones(4000, 3, 32, 32)
    out = cutout(x, 16, torch.Generator().manual_seed(0))
    zero_frac = (out[:, 0] == 0).float().mean((1, 2))
    assert zero_frac.max() <= 16 * 16 / 1024 + 1e-6 and zero_frac.min() > 0
    assert torch.equal(out[:, 0] == 0, out[:, 2] == 0)  # same square on every channel
    # centre uniform over the image, square clipped at the border: E[area] = E[len_y] E[len_x]
    lens = torch.tensor([min(c + 8, 32) - max(c - 8, 0) for c in range(32)], dtype=torch.float32)
    assert zero_frac.mean().item() == pytest.approx((lens.mean() ** 2 / 1024).item(), rel=0.05)


def test_random_erasing_hits_a_fraction_p_of_images_with_bounded_area():
    x = torch.zeros(4000, 3, 32, 32)
    out = random_erasing(x, 0.5, torch.Generator().manual_seed(0))
    hit = (out != 0).flatten(1).any(1)
    assert 0.46 < hit.float().mean() < 0.54
    area = (out[:, 0] != 0).float().sum((1, 2))[hit] / 1024
    assert area.min() >= 0.015 and area.max() <= 0.43  # side rounding adds a little
    assert area.mean().item() == pytest.approx(0.21, abs=0.04)  # U(0.02, 0.4) area, a few clipped


def test_cifar_pickles_are_read_with_a_numpy_only_unpickler(tmp_path):
    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    (root / "data_batch_1").write_bytes(pickle.dumps({b"data": Evil(), b"labels": []}))
    with pytest.raises(pickle.UnpicklingError, match="refusing to unpickle builtins.print"):
        load_arrays(_data_cfg(dataset="cifar10", root=str(tmp_path)), True)


@pytest.fixture(scope="module")
def small_cifar(tmp_path_factory):
    """The first 64 train / 32 test images of the shared JPEG export, in its own format."""
    if not JPEG_NPZ.is_file():
        pytest.skip(f"{JPEG_NPZ} is absent")
    d = np.load(JPEG_NPZ)
    out = {"classes": d["classes"]}
    for split, n in (("train", 64), ("test", 32)):
        off = d[f"{split}_offsets"][: n + 1]
        out[f"{split}_jpeg"] = d[f"{split}_jpeg"][: off[-1]]
        out[f"{split}_offsets"] = off
        out[f"{split}_labels"] = d[f"{split}_labels"][:n]
    path = tmp_path_factory.mktemp("cifar") / "small-jpeg.npz"
    np.savez(path, **out)
    return path


def _export(src: Path, fmt: str, out: Path) -> None:
    subprocess.run(
        [
            sys.executable,
            str(SHARED / "export_cifar10.py"),
            "--src",
            str(src),
            "--format",
            fmt,
            "--out",
            str(out),
        ],
        check=True,
        capture_output=True,
    )


def _export_pickle_in_process(src: Path, out: Path, monkeypatch) -> None:
    """Run the shared exporter's pickle writer on a small source.

    The exporter cuts the training split into five 10,000-image batch files, so it needs > 40,000 training
    images; the small source's 64 are tiled up to 40,064 (decoding that many JPEGs would take far longer).
    """

    mod = load_script(SHARED / "export_cifar10.py")
    real_decode = mod.decode

    def decode(d, split):
        x, y = real_decode(d, split)
        if split == "train":
            reps = 40064 // len(y)
            x, y = np.tile(x, (reps, 1, 1, 1)), np.tile(y, reps)
        return x, y

    monkeypatch.setattr(mod, "decode", decode)
    monkeypatch.setattr(
        sys, "argv", ["export_cifar10.py", "--src", str(src), "--format", "pickle", "--out", str(out)]
    )
    mod.main()


@needs_cifar
def test_cifar_pickle_layout_npz_and_jpeg_npz_give_identical_pixels(small_cifar, tmp_path, monkeypatch):
    _export_pickle_in_process(small_cifar, tmp_path / "pk", monkeypatch)
    _export(small_cifar, "npz", tmp_path / "dec.npz")
    pk = load_arrays(_data_cfg(dataset="cifar10", root=str(tmp_path / "pk")), False)
    dec = load_arrays(_data_cfg(dataset="npz", root=str(tmp_path / "dec.npz")), False)
    jpg = load_arrays(_data_cfg(dataset="npz", root=str(small_cifar)), False)
    assert pk.x.shape == (32, 32, 32, 3) and pk.classes[0] == "airplane"
    assert np.array_equal(pk.x, dec.x) and np.array_equal(pk.x, jpg.x) and np.array_equal(pk.y, jpg.y)
    # the training images come back from the five data_batch files in order
    tr = load_arrays(_data_cfg(dataset="cifar10", root=str(tmp_path / "pk")), True)
    jtr = load_arrays(_data_cfg(dataset="npz", root=str(small_cifar)), True)
    assert tr.x.shape[0] == 40064 and np.array_equal(tr.x[:64], jtr.x) and np.array_equal(tr.x[-64:], jtr.x)


@needs_cifar
def test_imagefolder_loader_yields_normalised_sharded_batches(small_cifar, tmp_path):
    _export(small_cifar, "imagefolder", tmp_path / "folder")
    cfg = _data_cfg(
        dataset="imagefolder",
        root=str(tmp_path / "folder"),
        batch_size=16,
        eval_batch_size=10,
        num_workers=0,
        augment={"cutout": 8},
    )
    tr, ev, n_cls = build_loaders(cfg, device=torch.device("cpu"), seed=0, rank=1, world=2)
    assert n_cls == 10 and isinstance(tr, FolderLoader)
    batches = list(tr)
    assert len(batches) == len(tr) == 2 and batches[0][0].shape == (16, 3, 32, 32)
    assert batches[0][0].dtype == torch.float32 and batches[0][0].abs().max() < 5
    evb = list(ev)
    assert sum(int(v.sum()) for _, _, v in evb) == 16  # rank 1's half of the 32 test images


def test_npz_errors_name_the_missing_keys(tmp_path):
    np.savez(tmp_path / "bad.npz", images=np.zeros((2, 8, 8, 3), np.uint8))
    with pytest.raises(KeyError, match="x_train/y_train"):
        load_arrays(_data_cfg(dataset="npz", root=str(tmp_path / "bad.npz")), True)


def test_npz_grayscale_is_resized_and_repeated_to_three_channels(tmp_path):
    buf = io.BytesIO()
    rng = np.random.default_rng(0)
    np.savez(
        buf,
        x_train=rng.integers(0, 255, (10, 28, 28), dtype=np.uint8),
        y_train=np.arange(10),
        x_test=rng.integers(0, 255, (4, 28, 28), dtype=np.uint8),
        y_test=np.arange(4),
    )
    (tmp_path / "g.npz").write_bytes(buf.getvalue())
    a = load_arrays(_data_cfg(dataset="npz", root=str(tmp_path / "g.npz"), image_size=32), True)
    assert a.x.shape == (10, 32, 32, 3) and np.array_equal(a.x[..., 0], a.x[..., 2]) and len(a.classes) == 10
