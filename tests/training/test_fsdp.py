"""``train.strategy: fsdp``: FSDP2 through Accelerate's plugin, each block sharded, regularizers of every insertion
kind kept, full weights gathered for the exports and checkpoints.

Accelerate turns its FSDP plugin on only for GPU-type launches: ``AcceleratorState`` switches to
``DistributedType.FSDP`` in its MULTI_GPU/NPU/XPU/... branch, never for MULTI_CPU (gloo), so on a CPU box the plugin
would be ignored and the run would silently train unsharded with DDP. The recipe refuses that
(:func:`test_fsdp_outside_a_gpu_launch_is_refused_before_anything_is_written`). Everything below Accelerate's
gate (``prepare``'s FSDP2 path, ``fully_shard``, the full state dict, ``save_state``/``load_state``, clipping) is
device-agnostic, so the two-process test (``benchmarks/fsdp_smoke.py --device cpu``, the CPU twin of the
GPU check's FSDP step) lifts exactly that gate in its gloo processes and runs the Trainer and the user's command,
``recipes/train.py ... train.cpu=true train.strategy=fsdp --resume latest``; ``benchmarks/gpu_check.sh`` runs the
same script on a GPU with the gate untouched.
"""

from __future__ import annotations

import os

import pytest
import torch
from scripts import load_script

from timm_drop.training import ConfigError, Trainer, load_config


# -- config ------------------------------------------------------------------------------------------------
def test_strategy_defaults_to_ddp_and_accepts_fsdp():
    assert load_config({}).train.strategy == "ddp"
    assert load_config({}, ["train.strategy=fsdp"]).train.strategy == "fsdp"
    with pytest.raises(ConfigError) as ei:
        load_config({}, ["train.strategy=zero3"])
    assert "train.strategy" in str(ei.value) and "fsdp" in str(ei.value)


@pytest.mark.parametrize(
    "overrides, conflicting",
    [
        (["train.ema.enabled=true"], "train.ema.enabled"),
        (["layerout={freeze_probs: random}"], "layerout"),
        (["log.mask_every=1"], "log.mask_every"),
        (["train.find_unused_parameters=true"], "train.find_unused_parameters"),
    ],
)
def test_fsdp_refuses_what_it_cannot_shard_naming_both_keys(overrides, conflicting):
    with pytest.raises(ConfigError) as ei:
        load_config({}, ["train.strategy=fsdp", *overrides])
    problems = [p for p in ei.value.problems if p.key == "train.strategy"]
    assert len(problems) == 1, str(ei.value)
    assert conflicting in problems[0].message, str(ei.value)
    load_config({}, overrides)  # each is fine under DDP


def test_fsdp_outside_a_gpu_launch_is_refused_before_anything_is_written(tmp_path):
    out = tmp_path / "run"
    cfg = load_config({"output_dir": str(out)}, ["train.cpu=true", "train.strategy=fsdp"])
    before = os.environ.get("ACCELERATE_USE_FSDP")
    with pytest.raises(ConfigError) as ei:
        Trainer(cfg).setup()
    msg = str(ei.value)
    assert msg.startswith("train.strategy:") and "torchrun" in msg and "train.cpu" in msg, msg
    assert not out.exists()
    # Accelerate marks the process as FSDP through this variable; a later DDP run in it must not inherit that
    assert os.environ.get("ACCELERATE_USE_FSDP") == before


