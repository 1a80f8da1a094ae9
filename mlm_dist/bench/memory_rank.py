"""One rank of `mlm-dist bench memory`: build the engine at a ZeRO stage, train a few steps on a
synthetic batch, and write what this rank holds to <out>/rank<R>.json.

Started by the deepspeed launcher (`--module mlm_dist.bench.memory_rank`), one process per rank.

What is counted: every tensor reachable from the model (parameters, their .grad, ZeRO-3's
partitions) and from the DeepSpeed optimizer wrapper (fp32 master copies, flat buffers,
gradient partitions, communication buckets) and the base optimizer's state, each storage once.
Storages are sorted into:

  params     the module's training-precision parameters as this rank holds them (under ZeRO-3
             its partition; flat buffers that the parameters view count here, once)
  grads      gradients held between backward and step (.grad of parameters and of the fp32
             masters, ZeRO's gradient partitions)
  optimizer  the base optimizer's parameters (fp32 masters under bf16/fp16) and its state
             (Adam/LAMB moments)
  buffers    anything else the wrapper keeps (reduction buckets, scratch)

They are taken in the last step between its two micro-batches (gradient accumulation 2), when
the first micro-batch's gradients are held (optimizer states exist from the steps before);
`after_step` is the same count after the optimizer step. Peak RSS is the process's, at the end. Peak RSS includes the Python
runtime, the libraries and activations, hence also the RSS before the model was built.

  activations  what the forward of that first micro-batch keeps for backward: every tensor
               autograd saves (SavedTensorBytes), each storage once, parameters not counted,
               next to memory.activation_prediction for this device, precision and batch (not
               with checkpoint_activations, whose layers keep only their inputs)
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import resource
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from mlm_dist.bench.memory import activation_prediction
from mlm_dist.bench.train import bench_config, phase_for
from mlm_dist.bench.workload import as_batch, synthetic_batch, synthetic_vocabulary
from mlm_dist.config import ScheduleConfig, validate_topology
from mlm_dist.engine import build_engine, check_precision, init_distributed
from mlm_dist.masking import TokenMasker
from mlm_dist.model import num_parameters
from mlm_dist.objectives import objective_for
from mlm_dist.precision import Precision, precision_for
from mlm_dist.training.step import train_step

ZERO_SETTINGS_NOTE = ("reduce/allgather/prefetch buckets and max live parameters set to Ψ/16 "
                      "elements, stage3_param_persistence_threshold=0 (every parameter "
                      "partitioned), so buffers stay small next to the partitioned states")


ACCUMULATION = 2


def _rss_now() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _storage(t: torch.Tensor):
    s = t.untyped_storage()
    return s.data_ptr(), s.nbytes()


def _walk(obj, found: list, path: str, seen: set, depth: int = 0) -> None:
    """Tensors reachable from obj through attributes, lists, tuples and dicts (with paths)."""
    if depth > 6 or id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        found.append((path, obj))
        if obj.grad is not None:
            found.append((path + ".grad", obj.grad))
        ds_tensor = getattr(obj, "ds_tensor", None)
        if isinstance(ds_tensor, torch.Tensor):
            found.append((path + ".ds_tensor", ds_tensor))
        return
    if isinstance(obj, dict):
        for k, v in list(obj.items()):
            _walk(v, found, f"{path}[{k!r}]" if not isinstance(k, torch.Tensor) else path + "[t]",
                  seen, depth + 1)
    elif isinstance(obj, (list, tuple, set)):
        for i, v in enumerate(obj):
            _walk(v, found, f"{path}[{i}]", seen, depth + 1)
    elif hasattr(obj, "__dict__") and not isinstance(obj, (torch.nn.Module, type)) and \
            type(obj).__module__.split(".")[0] in ("deepspeed", "torch", "mlm_dist"):
        for k, v in list(vars(obj).items()):
            _walk(v, found, f"{path}.{k}", seen, depth + 1)


class SavedTensorBytes:
    """While active: the bytes of the tensors autograd saves for backward, each storage once.
    Parameters (and views of them, as Linear's transposed weight) are not counted: they are
    held anyway; autocast's 16-bit copies of them are, as they live until backward."""

    def __init__(self):
        self.storages: dict[int, int] = {}

    def __enter__(self) -> "SavedTensorBytes":
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        if not isinstance(t if t._base is None else t._base, torch.nn.Parameter):
            ptr, nbytes = _storage(t)
            self.storages.setdefault(ptr, nbytes)
        return t

    @property
    def total(self) -> int:
        return sum(self.storages.values())


class _CountingForward:
    """The engine as train_step uses it, counting what the next forward saves for backward."""

    def __init__(self, engine):
        self.engine, self.count_next, self.saved = engine, False, None

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def __call__(self, *inputs):
        if not self.count_next:
            return self.engine(*inputs)
        self.count_next = False
        with SavedTensorBytes() as saved:
            out = self.engine(*inputs)
        self.saved = saved.total
        return out


def precision_mode(precision: Precision) -> str:
    """memory.activation_prediction's precision for a run's Precision."""
    if precision.autocast is not None:
        return "autocast"
    return "fp32" if precision.fp32_weights else "low"


def held_bytes(engine) -> dict:
    """Bytes this rank holds, by category (see the module docstring); each storage once."""
    module, wrapper = engine.module, engine.optimizer
    base = getattr(wrapper, "optimizer", wrapper)

    categories: dict[int, tuple[str, int]] = {}

    def claim(t: torch.Tensor, category: str) -> None:
        ptr, nbytes = _storage(t)
        if nbytes and ptr not in categories:
            categories[ptr] = (category, nbytes)

    # Order matters: a storage belongs to the first category that claims it.
    for p in module.parameters():
        ds_tensor = getattr(p, "ds_tensor", None)
        claim(ds_tensor if isinstance(ds_tensor, torch.Tensor) else p.data, "params")
    for group in base.param_groups:
        for p in group["params"]:
            if p.grad is not None:
                claim(p.grad, "grads")
            claim(p.data, "optimizer")
    for state in base.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor):
                claim(value, "optimizer")
    for p in module.parameters():
        if p.grad is not None:
            claim(p.grad, "grads")
    found: list = []
    _walk(wrapper, found, "optimizer", set())
    for path, t in found:
        name = path.lower()
        before = len(categories)
        if "grad" in name:
            category = "grads"
        elif "fp32" in name:  # master copies kept outside the base optimizer between steps
            category = "optimizer"
        else:
            category = "buffers"
        claim(t, category)
        if os.environ.get("MLM_DIST_BENCH_MEMORY_DEBUG") and len(categories) > before:
            print(f"{categories[_storage(t)[0]]} {path} {tuple(t.shape)} {t.dtype}", file=sys.stderr)
    totals = {"params": 0, "grads": 0, "optimizer": 0, "buffers": 0}
    for category, nbytes in categories.values():
        totals[category] += nbytes
    totals["total"] = totals["params"] + totals["grads"] + totals["optimizer"]
    return totals


