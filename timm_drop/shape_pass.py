"""Pass 1 of site discovery, the shape pass: one forward of a small example input that records, by temporary
hooks on every module, the order modules start and finish, each module's first output shape, how often it ran,
and the first inputs and outputs of the modules the block-local traces will be checked against
(:mod:`timm_drop.sites` module docstring describes the example input it picks)."""

from __future__ import annotations

import itertools
from typing import Any

import torch
from torch import nn

from timm_drop.errors import SiteError
from timm_drop.structure import feature_info

__all__ = ["Recorder", "default_inputs", "input_hw", "shape_pass"]


def _input_channels(model: nn.Module, cfg: dict[str, Any]) -> list[int]:
    """Channel counts to try: the config's first (TResNet's first conv sees 48 channels after space-to-depth),
    then the first convolution's (``in_chans=1`` leaves timm's config at 3)."""
    chans = [int(cfg["input_size"][0])] if cfg.get("input_size") else []
    first_conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    if first_conv is not None:
        chans.append(first_conv.in_channels)
    return list(dict.fromkeys(chans or [3]))


def _size2(value: Any) -> bool:
    return isinstance(value, int) or (
        isinstance(value, (tuple, list)) and len(value) == 2 and all(isinstance(i, int) for i in value)
    )


def default_inputs(model: nn.Module, example_input: Any) -> list[Any]:
    if example_input is not None:
        return [example_input]
    param = next(itertools.chain(model.parameters(), model.buffers()), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    _, h, w = tuple(cfg.get("input_size", (3, 224, 224)))
    sizes: list[tuple[int, int]] = []
    reductions = [d.get("reduction", 1) for d in feature_info(model)] or [32]
    r = max(int(x) for x in reductions if isinstance(x, (int, float))) if reductions else 32
    r = max(r, 8)
    if not cfg.get("fixed_input_size", False):
        sizes.append((2 * r, 3 * r))
    # the configured size of a fixed-size model: the first module that records one (the root, its patch embed,
    # CoaT's patch_embed1; a features_only wrapper holds the model as a child)
    img = next((m.img_size for m in model.modules() if _size2(getattr(m, "img_size", None))), None)
    if isinstance(img, int):
        img = (img, img)
    if isinstance(img, (tuple, list)) and len(img) == 2 and all(isinstance(i, int) for i in img):
        sizes.append((int(img[0]), int(img[1])))
    sizes.append((int(h), int(w)))
    return [
        torch.randn(1, c, *s, device=device, dtype=dtype)
        for c in _input_channels(model, cfg)
        for s in dict.fromkeys(sizes)
    ]


def input_hw(x: Any) -> tuple[int, int]:
    if isinstance(x, torch.Tensor) and x.dim() == 4:
        return int(x.shape[-2]), int(x.shape[-1])
    return (0, 0)


def _clone(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        return v.detach().clone()
    if isinstance(v, (tuple, list)):
        return type(v)(_clone(x) for x in v) if isinstance(v, tuple) else [_clone(x) for x in v]
    if isinstance(v, dict):
        return {k: _clone(x) for k, x in v.items()}
    return v


def _branch_shapes(output: tuple[Any, ...] | list[Any]) -> tuple[tuple[tuple[int, ...] | None, int | None], ...]:
    """``(shape, alias)`` of each element of a list/tuple output: its shape (None if not a tensor) and the index of
    an earlier element that is the same tensor object (None if none)."""
    out = []
    for i, x in enumerate(output):
        alias = next((j for j in range(i) if output[j] is x), None) if isinstance(x, torch.Tensor) else None
        out.append((tuple(x.shape) if isinstance(x, torch.Tensor) else None, alias))
    return tuple(out)


class Recorder:
    """Temporary hooks of the shape pass."""

    def __init__(self, model: nn.Module, capture: set[str]):
        self.clock = 0
        self.start: dict[str, int] = {}
        self.end: dict[str, int] = {}
        self.calls: dict[str, int] = {}
        self.out: dict[str, Any] = {}
        self.branches: dict[str, tuple[tuple[tuple[int, ...] | None, int | None], ...]] = {}
        self.inputs: dict[str, tuple[tuple[Any, ...], dict[str, Any]]] = {}
        self.handles: list[Any] = []
        for name, m in model.named_modules():
            self.handles.append(
                m.register_forward_pre_hook(self._pre(name, name in capture), with_kwargs=True)
            )
            self.handles.append(m.register_forward_hook(self._post(name, name in capture)))

    def _pre(self, name: str, capture: bool):
        def hook(module, args, kwargs):
            self.clock += 1
            self.calls[name] = self.calls.get(name, 0) + 1
            if name not in self.start:
                self.start[name] = self.clock
                if capture:
                    self.inputs[name] = (_clone(args), _clone(kwargs))
            return None

        return hook

    def _post(self, name: str, capture: bool):
        def hook(module, args, output):
            self.clock += 1
            if name not in self.end:
                self.end[name] = self.clock
                self.out[name] = (
                    tuple(output.shape)
                    if isinstance(output, torch.Tensor)
                    else ("tuple" if output is not None else None)
                )
                if isinstance(output, (tuple, list)):
                    self.branches[name] = _branch_shapes(output)
                if capture:
                    self.out["\0" + name] = _clone(output)
            return None

        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def shape_pass(model: nn.Module, inputs: list[Any], capture: set[str]) -> tuple[Recorder, Any]:
    modes = {m: m.training for m in model.modules()}
    errors = []
    try:
        model.eval()
        for x in inputs:
            rec = Recorder(model, capture)
            try:
                with torch.no_grad():
                    if isinstance(x, dict):
                        model(**x)
                    elif isinstance(x, (tuple, list)):
                        model(*x)
                    else:
                        model(x)
                return rec, x
            except Exception as exc:  # try the next candidate size
                errors.append(
                    f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}: "
                    f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                )
            finally:
                rec.remove()
    finally:
        for m, t in modes.items():
            m.training = t
    raise SiteError(
        f"could not run {type(model).__name__} on any example input for the shape pass "
        f"({'; '.join(errors)}); pass example_input="
    )

