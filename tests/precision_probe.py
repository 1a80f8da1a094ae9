"""Run by test_device in one process: real CPU engines, and the precision check after
deepspeed.initialize. Writes JSON to argv[1]: for each precision setting, what the engine runs
and whether build_engine accepted it; and the check's verdict on an engine whose DeepSpeed JSON
lost its torch_autocast section (what a DeepSpeed older than 0.17.2 makes of it)."""

import json
import sys

import torch

from launch import leave_probe


def tiny_config(*overrides):
    from mlm_dist.config import load_config

    return load_config(None, ["data.shards=unused", "model.vocab_size=64", "model.hidden_size=32",
                              "model.num_layers=1", "model.num_heads=2",
                              "model.intermediate_size=64", "model.max_positions=16",
                              "schedule.phases=[{seq_len: 16, micro_batch: 2, global_batch: 2}]",
                              "train.zero_stage=0", *overrides])


def main() -> None:
    import deepspeed

    from mlm_dist.config import ConfigError, validate_topology
    from mlm_dist.engine import (build_engine, check_engine_precision, deepspeed_config,
                                 engine_precision, init_distributed)
    from mlm_dist.model import BertForPretraining
    from mlm_dist.optim import optimizer_and_schedule
    from mlm_dist.precision import precision_for

    topo = init_distributed()
    found = {}
    for name, overrides in {"bf16": ["train.precision=bf16"],
                            "bf16 mode": ["train.precision=bf16", "train.grad_accum_dtype=bf16"],
                            "fp32": ["train.precision=fp32"]}.items():
        cfg = tiny_config(*overrides)
        engine = build_engine(BertForPretraining(cfg.model), cfg, topo,
                              validate_topology(cfg, topo.world_size), precision_for(cfg.train))
        found[name] = str(engine_precision(engine))

    cfg = tiny_config("train.precision=bf16")
    model = BertForPretraining(cfg.model)
    wanted = precision_for(cfg.train)
    optimizer, scheduler = optimizer_and_schedule(model, cfg, topo.device, wanted)
    ds = deepspeed_config(cfg, validate_topology(cfg, topo.world_size), wanted)
    del ds["torch_autocast"]
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer,
                                           lr_scheduler=scheduler, config=ds)
    running = engine_precision(engine)
    assert next(engine.module.parameters()).dtype == torch.float32  # it would train in fp32
    try:
        check_engine_precision(cfg, wanted, running, deepspeed.__version__)
        found["without torch_autocast"] = "accepted"
    except ConfigError as e:
        found["without torch_autocast"] = str(e)
    with open(sys.argv[1], "w") as f:
        json.dump(found, f)
    leave_probe()  # four engines in one process: their teardown aborted it once in a CI run


if __name__ == "__main__":
    main()
