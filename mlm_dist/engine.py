"""The only module that imports DeepSpeed: process group, DeepSpeed JSON, engine, consolidation.

Rank and world size, and the device, are read from the environment here and nowhere else, so
the same command runs alone, under `deepspeed`, `torchrun` or `srun`, whether a process sees all
of its node's GPUs or only its own. Each decision is a function of the facts it reads (the
environment, device counts, versions), so a test on a CPU can drive the GPU cases.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import sys
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch

from mlm_dist.config import ConfigError, RunConfig, SequencePhase, TrainConfig
from mlm_dist.errors import UserError


class DeviceError(UserError, RuntimeError):
    """No device to train on as asked: no usable GPU, or a GPU binding that cannot be read.
    The message names the variable or option to change."""


@dataclass(frozen=True)
class Accelerator:
    name: str  # DeepSpeed's accelerator: "cuda" or "cpu"
    reason: str  # why, as rank 0 reports it


def choose_accelerator(env: Mapping[str, str], cuda_available: bool, device_count: int, *,
                       torch_version: str = torch.__version__,
                       cuda_build: str | None = torch.version.cuda) -> Accelerator:
    """What `mlm-dist train` runs on: CUDA, or the CPU only when asked for with
    DS_ACCELERATOR=cpu (by the user, the CPU image, the demo and the tests). Anything else is an
    error: a container started without GPUs, a driver older than the wheel's CUDA or an empty
    CUDA_VISIBLE_DEVICES would otherwise train on the CPU, silently and many times slower."""
    asked = env.get("DS_ACCELERATOR", "")
    if asked == "cpu":
        return Accelerator("cpu", "CPU because DS_ACCELERATOR=cpu")
    if asked not in ("", "cuda"):
        raise DeviceError(f"DS_ACCELERATOR={asked}: mlm-dist trains on CUDA GPUs, or on CPU ranks "
                          "when asked for with DS_ACCELERATOR=cpu; unset it or set cuda or cpu")
    if cuda_available and device_count > 0:
        return Accelerator("cuda", f"{device_count} CUDA device{'s' * (device_count > 1)} "
                                   "visible to this process")
    if cuda_build is None:
        why = f"this torch ({torch_version}) is built without CUDA; install a CUDA build of torch"
    elif env.get("CUDA_VISIBLE_DEVICES") in ("", "-1"):
        why = (f"CUDA_VISIBLE_DEVICES={env['CUDA_VISIBLE_DEVICES']!r} hides every GPU; unset it "
               "or name the GPUs")
    else:
        why = (f"torch {torch_version} (CUDA {cuda_build}) sees no GPU: give the job or container "
               "its GPUs (docker run --gpus all, sbatch --gpus-per-node) and check with "
               f"nvidia-smi that the driver supports CUDA {cuda_build}")
    raise DeviceError(f"no usable CUDA GPU: {why}. To train on CPU ranks on purpose, set "
                      "DS_ACCELERATOR=cpu")


def deepspeed_accelerator(env: Mapping[str, str], cuda_available: bool, device_count: int) -> str:
    """The accelerator DeepSpeed is told to use when this module is imported: DS_ACCELERATOR if
    set, else cuda when a GPU is usable, else cpu. Never an error: the commands that only read
    checkpoints (export-hf, fill-mask, eval, consolidate) run on a laptop; `mlm-dist train`
    checks with choose_accelerator before any process group."""
    return env.get("DS_ACCELERATOR") or ("cuda" if cuda_available and device_count > 0
                                         else "cpu")


@contextlib.contextmanager
def _telling_deepspeed(accelerator: str) -> Iterator[None]:
    """DS_ACCELERATOR=`accelerator` while DeepSpeed picks its accelerator (once, when it is
    imported; it keeps that choice), then the environment as it was. DeepSpeed would otherwise
    guess, logging a warning on stdout, and a choice left in the environment would travel: the
    multi-node launcher forwards DS_ACCELERATOR to every node, so a login node without GPUs
    would send the GPU nodes to the CPU."""
    before = os.environ.get("DS_ACCELERATOR")
    if before:
        yield
        return
    os.environ["DS_ACCELERATOR"] = accelerator
    try:
        yield
    finally:
        if before is None:
            del os.environ["DS_ACCELERATOR"]
        else:
            os.environ["DS_ACCELERATOR"] = before


# DeepSpeed's ZeRO calls torch collectives that torch has since renamed; the warning is theirs.
warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")

with _telling_deepspeed(deepspeed_accelerator(os.environ, torch.cuda.is_available(),
                                              torch.cuda.device_count())):
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    get_accelerator()  # chosen now, while DS_ACCELERATOR says which

from torch.distributed.elastic.utils.distributed import get_free_port  # noqa: E402
from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint  # noqa: E402

from mlm_dist.model import parameter_groups  # noqa: E402
from mlm_dist.optim import optimizer_and_schedule  # noqa: E402
from mlm_dist.precision import Precision  # noqa: E402

DEEPSPEED_VERSION = deepspeed.__version__


def accelerator():
    """DeepSpeed's accelerator: the object its engine synchronizes the device through (the
    benches count those calls without importing DeepSpeed themselves)."""
    return get_accelerator()


# The first DeepSpeed with the `torch_autocast` section (bf16 autocast, fp32 gradients); an older
# one ignores the section and trains in fp32.
TORCH_AUTOCAST_SINCE = "0.17.2"


@dataclass
class Topology:
    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    device: torch.device
    accelerator_reason: str = ""  # why this device: Accelerator.reason


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


def device_index(local_rank: int, local_world_size: int, visible_devices: int,
                 env: Mapping[str, str]) -> int:
    """This rank's CUDA device among the `visible_devices` its process sees. Under `deepspeed`,
    `torchrun` or a plain `srun`, every process of a node sees all of its GPUs: the local rank's.
    Under `srun --gpus-per-task=1`, `--gpu-bind` or a site's default binding, Slurm shows each
    task only its own GPU (CUDA_VISIBLE_DEVICES names one), which is device 0 of the process."""
    if visible_devices >= local_world_size:
        return local_rank
    if visible_devices == 1:
        return 0
    shown = env.get("CUDA_VISIBLE_DEVICES")
    raise DeviceError(
        f"local rank {local_rank} of {local_world_size} on this node sees {visible_devices} GPUs"
        + (f" (CUDA_VISIBLE_DEVICES={shown})" if shown is not None else "")
        + ", and nothing says which one is its own: let every task see all of its node's GPUs "
        "(the default of `mlm-dist slurm`; srun --gpu-bind=none) or only its own (`mlm-dist "
        "slurm --bind-gpus`; srun --gpus-per-task=1)")


def cpu_threads(usable_cpus: int, local_world_size: int, env: Mapping[str, str]) -> int:
    """Intra-op threads of a CPU rank. Ranks on one host share the cores this process may use
    (Slurm and taskset bind them, so not the machine's): a share each, or each rank would start
    a thread per core. A Slurm task bound to its own CPUs (--cpus-per-task with a binding task
    plugin: it may use no more than those) keeps them all."""
    own = env.get("SLURM_CPUS_PER_TASK", "")
    if own.isdigit() and 0 < usable_cpus <= int(own):
        return usable_cpus
    return max(1, usable_cpus // local_world_size)


def init_distributed(collective_timeout_minutes: float =
                     TrainConfig.collective_timeout_minutes) -> Topology:
    """The process group, this rank's device, and its place among the ranks.
    `collective_timeout_minutes`: how long a collective waits for a rank that makes no progress
    before this rank fails (train.collective_timeout_minutes)."""
    rank, local_rank, world, local_world = environment_ranks()
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(local_rank), WORLD_SIZE=str(world))
    if world == 1:
        # Alone: a private rendezvous so concurrent single-process runs never collide.
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(get_free_port()))
    choice = choose_accelerator(os.environ, torch.cuda.is_available(), torch.cuda.device_count())
    accelerator = get_accelerator()
    if accelerator.device_name() == "cpu":
        torch.set_num_threads(cpu_threads(len(os.sched_getaffinity(0)), local_world, os.environ))
        device = torch.device("cpu")
    else:
        index = device_index(local_rank, local_world, accelerator.device_count(), os.environ)
        # DeepSpeed takes LOCAL_RANK for the index of the process's device (its engine, ZeRO-3,
        # the process group's device_id); with one GPU shown per task that index is 0.
        os.environ["LOCAL_RANK"] = str(index)
        accelerator.set_device(index)
        device = torch.device(accelerator.device_name(index))
    # NCCL's watchdog ends a rank whose collective outlived the timeout (torchrun sets this too;
    # the deepspeed launcher and srun do not); without it a stuck peer can hold the job forever.
    os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    deepspeed.init_distributed(dist_backend=accelerator.communication_backend_name(),
                               verbose=False)
    set_collective_timeout(timedelta(minutes=collective_timeout_minutes))
    return Topology(rank, local_rank, world, local_world, device, choice.reason)


def set_collective_timeout(timeout: timedelta) -> None:
    """`timeout` for every process group of this rank: the world group once it exists, and
    again after deepspeed.initialize for the groups DeepSpeed reduces gradients over (a copy of
    the world group, made with dist.new_group), which torch creates with its default timeout
    (30 minutes for gloo, 10 for NCCL) whatever the world group has: without this, a rank
    stuck before a gradient reduction would hold the others that long whatever
    train.collective_timeout_minutes says."""
    from torch.distributed import distributed_c10d

    for group in list(distributed_c10d._world.pg_map):
        distributed_c10d._set_pg_timeout(timeout, group)


def device_report(topo: Topology) -> str:
    """This rank's device, its name, why it was chosen, and the versions that decide how it
    computes: what rank 0 prints and TensorBoard's `run` text keeps."""
    versions = [f"torch {torch.__version__}", f"DeepSpeed {deepspeed.__version__}"]
    if topo.device.type == "cuda":
        name = torch.cuda.get_device_name(topo.device)
        versions += [f"CUDA {torch.version.cuda}",
                     "NCCL " + ".".join(map(str, torch.cuda.nccl.version()))]
    else:
        name = _cpu_name()
        threads = torch.get_num_threads()
        versions.append(f"gloo, {threads} thread{'s' * (threads != 1)} per rank")
    return f"{topo.device} ({name}; {topo.accelerator_reason}), " + ", ".join(versions)


def _cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def check_precision(cfg: RunConfig) -> None:
    """Before any process group: a device to train on as asked (choose_accelerator), and one
    that supports train.precision."""
    choose_accelerator(os.environ, torch.cuda.is_available(), torch.cuda.device_count())
    check_device_precision(cfg.train.precision, get_accelerator())


def check_device_precision(precision: str, accelerator) -> None:
    """`precision` is one `accelerator` (DeepSpeed's) computes in. Which it supports depends on
    the hardware (a CPU has fp16 only with AMX-FP16/AVX512-FP16 kernels), so the accelerator is
    an argument: a test can name one that lacks what this machine has."""
    name = accelerator.device_name()
    if precision == "fp16" and not accelerator.is_fp16_supported():
        raise ConfigError(f"train.precision: fp16 is not supported on {name}; use bf16 or fp32")
    if precision == "bf16" and not accelerator.is_bf16_supported():
        raise ConfigError(f"train.precision: bf16 is not supported on {name}; use fp16 or fp32")


# Gradients reduced per bucket (elements) at ZeRO 1-3. Each full bucket is reduced while the
# backward pass goes on; the last one (ending with the word embeddings, whose gradient is
# complete only when backward ends: 23.4M elements in BERT-base, 31.3M in BERT-large) is the
# part that cannot overlap. 25M is just above BERT-base's embedding matrix: about 5 buckets a
# backward for BERT-base (110M), about 14 for BERT-large (340M), each 100 MB of fp32 gradients,
# big enough for NCCL to run at full bandwidth. DeepSpeed's 5e8 holds all of BERT-large, so
# nothing would overlap, and it allocates its reduction buffers at the bucket size: 2 GB per
# buffer in fp32, two of them with overlap_comm.
REDUCE_BUCKET_ELEMENTS = 25_000_000


def zero_optimization(stage: int) -> dict:
    """The `zero_optimization` section for a ZeRO stage: at 1-3, gradient reduction overlapped
    with the backward pass (DeepSpeed leaves it off at 1 and 2) in buckets of
    REDUCE_BUCKET_ELEMENTS. Stage 0 has no such setting: DeepSpeed all-reduces after backward."""
    if stage == 0:
        return {"stage": 0}
    return {"stage": stage, "overlap_comm": True, "reduce_bucket_size": REDUCE_BUCKET_ELEMENTS}


def deepspeed_config(cfg: RunConfig, accumulation: list[int], precision: Precision,
                     load_universal: bool = False) -> dict:
    """The DeepSpeed JSON, generated from our config, `deepspeed:` extras merged.
    Batch settings are the first phase's; `set_phase` moves the engine to later ones.
    `accumulation`: the gradient accumulation steps of each phase, as the pre-flight derived
    them for this world size (config.validate_topology), not derived again here; `precision`
    likewise (precision.precision_for).
    `load_universal`: checkpoints are loaded from DeepSpeed's universal (topology-free) form."""
    t, first = cfg.train, cfg.schedule.phases[0]
    ds = {
        "train_batch_size": first.global_batch,
        "train_micro_batch_size_per_gpu": first.micro_batch,
        "gradient_accumulation_steps": accumulation[0],
        "gradient_clipping": t.grad_clip,
        "zero_optimization": zero_optimization(t.zero_stage),
        # Our AdamW is plain torch; ZeRO would otherwise refuse it as "untested".
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,  # we log ourselves
        "wall_clock_breakdown": False,
        # DeepSpeed's throughput timer synchronizes the device at every forward and every
        # engine.step() (utils/timer.py) to time micro-batches for a log line we never print;
        # we measure throughput ourselves, at the logging cadence.
        "timers": {"throughput": {"enabled": False}},
    }
    if load_universal:
        ds["checkpoint"] = {"load_universal": True}
    if precision.autocast is not None:
        # No lower-precision modules: every gradient is reduced in its own dtype, fp32.
        ds["torch_autocast"] = {"enabled": True, "dtype": "bfloat16",
                                "lower_precision_safe_modules": []}
    elif precision.bf16:
        ds["bf16"] = {"enabled": True}
    elif precision.fp16:
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


def build_engine(model: torch.nn.Module, cfg: RunConfig, topo: Topology, accumulation: list[int],
                 precision: Precision, *, load_universal: bool = False):
    """The DeepSpeed engine of `model`: `accumulation`, `precision` and `load_universal` as
    deepspeed_config takes them; the engine is checked to run that precision."""
    optimizer, scheduler = optimizer_and_schedule(model, cfg, topo.device, precision)
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler,
        config=deepspeed_config(cfg, accumulation, precision, load_universal))
    check_engine_precision(cfg, precision, engine_precision(engine), deepspeed.__version__)
    set_collective_timeout(timedelta(minutes=cfg.train.collective_timeout_minutes))
    if cfg.train.compile:
        engine.compile()
    return engine


