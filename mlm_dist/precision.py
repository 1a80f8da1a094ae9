"""How a run computes, decided once from train.precision and train.grad_accum_dtype (by the
pre-flight, which hands the Precision on): the DeepSpeed JSON asks for it
(engine.deepspeed_config), the engine is checked against it after it starts
(engine.check_engine_precision), and the optimizer's non-finite guard and the memory bench read
from it whether weights stay fp32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mlm_dist.config import TrainConfig


@dataclass(frozen=True)
class Precision:
    """How an engine computes: torch autocast and its dtype, DeepSpeed's bf16 or fp16 mode
    (low-precision weights and an fp32 master copy); none of them is fp32."""
    autocast: torch.dtype | None = None
    bf16: bool = False
    fp16: bool = False

    @property
    def fp32_weights(self) -> bool:
        """Weights and gradients held in fp32: under fp32, and under autocast."""
        return not (self.bf16 or self.fp16)

    def __str__(self) -> str:
        if self.autocast is not None:
            return f"{str(self.autocast).removeprefix('torch.')} autocast with fp32 weights"
        modes = [name for name, on in (("bf16", self.bf16), ("fp16", self.fp16)) if on]
        return " and ".join(f"DeepSpeed's {m} mode" for m in modes) or "fp32"


def precision_for(train: TrainConfig) -> Precision:
    """The Precision a run asks for. bf16 with fp32 gradients (the default) is bf16 autocast:
    fp32 weights (which are the master weights), the forward under torch.autocast, so gradients
    are accumulated over micro-batches and reduced across ranks in fp32, as Megatron and
    NVIDIA's BERT do. DeepSpeed's own bf16 mode (grad_accum_dtype=bf16) keeps bf16 weights and
    accumulates and all-reduces their gradients in bf16 (8 bits of mantissa: small contributions
    of later micro-batches round away); its fp32 `grad_accum_dtype` exists only for ZeRO 1.
    fp32 weights take the place of the fp32 master copy, so only ZeRO 1 and 2 (which keep
    unpartitioned weights) hold more bytes; `mlm-dist bench memory` measures how many."""
    if train.precision == "bf16" and train.grad_accum_dtype == "fp32":
        return Precision(autocast=torch.bfloat16)
    return Precision(bf16=train.precision == "bf16", fp16=train.precision == "fp16")
