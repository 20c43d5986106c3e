"""The Markdown report (``benchmarks/results/coverage.md``): date, versions, pass rate, failures grouped by cause,
one row per failing model, skipped models, notes and the passing models."""

from __future__ import annotations

import datetime
import platform
import re
from collections import Counter
from collections.abc import Sequence

import torch

import timm_drop
from timm_drop.tools.coverage.result import CoverageResult


def _cause(res: CoverageResult) -> str:
    """A failure's cause with numbers, shapes and names folded, for grouping."""
    text = re.sub(r"'[^']*'", "'…'", res.reason)
    text = re.sub(r"\d+(\.\d+)?(e-?\d+)?", "N", text)
    where = re.sub(r":\d+", "", res.where)
    return f"{res.stage}: {text[:160]}" + (f" @ {where}" if where else "")


def _md(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


#: the checks that do not apply to every model (:attr:`CoverageResult.passes`), as the report titles them
OPTIONAL_PASSES: dict[str, str] = {"grad_checkpointing": "gradient-checkpointing pass", "fx_retrace": "FX re-trace pass"}


def _pass_line(checked: Sequence[CoverageResult], key: str, title: str) -> str:
    """``- <title>: N ok, M not applicable (reasons), F failed`` over the checked models."""
    ok = sum(1 for r in checked if r.passes.get(key) == "ok")
    na = Counter(re.sub(r"\(.*", "", r.passes[key][4:]).strip() for r in checked if r.passes.get(key, "").startswith("n/a"))
    failed = sum(1 for r in checked if r.stage == key)
    reasons = "; ".join(f"{n} {why}" for why, n in na.most_common(3))
    return (
        f"- {title}: {ok} ok, {sum(na.values())} not applicable" + (f" ({reasons})" if reasons else "")
        + f", {failed} failed"
    )


def render_report(
    results: Sequence[CoverageResult],
    *,
    command: str = "",
    elapsed: float | None = None,
    features_only: bool = False,
    partial: str | None = None,
) -> str:
    """Markdown: date, versions, pass rate, failures grouped by cause, then one row per failing model."""
    import timm

    checked = [r for r in results if not r.skipped]
    passed = [r for r in checked if r.ok]
    failed = [r for r in checked if not r.ok]
    skipped = [r for r in results if r.skipped]
    rate = 100.0 * len(passed) / len(checked) if checked else 0.0
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    title = "features_only models (backbones) of the timm registry" if features_only else "the timm registry"
    lines = [f"# timm_drop coverage over {title}", ""]
    if partial:
        lines += [f"**PARTIAL RUN**: {partial}", ""]
    lines += [
        f"- date: {now}",
        f"- versions: timm_drop {timm_drop.__version__}, timm {timm.__version__}, torch {torch.__version__}, "
        f"Python {platform.python_version()}, {platform.machine()} CPU",
    ]
    if command:
        lines.append(f"- command: `{command}`")
    if elapsed is not None:
        lines.append(f"- wall time: {elapsed / 60:.1f} min")
    lines += [
        f"- models: {len(results)} ({len(checked)} checked, {len(skipped)} skipped: too large for a CPU check"
        + (", or no features_only form in timm)" if features_only else ")"),
        f"- **pass rate: {len(passed)}/{len(checked)} = {rate:.1f} %**",
        *(_pass_line(checked, key, title) for key, title in OPTIONAL_PASSES.items()),
        "",
        "Each model: `pretrained=False`, smallest accepted input, batch 2, `COVERAGE_SPEC` (every site kind; "
        "dropblock on spatial stage outputs). Checks: plan is a dry run with >= 1 site; same object and class; "
        "identical state_dict keys and strict loads both ways; bit-identical eval output; finite train "
        "forward/backward with every regularizer running; strength-0 train output bit-identical to the "
        "original and full strength different; deepcopy runs its own regularizers; with gradient checkpointing "
        "on, every regularizer runs and outputs and gradients equal those without it at one seed; timm's FX "
        "tracer traces the regularized model, its graph gives the eval output bit for bit and torch.fx still "
        "traces afterwards; strip restores class, keys, hooks, modules and eval output."
        + (
            " Backbones: `timm.create_model(name, features_only=True)` (timm's feature wrapper or the model's "
            "own `*Features` class), which must also get at least one `stage` site."
            if features_only
            else ""
        ),
        "",
    ]
    if failed:
        lines += _failure_lines(failed)
    if skipped:
        lines += ["## Skipped", "", ", ".join(f"{r.name} ({r.reason})" for r in skipped), ""]
    notes = [r for r in checked if r.notes]
    if notes:
        lines += ["## Notes (non-fatal)", ""]
        lines += [f"- {r.name}: {'; '.join(r.notes)}" for r in notes]
        lines.append("")
    if passed:
        lines += _passing_lines(passed, checked)
    return "\n".join(lines)


def _failure_lines(failed: Sequence[CoverageResult]) -> list[str]:
    """The failures grouped by cause (largest group first), then one row per failing model."""
    lines = ["## Failures by cause", "", "| # | cause | example models |", "|---:|---|---|"]
    groups: dict[str, list[CoverageResult]] = {}
    for r in failed:
        groups.setdefault(_cause(r), []).append(r)
    for cause, rs in sorted(groups.items(), key=lambda kv: -len(kv[1])):
        example = ", ".join(r.name for r in rs[:6]) + (" …" if len(rs) > 6 else "")
        lines.append(f"| {len(rs)} | {_md(cause)} | {_md(example)} |")
    lines += [
        "",
        "## Failing models",
        "",
        "| model | stage | reason | where | input |",
        "|---|---|---|---|---|",
    ]
    for r in sorted(failed, key=lambda r: (r.stage, r.name)):
        size = "x".join(map(str, r.input_size)) if r.input_size else ""
        lines.append(f"| {r.name} | {r.stage} | {_md(r.reason)} | {_md(r.where)} | {size} |")
    lines.append("")
    return lines


def _passing_lines(passed: Sequence[CoverageResult], checked: Sequence[CoverageResult]) -> list[str]:
    """How many passing models have each site kind, seconds per model, and the passing names."""
    kinds = Counter()
    for r in passed:
        kinds.update({k: 1 for k, v in r.n_sites.items() if v})
    secs = sorted(r.seconds for r in checked)
    return [
        "## Passing models",
        "",
        "Models with at least one site of each kind: "
        + ", ".join(
            f"{k} {kinds[k]}"
            for k in ("stage", "block", "residual", "shortcut", "merge", "norm", "module")
        ),
        "",
        f"Seconds per model: median {secs[len(secs) // 2]:.1f}, max {secs[-1]:.1f}.",
        "",
        ", ".join(r.name for r in sorted(passed, key=lambda r: r.name)),
        "",
    ]