def step_skipped(engine) -> bool | torch.Tensor:
    """Whether the last optimizer step was skipped for non-finite gradients, without waiting
    for the device: DeepSpeed's verdict (a Python bool it has already read) or, at ZeRO 0 with
    fp32 weights where optim.SkipsNonFiniteSteps decides on the device, its 0/1 tensor."""
    found_inf = getattr(engine.optimizer, "found_inf", None)
    return not engine.was_step_applied() if found_inf is None else found_inf


def engine_precision(engine) -> Precision:
    """The Precision a DeepSpeed engine runs. A DeepSpeed older than TORCH_AUTOCAST_SINCE has no
    torch_autocast_enabled: it ignored the section and runs without autocast."""
    autocast_enabled = getattr(engine, "torch_autocast_enabled", None)
    autocast = (engine.torch_autocast_dtype()
                if autocast_enabled is not None and autocast_enabled() else None)
    return Precision(autocast, bool(engine.bfloat16_enabled()), bool(engine.fp16_enabled()))


def check_engine_precision(cfg: RunConfig, wanted: Precision, running: Precision,
                           deepspeed_version: str) -> None:
    """After deepspeed.initialize: the engine runs the precision the config asked for (`wanted`,
    precision_for's). DeepSpeed ignores a config section it does not know, so without this check
    a bf16 run on an old DeepSpeed would train in fp32, several times slower, with MFU divided by
    the bf16 peak."""
    if running == wanted:
        return
    if wanted.autocast is not None and running.autocast is None:
        fix = (f"upgrade DeepSpeed to >= {TORCH_AUTOCAST_SINCE}, the first with its torch_autocast "
               "section (or set train.grad_accum_dtype=bf16 for DeepSpeed's bf16 mode)")
    else:
        fix = ("DeepSpeed did not take the precision section of the JSON mlm-dist gave it; use "
               f"a DeepSpeed >= {TORCH_AUTOCAST_SINCE} of the versions README lists as tested")
    raise ConfigError(f"train.precision={cfg.train.precision} asks for {wanted}, but DeepSpeed "
                      f"{deepspeed_version} runs {running}: {fix}")


def to_universal(tag_dir: Path, out: Path) -> None:
    """DeepSpeed's universal checkpoint of `tag_dir` (parameters and optimizer state per
    parameter, independent of the number of ranks) in `out`, made once. Rank 0 only."""
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
