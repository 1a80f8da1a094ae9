"""`objective.name=electra`: replaced-token detection. Sampling, labels and loss on a tiny model;
shared embeddings and where the gradients go; the AUC estimate; FLOPs against a counter; config
errors; 2 ranks under ZeRO 1 and 3 with an exact resume; export to transformers' ELECTRA
classes with our logits, and fill-mask on the generator."""

import json
import math
import shutil

import numpy as np
import pytest
import torch
import transformers
from torch.utils.flop_counter import FlopCounterMode

from launch import metrics, records, train
from op_recorder import SYNCING, OpRecorder
from mlm_dist.config import (MaskingConfig, ModelConfig, ObjectiveConfig,
                             generator_config, load_config)
from mlm_dist.data.batches import Batch
from mlm_dist.electra_model import replace_masked, sample_tokens
from mlm_dist.flops import electra_flops_per_token
from mlm_dist.masking import TokenMasker
from mlm_dist.model import IGNORE_INDEX
from mlm_dist.objectives import objective_for
from mlm_dist.objectives.electra import (AUC_BINS, auc_from_histograms, electra_loss,
                                         logit_histogram)
from mlm_dist.tokenizer import Vocabulary
from mlm_dist.training.checkpoint import load_checkpoint
from test_long_runs import truncate_to
from test_objectives import RUN

V = 120
TINY = ModelConfig(vocab_size=V, hidden_size=64, num_layers=2, num_heads=4,
                   intermediate_size=128, max_positions=64, dropout=0.0, attention_dropout=0.0)


def electra(rtd_weight=50.0, generator_size=0.25, model=TINY, seed=0):
    objective = objective_for(ObjectiveConfig(name="electra", rtd_weight=rtd_weight,
                                              generator_size=generator_size))
    torch.manual_seed(seed)
    return objective, objective.build_model(model)


