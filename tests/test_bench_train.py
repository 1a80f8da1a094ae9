"""bench train / bench memory: they run, report every figure, and the arithmetic between the
figures holds. No timing assertions: the machine is shared and noisy."""

from __future__ import annotations


import numpy as np
import pytest

from mlm_dist.bench.memory import activation_prediction, bench_memory, zero_prediction
from mlm_dist.bench.memory_rank import SavedTensorBytes
from mlm_dist.bench.train import bench_config, bench_train, phase_for
from mlm_dist.bench.workload import synthetic_batch
from mlm_dist.cli import build_parser
from mlm_dist.config import ModelConfig
from mlm_dist.flops import model_flops_per_token, sparse_flops_per_token
from mlm_dist.model import BertForPretraining
from mlm_dist.tokenizer import CLS_ID, PAD_ID, SEP_ID

from autocast_rules import cuda_layer_norm_rule, layer_norm_rule_is_cudas
from launch import REPO

TINY = str(REPO / "configs" / "tiny.yaml")
BASE = str(REPO / "configs" / "bert-base.yaml")
SMALL = ["model.hidden_size=32", "model.num_layers=2", "model.num_heads=2",
         "model.intermediate_size=64", "model.max_positions=128"]


def test_bench_train_reports_consistent_figures():
    pytest.importorskip("transformers")
    cfg = bench_config(TINY, SMALL, vocab_size=500)
    r = bench_train(cfg, seq_len=32, micro_batch=4, steps=2, warmup=1, compare_hf=True,
                    precision="bf16", matmul_size=64)
    assert r["tokens_per_step"] == 4 * 32 and r["precision"] == "bf16 autocast"
    assert r["peak"]["dtype"] == "bfloat16" and r["peak"]["flops_per_s"] > 0
    ours, hf = r["ours"], r["hf"]
    assert ours["sparse_head"] is True and hf["sparse_head"] is False
    k = ours["max_predictions"]
    assert ours["predicted_fraction"] == pytest.approx(k / 32, abs=1e-4) and hf["predicted_fraction"] == 1.0
    model = ModelConfig(vocab_size=500, hidden_size=32, num_layers=2, num_heads=2,
                        intermediate_size=64, max_positions=128)
    assert ours["sparse_last_layer"] is True and hf["sparse_last_layer"] is False
    assert ours["flops_per_token"] == sparse_flops_per_token(model, 32, k)
    assert ours["flops_per_token"] < model_flops_per_token(model, 32, k / 32)
    assert hf["flops_per_token"] == model_flops_per_token(model, 32, 1.0)
    for side in (ours, hf):
        assert side["tokens_per_s"] > 0 and side["step_ms"] >= side["step_ms_min"] > 0
        assert side["model_flops_per_s"] == pytest.approx(side["tokens_per_s"] * side["flops_per_token"], rel=1e-3)
        assert side["mfu"] == pytest.approx(side["model_flops_per_s"] / r["peak"]["flops_per_s"], abs=1e-4)
    assert hf["collator_ms"] > 0
    assert r["ratio"] == pytest.approx(ours["tokens_per_s"] / hf["tokens_per_s"], abs=2e-3)
    spread = r["ratio_per_round"]
    assert spread["min"] <= spread["median"] <= spread["max"]


def test_bench_train_on_real_shards_counts_real_tokens(tiny_shards):
    """Real batches: both sides get the same pairs; HF pads each batch to its longest row, we
    to seq_len; real tokens per second, fill and MFU on real tokens are reported per side."""
    pytest.importorskip("transformers")
    from mlm_dist.data.shards import Manifest

    cfg = bench_config(TINY, SMALL, vocab_size=Manifest.load(tiny_shards).tokenizer.vocab_size)
    r = bench_train(cfg, shards=str(tiny_shards), seq_len=64, micro_batch=4, steps=3,
                    warmup=1, compare_hf=True, precision="bf16", matmul_size=64)
    ours, hf = r["ours"], r["hf"]
    assert r["data"].startswith("4 micro-batches of")
    assert 0 < ours["fill"] < 1 and ours["fill"] <= hf["fill"] <= 1
    for side in (ours, hf):
        assert side["real_tokens_per_s"] > 0
        # mfu_real is printed to 4 decimals: half a unit of the last one, on a slow machine
        # more than the relative tolerance
        assert side["mfu_real"] == pytest.approx(
            side["real_tokens_per_s"] * side["flops_per_token"] / r["peak"]["flops_per_s"],
            rel=2e-3, abs=5e-5)
    assert r["real_tokens_ratio"] == pytest.approx(
        ours["real_tokens_per_s"] / hf["real_tokens_per_s"], abs=2e-3)
    packed = bench_train(bench_config(TINY, [*SMALL, "data.pack=true"],
                                      vocab_size=cfg.model.vocab_size),
                         shards=str(tiny_shards), seq_len=64, micro_batch=4, steps=2, warmup=1,
                         compare_hf=True, precision="bf16", matmul_size=64)
    # Packed rows: more real tokens per position for ours; HF still a pair a row.
    assert packed["ours"]["fill"] > ours["fill"] and packed["hf"]["fill"] <= 1
    with pytest.raises(ValueError, match="--shards"):
        bench_train(bench_config(TINY, SMALL, vocab_size=300), shards=str(tiny_shards),
                    seq_len=64, micro_batch=4, steps=1)