def test_the_fsdp_refusal_says_in_words_what_the_launch_is(tmp_path, capsys):
    from scripts import load_script

    main = load_script("recipes/train.py").main
    rc = main(["train.cpu=true", "train.strategy=fsdp", f"output_dir={tmp_path / 'run'}", "train.epochs=1"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: train.strategy:") and "Traceback" not in err
    assert "is NO" not in err and "a single process" in err, err


def test_ddp_refuses_a_launcher_that_asked_accelerate_for_fsdp(tmp_path, monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    cfg = load_config({"output_dir": str(tmp_path / "run")}, ["train.cpu=true"])
    with pytest.raises(ConfigError) as ei:
        Trainer(cfg, dry_run=True).setup()
    assert str(ei.value).startswith("train.strategy:") and "ACCELERATE_USE_FSDP" in str(ei.value)


def test_a_run_after_an_fsdp_run_in_the_same_process_starts_from_the_launchs_type(tmp_path):
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    def start(name):
        trainer = Trainer(load_config({"output_dir": str(tmp_path / name)}, ["train.cpu=true"]), dry_run=True)
        trainer._start_accelerator()
        return trainer.accelerator.distributed_type

    launch = start("first")
    # what Accelerate's GPU branch leaves in the process-wide state after an FSDP run (it writes its type back)
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    try:
        assert start("second") == launch
    finally:
        PartialState._shared_state["distributed_type"] = launch


def test_accelerate_use_cpu_still_makes_a_launched_process_a_cpu_process(tmp_path):
    """The recipe creates Accelerate's PartialState itself now (to know the launch's type); ACCELERATE_USE_CPU=1
    must keep working as it does inside AcceleratorState: a torchrun-style process on CPU joins gloo."""
    import socket
    import subprocess
    import sys

    code = (
        "from timm_drop.training import Trainer, load_config\n"
        f"t = Trainer(load_config({{'output_dir': {str(tmp_path / 'run')!r}}}), dry_run=True)\n"
        "t._start_accelerator()\n"
        "print('TYPE', t.accelerator.distributed_type.value)\n"
    )
    env = dict(
        os.environ, ACCELERATE_USE_CPU="1", LOCAL_RANK="0", RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1"
    )
    with socket.socket() as sock:  # a free port for the one-process gloo group
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1")
    env.pop("ACCELERATE_USE_FSDP", None)
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "TYPE MULTI_CPU" in proc.stdout, proc.stdout[-2000:]


# -- the wrap policy ---------------------------------------------------------------------------------------
def test_the_shard_units_are_the_specs_blocks():
    import timm

    from timm_drop.sites import find_blocks
    from timm_drop.training.fsdp import fsdp_units

    model = timm.create_model("test_resnet", num_classes=10)
    x = torch.zeros(2, 3, 32, 32)
    units = fsdp_units(model, x)
    assert sorted(units) == sorted(find_blocks(model, x)) and units
    vit = timm.create_model("test_vit", num_classes=10)
    assert fsdp_units(vit, torch.zeros(2, 3, 160, 160)) == [f"blocks.{i}" for i in range(len(vit.blocks))]


# -- two processes ---------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_two_process_fsdp_run_shards_blocks_keeps_every_insertion_kind_and_resumes(tmp_path):
    """benchmarks/fsdp_smoke.py on 2 gloo processes (its CPU twin): one epoch through the Trainer, then the
    user's ``recipes/train.py --resume latest``; the script checks each step and raises naming what failed."""
    smoke = load_script("benchmarks/fsdp_smoke.py")
    # bf16: a BatchNorm model under Accelerate's FSDP2 parameter casting failed (bf16 weights, fp32 running stats)
    argv = ["--device", "cpu", "--nproc", "2", "--precision", "bf16", "--out", str(tmp_path / "fsdp.md")]
    result = smoke.main(argv)
    for rank in result["ranks"]:
        assert set(result["blocks"]) <= set(rank["units"]) and "" in rank["units"]
        assert rank["all_dtensor"] and rank["local_fraction"] < 0.55  # each process holds about half
        assert rank["kinds"] == ["hook", "pre_hook", "rewrite", "slot", "watch"]
        assert rank["resumed_step"] == 2 and rank["momentum_buffers"] > 0
    assert result["ranks"][0]["weights_restored"]
    assert [r["step"] for r in result["rows"]] == [2, 4]
    assert all(r["rule1_drop_fraction"] > 0 for r in result["rows"])
    assert (
        len(result["loads"]) == 2
    )  # exported weights and the checkpoint's gathered model, strict, unsharded
    assert "| 2 | 4 |" in (tmp_path / "fsdp.md").read_text()
