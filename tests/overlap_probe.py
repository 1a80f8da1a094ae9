"""Run by test_step_syncs under the deepspeed launcher (2 ranks): at ZeRO 1, 2 and 3, train three
optimizer steps of two micro-batches twice from the same weights and data, once with the
gradient reduction of the generated DeepSpeed JSON (overlapped with backward, here in buckets
small enough to make many of them) and once with DeepSpeed's own defaults (no overlap, one
bucket); rank 0 saves both runs' losses and final fp32 weights to OUT (torch.save)."""

import sys

import torch

from launch import leave_probe


def train(cfg, topo, stage: int) -> dict:
    from deepspeed.utils import safe_get_full_fp32_param

    from mlm_dist.config import validate_topology
    from mlm_dist.engine import build_engine
    from mlm_dist.model import BertForPretraining, pretraining_loss
    from mlm_dist.precision import precision_for

    torch.manual_seed(0)
    engine = build_engine(BertForPretraining(cfg.model), cfg, topo,
                          validate_topology(cfg, topo.world_size), precision_for(cfg.train))
    data = torch.Generator().manual_seed(topo.rank)
    positions = torch.arange(1, 4).expand(2, 3)
    losses = []
    for _ in range(3):
        for micro in range(2):
            ids = torch.randint(5, 64, (2, 16), generator=data)
            engine.set_gradient_accumulation_boundary(micro == 1)
            mlm, nsp = engine(ids, torch.zeros_like(ids), torch.ones_like(ids), positions)
            loss = pretraining_loss(mlm, ids[:, 1:4], nsp, torch.zeros(2, dtype=torch.long))["loss"]
            engine.backward(loss)
            engine.step()
            losses.append(loss.item())
    weights = [safe_get_full_fp32_param(p).clone() for p in engine.module.parameters()]
    return {"losses": losses, "weights": weights, "overlap_comm": engine.zero_overlap_comm(),
            "reduce_bucket_size": engine.zero_reduce_bucket_size()}


def main() -> None:
    from mlm_dist.config import load_config
    from mlm_dist.engine import init_distributed

    out = [a for a in sys.argv[1:] if not a.startswith("--local_rank")][0]
    reductions = {
        # ours, in buckets of 2,000 elements: the 20k-parameter model makes about ten
        "ours": ["deepspeed.zero_optimization.reduce_bucket_size=2000"],
        "deepspeed": ["deepspeed.zero_optimization.overlap_comm=false",
                      "deepspeed.zero_optimization.reduce_bucket_size=500000000"],
    }
    topo, found = None, {}
    for stage in (1, 2, 3):  # one launch for all: each engine is built anew
        for name, overrides in reductions.items():
            cfg = load_config(None, [
                "data.shards=unused", "model.vocab_size=64", "model.hidden_size=32",
                "model.num_layers=1", "model.num_heads=2", "model.intermediate_size=64",
                "model.max_positions=16", "model.dropout=0", "model.attention_dropout=0",
                "schedule.phases=[{seq_len: 16, micro_batch: 2, global_batch: 8}]",
                f"train.zero_stage={stage}", *overrides])
            topo = topo or init_distributed()
            found[(stage, name)] = train(cfg, topo, stage)
    if topo.rank == 0:
        torch.save(found, out)
    leave_probe()


if __name__ == "__main__":
    main()