def tiny_batch(seed=0, rows=4, seq_len=32):
    """Rows of [CLS] ordinary ids [SEP], row 1 padded after 20 tokens; masked by the real
    masker (15 %, 80/10/10)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, V, (rows, seq_len), generator=g)
    ids[:, 0], ids[:, -1] = 2, 3
    mask = torch.ones_like(ids)
    ids[1, 19], ids[1, 20:], mask[1, 20:] = 3, 0, 0
    batch = Batch(ids, torch.zeros_like(ids), mask, torch.zeros(rows, dtype=torch.long),
                  torch.ones(rows, seq_len, dtype=torch.bool))
    special = np.arange(V) < 5
    masker = TokenMasker(Vocabulary(V, 0, 1, 2, 3, 4, special, np.ones(V, bool)),
                         MaskingConfig(), max_predictions=8, seed=seed, rank=0, device="cpu")
    return batch, masker


# ---- sampling, labels, loss


def test_samples_follow_the_softmax_and_repeat_with_the_seed():
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0, -30.0]).expand(20000, 5)
    draws = sample_tokens(logits, torch.Generator().manual_seed(0))
    share = torch.bincount(draws, minlength=5).double() / len(draws)
    expected = logits[0].double().softmax(0)
    assert torch.allclose(share, expected, atol=0.01)  # 4 standard errors at these counts
    assert share[4] == 0
    assert torch.equal(draws, sample_tokens(logits, torch.Generator().manual_seed(0)))
    assert not torch.equal(draws, sample_tokens(logits, torch.Generator().manual_seed(1)))


def test_samples_go_into_the_used_slots_and_nowhere_else():
    original = torch.tensor([[2, 10, 11, 12, 13, 3], [2, 20, 21, 3, 0, 0], [2, 30, 31, 32, 3, 0]])
    positions = torch.tensor([[3, 1, 0], [2, 0, 0], [0, 0, 0]])  # unused slots point at 0
    labels = torch.tensor([[12, 10, IGNORE_INDEX], [21, IGNORE_INDEX, IGNORE_INDEX],
                           [IGNORE_INDEX] * 3])
    samples = torch.tensor([[50, 10, 77], [60, 88, 99], [70, 71, 72]])
    out = replace_masked(original, positions, labels, samples)
    # Slot 1 of row 0 sampled the original id: unchanged, so it counts as original.
    assert out.tolist() == [[2, 10, 11, 50, 13, 3], [2, 20, 60, 3, 0, 0], [2, 30, 31, 32, 3, 0]]


def test_loss_is_generator_mlm_plus_weighted_rtd_over_real_tokens():
    objective, model = electra(rtd_weight=7.0)
    batch, masker = tiny_batch()
    masked = masker(batch.input_ids, step=3)
    losses = objective.losses(model, batch, masked)
    corrupted = model(masked.input_ids, batch.token_type_ids, batch.padding_mask,
                      masked.positions, masked.labels, batch.input_ids,
                      objective.sampler(torch.device("cpu"), masked.seed))[2]
    replaced = corrupted != batch.input_ids
    real = batch.attention_mask.bool()
    used = masked.labels != IGNORE_INDEX
    # Only masked slots can be replaced; a replaced token is one the generator got wrong.
    at_slots = torch.zeros_like(replaced).scatter_(1, masked.positions, used)
    assert not (replaced & ~at_slots).any() and replaced.any()
    assert int(losses["replaced"]) == int(replaced.sum())
    logits = losses["rtd_logits"]
    by_hand = torch.nn.functional.binary_cross_entropy_with_logits(
        logits[real], replaced[real].float())
    torch.testing.assert_close(losses["rtd_loss"], by_hand)
    torch.testing.assert_close(losses["loss"], losses["gen_mlm_loss"] + 7.0 * by_hand)
    assert int(losses["rtd_tokens"]) == int(real.sum())
    assert int(losses["rtd_correct"]) == int((((logits > 0) == replaced) & real).sum())
    # The same micro-batch seed draws the same replacements in another objective instance
    # (a resumed run, an evaluation); another micro-batch seed draws others.
    again = objective_for(objective.cfg).losses(model, batch, masker(batch.input_ids, step=3))
    assert torch.equal(again["replaced_at"], losses["replaced_at"])
    other = objective.losses(model, batch, masker(batch.input_ids, step=4))
    assert not torch.equal(other["replaced_at"], losses["replaced_at"])


def test_a_sample_equal_to_the_original_counts_as_original():
    """A generator that always says 7, on text of 7s and 8s: the masked 7s stay original."""
    objective, model = electra()
    batch, masker = tiny_batch()
    text = batch.input_ids >= 5
    batch.input_ids[text] = 7 + (torch.arange(int(text.sum())) % 2)
    with torch.no_grad():
        model.mlm_head.decoder.bias[7] = 100.0
    masked = masker(batch.input_ids, step=0)
    losses = objective.losses(model, batch, masked)
    used = masked.labels != IGNORE_INDEX
    at_slots = torch.gather(losses["replaced_at"], 1, masked.positions)
    assert torch.equal(at_slots[used], masked.labels[used] == 8)
    assert 0 < int(losses["replaced"]) < int(used.sum())


def test_the_generator_learns_from_its_mlm_loss_only_and_embeddings_are_shared():
    objective, model = electra()
    assert model.mlm_head.decoder.weight is model.embeddings.tokens.weight
    assert not any("embeddings" in name for name, _ in model.generator.named_parameters())
    assert tuple(model.generator.project.weight.shape) == (16, 64)  # 64 * 1/4, from 64
    assert model.generator_cfg.num_heads == 1 and model.generator_cfg.intermediate_size == 32
    batch, masker = tiny_batch()
    masked = masker(batch.input_ids, step=0)

    def gradients(term):
        model.zero_grad()
        objective.losses(model, batch, masked)[term].backward()
        return {n: (None if p.grad is None else p.grad.clone())
                for n, p in model.named_parameters()}

    total, mlm, rtd = gradients("loss"), gradients("gen_mlm_loss"), gradients("rtd_loss")
    generator = [n for n in total if n.startswith(("generator.", "mlm_head."))]
    discriminator = [n for n in total if n.startswith(("layers.", "rtd_head."))]
    # No gradient reaches the generator through the sampled replacements...
    assert all(rtd[n] is None or not rtd[n].any() for n in generator)
    for n in generator:
        torch.testing.assert_close(total[n], mlm[n])
    # ...nor the discriminator from the generator's loss; both reach the shared embeddings.
    assert all(mlm[n] is None for n in discriminator)
    for n in discriminator:
        torch.testing.assert_close(total[n], 50.0 * rtd[n])
    assert mlm["embeddings.positions.weight"].any() and rtd["embeddings.positions.weight"].any()
    torch.testing.assert_close(total["embeddings.norm.weight"],
                               mlm["embeddings.norm.weight"] + 50.0 * rtd["embeddings.norm.weight"])


def test_no_host_sync_in_the_step_or_the_evaluation_terms():
    """Every aten op of masking, both networks, sampling, the loss, backward and the metric
    terms (histograms included) is recorded: none may make the host wait for the device
    (as test_model.py's test of BERT's step)."""
    objective, model = electra()
    batch, masker = tiny_batch()
    with OpRecorder() as recorder:
        masked = masker(batch.input_ids, step=3, word_starts=batch.word_starts)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            losses = objective.losses(model.train(), batch, masked)
        losses["loss"].backward()
        objective.train_terms(losses, batch)
        objective.eval_terms(losses, batch)
    # test_model.py's list, and what sampling or a histogram would have reached for.
    syncing = SYNCING | {"multinomial", "bincount", "histc"}
    assert "scatter_add" in recorder.ops and not recorder.ops & syncing


def test_training_metrics_are_named_and_evaluation_metrics_add_up():
    objective, model = electra()
    batch, masker = tiny_batch()
    masked = masker(batch.input_ids, step=0)
    with torch.no_grad():
        losses = objective.losses(model.eval(), batch, masked)
    sums = {k: float(v) for k, v in objective.train_terms(losses, batch).items()}
    sums["predicted"] = float((masked.labels != IGNORE_INDEX).sum())
    record = objective.train_record(sums, micro_steps=1)
    assert set(record) == {"train/gen_mlm_loss", "train/gen_mlm_acc", "train/rtd_loss",
                           "train/rtd_acc", "train/replaced_frac"}
    terms = objective.eval_terms(losses, batch)
    histograms = {"replaced_bins", "original_bins"}
    assert all(t.shape == (AUC_BINS,) if k in histograms else t.dim() == 0
               for k, t in terms.items())
    sums = {k: v.tolist() if k in histograms else float(v) for k, v in terms.items()}
    sums["predicted"] = float((masked.labels != IGNORE_INDEX).sum())
    val = objective.eval_record(sums)
    assert sum(sums["replaced_bins"]) == sums["replaced"]
    assert sum(sums["original_bins"]) + sums["replaced"] == sums["rtd_tokens"]
    assert val["val/gen_perplexity"] == pytest.approx(math.exp(val["val/gen_mlm_loss"]))
    assert 0 <= val["val/rtd_auc"] <= 1 and 0 <= val["val/rtd_f1"] <= 1
    assert val["val/rtd_acc"] == pytest.approx(record["train/rtd_acc"])


# (mean, spread) of the originals' logits and of the replaced ones', 40,000 and 6,000 of them.
TRAINED = [((-6.0, 2.5), (-6.0 + separation, 3.0)) for separation in (0.5, 2.0, 6.0)]
# Early on the discriminator gives every token nearly the logit of the share replaced,
# log(0.134 / 0.866) = -1.87, those replaced a shade higher: the case bins must be fine for.
NEAR_THE_PRIOR = [((-1.87, 0.2), (-1.77, 0.2))]


@pytest.mark.parametrize("original, replaced", TRAINED + NEAR_THE_PRIOR)
def test_the_histogram_auc_is_within_its_bound_of_the_exact_auc(original, replaced):
    g = torch.Generator().manual_seed(0)
    logits = torch.cat([torch.randn(40000, generator=g) * original[1] + original[0],
                        torch.randn(6000, generator=g) * replaced[1] + replaced[0]])
    is_replaced = torch.arange(46000) >= 40000
    estimate, bound = auc_from_histograms(logit_histogram(logits, is_replaced).tolist(),
                                          logit_histogram(logits, ~is_replaced).tolist())
    # Exact: the Mann-Whitney U statistic from the ranks (continuous logits: no ties).
    ranks = logits.argsort().argsort().double() + 1
    n_pos, n_neg = 6000, 40000
    exact = float((ranks[is_replaced].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))
    print(f"exact {exact:.5f} estimate {estimate:.5f} bound {bound:.5f}")
    assert abs(estimate - exact) <= bound < 0.01
    assert abs(estimate - exact) < 0.0002


# ---- FLOPs


def test_electra_flops_match_a_flop_counter_on_one_step():
    """flops.electra_flops_per_token against torch's FlopCounterMode on a real forward and
    backward of both networks (matmuls only, as the formula counts)."""
    cfg = ModelConfig(vocab_size=2000, hidden_size=128, num_layers=2, num_heads=4,
                      intermediate_size=512, max_positions=128, dropout=0.0,
                      attention_dropout=0.0)
    objective, model = electra(model=cfg)
    rows, seq_len, slots = 2, 128, 20
    ids = torch.randint(5, 2000, (rows, seq_len))
    positions = torch.stack([torch.randperm(seq_len - 1)[:slots] + 1 for _ in range(rows)])
    labels = torch.gather(ids, 1, positions)
    with FlopCounterMode(display=False) as counter:
        mlm_logits, rtd_logits, corrupted = model(ids, torch.zeros_like(ids), None, positions,
                                                  labels, ids, torch.Generator())
        electra_loss(mlm_logits, labels, rtd_logits, corrupted, ids, torch.ones_like(ids),
                     50.0)["loss"].backward()
    counted = counter.get_total_flops() / (rows * seq_len)
    formula = objective.flops_per_token(cfg, seq_len, slots)
    assert formula == electra_flops_per_token(cfg, generator_config(cfg, 0.25), seq_len, slots)
    # Every matmul of both passes, the x3 rule included (the embeddings take gradients, so
    # even the first layer's input gradient is computed): exactly the formula.
    assert counted == pytest.approx(formula, rel=1e-9)
    bert = objective_for(ObjectiveConfig()).flops_per_token(cfg, seq_len, slots)
    assert formula > bert  # the discriminator reads every position, and the generator adds


# ---- config


def test_electra_config_defaults():
    o = load_config(None, ["data.shards=x", "objective.name=electra",
                           "model.type_vocab_size=1"]).objective
    assert (o.generator_size, o.rtd_weight) == (0.25, 50.0)
    g = generator_config(ModelConfig(), o.generator_size)  # BERT-base: 192 wide, 3 heads
    assert (g.hidden_size, g.num_heads, g.intermediate_size, g.num_layers) == (192, 3, 768, 12)


# ---- 2 ranks, exact resume, export


# ZeRO 1 with whole-word masking feeding the generator (as for Japanese and Chinese shards).
@pytest.mark.parametrize("stage, whole_word", [(1, "true"), (3, "false")])
def test_electra_trains_on_2_ranks_resumes_exactly_and_exports(tiny_shards, tmp_path, stage,
                                                               whole_word):
    options = ["objective.name=electra", f"train.zero_stage={stage}",
               f"masking.whole_word={whole_word}", *RUN]
    full = tmp_path / "full"
    train(tiny_shards, full, *options)
    history = metrics(full)
    assert history[-1]["train/loss"] < history[0]["train/loss"]
    assert {"train/gen_mlm_loss", "train/gen_mlm_acc", "train/rtd_loss", "train/rtd_acc",
            "train/replaced_frac"} <= set(history[-1])
    assert not any("nsp" in k or k.startswith("train/mlm") for k in history[-1])
    assert history[-1]["data/fill"] > 0.95  # full rows
    assert 0 < history[-1]["train/replaced_frac"] < 0.16
    part = tmp_path / "part"
    shutil.copytree(full, part)
    truncate_to(part, 3)
    train(tiny_shards, part, *options, "checkpoint.resume=true")
    resumed = metrics(part)
    assert [r["step"] for r in resumed] == [4, 5, 6]
    for key in ("train/loss", "train/rtd_loss", "train/replaced_frac"):
        assert [r[key] for r in resumed] == [r[key] for r in history[3:]]
    evaluation = [r for r in records(full) if "val/rtd_auc" in r]
    assert evaluation == [r for r in records(part) if "val/rtd_auc" in r]
    val = evaluation[-1]
    assert {"val/gen_mlm_loss", "val/gen_perplexity", "val/rtd_acc", "val/rtd_f1",
            "val/rtd_precision", "val/rtd_recall", "val/replaced_frac",
            "val/rtd_auc_bound"} <= set(val)
    ours, cfg, tokenizer_dir = load_checkpoint(full)
    theirs = load_checkpoint(part)[0].state_dict()
    assert all(torch.equal(v, theirs[k]) for k, v in ours.state_dict().items())
    if stage == 3:  # the consolidated ZeRO-3 shards, exported
        check_export(ours, cfg, tokenizer_dir, tmp_path / "hf")
        check_finetune_loads_the_discriminator(full, ours, tmp_path / "scratch")


def check_export(ours, cfg, tokenizer_dir, out):
    """The discriminator loads as ElectraForPreTraining (and for fine-tuning), the generator as
    ElectraForMaskedLM, each computing our logits; fill-mask runs on the generator."""
    objective = objective_for(cfg)
    objective.export(ours.state_dict(), cfg.model, tokenizer_dir, out)
    torch.manual_seed(0)
    ids = torch.randint(5, cfg.model.vocab_size, (2, 20))
    types, mask = torch.zeros_like(ids), torch.ones_like(ids)
    mask[1, 15:] = 0
    with torch.no_grad():
        discriminator = transformers.AutoModelForPreTraining.from_pretrained(out).eval()
        assert type(discriminator).__name__ == "ElectraForPreTraining"
        got = discriminator(input_ids=ids, token_type_ids=types, attention_mask=mask).logits
        want = ours.discriminate(ids, types, mask)
        torch.testing.assert_close(got[mask.bool()], want[mask.bool()], atol=1e-4, rtol=0)
        generator = transformers.AutoModelForMaskedLM.from_pretrained(out / "generator").eval()
        assert type(generator).__name__ == "ElectraForMaskedLM"
        got = generator(input_ids=ids, token_type_ids=types, attention_mask=mask).logits
        want = ours.token_logits(ids, types, mask)
        torch.testing.assert_close(got[mask.bool()], want[mask.bool()], atol=1e-4, rtol=0)
    config = json.loads((out / "generator" / "config.json").read_text())
    assert (config["hidden_size"], config["embedding_size"]) == (16, 64)
    fill = transformers.pipeline("fill-mask", model=str(out / "generator"), device="cpu")
    assert len(fill("the value of the [MASK] is returned")) == 5
    classifier = transformers.AutoModelForSequenceClassification.from_pretrained(out,
                                                                                 num_labels=2)
    assert type(classifier).__name__ == "ElectraForSequenceClassification"
    torch.testing.assert_close(classifier.electra.encoder.layer[1].output.dense.weight,
                               ours.layers[1].ffn.down.weight)


def check_finetune_loads_the_discriminator(run, ours, scratch):
    """`bench finetune --model <run>` exports the run and fine-tunes the discriminator."""
    from mlm_dist.bench.finetune import hf_folder
    from mlm_dist.bench.finetune_loop import task_model
    from mlm_dist.bench.tasks import CLASSIFICATION, Task, TextExample

    scratch.mkdir()
    folder, described = hf_folder(run, scratch)
    task = Task("t", CLASSIFICATION, [TextExample("a", "x"), TextExample("b", "y")], [], [])
    model = task_model(folder, task, pretrained=True, seed=0)  # refuses a random encoder
    assert type(model).__name__ == "ElectraForSequenceClassification"
    torch.testing.assert_close(model.electra.embeddings.word_embeddings.weight,
                               ours.embeddings.tokens.weight)


def test_hf_names_round_trip_and_the_reference_gives_our_logits():
    """ours -> transformers -> ours is exact; `bench convergence`'s reference (transformers'
    two networks on one embeddings module), its weights moved away from ours and brought back
    to our names, gives in our network the logits it gives in transformers (fp32, 1e-4)."""
    import dataclasses

    from mlm_dist.bench.reference_electra import ElectraReference
    from mlm_dist.interop.electra import from_hf_state_dicts, to_hf_state_dicts

    objective, ours = electra(seed=3)
    state = ours.state_dict()
    back = from_hf_state_dicts(*to_hf_state_dicts(state, TINY, 0.25), TINY, 0.25)
    assert back.keys() == state.keys()
    assert all(torch.equal(back[k], v) for k, v in state.items())

    cfg = dataclasses.replace(load_config(None, ["data.shards=x", "objective.name=electra"]),
                              model=TINY)
    reference = ElectraReference(cfg, torch.device("cpu"))
    reference.load_ours(state)
    torch.manual_seed(4)
    with torch.no_grad():  # away from ours; the shared tensors move once, for both networks
        for p in reference.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    assert (reference.generator.electra.embeddings.position_embeddings.weight
            is reference.discriminator.electra.embeddings.position_embeddings.weight)
    converted = objective.build_model(TINY)
    converted.load_state_dict(reference.our_state_dict(), strict=True)
    assert not torch.equal(converted.layers[0].ffn.down.weight, ours.layers[0].ffn.down.weight)
    converted.eval(), reference.eval()
    torch.manual_seed(0)
    ids = torch.randint(5, V, (2, 20))
    types, mask = torch.zeros_like(ids), torch.ones_like(ids)
    mask[1, 15:] = 0
    real = mask.bool()
    with torch.no_grad():
        theirs = reference.discriminator(input_ids=ids, token_type_ids=types,
                                         attention_mask=mask).logits
        torch.testing.assert_close(theirs[real], converted.discriminate(ids, types, mask)[real],
                                   atol=1e-4, rtol=0)
        theirs = reference.generator(input_ids=ids, token_type_ids=types,
                                     attention_mask=mask).logits
        torch.testing.assert_close(theirs[real], converted.token_logits(ids, types, mask)[real],
                                   atol=1e-4, rtol=0)
