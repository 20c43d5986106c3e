"""Write the documentation's generated pages (``docs/generated/*.md``) from the code and the results files.

    python docs/gen_pages.py            # rewrite docs/generated/
    python docs/gen_pages.py --check    # exit 1, naming the files, when the committed pages are stale

Deterministic: the same code and results files give the same bytes. ``tests/tools/test_docs.py`` reruns it into a
temporary folder and compares, so a field table, a method card or a quoted results row cannot drift from its
source. Each generated table has ONE function here that reads its source (see ``TABLES``); re-point that function
when the source moves, nothing else.

Numbers from ``benchmarks/results/cpu_lowdata.md`` are not copied here: a background job rewrites that file, so the
pages include it whole at build time (``--8<--`` snippets) instead.
"""

from __future__ import annotations

import argparse
import inspect
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "generated"
OPS_RESULTS = "benchmarks/results/ops_cpu.md"

#: What each registered regularizer draws at random per training forward (the float32-mask claim, per method).
#: A newly registered method without an entry stops the generator, naming it: write its line here.
RANDOMNESS: dict[str, str] = {
    "dropblock": (
        "Block seeds, only where a whole block fits. On accelerators: `bernoulli_` on the seed map (float32 "
        "uniform and threshold; the 0/1 result stored in the input dtype). On CPU: the same distribution drawn "
        "sparsely as float64 geometric gaps between seeds (`bernoulli_positions`), so no noise tensor is allocated."
    ),
    "corrdrop": (
        "Two float32 uniforms per cell of the pooled grid (`torch.rand`), compared with the Eq. (5) and the "
        "Eq. (6)-(7)/(11) probabilities: one mask per sample, shared by every channel."
    ),
    "selectscale": "One float32 `Uniform(1 - q, 1 + q)` factor per (sample, top-scored channel); no 0/1 mask.",
    "selectout": "One float32 uniform per (sample, top-scored channel) (`torch.rand`), compared with the drop probability.",
    "spatial_scale": "One float32 `Uniform(1 - q, 1 + q)` factor per (sample, channel); no 0/1 mask.",
    "attentiondrop": (
        "Only the gate `g ~ Bernoulli(drop_prob)` per unit is random (the drop weight is a function of the input). "
        "On CPU the gated units are drawn as float64 geometric gaps (`bernoulli_positions`); elsewhere one float32 "
        "uniform per unit (`torch.rand(...) < drop_prob`)."
    ),
    "dropout": "`bernoulli_` per unit (float32 uniform and threshold; the 0/1 result stored in the input dtype).",
    "spatial_dropout": "`bernoulli_` per (sample, channel), shared by every position of the map.",
    "droppath": "`bernoulli_` per sample: the whole branch is kept or dropped.",
}


# -- the sources: one function per table (re-point these when the source moves) ------------------------------


def site_kind_rows() -> list[tuple[str, str]]:
    """(kind, where it goes) per site kind, in ``timm_drop.spec.SITE_KINDS`` order. Re-point at the spec's field
    table once it describes the kinds."""
    from timm_drop import spec

    where = {
        "stage": "on a `feature_info` stage output",
        "block": "after each block of a stage",
        "residual": "on the branch operand of a skip add, before the add (where DropPath goes)",
        "shortcut": "on the identity / projection operand of a skip add",
        "merge": "on the add's output",
        "norm": "after a normalization layer",
        "module": "after modules chosen by `name` / `type`",
    }
    if set(where) != set(spec.SITE_KINDS):
        raise SystemExit(f"gen_pages: site kinds differ from spec.SITE_KINDS: {set(where) ^ set(spec.SITE_KINDS)}")
    return [(f"`{k}`", where[k]) for k in spec.SITE_KINDS]


