"""``timm-drop viz`` takes a placement by name wherever it takes a spec (as ``timm-drop plan`` does)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import timm
from scripts import child_env

from timm_drop.cli import main
from timm_drop.viz import render_masks

pytestmark = pytest.mark.usefixtures("one_thread")


def test_cli_viz_draws_a_placement_by_name(tmp_path, capsys):
    out = tmp_path / "fig.png"
    assert main(["viz", "resnet20_cifar", "dropblock", "--out", str(out)]) == 0
    assert out.read_bytes()[:4] == b"\x89PNG"
    printed = capsys.readouterr().out
    assert "mask panel" in printed and "dropblock(" in printed


def test_cli_viz_takes_a_placement_with_overrides(tmp_path, capsys):
    args = ["viz", "resnet20_cifar", "{preset: corrdrop, drop_prob: 0.3}", "--out", str(tmp_path / "f.png")]
    assert main(args) == 0
    assert "corrdrop(drop_prob=0.3" in capsys.readouterr().out


def test_cli_viz_compares_methods_at_a_placements_sites(tmp_path, capsys):
    args = ["viz", "resnet20_cifar", "corrdrop", "--sites", "stage:layer3", "--compare", "dropblock,corrdrop"]
    assert main([*args, "--out", str(tmp_path / "c.png")]) == 0
    printed = capsys.readouterr().out
    assert "stage:layer3" in printed and "dropblock(" in printed and "corrdrop(" in printed


def test_cli_viz_an_unknown_placement_name_is_named_with_the_nearest(tmp_path, capsys):
    out = tmp_path / "f.png"
    assert main(["viz", "resnet20_cifar", "dropblok", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "'dropblok'" in err and "did you mean 'dropblock'" in err and not out.exists()


def test_timm_drop_viz_command_draws_a_placement(tmp_path):
    out = tmp_path / "fig.png"
    cmd = [sys.executable, "-m", "timm_drop.cli", "viz", "resnet20_cifar", "dropblock", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=child_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert out.read_bytes()[:4] == b"\x89PNG" and "dropblock(" in proc.stdout
    # (a mistyped name through the same command: test_cli_viz_an_unknown_placement_name_is_named_with_the_nearest)


def test_token_sites_are_drawn_on_the_grid_their_regularizer_acts_on(tmp_path):
    # CrossViT's two branches: 1 class token + a 20x20 and a 14x14 patch grid (the model records no single grid)
    model = timm.create_model("crossvit_tiny_240", pretrained=False)
    fig = render_masks(model, "dropblock", out=tmp_path / "x.png", num_images=1)
    acts = fig.find("activation")
    assert acts and all(a.map_shape in {(20, 20), (14, 14)} and "1 prefix token" in a.title for a in acts), [
        (a.map_shape, a.title) for a in acts
    ]
