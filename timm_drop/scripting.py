"""``torch.jit.script`` on a regularized model: TorchScript gets the model without its regularizers.

TorchScript compiles a module's ``forward`` and hooks from their Python source. A regularized model's hooks are
bound methods of holder modules, its rewritten blocks run generated code, and the regularizers' training-mode ops
are Python: none of that compiles. In ``eval()`` every regularizer is the identity, so what a scripted model
computes there is the plain model. :func:`apply_regularizer` therefore gives the model a
``__prepare_scriptable__`` (the hook ``torch.jit.script`` calls first): scripting it compiles a copy that shares
the model's parameters and buffers, with the regularizers stripped, equal to the model in ``eval()`` (timm's
``validate.py --torchscript``, timm's scripting tests, deployment). The copy refuses to run in training mode,
naming the cause, instead of training without its regularizers; the model itself is not changed.

A regularizer on its own scripts too (an FX ``GraphModule`` of a regularized model, scripted, holds them): the
identity in ``eval()``, and an error naming TorchScript in training. Scripting a part of the model that holds a
rewritten block, or a module that holds the regularized model, is refused with what to do instead (TorchScript
would put the stripped copy in place of the model inside its parent).
"""

from __future__ import annotations

import copy
import inspect
import itertools
from typing import Tuple  # noqa: UP035 - TorchScript reads the hook's annotation from its source

import torch
from torch import nn

from timm_drop.record import ModelRef, strip_regularizers

__all__ = ["ScriptableCopy", "scriptable_copy"]

def _refuse_training(self: nn.Module, input: Tuple[torch.Tensor]) -> None:  # noqa: UP006
    if self.training:
        raise RuntimeError(
            "timm_drop: this TorchScript model was scripted from a regularized model without its regularizers "
            "(TorchScript cannot run them); it equals that model in eval() only. Train the eager or "
            "torch.compile'd model"
        )


def scriptable_copy(model: nn.Module) -> nn.Module:
    """``model`` without its regularizers, sharing its parameters and buffers, that refuses training mode (a
    forward pre-hook on its first convolution or linear layer; TorchScript compiles it with the model)."""
    shared = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    clone = copy.deepcopy(model, shared)
    strip_regularizers(clone)
    layers = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
    first = next((m for m in clone.modules() if type(m) in layers), None)
    if first is not None:
        first.register_forward_pre_hook(_refuse_training)
    return clone


class ScriptableCopy:
    """A regularized model's ``__prepare_scriptable__`` (an instance attribute, removed by ``strip_regularizers``):
    ``torch.jit.script(model)`` compiles :func:`scriptable_copy` of it."""

    def __init__(self, model: nn.Module) -> None:
        self.model = ModelRef(model)

    def __call__(self) -> nn.Module:
        caller = inspect.currentframe().f_back
        outer = caller.f_back if caller is not None else None
        names = [f.f_code.co_name for f in (caller, outer) if f is not None]
        if names == ["call_prepare_scriptable_func_impl"] * 2:
            # torch.jit.script was given a module holding this model, and would store the copy in its place
            raise RuntimeError(
                f"timm_drop: torch.jit.script was given a module that holds a regularized {type(self.model()).__name__};"
                f" TorchScript would replace that model inside it by a copy without regularizers. Script the "
                f"regularized model itself, or call timm_drop.strip_regularizers on it first"
            )
        return scriptable_copy(self.model())
