"""``timm-drop`` command line: list, plan, apply, coverage, and exit code 2 with clear messages on bad input."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import timm
import torch

from timm_drop.cli import main
from timm_drop.regularizers import list_regularizers, regularizer_params

SPECS = Path(__file__).resolve().parents[2] / "specs"


pytestmark = pytest.mark.usefixtures("one_thread")


def test_list_prints_every_regularizer_with_its_params(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    lines = {line.split("(", 1)[0]: line for line in out.splitlines()}
    assert set(lines) == set(list_regularizers())
    for name in list_regularizers():
        for param in regularizer_params(name):
            assert param in lines[name].split(")", 1)[0], (name, param)
    assert "dropblock(drop_prob, block_size, per_channel=True)" in out


def test_list_prints_regularizers_only_not_the_layerout_controller(capsys):
    assert main(["list"]) == 0
    assert "layerout" not in capsys.readouterr().out.lower()


def test_the_cli_uses_only_public_names_of_the_package():
    import ast

    import timm_drop.cli

    tree = ast.parse(Path(timm_drop.cli.__file__).read_text())
    private = [
        f"{node.module}.{alias.name}"
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("timm_drop")
        for alias in node.names
        if alias.name.startswith("_")
    ]
    assert private == []


def test_plan_prints_the_table_for_a_spec_file(capsys):
    rc = main(
        ["plan", "resnet18", str(SPECS / "attentiondrop_resnet18.yaml"), "--input-size", "3", "64", "64"]
    )
    assert rc == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if "attentiondrop" in line]
    assert [r.split()[0] for r in rows] == ["layer1", "layer2"]
    assert "16x16" in rows[0] and "8x8" in rows[1]  # shapes from the 64x64 shape pass
    assert "2 regularizer(s)" in out


def test_plan_accepts_yaml_text_and_num_classes(capsys):
    spec = "rules: [{regularizer: dropout, params: {drop_prob: 0.2}, sites: stage, stages: [4]}]"
    assert main(["plan", "resnet10t", spec, "--input-size", "3", "32", "32", "--num-classes", "7"]) == 0
    out = capsys.readouterr().out
    assert "layer4" in out and "drop_prob=0.2" in out


def test_unknown_model_exits_2_with_nearest_names(capsys):
    rc = main(["plan", "resnet5", str(SPECS / "droppath.yaml")])
    assert rc == 2
    err = capsys.readouterr().err
    assert "unknown timm model 'resnet5'" in err
    assert "resnet50" in err


@pytest.mark.parametrize(
    "spec,needle",
    [
        (
            "rules: [{regularizer: dropblok, params: {drop_prob: 0.1, block_size: 3}, sites: stage}]",
            "dropblock",
        ),
        ("rules: [{regularizer: dropout, params: {drop_prob: 1.5}, sites: stage}]", "drop_prob"),
        ("rules: [{regularizer: dropout, params: {drop_prob: 0.1}, sites: [stage], colour: red}]", "colour"),
        ("specs/does_not_exist.yaml", "does_not_exist.yaml"),
    ],
)
def test_bad_spec_exits_2_with_the_spec_error(capsys, spec, needle):
    rc = main(["plan", "resnet10t", spec])
    assert rc == 2
    err = capsys.readouterr().err
    assert needle in err
    assert "Traceback" not in err


def test_spec_matching_nothing_on_the_model_exits_2(capsys):
    spec = "rules: [{regularizer: dropout, params: {drop_prob: 0.1}, sites: module, name: 'nonexistent.*'}]"
    assert main(["plan", "resnet10t", spec, "--input-size", "3", "32", "32"]) == 2
    assert "rule 1 (dropout)" in capsys.readouterr().err


def test_argparse_errors_exit_2():
    with pytest.raises(SystemExit) as exc:
        main(["frobnicate"])
    assert exc.value.code == 2
    with pytest.raises(SystemExit) as exc:
        main(["plan", "resnet10t"])  # SPEC missing
    assert exc.value.code == 2


def test_apply_saves_a_strict_loadable_checkpoint(tmp_path, capsys):
    out = tmp_path / "ckpt.pth"
    args = [
        "apply",
        "resnet10t",
        str(SPECS / "droppath.yaml"),
        "--input-size",
        "3",
        "32",
        "32",
        "--out",
        str(out),
    ]
    assert main(args) == 0
    ckpt = torch.load(out, weights_only=True)
    assert ckpt["model_name"] == "resnet10t"
    assert [e["kind"] for e in ckpt["plan"]["entries"]] == ["residual"]
    assert ckpt["spec"]["rules"][0]["regularizer"] == "droppath"
    fresh = timm.create_model("resnet10t", pretrained=False)
    fresh.load_state_dict(ckpt["state_dict"], strict=True)
    # a second run must not overwrite silently
    capsys.readouterr()
    assert main(args) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(args + ["--overwrite"]) == 0


def test_coverage_writes_a_report_with_the_pass_rate(tmp_path):
    report = tmp_path / "cov.md"
    rc = main(["coverage", "--filter", "resnet10t", "--out", str(report), "--min-pass-rate", "100"])
    text = report.read_text()
    assert rc == 0, text
    assert "pass rate: 1/1 = 100.0 %" in text
    assert "resnet10t" in text
    assert "timm " + timm.__version__ in text


def test_coverage_records_a_hung_model_as_timeout_and_fails_the_min_pass_rate(tmp_path):
    report = tmp_path / "cov.md"
    rc = main(
        ["coverage", "--filter", "resnet1[08]t", "--limit", "1", "--timeout-per-model", "0.01",
         "--out", str(report), "--min-pass-rate", "50"]
    )  # fmt: skip
    text = report.read_text()
    assert rc == 1
    assert "pass rate: 0/1 = 0.0 %" in text
    assert "| resnet10t | timeout |" in text


def test_console_script_is_installed():
    exe = shutil.which("timm-drop")
    if exe is None:
        pytest.skip("timm-drop console script not on PATH (package not pip-installed)")
    proc = subprocess.run([exe, "list"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "dropblock" in proc.stdout


def test_coverage_report_renders_from_jsonl_with_failures_grouped(tmp_path, capsys):
    import json

    from timm_drop.tools.coverage import CoverageResult

    rows = [
        CoverageResult("net_a", True, "ok", n_sites={"stage": 4}, seconds=1.0, input_size=(3, 64, 64)),
        CoverageResult("net_b", False, "eval", "eval output differs from the original (max abs diff 0.5)"),
        CoverageResult("net_c", False, "eval", "eval output differs from the original (max abs diff 0.25)"),
        CoverageResult("net_d", False, "skipped", "300M parameters > max_params 100M"),
    ]
    path = tmp_path / "cov.jsonl"
    path.write_text("".join(json.dumps(r.to_dict()) + "\n" for r in rows))
    assert main(["coverage", "--from-jsonl", str(path), "--command-note", "unit test"]) == 0
    out = capsys.readouterr().out
    assert "pass rate: 1/3 = 33.3 %" in out  # skipped models are not counted
    assert "`unit test`" in out
    # both eval failures fold into one cause (numbers abstracted)
    assert "| 2 | eval: eval output differs from the original (max abs diff N) | net_b, net_c |" in out
    assert "net_d (300M parameters > max_params 100M)" in out


@pytest.mark.parametrize("where", ["missing_dir", "a_dir", "a_dir_with_overwrite"])
def test_apply_out_that_cannot_be_written_is_a_usage_error_before_any_work(tmp_path, capsys, monkeypatch, where):
    (tmp_path / "a_dir").mkdir()
    (tmp_path / "a_dir" / "keep.txt").write_text("keep")
    out = {"missing_dir": tmp_path / "nope" / "ckpt.pth"}.get(where, tmp_path / "a_dir")
    built = []
    monkeypatch.setattr("timm_drop.cli.create_model", lambda *a, **k: built.append(a) or 1 / 0)
    args = ["apply", "resnet10t", str(SPECS / "droppath.yaml"), "--out", str(out)]
    assert main(args + (["--overwrite"] if where.endswith("overwrite") else [])) == 2
    err = capsys.readouterr().err
    assert "--out" in err and str(out) in err
    assert not built  # refused before the model was built
    assert (tmp_path / "a_dir" / "keep.txt").read_text() == "keep"


def test_apply_out_safetensors_writes_safetensors_with_the_spec_in_its_metadata(tmp_path, capsys):
    import json

    from safetensors import safe_open
    from safetensors.torch import load_file

    out = tmp_path / "m.safetensors"
    args = ["apply", "resnet10t", str(SPECS / "droppath.yaml"), "--num-classes", "3", "--out", str(out)]
    assert main(args) == 0
    said = capsys.readouterr().out
    assert "weights only" in said and "safetensors" in said
    fresh = timm.create_model("resnet10t", pretrained=False, num_classes=3)
    fresh.load_state_dict(load_file(out), strict=True)  # safetensors reads it back (it was a torch pickle)
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    assert meta["timm_drop_model"] == "resnet10t" and meta["timm_drop_num_classes"] == "3"
    assert json.loads(meta["timm_drop_spec"])["rules"][0]["regularizer"] == "droppath"
    assert (out.stat().st_mode & 0o777) == 0o666 & ~_umask()


def _umask() -> int:
    import os

    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_apply_never_writes_through_a_symlink_at_out(tmp_path):
    import os

    target = tmp_path / "elsewhere.pth"
    target.write_text("precious")
    out = tmp_path / "ckpt.pth"
    os.symlink(target, out)
    assert main(["apply", "resnet10t", str(SPECS / "droppath.yaml"), "--out", str(out), "--overwrite"]) == 0
    assert target.read_text() == "precious" and not out.is_symlink()
    assert torch.load(out, weights_only=True)["model_name"] == "resnet10t"


def test_apply_with_an_empty_out_is_a_usage_error(capsys):
    assert main(["apply", "resnet10t", str(SPECS / "droppath.yaml"), "--out", ""]) == 2
    err = capsys.readouterr().err
    assert err.startswith("timm-drop apply: error: --out") and "Traceback" not in err


@pytest.mark.parametrize("flag,value", [("--sample", "-3"), ("--sample", "0"), ("--limit", "0"),
                                        ("--limit", "-1"), ("--timeout-per-model", "-5")])  # fmt: skip
def test_coverage_counts_must_be_positive(capsys, flag, value):
    with pytest.raises(SystemExit) as exc:
        main(["coverage", flag, value])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}" in err and value in err and "--filter" not in err.splitlines()[-1], err
