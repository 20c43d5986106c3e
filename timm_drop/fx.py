"""Regularizers as FX leaves, for every tracer a user may run on a rewritten model.

Users of timm backbones trace models after we rewrote them: timm's ``timm.models._features_fx``
(``create_feature_extractor``, ``get_graph_node_names``, ``features_only=True, feature_cls='fx'``) and
torchvision's ``torchvision.models.feature_extraction`` with its default tracer. A regularizer's forward branches
on its input's rank and layout; traced through, that is Python control flow on a ``Proxy`` and the trace fails (and
were it to succeed, the training-mode branch of the mask would be baked into the graph). Two mechanisms make
every regularizer a single ``call_module`` node, so the graph calls the live module, which keeps honouring
``train()`` / ``eval()`` and ``set_progress``:

* :func:`register_leaf`: every :class:`~timm_drop.regularizers.base.Regularizer` subclass is added to timm's
  not-traceable registry when the class is created (``__init_subclass__``), so timm's tracers, which pass that
  registry as ``leaf_modules``, never enter it.
* :func:`leaf_node`: a tracer that does enter a regularizer's forward (torchvision's default tracer only keeps
  ``torch.nn`` modules as leaves) gets back the same ``call_module`` node a leaf would have produced, made by the
  tracer itself, so node names (``layer3.timm_drop_...``) and the copied submodules are what a leaf gives.

The graph is the same in train and eval mode, so torchvision's train/eval graph comparison stays quiet.
"""

from __future__ import annotations

from typing import Any

from torch import fx, nn

__all__ = ["leaf_node", "register_leaf"]


def register_leaf(cls: type[nn.Module]) -> type[nn.Module]:
    """Add ``cls`` to timm's not-traceable module registry (a no-op on a timm without one)."""
    try:
        from timm.layers import register_notrace_module
    except ImportError:  # pragma: no cover - every supported timm has it
        return cls
    return register_notrace_module(cls)


def leaf_node(module: nn.Module, x: Any) -> fx.Proxy:
    """The ``call_module`` node a leaf ``module`` applied to the traced value ``x`` would give."""
    # The tracer resolved the module's path before entering its forward (Tracer.call_module), so it exists.
    tracer = x.tracer
    return tracer.create_proxy("call_module", tracer.path_of_module(module), (x,), {})
