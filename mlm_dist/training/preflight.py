"""Every check a user can fail, before any process group, worker or job starts.

`mlm-dist train` runs `preflight` first on every rank; the launchers (`mlm-dist slurm`, the
multi-node deepspeed launcher) run it on the host they start from, for the world size they are
about to start, so a mistake costs seconds instead of a queue wait. One place per concern:

    the config itself       config.load_config: types, ranges, combinations, `deepspeed:` extras
    batch arithmetic        config.validate_topology, for a world size (its accumulation
                            goes to the engine: derived once)
    the run directory       check_run_dir: never train over another run's checkpoints
    the data                resolve_data: shards and their tokenizer (data.source, found
                            once: the loader reads what it found), model.init_from's tokenizer
    the device              engine.check_precision, on the ranks' hosts only
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from mlm_dist.config import ConfigError, RunConfig, load_config, validate_topology
from mlm_dist.data.source import ShardSource, resolve_shards
from mlm_dist.errors import PathExistsError
from mlm_dist.precision import Precision, precision_for
from mlm_dist.tokenizer import Tokenizer
from mlm_dist.training.checkpoint import CHECKPOINTS, RUN_CONFIG, latest_complete


@dataclass(frozen=True)
class Preflight:
    """What the checks found, handed on so that nothing is looked up or derived again."""
    cfg: RunConfig  # model.vocab_size and the data paths resolved
    data: ShardSource | None  # None when the launching host cannot see the data
    accumulation: list[int]  # gradient accumulation steps of each phase
    precision: Precision  # how the engine computes (optimizer, DeepSpeed JSON, engine check)


def preflight(cfg: RunConfig, world_size: int, *, on_ranks: bool = True) -> Preflight:
    """All the checks for a run of `world_size` ranks. `on_ranks=False` (a launcher): the data
    is checked if this host sees it, the device is left to the ranks' hosts."""
    accumulation = validate_topology(cfg, world_size)
    check_run_dir(cfg)
    cfg, data = resolve_data(cfg, required=on_ranks)
    precision = precision_for(cfg.train)
    if on_ranks:
        from mlm_dist.engine import check_precision  # imports DeepSpeed: the ranks have it

        check_precision(cfg)
    return Preflight(cfg, data, accumulation, precision)


def launch_preflight(config: str | Path, overrides: list[str], world_size: int) -> RunConfig:
    """What a launcher checks on the host it starts from, before any node or job starts: the
    config file with its overrides, then `preflight` for that many ranks, less the device."""
    return preflight(load_config(config, list(overrides)), world_size, on_ranks=False).cfg


def check_run_dir(cfg: RunConfig) -> None:
    newest = latest_complete(Path(cfg.out_dir) / CHECKPOINTS)
    if newest and not cfg.checkpoint.resume:
        # Never train over an existing run: its checkpoints would be mixed with ours.
        raise PathExistsError(f"out_dir: {cfg.out_dir} already holds checkpoints; pass "
                              "checkpoint.resume=true to continue it, or choose another out_dir")
    if newest and (newest / RUN_CONFIG).is_file():  # without it, restoring says what is wrong
        # Another objective's network has other heads: the checkpoint would not load.
        saved = load_config(newest / RUN_CONFIG).objective.name
        if saved != cfg.objective.name:
            raise ConfigError(f"objective.name: {cfg.out_dir} was trained with {saved}, this run "
                              f"asks for {cfg.objective.name}; resume with objective.name={saved}"
                              ", or start another out_dir from it with model.init_from (after "
                              "`mlm-dist export-hf`)")


def resolve_data(cfg: RunConfig, required: bool = True) -> tuple[RunConfig, ShardSource | None]:
    """Find the shards and their tokenizer (data.source), check model.init_from's tokenizer
    against it, and fill in model.vocab_size and absolute data paths. `required=False` (a
    launching host): (cfg, None) when this host does not see the shards' directory."""
    data = resolve_shards(cfg.data, required)
    if data is None:
        return cfg, None
    tokenizer = data.tokenizer
    model_cfg = cfg.model
    if model_cfg.init_from:
        from mlm_dist.interop.init_from import pretrained_model_config

        model_cfg = pretrained_model_config(model_cfg.init_from, model_cfg)
        if Tokenizer.load(model_cfg.init_from).sha256 != tokenizer.sha256:
            raise ConfigError(
                f"model.init_from: the shards in {cfg.data.shards} were not made with "
                f"{model_cfg.init_from}'s tokenizer; re-run `mlm-dist prepare --tokenizer "
                f"{model_cfg.init_from} …` so token ids mean what the model learned")
    vocab = model_cfg.vocab_size or tokenizer.vocab_size
    if vocab != tokenizer.vocab_size:
        raise ConfigError(f"model.vocab_size: {vocab} does not match the tokenizer's "
                          f"{tokenizer.vocab_size}; leave it 0 to take it from the tokenizer")
    cfg = dataclasses.replace(
        cfg, model=dataclasses.replace(model_cfg, vocab_size=vocab),
        data=dataclasses.replace(cfg.data, tokenizer=str(Path(tokenizer.path).parent.resolve()),
                                 shards=data.location))
    return cfg, data
