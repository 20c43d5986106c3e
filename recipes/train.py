#!/usr/bin/env python
"""Train a timm model with timm_drop regularizers from one YAML config.

    python recipes/train.py --config recipes/configs/quickstart.yaml
    python recipes/train.py --config recipes/configs/corrdrop_resnet20_cifar10.yaml data.root=/data train.epochs=30
    accelerate launch --multi_gpu --num_processes 4 recipes/train.py --config ... train.precision=bf16
    torchrun --nproc_per_node 2 recipes/train.py --config ... train.cpu=true      # 2 CPU processes (gloo)

Overrides are ``key=value`` with dotted keys (values parsed as YAML). See recipes/README.md.

Exit codes: 0 done; 2 a config, data or checkpoint problem (one ``error:`` line naming the key, file or array);
3 a non-finite training loss; 4 a file of the run could not be written (no space left on device, ...);
130 stopped by Ctrl-C. After 3, 4 and 130 the message names the last complete checkpoint to ``--resume latest`` from.
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", "-c", help="YAML config (defaults apply for missing keys)")
    ap.add_argument(
        "overrides", nargs="*", metavar="key=value", help="dotted-key overrides, e.g. train.epochs=3"
    )
    ap.add_argument(
        "--resume", metavar="latest|PATH", help="continue from this run's newest checkpoint or a folder"
    )
    ap.add_argument("--overwrite", action="store_true", help="replace an existing run in output_dir")
    ap.add_argument(
        "--dry-run", action="store_true", help="validate and build everything, run one stub batch, exit"
    )
    # flags and key=value overrides mix in any order (``... train.epochs=3 --overwrite``)
    args = ap.parse_intermixed_args(argv)

    from timm_drop.training import ConfigError, NonFiniteLossError, load_config, train
    from timm_drop.training.checkpoint import CheckpointError
    from timm_drop.training.data import DataError
    from timm_drop.training.files import WriteError

    try:
        cfg = load_config(args.config, args.overrides, check_paths=not args.dry_run)
        train(cfg, overwrite=args.overwrite, resume=args.resume, dry_run=args.dry_run)
    except (ConfigError, CheckpointError, DataError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except NonFiniteLossError as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    except WriteError as e:
        print(f"error: {e}", file=sys.stderr)
        return 4
    except KeyboardInterrupt as e:
        print(f"interrupted: {e}" if str(e) else "interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
