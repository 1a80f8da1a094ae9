"""`mlm-dist bench train`: step throughput and MFU of our stack, against Hugging Face's.

It times full training steps in one process, one device:

  ours  the batch on the device -> TokenMasker (max_predictions slots per sequence) -> our
        BertForPretraining (MLM head on the masked slots only) -> pretraining_loss -> backward
        -> gradient clipping -> the optimizer the run would use (optim.build_optimizer)
  HF    the same rows as the list of dicts a Trainer hands its collator ->
        DataCollatorForLanguageModeling -> transformers.BertForPreTraining (SDPA attention,
        prediction head on every position) -> backward -> clipping -> fused AdamW (the
        Trainer's default optimizer on torch >= 2.8)

Same dimensions, batch, sequence length, dropout and precision on both sides (bf16: torch.autocast
around the forward, fp32 weights, as the HF Trainer runs bf16). No DeepSpeed: on one rank
ZeRO-0 adds nothing to the model's forward and backward, its bf16 mode would make the two
sides differ in precision handling, and importing and initialising it costs more than the
comparison; the step here is what each rank of a run computes between its collectives.

The two sides alternate step by step (and swap order every round), and a large matmul in the
run's dtype is timed in every round too, so the machine's noise hits the three figures alike.
Figures are medians over the timed rounds. FLOPs per token are those of flops.py; ours counts
the head on K/S of the positions (it projects K slots), HF's on all of them. On a CPU the
process's malloc is tuned first (allocator.py; for both sides alike, `--default-malloc` leaves
glibc's defaults), as a CPU training run should be.

With --shards, each round takes the next of a list of real micro-batches, made from the
shards as the loader makes them (rows of [CLS] A [SEP] B [SEP], short documents give short
rows); HF gets the same pairs, each row as long as its pair, and its collator pads a batch to
its longest row. Besides tokens_per_s (micro_batch × seq_len positions per step), each side
then reports real_tokens_per_s (tokens that are not padding), its fill (real tokens / positions
it computed) and MFU counted on real tokens.

Nothing is downloaded: HF's collator gets a word-level tokenizer over the same vocabulary size,
with the specials at the tokenizer's ids.
"""

from __future__ import annotations

import dataclasses
import json
import statistics

import torch

from mlm_dist.bench.steps import HFStep, OursStep, timed_call, torch_dtype
from mlm_dist.bench.workload import (as_batch, hf_examples, shard_batches, shards_vocabulary,
                                     synthetic_batch, synthetic_vocabulary)
from mlm_dist.commands.bench import DEFAULT_VOCAB, PRECISIONS
from mlm_dist.config import RunConfig, SequencePhase, load_config
from mlm_dist.data.shards import Manifest
from mlm_dist.errors import UsageError
from mlm_dist.flops import (MatmulTimer, cuda_peak_from_table, model_flops_per_token,
                            sparse_flops_per_token)
from mlm_dist.masking import max_predictions as derived_max_predictions
from mlm_dist.training.allocator import tune_cpu_allocator

# bench commands do not read data; load_config still wants the key set
_NO_SHARDS = "data.shards=unused-by-bench"


def bench_config(config: str | None, overrides: list[str] = (), vocab_size: int = 0) -> RunConfig:
    cfg = load_config(config, [_NO_SHARDS, *overrides])
    vocab = cfg.model.vocab_size or vocab_size or DEFAULT_VOCAB
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=vocab))


def phase_for(cfg: RunConfig, seq_len: int | None, micro_batch: int | None,
              max_predictions: int | None) -> SequencePhase:
    """The config's phase at seq_len (its micro batch and max_predictions), or a new one."""
    phases = cfg.schedule.phases
    match = [p for p in phases if seq_len in (None, p.seq_len)]
    phase = match[0] if match else SequencePhase(seq_len=seq_len, micro_batch=phases[0].micro_batch,
                                                 max_predictions=0)
    phase = dataclasses.replace(phase, micro_batch=micro_batch or phase.micro_batch)
    if max_predictions:
        phase = dataclasses.replace(phase, max_predictions=max_predictions)
    if phase.seq_len > cfg.model.max_positions:
        raise UsageError(f"--seq-len {phase.seq_len} exceeds model.max_positions "
                         f"{cfg.model.max_positions}")
    return dataclasses.replace(phase, max_predictions=derived_max_predictions(phase, cfg.masking))


