"""Training metrics: summed on the device every micro-step, reduced across ranks only at the
logging cadence (the one place the step waits for the host), written to TensorBoard by rank 0.

What is summed is named: the objective's terms (objectives/base.py) and the generic ones here;
the objective turns its sums into its metrics, this module the rest.
"""

from __future__ import annotations

import json
import math
import resource
import time
from pathlib import Path

import torch
import torch.distributed as dist

from mlm_dist.flops import device_peak_flops
from mlm_dist.model import IGNORE_INDEX

# Sums of every run beside the objective's terms (objectives/base.py names them), and the two
# each rank adds at a flush.
GENERIC_TERMS = ("loss", "predicted", "eligible", "examples", "real_tokens")
FLUSH_TERMS = ("skipped", "data_wait_frac")


def peak_memory_bytes(device: torch.device) -> float:
    """Peak memory of this rank: allocator peak on an accelerator, peak RSS on the CPU."""
    if device.type == "cuda":
        return float(torch.cuda.max_memory_allocated(device))
    return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)  # KiB on Linux


class MetricLogger:
    def __init__(self, tensorboard_dir: Path | None, cfg, topo, n_params: int, objective):
        """`objective`: the run's (objectives.Objective), whose named metrics are summed."""
        self.cfg, self.topo, self.objective = cfg, topo, objective
        self.names: list[str] = []  # of the sums, in their order on the device
        self.writer = None
        self.jsonl = None
        if tensorboard_dir is not None:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(str(tensorboard_dir))
            # The same records as plain JSON lines, for scripts and for `tail -f`.
            self.jsonl = open(tensorboard_dir.parent / "metrics.jsonl", "a")
        self.sums: torch.Tensor | None = None
        self.micro_steps = 0
        self.tokens = 0
        self.last_time = time.perf_counter()
        self.history: list[dict] = []
        self.n_params = n_params
        self.skipped_steps = 0  # optimizer steps skipped so far (DivergenceGuard counts them)
        # MFU's denominator: one device's peak for the run's dtype; on a CPU measured once here
        # with a 2048³ matmul (a fraction of a second), on a known GPU from a table.
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.train.precision,
                                                                   torch.float32)
        self.peak_flops, self.peak_source = device_peak_flops(
            topo.device, dtype, override=cfg.train.peak_flops, size=2048)

    def text(self, tag: str, value: str) -> None:
        if self.writer is not None:
            self.writer.add_text(tag, value)

    def accumulate(self, losses: dict, batch, masked) -> None:
        """One micro-batch (train_step's `record`): its losses, its Batch and MaskedBatch, whose
        `eligible` counts the tokens the masker could have chosen. Nothing waits for the device."""
        attention_mask = batch.attention_mask
        terms = {
            "loss": losses["loss"].detach().float(),
            "predicted": (masked.labels != IGNORE_INDEX).sum().float(),
            "eligible": masked.eligible.float(),
            "examples": (batch.example_label != IGNORE_INDEX).sum().float(),
            "real_tokens": attention_mask.sum().float(),  # what the examples put into the rows
            **self.objective.train_terms(losses, batch),
        }
        values = torch.stack(list(terms.values()))
        self.names = list(terms)
        self.sums = values if self.sums is None else self.sums + values
        self.micro_steps += 1
        self.tokens += attention_mask.numel()

    def log(self, step: int, record: dict) -> None:
        """Write a record of scalars (evaluation results, for one) as they are."""
        if self.writer is not None:
            for tag, value in record.items():
                self.writer.add_scalar(tag, value, step)
            self.writer.flush()
            print(f"step {step:>7} | " + " | ".join(f"{k} {v:.4g}" for k, v in record.items()),
                  flush=True)
            self.jsonl.write(json.dumps({"step": step, **record}) + "\n")
            self.jsonl.flush()

    def flush(self, step: int, *, lr: float, grad_norm, seq_len: int, data_wait: float,
              skipped: int, steps: int, flops_per_token: float) -> dict:
        """`steps`: optimizer steps since the last flush; `flops_per_token`: the model's
        training FLOPs per token at this sequence length (flops.model_flops_per_token)."""
        # `skipped` is this rank's running total of documents lost to bad data.
        now = time.perf_counter()
        elapsed = now - self.last_time
        rank_tps, rank_wait = self.tokens / elapsed, data_wait / elapsed
        sums = torch.cat([self.sums, self.sums.new_tensor([float(skipped), rank_wait])])
        # Per-rank extremes in one MAX reduction (min as -max): the slowest rank and the one
        # starved for data are what a cluster run needs to see.
        extremes = sums.new_tensor([rank_tps, -rank_tps, rank_wait,
                                    peak_memory_bytes(self.topo.device)])
        dist.all_reduce(sums)  # the cadence's host syncs: these two reductions
        dist.all_reduce(extremes, op=dist.ReduceOp.MAX)
        s = dict(zip(self.names + list(FLUSH_TERMS), sums.tolist()))
        tps_max, neg_tps_min, wait_max, memory_max = extremes.tolist()
        n = self.micro_steps * self.topo.world_size
        if grad_norm is not None and not isinstance(grad_norm, float):
            grad_norm = float(grad_norm)
        own = self.objective.train_record(s, n)
        record = {
            "step": step,
            "train/loss": s["loss"] / n,
            **own,
            "train/lr": lr,
            "train/grad_norm": grad_norm if grad_norm is not None else math.nan,
            "train/seq_len": seq_len,
            "train/skipped_steps": self.skipped_steps,
            # the effective rate: predicted tokens / tokens that could have been chosen
            "data/mask_rate": s["predicted"] / max(1.0, s["eligible"]),
            "perf/tokens_per_s": self.tokens * self.topo.world_size / elapsed,
            "perf/tokens_per_s_rank_min": -neg_tps_min,
            "perf/tokens_per_s_rank_max": tps_max,
            "perf/samples_per_s": s["examples"] / elapsed,
            "perf/real_tokens_per_s": s["real_tokens"] / elapsed,
            "perf/mfu": (self.tokens / elapsed) * flops_per_token / self.peak_flops,
            "perf/step_time_ms": 1000 * elapsed / max(1, steps),
            "perf/data_wait_frac": s["data_wait_frac"] / self.topo.world_size,
            "perf/data_wait_frac_rank_max": wait_max,
            "perf/peak_memory_gb_rank_max": memory_max / 2**30,
            "data/skipped_samples": s["skipped"],
            # real tokens / positions computed: what padding costs (perf/tokens_per_s counts both)
            "data/fill": s["real_tokens"] / max(1.0, self.tokens * self.topo.world_size),
        }
        self.history.append(record)
        if self.writer is not None:
            for tag, value in record.items():
                if tag != "step":
                    self.writer.add_scalar(tag, value, step)
            self.writer.flush()
            shown = " | ".join(f"{tag.split('/', 1)[1].replace('_', ' ')} {value:.4f}"
                               for tag, value in own.items() if tag.startswith("train/"))
            print(f"step {step:>7} | loss {record['train/loss']:.4f} | {shown} | "
                  f"lr {lr:.2e} | {record['perf/tokens_per_s']:,.0f} tok/s", flush=True)
            self.jsonl.write(json.dumps(record) + "\n")
            self.jsonl.flush()
        self.sums, self.micro_steps, self.tokens, self.last_time = None, 0, 0, now
        return record

    def close(self) -> dict:
        if self.writer is not None:
            self.writer.close()
            self.jsonl.close()
        return {"history": self.history}
