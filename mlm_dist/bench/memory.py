"""`mlm-dist bench memory`: bytes per rank under ZeRO stages 0/1/2/3 on N ranks, against the
ZeRO paper's formulas, and the activations a micro-batch keeps for backward, against ours.

One deepspeed launch of N ranks per stage; each rank (bench_memory_rank.py) builds the engine,
trains a few steps on a synthetic batch and writes what it holds. This process gathers the
counts and puts the formula's prediction next to them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from mlm_dist.bench.train import bench_config
from mlm_dist.errors import UsageError
from mlm_dist.launch.local import RanksFailedError, free_port, launcher_command, remove_shm_buffers
from mlm_dist.precision import precision_for


def zero_prediction(stage: int, psi: int, ranks: int, precision: str,
                    optimizer_bytes_per_param: int = 8) -> dict:
    """Bytes per rank the ZeRO paper predicts (Rajbhandari et al. 2020, section 5.1).

    Mixed precision Adam: 2Ψ parameters + 2Ψ gradients + KΨ optimizer states with K = 12 (fp32
    master copy, momentum, variance). Stage 1 partitions the optimizer states over the N ranks,
    stage 2 the gradients too, stage 3 the parameters too. With fp32 weights (fp32, or bf16
    under autocast) there is no master copy, 4Ψ + 4Ψ + 8Ψ, except at stage 3, where DeepSpeed
    keeps an fp32 copy of each rank's partition whatever the weights' dtype.
    """
    low = 4 if precision == "fp32" else 2
    master = 0 if precision == "fp32" and stage < 3 else 4
    k = optimizer_bytes_per_param + master
    params, grads, states = low * psi, low * psi, k * psi
    if stage >= 1:
        states /= ranks
    if stage >= 2:
        grads /= ranks
    if stage >= 3:
        params /= ranks
    return {"params": int(params), "grads": int(grads), "optimizer": int(states),
            "total": int(params + grads + states)}


# What the encoder keeps for backward, in the dtype of the residual stream: under autocast the
# stream stays in the autocast dtype on every device (model.LayerNorm casts LayerNorm's output
# back; CUDA autocast would return it in fp32), so a GPU keeps the same residual bytes as the
# CPU this is measured on, plus an fp32 copy of each LayerNorm's input (CUDA autocast runs
# layer_norm in fp32, and the kernel keeps its input for backward).
RESIDUAL_STREAM_NOTE = ("residual stream in the compute dtype: LayerNorm computes in fp32 and "
                        "its output is cast back (model.LayerNorm), on CPU and CUDA alike")


def activation_prediction(m, micro_batch: int, seq_len: int, max_predictions: int, *,
                          precision: str, device_type: str, padded: bool = True,
                          zero3_linear: bool = False,
                          layer_norm_in_fp32: bool | None = None) -> dict:
    """Bytes one micro-batch's forward keeps for backward: every tensor autograd saves, each
    storage once, parameters not counted (held anyway). The training forward: one pair a row,
    the last layer and the heads on [CLS] and the max_predictions slots (model.py).

    precision: "autocast" (bf16/fp16 autocast, fp32 weights), "low" (16-bit weights, DeepSpeed's
    bf16/fp16 mode) or "fp32". device_type "cpu": attention written out (its scores, dropout
    mask and dropped probabilities are kept, [B, heads, queries, S] each) and our CPU dropout
    (its mask in the tensor's dtype); anything else: CUDA's kernels, SDPA (q, k, v, output and
    an fp32 logsumexp per query and head; no [S, S] tensor), torch dropout (a bool mask), and
    layer_norm under autocast in fp32 (an fp32 copy of its input is kept), unless
    layer_norm_in_fp32 says otherwise (a CPU test emulates CUDA's rule with it). padded: the
    batch has padding (CUDA: the mask goes to SDPA's memory-efficient kernel, which keeps it;
    none goes to FlashAttention). zero3_linear: DeepSpeed's ZeRO-3 Linear (its
    zero_optimization.memory_efficient_linear, on by default) keeps each Linear's weight
    itself, cast again in backward, and its input as given (the MLM transform's: a view).

    "weight_copies" are autocast's 16-bit casts of the Linear weights, kept from forward to
    backward; "total" adds them to the activations."""
    autocast, cuda = precision == "autocast", device_type != "cpu"
    low = 4 if precision == "fp32" else 2  # bytes of the compute dtype: the residual stream
    weights = 2 if precision == "low" else 4  # the embeddings' sum is in the weights' dtype
    if layer_norm_in_fp32 is None:
        layer_norm_in_fp32 = cuda and autocast
    B, S, H, I, n = micro_batch, seq_len, m.hidden_size, m.intermediate_size, m.num_heads
    T, K = B * S, max_predictions
    dropout, attention_dropout = m.dropout > 0, m.attention_dropout > 0

    def mask(elements: int, itemsize: int) -> int:  # a dropout's keep mask
        return elements * (1 if cuda else itemsize) if dropout else 0

    def norm(rows: int, itemsize: int) -> int:  # LayerNorm: its input, its mean and rstd
        stats = 4 if cuda else weights  # fp32 on CUDA; on a CPU in the weights' dtype
        return rows * H * (4 if layer_norm_in_fp32 else itemsize) + 2 * rows * stats

    def attention(queries: int) -> int:  # besides q, k, v and the output
        if not cuda:
            return B * n * queries * S * low * (3 if attention_dropout else 1)
        flash = not padded and precision != "fp32"
        lse = B * n * (queries if flash else -(-queries // 32) * 32) * 4
        return lse + (16 if attention_dropout else 0)  # + the dropout RNG's seed and offset

    def layer(queries: int) -> int:
        rows = B * queries
        gathered = queries < S  # the last layer: its queries gathered from the full input
        return (T * H * low  # the layer's input (q, k, v projections)
                + (rows * 8 + rows * H * low if gathered else 0)  # gather index, gathered rows
                + (rows + 2 * T) * H * low + attention(queries)  # q, k, v
                + rows * H * low  # attention output (the out projection's input)
                + mask(rows * H, low) + norm(rows, low)
                + rows * H * low + 2 * rows * I * low  # FFN: up, GELU and down inputs
                + mask(rows * H, low) + norm(rows, low))

    embeddings = 2 * T * 8 + S * 8 + norm(T, weights) + mask(T * H, weights)
    encoder = (m.num_layers - 1) * layer(S) + layer(1 + K)
    # The MLM transform's input is a copy of the masked slots' rows (a view when B = 1); the
    # pooler's is a view of the last layer's output, which keeps all of it.
    copied = B > 1 and not zero3_linear
    heads = (B * K * H * low * (3 if copied else 2) + norm(B * K, low)  # transform, GELU, decoder
             + B * (1 + K) * H * low + B * H * low)  # pooler input, tanh
    mask_kept = (cuda and padded) * B * S * low  # SDPA's memory-efficient kernel keeps the mask
    activations = embeddings + encoder + heads + mask_kept
    linears = m.num_layers * (4 * H * H + 2 * H * I) + 2 * H * H + 2 * H + m.vocab_size * H
    weight_copies = linears * 2 if autocast and not zero3_linear else 0
    return {"embeddings": embeddings, "per_layer": layer(S), "last_layer": layer(1 + K),
            "heads": heads + mask_kept, "activations": activations,
            "weight_copies": weight_copies, "total": activations + weight_copies,
            "residual_stream": {2: "16-bit", 4: "fp32"}[low]}


def bench_memory(config: str | None, overrides: list[str] = (), *, stages=(0, 1, 2, 3),
                 ranks: int = 2, seq_len: int | None = None, micro_batch: int | None = None,
                 steps: int = 2, vocab_size: int = 0, checkpoint_activations: bool = False,
                 timeout: int = 900) -> dict:
    """Launch `ranks` ranks per ZeRO stage with the deepspeed launcher (each runs
    mlm_dist.bench.memory_rank) and gather their byte counts next to the formula's."""
    # Here, not at the top: the rank module imports this one's formulas, and DeepSpeed, which
    # this process, launching the ranks, does not need.
    from mlm_dist.bench import memory_rank as bench_memory_rank

    cfg = bench_config(config, list(overrides), vocab_size)  # fails here, before any launch
    # bf16 under autocast holds fp32 weights and gradients: the fp32 formula applies
    precision = "fp32" if precision_for(cfg.train).fp32_weights else cfg.train.precision
    label = cfg.train.precision + (" autocast (fp32 weights and gradients)"
                                   if precision != cfg.train.precision else "")
    results = []
    for stage in stages:
        if stage not in (0, 1, 2, 3):
            raise UsageError(f"--stages: ZeRO stage {stage} does not exist; use 0, 1, 2 or 3")
    for stage in stages:
        port = free_port()
        with tempfile.TemporaryDirectory(prefix=f"bench-memory-z{stage}-") as tmp:
            cmd = launcher_command(ranks, port, "mlm_dist.bench.memory_rank",
                                   "--stage", str(stage), "--out", tmp, "--steps", str(steps),
                                   "--vocab-size", str(cfg.model.vocab_size))
            if config:
                cmd += ["--config", str(config)]
            if seq_len:
                cmd += ["--seq-len", str(seq_len)]
            if micro_batch:
                cmd += ["--micro-batch", str(micro_batch)]
            if checkpoint_activations:
                cmd.append("--checkpoint-activations")
            cmd += list(overrides)
            env = dict(os.environ, PYTHONUNBUFFERED="1")
            if not torch.cuda.is_available():
                env["DS_ACCELERATOR"] = "cpu"
                env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // ranks)))
            try:
                proc = subprocess.run(cmd, env=env, capture_output=True, text=True,
                                      timeout=timeout)
            finally:
                remove_shm_buffers(port)
            files = sorted(Path(tmp).glob("rank*.json"))
            if proc.returncode != 0 or len(files) != ranks:
                raise RanksFailedError(f"bench memory: ZeRO {stage} on {ranks} ranks failed "
                                       f"(exit {proc.returncode}):\n{proc.stdout[-3000:]}\n"
                                       f"{proc.stderr[-5000:]}")
            per_rank = [json.loads(f.read_text()) for f in files]
        psi = per_rank[0]["parameters"]
        predicted = zero_prediction(stage, psi, ranks, precision)
        results.append({"stage": stage, "predicted": predicted, "ranks": per_rank})
    return {"parameters": results[0]["ranks"][0]["parameters"] if results else 0,
            "ranks": ranks, "precision": label, "bytes_per_param_formula":
            "stage 0: (4+4+8)Ψ, 1: (4+4+8/N)Ψ, 2: (4+(4+8)/N)Ψ, 3: (4+4+12)Ψ/N"
            if precision == "fp32" else
            "stage 0: (2+2+12)Ψ, 1: (2+2+12/N)Ψ, 2: (2+(2+12)/N)Ψ, 3: (2+2+12)Ψ/N",
            "zero_settings": bench_memory_rank.ZERO_SETTINGS_NOTE,
            "activations_formula": "memory.activation_prediction; " + RESIDUAL_STREAM_NOTE,
            "stages": results}


def memory_table(report: dict) -> str:
    """A human-readable table (MiB) of measured vs predicted, one line per stage (rank 0)."""
    mib = 2 ** 20
    lines = [f"Ψ = {report['parameters'] / 1e6:.2f}M parameters, {report['ranks']} ranks, "
             f"{report['precision']}; MiB per rank (measured / formula: ZeRO's, and for "
             "activations (one micro-batch's, autocast's weight copies included) ours)",
             f"{'stage':>5} {'params':>17} {'grads':>17} {'optimizer':>17} {'total':>17} "
             f"{'activations':>17} {'peak RSS':>9} {'RSS-base':>9}"]
    for s in report["stages"]:
        r, p = s["ranks"][0], s["predicted"]

        def pair(measured, predicted):
            if predicted is None:
                return f"{measured / mib:8.1f}/{'-':<8}"
            return f"{measured / mib:8.1f}/{predicted / mib:<8.1f}"

        a = r["activations"]
        lines.append(f"{s['stage']:>5} "
                     + " ".join(pair(r[k], p[k]) for k in ("params", "grads", "optimizer", "total"))
                     + f" {pair(a['measured'], a['predicted'] and a['predicted']['total'])}"
                     f" {r['peak_rss'] / mib:9.0f}"
                     f" {(r['peak_rss'] - r['baseline_rss']) / mib:9.0f}")
    return "\n".join(lines)


def memory_command(args) -> None:
    report = bench_memory(args.config, args.overrides, stages=args.stages, ranks=args.ranks,
                          seq_len=args.seq_len, micro_batch=args.micro_batch, steps=args.steps,
                          vocab_size=args.vocab_size,
                          checkpoint_activations=args.checkpoint_activations)
    print(memory_table(report), file=sys.stderr)
    print(json.dumps(report, indent=2))
