"""What each registered method declares on its class (strength parameters, compare defaults, figure traits, paper
card, score map), read by spec, summary, viz and ``timm-drop list`` instead of lists of method names."""

from __future__ import annotations

import ast
import inspect
import warnings
from pathlib import Path

import pytest
import torch

from timm_drop.regularizers import (
    FigureTraits,
    MethodCard,
    Regularizer,
    get_regularizer_class,
    list_regularizers,
    registry,
    regularizer_params,
)
from timm_drop.regularizers.attentiondrop import AttentionDrop, attention_weights
from timm_drop.regularizers.base import declares
from timm_drop.regularizers.corrdrop import CorrDrop2d, correlation_map
from timm_drop.regularizers.figure import SHARED_COMPARE_VALUES


@pytest.mark.parametrize("name", list_regularizers())
def test_every_registered_method_declares_its_strength_compare_defaults_and_card(name):
    cls = get_regularizer_class(name)
    assert issubclass(cls, Regularizer)
    accepted = regularizer_params(name)
    # declared on the method itself (an empty tuple would be an explicit "no strength"), never inferred
    assert declares(cls, "strength_params") and cls.strength_params, name
    assert set(cls.strength_params) <= set(accepted), name
    assert set(cls.compare_defaults) <= set(accepted), name
    # side by side, methods share one drop probability, block size, top rate and q
    assert all(
        SHARED_COMPARE_VALUES[k] == v for k, v in cls.compare_defaults.items() if k in SHARED_COMPARE_VALUES
    )
    assert isinstance(cls.figure, FigureTraits)
    card = cls.card
    assert isinstance(card, MethodCard), name
    assert card.url.startswith("https://") and 1990 < card.year <= 2026, (name, card)
    assert card.draws.strip(), f"{name}: its card says what it draws at random (the docs' card shows it)"
    assert card.summary and card.reported and "\n" not in card.summary


def test_strength_parameters_are_the_ones_the_old_shared_list_named():
    declared = {n: get_regularizer_class(n).strength_params for n in list_regularizers()}
    assert declared == {
        "attentiondrop": ("drop_prob",),
        "corrdrop": ("drop_prob",),
        "dropblock": ("drop_prob",),
        "dropout": ("drop_prob",),
        "droppath": ("drop_prob",),
        "selectout": ("drop_prob",),
        "selectscale": ("q",),
        "spatial_dropout": ("drop_prob",),
        "spatial_scale": ("q",),
    }


def test_figure_traits_outline_block_methods_and_draw_corrdrops_cells():
    traits = {n: get_regularizer_class(n).figure for n in list_regularizers()}
    assert {n for n, t in traits.items() if t.outline_blocks} == {"dropblock", "corrdrop"}
    assert {n for n, t in traits.items() if t.cell_grid} == {"corrdrop"}


def test_score_maps_are_corrdrops_correlation_score_and_attentiondrops_weight():
    torch.manual_seed(0)
    x = torch.randn(2, 4, 10, 7)
    score, title = CorrDrop2d.score_map(x, {"block_size": 3})
    cells = correlation_map(x, 3)  # (2, 4, 3) cells of 3 x 3, the last row and column cut by the map
    assert title == "correlation score F (Eq. 3)" and score.shape == (2, 1, 10, 7)
    assert torch.equal(score[:, 0, 9, 6], cells[:, 3, 2]) and torch.equal(
        score[:, 0, 3:6, 0:3], cells[:, 1:2, 0:1].expand(2, 3, 3)
    )
    # a missing block_size is the class default (7), as a spec leaving it out builds it
    assert torch.equal(CorrDrop2d.score_map(x, {})[0], CorrDrop2d.score_map(x, {"block_size": 7})[0])
    score, title = AttentionDrop.score_map(x, {"drop_prob": 0.1, "top_rate": 0.3, "mode": "sm"})
    assert title == "drop weight w (sm)"
    assert torch.equal(score, attention_weights(x, 0.3, "sm").view(x.shape))
    assert AttentionDrop.score_map(x, {"top_rate": 0.3})[1] == "drop weight w (ad)"
    for name in (
        "dropblock",
        "dropout",
        "spatial_dropout",
        "droppath",
        "selectout",
        "selectscale",
        "spatial_scale",
    ):
        assert get_regularizer_class(name).score_map(x, {}) is None


def test_registering_a_method_whose_declarations_name_a_parameter_it_lacks_is_refused():
    class _Wrong(Regularizer):
        strength_params = ("rate",)

        def __init__(self, drop_prob: float = 0.1) -> None:
            super().__init__()

    with pytest.raises(ValueError, match=r"'wrong_decl': strength_params / compare_defaults name \['rate'\]"):
        registry.register_regularizer("wrong_decl", _Wrong)
    assert "wrong_decl" not in list_regularizers()


def test_a_custom_method_that_declares_nothing_keeps_its_drop_prob_strength_with_a_deprecation_warning():
    with pytest.warns(DeprecationWarning, match="declares no strength_params; taking \\('drop_prob',\\)"):

        class _Old(Regularizer):
            def __init__(self, drop_prob: float, size: int = 3) -> None:
                super().__init__()

    assert _Old.strength_params == ("drop_prob",)
    with warnings.catch_warnings():
        warnings.simplefilter("error")

        class _Explicit(Regularizer):  # explicitly none: no warning, no strength
            strength_params = ()

            def __init__(self, drop_prob: float) -> None:
                super().__init__()

    assert _Explicit.strength_params == ()


def test_schedules_import_nothing_from_the_regularizers():
    # regularizers.base imports the schedules; the other way round (even inside a function) would be a cycle
    import timm_drop.schedules

    tree = ast.parse(Path(inspect.getfile(timm_drop.schedules)).read_text())
    imported = [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    imported += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    assert not [m for m in imported if m and m.startswith("timm_drop.regularizers")], imported


def test_layerout_the_controller_carries_its_paper_card_too():
    from timm_drop import LayerOut

    assert LayerOut.card.year == 2020 and "93.57% -> 95.27%" in LayerOut.card.reported
