"""``train.strategy: fsdp``: FSDP2 through Accelerate's plugin, one shard unit per block.

Accelerate does the sharding of the model root, the optimizer's move to the sharded parameters, gradient
clipping, the full state dict and ``save_state``/``load_state``; the recipe adds:

* **the units.** Each block of the model (:func:`timm_drop.sites.find_blocks`: the modules a spec's ``block``
  sites are, the same notion LayerOut's ``unit="block"`` uses) becomes its own ``fully_shard`` unit, deepest first,
  before the optimizer is built; Accelerate's ``prepare`` then shards the root around them (it skips modules that
  are already units). Accelerate's own policies cannot express this: its transformer policy finds classes by name
  and matches them with ``isinstance``, and a block that received a graph rewrite has a class of its own (same
  name, generated subclass), so siblings would be missed; its size policy cuts a model by parameter count, not
  at blocks. Regularizers are parameter-free children or hooks of those blocks, so they need nothing: a slot is a
  child, a rewritten forward calls its children by attribute, and FSDP's own pre-forward hook (registered after
  timm_drop's, and prepended) gathers the parameters before a timm_drop pre-hook runs.
* **the checkpoints.** ``FULL_STATE_DICT``: ``save_state`` writes the gathered model (``pytorch_model_fsdp.bin``)
  and optimizer from the main process, which loads into an unsharded model with ``load_state_dict`` as it is;
  ``last_model``/``best_model`` come from ``Accelerator.get_state_dict`` (a collective: every process calls it).
* **the precision.** fp32 parameters, the forward under autocast (:func:`autocast_forward`).
* **the launch check.** Accelerate switches to FSDP only in a GPU-type multi-process launch (``AcceleratorState``
  sets ``DistributedType.FSDP`` in its MULTI_GPU/NPU/XPU/... branch; for MULTI_CPU, gloo, and for a single process
  not started by ``torchrun``, it ignores the plugin and would train unsharded). :func:`require_fsdp_launch`
  turns that silence into an error.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from timm_drop.training.config import ConfigError, ConfigProblem

__all__ = [
    "autocast_forward",
    "fsdp_plugin",
    "fsdp_units",
    "require_fsdp_launch",
    "shard_units",
    "use_fsdp_env",
]

#: Accelerate reads (and its ``Accelerator`` sets) this to mean "FSDP"; ``accelerate launch --use_fsdp`` sets it
FSDP_ENV = "ACCELERATE_USE_FSDP"


def fsdp_plugin() -> Any:
    """Accelerate's FSDP2 plugin as the recipe uses it: no Accelerate auto-wrap (the recipe's units), full state
    dicts, parameters resharded after forward, fp32 parameters (:func:`autocast_forward`); offload and the rest
    from Accelerate's ``FSDP_*`` variables."""
    from accelerate.utils import FullyShardedDataParallelPlugin
    from torch.distributed.fsdp import MixedPrecisionPolicy

    return FullyShardedDataParallelPlugin(
        fsdp_version=2,
        auto_wrap_policy="NO_WRAP",
        reshard_after_forward=True,
        state_dict_type="FULL_STATE_DICT",
        # set, so Accelerate keeps it instead of casting the parameters to train.precision (see autocast_forward)
        mixed_precision_policy=MixedPrecisionPolicy(),
        # every process builds the model the same way (seeded): nothing to load on rank 0 and broadcast
        cpu_ram_efficient_loading=False,
        activation_checkpointing=False,
    )


@contextmanager
def use_fsdp_env(strategy: str):
    """Around ``Accelerator(...)``: refuse a launcher's FSDP for a DDP config; undo the process-wide variable the
    ``Accelerator`` sets for ours, so a later DDP run in the same process (tests, notebooks) stays DDP."""
    before = os.environ.get(FSDP_ENV)
    if strategy != "fsdp" and (before or "").lower() == "true":
        raise ConfigError(
            ConfigProblem(
                "train.strategy",
                f"ddp, but the launcher set {FSDP_ENV}=true (accelerate launch --use_fsdp, or an accelerate config "
                "with FSDP): set train.strategy=fsdp (the recipe configures FSDP itself) or launch without FSDP",
            )
        )
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(FSDP_ENV, None)
        else:
            os.environ[FSDP_ENV] = before