def test_bench_train_alone_with_checkpointing_and_fp32():
    cfg = bench_config(TINY, SMALL, vocab_size=300)
    r = bench_train(cfg, seq_len=16, micro_batch=2, steps=1, warmup=0, precision="fp32",
                    checkpoint_activations=True, matmul_size=32)
    assert "hf" not in r and "ratio" not in r and r["checkpoint_activations"]
    assert r["peak"]["dtype"] == "float32" and r["ours"]["mfu"] > 0
    with pytest.raises(ValueError, match="fp16 needs a CUDA"):
        bench_train(cfg, seq_len=16, micro_batch=2, steps=1, precision="fp16", device="cpu")
    with pytest.raises(ValueError, match="max_positions"):
        bench_train(cfg, seq_len=256, micro_batch=2, steps=1)


def test_phase_defaults_come_from_the_config():
    cfg = bench_config(BASE)
    assert cfg.model.vocab_size == 30522  # BERT's, when the config leaves it to the tokenizer
    short, long = phase_for(cfg, None, None, None), phase_for(cfg, 512, None, None)
    assert (short.seq_len, short.micro_batch, short.max_predictions) == (128, 32, 20)
    assert (long.seq_len, long.micro_batch, long.max_predictions) == (512, 8, 77)
    other = phase_for(cfg, 256, 4, None)  # no phase at 256: K derived from masking.prob
    assert other.micro_batch == 4 and other.max_predictions == 39
    assert phase_for(cfg, 128, 16, 24).max_predictions == 24


def test_synthetic_batch_layout():
    rows = synthetic_batch(1000, batch=40, seq_len=32, seed=3)
    ids, types, mask = rows["input_ids"], rows["token_type_ids"], rows["attention_mask"]
    assert ids.shape == types.shape == mask.shape == (40, 32)
    assert (ids[:, 0] == CLS_ID).all() and ((ids == SEP_ID).sum(1) == 2).all()
    assert ((ids == PAD_ID) == (mask == 0)).all() and (mask.sum(1) < 32).any()
    assert set(np.unique(rows["next_sentence_label"])) <= {0, 1}
    assert ((types == 1) <= (mask == 1)).all() and (types.sum(1) > 0).all()


def test_zero_formulas():
    # Ψ = 1000 parameters on N = 2 ranks, mixed precision Adam: 2Ψ + 2Ψ + 12Ψ bytes at stage 0.
    assert zero_prediction(0, 1000, 2, "bf16") == {"params": 2000, "grads": 2000,
                                                   "optimizer": 12000, "total": 16000}
    assert zero_prediction(1, 1000, 2, "bf16")["optimizer"] == 6000
    assert zero_prediction(2, 1000, 2, "bf16") == {"params": 2000, "grads": 1000,
                                                   "optimizer": 6000, "total": 9000}
    assert zero_prediction(3, 1000, 2, "bf16")["total"] == 16000 / 2
    assert zero_prediction(0, 1000, 4, "fp32")["total"] == (4 + 4 + 8) * 1000
    assert zero_prediction(3, 1000, 4, "fp32")["total"] == (4 + 4 + 12) * 1000 / 4


def saved_by_forward(cfg: ModelConfig, micro_batch: int, seq_len: int, k: int, precision: str):
    """What one training forward of our model keeps for backward, as bench memory counts it."""
    import torch

    from mlm_dist.bench.workload import as_batch

    torch.manual_seed(0)
    model = BertForPretraining(cfg).train()
    if precision == "low":
        model = model.bfloat16()
    batch = as_batch(synthetic_batch(cfg.vocab_size, micro_batch, seq_len, seed=1))
    positions = torch.arange(1, k + 1).repeat(micro_batch, 1)
    with SavedTensorBytes() as saved, torch.autocast("cpu", dtype=torch.bfloat16,
                                                    enabled=precision == "autocast"):
        model(batch.input_ids, batch.token_type_ids, batch.padding_mask, positions)
    return saved.total


