"""Attention gets a mask only when a batch needs one: whether a batch has padding is known on the
host where it is built, carried with it, and the step then hands the model no mask (on CUDA,
SDPA can pick FlashAttention); the logits are those of an all-ones mask."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from mlm_dist.attention import AttentionPlan, attention_plan
from mlm_dist.bench.steps import TorchEngine
from mlm_dist.bench.workload import as_batch, synthetic_batch, synthetic_vocabulary
from mlm_dist.config import MaskingConfig, ModelConfig, ObjectiveConfig
from mlm_dist.data.batches import BatchWriter, PackedBatchWriter
from mlm_dist.masking import TokenMasker
from mlm_dist.model import BertForPretraining
from mlm_dist.objectives.bert import Bert
from mlm_dist.training.step import train_step

VOCAB = synthetic_vocabulary(100)
CFG = ModelConfig(vocab_size=100, hidden_size=32, num_layers=2, num_heads=4,
                  intermediate_size=64, max_positions=64)


def pair(length_a: int, length_b: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(10, 100, length_a), rng.integers(10, 100, length_b)


def full_rows(rows: int = 3, seq_len: int = 16) -> BatchWriter:
    writer = BatchWriter(rows, seq_len, VOCAB)
    for r in range(rows):
        writer.add(*pair(5, seq_len - 8, seed=r), label=r % 2)  # 3 + 5 + 8 = seq_len
    return writer


def test_attention_plan_is_a_function_of_device_padding_and_packing():
    for device in ("cuda", "xpu"):
        assert attention_plan(device, padded=False, packed=False) == AttentionPlan("sdpa", None)
        assert attention_plan(device, padded=True, packed=False) == AttentionPlan("sdpa", "padding")
        for padded in (False, True):
            plan = attention_plan(device, padded=padded, packed=True)
            assert plan == AttentionPlan("sdpa", "pairs")
    # A CPU keeps its written-out kernel, with the same masks.
    assert attention_plan("cpu", padded=False, packed=False) == AttentionPlan("matmul", None)
    assert attention_plan("cpu", padded=True, packed=False) == AttentionPlan("matmul", "padding")
    assert attention_plan("cpu", padded=False, packed=True) == AttentionPlan("matmul", "pairs")


def test_batches_know_on_the_host_whether_they_have_padding():
    full = full_rows().take()
    assert full.padded is False and full.padding_mask is None
    assert bool(full.attention_mask.all())
    writer = BatchWriter(3, 16, VOCAB)
    writer.add(*pair(5, 8), label=0)
    writer.add(*pair(2, 3), label=1)  # a short row
    writer.add(*pair(5, 8), label=0)
    short = writer.take()
    assert short.padded is True and short.padding_mask is short.attention_mask
    writer.add(*pair(5, 8), label=0)
    partial = writer.take_partial()  # filler rows are padded
    assert partial.padded is True
    packed = PackedBatchWriter(2, 16, VOCAB, pairs=2)
    for lengths in ((2, 3), (1, 1), (5, 8)):
        packed.add(*pair(*lengths), label=0)
    assert packed.take().padded is True  # 8 + 5 tokens in the first row: 3 positions left
    packed.add(*pair(2, 3), label=0)
    packed.add(*pair(2, 3), label=1)
    packed.add(*pair(5, 8), label=0)
    assert packed.take().padded is False  # two rows of exactly 16
    # bench's synthetic batches say the same, from the host arrays
    for seed in range(4):
        rows = synthetic_batch(100, batch=4, seq_len=16, seed=seed)
        assert as_batch(rows).padded == (not rows["attention_mask"].all())


@pytest.mark.parametrize("autocast", [False, True])
def test_no_mask_gives_the_logits_of_an_all_ones_mask(autocast):
    torch.manual_seed(0)
    model = BertForPretraining(CFG).eval()
    batch = full_rows().take()
    positions = torch.tensor([[1, 4], [2, 9], [3, 15]])
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        for masked in (None, positions):
            ones = model(batch.input_ids, batch.token_type_ids, batch.attention_mask, masked)
            none = model(batch.input_ids, batch.token_type_ids, None, masked)
            for a, b in zip(ones, none):
                assert torch.equal(a, b)


def test_the_step_hands_the_model_a_mask_only_for_a_padded_batch():
    """train_step itself, on a real model (bench's TorchEngine, as `bench train` runs it)."""
    torch.manual_seed(0)
    model = BertForPretraining(CFG).train()
    seen = []
    model.register_forward_pre_hook(lambda module, args: seen.append(args[2]))
    engine = TorchEngine(model, torch.optim.SGD(model.parameters(), lr=0.0),
                         device=torch.device("cpu"), precision="fp32", grad_clip=0.0)
    masker = TokenMasker(VOCAB, MaskingConfig(), max_predictions=3, seed=0, rank=0, device="cpu")
    writer = full_rows()
    full = writer.take()
    writer.add(*pair(2, 3), label=0)
    padded = writer.take_partial()
    losses = []
    train_step(engine, itertools.cycle([full, padded]), masker, Bert(ObjectiveConfig()), step=0,
               accumulation=2,
               record=lambda out, batch, masked: losses.append(out["loss"]))
    assert seen[0] is None
    assert seen[1] is not None and torch.equal(seen[1], padded.attention_mask)
    assert all(torch.isfinite(loss) for loss in losses)
    # In training (dropout drawn from the same seed) no mask computes what the mask did.
    masked = masker(full.input_ids, 0, 0, full.word_starts)
    torch.manual_seed(1)
    reference = model(masked.input_ids, full.token_type_ids, full.attention_mask, masked.positions)
    torch.manual_seed(1)
    unmasked = model(masked.input_ids, full.token_type_ids, None, masked.positions)
    assert all(torch.equal(a, b) for a, b in zip(reference, unmasked))