def main(argv: list[str] | None = None) -> None:
    argv = [a for a in (sys.argv[1:] if argv is None else argv) if not a.startswith("--local_rank")]
    p = argparse.ArgumentParser(prog="python -m mlm_dist.bench.memory_rank")
    p.add_argument("--config")
    p.add_argument("--stage", type=int, required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--seq-len", type=int)
    p.add_argument("--micro-batch", type=int)
    p.add_argument("--vocab-size", type=int, default=0)
    p.add_argument("--checkpoint-activations", action="store_true")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)

    baseline_rss = _rss_now()  # interpreter + torch + deepspeed, before any model exists
    cfg = bench_config(args.config, args.overrides, args.vocab_size)
    phase = phase_for(cfg, args.seq_len, args.micro_batch, None)
    check_precision(cfg)  # before the process group: a user's mistake is one clear line
    topo = init_distributed()
    world = topo.world_size
    steps = max(1, args.steps)
    # Two micro-batches per step: the figures are taken between them, while the gradients of
    # the first are held for accumulation (the state the ZeRO formulas describe).
    phase = dataclasses.replace(phase, global_batch=phase.micro_batch * world * ACCUMULATION,
                                until_step=steps, warmup_steps=0)
    torch.manual_seed(cfg.train.seed)
    objective = objective_for(cfg)
    model = objective.build_model(cfg.model,
                                  checkpoint_activations=args.checkpoint_activations or None)
    psi = num_parameters(model)
    bucket = max(10_240, psi // 16) // 1024 * 1024  # a multiple of the NCCL alignment
    zero = {"reduce_bucket_size": bucket, "allgather_bucket_size": bucket}
    if args.stage == 3:
        zero.update(stage3_prefetch_bucket_size=bucket, stage3_max_live_parameters=bucket,
                    stage3_param_persistence_threshold=0)
    extra = dict(cfg.deepspeed)
    extra["zero_optimization"] = {**zero, **extra.get("zero_optimization", {})}
    cfg = dataclasses.replace(
        cfg, train=dataclasses.replace(cfg.train, zero_stage=args.stage),
        schedule=ScheduleConfig(phases=[phase]),
        optim=dataclasses.replace(cfg.optim, warmup_steps=0), deepspeed=extra)
    precision = precision_for(cfg.train)
    engine = build_engine(model, cfg, topo, validate_topology(cfg, world), precision)
    device = engine.device

    rows = synthetic_batch(cfg.model.vocab_size, phase.micro_batch, phase.seq_len,
                           seed=topo.rank)
    batch = as_batch(rows, device)
    batches = itertools.repeat(batch)
    masker = TokenMasker(synthetic_vocabulary(cfg.model.vocab_size), cfg.masking,
                         max_predictions=phase.max_predictions, seed=cfg.train.seed,
                         rank=topo.rank, device=device)
    held, last = {}, {}

    def measure(step: int, micro: int) -> None:
        if step == steps - 1 and micro == 0:
            held.update(held_bytes(engine))

    engine.train()
    counting = _CountingForward(engine)
    for step in range(steps):
        counting.count_next = step == steps - 1
        train_step(counting, batches, masker, objective, step=step, accumulation=ACCUMULATION,
                   record=lambda losses, batch, masked: last.update(losses),
                   after_backward=lambda micro: measure(step, micro))
    after_step = held_bytes(engine)
    activations = {"measured": counting.saved, "predicted": None}
    if not model.checkpoint_activations:
        activations["predicted"] = activation_prediction(
            cfg.model, phase.micro_batch, phase.seq_len, phase.max_predictions,
            precision=precision_mode(precision), device_type=device.type, padded=batch.padded,
            zero3_linear=args.stage == 3 and extra["zero_optimization"].get(
                "memory_efficient_linear", True))
    record = {"rank": topo.rank, "stage": args.stage, "world_size": world, "parameters": psi,
              **held, "after_step": after_step, "peak_rss": _peak_rss(),
              "baseline_rss": baseline_rss, "activations": activations,
              "seq_len": phase.seq_len,
              "micro_batch": phase.micro_batch, "precision": cfg.train.precision,
              "checkpoint_activations": model.checkpoint_activations,
              "optimizer_class": type(engine.optimizer).__name__,
              "loss": float(last["loss"])}
    out = Path(args.out)
    tmp = out / f".rank{topo.rank}.json.tmp"
    tmp.write_text(json.dumps(record))
    tmp.replace(out / f"rank{topo.rank}.json")
    dist.barrier()


if __name__ == "__main__":
    main()
