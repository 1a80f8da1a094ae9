"""The FLOPs formula against a count done by hand, and the device peak (table, override, measured)."""

from __future__ import annotations

import pytest
import torch

from mlm_dist.config import ModelConfig
from mlm_dist.flops import (cuda_peak_from_table, device_peak_flops, measure_matmul_peak, mfu,
                            model_flops_per_token, sparse_flops_per_token)


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


def test_sparse_last_layer_flops_by_hand():
    cfg = ModelConfig(vocab_size=30522)
    # Ours at S=128, K=20: the head on 20 positions; the last layer's k and v projections on
    # all 128 (2·768² each token), its q, out, FFN and attention on the 21 it outputs.
    head = 24_030_720 * 20 / 128
    full_layer = 2_359_296 + 4_718_592 + 196_608
    last_layer = 2 * 589_824 + (2 * 589_824 + 4_718_592 + 196_608) * 21 / 128
    expected = 6 * (11 * full_layer + last_layer + head)
    assert sparse_flops_per_token(cfg, 128, 20) == pytest.approx(expected)
    assert model_flops_per_token(cfg, 128, 20 / 128, 21 / 128) == pytest.approx(expected)
    # Every position read: the dense count.
    assert sparse_flops_per_token(cfg, 4, 4) == model_flops_per_token(cfg, 4, 1.0)
    with pytest.raises(ValueError, match="last_layer_fraction"):
        model_flops_per_token(cfg, 128, 0.1, -0.5)


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
