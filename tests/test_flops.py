"""The FLOPs formula against a count done by hand, and the device peak (table, override, measured)."""

from __future__ import annotations

import pytest
import torch

from mlm_dist.config import ModelConfig
from mlm_dist.flops import (cuda_peak_from_table, device_peak_flops, measure_matmul_peak, mfu,
                            model_flops_per_token)


def test_bert_base_flops_per_token_by_hand():
    cfg = ModelConfig(vocab_size=30522)  # BERT-base: L=12, H=768, I=3072
    # Per layer and token, forward multiply-adds: q,k,v,out 4·768² = 2,359,296; FFN
    # 2·768·3072 = 4,718,592; attention at S=128: 2·128·768 = 196,608. Head on every
    # position: 768² + 768·30522 = 24,030,720. Training = 3 passes x 2 FLOPs per multiply-add.
    per_layer = 2_359_296 + 4_718_592 + 196_608
    dense = 6 * (12 * per_layer + 24_030_720)
    assert model_flops_per_token(cfg, 128, 1.0) == dense == 667_948_032
    # A sparse head projecting 20 of 128 positions pays 20/128 of the head.
    sparse = model_flops_per_token(cfg, 128, 20 / 128)
    assert sparse == pytest.approx(6 * (12 * per_layer + 24_030_720 * 20 / 128))
    # The attention term grows with the sequence: at 512 it is 4x that at 128.
    grow = model_flops_per_token(cfg, 512, 0.0) - model_flops_per_token(cfg, 128, 0.0)
    assert grow == 12 * 12 * (512 - 128) * 768
    with pytest.raises(ValueError):
        model_flops_per_token(cfg, 128, 1.5)


def test_cuda_table_matches_names_and_dtypes():
    assert cuda_peak_from_table("NVIDIA A100-SXM4-80GB", torch.bfloat16) == 312e12
    assert cuda_peak_from_table("NVIDIA A10", torch.bfloat16) == 125e12
    assert cuda_peak_from_table("NVIDIA H100 PCIe", torch.bfloat16) == 756e12
    assert cuda_peak_from_table("NVIDIA H100 80GB HBM3", torch.bfloat16) == 989e12
    assert cuda_peak_from_table("NVIDIA L40S", torch.float16) == 362e12
    assert cuda_peak_from_table("NVIDIA L4", torch.float32) == 30.3e12
    assert cuda_peak_from_table("Tesla V100-SXM2-32GB", torch.float16) == 125e12
    assert cuda_peak_from_table("Tesla V100-SXM2-32GB", torch.bfloat16) is None  # no bf16 there
    assert cuda_peak_from_table("Some Future GPU", torch.bfloat16) is None


def test_peak_override_and_measurement():
    assert device_peak_flops("cpu", torch.float32, override=1.5e12) == (1.5e12, "override")
    measured = measure_matmul_peak("cpu", torch.float32, size=128, repeats=3, warmup=1)
    assert measured["best"] >= measured["median"] > 0 and len(measured["runs"]) == 3
    peak, source = device_peak_flops("cpu", torch.float32, size=128)
    assert source == "measured" and peak > 0
    assert device_peak_flops("cpu", torch.float32, size=128) == (peak, "measured")  # cached
    assert mfu(1000.0, 2e9, 4e12) == pytest.approx(0.5)
