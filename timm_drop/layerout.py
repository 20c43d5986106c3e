"""LayerOut: per-epoch stochastic freezing of layers (Goutam, Balasubramanian, Gera, Sarma; SN Comput. Sci. 2020).

LayerOut is not an activation op but a training-loop controller. For every epoch it draws a Bernoulli vector
``s`` over the K "layers" of a model from a freeze-probability vector ``v`` (paper section 4.1, Eq. 1:
``pi(s) = prod_k v_k^{s_k} (1 - v_k)^{1 - s_k}``, ``s_k = 1`` meaning layer k is frozen). A frozen layer keeps
``W_e = W_{e-1}`` for the whole epoch (section 4.2); the forward pass and evaluation are unchanged, so no
rescaling is needed at test time.

Usage (Accelerate)::

    lo = LayerOut(freeze_probs="random", warmup_epochs=20, seed=0).bind(model)   # before prepare
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    model, optimizer = accelerator.prepare(model, optimizer)
    lo.attach(optimizer)                      # raw or AcceleratedOptimizer
    accelerator.register_for_checkpointing(lo)
    for epoch in range(epochs):
        lo.start_epoch(epoch)                 # same frozen set on every rank
        train_one_epoch(...)
        lo.end_epoch()
        log(lo.history[-1])                   # epoch, n_frozen, frozen_fraction

Choices where the paper is silent or where the official code differs from it:

* ``v`` is the probability of *freezing* (the paper's text and Eq. 1); the official code uses it as a survival
  probability. For the U(0, 1) default both readings give the same distribution. ``"random"`` draws ``v`` once
  from ``seed`` (the paper: "a uniform random vector of probabilities is sampled"; the official code samples it
  once before the LayerOut phase); ``"efreeze"``/``"dfreeze"`` are the paper's linear presets
  (section 5.1/5.2: early resp. deep layers frozen more), built as ``linspace(0.9, 0.1, K)`` and its reverse for
  any K. The paper's exact vectors are :data:`PAPER_VGG16_EFREEZE` and :data:`PAPER_MNIST_EFREEZE`; pass them (or
  their reverse) as a list.
* Expected frozen share of the parameters, ``sum_k v_k n_k / sum_k n_k``
  (:meth:`LayerOut.expected_frozen_fraction`), against the paper's tables: ``vgg16_bn_cifar`` with the paper's
  dfreeze vector 70.4% (paper, Tables 2/4: 69.91% / 70.05%); ``resnet110_cifar`` with ``"random"`` 46.7-47.7%
  for seeds 0-2 (paper, Tables 3/5: 47.34-50.07%). The paper's efreeze figure (53.66%) is not reproducible
  from its stated vector on this architecture (29.6%): the fc layers, 56% of VGG-16's parameters, get the
  lowest freeze probabilities.
* "Never all layers" (section 5: "we do not consider a complete LayerOut of all layers"): a draw that freezes
  every unit, or more than ``max_freeze_fraction`` of the units' parameters, is rejected and redrawn (so the
  frozen set follows Eq. 1 conditioned on the constraint); after 100 rejections (e.g. every ``v_k = 1``) units
  are unfrozen in a random order until the constraint holds.
* The per-epoch draw comes from a private ``torch.Generator`` seeded by ``(seed, epoch)``: it is identical on
  every rank without communication, independent of the global RNG and of data order, and a resumed run draws
  the same sets. (The official code's index bug froze only a leading run of layers; this draws every unit.)
* A layer (``unit="layer"``) is every ``Conv*``/``Linear`` module with trainable parameters, as in the
  official code (K = 16 for VGG-16: 13 conv + 3 fc). ``unit="block"`` uses the model's blocks, the same
  modules as a spec's ``block`` sites (:func:`timm_drop.sites.find_blocks`, one shape pass on the model); a
  list of module names (globs or ``re:`` regexes, full match) makes each named module a unit.
  Parameters outside every unit (stem norms, embeddings, and BatchNorm in layer mode) always train.
* BatchNorm: the official code never freezes it (BN affine and running statistics keep training while "frozen"
  convs do not). That is the default, ``freeze_norm=False``. ``freeze_norm=True`` also freezes the norm that
  directly follows a frozen Conv/Linear (same parent module, matching channel count; in a pre-activation block
  that is the *next* BN, the one normalising this conv's output): its affine parameters and its running
  statistics (``momentum`` is set to 0 for the epoch, so train-mode forwards still use batch statistics).
  ``freeze_norm="affine"`` freezes only the affine parameters. In block mode a frozen block's norm affine
  parameters are always frozen (they are block parameters); ``freeze_norm=True`` additionally holds its norms'
  running statistics. Setting ``momentum`` is a Python attribute change that ``torch.compile`` guards on (one
  recompile per frozen set): with compilation prefer ``False`` or ``"affine"``.

How frozen parameters are kept still ("do not move at all", not by gradient, momentum nor weight decay):
:meth:`LayerOut.attach` installs an optimizer step pre-hook that sets ``p.grad = None`` for every frozen
parameter. Every ``torch.optim`` optimizer skips a parameter whose grad is None entirely: no momentum buffer
update, no weight-decay term, no Adam step count. This holds whatever ``zero_grad(set_to_none=...)`` the loop
uses. (Merely setting ``requires_grad=False`` is not enough: with ``zero_grad(set_to_none=False)`` a stale zeroed
grad stays, and SGD momentum/weight decay and AdamW keep moving the "frozen" weight; so :meth:`LayerOut.start_epoch`
also sets ``grad = None`` on the parameters it freezes.)

Skipping the backward work (``skip_backward``): with ``requires_grad_(False)`` on frozen weights autograd skips
their weight-gradient computation (and the input gradient of a layer whose predecessors are all frozen). That is
only safe in a single process without compilation:

* DDP registers its reducer over the parameters trainable at wrap time; toggling ``requires_grad`` afterwards
  raises "Expected to have finished reduction" unless ``find_unused_parameters=True``.
* ``torch.compile`` guards on ``requires_grad``; each distinct frozen set recompiles, and after the recompile
  limit the model silently runs eager.

``skip_backward="auto"`` (default) therefore toggles only when not distributed and not compiled; otherwise the
gradients of frozen parameters are still computed (and, under DDP, all-reduced) and then discarded by the step
pre-hook. ``True`` forces toggling (under DDP you must wrap with ``find_unused_parameters=True``), ``False``
never toggles. ``distributed``/``compiled`` are detected (a DDP or ``torch.compile`` wrapper passed to
:meth:`LayerOut.bind`, an in-place ``model.compile()``, or an initialised process group with world size > 1) and
can be passed explicitly; a model compiled *after* ``bind`` through a wrapper (Accelerate's ``dynamo_backend``)
cannot be seen, so pass ``compiled=True`` then.

Gradient clipping on the grad-nulling path sees the frozen parameters' gradients unless
:meth:`LayerOut.discard_frozen_grads` is called before clipping.
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from timm_drop.regularizers.card import MethodCard
from timm_drop.seeding import seeded_generator
from timm_drop.sites import find_blocks
from timm_drop.structure import feature_info, is_norm, match_pattern, unwrap
from timm_drop.suggest import nearest

__all__ = [
    "FREEZE_PRESETS",
    "PAPER_MNIST_EFREEZE",
    "PAPER_VGG16_EFREEZE",
    "LayerOut",
    "draw_frozen_mask",
    "find_blocks",
    "find_layers",
    "freeze_probabilities",
]

FREEZE_PRESETS: tuple[str, ...] = ("random", "efreeze", "dfreeze")
UNIT_KINDS: tuple[str, ...] = ("layer", "block")

#: Paper section 5.2: the VGG-16 (13 conv + 3 fc) LayerOut-efreeze vector; dfreeze is its reverse.
PAPER_VGG16_EFREEZE: tuple[float, ...] = (
    0.9, 0.8, 0.8, 0.7, 0.7, 0.6, 0.6, 0.5, 0.5, 0.4, 0.4, 0.3, 0.3, 0.2, 0.2, 0.1,
)  # fmt: skip
#: Paper section 5.1: the MNIST shallow network (5 conv + 2 fc) LayerOut-efreeze vector; dfreeze is its reverse.
PAPER_MNIST_EFREEZE: tuple[float, ...] = (0.9, 0.7, 0.6, 0.5, 0.4, 0.3, 0.1)

_LAYER_TYPES: tuple[type[nn.Module], ...] = (nn.modules.conv._ConvNd, nn.Linear)
_MAX_REDRAWS = 100


# --------------------------------------------------------------------------------------------------------------
# pure helpers
# --------------------------------------------------------------------------------------------------------------
def freeze_probabilities(spec: str | Sequence[float], num_units: int, seed: int = 0) -> torch.Tensor:
    """The freeze-probability vector ``v`` (paper section 4.1) as float64, one entry per unit.

    ``spec`` is ``"random"`` (``v_k ~ U(0, 1)``, drawn from ``seed``), ``"efreeze"`` (``linspace(0.9, 0.1, K)``:
    early units frozen more), ``"dfreeze"`` (the reverse), or an explicit sequence of K probabilities.
    """
    if num_units < 1:
        raise ValueError(f"LayerOut needs at least one unit to freeze, got num_units={num_units}")
    if isinstance(spec, str):
        if spec == "random":
            return torch.rand(num_units, generator=seeded_generator("cpu", seed, -1), dtype=torch.float64)
        if spec in ("efreeze", "dfreeze"):
            v = (
                torch.linspace(0.9, 0.1, num_units, dtype=torch.float64)
                if num_units > 1
                else torch.tensor([0.5])
            )
            return v.to(torch.float64) if spec == "efreeze" else v.flip(0).to(torch.float64)
        raise ValueError(
            f"freeze_probs must be one of {list(FREEZE_PRESETS)} or a list of floats, got {spec!r}"
        )
    values = [float(p) for p in spec]
    if len(values) != num_units:
        raise ValueError(
            f"freeze_probs has {len(values)} entries but the model has {num_units} LayerOut units; "
            "give one probability per unit (see LayerOut.unit_names)"
        )
    bad = [(i, p) for i, p in enumerate(values) if not 0.0 <= p <= 1.0]
    if bad:
        raise ValueError(f"freeze_probs entries must be in [0, 1]; bad (index, value): {bad[:5]}")
    return torch.tensor(values, dtype=torch.float64)


def draw_frozen_mask(
    probs: torch.Tensor,
    generator: torch.Generator,
    *,
    sizes: torch.Tensor | None = None,
    max_freeze_fraction: float | None = None,
) -> torch.Tensor:
    """Draw ``s ~ Bernoulli(probs)`` (paper Eq. 1) subject to: not every unit frozen, and the frozen share of
    ``sizes`` (parameter counts) at most ``max_freeze_fraction``. Returns a bool mask (True = frozen)."""
    n = probs.numel()
    weights = torch.ones(n, dtype=torch.float64) if sizes is None else sizes.to(torch.float64)
    total = float(weights.sum()) or 1.0

    def ok(mask: torch.Tensor) -> bool:
        if n > 0 and bool(mask.all()):
            return False
        return (
            max_freeze_fraction is None or float(weights[mask].sum()) / total <= max_freeze_fraction + 1e-12
        )

    mask = torch.zeros(n, dtype=torch.bool)
    for _ in range(_MAX_REDRAWS):
        mask = torch.rand(n, generator=generator, dtype=torch.float64) < probs
        if ok(mask):
            return mask
    for i in torch.randperm(n, generator=generator).tolist():
        if ok(mask):
            break
        mask[i] = False
    return mask


def _resolve(module: nn.Module, name: str) -> nn.Module:
    return module.get_submodule(name) if name else module


def find_layers(model: nn.Module, types: tuple[type[nn.Module], ...] = _LAYER_TYPES) -> list[str]:
    """Names of every ``Conv*``/``Linear`` module with trainable parameters, in registration order."""
    return [
        name
        for name, m in model.named_modules()
        if isinstance(m, types) and any(p.requires_grad for p in m.parameters(recurse=False))
    ]


def _pair_norms(model: nn.Module, layer_names: Sequence[str]) -> dict[str, str]:
    """Map each layer to the norm directly after it in the same parent module with matching channel count."""
    wanted = set(layer_names)
    pairs: dict[str, str] = {}
    pending: dict[str, tuple[str, int]] = {}  # parent -> (last unpaired layer, its out channels)
    for name, m in model.named_modules():
        parent = name.rsplit(".", 1)[0] if "." in name else ""
        if name in wanted:
            out = getattr(m, "out_channels", None) or getattr(m, "out_features", None)
            pending[parent] = (name, int(out) if out is not None else -1)
        elif is_norm(m) and parent in pending:
            layer, out = pending.pop(parent)
            chs = getattr(m, "num_features", None) or getattr(m, "num_channels", None)
            if chs is None and isinstance(m, nn.LayerNorm):
                chs = m.normalized_shape[-1] if m.normalized_shape else None
            if chs is not None and int(chs) == out:
                pairs[layer] = name
    return pairs


def _unwrap_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    seen = 0
    # Accelerate's AcceleratedOptimizer (and similar wrappers) keep the real optimizer in `.optimizer`; its
    # step() calls the inner optimizer's step(), whose hooks therefore run on every path (incl. GradScaler).
    while (
        hasattr(optimizer, "optimizer")
        and isinstance(optimizer.optimizer, torch.optim.Optimizer)
        and seen < 8
    ):
        optimizer = optimizer.optimizer
        seen += 1
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(
            f"LayerOut.attach expects a torch.optim.Optimizer (or a wrapper of one), got {type(optimizer)}"
        )
    return optimizer


def _world_size_gt_one() -> bool:
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


@dataclass
class _Unit:
    name: str
    params: list[tuple[str, nn.Parameter]]
    stat_norms: list[nn.Module] = field(default_factory=list)

    @property
    def numel(self) -> int:
        return sum(p.numel() for _, p in self.params)


# --------------------------------------------------------------------------------------------------------------
# the controller
# --------------------------------------------------------------------------------------------------------------
class LayerOut:
    """Per-epoch stochastic layer freezing (LayerOut), an optimizer-aware training-loop controller.

    Args:
        freeze_probs: ``"random"`` (U(0, 1) per unit, drawn once from ``seed``), ``"efreeze"`` (early units
            frozen more, linear 0.9 -> 0.1), ``"dfreeze"`` (deep units frozen more) or one probability per unit.
        unit: ``"layer"`` (every Conv/Linear), ``"block"`` (the model's blocks) or a list of module names
            (globs or ``re:`` regexes, full match), each one unit.
        warmup_epochs: epochs ``< warmup_epochs`` train everything (paper: 20).
        seed: seeds the ``"random"`` vector and, with the epoch, every draw; must be equal on all ranks.
        max_freeze_fraction: optional cap on the frozen share of the units' parameters per epoch.
        freeze_norm: ``False`` (paper), ``True`` (norm after a frozen layer: affine + running stats) or
            ``"affine"``.
        skip_backward: ``"auto"``, ``True`` or ``False``; see the module docstring.
        distributed, compiled: override the detection used by ``skip_backward="auto"``.
    """

    #: a training-loop controller, not an activation op (it has no place at a site)
    is_controller: bool = True
    #: the paper, as a regularizer's ``card`` (the docs' method cards read it)
    card: ClassVar[MethodCard] = MethodCard(
        title="LayerOut: Freezing Layers in Deep Neural Networks",
        authors="Goutam et al.",
        year=2020,
        venue="SN Computer Science",
        url="https://doi.org/10.1007/s42979-020-00312-x",
        summary="freezes the parameters of randomly chosen layers for a whole epoch",
        reported="ResNet-110 on CIFAR-10 (with warm-up, no random erasing): 93.57% -> 95.27% (+1.70) (Table 3)",
    )

    def __init__(
        self,
        freeze_probs: str | Sequence[float] = "random",
        unit: str | Sequence[str] = "layer",
        warmup_epochs: int = 0,
        seed: int = 0,
        max_freeze_fraction: float | None = None,
        freeze_norm: bool | str = False,
        skip_backward: bool | str = "auto",
        distributed: bool | None = None,
        compiled: bool | None = None,
    ) -> None:
        if isinstance(freeze_probs, str) and freeze_probs not in FREEZE_PRESETS:
            raise ValueError(
                f"freeze_probs must be one of {list(FREEZE_PRESETS)} or a list of floats, got {freeze_probs!r}"
            )
        if isinstance(unit, str) and unit not in UNIT_KINDS:
            raise ValueError(
                f"unit must be one of {list(UNIT_KINDS)} or a list of module names, got {unit!r}"
            )
        if isinstance(warmup_epochs, bool) or not isinstance(warmup_epochs, int) or warmup_epochs < 0:
            raise ValueError(f"warmup_epochs must be an integer >= 0, got {warmup_epochs!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an integer, got {seed!r}")
        if max_freeze_fraction is not None and not 0.0 <= float(max_freeze_fraction) <= 1.0:
            raise ValueError(f"max_freeze_fraction must be in [0, 1] or None, got {max_freeze_fraction!r}")
        if freeze_norm not in (False, True, "affine"):
            raise ValueError(f"freeze_norm must be False, True or 'affine', got {freeze_norm!r}")
        if skip_backward not in ("auto", True, False):
            raise ValueError(f"skip_backward must be 'auto', True or False, got {skip_backward!r}")
        self.freeze_probs = (
            freeze_probs if isinstance(freeze_probs, str) else [float(p) for p in freeze_probs]
        )
        self.unit = unit if isinstance(unit, str) else list(unit)
        self.warmup_epochs = warmup_epochs
        self.seed = seed
        self.max_freeze_fraction = None if max_freeze_fraction is None else float(max_freeze_fraction)
        self.freeze_norm = freeze_norm
        self.skip_backward = skip_backward
        self.distributed = distributed
        self.compiled = compiled

        self.epoch: int | None = None
        self.history: list[dict[str, Any]] = []
        self._units: list[_Unit] = []
        self._probs: torch.Tensor | None = None
        self._mask: torch.Tensor | None = None
        self._bound = False
        self._model_numel = 0
        self._frozen_params: list[nn.Parameter] = []
        self._toggled: list[nn.Parameter] = []
        self._norm_saved: list[tuple[nn.Module, Any, torch.Tensor | None]] = []
        self._hooks: list[Any] = []
        self._pending_state: dict[str, Any] | None = None
        self._model_ref: weakref.ReferenceType[nn.Module] | None = None
        self._warned_unattached = False

    # -- setup -------------------------------------------------------------------------------------------
    def bind(
        self, model: nn.Module, *, distributed: bool | None = None, compiled: bool | None = None
    ) -> LayerOut:
        """Enumerate the units of ``model`` (best: the unwrapped model, before ``accelerator.prepare``).

        A DDP or ``torch.compile`` wrapper is unwrapped (parameters are shared) and noted for
        ``skip_backward="auto"``. Returns ``self``.
        """
        if self.epoch is not None and self._mask is not None and bool(self._mask.any()):
            self.end_epoch()
        model, seen_ddp, seen_compile = unwrap(model)
        if distributed is not None:
            self.distributed = distributed
        elif seen_ddp:
            self.distributed = True
        if compiled is not None:
            self.compiled = compiled
        elif seen_compile:
            self.compiled = True

        if self.unit == "layer":
            unit_names = find_layers(model)
        elif self.unit == "block":
            # blocks hang off feature_info stages: without it there are none, and no shape pass is needed
            unit_names = find_blocks(model) if feature_info(model) else []
            if not unit_names:
                raise ValueError(
                    f"LayerOut(unit='block') found no blocks in {type(model).__name__}: it has no feature_info "
                    "stages holding blocks; use unit='layer' or a list of module names"
                )
        else:
            unit_names = self._match_names(model, self.unit)
        if not unit_names:
            raise ValueError(f"LayerOut found no trainable Conv/Linear layers in {type(model).__name__}")

        norm_pairs = _pair_norms(model, unit_names) if (self.unit == "layer" and self.freeze_norm) else {}
        seen: set[int] = set()
        units: list[_Unit] = []
        for name in unit_names:
            mod = _resolve(model, name)
            recurse = self.unit != "layer"
            params = [(f"{name}.{pn}" if name else pn, p) for pn, p in mod.named_parameters(recurse=recurse)]
            stat_norms: list[nn.Module] = []
            if name in norm_pairs:
                norm_name = norm_pairs[name]
                norm = _resolve(model, norm_name)
                params += [(f"{norm_name}.{pn}", p) for pn, p in norm.named_parameters(recurse=False)]
                if self.freeze_norm is True:
                    stat_norms.append(norm)
            elif self.unit != "layer" and self.freeze_norm is True:
                stat_norms = [m for m in mod.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
            # tied parameters belong to the first unit that owns them; untrainable ones are never touched
            kept = [(pn, p) for pn, p in params if p.requires_grad and id(p) not in seen]
            seen.update(id(p) for _, p in kept)
            if kept:
                units.append(_Unit(name, kept, stat_norms))
        if not units:
            raise ValueError(f"LayerOut units of {type(model).__name__} have no trainable parameters")
        self._units = units
        self._model_numel = sum(p.numel() for p in model.parameters() if p.requires_grad)
        # weak: LayerOut must not keep the model alive nor be copied with it (timm's EMA deep-copies models)
        self._model_ref = weakref.ref(model)
        self._probs = freeze_probabilities(self.freeze_probs, len(units), self.seed)
        self._mask = torch.zeros(len(units), dtype=torch.bool)
        self._bound = True
        if self._pending_state is not None:
            state, self._pending_state = self._pending_state, None
            self.load_state_dict(state)
        return self

    @staticmethod
    def _match_names(model: nn.Module, patterns: Sequence[str]) -> list[str]:
        all_names = [n for n, _ in model.named_modules() if n]
        out: list[str] = []
        for pat in patterns:
            hits = [n for n in all_names if match_pattern(pat, n)]
            if not hits:
                near = nearest(pat, all_names)
                hint = f"; nearest: {near}" if near else ""
                raise ValueError(f"LayerOut unit {pat!r} matches no module of {type(model).__name__}{hint}")
            out += [h for h in hits if h not in out]
        return out

    def attach(self, optimizer: Any) -> LayerOut:
        """Install a step pre-hook on ``optimizer`` (or on the optimizer inside an AcceleratedOptimizer) that
        drops the gradients of frozen parameters, so the step leaves them exactly unchanged."""
        opt = _unwrap_optimizer(optimizer)
        self._hooks.append(opt.register_step_pre_hook(self._step_pre_hook))
        return self

    def detach(self) -> None:
        """Remove the optimizer hooks and unfreeze."""
        self.end_epoch()
        for h in self._hooks:
            h.remove()
        self._hooks.clear()

    def _step_pre_hook(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self.discard_frozen_grads()

    def discard_frozen_grads(self) -> None:
        """Set ``grad = None`` on every frozen parameter (call before gradient clipping to exclude them)."""
        for p in self._frozen_params:
            p.grad = None

    # -- per epoch ---------------------------------------------------------------------------------------
    @property
    def toggles_requires_grad(self) -> bool:
        """Whether frozen parameters get ``requires_grad=False`` (skipping their weight-gradient compute)."""
        if self.skip_backward != "auto":
            return bool(self.skip_backward)
        distributed = _world_size_gt_one() if self.distributed is None else self.distributed
        model = self._model_ref() if self._model_ref is not None else None
        # nn.Module.compile() compiles in place; torch.compile(model) wrappers are seen by bind()
        compiled = self.compiled or getattr(model, "_compiled_call_impl", None) is not None
        return not distributed and not compiled

    def draw(self, epoch: int) -> torch.Tensor:
        """The frozen mask for ``epoch`` (True = frozen) without applying it: a pure function of
        (seed, epoch, freeze-probability vector)."""
        self._require_bound("draw")
        assert self._probs is not None
        if epoch < self.warmup_epochs:
            return torch.zeros(len(self._units), dtype=torch.bool)
        sizes = torch.tensor([u.numel for u in self._units], dtype=torch.float64)
        return draw_frozen_mask(
            self._probs,
            seeded_generator("cpu", self.seed, epoch),
            sizes=sizes,
            max_freeze_fraction=self.max_freeze_fraction,
        )

    def start_epoch(self, epoch: int) -> list[str]:
        """Draw and apply this epoch's frozen set; returns the frozen unit names."""
        self._require_bound("start_epoch")
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"epoch must be an integer >= 0, got {epoch!r}")
        self.end_epoch()
        self._apply(self.draw(epoch))
        self.epoch = epoch
        record = {
            "epoch": epoch,
            "n_frozen": int(self._mask.sum()),
            "n_units": len(self._units),
            "frozen_fraction": self.frozen_fraction,
            "frozen_fraction_of_model": self.frozen_fraction_of_model,
        }
        self.history = [h for h in self.history if h["epoch"] != epoch] + [record]
        # with requires_grad toggled the grads were nulled above and backward leaves them None; only the
        # grad-nulling path depends on the step hook
        unsafe = record["n_frozen"] and not self._hooks and not self.toggles_requires_grad
        if unsafe and not self._warned_unattached:
            self._warned_unattached = True
            warnings.warn(
                "LayerOut.start_epoch froze parameters but no optimizer is attached: momentum and weight decay "
                "can still move them; call LayerOut.attach(optimizer)",
                stacklevel=2,
            )
        return self.frozen_names

    def end_epoch(self) -> None:
        """Unfreeze everything frozen by :meth:`start_epoch` (restores ``requires_grad`` and norm momentum)."""
        for p in self._toggled:
            p.requires_grad_(True)
        self._toggled = []
        for norm, momentum, tracked in self._norm_saved:
            norm.momentum = momentum
            if tracked is not None and getattr(norm, "num_batches_tracked", None) is not None:
                norm.num_batches_tracked.copy_(tracked)
        self._norm_saved = []
        self._frozen_params = []
        if self._mask is not None:
            self._mask = torch.zeros_like(self._mask)

    def _apply(self, mask: torch.Tensor) -> None:
        self._mask = mask.clone()
        toggle = self.toggles_requires_grad
        frozen: list[nn.Parameter] = []
        for unit, is_frozen in zip(self._units, mask.tolist()):
            if not is_frozen:
                continue
            for _, p in unit.params:
                frozen.append(p)
                p.grad = None
                if toggle and p.requires_grad:
                    p.requires_grad_(False)
                    self._toggled.append(p)
            for norm in unit.stat_norms:
                tracked = getattr(norm, "num_batches_tracked", None)
                self._norm_saved.append((norm, norm.momentum, None if tracked is None else tracked.clone()))
                # momentum 0 keeps running stats exactly: r <- 1 * r + 0 * batch_stat
                norm.momentum = 0.0
        self._frozen_params = frozen

    # -- reporting -----------------------------------------------------------------------------------------
    @property
    def unit_names(self) -> list[str]:
        return [u.name for u in self._units]

    @property
    def probs(self) -> list[float]:
        """The freeze-probability vector ``v`` (one entry per unit)."""
        return [] if self._probs is None else self._probs.tolist()

    @property
    def frozen_names(self) -> list[str]:
        if self._mask is None:
            return []
        return [u.name for u, f in zip(self._units, self._mask.tolist()) if f]

    @property
    def frozen_parameters(self) -> list[nn.Parameter]:
        return list(self._frozen_params)

    @property
    def frozen_fraction(self) -> float:
        """Fraction of the bound units' parameters frozen this epoch."""
        total = sum(u.numel for u in self._units)
        return sum(p.numel() for p in self._frozen_params) / total if total else 0.0

    @property
    def frozen_fraction_of_model(self) -> float:
        """Fraction of all the model's trainable parameters frozen this epoch (the paper's tables)."""
        return sum(p.numel() for p in self._frozen_params) / self._model_numel if self._model_numel else 0.0

    def mean_frozen_fraction(self, include_warmup: bool = False, of_model: bool = False) -> float:
        """Average per-epoch frozen fraction over :attr:`history` (the paper's "parameters frozen (%)")."""
        key = "frozen_fraction_of_model" if of_model else "frozen_fraction"
        rows = [h[key] for h in self.history if include_warmup or h["epoch"] >= self.warmup_epochs]
        return sum(rows) / len(rows) if rows else 0.0

    def expected_frozen_fraction(self) -> float:
        """``sum_k v_k n_k / sum_k n_k`` before the never-all / cap constraints (a design-time estimate)."""
        self._require_bound("expected_frozen_fraction")
        sizes = torch.tensor([u.numel for u in self._units], dtype=torch.float64)
        return float((self._probs * sizes).sum() / sizes.sum())

    # -- checkpointing ---------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "version": 1,
            "seed": self.seed,
            "warmup_epochs": self.warmup_epochs,
            "epoch": self.epoch,
            "unit_names": self.unit_names,
            "probs": self.probs,
            "frozen": self.frozen_names,
            "history": [dict(h) for h in self.history],
            # the frozen norms' batch counters at the epoch's start, which end_epoch() restores: a mid-epoch
            # state's model already counted some of the epoch's batches
            "norm_counters": [None if t is None else int(t) for _, _, t in self._norm_saved],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`; if bound, re-applies the saved frozen set (resume mid-epoch)."""
        missing = [k for k in ("seed", "epoch", "unit_names", "probs", "frozen", "history") if k not in state]
        if missing:
            raise KeyError(f"LayerOut.load_state_dict: state is missing {missing}")
        if not self._bound:
            self._pending_state = dict(state)
            return
        if list(state["unit_names"]) != self.unit_names:
            extra = sorted(set(state["unit_names"]) ^ set(self.unit_names))[:5]
            raise ValueError(
                "LayerOut.load_state_dict: the checkpoint's units differ from the bound model's "
                f"({len(state['unit_names'])} vs {len(self.unit_names)} units; e.g. {extra})"
            )
        self.end_epoch()
        self.seed = int(state["seed"])
        self.warmup_epochs = int(state.get("warmup_epochs", self.warmup_epochs))
        self._probs = torch.tensor([float(p) for p in state["probs"]], dtype=torch.float64)
        self.history = [dict(h) for h in state["history"]]
        self.epoch = state["epoch"]
        frozen = set(state["frozen"])
        self._apply(torch.tensor([u.name in frozen for u in self._units], dtype=torch.bool))
        counters = state.get("norm_counters")
        if counters is not None and len(counters) == len(self._norm_saved):
            self._norm_saved = [
                (norm, momentum, tracked if c is None or tracked is None else torch.full_like(tracked, c))
                for (norm, momentum, tracked), c in zip(self._norm_saved, counters)
            ]

    # -- misc ------------------------------------------------------------------------------------------------
    def _require_bound(self, what: str) -> None:
        if not self._bound:
            raise RuntimeError(f"LayerOut.{what} needs a model: call LayerOut.bind(model) first")

    def __repr__(self) -> str:
        probs = self.freeze_probs if isinstance(self.freeze_probs, str) else f"list[{len(self.freeze_probs)}]"
        unit = self.unit if isinstance(self.unit, str) else f"list[{len(self.unit)}]"
        bound = f", units={len(self._units)}" if self._bound else ""
        return (
            f"LayerOut(freeze_probs={probs}, unit={unit}, warmup_epochs={self.warmup_epochs}, seed={self.seed}, "
            f"max_freeze_fraction={self.max_freeze_fraction}, freeze_norm={self.freeze_norm}, "
            f"skip_backward={self.skip_backward}{bound})"
        )
