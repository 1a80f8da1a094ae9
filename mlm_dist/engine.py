"""The only module that imports DeepSpeed: process group, DeepSpeed JSON, engine, consolidation.

Rank and world size are read from the environment here and nowhere else, so the same command
runs alone, under `deepspeed`, `torchrun` or `srun`.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

# DeepSpeed picks its accelerator at import time; say which one instead of letting it guess.
os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")

# DeepSpeed's ZeRO calls torch collectives that torch has since renamed; the warning is theirs.
warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")

import deepspeed  # noqa: E402
from torch.distributed.elastic.utils.distributed import get_free_port  # noqa: E402
from deepspeed.accelerator import get_accelerator  # noqa: E402
from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint  # noqa: E402

from mlm_dist.config import ConfigError, RunConfig, SequencePhase, validate_topology  # noqa: E402
from mlm_dist.model import parameter_groups  # noqa: E402
from mlm_dist.optim import optimizer_and_schedule  # noqa: E402


@dataclass
class Topology:
    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    device: torch.device


def environment_ranks() -> tuple[int, int, int, int]:
    """(rank, local_rank, world_size, local_world_size) from torchrun/deepspeed or Slurm."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        world = int(env["WORLD_SIZE"])
        return (int(env["RANK"]), int(env.get("LOCAL_RANK", 0)), world,
                int(env.get("LOCAL_WORLD_SIZE", env.get("LOCAL_SIZE", world))))
    if "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        # srun starts one task per rank; Slurm numbers them, torch expects RANK & co.
        return (int(env["SLURM_PROCID"]), int(env["SLURM_LOCALID"]), int(env["SLURM_NTASKS"]),
                int(env.get("SLURM_NTASKS_PER_NODE", env["SLURM_NTASKS"]).split("(")[0]))
    return 0, 0, 1, 1


def init_distributed() -> Topology:
    rank, local_rank, world, local_world = environment_ranks()
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(local_rank), WORLD_SIZE=str(world))
    if world == 1:
        # Alone: a private rendezvous so concurrent single-process runs never collide.
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(get_free_port()))
    accelerator = get_accelerator()
    if accelerator.device_name() == "cpu":
        # Ranks on one host share its cores; without this each rank spawns a thread per core.
        # The cores this process may use (Slurm and taskset bind them), not the machine's.
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // local_world))
        device = torch.device("cpu")
    else:
        accelerator.set_device(local_rank)
        device = torch.device(accelerator.device_name(local_rank))
    deepspeed.init_distributed(dist_backend=accelerator.communication_backend_name(),
                               verbose=False)
    return Topology(rank, local_rank, world, local_world, device)


def check_precision(cfg: RunConfig) -> None:
    accelerator = get_accelerator()
    name = accelerator.device_name()
    if cfg.train.precision == "fp16" and not accelerator.is_fp16_supported():
        raise ConfigError(f"train.precision: fp16 is not supported on {name}; use bf16 or fp32")
    if cfg.train.precision == "bf16" and not accelerator.is_bf16_supported():
        raise ConfigError(f"train.precision: bf16 is not supported on {name}; use fp16 or fp32")


def autocast_bf16(cfg: RunConfig) -> bool:
    """bf16 with fp32 gradients: fp32 weights (which are the master weights), the forward under
    torch.autocast, so gradients are accumulated over micro-batches and reduced across ranks in
    fp32, as Megatron and NVIDIA's BERT do. DeepSpeed's own bf16 mode keeps bf16 weights and
    accumulates and all-reduces their gradients in bf16 (8 bits of mantissa: small contributions
    of later micro-batches round away); its fp32 `grad_accum_dtype` exists only for ZeRO 1.
    fp32 weights take the place of the fp32 master copy, so only ZeRO 1 and 2 (which keep
    unpartitioned weights) hold more bytes; `mlm-dist bench memory` measures how many."""
    return cfg.train.precision == "bf16" and cfg.train.grad_accum_dtype == "fp32"


