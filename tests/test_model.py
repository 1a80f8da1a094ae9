"""The plain-torch BERT against transformers' BertForPreTraining, the loss, and the HF name mapping."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mlm_dist.config import ModelConfig
from mlm_dist.interop.bert_names import from_hf_state_dict, to_hf_state_dict
from mlm_dist.interop.export import hf_bert_config
from mlm_dist.model import BertForPretraining, num_parameters, parameter_groups, pretraining_loss

from autocast_rules import cuda_layer_norm_rule, layer_norm_rule_is_cudas
from op_recorder import SYNCING, OpRecorder

transformers = pytest.importorskip("transformers")


def tiny_config(**overrides) -> ModelConfig:
    base = dict(vocab_size=300, hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128,
                max_positions=64, dropout=0.1, attention_dropout=0.1)
    base.update(overrides)
    return ModelConfig(**base)


def perturbed_model(cfg: ModelConfig, seed: int = 0) -> BertForPretraining:
    """A model whose biases and LayerNorms are not at their init values, so a mix-up between
    weight and bias, or between two LayerNorms, shows up in the outputs."""
    torch.manual_seed(seed)
    model = BertForPretraining(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def batch(cfg: ModelConfig, seed: int = 1, batch_size: int = 3, seq_len: int = 16):
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(5, cfg.vocab_size, (batch_size, seq_len), generator=g)
    input_ids[:, 0] = 2  # [CLS]
    lengths = torch.tensor([seq_len, seq_len - 5, 7])[:batch_size]
    positions = torch.arange(seq_len)
    attention_mask = (positions[None, :] < lengths[:, None]).long()
    # Sentence B starts half-way through the real tokens.
    token_type_ids = ((positions[None, :] >= lengths[:, None] // 2) & attention_mask.bool()).long()
    input_ids = input_ids.masked_fill(attention_mask == 0, 0)
    return input_ids, token_type_ids, attention_mask


def hf_twin(model: BertForPretraining, cfg: ModelConfig, attn_implementation: str):
    hf = transformers.BertForPreTraining(hf_bert_config(cfg))
    hf.set_attn_implementation(attn_implementation)
    assert hf.bert.encoder.layer[0].attention.self.config._attn_implementation == attn_implementation
    hf.load_state_dict(to_hf_state_dict(model.state_dict()), strict=True)
    return hf.eval()


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_logits_match_hugging_face(attn_implementation):
    cfg = tiny_config()
    model = perturbed_model(cfg).eval()
    hf = hf_twin(model, cfg, attn_implementation)
    input_ids, token_type_ids, attention_mask = batch(cfg)
    with torch.no_grad():
        mlm_logits, nsp_logits = model(input_ids, token_type_ids, attention_mask)
        ref = hf(input_ids=input_ids, token_type_ids=token_type_ids, attention_mask=attention_mask)
    assert mlm_logits.shape == (3, 16, cfg.vocab_size) and nsp_logits.shape == (3, 2)
    real = attention_mask.bool()
    assert (mlm_logits[real] - ref.prediction_logits[real]).abs().max() < 1e-4
    # Padded query positions attend to the real keys in both implementations, so they agree too.
    assert (mlm_logits - ref.prediction_logits).abs().max() < 1e-4
    assert (nsp_logits - ref.seq_relationship_logits).abs().max() < 1e-4


def test_masked_positions_gather_matches_full_output():
    # With masked positions the last layer and the head compute only [CLS] and those slots:
    # the same logits, and the same gradients, as the full network read at those positions.
    cfg = tiny_config()
    model = perturbed_model(cfg).eval()  # eval: no dropout, so both paths are deterministic
    input_ids, token_type_ids, attention_mask = batch(cfg)
    masked_positions = torch.tensor([[1, 5, 15, 0], [2, 2, 9, 10], [1, 3, 6, 0]])
    labels = input_ids.gather(1, masked_positions)
    nsp_labels = torch.tensor([0, 1, 0])

    def loss_and_grads(mlm_logits, nsp_logits):
        model.zero_grad()
        pretraining_loss(mlm_logits, labels, nsp_logits, nsp_labels)["loss"].backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    full, nsp_full = model(input_ids, token_type_ids, attention_mask)
    expected = torch.stack([full[b, masked_positions[b]] for b in range(3)])
    full_grads = loss_and_grads(expected, nsp_full)
    picked, nsp_picked = model(input_ids, token_type_ids, attention_mask, masked_positions)
    picked_grads = loss_and_grads(picked, nsp_picked)
    assert picked.shape == (3, 4, cfg.vocab_size)
    torch.testing.assert_close(picked, expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(nsp_picked, nsp_full)
    for name, grad in full_grads.items():
        torch.testing.assert_close(picked_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_training_step_backward_reaches_tied_weight_and_padding_only_row_is_finite():
    cfg = tiny_config()
    model = perturbed_model(cfg).train()
    input_ids, token_type_ids, attention_mask = batch(cfg)
    attention_mask[2] = 0  # a row that is all padding must not produce NaN
    masked_positions = torch.tensor([[1, 2], [3, 4], [5, 6]])
    mlm_logits, nsp_logits = model(input_ids, token_type_ids, attention_mask, masked_positions)
    labels = input_ids.gather(1, masked_positions)
    out = pretraining_loss(mlm_logits, labels, nsp_logits, torch.tensor([0, 1, 0]))
    out["loss"].backward()
    assert torch.isfinite(mlm_logits).all() and torch.isfinite(nsp_logits).all()
    assert model.mlm_head.decoder.weight is model.embeddings.tokens.weight
    grad = model.embeddings.tokens.weight.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_runs_in_bfloat16():
    cfg = tiny_config()
    model = perturbed_model(cfg).to(torch.bfloat16).eval()
    input_ids, token_type_ids, attention_mask = batch(cfg)
    with torch.no_grad():
        mlm_logits, nsp_logits = model(input_ids, token_type_ids, attention_mask, torch.ones(3, 2).long())
    assert mlm_logits.dtype == torch.bfloat16 and torch.isfinite(mlm_logits.float()).all()
    out = pretraining_loss(mlm_logits, torch.tensor([[7, -100]] * 3), nsp_logits, torch.tensor([0, 1, 1]))
    assert out["loss"].dtype == torch.float32 and torch.isfinite(out["loss"])


def test_pretraining_loss_matches_hand_computation():
    g = torch.Generator().manual_seed(0)
    mlm_logits = torch.randn(2, 5, 11, generator=g)
    mlm_labels = torch.tensor([[3, -100, 7, 7, -100], [-100, 0, 10, -100, -100]])
    nsp_logits = torch.randn(2, 2, generator=g)
    nsp_labels = torch.tensor([1, 0])
    out = pretraining_loss(mlm_logits, mlm_labels, nsp_logits, nsp_labels)

    valid = mlm_labels != -100
    flat_logits, flat_labels = mlm_logits[valid], mlm_labels[valid]
    mlm_loss = F.cross_entropy(flat_logits, flat_labels)
    nsp_loss = F.cross_entropy(nsp_logits, nsp_labels)
    torch.testing.assert_close(out["mlm_loss"], mlm_loss)
    torch.testing.assert_close(out["nsp_loss"], nsp_loss)
    torch.testing.assert_close(out["loss"], mlm_loss + nsp_loss)
    mlm_acc = (flat_logits.argmax(-1) == flat_labels).float().mean()
    torch.testing.assert_close(out["mlm_acc"].float(), mlm_acc)
    torch.testing.assert_close(out["nsp_acc"].float(), (nsp_logits.argmax(-1) == nsp_labels).float().mean())
    assert out["mlm_count"].item() == 5
    assert all(v.dim() == 0 for v in out.values())


def test_pretraining_loss_with_nothing_labelled_is_zero_not_nan():
    mlm_logits = torch.randn(2, 3, 11, requires_grad=True)
    nsp_logits = torch.randn(2, 2, requires_grad=True)
    out = pretraining_loss(mlm_logits, torch.full((2, 3), -100), nsp_logits, torch.full((2,), -100))
    for name, value in out.items():
        assert torch.isfinite(value.float()), name
        assert value.item() == 0, name
    out["loss"].backward()
    assert torch.isfinite(mlm_logits.grad).all() and torch.isfinite(nsp_logits.grad).all()


def test_pretraining_loss_computes_in_float32_for_bf16_logits():
    mlm_logits = torch.randn(2, 3, 11)
    mlm_labels = torch.tensor([[1, 2, -100], [3, -100, -100]])
    nsp_logits, nsp_labels = torch.randn(2, 2), torch.tensor([0, 1])
    low = pretraining_loss(mlm_logits.bfloat16(), mlm_labels, nsp_logits.bfloat16(), nsp_labels)
    assert low["loss"].dtype == torch.float32
    ref = pretraining_loss(mlm_logits.bfloat16().float(), mlm_labels, nsp_logits.bfloat16().float(), nsp_labels)
    torch.testing.assert_close(low["loss"], ref["loss"])


def test_parameter_groups_exclude_biases_and_layernorms_from_decay():
    model = BertForPretraining(tiny_config())
    decay, no_decay = parameter_groups(model, weight_decay=0.01)
    assert decay["weight_decay"] == 0.01 and no_decay["weight_decay"] == 0.0
    name_of = {id(p): n for n, p in model.named_parameters()}
    decay_names = {name_of[id(p)] for p in decay["params"]}
    no_decay_names = {name_of[id(p)] for p in no_decay["params"]}
    assert not decay_names & no_decay_names
    assert decay_names | no_decay_names == set(name_of.values())
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    for n in no_decay_names:
        assert n.endswith("bias") or "norm" in n, n
    for n in decay_names:
        assert n.endswith("weight") and "norm" not in n, n
    assert {"embeddings.norm.weight", "embeddings.norm.bias", "layers.0.attn_norm.weight",
            "layers.1.ffn_norm.weight", "mlm_head.norm.weight", "mlm_head.decoder.bias"} <= no_decay_names
    assert {"embeddings.tokens.weight", "layers.0.attn.query.weight", "pooler.weight"} <= decay_names


def test_num_parameters_counts_tied_matrix_once_like_hugging_face():
    cfg = tiny_config()
    hf = transformers.BertForPreTraining(hf_bert_config(cfg))
    assert num_parameters(BertForPretraining(cfg)) == sum(p.numel() for p in hf.parameters())


def test_init_follows_bert():
    cfg = tiny_config(vocab_size=1000, hidden_size=128, intermediate_size=256)
    torch.manual_seed(0)
    model = BertForPretraining(cfg)
    for name, p in model.named_parameters():
        if "norm" in name and name.endswith("weight"):
            assert torch.all(p == 1), name
        elif name.endswith("bias"):
            assert torch.all(p == 0), name
        else:
            assert abs(p.std().item() - cfg.init_std) < 0.003, name


def test_state_dict_mapping_round_trip_covers_every_parameter():
    cfg = tiny_config(num_layers=3)
    model = perturbed_model(cfg)
    ours = model.state_dict()
    hf_model = transformers.BertForPreTraining(hf_bert_config(cfg))
    hf_sd = to_hf_state_dict(ours)
    assert set(hf_sd) == set(hf_model.state_dict())  # no leftovers on the HF side
    for key, value in hf_model.state_dict().items():
        assert hf_sd[key].shape == value.shape, key
    back = from_hf_state_dict(hf_sd)
    assert set(back) == set(ours)  # ... nor on ours
    for key in ours:
        assert torch.equal(back[key], ours[key]), key
    # An HF state dict straight from the model (tied decoder keys, as transformers has them) maps too.
    hf_model.load_state_dict(hf_sd)
    again = from_hf_state_dict(hf_model.state_dict())
    assert all(torch.equal(again[k], ours[k]) for k in ours)
    # ... and one without the tied duplicates, as save_pretrained writes it.
    slim = {k: v for k, v in hf_sd.items() if not k.startswith("cls.predictions.decoder.")}
    slim_back = from_hf_state_dict(slim)
    assert set(slim_back) == set(ours) and torch.equal(slim_back["mlm_head.decoder.bias"], ours["mlm_head.decoder.bias"])
    # Wrapper prefixes (DeepSpeed/DDP `module.`) are tolerated; our tied copy may be absent.
    wrapped = {f"module.{k}": v for k, v in ours.items() if k != "mlm_head.decoder.weight"}
    assert set(to_hf_state_dict(wrapped)) == set(hf_sd)


def test_state_dict_mapping_rejects_unknown_and_missing_parameters():
    sd = BertForPretraining(tiny_config()).state_dict()
    with pytest.raises(KeyError, match="no counterpart"):
        to_hf_state_dict({**sd, "layers.0.attn.rotary.weight": torch.zeros(1)})
    incomplete = {k: v for k, v in sd.items() if k != "layers.1.ffn.up.bias"}
    with pytest.raises(KeyError, match="missing"):
        to_hf_state_dict(incomplete)
    hf_sd = to_hf_state_dict(sd)
    with pytest.raises(KeyError, match="no counterpart"):
        from_hf_state_dict({**hf_sd, "bert.encoder.layer.0.crossattention.x": torch.zeros(1)})


# ---- speed paths: CPU attention and dropout, bf16 residual stream, activation checkpointing,
# ---- no host synchronisation


def test_cpu_attention_matches_sdpa():
    from mlm_dist.attention import attention

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 10, 8, generator=g) for _ in range(3))
    bias = torch.zeros(2, 1, 1, 10)
    bias[1, ..., 6:] = torch.finfo(torch.float32).min
    out = attention(q, k, v, bias, dropout_p=0.1, training=False)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    # Fewer queries than keys, as in the last layer: the rows of the full result.
    few = attention(q[:, :, [0, 4, 7]], k, v, bias, dropout_p=0.1, training=False)
    torch.testing.assert_close(few, ref[:, :, [0, 4, 7]], rtol=1e-5, atol=1e-6)


def test_cpu_dropout_keeps_the_right_share_scales_and_masks_the_gradient():
    from mlm_dist.attention import dropout

    x = torch.ones(200_000, requires_grad=True)
    torch.manual_seed(0)
    y = dropout(x, 0.1, training=True)
    kept = y != 0
    assert abs(kept.float().mean().item() - 0.9) < 0.005
    scale = 65536 / (65536 - round(0.1 * 65536))
    assert torch.allclose(y[kept], torch.full_like(y[kept], scale))
    y.sum().backward()
    torch.testing.assert_close(x.grad, y.detach())  # d(sum)/dx = mask * scale
    assert dropout(x, 0.1, training=False) is x and dropout(x, 0.0, training=True) is x
    xb = torch.randn(3, 7, 5, dtype=torch.bfloat16)
    yb = dropout(xb, 0.5, training=True)
    assert yb.dtype == torch.bfloat16 and yb.shape == xb.shape
    assert torch.equal(yb[yb != 0], (xb * 2)[yb != 0])


def test_activation_checkpointing_gives_the_same_loss_and_gradients():
    cfg = tiny_config()  # dropout on: the recomputed layers must replay the same masks
    input_ids, token_type_ids, attention_mask = batch(cfg)
    positions = torch.tensor([[1, 2], [3, 4], [5, 6]])
    labels = input_ids.gather(1, positions)
    results = []
    for flag in (False, True):
        model = perturbed_model(cfg)
        model.checkpoint_activations = flag
        model.train()
        torch.manual_seed(7)
        mlm, nsp = model(input_ids, token_type_ids, attention_mask, positions)
        loss = pretraining_loss(mlm, labels, nsp, torch.tensor([0, 1, 0]))["loss"]
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (loss_a, grads_a), (loss_b, grads_b) = results
    torch.testing.assert_close(loss_a, loss_b, rtol=0, atol=0)
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=1e-5, atol=1e-7)
    assert BertForPretraining(cfg, checkpoint_activations=True).checkpoint_activations


def test_autocast_keeps_the_residual_stream_in_bf16_and_stays_close_to_fp32():
    cfg = tiny_config(dropout=0.0, attention_dropout=0.0)
    model = perturbed_model(cfg).eval()
    seen = []
    model.layers[0].register_forward_pre_hook(lambda module, args: seen.append(args[0].dtype))
    input_ids, token_type_ids, attention_mask = batch(cfg)
    with torch.no_grad():
        ref, _ = model(input_ids, token_type_ids, attention_mask)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low, _ = model(input_ids, token_type_ids, attention_mask)
    assert seen == [torch.float32, torch.bfloat16]
    assert (low.float() - ref).abs().max() < 0.1 * ref.abs().max()


def test_residual_stream_stays_bf16_under_cuda_autocasts_layer_norm_rule():
    """The residual stream is kept in the autocast dtype on a GPU too: LayerNorm's fp32 output
    (CUDA autocast) is cast back, giving the CPU's numbers."""
    assert layer_norm_rule_is_cudas()
    cfg = tiny_config(dropout=0.0, attention_dropout=0.0)
    model = perturbed_model(cfg).eval()
    seen = []
    for module in (*model.layers, model.mlm_head.norm):
        module.register_forward_hook(
            lambda module, args, out: seen.append((args[0].dtype, out.dtype)))
    input_ids, token_type_ids, attention_mask = batch(cfg)
    positions = torch.tensor([[1, 2], [3, 4], [5, 6]])
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        cpu_rule = model(input_ids, token_type_ids, attention_mask, positions)
        del seen[:]
        with cuda_layer_norm_rule():
            plain = torch.nn.LayerNorm(cfg.hidden_size)(torch.ones(2, cfg.hidden_size).bfloat16())
            assert plain.dtype == torch.float32  # the rule is on
            cuda_rule = model(input_ids, token_type_ids, attention_mask, positions)
    assert seen == [(torch.bfloat16, torch.bfloat16)] * (cfg.num_layers + 1)
    for ours, theirs in zip(cuda_rule, cpu_rule):
        assert ours.dtype == torch.bfloat16
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