def ops_rows(name: str) -> tuple[list[str], list[str]]:
    """(header lines, table lines) of ``benchmarks/results/ops_cpu.md`` for the registered method ``name``: the
    file's date/device/version/command lines and, per input shape, the table header and the method's rows."""
    lines = (ROOT / OPS_RESULTS).read_text().splitlines()
    header = [ln for ln in lines[:12] if ln.startswith("- ")]
    out: list[str] = []
    table_head: list[str] = []
    for i, ln in enumerate(lines):
        if ln.startswith("## Input"):
            out += ["", f"**{ln[3:]}**", ""]
        elif ln.startswith("| op |"):
            table_head = [ln, lines[i + 1]]
            out += table_head
        elif ln.startswith(f"| {name} |") or (name == "dropblock" and ln.startswith("| timm DropBlock2d |")):
            out.append(ln)
        elif ln.startswith("| timm DropBlock2d | drop_prob=0.1, block_size=7 (default"):
            out.append(ln)
        if ln.startswith("## Realised drop fraction") and name == "dropblock":
            out += ["", f"**{ln[3:]}**", ""]
            j = i + 1
            while j < len(lines) and not lines[j].startswith("## "):
                out.append(lines[j])
                j += 1
            break
        if ln.startswith("## Earlier runs"):
            break
    return header, out


#: The spec the error example is made from: line 7 holds the mistake.
ERROR_EXAMPLE_SPEC = """\
rules:
  - regularizer: dropblock
    params: {drop_prob: 0.1, block_size: 7}
    sites: [norm, shortcut]
    stages: [3, 4]
    stage_params:
      3: {drop_prob: 1.5}
"""


def spec_error_example() -> str:
    """The message ``load_spec`` raises for ``ERROR_EXAMPLE_SPEC`` saved as ``x.yaml`` (run in a temporary folder,
    so the message names the file as a user in that folder would)."""
    import os
    import tempfile

    from timm_drop import SpecError, load_spec

    here = os.getcwd()
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, "x.yaml").write_text(ERROR_EXAMPLE_SPEC)
        os.chdir(tmp)
        try:
            load_spec("x.yaml")
        except SpecError as err:
            return str(err) + "\n"
        finally:
            os.chdir(here)
    raise SystemExit("gen_pages: ERROR_EXAMPLE_SPEC loaded without an error")


# -- writing ---------------------------------------------------------------------------------------------------


def _table(head: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    esc = [tuple(c.replace("|", "\\|") for c in r) for r in rows]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in esc]
    return "\n".join(lines) + "\n"


GENERATED_NOTE = "<!-- generated by docs/gen_pages.py from {src}; edit the source, then rerun it -->\n\n"


def page_spec_fields() -> str:
    from timm_drop.spec import spec_field_table

    return GENERATED_NOTE.format(src="the rule fields declared on timm_drop.spec_model.Rule") + spec_field_table()


def page_config_fields() -> str:
    from timm_drop.training.config import config_field_table

    return GENERATED_NOTE.format(src="the fields of timm_drop/training/config_schema.py") + config_field_table()


def page_api() -> str:
    import timm_drop

    parts = [GENERATED_NOTE.format(src="timm_drop.__all__"), "# API reference\n\n"]
    parts.append("Every name in `timm_drop.__all__`, from its docstring. Import them as `timm_drop.<name>`.\n\n")
    for name in sorted(timm_drop.__all__, key=str.lower):
        obj = getattr(timm_drop, name)
        module = getattr(obj, "__module__", "timm_drop")
        parts.append(f"## `{name}`\n\n::: {module}.{obj.__qualname__}\n    options:\n      show_root_heading: false\n\n")
    return "".join(parts)


def _paper_lines(cls: type) -> list[str]:
    """The paper section of a card, from the class's ``card`` (a method without one gets none)."""
    card = getattr(cls, "card", None)
    if card is None:
        return []
    strength = ", ".join(f"`{p}`" for p in cls.strength_params) or "none"
    return [
        "## Paper\n\n",
        f"[{card.title}]({card.url}) ({card.cite}). {card.summary[:1].upper() + card.summary[1:]}.\n\n",
        f"Reported: {card.reported}.\n\n",
        f"Strength parameters (scaled by `depth_scaling` and schedules): {strength}.\n\n",
    ]