def bench_train(cfg: RunConfig, *, seq_len: int | None = None, micro_batch: int | None = None,
                steps: int = 10, warmup: int = 3, compare_hf: bool = False,
                precision: str | None = None, device: str | None = None,
                max_predictions: int | None = None, compile: bool = False,
                checkpoint_activations: bool = False, matmul_size: int = 4096,
                seed: int = 0, tune_allocator: bool = True, shards: str | None = None) -> dict:
    """Time `steps` rounds (after `warmup`) of our step, HF's step (with compare_hf) and a
    matmul; return the figures as a JSON-able dict.

    shards: real batches from these shards' train split, one per round, the same for both
    sides (default: one synthetic batch of nearly full rows).

    tune_allocator: on a CPU, allocator.tune_cpu_allocator() first (for the whole process, so
    both sides alike), as a CPU training run would."""
    precision = precision or cfg.train.precision
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    _check_options(precision, device, steps, warmup)
    phase = phase_for(cfg, seq_len, micro_batch, max_predictions)
    tuned = device.type == "cpu" and tune_allocator and tune_cpu_allocator()
    batches, vocab = _workload(cfg, phase, shards, count=warmup + steps, seed=seed)

    options = dict(device=device, precision=precision,
                   checkpoint_activations=checkpoint_activations)
    sides = {"ours": OursStep(cfg, phase, batches, vocab, compile=compile, **options)}
    if compile:  # the same stack uncompiled, interleaved too: the speed-up in one run
        sides["ours_eager"] = OursStep(cfg, phase, batches, vocab, compile=False, **options)
    if compare_hf:
        sides["hf"] = HFStep(cfg, batches, vocab, device=device, precision=precision)
    dtype = torch_dtype(precision)
    times, peaks = _interleaved_rounds(sides, MatmulTimer(device, dtype, matmul_size), device,
                                       warmup=warmup, steps=steps)

    ours = sides["ours"].model
    result = _setup_record(cfg, phase, batches, shards, precision=precision, device=device,
                           dtype=dtype, peaks=peaks, matmul_size=matmul_size, tuned=tuned,
                           steps=steps, warmup=warmup, compile=compile, model=ours)
    timed = [batches[r % len(batches)] for r in range(warmup, warmup + steps)]
    for name, seconds in times.items():
        result[name] = _side_figures(cfg.model, phase, name, seconds, timed,
                                     peak=result["peak"]["flops_per_s"])
        if name == "hf":
            result[name]["collator_ms"] = round(
                statistics.median(sides[name].collator_seconds[warmup:]) * 1e3, 2)
    result.update(_ratios(result, times, compare_hf=compare_hf, compile=compile))
    return result


def _check_options(precision: str, device, steps: int, warmup: int) -> None:
    if precision not in PRECISIONS:
        raise UsageError(f"--precision: expected one of {list(PRECISIONS)}, got {precision!r}")
    if precision == "fp16" and device.type != "cuda":
        raise UsageError("--precision fp16 needs a CUDA device; use bf16 or fp32")
    if steps < 1 or warmup < 0:
        raise UsageError(f"--steps must be >= 1 and --warmup >= 0, got {steps}, {warmup}")


def _workload(cfg: RunConfig, phase: SequencePhase, shards: str | None, *, count: int,
              seed: int) -> tuple[list, object]:
    """(batches, their Vocabulary): real ones from `shards`, or one synthetic batch."""
    m = cfg.model
    if shards:
        vocab = shards_vocabulary(shards, m.vocab_size)
        return shard_batches(shards, phase, vocab, count=count, seed=seed,
                             pack=cfg.data.pack), vocab
    rows = synthetic_batch(m.vocab_size, phase.micro_batch, phase.seq_len, seed)
    return [as_batch(rows)], synthetic_vocabulary(m.vocab_size)


def _interleaved_rounds(sides: dict, matmul, device, *, warmup: int,
                        steps: int) -> tuple[dict[str, list[float]], list[float]]:
    """Each round times every side (order swapped every round) and the matmul, so the
    machine's noise hits all figures alike; the warm-up rounds are dropped."""
    times: dict[str, list[float]] = {name: [] for name in sides}
    peaks: list[float] = []
    for round_ in range(warmup + steps):
        order = list(sides) if round_ % 2 == 0 else list(sides)[::-1]
        for name in order:
            seconds = timed_call(sides[name], device, round_)
            if round_ >= warmup:
                times[name].append(seconds)
        flops = matmul()
        if round_ >= warmup:
            peaks.append(flops)
    return times, peaks


