"""``timm-drop``: the command line.

::

    timm-drop list                                   # registered regularizers and their parameters
    timm-drop plan MODEL SPEC [--input-size 3 64 64] [--num-classes N]   # the site table; nothing changes
    timm-drop apply MODEL SPEC --out ckpt.pth [--input-size ...] [--num-classes N]
    timm-drop viz MODEL SPEC [--image FILE ...] [--sites GLOB] [--strength P] [--seed S] [--compare A,B] --out F.png
    timm-drop summary MODEL SPEC [--input-size ...] [--num-classes N]   # per rule: sites, strength, schedule
    timm-drop presets [NAME ...] [--model MODEL]      # placements by name: paper rule; --model: the concrete spec
    timm-drop coverage [--limit N] [--sample N] [--seed S] [--filter GLOB] [--out PATH] [--timeout-per-model S]
                       [--features-only]                 # backbones: timm.create_model(name, features_only=True)

Models are built by timm name with ``pretrained=False`` (no network). Exit codes: 0 success, 1 coverage below
``--min-pass-rate``, 2 usage errors: an unknown model (the message lists the nearest registered names) or an
invalid spec (the message is the :class:`~timm_drop.spec.SpecError` text, naming the rule and field).
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import shlex
import sys
import time
from collections.abc import Sequence
from typing import Any

from timm_drop.errors import TimmDropError

EXIT_USAGE = 2


class UsageError(TimmDropError):
    """A problem with the command line's inputs; printed without a traceback, exit code 2."""


def _nearest_models(name: str, n: int = 5) -> list[str]:
    import timm

    from timm_drop.suggest import nearest

    names = timm.list_models()
    near = nearest(name, names, n)
    if not near:
        # Fall back to names sharing the family prefix (e.g. "resnet5" -> resnet50, resnet50d, ...).
        stem = name.split("_")[0].rstrip("0123456789")
        near = [m for m in names if stem and m.startswith(stem)][:n]
    return near


def check_model_name(name: str) -> None:
    """An unknown timm model name is a :class:`UsageError` listing the nearest registered names."""
    import timm

    if not timm.is_model(name):
        near = _nearest_models(name)
        hint = f"; nearest registered names: {', '.join(near)}" if near else ""
        raise UsageError(f"unknown timm model {name!r}{hint}")


def create_model(name: str, num_classes: int | None = None):
    """``timm.create_model(name, pretrained=False)``; an unknown name is a :class:`UsageError` with suggestions."""
    import timm

    check_model_name(name)
    kwargs: dict[str, Any] = {}
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    return timm.create_model(name, pretrained=False, **kwargs)


def load_spec_or_exit(src: str):
    """Parse SPEC (a path, YAML text or a placement by name, which stays a request until it meets the model);
    a :class:`SpecError` becomes a :class:`UsageError` with its text."""
    from timm_drop.placements import placement_request
    from timm_drop.spec import SpecError, load_spec

    try:
        return placement_request(src) or load_spec(src)
    except SpecError as exc:
        raise UsageError(str(exc)) from None


def _example_input(input_size: Sequence[int] | None):
    """``--input-size`` as an example input; without it ``None``: the library's default input, as users get."""
    import torch

    return None if input_size is None else torch.randn(1, *input_size)


def _plan(model, spec, example):
    """Run the dry run; a spec that cannot be placed on this model (e.g. a rule matching nothing) is a usage error."""
    import timm_drop
    from timm_drop.spec import SpecError

    try:
        return timm_drop.plan(model, spec, example_input=example)
    except (SpecError, ValueError, KeyError, TypeError) as exc:
        raise UsageError(f"cannot place the spec on this model: {exc}") from None


