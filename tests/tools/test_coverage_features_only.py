"""``timm-drop coverage --features-only``: the rewriter guarantees over timm's backbone form of each model."""

from __future__ import annotations

import pytest

from timm_drop.cli import main
from timm_drop.tools.coverage import check_model

pytestmark = pytest.mark.usefixtures("one_thread")


def test_check_model_on_a_features_only_backbone_passes_with_stage_sites():
    r = check_model("test_resnet", model_kwargs={"features_only": True})
    assert r.ok, r.reason
    assert r.n_sites.get("stage", 0) == 4


def test_features_only_without_stage_sites_is_a_named_failure(monkeypatch):
    # timm's Twins names its stages block.N in feature_info while its modules are blocks.N: without the alias
    # that maps them, no stage is found
    from timm_drop import structure

    monkeypatch.delitem(structure.FEATURE_ALIASES, "Twins")
    r = check_model("twins_svt_small", model_kwargs={"features_only": True, "depths": (1, 1, 1, 1)})
    assert not r.ok and r.stage == "plan"
    assert "FeatureGetterNet: no stage site" in r.reason


def test_features_only_multi_branch_stages_pass_with_a_site_per_branch():
    # HRNet's stage2 .. stage4 return one map per resolution branch: each branch is a stage site
    r = check_model("hrnet_w18_small", model_kwargs={"features_only": True})
    assert r.ok, r.reason
    assert r.n_sites.get("stage", 0) == 1 + 2 + 3 + 4


def test_model_without_a_features_only_form_is_skipped_with_timms_reason():
    r = check_model("test_mambaout", model_kwargs={"features_only": True})
    assert r.ok or r.skipped, r.reason  # timm builds it (then it must pass) or names why not


def test_cli_features_only_report(tmp_path, monkeypatch):
    import timm_drop.tools.coverage as coverage

    def in_process(names, **kwargs):  # the worker subprocess costs more than the check; run it here
        assert kwargs.pop("features_only") is True
        for name in names:
            yield check_model(name, model_kwargs={"features_only": True}, max_params=kwargs["max_params"])

    monkeypatch.setattr(coverage, "run_coverage", in_process)
    out = tmp_path / "report.md"
    rc = main(["coverage", "--features-only", "--filter", "test_resnet", "--out", str(out)])
    assert rc == 0
    text = out.read_text()
    assert "features_only models (backbones)" in text and "pass rate: 1/1 = 100.0 %" in text


def test_cli_resume_checks_only_the_models_a_cut_short_run_lacks(tmp_path, monkeypatch):
    import timm_drop.tools.coverage as coverage

    asked: list[str] = []

    def in_process(names, **kwargs):
        for name in names:
            asked.append(name)
            yield check_model(name, model_kwargs={"features_only": True}, max_params=kwargs["max_params"])

    monkeypatch.setattr(coverage, "run_coverage", in_process)
    jsonl, out = tmp_path / "run.jsonl", tmp_path / "report.md"
    common = ["coverage", "--features-only", "--jsonl", str(jsonl), "--out", str(out)]
    assert main([*common, "--filter", "test_resnet"]) == 0  # the "cut short" run: one of the two models
    assert main([*common, "--filter", "test_[rv]*t", "--resume"]) == 0
    assert asked == ["test_resnet", "test_vit"]
    assert len(jsonl.read_text().splitlines()) == 2 and "pass rate: 2/2" in out.read_text()
