"""CorrDrop (Zeng et al., ICASSP 2020): which regions it drops, how much, and its numerical contract."""

from __future__ import annotations

import math

import pytest
import torch

from timm_drop import create_regularizer
from timm_drop.regularizers import corrdrop as corrdrop_module
from timm_drop.regularizers.corrdrop import CorrDrop2d, corr_drop2d, correlation_map


def _dropped(y: torch.Tensor) -> torch.Tensor:
    """Per-position drop indicator (N, H, W) for outputs of a strictly positive input."""
    return (y == 0).all(dim=1)


def _cell_map(cells: torch.Tensor, k: int) -> torch.Tensor:
    """(N, C, h, w) cell vectors -> (N, C, h*k, w*k) map that is constant on each k x k cell."""
    return cells.repeat_interleave(k, dim=2).repeat_interleave(k, dim=3)


# -- which regions ---------------------------------------------------------------------------------------
def test_low_correlation_cells_are_dropped_far_more_often_than_correlated_ones():
    torch.manual_seed(0)
    n, c, k = 512, 8, 4
    cells = torch.zeros(n, c, 4, 4)
    cells[:, 0] = 1.0  # 13 cells share one direction: highly correlated with each other
    low = [(0, 1), (1, 2), (2, 3)]  # three cells point along their own orthogonal axes: correlation 0
    for axis, (i, j) in enumerate(low, start=1):
        cells[:, :, i, j] = 0.0
        cells[:, axis, i, j] = 1.0
    x = _cell_map(cells + 0.05 * torch.rand(n, c, 4, 4), k) + 0.01  # strictly positive

    scores = correlation_map(x, k)
    low_mask = torch.zeros(4, 4, dtype=torch.bool)
    for i, j in low:
        low_mask[i, j] = True
    assert scores[:, low_mask].max() < scores[:, ~low_mask].min()

    rate = _dropped(corr_drop2d(x, 0.1, k)).float().mean(0)  # (16, 16) per-position drop rate
    cell_rate = rate.view(4, k, 4, k).mean(dim=(1, 3))
    low_rate, high_rate = cell_rate[low_mask].mean(), cell_rate[~low_mask].mean()
    # Candidates cover 3/16 of the map, so each is dropped with p^ = 0.1 * 16 / 3 ~ 0.53.
    assert low_rate == pytest.approx(0.1 * 16 / 3, rel=0.1)
    assert high_rate < 0.02
    assert rate.mean() == pytest.approx(0.1, rel=0.1)


def test_correlation_map_is_mean_absolute_cosine_with_the_other_cells():
    cells = torch.zeros(1, 3, 2, 2)
    cells[0, 0, 0, 0] = 2.0  # e0
    cells[0, 0, 0, 1] = -5.0  # -e0: |cos| = 1 with the first cell
    cells[0, 1, 1, 0] = 1.0  # e1: orthogonal to everything
    # cell (1, 1) stays all-zero: a dead region scores 0, not the 1/N' the raw "- I" would give it
    scores = correlation_map(_cell_map(cells, 3), 3)
    assert scores.dtype == torch.float32 and scores.shape == (1, 2, 2)
    expected = torch.tensor([[[1 / 4, 1 / 4], [0.0, 0.0]]])
    torch.testing.assert_close(scores, expected, atol=1e-6, rtol=0)


def test_flat_scores_make_every_cell_a_candidate_so_constant_maps_drop_uniformly():
    torch.manual_seed(1)
    x = torch.full((2000, 4, 12, 12), 3.0)
    rate = _dropped(corr_drop2d(x, 0.2, 4)).float()
    assert rate.mean() == pytest.approx(0.2, rel=0.1)
    cell_rate = rate.mean(0).view(3, 4, 3, 4).mean(dim=(1, 3))
    assert cell_rate.min() > 0.15 and cell_rate.max() < 0.25


def test_chunked_similarity_rows_give_the_same_scores(monkeypatch):
    torch.manual_seed(2)
    x = torch.randn(3, 5, 12, 10)
    whole = correlation_map(x, 2)
    monkeypatch.setattr(corrdrop_module, "_CHUNK_ELEMENTS", 3 * 30 * 4)  # 4 rows per chunk, 8 chunks
    torch.testing.assert_close(correlation_map(x, 2), whole)