# -- subcommands ------------------------------------------------------------------------------------------------
def cmd_list(args: argparse.Namespace) -> int:
    from timm_drop.regularizers import get_regularizer_class, list_regularizers, regularizer_params

    for name in list_regularizers():
        params = []
        for key, default in regularizer_params(name).items():
            params.append(key if default is inspect.Parameter.empty else f"{key}={default!r}")
        method = get_regularizer_class(name)
        strength = ", ".join(getattr(method, "strength_params", ())) or "none"
        card = getattr(method, "card", None)  # the method's paper card, else its docstring's first line
        doc = (inspect.getdoc(method) or "").strip()
        summary = card.line() if card is not None else doc.splitlines()[0] if doc else ""
        print(f"{name}({', '.join(params)})  strength: {strength}" + (f"  - {summary}" if summary else ""))
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    check_model_name(args.model)
    spec = load_spec_or_exit(args.spec)
    model = create_model(args.model, args.num_classes)
    model.eval()
    print(_plan(model, spec, _example_input(args.input_size)))
    return 0


def _check_out_file(out: str, overwrite: bool) -> None:
    """Refuse an ``--out`` that cannot take a file, before any model is built (the work would be lost)."""
    if not out.strip():
        raise UsageError("--out is empty; give a file path such as ckpt.pth (or m.safetensors)")
    if os.path.isdir(out):
        raise UsageError(f"--out {out!r} is a directory; give a file path such as {os.path.join(out, 'ckpt.pth')!r}")
    if os.path.exists(out) and not overwrite:
        raise UsageError(f"--out {out!r} exists; pass --overwrite to replace it")
    parent = os.path.dirname(out) or "."
    if not os.path.isdir(parent):
        raise UsageError(f"--out {out!r}: directory {parent!r} does not exist; create it first")


def cmd_apply(args: argparse.Namespace) -> int:
    import torch

    import timm_drop

    _check_out_file(args.out, args.overwrite)
    check_model_name(args.model)
    spec = load_spec_or_exit(args.spec)
    model = create_model(args.model, args.num_classes)
    model.eval()
    example = _example_input(args.input_size)
    plan = _plan(model, spec, example)
    print(plan)
    timm_drop.apply_regularizer(model, plan)  # the plan shown, as it is: no second analysis
    spec = plan.spec  # the concrete spec (a placement by name resolved on this model): the checkpoint records it
    # The regularizers own no parameters or persistent buffers, so the state_dict is a plain timm checkpoint;
    # the spec and plan ride along so the same placement can be re-applied before loading it.
    from timm_drop.training.checkpoint import save_weights_safetensors
    from timm_drop.training.files import WriteError, replace_file

    about = {"model_name": args.model, "num_classes": args.num_classes, "spec": spec.to_dict(), "plan": plan.to_dict()}
    try:
        if args.out.lower().endswith(".safetensors"):
            # tensors only (no pickle): what is not a tensor goes into the header's string metadata
            meta = {f"timm_drop_{k.removesuffix('_name')}": json.dumps(v) if isinstance(v, dict) else str(v)
                    for k, v in about.items() if v is not None}  # fmt: skip
            save_weights_safetensors(model.state_dict(), args.out, metadata=meta)
            print(
                f"saved {args.out} (safetensors: the weights only, no pickle; the model name, spec and plan are in "
                "its metadata: safetensors.safe_open(path, 'pt').metadata())"
            )
            return 0
        state = {**about, "state_dict": model.state_dict()}
        replace_file(args.out, lambda f: torch.save(state, f))
    except WriteError as exc:
        raise UsageError(str(exc)) from None
    print(f"saved {args.out}")
    return 0


def cmd_summary(args: argparse.Namespace) -> int:
    import timm_drop
    from timm_drop.summary import summary

    check_model_name(args.model)
    spec = load_spec_or_exit(args.spec)
    model = create_model(args.model, args.num_classes)
    example = _example_input(args.input_size)
    _plan(model, spec, example)  # a spec that does not fit is a usage error, as for plan
    timm_drop.apply_regularizer(model, spec, example_input=example)
    print(summary(model))
    return 0