def page_card(name: str) -> str:
    from timm_drop.regularizers import get_regularizer_class, regularizer_params

    cls = get_regularizer_class(name)
    if name not in RANDOMNESS:
        raise SystemExit(f"gen_pages: regularizer {name!r} has no RANDOMNESS entry in docs/gen_pages.py")
    params = ", ".join(f"{k}={v!r}" if v is not inspect.Parameter.empty else k for k, v in regularizer_params(name).items())
    header, rows = ops_rows(name)
    parts = [
        GENERATED_NOTE.format(src=f"{cls.__module__} and {OPS_RESULTS}"),
        f"# `{name}`: {cls.__name__}\n\n",
        f"Spec: `regularizer: {name}`, `params: {{...}}` with `{name}({params})`. "
        f"Python: `{cls.__module__}.{cls.__name__}`.\n\n",
        *_paper_lines(cls),
        "## Method card\n\n",
        "The module's docstring: paper, the equations implemented, the choices made where the paper is ambiguous, "
        "and the paper's placements.\n\n",
        f"::: {cls.__module__}\n    options:\n      members: false\n      show_root_heading: false\n      show_root_toc_entry: false\n\n",
        "## Parameters\n\n",
        f"::: {cls.__module__}.{cls.__name__}\n    options:\n      members: false\n      show_root_heading: false\n      show_root_toc_entry: false\n\n",
        "## What it draws at random\n\n",
        RANDOMNESS[name] + "\n\n",
        "## Masks\n\n",
        f"![{name} masks on layer1 of a CIFAR ResNet-20](../../figures/{name}.png)\n\n",
        "Drawn by `python docs/gen_figures.py` (`timm-drop viz` at seed 0 on an untrained model).\n\n",
        "## Measured speed against timm (CPU)\n\n",
        f"Rows of [`{OPS_RESULTS}`](../../benchmarks.md#op-speed-and-realised-drop-fraction) for this method and timm's "
        "DropBlock2d (the ratio baseline); that run:\n\n",
        "\n".join(header) + "\n",
        "\n".join(rows) + "\n\n",
        "Training effect on low-data CIFAR-10: see [Benchmarks and evidence](../../benchmarks.md) (the table is "
        "included from `benchmarks/results/cpu_lowdata.md`, which a running job extends).\n",
    ]
    return "".join(parts)


def page_paper_results() -> str:
    """What each paper reports in its own setting, from the method classes' cards (LayerOut's included)."""
    from timm_drop.layerout import LayerOut
    from timm_drop.regularizers import get_regularizer_class, list_regularizers

    methods = [(n, get_regularizer_class(n)) for n in list_regularizers()] + [("layerout", LayerOut)]
    rows = [
        (f"`{name}`", f"[{cls.card.cite}]({cls.card.url})", cls.card.reported)
        for name, cls in methods
        if getattr(cls, "card", None) is not None
    ]
    note = GENERATED_NOTE.format(src="each method class's card (timm_drop.regularizers.MethodCard)")
    return note + _table(("method", "paper", "what the paper reports"), rows)


def pages() -> dict[str, str]:
    """Relative path under docs/generated -> content."""
    from timm_drop.regularizers import list_regularizers

    out = {
        "spec_fields.md": page_spec_fields(),
        "config_fields.md": page_config_fields(),
        "site_kinds.md": GENERATED_NOTE.format(src="timm_drop/spec.py")
        + _table(("kind", "where the regularizer goes"), site_kind_rows()),
        "api.md": page_api(),
        "paper_results.md": page_paper_results(),
        "spec_error_example.txt": spec_error_example(),
        "spec_error_example_spec.yaml": ERROR_EXAMPLE_SPEC,
    }
    for name in list_regularizers():
        out[f"methods/{name}.md"] = page_card(name)
    return out


def write(out_dir: Path) -> list[Path]:
    written = []
    for rel, text in pages().items():
        path = out_dir / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        written.append(path)
    return written


def stale(out_dir: Path = OUT) -> list[str]:
    """Generated files whose committed text differs from what the generator writes now (or that are missing)."""
    bad = []
    for rel, text in pages().items():
        path = out_dir / rel
        if not path.is_file() or path.read_text() != text:
            bad.append(rel)
    return bad


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="report stale pages instead of writing them")
    args = ap.parse_args(argv)
    if args.check:
        bad = stale()
        for rel in bad:
            print(f"stale: docs/generated/{rel} (run python docs/gen_pages.py)")
        return 1 if bad else 0
    for path in write(OUT):
        print(path.relative_to(ROOT))
    return 0


if __name__ == "__main__":
    sys.exit(main())