def _setup_record(cfg: RunConfig, phase: SequencePhase, batches: list, shards: str | None, *,
                  precision: str, device, dtype, peaks: list[float], matmul_size: int,
                  tuned: bool, steps: int, warmup: int, compile: bool, model) -> dict:
    m = cfg.model
    name = str(device) if device.type != "cuda" else torch.cuda.get_device_name(device)
    record = {
        "model": {"num_layers": m.num_layers, "hidden_size": m.hidden_size,
                  "num_heads": m.num_heads, "intermediate_size": m.intermediate_size,
                  "vocab_size": m.vocab_size,
                  "parameters": sum(p.numel() for p in model.parameters())},
        "seq_len": phase.seq_len, "micro_batch": phase.micro_batch,
        "tokens_per_step": phase.micro_batch * phase.seq_len,
        "data": f"{len(batches)} micro-batches of {shards}" if shards else "synthetic",
        "precision": precision + (" autocast" if precision != "fp32" else ""),
        "device": name, "threads": torch.get_num_threads(), "steps": steps, "warmup": warmup,
        "compile": compile, "checkpoint_activations": model.checkpoint_activations,
        "cpu_allocator_tuned": tuned,
        "peak": {"dtype": str(dtype).replace("torch.", ""), "matmul": f"{matmul_size}^3",
                 "flops_per_s": statistics.median(peaks), "flops_per_s_best": max(peaks),
                 "source": "measured, one matmul per round between the steps"},
    }
    if device.type == "cuda":
        record["peak"]["table_flops_per_s"] = cuda_peak_from_table(name, dtype)
    return record


def _side_figures(m, phase: SequencePhase, name: str, seconds: list[float], batches: list, *,
                  peak: float) -> dict:
    """One side's figures over the timed rounds (`batches`: the batch of each round)."""
    ours = name.startswith("ours")
    step_s = statistics.median(seconds)
    tokens_per_s = phase.micro_batch * phase.seq_len / step_s
    per_token = (sparse_flops_per_token(m, phase.seq_len, phase.max_predictions) if ours
                 else model_flops_per_token(m, phase.seq_len, 1.0))
    real = sum(int(b.attention_mask.sum()) for b in batches)
    # Positions computed: ours every row at seq_len, HF each pair at its batch's longest.
    computed = sum(phase.micro_batch * phase.seq_len if ours else
                   len(rows) * max(len(e["input_ids"]) for e in rows)
                   for rows in map(hf_examples, batches))
    figures = {
        "tokens_per_s": round(tokens_per_s, 1),
        "step_ms": round(step_s * 1e3, 2),
        "step_ms_min": round(min(seconds) * 1e3, 2),
        "sparse_head": ours,
        "sparse_last_layer": ours,  # computes only [CLS] and the masked slots
        "predicted_fraction": round(phase.max_predictions / phase.seq_len if ours else 1.0, 4),
        "flops_per_token": per_token,
        "model_flops_per_s": tokens_per_s * per_token,
        "mfu": round(tokens_per_s * per_token / peak, 4),
        # What the step did for the data: non-padding tokens per second of all timed rounds,
        # the share of computed positions they are, and MFU counted on them alone.
        "real_tokens_per_s": round(real / sum(seconds), 1),
        "fill": round(real / computed, 4),
        "mfu_real": round(real / sum(seconds) * per_token / peak, 4),
    }
    if ours:
        figures["max_predictions"] = phase.max_predictions
    return figures


def _ratios(result: dict, times: dict, *, compare_hf: bool, compile: bool) -> dict:
    out = {}
    if compare_hf:
        out["ratio"] = round(result["ours"]["tokens_per_s"] / result["hf"]["tokens_per_s"], 3)
        out["real_tokens_ratio"] = round(result["ours"]["real_tokens_per_s"]
                                         / result["hf"]["real_tokens_per_s"], 3)
        # The same ratio round by round (the two steps of a round ran back to back, under the
        # same load): its spread shows how much of the figure is the machine's noise.
        rounds = [hf / ours for ours, hf in zip(times["ours"], times["hf"])]
        out["ratio_per_round"] = {"median": round(statistics.median(rounds), 3),
                                  "min": round(min(rounds), 3), "max": round(max(rounds), 3)}
    if compile:
        out["compile_speedup"] = round(
            result["ours"]["tokens_per_s"] / result["ours_eager"]["tokens_per_s"], 3)
    return out


# ---------------------------------------------------------------------------------------------
# command line


def train_command(args) -> None:
    vocab_size = args.vocab_size
    if args.shards and not vocab_size:
        vocab_size = Manifest.load(args.shards).tokenizer.vocab_size
    cfg = bench_config(args.config, args.overrides, vocab_size)
    result = bench_train(cfg, shards=args.shards, seq_len=args.seq_len, micro_batch=args.micro_batch,
                         steps=args.steps, warmup=args.warmup, compare_hf=args.compare_hf,
                         precision=args.precision, device=args.device,
                         max_predictions=args.max_predictions, compile=args.compile,
                         checkpoint_activations=args.checkpoint_activations,
                         matmul_size=args.matmul_size, seed=args.seed,
                         tune_allocator=not args.default_malloc)
    print(json.dumps(result, indent=2))