def _launch_in_words(accelerator: Any) -> str:
    """What Accelerate made of this launch, for a message (its ``DistributedType`` names read "NO", "MULTI_CPU")."""
    kind = accelerator.distributed_type.value
    words = {
        "NO": "a single process, not distributed",
        "MULTI_CPU": f"{accelerator.num_processes} CPU processes (gloo, DDP)",
        "MULTI_GPU": f"{accelerator.num_processes} GPU processes with DDP",
    }
    return words.get(kind, f"a {kind.lower().replace('_', ' ')} launch")


def require_fsdp_launch(accelerator: Any, plugin: Any, *, cpu: bool = False) -> None:
    """:class:`ConfigError` unless Accelerate really runs FSDP2 with ``plugin`` (it ignores the plugin outside GPU
    launches). ``cpu``: the config's ``train.cpu``."""
    if getattr(accelerator, "is_fsdp2", False) and accelerator.state.fsdp_plugin is plugin:
        return
    if cpu or accelerator.device.type == "cpu":
        why = (
            "train.cpu=true" if cpu else "no GPU"
        ) + ": Accelerate runs CPU processes (gloo) with DDP only, never FSDP"
    else:
        why = "a single process not started by torchrun / accelerate launch: Accelerate runs it without FSDP"
    raise ConfigError(
        ConfigProblem(
            "train.strategy",
            f"fsdp needs a GPU launch by torchrun --nproc_per_node N or accelerate launch --multi_gpu (N >= 1); this "
            f"run is {_launch_in_words(accelerator)} ({why}), so Accelerate would silently train an unsharded "
            "model. Launch it that way, or use train.strategy=ddp",
        )
    )


def autocast_forward(model: nn.Module, accelerator: Any) -> None:
    """bf16/fp16 under FSDP: the forward runs in autocast, as Accelerate's ``prepare`` does for DDP.

    Accelerate's own FSDP2 mixed precision casts the parameters instead, and a BatchNorm cannot run with bf16
    weights beside its fp32 running statistics (``expected scalar type BFloat16 but found Float``); autocast keeps
    batch norm in fp32 and the convolutions and matmuls in the low precision, as a DDP run of the same config does.
    The gathered parameters and the gradient reduction stay fp32."""
    from accelerate.utils import convert_outputs_to_fp32

    model.forward = convert_outputs_to_fp32(accelerator.autocast()(model.forward))


def fsdp_units(model: nn.Module, example_input: torch.Tensor) -> list[str]:
    """The modules that become their own shard unit: the model's blocks, deepest first (``fully_shard`` wants
    children before their parents). A regularized model's blocks are the ``block`` sites of the analysis its
    plan was made from (no second analysis); an untouched model is analysed here."""
    from timm_drop.plans import applied_plans
    from timm_drop.sites import find_blocks

    plans = applied_plans(model)
    if plans:
        blocks = [s.module for s in plans[0].sites if s.kind == "block"]
    else:
        blocks = find_blocks(model, example_input)
    return sorted(blocks, key=lambda n: -n.count("."))


def shard_units(model: nn.Module, units: list[str], accelerator: Any) -> None:
    """``fully_shard`` each unit in place, with the arguments Accelerate's ``prepare`` gives the root (its plugin's
    resharding, offload and mixed-precision policy, its device mesh)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    plugin = accelerator.state.fsdp_plugin
    mesh = getattr(accelerator, "torch_device_mesh", None)
    kwargs = {
        "reshard_after_forward": plugin.reshard_after_forward,
        "offload_policy": plugin.cpu_offload,
        "mp_policy": plugin.mixed_precision_policy or MixedPrecisionPolicy(),
        "mesh": mesh[tuple(accelerator.parallelism_config.fsdp_dim_names)] if mesh is not None else None,
    }
    for name in units:
        fully_shard(model.get_submodule(name), **kwargs)
