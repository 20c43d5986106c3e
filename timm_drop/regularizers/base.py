"""The behaviour every timm_drop regularizer shares.

A regularizer is a parameter-free ``nn.Module`` that

* is the identity in ``eval()``, bit for bit, and in training when its configured strength is 0;
* keeps its schedule strength in a non-persistent 0-dim float32 buffer named ``strength`` (a multiplier in
  [0, 1] on the configured drop probability or scale range), so that moving a schedule neither adds
  ``state_dict`` keys nor recompiles a ``torch.compile``d model, and DDP's buffer broadcast keeps ranks in step;
* knows the layout of the tensor it receives (``"NCHW"``, ``"NHWC"``, ``"NLC"`` tokens or ``"NC"`` pooled
  features) and adapts to it by viewing the input as channels-first ``(N, C, *spatial)`` (tokens become
  ``(N, C, L, 1)``, pooled features ``(N, C, 1)``); a layout it cannot serve is refused by name;
* on ViT tokens whose sequence is ``num_prefix_tokens`` prefix tokens plus an ``H x W`` patch grid
  (:meth:`Regularizer.set_token_grid`, set by the rewriter from the model), a method that needs a 2-D map
  (``grid_layouts = ("NLC",)``: DropBlock, CorrDrop) acts on the grid as a channels-last map and returns the prefix
  tokens untouched; without a grid such a method refuses ``NLC``.

Subclasses implement :meth:`Regularizer.regularize` on a channels-first view ``(N, C, *spatial)`` and
declare the layouts they accept in ``layouts``. What the rest of the library knows about a method it reads from the
class, so a new method is one file: ``strength_params`` (what ``depth_scaling``, the summary's strength column and
``viz --strength`` scale), ``compare_defaults`` (``viz --compare``), ``figure`` (:class:`FigureTraits`), ``card``
(:class:`MethodCard`: ``timm-drop list`` and the docs) and :meth:`Regularizer.score_map` (the figure's score panel).
"""

# No ``from __future__ import annotations`` here: TorchScript reads this module's annotations (``forward``, the
# ``strength`` buffer) as real types, and a string ``'torch.Tensor'`` is an unknown type to it.
import inspect
import math
import warnings
from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import fx

from timm_drop import fx as _fx
from timm_drop.errors import TimmDropError
from timm_drop.regularizers.card import MethodCard
from timm_drop.regularizers.figure import FigureTraits
from timm_drop.schedules import ScheduledModule, on_train_forward

#: Every layout a site can have: channels-first maps, channels-last maps, token sequences ``(B, L, C)`` and
#: pooled features ``(B, C)`` (seen as one spatial position per channel).
LAYOUTS: tuple[str, ...] = ("NCHW", "NHWC", "NLC", "NC")
#: Strength parameter names assumed for a subclass that declares no ``strength_params`` (custom regularizers
#: written before the class declared it): those of its ``__init__`` parameters, with a DeprecationWarning.
_UNDECLARED_STRENGTH_NAMES: tuple[str, ...] = ("drop_prob", "q")


class ParamError(TimmDropError, ValueError):
    """A hyper-parameter with a bad value. ``param`` names it, so a spec error lands on that field whatever
    the message says."""

    def __init__(self, message: str, param: str = "") -> None:
        super().__init__(message)
        self.param = param

    def __reduce__(self):  # keep ``param`` when pickled (coverage worker processes)
        return type(self), (str(self), self.param)


class ParamTypeError(ParamError, TypeError):
    """A hyper-parameter of the wrong type (still a ``TypeError`` for callers that catch one)."""


def check_probability(name: str, value: float, *, allow_one: bool = False) -> float:
    """Validate a probability-like hyper-parameter and return it as a float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ParamTypeError(f"{name} must be a number, got {type(value).__name__} ({value!r})", name)
    value = float(value)
    upper_ok = value <= 1.0 if allow_one else value < 1.0
    if not (value >= 0.0 and upper_ok):
        bound = "[0, 1]" if allow_one else "[0, 1)"
        raise ParamError(f"{name} must be in {bound}, got {value}", name)
    return value


def check_strength(
    name: str, value: float | torch.Tensor, *, allow_one: bool = False
) -> float | torch.Tensor:
    """Validate a strength given as a number; a 0-dim tensor (a scheduled value the module built from an already
    validated number) passes through untouched, so no device sync or recompile happens in forward."""
    if isinstance(value, torch.Tensor):
        return value
    return check_probability(name, value, allow_one=allow_one)


def is_static_zero(value: float | torch.Tensor) -> bool:
    """True for a plain-number strength of 0: the functional forms then return their input unchanged."""
    return not isinstance(value, torch.Tensor) and value == 0.0


def check_positive_int(name: str, value: int) -> int:
    """Validate an integer hyper-parameter that must be >= 1."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ParamTypeError(f"{name} must be an integer, got {type(value).__name__} ({value!r})", name)
    if value < 1:
        raise ParamError(f"{name} must be >= 1, got {value}", name)
    return value


