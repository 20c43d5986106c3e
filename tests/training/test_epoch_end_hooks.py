"""The end of every epoch is a list of named hooks the loop calls in order; a user's hook appended to it runs after
the built-in ones, with the epoch, once that epoch is evaluated, recorded, saved, checkpointed and drawn."""

from __future__ import annotations

import json
import re

from tiny import dropblock_stage_rule, tiny_run

from timm_drop.training import Trainer, epoch_end, load_config
from timm_drop.training.checkpoint import CheckpointManager

#: the built-in order, as the loop's docstring (timm_drop/training/epoch_end.py) states it
BUILT_IN = [
    "evaluate_epoch",
    "record_frozen_fraction",
    "record_regularizers",
    "record_progress",
    "append_metrics",
    "log_trackers",
    "save_epoch_weights",
    "save_epoch_checkpoint",
    "print_epoch_line",
    "draw_epoch_masks",
]


def test_the_documented_order_is_the_order_of_the_built_in_hooks():
    documented = re.findall(r"^\d+\. :func:`(\w+)`", epoch_end.__doc__, flags=re.M)
    assert documented == BUILT_IN == [h.__name__ for h in epoch_end.EPOCH_END_HOOKS]


def _cfg(out):
    raw = tiny_run(
        regularizer={"rules": [dropblock_stage_rule()]},
        layerout={"freeze_probs": "random", "seed": 1},
        log={"mask_every": 1},
    )
    raw["output_dir"] = str(out)
    return load_config(raw)


def test_built_in_epoch_end_hooks_run_in_the_documented_order_then_a_user_hook(tmp_path):
    out = tmp_path / "run"
    trainer = Trainer(_cfg(out))
    assert [h.__name__ for h in trainer.epoch_end_hooks] == BUILT_IN
    called: list[str] = []

    def recorded(hook):
        def run(t, epoch, row):
            called.append(hook.__name__)
            hook(t, epoch, row)

        run.__name__ = hook.__name__
        return run

    seen = []

    def user_hook(t, epoch, row):
        called.append("user")
        # everything the built-in hooks do for this epoch is done when the user's hook runs
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        latest = CheckpointManager(out).latest()
        seen.append(
            (
                epoch,
                row["epoch"],
                "eval_top1" in row,
                "frozen_fraction" in row,
                "reg_strength" in row,
                t.state.epoch,
                rows[-1]["epoch"],
                latest.name,
                (out / "last_model.safetensors").is_file(),
                (out / "masks" / f"epoch_{epoch + 1:03d}.png").is_file(),
            )
        )

    trainer.epoch_end_hooks[:] = [recorded(h) for h in trainer.epoch_end_hooks]
    trainer.epoch_end_hooks.append(user_hook)
    trainer.fit()
    assert called == (BUILT_IN + ["user"]) * 2
    assert seen == [
        (0, 1, True, True, True, 1, 1, "epoch_0001", True, True),
        (1, 2, True, True, True, 2, 2, "epoch_0002", True, True),
    ]
