"""Model FLOPs per token and the device's peak FLOP/s: the two halves of MFU.

MFU (model FLOPs utilisation) = tokens/s x model FLOPs per token / peak FLOP/s. "Model" FLOPs
count the matmuls the network needs, whatever the implementation does (so activation
recomputation does not raise it); for BERT with a masked-LM head on `p` of the positions:

    6·L·(4H² + 2HI)      encoder matmuls (q, k, v, out: 4H²; FFN up and down: 2HI), x2 forward
                         multiply-add, x3 for forward + backward
  + 12·L·S·H             attention scores QKᵀ and the weighted sum AV (S keys per query)
  + 6·p·(H² + HV)        MLM head: transform H² and vocabulary projection HV, on a share p of
                         the tokens (p = K/S for a head that projects only K slots per
                         sequence, 1 for one that projects every position)

A network whose last layer computes only the positions the heads read (ours: [CLS] and the K
slots, a share f = (K+1)/S) needs less of that layer: its keys and values still run on every
position (2H² of the 4H²), its queries, output projection and FFN on f of them, and its
attention on f of the queries:

  - 6·(1 - f)·(2H² + 2HI) - 12·(1 - f)·S·H

Embedding lookups, LayerNorm, GELU, softmax and the tiny pooler/NSP head are left out, as in
the usual (Megatron/PaLM) accounting.

ELECTRA (`electra_flops_per_token`) trains two networks a step. The discriminator is the
encoder above with every position computed (its head reads them all) and a per-token head,
dense and one logit: 6·(H² + H). The generator is an encoder of its own shape (Lg, Hg, Ig:
config.generator_config) reading the K slots only, plus the projection of the shared
embeddings to its width, 6·H·Hg (when Hg ≠ H), and its MLM head on K/S of the positions,
6·(K/S)·(Hg·H + H·V). Sampling (noise and an argmax) is elementwise, left out.

The peak is the dense matmul throughput of the device for the training dtype: a table of
vendor figures for known CUDA GPUs (dense, no sparsity), otherwise measured by timing a large
matmul once (the only honest figure for a CPU, whose clock, core count and ISA vary), and in
every case overridable.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch

# Dense tensor-core peaks in TFLOP/s: (bf16, fp16, fp32). fp32 is the plain (non-TF32) figure,
# since TF32 is off by default for matmuls in PyTorch. None = the dtype has no fast path there.
# Names are matched as substrings of torch.cuda.get_device_name(), longest key first.
CUDA_PEAK_TFLOPS: dict[str, tuple[float | None, float | None, float]] = {
    "B200": (2250.0, 2250.0, 80.0),
    "B100": (1750.0, 1750.0, 60.0),
    "GH200": (989.0, 989.0, 67.0),
    "H200": (989.0, 989.0, 67.0),
    "H100 SXM": (989.0, 989.0, 67.0),
    "H100 NVL": (835.0, 835.0, 60.0),
    "H100 PCIe": (756.0, 756.0, 51.0),
    "H100": (989.0, 989.0, 67.0),  # unnamed variant: assume SXM
    "H800": (989.0, 989.0, 67.0),
    "H20": (148.0, 148.0, 44.0),
    "L40S": (362.0, 362.0, 91.6),
    "L40": (181.0, 181.0, 90.5),
    "L4": (121.0, 121.0, 30.3),
    "A100": (312.0, 312.0, 19.5),
    "A800": (312.0, 312.0, 19.5),
    "A40": (149.7, 149.7, 37.4),
    "A30": (165.0, 165.0, 10.3),
    "A10": (125.0, 125.0, 31.2),
    "RTX A6000": (154.8, 154.8, 38.7),
    "RTX 6000 Ada": (364.2, 364.2, 91.1),
    "RTX 4090": (165.2, 165.2, 82.6),
    "RTX 3090": (71.0, 71.0, 35.6),
    "V100": (None, 125.0, 15.7),
    "T4": (None, 65.0, 8.1),
}

_DTYPE_COLUMN = {torch.bfloat16: 0, torch.float16: 1, torch.float32: 2}
_measured: dict[tuple[str, torch.dtype], float] = {}


def model_flops_per_token(cfg_model, seq_len: int, predicted_fraction: float,
                          last_layer_fraction: float = 1.0) -> float:
    """Training FLOPs (forward + backward) per token, by the formulas in the module docstring.

    cfg_model: a ModelConfig (num_layers, hidden_size, intermediate_size, vocab_size).
    predicted_fraction: share of positions the MLM head projects onto the vocabulary
    (max_predictions / seq_len for our sparse head, 1.0 for a dense one).
    last_layer_fraction: share of positions the last layer computes outputs for (1.0: all).
    """
    H, vocab = cfg_model.hidden_size, cfg_model.vocab_size
    _check_share("predicted_fraction", predicted_fraction)
    return (encoder_flops_per_token(cfg_model, seq_len, last_layer_fraction)
            + 6 * predicted_fraction * (H * H + H * vocab))


def _check_share(name: str, share: float) -> None:
    if not 0.0 <= share <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {share}")


def encoder_flops_per_token(cfg_model, seq_len: int, last_layer_fraction: float = 1.0) -> float:
    """Training FLOPs per token of the encoder layers alone (no head): the first two lines of
    the module docstring's formula, less what a last layer computing `last_layer_fraction` of
    the positions skips."""
    L, H, inter = cfg_model.num_layers, cfg_model.hidden_size, cfg_model.intermediate_size
    _check_share("last_layer_fraction", last_layer_fraction)
    unread = 1.0 - last_layer_fraction
    return (6 * L * (4 * H * H + 2 * H * inter) + 12 * L * seq_len * H
            - 6 * unread * (2 * H * H + 2 * H * inter) - 12 * unread * seq_len * H)


def sparse_flops_per_token(cfg_model, seq_len: int, max_predictions: int) -> float:
    """model_flops_per_token for our BertForPretraining given K = max_predictions slots: the
    head projects K of the S positions, the last layer computes [CLS] and the K slots."""
    return model_flops_per_token(cfg_model, seq_len, max_predictions / seq_len,
                                 min(1.0, (max_predictions + 1) / seq_len))


def electra_flops_per_token(cfg_model, generator, seq_len: int, max_predictions: int) -> float:
    """Training FLOPs per token of ELECTRA's step (module docstring): the discriminator
    (`cfg_model`, every position) and the generator (`generator`: its ModelConfig,
    config.generator_config) on K = max_predictions slots."""
    H, Hg, vocab = cfg_model.hidden_size, generator.hidden_size, cfg_model.vocab_size
    slots = max_predictions / seq_len
    _check_share("max_predictions / seq_len", slots)
    discriminator = encoder_flops_per_token(cfg_model, seq_len) + 6 * (H * H + H)
    projection = 6 * H * Hg if Hg != H else 0
    return (discriminator + projection + encoder_flops_per_token(generator, seq_len, slots)
            + 6 * slots * (Hg * H + H * vocab))


def cuda_peak_from_table(device_name: str, dtype: torch.dtype) -> float | None:
    """FLOP/s from CUDA_PEAK_TFLOPS for a device name, or None if unknown / no fast path."""
    column = _DTYPE_COLUMN.get(dtype)
    if column is None:
        return None
    for key in sorted(CUDA_PEAK_TFLOPS, key=len, reverse=True):
        if key.lower() in device_name.lower():
            tflops = CUDA_PEAK_TFLOPS[key][column]
            return None if tflops is None else tflops * 1e12
    return None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class MatmulTimer:
    """Times one n x n x n matmul in `dtype` on `device`; call() returns FLOP/s of one run.

    The benchmark calls it between training steps, so noise from a shared machine hits the
    peak and the steps alike."""

    device: torch.device
    dtype: torch.dtype
    size: int = 4096

    def __post_init__(self):
        self.device = torch.device(self.device)
        g = torch.Generator(device="cpu").manual_seed(0)
        a = torch.randn(self.size, self.size, generator=g)
        self.a = a.to(self.device, self.dtype)
        self.b = a.t().contiguous().to(self.device, self.dtype)
        self.out = torch.empty(self.size, self.size, device=self.device, dtype=self.dtype)
        self.flops = 2.0 * self.size ** 3

    def __call__(self) -> float:
        _sync(self.device)
        start = time.perf_counter()
        torch.mm(self.a, self.b, out=self.out)
        _sync(self.device)
        return self.flops / (time.perf_counter() - start)


def measure_matmul_peak(device: torch.device | str, dtype: torch.dtype, size: int = 4096,
                        repeats: int = 5, warmup: int = 2) -> dict:
    """Time `repeats` n x n matmuls after `warmup`: {"best", "median"} FLOP/s."""
    timer = MatmulTimer(torch.device(device), dtype, size)
    for _ in range(warmup):
        timer()
    runs = [timer() for _ in range(repeats)]
    return {"best": max(runs), "median": statistics.median(runs), "size": size, "runs": runs}


def device_peak_flops(device: torch.device | str, dtype: torch.dtype,
                      override: float | None = None, size: int = 4096) -> tuple[float, str]:
    """(peak FLOP/s, where it came from) for MFU on `device` in `dtype`.

    override > 0 wins ("override"); a CUDA device listed in CUDA_PEAK_TFLOPS takes the table
    ("table: <name>"); anything else (a CPU, an unknown GPU) is measured once per process with
    a size x size matmul and cached ("measured").
    """
    device = torch.device(device)
    if override:
        return float(override), "override"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = cuda_peak_from_table(name, dtype)
        if peak is not None:
            return peak, f"table: {name}"
    key = (str(device), dtype)
    if key not in _measured:
        _measured[key] = measure_matmul_peak(device, dtype, size=size)["best"]
    return _measured[key], "measured"


def mfu(tokens_per_s: float, flops_per_token: float, peak_flops: float) -> float:
    return tokens_per_s * flops_per_token / peak_flops
