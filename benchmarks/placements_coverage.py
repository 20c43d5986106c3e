"""Placements by name on a sample of timm models: each applies, or refuses naming the placement and the reason.

    python benchmarks/placements_coverage.py --sample 300 --seed 0 --jsonl placements.jsonl \
        --out benchmarks/results/placements_coverage.md

For every sampled model (``pretrained=False``, one thread, the library's default shape-pass input, which is small
for every model that accepts any size): one analysis, then for each placement :func:`timm_drop.placement_spec`
and the plan built from it (the plan builds every regularizer and sets its layout, as ``apply_regularizer`` does
before inserting it). A model whose build fails or runs past ``--timeout`` is counted apart. One above
``--max-params`` (counted on the meta device) is built and planned on the meta device, as the library plans a
meta-device model: shapes only. Results stream to ``--jsonl`` (``--resume`` continues a
cut-short run); the Markdown table is written from it.
"""

from __future__ import annotations

import argparse
import json
import platform
import signal
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

import timm
import torch

import timm_drop
from timm_drop.placements import FAMILIES, PlacementError, list_placements, model_family, placement_spec
from timm_drop.rewrite import _build
from timm_drop.sites import analyze_model
from timm_drop.tools.coverage import select_models


class _Timeout(Exception):
    pass


def _alarm(signum, frame):  # noqa: ARG001
    raise _Timeout


def _param_count(name: str) -> int:
    with torch.device("meta"):
        model = timm.create_model(name, pretrained=False)
    return sum(p.numel() for p in model.parameters())


def check(name: str, timeout: int, max_params: int) -> dict:
    row: dict = {"model": name, "placements": {}}
    t0 = time.time()
    try:
        meta = _param_count(name) > max_params
        signal.alarm(timeout)
        if meta:  # planned on shapes, as the library plans a meta-device model: no memory, no weights
            row["meta"] = True
            with torch.device("meta"):
                model = timm.create_model(name, pretrained=False).eval()
        else:
            model = timm.create_model(name, pretrained=False).eval()
        analysis = analyze_model(model)
        row["family"] = model_family(model, analysis)
        for placement in list_placements():
            try:
                spec = placement_spec(model, placement, analysis=analysis)
                entries = _build(model, spec, analysis).entries
                row["placements"][placement] = {"ok": True, "sites": len(entries)}
            except (PlacementError, timm_drop.SpecError, timm_drop.RewriteError, ValueError) as exc:
                named = f"'{placement}'" in str(exc) or "placement" in str(exc)
                row["placements"][placement] = {"ok": False, "named": named, "reason": str(exc)[:300]}
        row["status"] = "checked"
    except _Timeout:
        row = {**row, "status": "error", "reason": f"over {timeout} s"}
    except Exception as exc:  # a model timm itself cannot build or run at the shape-pass input
        row = {**row, "status": "error", "reason": f"{type(exc).__name__}: {str(exc)[:200]}"}
    finally:
        signal.alarm(0)
    row["seconds"] = round(time.time() - t0, 1)
    return row


def _runs(rows: list[dict], command: str) -> list[str]:
    """One line per run the table's rows come from (this run's command last)."""
    counts = Counter(r.get("run", _EARLIER) for r in rows)
    out = [f"- rows from `{run}`: {n}" for run, n in counts.items() if run != command]
    return [*out, f"- this run: `{command}`" + (f" ({counts[command]} rows)" if command in counts else "")]


def render(rows: list[dict], command: str) -> str:
    checked = [r for r in rows if r["status"] == "checked"]
    names = list_placements()
    lines = [
        "# Placements by name: coverage on a sample of timm models",
        "",
        *_runs(rows, command),
        f"- date: {time.strftime('%Y-%m-%d')}; device: CPU ({platform.processor() or platform.machine()}), 1 thread",
        f"- versions: python {platform.python_version()}, torch {torch.__version__}, timm {timm.__version__}, "
        f"timm_drop {timm_drop.__version__}",
        f"- sampled: {len(rows)} models; checked: {len(checked)}; not built: "
        f"{sum(r['status'] == 'error' for r in rows)} (timm build/forward error or timeout); skipped: "
        f"{sum(r['status'] == 'skipped' for r in rows)} (too large); of the checked, "
        f"{sum(bool(r.get('meta')) for r in checked)} over --max-params were built and planned on the meta device",
        "- a placement *applies* when its concrete spec plans on the model (every regularizer built and its layout "
        "set); otherwise it *refuses*, and the error names the placement and the reason",
        "",
    ]
    total = sum(len(r["placements"]) for r in checked)
    ok = sum(p["ok"] for r in checked for p in r["placements"].values())
    named = sum((not p["ok"]) and p.get("named", False) for r in checked for p in r["placements"].values())
    lines += [f"**{ok}/{total} placement x model pairs apply ({100 * ok / max(total, 1):.1f} %); "
              f"{total - ok} refuse, {named} of them by name with the reason.**", ""]  # fmt: skip
    lines += ["| family | models | " + " | ".join(names) + " | all |", "|---|---:|" + "---:|" * (len(names) + 1)]
    by_family = defaultdict(list)
    for r in checked:
        by_family[r["family"]].append(r)
    for fam in [*FAMILIES, *sorted(set(by_family) - set(FAMILIES))]:
        rs = by_family.get(fam, [])
        if not rs:
            continue
        cells = []
        for p in names:
            cells.append(f"{sum(r['placements'][p]['ok'] for r in rs)}/{len(rs)}")
        fam_ok = sum(p["ok"] for r in rs for p in r["placements"].values())
        cells.append(f"{100 * fam_ok / (len(rs) * len(names)):.1f} %")
        lines.append(f"| {fam} | {len(rs)} | " + " | ".join(cells) + " |")
    lines += ["", "## Refusals", "", "| model | placement | reason |", "|---|---|---|"]
    for r in checked:
        for p, res in r["placements"].items():
            if not res["ok"]:
                lines.append(f"| {r['model']} | {p} | {res['reason'].replace('|', '/')} |")
    errors = [r for r in rows if r["status"] != "checked"]
    if errors:
        lines += ["", "## Models not checked", "", "| model | status | reason |", "|---|---|---|"]
        lines += [f"| {r['model']} | {r['status']} | {r['reason'].replace('|', '/')[:160]} |" for r in errors]
    reasons = Counter(res["reason"].split(": ", 1)[-1][:60] for r in checked for res in r["placements"].values()
                      if not res["ok"])  # fmt: skip
    if reasons:
        lines += ["", "Most common refusal reasons: " + "; ".join(f"{k} ({v})" for k, v in reasons.most_common(5))]
    return "\n".join(lines) + "\n"


