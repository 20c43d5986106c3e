"""``timm-drop viz``: figures of the realised masks, checked by reading the PNG back.

Tiny models and inputs (CIFAR ResNet-20 on 32 px digits, a 2-block ViT on 64 px, a 1-block-per-stage Swin on a
non-square 64x96 input) keep the file fast on 2 cores.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from tiny import LINEAR_RAMP, dropblock_stage_rule, tiny_run, tiny_swin

import timm_drop
from timm_drop.cli import main
from timm_drop.viz import DROP_RGB, capture_masks, load_images, render_masks, to_maps

REPO = Path(__file__).resolve().parents[2]
CORRDROP_SPEC = str(REPO / "specs" / "corrdrop_cifar_resnet.yaml")


def _png(path: Path) -> np.ndarray:
    from matplotlib.image import imread

    return imread(path)[..., :3]


def _crop(img: np.ndarray, bbox: tuple[int, int, int, int], inset: int = 2) -> np.ndarray:
    left, top, right, bottom = bbox
    return img[top + inset : bottom - inset, left + inset : right - inset]


def _drop_pixel_fraction(panel: np.ndarray) -> float:
    """Share of a mask panel's pixels painted in the dropped colour (grays and blue tints never match it)."""
    return float((np.abs(panel - np.array(DROP_RGB)).max(-1) < 0.08).mean())


def _check_mask_panels(fig, tol: float = 0.05) -> None:
    img = _png(fig.path)
    assert img.shape[1::-1] == fig.size
    masks = fig.find("mask")
    assert masks
    for p in masks:
        frac = _drop_pixel_fraction(_crop(img, p.bbox))
        assert frac == pytest.approx(p.map_dropped, abs=tol), (p.site, p.method, p.title)


def _cifar_model():
    return timm.create_model("resnet20_cifar", pretrained=False, num_classes=10)


def test_capturing_masks_does_not_change_what_the_model_computes():
    model = timm_drop.apply_regularizer(_cifar_model(), CORRDROP_SPEC)
    timm_drop.set_progress(model, 1.0)
    model.train()
    x = load_images(model, num_images=3)
    ref_model = copy.deepcopy(model)
    torch.manual_seed(5)
    with torch.no_grad():
        ref = ref_model(x)
    after_ref = torch.rand(4)
    out, caps = capture_masks(model, x, seed=5)
    after_capture = torch.rand(4)
    assert torch.equal(out, ref)
    assert torch.equal(after_ref, after_capture)  # the replay ran in a fork of the random stream
    assert len(caps) == 3 and all(c.exact for c in caps.values())
    for cap in caps.values():
        # CorrDrop multiplies every channel of a sample by one {0, scale} mask
        values = torch.unique(cap.mask)
        assert len(values) <= 2 and values.min() >= 0
        assert torch.equal(cap.mask, cap.mask[:, :1].expand_as(cap.mask))


def test_cnn_compare_figure_panels_and_dropped_fractions(tmp_path):
    out = tmp_path / "cnn.png"
    model = _cifar_model()
    state = copy.deepcopy(model.state_dict())
    torch.manual_seed(1)
    expected = torch.rand(3)
    torch.manual_seed(1)
    fig = render_masks(
        model,
        CORRDROP_SPEC,
        sites="stage:layer1",
        compare="dropblock,corrdrop,attentiondrop",
        strength=0.3,
        out=out,
    )
    # the caller's model (weights, BN statistics, no regularizers) and random stream are untouched
    assert torch.equal(torch.rand(3), expected)
    assert not any(isinstance(m, timm_drop.Regularizer) for m in model.modules())
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    img = _png(out)
    assert img.shape[1::-1] == fig.size
    # one row per image: image, activation, dropblock mask, corrdrop score + mask, attentiondrop weight + mask
    assert [p.kind for p in fig.panels if p.row == 0] == [
        "image",
        "activation",
        "mask",
        "score",
        "mask",
        "score",
        "mask",
    ]
    assert len({p.row for p in fig.panels}) == 2
    for p in fig.find("image") + fig.find("activation"):
        assert _crop(img, p.bbox).std() > 0.02  # real content, not an empty frame
    _check_mask_panels(fig)
    for p in fig.find("mask", method="corrdrop"):
        # one mask per sample, shared by the channels: the drawn map's fraction is the sample's
        assert p.map_dropped == pytest.approx(p.dropped) and p.params["block_size"] == 9
        assert "dropped" in p.title and "block_size=9" in p.title
    blocks = fig.find("mask", method="dropblock")
    # 16 channels x 32x32 per sample: the realised fraction is close to the requested 0.3
    assert all(abs(p.dropped - 0.3) < 0.1 for p in blocks)
    assert all(p.params == {"drop_prob": 0.3, "block_size": 9} for p in blocks)


