"""The attention part of `mlm-dist bench gpu`: what the model's attention plan
(mlm_dist/attention.py) asks of the device at hand. For rows without padding, with padding and
packed: the plan; on CUDA, for the model's shapes in the training dtype, the kernel SDPA picks,
and whether the kernel the plan is for (FlashAttention without a mask, the memory-efficient
kernel with one) really runs, forward and backward, or PyTorch's reasons why not.

A part of its own because it drives SDPA directly, kernel by kernel, on tensors made here; the
rest of the check runs the training code as it is (bench/gpu.py).
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from mlm_dist.attention import attention_bias, attention_plan
from mlm_dist.bench.steps import torch_dtype
from mlm_dist.model import Packing

# Batches of each kind, as (padded, packed) for attention_plan.
ATTENTION_CASES = {"no_padding": (False, False), "padding": (True, False),
                   "packed": (True, True)}


def attention_report(cfg, device) -> dict:
    """The plan of each kind of batch on `device`; on CUDA, the kernels at each of the config's
    (seq_len, micro_batch), with "ok": whether every kernel expected to run ran."""
    report: dict = {"plans": {case: attention_plan(device.type, padded=padded,
                                                   packed=packed)._asdict()
                              for case, (padded, packed) in ATTENTION_CASES.items()}}
    if device.type != "cuda":
        report["kernels"] = {"skipped": f"on {device.type} the model computes attention itself "
                                        "(kernel \"matmul\"); FlashAttention and the "
                                        "memory-efficient kernel are CUDA kernels"}
        return report
    lengths = sorted({(p.seq_len, p.micro_batch) for p in cfg.schedule.phases})
    report["kernels"] = {f"seq_{seq_len}": sdpa_kernels(cfg, seq_len, micro_batch, device)
                         for seq_len, micro_batch in lengths}
    report["ok"] = all(k["ok"] for k in report["kernels"].values())
    return report


def flash_expected(capability: tuple[int, int], dtype) -> bool:
    """PyTorch's FlashAttention runs fp16 and bf16 on Ampere (compute capability 8.0) and
    newer: A100, H100 and their kin must run it."""
    return dtype in (torch.float16, torch.bfloat16) and tuple(capability) >= (8, 0)


def sdpa_kernels(cfg, seq_len: int, micro_batch: int, device) -> dict:
    """For each kind of batch, SDPA on q, k, v and the mask the model would give it: the kernel
    SDPA picks, and whether the kernel the plan is for runs (FlashAttention without a mask,
    the memory-efficient kernel with one)."""
    m = cfg.model
    dtype = torch_dtype(cfg.train.precision)
    shape = (micro_batch, m.num_heads, seq_len, m.hidden_size // m.num_heads)
    flash = flash_expected(torch.cuda.get_device_capability(device), dtype)
    attention_mask, packing = example_masks(micro_batch, seq_len, device)
    result: dict = {"dtype": str(dtype).removeprefix("torch."), "shape": list(shape),
                    "dropout": m.attention_dropout}
    ok = True
    for case, (padded, packed) in ATTENTION_CASES.items():
        bias = attention_bias(attention_plan("cuda", padded=padded, packed=packed),
                              attention_mask, packing.sequence_ids, dtype)
        q, k, v = (torch.randn(shape, device=device, dtype=dtype, requires_grad=True)
                   for _ in range(3))
        kernel = SDPBackend.FLASH_ATTENTION if bias is None else SDPBackend.EFFICIENT_ATTENTION
        expected = flash if kernel == SDPBackend.FLASH_ATTENTION else True
        picks = SDPBackend(torch._fused_sdp_choice(q, k, v, bias, m.attention_dropout, False))
        runs = kernel_runs(kernel, q, k, v, bias, m.attention_dropout)
        result[case] = {"sdpa_picks": picks.name, "kernel": kernel.name, **runs,
                        "expected": expected}
        ok = ok and (runs["runs"] or not expected)
    result["ok"] = ok
    return result


def example_masks(batch: int, seq_len: int, device):
    """A padding mask (each row's last eighth is padding) and packed rows (two pairs each, then
    the same padding), as the loader makes them, for the model's masks."""
    positions = torch.arange(seq_len, device=device)
    real, half = seq_len - seq_len // 8, (seq_len - seq_len // 8) // 2
    attention_mask = (positions < real).long().expand(batch, seq_len)
    sequence_ids = torch.where(positions < half, 1, torch.where(positions < real, 2, 0))
    position_ids = torch.where(positions < half, positions, positions - half) * (sequence_ids > 0)
    cls_positions = torch.tensor([0, half], device=device)
    return attention_mask, Packing(position_ids.expand(batch, seq_len),
                                   sequence_ids.expand(batch, seq_len),
                                   cls_positions.expand(batch, 2))


def kernel_runs(kernel, q, k, v, bias, dropout_p: float) -> dict:
    """Whether SDPA runs `kernel` on these inputs, forward and backward (backward runs the
    forward's kernel); if not, PyTorch's reasons (it warns them before it refuses)."""
    with warnings.catch_warnings(record=True) as reasons:
        warnings.simplefilter("always")
        try:
            with sdpa_kernel([kernel]):
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias,
                                                     dropout_p=dropout_p)
            out.float().sum().backward()
            torch.cuda.synchronize(q.device)
            return {"runs": True}
        except RuntimeError as e:
            why = [str(w.message).split(" (Triggered internally")[0] for w in reasons]
            return {"runs": False, "why": why + [str(e).splitlines()[0]]}
