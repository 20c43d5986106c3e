"""Many models: a sample of ``timm.list_models()`` (:func:`select_models`), each checked in a worker subprocess
with a per-model timeout (:func:`run_coverage`), so a hang or a crash costs one model, not the run."""

from __future__ import annotations

import fnmatch
import multiprocessing as mp
import random
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch

from timm_drop.tools.coverage.checks import check_model
from timm_drop.tools.coverage.models import COVERAGE_SPEC
from timm_drop.tools.coverage.result import CoverageResult


def select_models(
    *,
    filter: str | None = None,
    limit: int | None = None,
    sample: int | None = None,
    seed: int = 0,
) -> list[str]:
    """``timm.list_models()`` narrowed by a glob ``filter``, then a seeded random ``sample``, then ``limit``."""
    import timm

    names = timm.list_models()
    if filter:
        names = [n for n in names if fnmatch.fnmatchcase(n, filter)]
    if sample is not None and sample < len(names):
        # kept in the sampled (random) order, so a run cut short still covers an unbiased subset
        names = random.Random(seed).sample(names, sample)
    if limit is not None:
        names = names[:limit]
    return names


def _worker(conn: Any, kwargs: dict[str, Any], threads: int) -> None:
    torch.set_num_threads(threads)
    import warnings

    warnings.filterwarnings("ignore")
    while True:
        name = conn.recv()
        if name is None:
            return
        conn.send(check_model(name, **kwargs).to_dict())


def run_coverage(
    names: Iterable[str],
    *,
    spec: Mapping[str, Any] = COVERAGE_SPEC,
    timeout: float = 120.0,
    max_params: int | None = 250_000_000,
    threads: int = 1,
    progress: Callable[[CoverageResult], None] | None = None,
    features_only: bool = False,
) -> Iterator[CoverageResult]:
    """Run :func:`check_model` on each model in a worker subprocess; a model past ``timeout`` seconds (or one
    that kills the worker, e.g. out of memory) is recorded as a failure and the worker is restarted.

    ``features_only``: check timm's backbone form of each model (``features_only=True``) instead; those must
    also get stage sites, and architectures timm builds no feature extractor for are skipped with its reason."""
    ctx = mp.get_context("spawn")
    kwargs: dict[str, Any] = {"spec": dict(spec), "max_params": max_params}
    if features_only:
        kwargs["model_kwargs"] = {"features_only": True}
    proc = conn = None

    def start() -> tuple[Any, Any]:
        parent, child = ctx.Pipe()
        p = ctx.Process(target=_worker, args=(child, kwargs, threads), daemon=True)
        p.start()
        child.close()
        return p, parent

    try:
        for name in names:
            if proc is None or not proc.is_alive():
                proc, conn = start()
            t0 = time.perf_counter()
            conn.send(name)
            try:
                ready = conn.poll(timeout)
                res = CoverageResult(**conn.recv()) if ready else None
            except (EOFError, ConnectionError, OSError):
                res = CoverageResult(name, False, "crash", f"worker died (exit code {proc.exitcode})")
                proc.join(1)
                proc = None
            if res is None:
                res = CoverageResult(name, False, "timeout", f"no result within {timeout:.0f} s")
                proc.kill()
                proc.join(5)
                proc = None
            if res.input_size is not None:
                res.input_size = tuple(res.input_size)
            if res.stage in ("timeout", "crash"):
                res.seconds = round(time.perf_counter() - t0, 3)
            if progress is not None:
                progress(res)
            yield res
    finally:
        if proc is not None and proc.is_alive():
            try:
                conn.send(None)
                proc.join(5)
            except Exception:
                pass
            if proc.is_alive():
                proc.kill()