def test_no_host_sync_in_masking_forward_loss_and_backward():
    """Every aten op of a training step is recorded: none may be one that makes the host wait
    for the device (.item(), bool()/int() of a tensor, .tolist() -> _local_scalar_dense;
    nonzero(), boolean indexing, masked_select -> an output size only the device knows)."""
    import numpy as np
    from mlm_dist.config import MaskingConfig
    from mlm_dist.masking import TokenMasker
    from mlm_dist.tokenizer import Vocabulary

    cfg = tiny_config()
    model = perturbed_model(cfg).train()
    input_ids, token_type_ids, attention_mask = batch(cfg)
    special = np.zeros(cfg.vocab_size, dtype=bool)
    special[:5] = True
    vocab = Vocabulary(cfg.vocab_size, 0, 1, 2, 3, 4, special, np.ones(cfg.vocab_size, bool))
    word_starts = torch.arange(input_ids.numel()).view_as(input_ids) % 3 == 0
    for whole_word in (False, True):
        masker = TokenMasker(vocab, MaskingConfig(whole_word=whole_word), max_predictions=6,
                             seed=0, rank=0, device="cpu")
        with OpRecorder() as recorder:
            masked = masker(input_ids, step=3, word_starts=word_starts)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                mlm, nsp = model(masked.input_ids, token_type_ids, attention_mask, masked.positions)
            losses = pretraining_loss(mlm, masked.labels, nsp, torch.tensor([0, 1, 0]))
            losses["loss"].backward()
        assert "mm" in recorder.ops or "addmm" in recorder.ops  # the recorder saw the step
        assert not recorder.ops & SYNCING, recorder.ops & SYNCING


def test_model_and_loss_trace_as_one_graph():
    """torch.compile(fullgraph=True) turns any graph break (a host value read from a tensor, a
    data-dependent shape) into an error; backend="eager" keeps the test to tracing."""
    torch._dynamo.reset()
    cfg = tiny_config()
    model = perturbed_model(cfg).train()
    input_ids, token_type_ids, attention_mask = batch(cfg)
    positions = torch.tensor([[1, 2], [3, 4], [5, 6]])
    labels = input_ids.gather(1, positions)

    def step(ids):
        mlm, nsp = model(ids, token_type_ids, attention_mask, positions)
        return pretraining_loss(mlm, labels, nsp, torch.tensor([0, 1, 0]))["loss"]

    loss = torch.compile(step, fullgraph=True, backend="eager")(input_ids)
    loss.backward()
    assert torch.isfinite(loss)
