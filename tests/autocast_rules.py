"""CUDA autocast's rules that a CPU-only test needs, reproduced on CPU autocast."""

from __future__ import annotations

import contextlib

import torch


@contextlib.contextmanager
def cuda_layer_norm_rule():
    """CUDA autocast's rule for layer_norm, on CPU autocast: inputs cast to fp32, fp32 out. CUDA
    lists layer_norm among its fp32 ops; CPU autocast leaves it alone (its kernel takes a bf16
    input with fp32 weights and returns bf16), so without this a CPU cannot show a GPU's dtypes.
    That this is CUDA's rule and not the CPU's is read from the torch build's dispatcher
    (`layer_norm_rule_is_cudas`)."""
    lib = torch.library.Library("aten", "IMPL")

    def layer_norm_in_fp32(x, shape, weight=None, bias=None, eps=1e-5, cudnn_enable=True):
        def up(t):
            return None if t is None else t.float()

        with torch.autocast("cpu", enabled=False):
            return torch.ops.aten.layer_norm(up(x), shape, up(weight), up(bias), eps, cudnn_enable)

    lib.impl("layer_norm", layer_norm_in_fp32, "AutocastCPU")
    try:
        yield
    finally:
        lib._destroy()


def layer_norm_rule_is_cudas() -> bool:
    """CUDA autocast has a kernel of its own for layer_norm (its fp32 rule); CPU autocast none."""
    has_kernel = torch._C._dispatch_has_kernel_for_dispatch_key
    return (has_kernel("aten::layer_norm", "AutocastCUDA")
            and not has_kernel("aten::layer_norm", "AutocastCPU"))