def test_strength_replaces_only_the_strength_of_the_specs_own_regularizers():
    fig = render_masks(_cifar_model(), CORRDROP_SPEC, sites="stage:layer2", strength=0.5, num_images=1)
    (mask,) = fig.find("mask")
    assert fig.path is None and mask.method == "corrdrop"
    assert mask.params == {"drop_prob": 0.5, "block_size": 7}  # the spec's stage-2 block size is kept
    with pytest.raises(ValueError, match="stage:layer1"):  # an unmatched glob lists the plan's sites
        render_masks(_cifar_model(), CORRDROP_SPEC, sites="stage:head*")


def test_vit_token_sites_are_drawn_on_the_patch_grid(tmp_path):
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, depth=2)
    spec = {
        "rules": [{"regularizer": "dropout", "params": {"drop_prob": 0.4}, "sites": ["block"], "stages": [1]}]
    }
    fig = render_masks(
        vit, spec, compare="dropout,attentiondrop,dropblock", out=tmp_path / "vit.png", num_images=1
    )
    act = fig.find("activation")[0]
    assert act.map_shape == (4, 4) and "NLC 17x192" in act.title and "1 prefix token" in act.title
    left, top, right, bottom = act.bbox
    assert (right - left) == pytest.approx(bottom - top, abs=2)
    assert [p.map_shape for p in fig.find("mask")][:2] == [(4, 4), (4, 4)]
    # a method that needs a 2-D map either acts on the patch grid or gets a panel saying why it cannot
    block = fig.find("mask", method="dropblock") or fig.find("text", method="dropblock")
    assert len(block) == 1 and (block[0].kind == "mask" or "NLC" in block[0].note)
    _check_mask_panels(fig)
    drop = fig.find("mask", method="dropout")[0]
    assert abs(drop.dropped - 0.4) < 0.08  # 16 patch tokens x 192 channels


def test_a_regularizer_that_is_not_a_product_falls_back_to_the_ratio():
    class Shift(timm_drop.Regularizer):
        def regularize(self, x):
            return x + 1.0

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), Shift()).train()
    x = torch.randn(2, 3, 5, 6)
    out, caps = capture_masks(model, x)
    (cap,) = caps.values()
    assert torch.equal(out, model(x)) and not cap.exact
    conv_out = model[0](x)
    known = conv_out != 0
    assert torch.allclose(cap.mask[known], ((conv_out + 1) / conv_out)[known].detach())


def test_to_maps_folds_tokens_row_major_and_permutes_nhwc():
    n, gh, gw, c = 2, 3, 5, 4
    grid = torch.arange(n * gh * gw * c, dtype=torch.float32).view(n, gh, gw, c)
    maps, note = to_maps(grid, "NHWC")
    assert maps.shape == (n, c, gh, gw) and note == ""
    assert maps[1, 2, 0, 4] == grid[1, 0, 4, 2]
    tokens = torch.cat([torch.full((n, 1, c), -1.0), grid.reshape(n, gh * gw, c)], dim=1)
    maps, note = to_maps(tokens, "NLC", grid=(gh, gw), num_prefix_tokens=1)
    assert maps.shape == (n, c, gh, gw) and "prefix" in note
    assert torch.equal(maps, grid.permute(0, 3, 1, 2))


def _small_swin():
    return tiny_swin(img_size=(64, 96), stages=4, window_size=4)


def test_swin_nhwc_site_is_drawn_upright_on_a_non_square_input(tmp_path):
    from matplotlib import colormaps

    swin = _small_swin()
    spec = {
        "rules": [
            {
                "regularizer": "dropblock",
                "params": {"drop_prob": 0.3, "block_size": 3},
                "sites": ["stage"],
                "stages": [1],
            }
        ]
    }
    fig = render_masks(swin, spec, out=tmp_path / "swin.png", num_images=1)
    act = fig.find("activation")[0]
    assert act.map_shape == (16, 24) and act.title.startswith("stage:layers.0\nNHWC 16x24x24")
    left, top, right, bottom = act.bbox
    assert (right - left) / (bottom - top) == pytest.approx(24 / 16, rel=0.05)
    _check_mask_panels(fig)
    # The panel shows the channel mean of the stage output, read independently with a plain hook: sample the PNG
    # at every unit's centre and compare with viridis of that map (a transposed picture cannot match).
    seen = {}
    swin.layers[0].register_forward_hook(lambda m, a, o: seen.setdefault("out", o))
    with torch.no_grad():
        swin(load_images(swin, num_images=1))
    mean = seen["out"][0].mean(-1)  # (16, 24): NHWC, channels last
    expected = colormaps["viridis"](((mean - mean.min()) / (mean.max() - mean.min())).numpy())[..., :3]
    ys = top + (np.arange(16) + 0.5) * (bottom - top) / 16
    xs = left + (np.arange(24) + 0.5) * (right - left) / 24
    got = _png(fig.path)[ys.astype(int)[:, None], xs.astype(int)[None, :]]
    assert np.abs(got - expected).max() < 0.03


