"""Attention and dropout as each device computes them fastest, with the same numbers: the part of
the network whose kernel depends on where it runs.

It stands apart from model.py because every choice here is a function of its inputs (the
device type, whether a batch has padding or packed rows), never of the device itself, so the
CUDA path can be decided, and tested, on a CPU: `attention_plan` is the rule the model follows,
the tests check it, and `mlm-dist bench gpu` checks on a GPU that the kernel it is for runs.

- Attention gets a mask only when the batch needs one (`attention_plan`): the loader knows on
  the host whether a batch has padding, and the step passes no mask when it has none, so on
  CUDA PyTorch's SDPA can pick FlashAttention, which takes no mask. Packed rows always need
  their block-diagonal mask; `attention_plan` says why that mask, and not a kernel that skips
  the blocks between pairs, is the cheapest correct choice PyTorch offers.
- On a CPU, attention is the plain matmul-softmax-matmul, and dropout draws its mask from 16-bit
  slices of 64-bit random words: PyTorch's CPU SDPA runs its fused kernel only without dropout
  (with dropout it falls back to an unfused path, slower than this one), and its bernoulli_
  costs several times these random bits (`mlm-dist bench train` times the step). On CUDA both
  stay PyTorch's fused kernels. The same dropout serves the whole network (embeddings and
  residual branches too), so the model takes its `Dropout` from here.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F


class _CpuDropout(torch.autograd.Function):
    """Inverted dropout with the keep mask drawn from 16-bit slices of 64-bit random words:
    four mask entries per draw of the CPU generator. The drop probability is p rounded to a
    multiple of 1/65536 (0.1 -> 0.1000061), and the scale 1/(1 - that), so the output stays
    unbiased.

    The comparison writes the 0/1 mask straight into x's dtype (the saved mask, 2 bytes per
    entry in bf16), and forward and backward are one addcmul each, 0 + scale·x·mask: the
    scale is applied in float before the single rounding to x's dtype."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, p: float) -> torch.Tensor:
        drop = round(p * 65536)
        words = torch.randint(-2 ** 63, 2 ** 63 - 1, ((x.numel() + 3) // 4,), dtype=torch.int64,
                              device=x.device)
        keep = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        torch.ge(words.view(torch.int16)[:x.numel()].view(x.shape), drop - 32768, out=keep)
        ctx.scale = 65536 / (65536 - drop)
        ctx.save_for_backward(keep)
        return torch.addcmul(x.new_zeros(()), x, keep, value=ctx.scale)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (keep,) = ctx.saved_tensors
        return torch.addcmul(grad.new_zeros(()), grad, keep, value=ctx.scale), None


def dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    if not training or p == 0.0:
        return x
    if x.device.type == "cpu" and p < 1.0:
        return _CpuDropout.apply(x, p)
    return F.dropout(x, p, training=True)


class Dropout(nn.Module):
    """nn.Dropout with the faster CPU mask of `dropout` (no parameters, no state)."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class AttentionPlan(NamedTuple):
    kernel: str  # "sdpa": F.scaled_dot_product_attention; "matmul": written out (see attention)
    mask: str | None  # None, "padding" ([B, 1, 1, S]) or "pairs" ([B, 1, S, S], block-diagonal)


def attention_plan(device_type: str, *, padded: bool, packed: bool) -> AttentionPlan:
    """How a batch's attention is computed, from what is known without looking at the device:
    where it runs, and whether the batch has padding (`Batch.padded`, set where the batch is
    built) or packed rows.

    No padding, no packing: no mask, so on CUDA SDPA can pick FlashAttention (fp16/bf16;
    FlashAttention takes no mask). Padding: a [B, 1, 1, S] additive mask, which SDPA runs in
    its memory-efficient (or cuDNN) kernel. Packed rows: the block-diagonal [B, 1, S, S] mask,
    built once a forward and shared by every layer, through the memory-efficient kernel too.
    PyTorch (2.13) has kernels that skip the blocks between pairs instead of masking them, but
    none fits BERT's training step:
    - flex_attention with a document mask has no dropout on the attention probabilities
      (BERT's attention_dropout is 0.1), and is fast only under torch.compile;
    - torch.nn.attention.varlen.varlen_attn (FlashAttention over cumulative sequence lengths)
      runs with dropout 0, hard-coded;
    - nested (jagged) tensors through SDPA reach the same FlashAttention kernel with dropout,
      but in eager mode every operation on them is a Python __torch_dispatch__ call: wrapping
      q, k and v and transposing them alone took over 1 ms per layer on our CPU, host time an
      eager step on a GPU has no room for.
    What the mask wastes is the scores between pairs, a part of attention's two matmuls, which
    are S / (6 H) of the FLOPs of a layer's projections (11 % for BERT-base at S = 512, 3 % at
    128): that bounds the waste.
    On a CPU the kernel is always the written-out one (see `attention`), with the same masks.
    """
    return AttentionPlan(attention_kernel(device_type),
                         "pairs" if packed else "padding" if padded else None)


def attention_kernel(device_type: str) -> str:
    """"sdpa" (PyTorch's fused kernels) on anything but a CPU; there "matmul" (see attention)."""
    return "matmul" if device_type == "cpu" else "sdpa"


def attention_bias(plan: AttentionPlan, attention_mask: torch.Tensor | None,
                   sequence_ids: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """The additive mask of `plan` (None when it has none), in `dtype`, from the batch's
    attention_mask (padding) or its packed rows' sequence_ids (`model.Packing`: the pair of
    each token, 0 = padding). A large finite negative (not -inf, not a bool mask) keeps a row
    that is all padding finite instead of NaN. It is built from tensors already on the device:
    no host sync."""
    if plan.mask is None:
        return None
    if plan.mask == "padding":  # broadcasts over heads and queries: no query sees a padded key
        keep = attention_mask[:, None, None, :].to(dtype)
    else:  # a token sees the tokens of its own pair only
        ids = sequence_ids  # [B, S]
        keep = ((ids[:, None, :, None] == ids[:, None, None, :])
                & (ids[:, None, None, :] > 0)).to(dtype)
    return (1.0 - keep) * torch.finfo(dtype).min


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None,
              dropout_p: float, training: bool) -> torch.Tensor:
    """softmax(q kᵀ / √d + bias) v with dropout on the probabilities; [B, heads, S, d] in and out.
    bias None: no mask.

    CUDA (and anything not a CPU): F.scaled_dot_product_attention, flash / memory-efficient
    kernels with dropout inside. CPU: the same arithmetic written out, which at BERT's sequence
    lengths beats PyTorch's CPU SDPA with dropout (an unfused fallback) and without it.
    """
    if attention_kernel(q.device.type) == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias,
                                              dropout_p=dropout_p if training else 0.0)
    batch, heads, queries, head_dim = q.shape
    keys = k.shape[2]
    # One baddbmm computes bias + (q kᵀ)/√d: the scaling and the bias add ride on the matmul
    # instead of each taking a pass over q or the scores. The bias broadcasts over queries
    # (padding) or has a row per query (packed rows: each pair sees only itself). Without a
    # bias, beta=0 ignores the (0-dim) input: the same numbers as adding a bias of zeros.
    if bias is None:
        bias, beta = q.new_zeros(()), 0.0
    else:
        rows, beta = bias.shape[2], 1.0
        bias = bias.expand(batch, heads, rows, keys).reshape(batch * heads, rows, keys)
    scores = torch.baddbmm(bias,
                           q.reshape(batch * heads, queries, head_dim),
                           k.reshape(batch * heads, keys, head_dim).transpose(1, 2),
                           beta=beta, alpha=1.0 / math.sqrt(head_dim))
    probs = torch.softmax(scores, dim=-1).view(batch, heads, queries, keys)
    return torch.matmul(dropout(probs, dropout_p, training), v)