def check_float_input(name: str, x: torch.Tensor) -> None:
    """Refuse a non-floating-point activation: dropping or rescaling integers (or bools) has no meaning, and the
    float32 rescale would either fail deep inside a kernel or be truncated silently."""
    if not x.is_floating_point():
        raise TypeError(
            f"{name}: expects a floating-point activation, got a {str(x.dtype).removeprefix('torch.')} tensor of "
            f"shape {tuple(x.shape)}; regularizers act on float features (cast the input, or exclude this site)"
        )


def passes_through(name: str, x: torch.Tensor, training: bool, strength: float | torch.Tensor) -> bool:
    """True when a functional form must return ``x`` unchanged: not training, a static strength of 0, or a tensor
    with no elements (an empty batch or zero channels). A non-float ``x`` is refused in training."""
    if not training:
        return True
    check_float_input(name, x)
    return is_static_zero(strength) or x.numel() == 0


_SAME_SIZE_INT = {2: torch.int16, 4: torch.int32, 8: torch.int64}
# torch.compiler.is_compiling is torch >= 2.3; the project supports torch >= 2.1.
_is_compiling = getattr(getattr(torch, "compiler", None), "is_compiling", None) or torch._dynamo.is_compiling


def recomputing() -> bool:
    """True while the autograd engine runs a forward: the recomputation of a checkpointed segment
    (``torch.utils.checkpoint``, reentrant or not) in the backward pass. Its masks come from the random state the
    checkpoint restored, so they equal the forward pass's; nothing that counts forwards may count it again.
    Eager only (call it after checking ``_is_compiling()``)."""
    return torch._C._current_graph_task_id() != -1


def ones(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str = "cpu") -> torch.Tensor:
    """``torch.ones``; on CPU written as the bit pattern of 1 in a same-size integer type, because CPU fills
    bf16/fp16 with a scalar loop but integers with vector stores (~3x faster; masks start as such a fill)."""
    int_dtype = _SAME_SIZE_INT.get(torch.finfo(dtype).bits // 8) if dtype.is_floating_point else None
    if torch.device(device).type != "cpu" or int_dtype is None or _is_compiling():
        return torch.ones(shape, dtype=dtype, device=device)
    bits = _ONE_BITS.get(dtype)
    if bits is None:
        bits = _ONE_BITS[dtype] = torch.ones((), dtype=dtype).view(int_dtype).item()
    return torch.empty(shape, dtype=int_dtype).fill_(bits).view(dtype)


_ONE_BITS: dict[torch.dtype, int] = {}


#: Above this probability one uniform per position is cheaper than drawing the gaps between successes.
SPARSE_MAX_PROB = 0.25


def bernoulli_positions(positions: int, prob: float) -> torch.Tensor:
    """Sorted indices in ``[0, positions)`` of independent Bernoulli(prob) successes, on CPU, drawn as the
    geometric gaps between successes.

    Same distribution as one Bernoulli draw per position, but the work follows the ~prob * positions successes
    instead of every position (CPU random numbers cost ~5-10 ns each). A gap is ``floor(log(u) / log(1 - prob))
    + 1`` with ``u`` uniform in (0, 1], in float64 (the inverse-CDF form ``geometric_`` uses, at half its cost
    here); the running sum is float64 too, exact far beyond any tensor size.
    """
    if prob <= 0.0 or positions <= 0:
        return torch.empty(0, dtype=torch.long)
    if prob >= 1.0:
        return torch.arange(positions)
    scale = 1.0 / math.log1p(-prob)
    mean = positions * prob
    chunk = int(mean + 6.0 * math.sqrt(mean) + 16.0)

    def gaps() -> torch.Tensor:
        # log(1 - u) with u uniform in [0, 1): the log of a uniform in (0, 1], always finite.
        return torch.rand(chunk, dtype=torch.float64).neg_().log1p_().mul_(scale).floor_().add_(1.0)

    ends = gaps().cumsum_(0)
    while ends[-1].item() <= positions:  # rarely: the draw may not have passed the last position yet
        ends = torch.cat([ends, gaps().cumsum_(0).add_(ends[-1])])
    # ends is increasing: the successes inside the range are a prefix of it.
    count = int(torch.searchsorted(ends, float(positions), right=True))
    return ends[:count].sub_(1.0).long()


def check_token_grid(grid: Any, num_prefix_tokens: Any) -> tuple[tuple[int, int] | None, int]:
    """Validate a token grid ``(H, W)`` (or None) and a prefix-token count >= 0."""
    if grid is not None:
        if (
            not isinstance(grid, (tuple, list))
            or len(grid) != 2
            or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in grid)
        ):
            raise ValueError(f"token_grid must be None or two positive integers (H, W), got {grid!r}")
        grid = (int(grid[0]), int(grid[1]))
    if isinstance(num_prefix_tokens, bool) or not isinstance(num_prefix_tokens, int) or num_prefix_tokens < 0:
        raise ValueError(f"num_prefix_tokens must be an integer >= 0, got {num_prefix_tokens!r}")
    return grid, num_prefix_tokens