def deepspeed_config(cfg: RunConfig, world_size: int, load_universal: bool = False) -> dict:
    """The DeepSpeed JSON, generated from our config, `deepspeed:` extras merged.
    Batch settings are the first phase's; `set_phase` moves the engine to later ones.
    `load_universal`: checkpoints are loaded from DeepSpeed's universal (topology-free) form."""
    t, first = cfg.train, cfg.schedule.phases[0]
    grad_accum = validate_topology(cfg, world_size)[0]
    ds = {
        "train_batch_size": first.global_batch,
        "train_micro_batch_size_per_gpu": first.micro_batch,
        "gradient_accumulation_steps": grad_accum,
        "gradient_clipping": t.grad_clip,
        "zero_optimization": {"stage": t.zero_stage},
        # Our AdamW is plain torch; ZeRO would otherwise refuse it as "untested".
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,  # we log ourselves
        "wall_clock_breakdown": False,
    }
    if load_universal:
        ds["checkpoint"] = {"load_universal": True}
    if autocast_bf16(cfg):
        # No lower-precision modules: every gradient is reduced in its own dtype, fp32.
        ds["torch_autocast"] = {"enabled": True, "dtype": "bfloat16",
                                "lower_precision_safe_modules": []}
    elif t.precision == "bf16":
        ds["bf16"] = {"enabled": True}
    elif t.precision == "fp16":
        ds["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16,
                      "loss_scale_window": 1000, "hysteresis": 2, "min_loss_scale": 1}
    # `deepspeed:` extras (config.validate has refused the keys derived above)
    for key, value in cfg.deepspeed.items():
        if key == "zero_optimization":
            ds["zero_optimization"].update(value)
        else:
            ds[key] = value
    return ds


def set_phase(engine, phase: SequencePhase) -> None:
    """Point the engine's batch settings at a phase: micro batch, then global batch (which
    DeepSpeed turns into gradient accumulation steps)."""
    engine.set_train_micro_batch_size(phase.micro_batch)
    engine.set_train_batch_size(phase.global_batch)


def build_engine(model: torch.nn.Module, cfg: RunConfig, topo: Topology,
                 load_universal: bool = False):
    optimizer, scheduler = optimizer_and_schedule(model, cfg, topo.device)
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler,
        config=deepspeed_config(cfg, topo.world_size, load_universal))
    if cfg.train.compile:
        engine.compile()
    return engine


def to_universal(tag_dir: Path) -> Path:
    """DeepSpeed's universal checkpoint of `tag_dir` (parameters and optimizer state per
    parameter, independent of the number of ranks), made once next to it. Rank 0 only."""
    out = tag_dir.parent / "universal" / tag_dir.name
    if not (out / "mp_rank_00_model_states.pt").is_file():
        from deepspeed.checkpoint import ds_to_universal

        # Our checkpoints lack the Megatron-specific layout hints DeepSpeed asks for; with
        # inject_missing_state it derives them from the parameter shapes themselves.
        args = argparse.Namespace(input_folder=str(tag_dir), output_folder=str(out),
                                  num_extract_workers=1, num_merge_workers=1,
                                  keep_temp_folder=False, strict=True,
                                  inject_missing_state=True)
        with contextlib.redirect_stdout(sys.stderr):
            ds_to_universal.main(args)
    return out


def consolidated_state_dict(checkpoint_dir: str, tag: str,
                            model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """One fp32 state dict (our parameter names) from a DeepSpeed checkpoint of `model`."""
    tag_dir = Path(checkpoint_dir) / tag
    if (tag_dir / "mp_rank_00_model_states.pt").is_file() and not list(
            tag_dir.glob("*zero_pp_rank_*optim_states.pt")):
        return _unpartitioned_state_dict(tag_dir / "mp_rank_00_model_states.pt", model)
    # DeepSpeed narrates the consolidation on stdout; keep stdout for our own output.
    with contextlib.redirect_stdout(sys.stderr):
        return get_fp32_state_dict_from_zero_checkpoint(checkpoint_dir, tag=tag)


def _unpartitioned_state_dict(path: Path, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """ZeRO stage 0: the module holds the training-precision weights; under bf16/fp16 the
    optimizer wrapper keeps the fp32 master copies, group by group in the order of our
    parameter_groups(), and those are the weights to export."""
    states = torch.load(path, map_location="cpu", weights_only=False)
    state = {k: v.float() for k, v in states["module"].items()}
    optimizer = states.get("optimizer")
    masters = optimizer.get("fp32_groups") if isinstance(optimizer, dict) else None
    if masters:
        names = {id(p): n for n, p in model.named_parameters()}
        groups = [g["params"] for g in parameter_groups(model, 0.0)]
        for params, fp32 in zip(groups, masters, strict=True):
            for p, master in zip(params, fp32, strict=True):
                state[names[id(p)]] = master.float().view(p.shape)
    return state