def cmd_presets(args: argparse.Namespace) -> int:
    """Each placement's paper rule, translations and departures; with --model, the concrete spec it becomes."""
    from timm_drop.placements import FAMILIES, PLACEMENTS, PlacementError, placement_spec, unknown_placement

    names = args.names or list(PLACEMENTS)
    unknown = [n for n in names if n not in PLACEMENTS]
    if unknown:
        raise UsageError(unknown_placement(unknown[0]))
    if args.model is None:
        for name in names:
            p = PLACEMENTS[name]
            print(f"{name}  [{p.regularizer}]  {p.paper}")
            print(f"    rule: {p.rule}")
            if p.departures:
                print(f"    departures: {p.departures}")
        print("families: " + "; ".join(f"{k} = {v}" for k, v in FAMILIES.items()))
        print("overrides: {preset: NAME, <param>: value, stages: [-1], stage_params: {...}, schedule: {...}}")
        return 0
    model = create_model(args.model, args.num_classes)
    model.eval()
    for name in names:
        try:
            print(f"# {args.model}: placement {name!r}\n" + placement_spec(model, name).to_yaml())
        except PlacementError as exc:
            if len(names) == 1:
                raise UsageError(str(exc)) from None
            print(f"# {args.model}: placement {name!r} refused: {exc}\n")
    return 0


def cmd_coverage(args: argparse.Namespace) -> int:
    from timm_drop.tools.coverage import render_report, run_coverage, select_models

    if args.from_jsonl:
        return _coverage_from_jsonl(args)
    names = select_models(filter=args.filter, limit=args.limit, sample=args.sample, seed=args.seed)
    if not names:
        raise UsageError(f"no timm model matches --filter {args.filter!r}")
    results = []
    if args.resume:  # continue a cut-short --jsonl run: keep its results, check only the models it lacks
        if not args.jsonl or not os.path.exists(args.jsonl):
            raise UsageError("--resume needs the --jsonl file of the earlier run")
        results = _read_jsonl(args.jsonl)
        done = {r.name for r in results}
        names = [n for n in names if n not in done]
    total = len(names) + len(results)
    t0 = time.perf_counter()

    def progress(res) -> None:
        results_done = len(results) + 1
        status = "ok" if res.ok else ("skip" if res.skipped else f"FAIL[{res.stage}] {res.reason[:120]}")
        print(f"[{results_done}/{total}] {res.name} ({res.seconds:.1f}s): {status}", flush=True)

    jsonl = open(args.jsonl, "a" if args.resume else "w") if args.jsonl else None  # noqa: SIM115  (closed below)
    try:
        for res in run_coverage(
            names,
            timeout=args.timeout_per_model,
            max_params=int(args.max_params * 1e6) if args.max_params else None,
            progress=progress,
            features_only=args.features_only,
        ):
            results.append(res)
            if jsonl is not None:  # one line per model as it finishes, so a cut-short run keeps its results
                jsonl.write(json.dumps(res.to_dict()) + "\n")
                jsonl.flush()
    finally:
        if jsonl is not None:
            jsonl.close()
    command = "timm-drop " + " ".join(shlex.quote(a) for a in args.argv)
    report = render_report(
        results, command=command, elapsed=time.perf_counter() - t0, features_only=args.features_only
    )
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            f.write(report)
        print(f"wrote {args.out}")
    else:
        print(report)
    checked = [r for r in results if not r.skipped]
    rate = 100.0 * sum(r.ok for r in checked) / len(checked) if checked else 0.0
    print(f"pass rate: {sum(r.ok for r in checked)}/{len(checked)} = {rate:.1f} %")
    return 0 if rate >= args.min_pass_rate else 1


