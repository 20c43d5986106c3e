"""Per-epoch metrics: ``metrics.jsonl`` (one JSON object per epoch), ``summary.csv`` and a curves PNG.

``summary.csv`` starts with timm's ``summary.csv`` columns (``epoch, train_loss, eval_loss, eval_top1, eval_top5,
lr``) so the two can be diffed, followed by the recipe's extras (train top-1, EMA metrics, LayerOut's frozen
fraction, the mean regularizer schedule strength, throughput).
"""

from __future__ import annotations

import csv
import io
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from timm_drop.training.files import replace_file

__all__ = ["MetricsLog", "flat_scalars", "plot_curves"]

TIMM_COLUMNS = ["epoch", "train_loss", "eval_loss", "eval_top1", "eval_top5", "lr"]


class MetricsLog:
    """Appends epoch rows; on resume, :meth:`truncate` drops rows the restored checkpoint had not reached."""

    def __init__(self, output_dir: str | os.PathLike, claim: Callable[..., None] | None = None) -> None:
        self.dir = Path(output_dir)
        self.jsonl = self.dir / "metrics.jsonl"
        self.csv = self.dir / "summary.csv"
        self.rows: list[dict[str, Any]] = []
        #: called with the file names before they are first written (the run directory's marker records them)
        self._claim = claim or (lambda *names: None)
        if self.jsonl.is_file():
            self.rows = self._read()

    def _read(self) -> list[dict[str, Any]]:
        lines = self.jsonl.read_text().splitlines()
        rows = []
        for i, line in enumerate(lines):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except ValueError as e:
                if i == len(lines) - 1:
                    # a write cut short by a kill: that epoch has no checkpoint either, so the row is redone
                    print(f"note: {self.jsonl}: dropped a partial last line ({line[:60]!r})", file=sys.stderr)
                    break
                raise ValueError(f"{self.jsonl}:{i + 1}: not a JSON metrics row ({e})") from e
        return rows

    def truncate(self, last_epoch: int) -> None:
        self.rows = [r for r in self.rows if r["epoch"] <= last_epoch]
        self._rewrite()

    def append(self, row: dict[str, Any]) -> None:
        self.rows.append(dict(row))
        self._rewrite()

    def _rewrite(self) -> None:
        """Both files rewritten whole (a few KiB), each replaced atomically: a kill leaves the old or the new file,
        and nothing is ever appended through whatever sits at their names."""
        self._claim("metrics.jsonl", "metrics.jsonl.tmp", "summary.csv", "summary.csv.tmp")
        text = "".join(json.dumps(r) + "\n" for r in self.rows)
        replace_file(self.jsonl, lambda f: f.write(text.encode()))
        extra: list[str] = []
        for r in self.rows:
            extra += [k for k in r if k not in TIMM_COLUMNS and k not in extra]
        cols = TIMM_COLUMNS + extra
        table = io.StringIO(newline="")
        w = csv.DictWriter(table, fieldnames=cols)
        w.writeheader()
        for r in self.rows:
            w.writerow({k: r.get(k, "") for k in cols})
        replace_file(self.csv, lambda f: f.write(table.getvalue().encode()))


def plot_curves(rows: list[dict[str, Any]], path: str | os.PathLike, title: str = "") -> None:
    """Loss and top-1 accuracy per epoch (train vs eval, EMA if present) as a PNG, with matplotlib's Agg backend."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    ep = [r["epoch"] for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for key, label in (("train_loss", "train"), ("eval_loss", "eval"), ("ema_eval_loss", "eval (EMA)")):
        pts = [(e, r[key]) for e, r in zip(ep, rows) if r.get(key) is not None]
        if pts:
            ax1.plot(*zip(*pts), marker="o", ms=3, label=label)
    for key, label in (("train_top1", "train"), ("eval_top1", "eval"), ("ema_eval_top1", "eval (EMA)")):
        pts = [(e, r[key]) for e, r in zip(ep, rows) if r.get(key) is not None]
        if pts:
            ax2.plot(*zip(*pts), marker="o", ms=3, label=label)
    ax1.set(xlabel="epoch", ylabel="loss", title="loss")
    ax2.set(xlabel="epoch", ylabel="top-1 accuracy (%)", title="accuracy")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    try:
        # the temporary keeps the .png suffix the run's marker lists (curves.png.tmp.png)
        replace_file(path, lambda f: fig.savefig(f, format="png", dpi=100), temp=str(path) + ".tmp.png")
    finally:
        plt.close(fig)


def flat_scalars(d: dict[str, Any], prefix: str = "", *, as_text: bool = False) -> dict[str, Any]:
    """Nested dict -> ``{"a/b": number}`` for trackers; other values dropped (or, ``as_text``, kept as strings:
    TensorBoard's hparams take only scalars)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{'.' if as_text else '/'}{k}" if prefix else str(k)
        if isinstance(v, dict):
            out.update(flat_scalars(v, key, as_text=as_text))
        elif isinstance(v, (bool, int, float)) and (as_text or not isinstance(v, bool)):
            out[key] = v
        elif as_text:
            out[key] = str(v)
    return out