def test_scores_are_float32_and_unaffected_by_autocast_or_huge_values():
    torch.manual_seed(14)
    x = torch.randn(2, 16, 10, 10)
    ref = correlation_map(x, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = correlation_map(x, 3)
    assert auto.dtype == torch.float32
    torch.testing.assert_close(auto, ref)
    # Scale invariance of Eq. (1), with no overflow of the squared norm in float32.
    torch.testing.assert_close(correlation_map(x * 1e30, 3), ref, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(correlation_map((x * 1e4).half(), 3), ref, atol=1e-3, rtol=1e-2)


# -- how much ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "h, w, k",
    [
        (32, 32, 9),  # paper, group 1 (cropped cells of 9, 9, 9, 5)
        (16, 16, 7),  # paper, group 2 (cells of 7, 7, 2: printed Eq. (11) would drop 0.58 p)
        (8, 8, 5),  # paper, group 3
        (14, 14, 5),
        (7, 7, 3),
        (13, 9, 4),  # non-square, even block
        (14, 14, 2),  # even block dividing the map
        (6, 6, 9),  # block larger than the map
        (5, 11, 7),  # block larger than one side only
    ],
)
@pytest.mark.parametrize("p", [0.1, 0.3])
def test_realised_drop_fraction_matches_drop_prob(h, w, k, p):
    torch.manual_seed(h * 100 + w + k)
    cells = math.ceil(h / min(k, h)) * math.ceil(w / min(k, w))
    n = math.ceil((6000 if p < 0.2 else 3000) / cells)
    # Positive-mean features (post-ReLU-like) are the hard case: cropped cells average fewer units, score
    # low and become the candidates, which forces the p^ > 1 spill-over.
    x = torch.rand(n, 16, h, w) + 0.01
    frac = _dropped(corr_drop2d(x, p, k)).float().mean().item()
    assert frac == pytest.approx(p, rel=0.1)


def test_strength_buffer_scales_the_drop_fraction():
    torch.manual_seed(3)
    m = CorrDrop2d(0.2, 3).train()
    x = torch.rand(500, 8, 9, 9) + 0.01
    m.strength.fill_(0.5)
    assert _dropped(m(x)).float().mean().item() == pytest.approx(0.1, rel=0.1)
    m.strength.fill_(0.0)
    assert torch.equal(m(x), x)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_inputs_drop_the_requested_fraction(dtype):
    torch.manual_seed(4)
    x = (torch.rand(600, 8, 14, 14) + 0.01).to(dtype)
    y = corr_drop2d(x, 0.05, 5)
    assert y.dtype == dtype and torch.isfinite(y).all()
    assert _dropped(y).float().mean().item() == pytest.approx(0.05, rel=0.1)


# -- mask structure and rescale ------------------------------------------------------------------------------
def test_one_mask_per_sample_shared_by_all_channels_and_aligned_to_the_block_grid():
    torch.manual_seed(5)
    x = torch.rand(64, 6, 11, 13) + 0.01
    y_zero = corr_drop2d(x, 0.3, 4) == 0
    assert (y_zero == y_zero[:, :1]).all()  # identical across channels
    dropped = y_zero[:, 0].float()
    padded = torch.nn.functional.pad(dropped, (0, 3, 0, 1), value=-1)  # 12 x 16 = 3 x 4 cells of 4 x 4
    blocks = padded.view(64, 3, 4, 4, 4).transpose(2, 3).reshape(64, 12, 16)
    for b in range(blocks.shape[1]):
        vals = blocks[:, b][blocks[:, b] >= 0].view(64, -1)
        assert (vals == vals[:, :1]).all()  # a cell is dropped whole or kept whole
    assert dropped.sum() > 0


def test_kept_units_are_rescaled_by_numel_over_kept_over_the_batch():
    torch.manual_seed(6)
    x = torch.rand(16, 4, 10, 10) + 0.5
    y = corr_drop2d(x, 0.25, 3)
    keep = (y != 0).float()
    scale = keep[:, 0].numel() / keep[:, 0].sum()
    torch.testing.assert_close(y, x * keep * scale)
    c = torch.full((16, 4, 10, 10), 2.0)  # mask shared by channels: the sum of a constant map is preserved
    assert corr_drop2d(c, 0.25, 3).mean().item() == pytest.approx(2.0, rel=1e-5)


def test_rescaling_keeps_the_expected_activation():
    torch.manual_seed(7)
    x = torch.rand(800, 4, 16, 16) * 2
    y = corr_drop2d(x, 0.2, 5)
    assert _dropped(y).float().mean().item() == pytest.approx(0.2, rel=0.1)
    assert y.mean().item() == pytest.approx(x.mean().item(), rel=0.01)


def test_eval_mode_and_training_false_are_identity():
    x = torch.randn(2, 3, 8, 8)
    m = CorrDrop2d(0.5, 3).eval()
    assert m(x) is x
    assert corr_drop2d(x, 0.5, 3, training=False) is x
    assert corr_drop2d(x, 0.0, 3) is x


def test_gradient_is_the_mask_because_scores_are_detached():
    torch.manual_seed(8)
    x = (torch.rand(4, 8, 12, 12) + 0.1).requires_grad_()
    y = CorrDrop2d(0.3, 3).train()(x)
    y.sum().backward()
    torch.testing.assert_close(x.grad, (y / x).detach())
    assert (x.grad == 0).any() and (x.grad > 1).any()


# -- shapes, layouts, memory formats ---------------------------------------------------------------------------
@pytest.mark.parametrize("h, w, k", [(1, 1, 3), (2, 3, 3), (2, 3, 2), (1, 5, 2)])
def test_tiny_maps(h, w, k):
    torch.manual_seed(9)
    x = torch.rand(4000, 4, h, w) + 0.01
    y = corr_drop2d(x, 0.2, k)
    assert y.shape == x.shape and torch.isfinite(y).all()
    assert _dropped(y).float().mean().item() == pytest.approx(0.2, rel=0.1)


def test_batch_of_one_drops_whole_cells_and_rescales_per_sample():
    torch.manual_seed(10)
    x = torch.rand(1, 8, 20, 20) + 0.01
    fracs = []
    for _ in range(40):
        y = corr_drop2d(x, 0.2, 5)
        keep = (y[0, 0] != 0).float()
        torch.testing.assert_close(y, x * keep * (keep.numel() / keep.sum()))
        fracs.append(1 - keep.mean().item())
    assert sum(fracs) / len(fracs) == pytest.approx(0.2, rel=0.25)


def test_channels_last_and_non_contiguous_inputs_give_the_same_result_as_contiguous():
    x = torch.randn(4, 8, 12, 12)
    torch.manual_seed(11)
    ref = corr_drop2d(x, 0.3, 3)
    torch.manual_seed(11)
    cl = corr_drop2d(x.to(memory_format=torch.channels_last), 0.3, 3)
    torch.testing.assert_close(cl, ref)
    wide = torch.randn(4, 8, 12, 24)
    view = wide[..., ::2]
    torch.manual_seed(12)
    ref = corr_drop2d(view.contiguous(), 0.3, 3)
    torch.manual_seed(12)
    torch.testing.assert_close(corr_drop2d(view, 0.3, 3), ref)


def test_nhwc_layout_matches_nchw_under_the_same_seed():
    x = torch.randn(3, 8, 10, 14)
    m = CorrDrop2d(0.3, 4).train()
    torch.manual_seed(13)
    ref = m(x)
    m.set_layout("NHWC")
    torch.manual_seed(13)
    out = m(x.permute(0, 2, 3, 1).contiguous())
    torch.testing.assert_close(out, ref.permute(0, 2, 3, 1))
    with pytest.raises(ValueError, match="NLC"):
        m.set_layout("NLC")


# -- construction ---------------------------------------------------------------------------------------------
def test_registry_builds_it_and_repr_shows_settings():
    m = create_regularizer("corrdrop", drop_prob=0.15, block_size=9)
    assert isinstance(m, CorrDrop2d)
    assert m.extra_repr() == "drop_prob=0.15, block_size=9"
    assert list(m.parameters()) == [] and m.state_dict() == {}


@pytest.mark.parametrize(
    "kwargs, exc, needle",
    [
        ({"drop_prob": -0.1}, ValueError, "drop_prob"),
        ({"drop_prob": 1.0}, ValueError, "drop_prob"),
        ({"drop_prob": "0.1"}, TypeError, "drop_prob"),
        ({"drop_prob": True}, TypeError, "drop_prob"),
        ({"block_size": 0}, ValueError, "block_size"),
        ({"block_size": 2.5}, TypeError, "block_size"),
        ({"block_size": True}, TypeError, "block_size"),
        ({"keep_prob": 0.9}, TypeError, "keep_prob"),
    ],
)
def test_bad_parameters_are_rejected_naming_them(kwargs, exc, needle):
    with pytest.raises(exc, match=needle):
        create_regularizer("corrdrop", **kwargs)


def test_functional_rejects_bad_inputs():
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        corr_drop2d(torch.randn(2, 3, 4), 0.1, 3)
    with pytest.raises(ValueError, match="drop_prob"):
        corr_drop2d(torch.randn(2, 3, 4, 4), 1.5, 3)
    with pytest.raises(ValueError, match="block_size"):
        corr_drop2d(torch.randn(2, 3, 4, 4), 0.1, 0)
