"""Adding a regularizer is one file: a method declared here, and nowhere else, gets depth scaling, the summary's
strength column, ``viz --strength`` / ``--compare`` with its score map, and its ``timm-drop list`` entry.

``ToyRate`` below is that file's whole content: the class with its strength parameter (named ``rate``, a name no
built-in method uses), compare defaults, figure traits, paper card and score map, and the registration. It is
registered for this module only (the registry-wide contract tests must not see it).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import pytest
import timm
import torch

import timm_drop
from timm_drop.cli import main
from timm_drop.regularizers import Regularizer, registry
from timm_drop.regularizers.base import check_probability
from timm_drop.regularizers.card import MethodCard
from timm_drop.regularizers.figure import FigureTraits
from timm_drop.viz import render_masks


class ToyRate(Regularizer):
    """Toy elementwise drop whose strength is called ``rate``."""

    strength_params: ClassVar[tuple[str, ...]] = ("rate",)
    compare_defaults: ClassVar[dict[str, Any]] = {"rate": 0.25}
    figure: ClassVar[FigureTraits] = FigureTraits(outline_blocks=True)
    card: ClassVar[MethodCard | None] = MethodCard(
        title="A toy method for one-file registration",
        authors="Nobody et al.",
        year=2026,
        venue="timm_drop tests",
        url="https://example.org/toy-rate",
        summary="drops units at the given rate, for the one-file test",
        reported="nothing (a test double)",
    )

    def __init__(self, rate: float, spread: int = 1) -> None:
        super().__init__()
        self.rate = check_probability("rate", rate)
        self.spread = spread

    def is_noop(self) -> bool:
        return self.rate == 0.0

    def regularize(self, x: torch.Tensor) -> torch.Tensor:
        p = self.effective(self.rate)
        keep = torch.bernoulli(torch.ones_like(x, dtype=torch.float32) * (1.0 - p))
        return x * (keep / (1.0 - p)).to(x.dtype)

    @classmethod
    def score_map(cls, x: torch.Tensor, params: Mapping[str, Any]) -> tuple[torch.Tensor, str] | None:
        return x.detach().abs().float(), "toy score |x|"


NAME = "toy_rate"
CORRDROP_SPEC = str(Path(__file__).resolve().parents[2] / "specs" / "corrdrop_cifar_resnet.yaml")
SPEC = {
    "rules": [{"regularizer": NAME, "params": {"rate": 0.4}, "sites": "block", "depth_scaling": "linear"}]
}


@pytest.fixture(scope="module", autouse=True)
def _toy_registered():
    registry.list_regularizers()  # the built-ins first
    registry.register_regularizer(NAME, ToyRate)
    yield
    registry._REGISTRY.pop(NAME, None)


def _model():
    return timm.create_model("resnet20_cifar", pretrained=False, num_classes=10)


def test_a_method_from_one_file_gets_depth_scaling_and_the_summary_strength():
    model = timm_drop.apply_regularizer(_model(), SPEC)
    regs = [m for m in model.modules() if isinstance(m, ToyRate)]
    n = len(regs)
    assert n == 9  # resnet20_cifar: three stages of three blocks
    assert sorted(r.rate for r in regs) == pytest.approx([0.4 * (i + 1) / n for i in range(n)])
    (rule,) = timm_drop.summary(model).rules
    assert rule.regularizer == NAME
    assert rule.strength == {"rate": pytest.approx((0.4 / n, 0.4))}


@pytest.mark.slow
def test_a_method_from_one_file_is_drawn_with_its_strength_compare_defaults_and_score_map():
    spec = {"rules": [{"regularizer": NAME, "params": {"rate": 0.4}, "sites": "stage"}]}
    fig = render_masks(_model(), spec, sites="stage:layer1", strength=0.6, num_images=1)
    (mask,) = fig.find("mask")
    assert mask.method == NAME and mask.params == {"rate": 0.6}
    (score,) = fig.find("score")
    assert "toy score |x|" in score.title
    # compared at a site of another method: the toy's own compare defaults fill what the spec does not give
    fig = render_masks(_model(), CORRDROP_SPEC, sites="stage:layer1", compare=NAME, num_images=1)
    (mask,) = fig.find("mask", method=NAME)
    assert mask.params == {"rate": 0.25}
    fig = render_masks(
        _model(), CORRDROP_SPEC, sites="stage:layer1", compare=NAME, strength=0.5, num_images=1
    )
    assert fig.find("mask", method=NAME)[0].params == {"rate": 0.5}


def test_a_method_from_one_file_is_listed_with_its_card_and_strength(capsys):
    assert main(["list"]) == 0
    (line,) = [line for line in capsys.readouterr().out.splitlines() if line.startswith(NAME + "(")]
    assert line.startswith("toy_rate(rate, spread=1)")
    assert "strength: rate" in line
    assert "drops units at the given rate, for the one-file test" in line
    assert "Nobody et al., timm_drop tests 2026" in line
