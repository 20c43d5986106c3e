"""Coverage check: does the rewriter keep its guarantees on a given timm model?

:func:`check_model` builds one timm model (``pretrained=False``, the smallest input it accepts), applies a spec
that touches every site kind (:data:`COVERAGE_SPEC`) through the public API (``timm_drop.plan``,
``apply_regularizer``, ``strip_regularizers``), and checks the guarantees the rewriter promises:

1. ``plan`` is a dry run (the module tree and hooks are unchanged after it) and finds at least one site;
2. ``apply_regularizer`` returns the same object with the same class;
3. ``state_dict`` keys are identical and checkpoints load strictly in both directions;
4. the eval output is bit-identical to a deep copy of the model taken before ``apply``;
5. a training forward + backward is finite, and every inserted regularizer actually runs;
6. with every regularizer's ``strength`` at 0 the training output equals the original's, bit for bit, and at
   full strength it differs (the regularizers do something);
7. ``copy.deepcopy`` (timm's EMA) gives a copy that runs its *own* regularizers, never the original's;
8. gradient checkpointing (models with ``set_grad_checkpointing``): with it on, every regularizer runs in the
   forward pass, the output and every gradient equal those without it at one seed (the backward pass's
   recomputation draws the same masks), and a recomputation counts no extra training forward;
9. FX re-trace: torchvision's ``NodePathTracer`` with timm's leaf modules and functions (the tracer of
   ``create_feature_extractor``, timm's ``FeatureGraphNet`` and its ``forward_fx`` test) traces the regularized
   model wherever it traces the original, the graph's eval output is the model's bit for bit, and ``torch.fx``
   still traces afterwards;
10. ``strip_regularizers`` restores the class, keys, hooks and eval output.

Checks 8 and 9 record ``"n/a: <why>"`` in :attr:`CoverageResult.passes` where they do not apply (no
``set_grad_checkpointing``; a model timm's tracer gives no working graph of before the rewrite either).

:func:`run_coverage` runs :func:`check_model` over many models in a worker subprocess with a per-model timeout
(a hang or a crash costs one model, not the run) and :func:`render_report` writes the Markdown report.

Modules (each imports only those before it): ``result`` (:class:`CoverageResult`, failure types, shared
comparisons), ``models`` (the spec and model each check runs on), ``checks`` (:func:`check_model`), ``registry``
(many models: :func:`select_models`, :func:`run_coverage`), ``report`` (:func:`render_report`).
"""

from timm_drop.tools.coverage.checks import check_model
from timm_drop.tools.coverage.models import (
    COVERAGE_SPEC,
    DROPBLOCK_STAGE_PARAMS,
    SMALL_SIZES,
    adapt_spec,
    build_model,
    count_params_meta,
    disable_builtin_stochasticity,
    wake_zero_params,
)
from timm_drop.tools.coverage.registry import run_coverage, select_models
from timm_drop.tools.coverage.report import OPTIONAL_PASSES, render_report
from timm_drop.tools.coverage.result import STAGES, CheckFailed, CoverageResult

__all__ = [
    "COVERAGE_SPEC",
    "DROPBLOCK_STAGE_PARAMS",
    "OPTIONAL_PASSES",
    "SMALL_SIZES",
    "STAGES",
    "CheckFailed",
    "CoverageResult",
    "adapt_spec",
    "build_model",
    "check_model",
    "count_params_meta",
    "disable_builtin_stochasticity",
    "render_report",
    "run_coverage",
    "select_models",
    "wake_zero_params",
]
