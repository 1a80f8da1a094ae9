"""Run by test_engine under the deepspeed launcher (2 ranks): for each ZeRO stage, train two
micro-batches of one optimizer step with the run config built from argv, and report from rank 0
the dtype the gradients are accumulated in, the dtype they are reduced in and the weights'."""

import json
import sys

import torch

from launch import leave_probe


def main() -> None:
    from deepspeed.utils import safe_get_full_grad

    from mlm_dist.config import load_config, validate_topology
    from mlm_dist.engine import build_engine, init_distributed
    from mlm_dist.model import BertForPretraining, pretraining_loss
    from mlm_dist.precision import precision_for

    out, *overrides = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    topo, found = None, {}
    for stage in (0, 1, 2, 3):  # one launch for all four: each engine is built anew
        cfg = load_config(None, ["data.shards=unused", "model.vocab_size=64",
                                 "model.hidden_size=32", "model.num_layers=1", "model.num_heads=2",
                                 "model.intermediate_size=64", "model.max_positions=16",
                                 "schedule.phases=[{seq_len: 16, micro_batch: 2, global_batch: 8}]",
                                 f"train.zero_stage={stage}", *overrides])
        topo = topo or init_distributed()
        torch.manual_seed(0)
        engine = build_engine(BertForPretraining(cfg.model), cfg, topo,
                              validate_topology(cfg, topo.world_size), precision_for(cfg.train))
        ids = torch.randint(5, 64, (2, 16), generator=torch.Generator().manual_seed(topo.rank))
        positions = torch.arange(1, 4).expand(2, 3)
        for micro in range(2):
            engine.set_gradient_accumulation_boundary(micro == 1)
            mlm, nsp = engine(ids, torch.zeros_like(ids), torch.ones_like(ids), positions)
            loss = pretraining_loss(mlm, ids[:, 1:4], nsp, torch.zeros(2, dtype=torch.long))["loss"]
            engine.backward(loss)
            if micro == 1:
                grads = [safe_get_full_grad(p) for p in engine.module.parameters()]
            engine.step()
        found[stage] = {"grads": sorted({str(g.dtype) for g in grads if g is not None}),
                        "reduce": str(engine.communication_data_type),
                        "weights": sorted({str(p.dtype) for p in engine.module.parameters()})}
    if topo.rank == 0:
        with open(out, "w") as f:
            json.dump(found, f)
    leave_probe()


if __name__ == "__main__":
    main()