def cmd_viz(args: argparse.Namespace) -> int:
    """``timm-drop viz MODEL SPEC ...``: errors in inputs are ``UsageError`` (exit 2) naming the flag."""
    import timm
    import torch
    import yaml

    from timm_drop.viz import format_params, render_masks

    if os.path.exists(args.out) and not args.overwrite:
        raise UsageError(f"--out {args.out!r} exists; pass --overwrite to replace it")
    if not str(args.out).lower().endswith(".png"):
        raise UsageError(f"--out {args.out!r}: the figure is a PNG; name the file *.png")
    if args.strength is not None and not 0.0 <= args.strength < 1.0:
        raise UsageError(f"--strength must be in [0, 1), got {args.strength}")
    kwargs: dict[str, Any] = {}
    if args.model_kwargs:
        kwargs = yaml.safe_load(args.model_kwargs)
        if not isinstance(kwargs, dict):
            raise UsageError(
                f"--model-kwargs must be a YAML mapping like '{{img_size: 64}}', got {args.model_kwargs!r}"
            )
    for f in args.image or ():
        if not os.path.isfile(f):
            raise UsageError(f"--image {f!r}: no such file")
    check_model_name(args.model)
    spec = load_spec_or_exit(args.spec)
    torch.manual_seed(args.seed)  # the random initialisation too: the same command draws the same figure
    try:
        model = timm.create_model(args.model, pretrained=False, **kwargs)
    except TypeError as exc:
        raise UsageError(f"--model-kwargs: {args.model} rejected them: {exc}") from None
    try:
        fig = render_masks(
            model,
            spec,
            args.image or None,
            sites=args.sites,
            strength=args.strength,
            seed=args.seed,
            compare=args.compare,
            out=args.out,
        )
    except (ValueError, KeyError, FileNotFoundError) as exc:
        # a KeyError's str() is the repr of its message; every other message is shown as it is, quotes and all
        raise UsageError(str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)) from None
    masks = fig.find("mask")
    print(f"wrote {args.out} ({fig.size[0]}x{fig.size[1]} px, {len(masks)} mask panel(s))")
    for p in masks:
        print(f"  {p.site}  {p.method}({format_params(p.params)}): dropped {p.dropped:.1%}")
    return 0


def _read_jsonl(path: str) -> list[Any]:
    from timm_drop.tools.coverage import CoverageResult

    try:
        with open(path) as f:
            results = [CoverageResult(**json.loads(line)) for line in f if line.strip()]
    except (OSError, ValueError, TypeError) as exc:
        raise UsageError(f"{path!r}: {exc}") from None
    for r in results:
        r.input_size = tuple(r.input_size) if r.input_size is not None else None
    return results


def _coverage_from_jsonl(args: argparse.Namespace) -> int:
    """Re-render a report from the JSON lines of an earlier (possibly cut-short) ``--jsonl`` run."""
    from timm_drop.tools.coverage import render_report

    results = _read_jsonl(args.from_jsonl)
    report = render_report(
        results, command=args.command_note or "", features_only=args.features_only, partial=args.partial
    )
    if args.out:
        with open(args.out, "w") as f:
            f.write(report)
        print(f"wrote {args.out}")
    else:
        print(report)
    return 0


# -- parser -----------------------------------------------------------------------------------------------------
def _positive(kind: type) -> Any:
    """An argparse ``type`` accepting numbers above 0 only (a count of models, a timeout)."""

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {kind.__name__}, got {text!r}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be above 0, got {text}")
        return value

    return parse


def _input_size(values: list[int]) -> tuple[int, ...]:
    if any(v < 1 for v in values):
        raise UsageError(f"--input-size values must be positive, got {values}")
    return tuple(values)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="timm-drop", description="Place structured-dropout regularizers in timm models by YAML rules."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    _add_model_commands(sub)
    _add_coverage_command(sub)
    _add_viz_command(sub)
    return parser


def _add_model_commands(sub: Any) -> None:
    """``list``, and the commands on MODEL SPEC: ``plan``, ``apply``, ``summary``."""
    p = sub.add_parser("list", help="list the registered regularizers and their parameters")
    p.set_defaults(func=cmd_list)

    for cmd, func, text in (
        (
            "plan",
            cmd_plan,
            "print the plan table (site, kind, stage, shape, regularizer, params); changes nothing",
        ),
        ("apply", cmd_apply, "apply a spec and save a checkpoint with the spec and plan"),
        ("summary", cmd_summary, "apply a spec and print per rule: sites, strength, schedule position"),
    ):
        p = sub.add_parser(cmd, help=text, description=text)
        p.add_argument("model", metavar="MODEL", help="timm model name (built with pretrained=False)")
        p.add_argument(
            "spec", metavar="SPEC", help="spec file (.yaml), YAML text or a placement name (timm-drop presets)"
        )
        p.add_argument(
            "--input-size",
            type=int,
            nargs=3,
            metavar=("C", "H", "W"),
            help="example input size for the shape pass (default: the model's pretrained_cfg input_size)",
        )
        p.add_argument("--num-classes", type=int, default=None, help="classifier size (default: timm's)")
        if cmd == "apply":
            p.add_argument("--out", required=True, help="checkpoint path to write")
            p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
        p.set_defaults(func=func)

    text = "each placement by name: its paper's rule, per-family translation, departures; --model: its concrete spec"
    p = sub.add_parser("presets", help=text, description=text)
    p.add_argument("names", nargs="*", metavar="NAME", help="placements to show (default: all)")
    p.add_argument("--model", default=None, help="timm model name: print the concrete spec each NAME becomes on it")
    p.add_argument("--num-classes", type=int, default=None, help="classifier size (default: timm's)")
    p.set_defaults(func=cmd_presets)