def restride_like(out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``out`` viewed with ``x``'s strides when both lay their elements out in the same memory order.

    Strides of size-1 dimensions are arbitrary: a LayerNorm2d output of shape (N, C, 1, 1) may carry
    (C, 1, C, C) while an elementwise result gets (C, 1, 1, 1). Kernels downstream pick code paths from strides
    and can then round differently (seen: 4.7e-10 in EfficientViM's mixer), so a regularizer at strength 0
    would not be the identity bit for bit. Re-viewing is free; a different real layout is left alone.
    """
    if out.shape != x.shape or out.stride() == x.stride():
        return out
    if any(so != sx for so, sx, n in zip(out.stride(), x.stride(), x.shape) if n > 1):
        return out
    return out.as_strided(x.shape, x.stride(), out.storage_offset())


def declares(cls: type, attribute: str) -> bool:
    """True when ``cls`` or a base below :class:`Regularizer` sets ``attribute`` itself (not inherited from it)."""
    return any(attribute in vars(base) for base in cls.__mro__ if base is not Regularizer and issubclass(base, Regularizer))


class Regularizer(ScheduledModule):
    """Base class: eval identity, schedule strength buffer, layout adaptation, and what a method declares.

    Attributes:
        strength: non-persistent 0-dim float32 buffer in [0, 1]; the schedule's multiplier on the configured
            strength. Starts at 1 so a regularizer without any ``set_progress`` call runs at full strength.
        schedule: optional :class:`timm_drop.schedules.Schedule`; ``set_progress`` evaluates it.
        layout: layout of the tensors this instance receives; set by the rewriter from its shape pass.
    """

    #: layouts this regularizer accepts; the rewriter refuses a site whose layout is not listed.
    layouts: ClassVar[tuple[str, ...]] = LAYOUTS
    #: layouts accepted only once :meth:`set_token_grid` gave a patch grid: a method that needs a 2-D map acts on
    #: ``NLC`` tokens only where they are ``num_prefix_tokens`` prefix tokens followed by an ``H x W`` grid.
    grid_layouts: ClassVar[tuple[str, ...]] = ()
    #: registry name (filled by :func:`timm_drop.regularizers.registry.register_regularizer`).
    registry_name: ClassVar[str] = ""
    #: the parameters carrying the method's strength, as its ``__init__`` and attributes name them: scaled by a
    #: rule's ``depth_scaling``, shown in the summary's strength column, replaced by ``viz --strength``. ``()``
    #: declares a method with no strength to scale.
    strength_params: ClassVar[tuple[str, ...]] = ()
    #: parameter values ``viz --compare`` gives this method where the spec gives none (see ``figure.py``).
    compare_defaults: ClassVar[dict[str, Any]] = {}
    #: how ``viz`` draws the method's masks.
    figure: ClassVar[FigureTraits] = FigureTraits()
    #: the paper the method comes from (``timm-drop list``, the docs); None for a method without one.
    card: ClassVar[MethodCard | None] = None

    strength: torch.Tensor
    #: properties TorchScript must not compile (it compiles every property of a scripted module)
    __jit_unused_properties__: ClassVar[list[str]] = ["display_name"]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        _fx.register_leaf(cls)  # an FX leaf for timm's tracers (timm_drop.fx)
        if not declares(cls, "strength_params"):
            accepted = inspect.signature(cls.__init__).parameters
            cls.strength_params = tuple(p for p in _UNDECLARED_STRENGTH_NAMES if p in accepted)
            if cls.strength_params:
                warnings.warn(
                    f"{cls.__qualname__} declares no strength_params; taking {cls.strength_params} from its "
                    f"parameter names. Declare them on the class: strength_params = {cls.strength_params!r}",
                    DeprecationWarning,
                    stacklevel=2,
                )

    @classmethod
    def score_map(cls, x: torch.Tensor, params: Mapping[str, Any]) -> tuple[torch.Tensor, str] | None:
        """The method's own score of its input, for the figure's score panel; None when it has none.

        Args:
            x: the input as the method's op sees it: channels-first ``(N, C, *spatial)`` (tokens as ``(N, C, L, 1)``,
                or a token grid as the ``(N, C, H, W)`` map for a method with ``grid_layouts``).
            params: the parameters the method was built with (a default fills a missing one: :meth:`param`).

        Returns:
            ``(scores, title)``: ``scores`` with ``x``'s spatial size, one channel or ``x``'s channels.
        """
        return None

    @classmethod
    def param(cls, params: Mapping[str, Any], name: str) -> Any:
        """``params[name]``, else the default of ``__init__``'s parameter ``name``."""
        if name in params:
            return params[name]
        default = inspect.signature(cls.__init__).parameters[name].default
        if default is inspect.Parameter.empty:
            raise KeyError(f"{cls.__name__}: parameter {name!r} is required and was not given")
        return default

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("strength", torch.ones((), dtype=torch.float32), persistent=False)
        self.schedule: Any = None
        self.layout: str = "NCHW"
        # Schedule plumbing (timm_drop.schedules): a forward counter for self-counting schedules, whether any
        # set_progress call reached this module (else a scheduled one warns once), and the rule for messages.
        self.register_buffer("schedule_count", torch.zeros((), dtype=torch.int64), persistent=False)
        self.progress_set = False
        self.rule_label: str | None = None
        # training forwards this module ran (eager, recomputations excluded): the unused-rule check reads it
        self.train_calls = 0
        # Plain attributes, not buffers: a grid is a property of the site, never of a checkpoint.
        self.token_grid: tuple[int, int] | None = None
        self.num_prefix_tokens: int = 0

    @property
    def display_name(self) -> str:
        return self.registry_name or type(self).__name__

    # -- configuration -------------------------------------------------------------------------------
    def set_layout(self, layout: str) -> None:
        if layout in self.grid_layouts and self.token_grid is None:
            raise ValueError(
                f"{type(self).__name__} accepts layouts {list(self.layouts)}, not {layout!r} without a token grid: "
                f"it needs a 2-D map, so {layout} tokens must be a patch grid (call set_token_grid first)"
            )
        if layout not in self.layouts and layout not in self.grid_layouts:
            raise ValueError(f"{type(self).__name__} accepts layouts {list(self.layouts)}, not {layout!r}")
        self.layout = layout

    def set_token_grid(self, grid: tuple[int, int] | None, num_prefix_tokens: int = 0) -> None:
        """Tell the regularizer that its ``NLC`` input is ``num_prefix_tokens`` prefix tokens (class, register,
        distillation) followed by an ``H x W`` patch grid, row-major. Methods listing ``NLC`` in
        ``grid_layouts`` then act on the grid as a map and leave the prefix tokens untouched; ``None`` clears it.
        Call before ``set_layout("NLC")``."""
        self.token_grid, self.num_prefix_tokens = check_token_grid(grid, num_prefix_tokens)

    def is_noop(self) -> bool:
        """True when the configured (static) strength is zero, so training forward is the identity too."""
        return False

    def set_progress(self, progress: float) -> None:
        """Move the schedule to ``progress`` in [0, 1]: writes ``strength`` in place (no recompile)."""
        value = 1.0 if self.schedule is None else float(self.schedule(progress))
        self.strength.fill_(value)
        self.progress_set = True
        self.schedule_progress = float(progress)

    def init_non_persistent_buffers(self) -> None:
        """Write ``strength`` and ``schedule_count`` from the schedule's position (full strength and count 0 until
        a ``set_progress``). Needed after a meta-device build: ``to_empty`` and Hugging Face's ``from_pretrained``
        leave non-persistent buffers uninitialised (transformers calls this method by name, as timm's layers
        name theirs), and the values are in no checkpoint."""
        progress = self.__dict__.get("schedule_progress") if self.progress_set else None
        value = 1.0 if progress is None or self.schedule is None else float(self.schedule(progress))
        steps = getattr(self.schedule, "steps", None)
        with torch.no_grad():
            self.strength.fill_(value)
            self.schedule_count.fill_(0 if progress is None or steps is None else round(progress * steps))
            if "drop_fraction" in self._buffers:
                self.drop_fraction.fill_(float("nan"))

    def _apply(self, fn: Any, recurse: bool = True) -> Any:
        was_meta = self.strength.is_meta
        out = super()._apply(fn, recurse)
        if was_meta and not self.strength.is_meta:  # materialised (to_empty): the values are undefined
            self.init_non_persistent_buffers()
        return out

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        # modules pickled before the schedule step moved into forward carried it as a forward pre-hook
        for key, hook in list(self._forward_pre_hooks.items()):
            if hook is on_train_forward:
                del self._forward_pre_hooks[key]
        self.__dict__.setdefault("train_calls", 0)

    def effective(self, value: float) -> torch.Tensor:
        """``value * strength`` as a float32 0-dim tensor (robust to ``model.half()`` casting buffers)."""
        return self.strength.float() * value

    # -- forward -------------------------------------------------------------------------------------
    def regularize(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the method to a channels-first tensor ``(N, C, *spatial)`` in training mode."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():
            # TorchScript compiles only this branch (is_scripting() is a compile-time constant there): identity
            # in eval; the methods are Python, so a scripted regularizer cannot train, and says so.
            if self.training:
                raise RuntimeError(
                    "timm_drop: a regularizer cannot train under TorchScript (its ops are Python); train the eager "
                    "or torch.compile'd model, or call timm_drop.strip_regularizers(model) before scripting"
                )
            return x
        else:
            return self._forward_eager(x)

    def _forward_eager(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(x, fx.Proxy):  # traced through by an FX tracer: one call_module node (timm_drop.fx)
            return _fx.leaf_node(self, x)
        if not self.training:
            return x
        if _is_compiling():
            on_train_forward(self)  # a self-counting schedule's step stays in the graph
        elif not recomputing():
            self.train_calls += 1
            on_train_forward(self)
        return self.train_forward(x)

    def train_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The training-mode forward: the layout adaptation around :meth:`regularize` (the schedule was stepped)."""
        check_float_input(self.display_name, x)
        if self.is_noop() or x.numel() == 0:
            return x
        if self.layout == "NLC" and x.dim() == 3 and self.layout in self.grid_layouts:
            out = self._regularize_grid(x)
        elif self.layout == "NHWC" and x.dim() == 4:
            out = self.regularize(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        elif self.layout == "NLC" and x.dim() == 3:
            out = self.regularize(x.transpose(1, 2).unsqueeze(-1)).squeeze(-1).transpose(1, 2)
        elif self.layout == "NC" and x.dim() == 2:
            out = self.regularize(x.unsqueeze(-1)).squeeze(-1)
        else:
            out = self.regularize(x)
        return restride_like(out, x)

    def _regularize_grid(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, P + H*W, C)`` tokens: the grid part as a channels-last ``(B, C, H, W)`` view (no copy of a
        contiguous input), the prefix tokens returned as they are."""
        if self.token_grid is None:
            raise ValueError(f"{self.display_name}: NLC input without a token grid (call set_token_grid)")
        (h, w), p = self.token_grid, self.num_prefix_tokens
        b, length, c = x.shape
        if length != p + h * w:
            raise ValueError(
                f"{self.display_name}: token grid {h}x{w} with {p} prefix token(s) expects L = {p + h * w} tokens, "
                f"got L = {length} (input {tuple(x.shape)}); a dynamic image size changes the grid, so the model "
                f"must give the new one through set_token_grid"
            )
        grid = x[:, p:].unflatten(1, (h, w)).permute(0, 3, 1, 2)
        out = self.regularize(grid).permute(0, 2, 3, 1).reshape(b, h * w, c)
        return out if p == 0 else torch.cat([x[:, :p], out], dim=1)

    def _settings(self) -> str:
        return ""

    def extra_repr(self) -> str:
        parts = [self._settings()]
        if self.layout != "NCHW":
            parts.append(f"layout={self.layout}")
        if self.token_grid is not None:
            parts.append(f"token_grid={self.token_grid}, num_prefix_tokens={self.num_prefix_tokens}")
        if self.schedule is not None:
            parts.append(f"schedule={self.schedule}")
        return ", ".join(p for p in parts if p)
