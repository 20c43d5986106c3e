"""The recipe checks its data when it opens it, through ``recipes/train.py``: image-folder classes are matched by
name across splits, npz arrays are validated (shapes, lengths, dtypes, label ranges) before any training, and an
image that cannot be decoded is named in one ``error:`` line, also when a loader worker meets it mid-epoch."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from scripts import load_script
from tiny import tiny_run

from timm_drop.training import Trainer, load_config


def train_cli():
    return load_script("recipes/train.py").main


def _png(path: Path, value: int, size: int = 8) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size, size, 3), value, dtype=np.uint8)).save(path)


def _folder(root: Path, train: list[str], val: list[str], n: int = 4) -> Path:
    names = sorted(set(train) | set(val))
    for split, classes in (("train", train), ("val", val)):
        for c in classes:
            for i in range(n):
                _png(root / split / c / f"{i}.png", 40 * names.index(c) + i)
    return root


def _folder_run(tmp_path: Path, root: Path, **data) -> dict:
    return tiny_run(
        output_dir=str(tmp_path / "run"),
        data={"dataset": "imagefolder", "root": str(root), "num_workers": 0, "batch_size": 4,
              "eval_batch_size": 4, "train_subset": None, "eval_subset": None, **data},  # fmt: skip
        train={"epochs": 1},
    )


def _write_config(tmp_path: Path, raw: dict) -> list[str]:
    cfg = tmp_path / "cfg.json"  # JSON is YAML
    cfg.write_text(json.dumps(raw))
    return ["--config", str(cfg)]


# -- image folders: classes by name ------------------------------------------------------------------------------


def test_val_classes_are_matched_to_train_classes_by_name(tmp_path, capsys):
    root = _folder(tmp_path / "data", train=["a", "b", "c"], val=["a", "c"])
    trainer = Trainer(load_config(_folder_run(tmp_path, root))).setup()
    try:
        train_idx = trainer.train_loader.dataset.class_to_idx
        labels = {Path(p).parent.name: y for p, y in trainer.eval_loader.dataset.samples}
        # c is train's class 2; numbering val's own folders would make it 1, which is b
        assert train_idx == {"a": 0, "b": 1, "c": 2} and labels == {"a": 0, "c": 2}
        assert trainer.num_classes == 3
        said = capsys.readouterr().out
        assert "note:" in said and "'b'" in said and "val" in said  # the class eval cannot score is reported
    finally:
        trainer.run_dir.release()
        trainer.close_loaders()


def test_a_val_class_unknown_to_train_is_refused_before_training(tmp_path, capsys):
    root = _folder(tmp_path / "data", train=["a", "b"], val=["a", "b", "zebra"])
    args = _write_config(tmp_path, _folder_run(tmp_path, root))
    assert train_cli()(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: data.root") and "zebra" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()  # refused before anything was written


# -- npz arrays --------------------------------------------------------------------------------------------------


def _arrays(n_train: int = 32, n_test: int = 16, classes: int = 4) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "x_train": rng.integers(0, 255, (n_train, 8, 8, 3), dtype=np.uint8),
        "y_train": np.arange(n_train) % classes,
        "x_test": rng.integers(0, 255, (n_test, 8, 8, 3), dtype=np.uint8),
        "y_test": np.arange(n_test) % classes,
    }


BAD_NPZ = {
    "more images than labels": ({"y_train": np.arange(20) % 4}, "y_train"),
    "float labels": ({"y_train": (np.arange(32) % 4).astype(np.float32) + 0.5}, "y_train"),
    "negative labels": ({"y_train": np.arange(32) % 4 - 1}, "y_train"),
    "2-D labels": ({"y_train": (np.arange(32) % 4)[:, None]}, "y_train"),
    "string labels": ({"y_train": np.array(list("abcd") * 8)}, "y_train"),
    "channels first": ({"x_train": np.zeros((32, 3, 8, 8), np.uint8)}, "x_train"),
    "four channels": ({"x_train": np.zeros((32, 8, 8, 4), np.uint8)}, "x_train"),
    "eval label outside the train range": ({"y_test": np.arange(16) % 4 + 3}, "y_test"),
    "label outside the named classes": ({"classes": np.array(["a", "b", "c"])}, "y_train"),
}


@pytest.mark.parametrize("case", list(BAD_NPZ))
def test_bad_npz_arrays_are_refused_when_opened_naming_the_array(tmp_path, capsys, case):
    change, array = BAD_NPZ[case]
    path = tmp_path / "d.npz"
    np.savez(path, **(_arrays() | change))
    raw = tiny_run(output_dir=str(tmp_path / "run"), data={"dataset": "npz", "root": str(path), "batch_size": 8,
                   "train_subset": None, "eval_subset": None})  # fmt: skip
    assert train_cli()(_write_config(tmp_path, raw)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: data") and array in err and "Traceback" not in err, err
    assert not (tmp_path / "run").exists()
    # the dry run reads the labels too
    assert train_cli()([*_write_config(tmp_path, raw), "--dry-run"]) == 2
    assert array in capsys.readouterr().err


def test_good_npz_arrays_still_train(tmp_path):
    path = tmp_path / "d.npz"
    np.savez(path, **_arrays(), classes=np.array(["a", "b", "c", "d"]))
    raw = tiny_run(output_dir=str(tmp_path / "run"), data={"dataset": "npz", "root": str(path), "batch_size": 8,
                   "train_subset": None, "eval_subset": None}, train={"epochs": 1})  # fmt: skip
    assert train_cli()(_write_config(tmp_path, raw)) == 0


# -- images that cannot be decoded -------------------------------------------------------------------------------


def _truncated_jpeg(path: Path) -> None:
    """A real JPEG cut after half its bytes (what an interrupted copy leaves)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
    data = buf.getvalue()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("workers", [0, 2])
def test_a_truncated_jpeg_in_an_image_folder_is_named_in_one_error_line(tmp_path, capsys, workers):
    root = _folder(tmp_path / "data", train=["a", "b"], val=["a", "b"])
    bad = root / "train" / "b" / "broken.jpg"
    _truncated_jpeg(bad)
    args = _write_config(tmp_path, _folder_run(tmp_path, root, num_workers=workers))
    assert train_cli()(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(bad) in err and "Traceback" not in err, err
    assert "truncated" in err.lower()


def test_a_truncated_jpeg_in_an_npz_buffer_names_the_array_and_image(tmp_path, capsys):
    from PIL import Image

    blobs = []
    for i in range(8):
        buf = io.BytesIO()
        Image.fromarray(np.full((8, 8, 3), 30 * i, np.uint8)).save(buf, "JPEG")
        blobs.append(buf.getvalue())
    blobs[5] = blobs[5][: len(blobs[5]) // 2]
    offsets = np.cumsum([0] + [len(b) for b in blobs])
    path = tmp_path / "d.npz"
    np.savez(path, train_jpeg=np.frombuffer(b"".join(blobs), np.uint8), train_offsets=offsets,
             train_labels=np.arange(8) % 2, test_jpeg=np.frombuffer(b"".join(blobs[:4]), np.uint8),
             test_offsets=offsets[:5], test_labels=np.arange(4) % 2, classes=np.array(["a", "b"]))  # fmt: skip
    raw = tiny_run(output_dir=str(tmp_path / "run"), data={"dataset": "npz", "root": str(path), "batch_size": 4,
                   "train_subset": None, "eval_subset": None})  # fmt: skip
    assert train_cli()(_write_config(tmp_path, raw)) == 2
    err = capsys.readouterr().err
    assert "train_jpeg" in err and "image 5" in err and "Traceback" not in err, err