@pytest.mark.parametrize("micro_batch, seq_len, k, dropout, precision", [
    (3, 16, 4, 0.1, "autocast"), (1, 16, 3, 0.1, "autocast"), (2, 32, 5, 0.0, "fp32"),
    (3, 16, 4, 0.1, "fp32"), (4, 16, 3, 0.1, "low")])
def test_activation_formula_is_what_the_forward_keeps(micro_batch, seq_len, k, dropout, precision):
    cfg = ModelConfig(vocab_size=300, hidden_size=64, num_layers=3, num_heads=4,
                      intermediate_size=128, max_positions=64, dropout=dropout,
                      attention_dropout=dropout)
    predicted = activation_prediction(cfg, micro_batch, seq_len, k, precision=precision,
                                      device_type="cpu")
    assert saved_by_forward(cfg, micro_batch, seq_len, k, precision) == predicted["total"]
    assert predicted["total"] == predicted["activations"] + predicted["weight_copies"]
    assert (predicted["weight_copies"] > 0) == (precision == "autocast")
    assert predicted["residual_stream"] == ("fp32" if precision == "fp32" else "16-bit")


def test_activation_formula_under_cuda_autocasts_layer_norm_rule():
    """On a GPU, autocast runs layer_norm in fp32: each keeps an fp32 copy of its input, and
    nothing else changes, because the residual stream stays 16-bit (model.LayerNorm casts
    back). Left fp32, the stream would be cast again by each of the q, k, v projections."""
    assert layer_norm_rule_is_cudas()
    cfg = ModelConfig(vocab_size=300, hidden_size=64, num_layers=3, num_heads=4,
                      intermediate_size=128, max_positions=64)
    with cuda_layer_norm_rule():
        saved = saved_by_forward(cfg, 3, 16, 4, "autocast")
    predicted = activation_prediction(cfg, 3, 16, 4, precision="autocast", device_type="cpu",
                                      layer_norm_in_fp32=True)
    assert saved == predicted["total"]
    # BERT-base at seq 128, micro-batch 32 on a GPU: SDPA keeps no [S, S] tensor, so a layer
    # keeps less than on a CPU, even with the fp32 LayerNorm inputs.
    base = ModelConfig(vocab_size=30522)
    cpu, cuda = (activation_prediction(base, 32, 128, 20, precision="autocast", device_type=d)
                 for d in ("cpu", "cuda"))
    assert cuda["residual_stream"] == "16-bit" and cuda["per_layer"] < cpu["per_layer"]
    assert cuda["weight_copies"] == cpu["weight_copies"] > 0
    zero3 = activation_prediction(base, 32, 128, 20, precision="autocast", device_type="cuda",
                                  zero3_linear=True)
    assert zero3["weight_copies"] == 0 and zero3["activations"] < cuda["activations"]


def test_cli_registration():
    parser = build_parser()
    args = parser.parse_args(["bench", "train", "--config", BASE, "--seq-len", "128", "--micro-batch", "16",
                              "--steps", "4", "--compare-hf", "--precision", "bf16",
                              "model.num_layers=4"])
    assert args.compare_hf and args.overrides == ["model.num_layers=4"] and args.func
    args = parser.parse_args(["bench", "memory", "--config", BASE, "--stages", "0", "3"])
    assert args.stages == [0, 3] and args.ranks == 2


def test_bench_memory_follows_zero_formulas():
    """Two real CPU ranks per stage under the deepspeed launcher."""
    report = bench_memory(TINY, [*SMALL, "train.precision=bf16"], stages=(0, 3), ranks=2,
                          seq_len=32, micro_batch=2, steps=2, vocab_size=1000)
    psi = report["parameters"]
    assert psi > 50_000 and [s["stage"] for s in report["stages"]] == [0, 3]
    for stage in report["stages"]:
        assert len(stage["ranks"]) == 2
        predicted = stage["predicted"]
        for rank in stage["ranks"]:
            for key in ("params", "grads", "optimizer"):
                assert rank[key] == pytest.approx(predicted[key], rel=0.1), (stage["stage"], key)
            assert rank["peak_rss"] > rank["baseline_rss"] > 0
            # what the forward kept for backward under the engine: our formula, to the byte
            activations = rank["activations"]
            assert activations["measured"] == activations["predicted"]["total"], stage["stage"]
    zero0, zero3 = (s["ranks"][0] for s in report["stages"])
    # everything partitioned over 2 ranks (stage 3 adds an fp32 partition copy: 20Ψ/2 vs 16Ψ)
    assert zero3["total"] < 0.7 * zero0["total"]
    # ZeRO-3's Linear keeps the weights, not autocast's copies of them
    assert zero0["activations"]["predicted"]["weight_copies"] > 0
    assert zero3["activations"]["predicted"]["weight_copies"] == 0
