"""`mlm-dist bench gpu`: the check to run the first time a GPU is available, before a long run:
minutes on one device, one JSON report, exit code 1 if a check fails.

What the code, tested on CPU ranks, does on the device at hand:

  device     the device, its name, torch, DeepSpeed, CUDA and NCCL versions (what rank 0 of a
             run prints)
  attention  the attention path for rows without padding, with padding and packed
             (attention.attention_plan); on CUDA, for the model's shapes in the training dtype,
             the kernel SDPA picks, and whether FlashAttention (no mask) and the memory-efficient
             kernel (masks) really run, forward and backward, or PyTorch's reasons why not
             (bench/gpu_attention.py)
  memory     one step of `bench train`'s stack at the first phase: the activations its forward
             keeps against memory.activation_prediction, and on CUDA the peak allocated bytes
             against the ZeRO-0 formula (fp32 weights, gradients, Adam) plus those activations
  train      `bench train --compare-hf` at seq 128 and 512 (synthetic rows) and packed (real
             batches of the shards built here, data.pack=true)
  syncs      device synchronizations and host reads in each steady-state step of the real
             Trainer, one rank under the deepspeed launcher (bench/syncs.py); on CUDA also
             every operation torch reports as synchronizing
  resume     `mlm-dist train` on one rank under the deepspeed launcher, saved half-way, and a
             second run resumed from a copy of that checkpoint: its losses must be the first
             run's, bit for bit

Both runs and the packed batches read shards built here from the standard library's docstrings
(the demo's corpus). On a GPU the default config is configs/bert-base.yaml; on a CPU (asked for
with DS_ACCELERATOR=cpu: CI's smoke test) the demo's tiny config, smaller still, and few steps.
A part that needs CUDA says {"skipped": why} there. A check that ran and failed has "ok":
false, is listed in "failed", and the command exits 1.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from mlm_dist.bench.gpu_attention import attention_report
from mlm_dist.bench.memory import activation_prediction, zero_prediction
from mlm_dist.bench.memory_rank import _CountingForward
from mlm_dist.bench.steps import OursStep
from mlm_dist.bench.syncs import summary
from mlm_dist.bench.train import bench_config, bench_train, phase_for
from mlm_dist.bench.workload import as_batch, synthetic_batch, synthetic_vocabulary
from mlm_dist.commands.bench import GPU_CONFIG, GPU_RESUME_STEPS
from mlm_dist.data.corpus import iter_documents
from mlm_dist.data.prepare import prepare_shards
from mlm_dist.data.shards import Manifest
from mlm_dist.demo.run import TINY_CONFIG
from mlm_dist.demo.stdlib_corpus import write_stdlib_corpus
from mlm_dist.engine import DEEPSPEED_VERSION, Topology, choose_accelerator, device_report
from mlm_dist.errors import PathExistsError, PathNotFoundError, UsageError
from mlm_dist.launch.local import RanksFailedError, free_port, launcher_command, remove_shm_buffers
from mlm_dist.model import num_parameters
from mlm_dist.tokenizer import sentences_of, train_tokenizer
from mlm_dist.training.checkpoint import CHECKPOINTS, tag_for, tags

# On a CPU: the demo's tiny config at a quarter of its width, with a second phase at 512 so that
# every part runs at both lengths, and micro-batches small enough for Hugging Face's full-vocab
# head. The whole check then takes a minute or two.
CPU_OVERRIDES = [
    "model.hidden_size=64", "model.num_layers=2", "model.num_heads=4",
    "model.intermediate_size=128", "model.max_positions=512",
    "schedule.phases=[{seq_len: 128, micro_batch: 8, global_batch: 16, until_step: 100},"
    " {seq_len: 512, micro_batch: 2, global_batch: 16, until_step: 200}]",
]
CORPUS_DOCUMENTS, VOCAB_SIZE = 1000, 4000  # ~60k tokens of docstrings; built in seconds
TRAIN_SEQ_LENS = (128, 512)
SYNC_STEPS, SYNC_LOG_EVERY = 10, 5  # steps 1-3 and 5-8 are steady: no log, save or warm-up
LAUNCH_TIMEOUT_S = 1200


@dataclass(frozen=True)
class Effort:
    """How long the timed parts run: `bench train`'s rounds and peak matmul, memory's steps."""
    bench_steps: int
    bench_warmup: int
    matmul_size: int
    memory_steps: int


GPU_EFFORT = Effort(bench_steps=10, bench_warmup=3, matmul_size=4096, memory_steps=3)
CPU_EFFORT = Effort(bench_steps=2, bench_warmup=1, matmul_size=1024, memory_steps=2)


def bench_gpu(config: str | None, overrides: list[str] = (), *, out: str | None = None,
              steps: int = GPU_RESUME_STEPS) -> dict:
    """Every part of the check (see the module docstring); the report, with "failed": the
    names of the checks that ran and failed."""
    if steps < 2:
        raise UsageError(f"--steps {steps}: the resumed run needs at least 2 steps (it saves "
                         "half-way and resumes from there)")
    _check_out(out)
    # CPU only when asked for, as `mlm-dist train` does: no silent CPU run on a GPU machine.
    accelerator = choose_accelerator(os.environ, torch.cuda.is_available(),
                                     torch.cuda.device_count())
    cuda = accelerator.name == "cuda"
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    config, overrides = run_config(config, list(overrides), cuda)
    cfg = bench_config(config, overrides)  # a mistake in the config or overrides ends here
    effort = GPU_EFFORT if cuda else CPU_EFFORT
    first = cfg.schedule.phases[0]
    started = time.monotonic()
    report: dict = {"device": device_facts(device, accelerator.reason),
                    "config": {"path": config, "overrides": overrides}}
    with work_dir(out) as work:
        shards = build_shards(work)
        parts: dict[str, Callable[[], dict]] = {
            "attention": lambda: attention_report(cfg, device),
            "memory": lambda: memory_report(cfg, device, effort),
            "train": lambda: train_report(config, overrides, shards, device, effort),
            "syncs": lambda: syncs_report(config, overrides, shards, work, first),
            "resume": lambda: resume_report(config, overrides, shards, work, first, steps),
        }
        for name, part in parts.items():
            report[name] = run_part(name, part)
            if cuda:  # the launched ranks get the memory this process no longer needs
                torch.cuda.empty_cache()
    report["seconds"] = round(time.monotonic() - started, 1)
    report["failed"] = failed_checks(report)
    return report


def _check_out(out: str | None) -> None:
    if out is not None and Path(out).exists() and (not Path(out).is_dir()
                                                   or any(Path(out).iterdir())):
        raise PathExistsError(f"--out {out} exists and is not an empty directory; bench gpu "
                              "writes its corpus, shards and runs there: give a new one")


def run_config(config: str | None, overrides: list[str], cuda: bool) -> tuple[str, list[str]]:
    """(config path, overrides) of the check: the given config as it is, else bert-base on a
    GPU and the tiny one (CPU_OVERRIDES first, the user's after them) on a CPU."""
    if config is not None:
        return config, overrides
    if cuda:
        if not Path(GPU_CONFIG).is_file():
            raise PathNotFoundError(f"--config: the default {GPU_CONFIG} is not in {Path.cwd()}; "
                                    "run from the mlm_dist checkout or pass --config")
        return GPU_CONFIG, overrides
    return str(TINY_CONFIG), [*CPU_OVERRIDES, *overrides]


@contextlib.contextmanager
def work_dir(out: str | None) -> Iterator[Path]:
    """`out` (kept), or a temporary directory removed at the end."""
    if out is None:
        with tempfile.TemporaryDirectory(prefix="bench-gpu-") as tmp:
            yield Path(tmp)
        return
    Path(out).mkdir(parents=True, exist_ok=True)
    yield Path(out)


def run_part(name: str, part: Callable[[], dict]) -> dict:
    """A part's report and its seconds; a part that raises is a failed check (its traceback on
    stderr), and the parts after it still run."""
    started = time.monotonic()
    try:
        result = part()
    except Exception as e:  # noqa: BLE001 - reported, and the command exits 1
        print(f"bench gpu: {name} failed:", file=sys.stderr)
        traceback.print_exc(file=sys.stderr)
        result = {"ok": False, "error": f"{type(e).__name__}: {e}"}
    result["seconds"] = round(time.monotonic() - started, 1)
    return result


def failed_checks(report: dict) -> list[str]:
    """The parts that ran a check and failed it ("ok": false)."""
    return [name for name, part in report.items()
            if isinstance(part, dict) and part.get("ok") is False]


def device_facts(device, reason: str) -> dict:
    facts = {"device": str(device), "reason": reason,
             "report": device_report(Topology(0, 0, 1, 1, device, reason)),
             "torch": torch.__version__, "deepspeed": DEEPSPEED_VERSION,
             "cuda": torch.version.cuda}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        facts.update(name=props.name, capability=f"{props.major}.{props.minor}",
                     memory_gib=round(props.total_memory / 2 ** 30, 1),
                     nccl=".".join(map(str, torch.cuda.nccl.version())),
                     cudnn=torch.backends.cudnn.version(), bf16=torch.cuda.is_bf16_supported())
    return facts


def build_shards(work: Path) -> Path:
    """Corpus, tokenizer and shards in `work`, as the demo builds them, smaller."""
    corpus, tokenizer, shards = work / "corpus.txt", work / "tokenizer", work / "shards"
    write_stdlib_corpus(corpus, max_documents=CORPUS_DOCUMENTS)
    train_tokenizer(sentences_of(iter_documents([corpus])), tokenizer, vocab_size=VOCAB_SIZE,
                    seed=0)
    prepare_shards([corpus], tokenizer, shards, docs_per_shard=100, valid_fraction=0.05, seed=0)
    return shards


# ---------------------------------------------------------------------------------------------
# memory


def memory_report(cfg, device, effort: Effort) -> dict:
    """`bench train`'s step of our stack (no DeepSpeed: fp32 weights, autocast) at the first
    phase, on one synthetic batch: what its forward keeps for backward against
    activation_prediction for this device, and on CUDA the peak allocated over the steps after
    the first (optimizer states allocated) against ZeRO 0 on one rank plus those activations."""
    m, precision = cfg.model, cfg.train.precision
    phase = phase_for(cfg, None, None, None)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        before = torch.cuda.memory_allocated(device)
    batch = as_batch(synthetic_batch(m.vocab_size, phase.micro_batch, phase.seq_len, seed=0))
    ours = OursStep(cfg, phase, [batch], synthetic_vocabulary(m.vocab_size), device=device,
                    precision=precision)
    ours.engine = counting = _CountingForward(ours.engine)
    counting.count_next = True
    ours(0)
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    for step in range(1, effort.memory_steps + 1):
        ours(step)
    psi = num_parameters(ours.model)
    predicted = activation_prediction(m, phase.micro_batch, phase.seq_len,
                                      phase.max_predictions, device_type=device.type,
                                      precision="fp32" if precision == "fp32" else "autocast",
                                      padded=batch.padded)
    report: dict = {"seq_len": phase.seq_len, "micro_batch": phase.micro_batch,
                    "max_predictions": phase.max_predictions, "parameters": psi,
                    "precision": precision + (" autocast" if precision != "fp32" else ""),
                    "activations": {"measured": counting.saved, "predicted": predicted["total"],
                                    "ratio": round(counting.saved / predicted["total"], 4),
                                    "formula": predicted}}
    if not cuda:
        report["peak"] = {"skipped": "torch keeps a peak of allocated bytes for CUDA devices "
                                     "only; `mlm-dist bench memory` reports peak RSS on CPU"}
        return report
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - before
    states = zero_prediction(0, psi, 1, "fp32")  # fp32 weights and gradients, Adam's moments
    expected = states["total"] + predicted["total"]
    report["peak"] = {"measured": peak, "predicted": expected, "ratio": round(peak / expected, 4),
                      "states": states,
                      "what": "max_memory_allocated over steps 1.. of one process, less what "
                              "was allocated before the model; predicted: ZeRO 0 on one rank "
                              "(memory.zero_prediction) + activations (the formula above)"}
    return report


# ---------------------------------------------------------------------------------------------
# bench train


# The figures `bench train` prints per side that say how fast, how full and how efficient.
SIDE_FIGURES = ("tokens_per_s", "real_tokens_per_s", "fill", "step_ms", "mfu", "mfu_real")


def train_report(config: str, overrides: list[str], shards: Path, device,
                 effort: Effort) -> dict:
    """`bench train --compare-hf` at each of TRAIN_SEQ_LENS the model allows, on synthetic rows
    (the config's vocabulary, BERT's if it names none), then packed at the longest, on real
    batches of `shards` (their vocabulary), as `bench train --shards … data.pack=true` runs."""
    cfg = bench_config(config, overrides)
    options = dict(compare_hf=True, device=str(device), steps=effort.bench_steps,
                   warmup=effort.bench_warmup, matmul_size=effort.matmul_size)
    runs: dict = {}
    lengths = [s for s in TRAIN_SEQ_LENS if s <= cfg.model.max_positions]
    for seq_len in TRAIN_SEQ_LENS:
        runs[f"seq_{seq_len}"] = (train_figures(bench_train(cfg, seq_len=seq_len, **options))
                                  if seq_len in lengths else
                                  {"skipped": f"model.max_positions {cfg.model.max_positions}"})
    if lengths:
        packed = bench_config(config, [*overrides, "data.pack=true"],
                              Manifest.load(shards).tokenizer.vocab_size)
        runs[f"packed_{lengths[-1]}"] = train_figures(
            bench_train(packed, seq_len=lengths[-1], shards=str(shards), **options))
    return runs


def train_figures(result: dict) -> dict:
    figures = {key: result[key] for key in ("seq_len", "micro_batch", "data", "precision",
                                            "device", "ratio", "real_tokens_ratio")}
    figures["peak_flops_per_s"] = result["peak"]["flops_per_s"]
    for side in ("ours", "hf"):
        figures[side] = {key: result[side][key] for key in SIDE_FIGURES}
    return figures


# ---------------------------------------------------------------------------------------------
# the launched runs: syncs and resume


def launch(module_and_args: list[str], log: Path) -> str:
    """One rank under the deepspeed launcher, as a user starts one; its output (stdout and
    stderr, also kept in `log`)."""
    port = free_port()
    cmd = launcher_command(1, port, *module_and_args)
    try:
        with open(log, "w") as f:
            proc = subprocess.run(cmd, env=dict(os.environ, PYTHONUNBUFFERED="1"), stdout=f,
                                  stderr=subprocess.STDOUT, timeout=LAUNCH_TIMEOUT_S)
    finally:
        remove_shm_buffers(port)
    output = log.read_text(errors="replace")
    if proc.returncode != 0:
        raise RanksFailedError(f"`{' '.join(cmd[2:])}` failed (exit {proc.returncode}); the end of "
                               f"its output:\n{output[-3000:]}")
    return output


def short_run(phase, *, global_batch: int, steps: int) -> list[str]:
    """Overrides for a run of `steps` steps of one phase at `phase`'s length and micro-batch,
    with nothing between the steps but what a long run does (no evaluation, no timed saves),
    warmed up over half of them (a config's warm-up may be longer than the whole run)."""
    return [f"schedule.phases=[{{seq_len: {phase.seq_len}, micro_batch: {phase.micro_batch}, "
            f"global_batch: {global_batch}, until_step: {steps}}}]",
            f"optim.warmup_steps={steps // 2}", "eval.every=0", "checkpoint.every_minutes=0"]


def syncs_report(config: str, overrides: list[str], shards: Path, work: Path, phase) -> dict:
    """bench/syncs.py on one rank: SYNC_STEPS steps of two micro-batches (so the engine's
    forward and step calls differ in number), a log step every SYNC_LOG_EVERY; the counts
    judged by syncs.summary."""
    out = work / "syncs"
    out.mkdir()
    launch(["mlm_dist.bench.syncs", str(out / "counts"), "--config", config, *overrides,
            f"data.shards={shards}", f"out_dir={out / 'run'}",
            *short_run(phase, global_batch=2 * phase.micro_batch, steps=SYNC_STEPS),
            f"train.log_every={SYNC_LOG_EVERY}", "checkpoint.every=0"], out / "log.txt")
    report = json.loads((out / "counts.rank0.json").read_text())
    return {**summary(report, SYNC_LOG_EVERY), "zero": report["zero"]}


def resume_report(config: str, overrides: list[str], shards: Path, work: Path, phase,
                  steps: int) -> dict:
    """`mlm-dist train` for `steps` steps at the first phase, saving at steps // 2; then a
    copy of the run as it was after that save, resumed to `steps`."""
    at = steps // 2
    out = work / "resume"
    out.mkdir()
    full, resumed = out / "full", out / "resumed"
    train = ["mlm_dist", "train", "--config", config, *overrides, f"data.shards={shards}",
             *short_run(phase, global_batch=phase.global_batch, steps=steps),
             "train.log_every=1", f"checkpoint.every={at}", "checkpoint.keep=0"]
    started = time.monotonic()
    launch([*train, f"out_dir={full}"], out / "full.log")
    middle = time.monotonic()
    copy_as_saved_at(full, resumed, at)
    output = launch([*train, f"out_dir={resumed}", "checkpoint.resume=true"],
                    out / "resumed.log")
    return compare_resumed(losses(full), losses(resumed), at=at, steps=steps,
                           said_resumed=f"resumed from step {at}" in output,
                           seconds=(middle - started, time.monotonic() - middle))


def copy_as_saved_at(run: Path, to: Path, step: int) -> None:
    """`run` as it was right after it saved `step`, as if it had stopped there: without the
    later checkpoints, the metrics and TensorBoard's events."""
    later = {d.name for s, d, _ in tags(run / CHECKPOINTS) if s > step}
    shutil.copytree(run, to, ignore=lambda _, names: [n for n in names if n in later or n in (
        "metrics.jsonl", "tensorboard")])
    (to / CHECKPOINTS / "latest").write_text(tag_for(step))


def losses(run: Path) -> dict[int, float]:
    """step -> train/loss of a run's metrics.jsonl."""
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train/loss"] for r in records if "train/loss" in r}


def compare_resumed(full: dict[int, float], resumed: dict[int, float], *, at: int, steps: int,
                    said_resumed: bool, seconds: tuple[float, float]) -> dict:
    """The resumed run's losses against the uninterrupted run's, bit for bit."""
    after = list(range(at + 1, steps + 1))
    differ = [s for s in after if full.get(s) != resumed.get(s)]
    # Steps a run should have logged and did not, or logged and should not have.
    unexpected = {"full": sorted(set(full) ^ set(range(1, steps + 1))),
                  "resumed": sorted(set(resumed) ^ set(after))}
    report = {"steps": steps, "resumed_at": at, "said_resumed": said_resumed,
              "losses": [full.get(s) for s in after],
              "resumed_losses": [resumed.get(s) for s in after], "differ_at": differ,
              "unexpected_steps": unexpected,
              "run_seconds": {"full": round(seconds[0], 1), "resumed": round(seconds[1], 1)},
              "ok": said_resumed and not differ and not any(unexpected.values())}
    if differ and differ[0] > at + 1:
        report["note"] = (f"step {at + 1}, computed from the checkpoint's weights and data "
                          "position, matches: the state was restored; the later differences "
                          "come from a backward pass that does not repeat itself bit for bit "
                          "on this device")
    return report


# ---------------------------------------------------------------------------------------------
# command line


def gpu_command(args) -> None:
    report = bench_gpu(args.config, args.overrides, out=args.out, steps=args.steps)
    print(json.dumps(report, indent=2))
    if report["failed"]:
        print(f"bench gpu: failed: {', '.join(report['failed'])}", file=sys.stderr)
        sys.exit(1)
