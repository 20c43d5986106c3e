"""Smoke test of benchmarks/ops.py: the CPU mode on tiny shapes, one repeat."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest
import torch
from scripts import load_script

import timm_drop

OPS = Path(__file__).resolve().parents[2] / "benchmarks" / "ops.py"


@pytest.fixture(scope="module")
def ops():
    return load_script(OPS)


def _row(report: str, name: str, settings_start: str = "") -> list[str]:
    for line in report.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) > 2 and cells[0] == name and cells[1].startswith(settings_start):
            return cells
    raise AssertionError(f"no row for {name!r} in:\n{report}")


def test_cpu_mode_times_every_registered_regularizer_and_the_references(ops, tmp_path):
    out = tmp_path / "ops.md"
    threads = torch.get_num_threads()
    ops.main(
        [
            "--device",
            "cpu",
            "--shapes",
            "2,8,7,7",
            "--repeats",
            "1",
            "--warmup",
            "0",
            "--fraction-maps",
            "32",
            "--out",
            str(out),
        ]
    )
    assert torch.get_num_threads() == threads
    report = out.read_text()
    for field in ("device: CPU", f"torch {torch.__version__}", "timm ", "torchvision ", "date: ", "floor",
                  "clock: wall", "load average"):  # fmt: skip
        assert field in report
    assert "## Input (2, 8, 7, 7)" in report
    for name in timm_drop.list_regularizers():
        _row(report, name)
    # Our rows and the references must carry a time and both ratios (other methods may report errors).
    for name in ("dropblock", "dropout", "spatial_dropout", "droppath", "timm DropBlock2d",
                 "torchvision drop_block2d", "F.dropout2d", "plain multiply"):  # fmt: skip
        cells = _row(report, name)
        assert re.fullmatch(r"[0-9.]+", cells[2]), cells
        assert cells[3].endswith("x") and cells[4].endswith("x"), cells
    assert _row(report, "timm DropBlock2d", "drop_prob=0.1, block_size=7 (default")[3] == "1.00x"
    assert "## Realised drop fraction (requested 0.1)" in report
    fractions = _row(report, "8x8, 7")
    assert len(fractions) == 5 and all(re.fullmatch(r"[0-9.]+", c) for c in fractions[1:]), fractions


def test_bad_shape_argument_is_rejected_naming_the_flag(ops):
    with pytest.raises(argparse.ArgumentTypeError, match="--shapes"):
        ops.parse_shape("2,8,7")
    with pytest.raises(argparse.ArgumentTypeError, match="--shapes"):
        ops.parse_shape("2,8,x,7")


def test_cpu_clock_needs_one_cpu_thread_and_is_reported(ops, tmp_path):
    with pytest.raises(SystemExit, match="--clock cpu"):
        ops.main(["--device", "cpu", "--clock", "cpu", "--out", str(tmp_path / "x.md")])
    out = tmp_path / "ops.md"
    threads = torch.get_num_threads()
    try:
        ops.main(["--device", "cpu", "--shapes", "2,4,5,5", "--repeats", "1", "--warmup", "0", "--threads", "1",
                  "--clock", "cpu", "--fraction-maps", "0", "--out", str(out)])  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    report = out.read_text()
    assert "clock: cpu (thread CPU time)" in report
    assert re.fullmatch(r"[0-9.]+", _row(report, "dropblock")[2])


def test_compiled_table_takes_the_plain_multiply_call_cost_off_each_compiled_time(ops):
    def row(name, eager, compiled):
        return {"name": name, "label": "", "eager": eager, "compiled": compiled, "error": ""}

    results = [
        row("timm DropBlock2d", 1.0, 2.0),
        row("dropblock", 2.0, 2.6),  # 2.6 - 0.5 = 2.1 > 2.0: the compiled op itself loses
        row("droppath", 1.0, 1.3),  # 1.3 - 0.5 = 0.8: only the call cost makes it slower
        row("plain multiply", 0.5, 1.0),
    ]
    table = ops._table((1, 2, 3, 3), results, floor=0.1, t_copy=0.05, gbps=1.0, compile_on=True)
    assert "compiled call cost (plain multiply, compiled - eager): 0.500 ms" in table
    assert "(compiled - call cost) / eager" in table
    assert _row(table, "dropblock")[8:10] == ["1.30x", "1.05x"]
    assert _row(table, "droppath")[8:10] == ["1.30x", "0.80x"]
    assert _row(table, "plain multiply")[8:10] == ["2.00x", "1.00x"]
