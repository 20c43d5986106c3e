"""The CPU twin of benchmarks/gpu_check.sh runs every step of the GPU check, tiny, so the script cannot rot."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


def test_cpu_twin_runs_every_step_and_writes_dated_markdown(tmp_path):
    env = {**os.environ, "GPU_CHECK_OUT": str(tmp_path), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--cpu"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    steps = ("ops", "recipe_speed", "apply_speed", "train_smoke", "fsdp_smoke", "ops_compiled")
    for step in steps:
        assert f"{step}: ok" in proc.stdout, proc.stdout[-2000:]
    reports = {p.name: p.read_text() for p in tmp_path.glob("*.md")}
    assert sorted(reports) == sorted(f"{s}_cpu_twin.md" for s in steps), sorted(reports)
    for name, text in reports.items():
        assert torch.__version__ in text, name
        assert "UTC" in text, name
    assert "| dropblock |" in reports["ops_cpu_twin.md"]
    assert "backend aot_eager" in reports["ops_compiled_cpu_twin.md"]
    assert "best top-1" in reports["train_smoke_cpu_twin.md"]
    assert "insertion kinds hook, pre_hook, rewrite, slot" in reports["fsdp_smoke_cpu_twin.md"]


def test_gpu_mode_refuses_without_cuda_naming_the_cpu_twin(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: the GPU mode would run for real")
    proc = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_check.sh")],
        cwd=ROOT,
        env={**os.environ, "GPU_CHECK_OUT": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0 and "--cpu" in proc.stderr
    assert not list(tmp_path.iterdir())


def test_the_check_ends_within_its_budget_skipping_the_steps_it_has_no_time_for(tmp_path):
    # a lent GPU comes with ~15 minutes including the machine's start, and a call that outruns its limit
    # returns no files at all: the script must stop in time and say what it skipped
    env = {**os.environ, "GPU_CHECK_OUT": str(tmp_path), "OMP_NUM_THREADS": "1", "GPU_CHECK_BUDGET_S": "25"}
    proc = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--cpu"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    skipped = [line for line in proc.stdout.splitlines() if "SKIPPED" in line]
    assert skipped and "of the 25 s budget left" in skipped[0], proc.stdout[-2000:]
    assert proc.returncode >= len(skipped)
    assert "ops: ok" in proc.stdout  # the first step, the most wanted numbers, ran
    assert (tmp_path / "ops_cpu_twin.md").is_file()
