"""`mlm-dist train`: pretrain from a YAML run config and dotted overrides, alone or as one rank
of deepspeed, torchrun or srun."""

from __future__ import annotations

import argparse

from mlm_dist.config import load_config


def add_arguments(tr: argparse.ArgumentParser) -> None:
    tr.add_argument("--config", required=True, help="YAML run config")
    tr.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=1e-4")
    tr.set_defaults(func=train)


def train(args) -> None:
    cfg = load_config(args.config, args.overrides)  # fails before any process group exists
    # Here, not at the top: the loop imports torch and DeepSpeed, which `train --help` and a
    # mistyped option should not wait for.
    from mlm_dist.training import loop

    loop.train(cfg)