def _add_coverage_command(sub: Any) -> None:
    p = sub.add_parser(
        "coverage",
        help="check the rewriter's guarantees over timm.list_models() and write a Markdown report",
        description="Run timm_drop.tools.coverage.check_model over (a sample of) timm.list_models(), one worker "
        "subprocess with a per-model timeout, and report failures with reasons and the pass rate.",
    )
    p.add_argument("--filter", default=None, metavar="GLOB", help="only model names matching this glob")
    p.add_argument(
        "--sample", type=_positive(int), default=None, metavar="N", help="a seeded random sample of N models"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of --sample (default 0)")
    p.add_argument(
        "--limit", type=_positive(int), default=None, metavar="N", help="at most N models (after --sample)"
    )
    p.add_argument(
        "--out", default=None, metavar="PATH", help="write the Markdown report here (default: stdout)"
    )
    p.add_argument("--jsonl", default=None, metavar="PATH", help="also write each result as a JSON line here")
    p.add_argument(
        "--from-jsonl", default=None, metavar="PATH", help="only render a report from a --jsonl file"
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the run recorded in --jsonl: keep its results, check only the models it lacks",
    )
    p.add_argument("--command-note", default=None, help="with --from-jsonl: how the results were produced")
    p.add_argument(
        "--partial", default=None, metavar="TEXT", help="with --from-jsonl: mark the report partial, saying why"
    )
    p.add_argument(
        "--features-only",
        action="store_true",
        help="check each model's backbone form (timm.create_model(name, features_only=True)); it must get stage "
        "sites; models timm has no features_only form for are skipped",
    )
    p.add_argument(
        "--timeout-per-model", type=_positive(float), default=120.0, metavar="S", help="seconds (default 120)"
    )
    p.add_argument(
        "--max-params",
        type=float,
        default=250.0,
        metavar="M",
        help="skip models with more than M million parameters (default 250; 0 = no limit)",
    )
    p.add_argument(
        "--min-pass-rate",
        type=float,
        default=0.0,
        metavar="PCT",
        help="exit 1 below this pass rate (percent)",
    )
    p.set_defaults(func=cmd_coverage)


def _add_viz_command(sub: Any) -> None:
    text = "draw what the spec's regularizers do to a few images: activation, realised mask, score map (PNG)"
    p = sub.add_parser("viz", help=text, description=text + "; see timm_drop.viz.render_masks")
    p.add_argument("model", metavar="MODEL", help="timm model name (built with pretrained=False)")
    p.add_argument("spec", metavar="SPEC", help="spec file (.yaml) or YAML text")
    p.add_argument(
        "--image", nargs="+", action="extend", metavar="FILE", help="image files (default: 2 digits)"
    )
    p.add_argument("--sites", default=None, metavar="GLOB", help="site names to draw (default: up to 4)")
    p.add_argument("--strength", type=float, default=None, metavar="P", help="replace drop_prob / q")
    p.add_argument("--seed", type=int, default=0, help="torch seed of the forward (default 0)")
    p.add_argument("--compare", default=None, metavar="A,B", help="methods side by side at each site")
    p.add_argument(
        "--model-kwargs", default=None, metavar="YAML", help="timm.create_model kwargs, '{img_size: 64}'"
    )
    p.add_argument("--out", required=True, metavar="FILE.png", help="figure to write")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.set_defaults(func=cmd_viz)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = argv
    try:
        if getattr(args, "input_size", None) is not None:
            args.input_size = _input_size(args.input_size)
        return int(args.func(args) or 0)
    except UsageError as exc:
        print(f"timm-drop {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