def test_cli_viz_writes_the_figure_and_refuses_bad_input(tmp_path, capsys):
    out = tmp_path / "fig.png"
    args = [
        "viz",
        "resnet20_cifar",
        CORRDROP_SPEC,
        "--sites",
        "stage:layer3",
        "--compare",
        "dropblock,corrdrop",
    ]
    assert main([*args, "--seed", "3", "--out", str(out)]) == 0
    assert out.read_bytes()[:4] == b"\x89PNG" and "mask panel" in capsys.readouterr().out
    assert main([*args, "--out", str(out)]) == 2  # exists, no --overwrite
    assert "--overwrite" in capsys.readouterr().err
    bad = ["viz", "resnet20_cifar", CORRDROP_SPEC, "--compare", "dropblok", "--out", str(tmp_path / "b.png")]
    assert main(bad) == 2 and "dropblock" in capsys.readouterr().err  # names the nearest method
    missing = ["viz", "resnet20_cifar", CORRDROP_SPEC, "--image", str(tmp_path / "no.jpg"), "--out", str(out)]
    assert main([*missing, "--overwrite"]) == 2 and "no.jpg" in capsys.readouterr().err


def test_cli_viz_errors_quote_paths_whole(tmp_path, capsys):
    """An error naming a path keeps all of it (a message once lost the quote closing the path)."""
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("not an image")
    args = ["viz", "resnet20_cifar", CORRDROP_SPEC, "--image", str(not_an_image), "--out", str(tmp_path / "f.png")]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith(f"'{not_an_image}'"), err
    assert err.count(f"{not_an_image}") == 2  # the file named by timm_drop, then in PIL's own words


def test_image_files_are_resized_with_the_models_data_config(tmp_path):
    from PIL import Image

    path = tmp_path / "wide.png"
    Image.fromarray((np.random.default_rng(0).random((40, 90, 3)) * 255).astype(np.uint8)).save(path)
    x = load_images(_small_swin(), [path])
    assert x.shape == (1, 3, 64, 96)
    with pytest.raises(FileNotFoundError, match="missing.png"):
        load_images(_small_swin(), [tmp_path / "missing.png"])


TINY_RUN = tiny_run(
    name="viz",
    seed=2,
    regularizer={"rules": [dropblock_stage_rule(stages=[1], schedule=LINEAR_RAMP)]},
    data={"eval_batch_size": 32, "eval_subset": 32},
)


def test_recipe_mask_every_writes_grids_without_changing_training(tmp_path):
    from timm_drop.training import Trainer, load_config

    def run(name: str, every: int) -> list[dict]:
        raw = json.loads(json.dumps(TINY_RUN))
        raw["output_dir"] = str(tmp_path / name)
        raw["log"]["mask_every"] = every
        Trainer(load_config(raw)).fit()
        rows = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
        return [
            {k: v for k, v in json.loads(r).items() if "time" not in k and "per_s" not in k} for r in rows
        ]

    with_masks, without = run("masks", 1), run("plain", 0)
    assert (
        with_masks == without
    )  # same losses, accuracies and strengths: the grid consumed no training randomness
    for epoch in (1, 2):
        assert (tmp_path / "masks" / "masks" / f"epoch_{epoch:03d}.png").read_bytes()[:4] == b"\x89PNG"
    assert not (tmp_path / "plain" / "masks").exists()


def test_config_rejects_a_negative_mask_every():
    from timm_drop.training import load_config
    from timm_drop.training.config import ConfigError

    raw = json.loads(json.dumps(TINY_RUN))
    raw["log"]["mask_every"] = -1
    with pytest.raises(ConfigError, match="log.mask_every"):
        load_config(raw)


def _modules_viz_imports() -> set[str]:
    """Every ``timm_drop`` module the viz source imports, at the top or inside a function."""
    import ast

    import timm_drop.viz as viz

    root = Path(viz.__file__)
    files = sorted(root.parent.glob("*.py")) if root.name == "__init__.py" else [root]
    found = set()
    for f in files:
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                found.add(node.module)
            elif isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
    return {m for m in found if m.startswith("timm_drop")}


def test_viz_never_imports_the_command_line():
    """Data flows one way: the CLI drives viz, viz never reaches back into the CLI (nor, on import, training)."""
    import subprocess
    import sys

    probe = (
        "import sys, timm_drop.viz; "
        "print(sorted(m for m in sys.modules if m.startswith(('timm_drop.cli', 'timm_drop.training'))))"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    assert not {m for m in _modules_viz_imports() if m.split(".")[:2] == ["timm_drop", "cli"]}


def test_viz_never_imports_the_training_package():
    assert not {m for m in _modules_viz_imports() if m.split(".")[:2] == ["timm_drop", "training"]}