#: the heading of the part of the report written by hand; rendering the report again keeps it
NOTES = "## Notes (by hand)"


def _notes_by_hand(out: Path) -> str:
    """The hand-written notes at the end of an earlier report at ``out`` ("" when there are none)."""
    old = out.read_text() if out.is_file() else ""
    return "\n" + old[old.index(NOTES):] if NOTES in old else ""


def _read(*jsonl: str) -> dict[str, dict]:
    """Rows by model of result files, later files winning."""
    out: dict[str, dict] = {}
    for path in jsonl:
        if Path(path).exists():
            rows = (json.loads(line) for line in Path(path).read_text().splitlines() if line.strip())
            out.update((r["model"], r) for r in rows)
    return out


#: how the rows of runs made before each row recorded its command were produced
_EARLIER = (
    "python benchmarks/placements_coverage.py --sample 300 --seed 0 (the sample in two halves, one --reverse), then "
    "--recheck-refused (2026-12-04)"
)


def _command(argv: list[str]) -> str:
    """This run's command line, files by their name only (no path of the machine it ran on)."""
    return " ".join(["python benchmarks/placements_coverage.py", *(Path(a).name if "/" in a else a for a in argv)])


def _rechecked(row: dict, args: argparse.Namespace) -> bool:
    """Whether an earlier run's row is checked again: a refusal or no check (--recheck-refused), its family, or its
    name (--recheck-model)."""
    refused = row["status"] != "checked" or not all(p["ok"] for p in row["placements"].values())
    return (
        (args.recheck_refused and refused)
        or row.get("family") in args.recheck_family
        or row["model"] in args.recheck_model
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sample", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=int, default=180)
    ap.add_argument("--max-params", type=int, default=250_000_000)
    ap.add_argument("--jsonl", default="placements_coverage.jsonl")
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--render-only", action="store_true")
    ap.add_argument(
        "--other", action="append", default=[], metavar="JSONL",
        help="earlier or concurrent runs' results (repeatable): a run going the other way (--reverse) stops where "
        "they meet; merged into the table, this run's rows winning",
    )
    ap.add_argument(
        "--recheck-refused", action="store_true",
        help="check again only the models with a refusal, or not checked, in --other (after a change)",
    )
    ap.add_argument(
        "--recheck-family", action="append", default=[], metavar="FAMILY",
        help="check again the models of this family in --other (repeatable; with --recheck-refused: either)",
    )
    ap.add_argument(
        "--recheck-model", action="append", default=[], metavar="MODEL",
        help="check again this model of --other (repeatable; with the options above: any of them)",
    )
    ap.add_argument("--reverse", action="store_true", help="check the sample from its end")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    signal.signal(signal.SIGALRM, _alarm)
    run = _command(argv if argv is not None else sys.argv[1:])
    done = {}
    path = Path(args.jsonl)
    if (args.resume or args.render_only) and path.exists():
        for line in path.read_text().splitlines():
            row = json.loads(line)
            done[row["model"]] = row
    names = select_models(sample=args.sample, seed=args.seed)
    if not args.render_only:
        with path.open("a" if args.resume else "w") as fh:
            order = list(enumerate(names))
            recheck = args.recheck_refused or args.recheck_family or args.recheck_model
            if recheck:
                earlier = _read(*args.other)
                order = [(i, n) for i, n in order if n in earlier and _rechecked(earlier[n], args)]
            for i, name in reversed(order) if args.reverse else order:
                if not recheck and name in _read(*args.other):
                    break  # the other run has been here
                if name in done:
                    continue
                row = {**check(name, args.timeout, args.max_params), "run": run}
                done[name] = row
                fh.write(json.dumps(row) + "\n")
                fh.flush()
                print(f"[{i + 1}/{len(names)}] {name}: {row['status']} {row.get('seconds', 0)} s", file=sys.stderr)
    done = {**_read(*args.other), **done}
    text = render([done[n] for n in names if n in done], run)
    if args.out:
        text += _notes_by_hand(Path(args.out))
        Path(args.out).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
