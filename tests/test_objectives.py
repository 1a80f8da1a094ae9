"""The objectives besides BERT's (`objective.name`): full MLM rows (RoBERTa) and sentence order
(ALBERT). Their example builders, their config errors, training on 2 ranks under ZeRO with an
exact resume, export to transformers; and `model.init_from` a BERT folder without some heads."""

import json
import shutil
import typing

import numpy as np
import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file
from tokenizers.implementations import BertWordPieceTokenizer

from launch import metrics, train
from mlm_dist.config import ConfigError, ModelConfig, ObjectiveConfig, load_config
from mlm_dist.data.batches import BatchWriter
from mlm_dist.data.rows import FullRowBuilder
from mlm_dist.data.shards import WORD_START, token_ids
from mlm_dist.data.sop import IN_ORDER, SWAPPED, SentenceOrderBuilder
from mlm_dist.interop.init_from import load_pretrained, pretrained_model_config
from mlm_dist.objectives import OBJECTIVES, objective_for
from mlm_dist.tokenizer import Vocabulary
from mlm_dist.training.checkpoint import load_checkpoint
from mlm_dist.training.preflight import check_run_dir
from test_long_runs import truncate_to

SEP = 3


def documents(lengths_per_document, seed=0):
    """Documents of sentences whose ids count up through the whole corpus (0, 1, 2, ...; each
    sentence opening a word), so contiguous text is a run of consecutive ids. Ids start at 10:
    none is a special id."""
    rng = np.random.default_rng(seed)
    docs, next_id = [], 10
    for lengths in lengths_per_document:
        doc = []
        for n in lengths:
            sentence = np.arange(next_id, next_id + n, dtype=np.int64)
            sentence[rng.random(n) < 0.7] |= WORD_START
            sentence[0] |= WORD_START
            doc.append(sentence)
            next_id += n
        docs.append(doc)
    return docs, next_id


def runs(ids):
    """Split ids into runs of consecutive values."""
    if not len(ids):
        return []
    breaks = np.flatnonzero(np.diff(ids) != 1) + 1
    return np.split(ids, breaks)


# ---- the example builders


@pytest.mark.parametrize("corpus", ["short", "books"])
def test_full_rows_are_full_contiguous_text_holding_every_token_once(corpus):
    rng = np.random.default_rng(1)
    if corpus == "short":  # one-line reviews: 1-2 sentences of 4-30 tokens
        shape = [list(rng.integers(4, 30, rng.integers(1, 3))) for _ in range(400)]
    else:  # a few long documents of sentences up to longer than a row
        shape = [list(rng.integers(5, 90, 300)) for _ in range(5)]
    docs, end = documents(shape)
    seq_len = 64
    builder = FullRowBuilder(seq_len, np.random.default_rng(0), sep_id=SEP, open_documents=16)
    rows = list(builder(docs))
    lengths = [len(r.a) for r in rows]
    assert all(r.b is None and r.label == 0 for r in rows)
    assert all(n == seq_len - 2 for n in lengths[:-1]) and 0 < lengths[-1] <= seq_len - 2
    text = [token_ids(r.a) for r in rows]
    # Every token of the corpus exactly once, separators aside.
    tokens = np.sort(np.concatenate([t[t != SEP] for t in text]))
    assert np.array_equal(tokens, np.arange(10, end))
    # A row is contiguous text between its separators, and a separator stands only between
    # two documents' texts (never at a row's start).
    starts = np.array([int(d[0][0] & (WORD_START - 1)) for d in docs])
    for t in text:
        assert t[0] != SEP
        pieces = [p[p != SEP] for p in np.split(t, np.flatnonzero(t == SEP))]
        assert all(len(runs(p)) == 1 for p in pieces if len(p))
        owners = [np.searchsorted(starts, p, side="right") - 1 for p in pieces if len(p)]
        assert all(len(set(o)) == 1 for o in owners)  # one document between separators
        assert all(a[-1] != b[0] for a, b in zip(owners, owners[1:]))  # another after each
    # A row's first token opens a word, even when the row was cut inside one.
    assert all(r.a[0] >= WORD_START for r in rows)
    # The rows of long documents are mixed: consecutive rows come from different documents.
    if corpus == "books":
        owners = [r.document for r in rows[:50]]
        assert sum(a != b for a, b in zip(owners, owners[1:])) > 30  # 49 of one: unmixed


def test_sentence_order_pairs_are_consecutive_text_of_one_document_half_swapped():
    rng = np.random.default_rng(2)
    docs, _ = documents([list(rng.integers(3, 12, rng.integers(1, 8))) for _ in range(600)])
    seq_len = 128  # no truncation: the junction of A and B stays visible
    builder = SentenceOrderBuilder(seq_len, np.random.default_rng(0), open_documents=8,
                                   short_seq_prob=0.0)
    pairs = list(builder(docs))
    first_id = [int(d[0][0] & (WORD_START - 1)) for d in docs]
    for p in pairs:
        a, b = token_ids(p.a), token_ids(p.b)
        text = np.concatenate([b, a] if p.label == SWAPPED else [a, b])
        assert len(runs(text)) == 1  # one contiguous stretch of one document, in order
        assert first_id[p.document] <= text[0]
        assert p.document == len(first_id) - 1 or text[-1] < first_id[p.document + 1]
        assert len(a) and len(b) and len(a) + len(b) + 3 <= seq_len
    swapped = np.mean([p.label == SWAPPED for p in pairs])
    assert {p.label for p in pairs} == {IN_ORDER, SWAPPED} and abs(swapped - 0.5) < 0.06
    # One-sentence documents still give a pair (the sentence cut in two).
    assert len({p.document for p in pairs}) == len(docs)


def test_a_single_segment_row_is_cls_text_sep_in_segment_0():
    special = np.arange(45) < 5
    vocab = Vocabulary(45, 0, 1, 2, 3, 4, special, np.ones(45, bool))
    writer = BatchWriter(1, 8, vocab)
    writer.add(np.array([11, 12 | WORD_START, 13]), None, 0)
    batch = writer.take()
    assert batch.input_ids[0].tolist() == [vocab.cls, 11, 12, 13, vocab.sep, 0, 0, 0]
    assert batch.token_type_ids.sum() == 0 and batch.attention_mask[0].tolist() == [1] * 5 + [0] * 3
    assert batch.word_starts[0].tolist() == [False, False, True, False] + [False] * 4


# ---- the config


def test_every_objective_the_config_names_has_a_module_and_back():
    names = typing.get_args(typing.get_type_hints(ObjectiveConfig)["name"])
    assert set(names) == set(OBJECTIVES)
    assert load_config(None, ["data.shards=x"]).objective.name == "bert"  # the default


@pytest.mark.parametrize("overrides, message", [
    (["objective.name=t5"], "objective.name: expected one of ['bert', 'mlm', 'sop', 'electra']"),
    (["objective.colour=blue"], "objective.colour: unknown key"),
    (["objective.swap_prob=0.3"], "objective.swap_prob: only objective.name=sop swaps"),
    (["objective.name=sop", "objective.swap_prob=1.5"], "objective.swap_prob: must be in (0, 1)"),
    (["objective.name=mlm", "data.pack=true"], "data.pack: objective.name=mlm fills every row"),
    (["objective.name=sop", "model.type_vocab_size=1"],
     "model.type_vocab_size: objective.name=sop needs at least 2 segment types"),
    (["objective.generator_size=0.5"], "objective.generator_size: only objective.name=electra"),
    (["objective.name=mlm", "objective.rtd_weight=10"], "objective.rtd_weight: only"),
    (["objective.name=electra", "objective.generator_size=1.5"],
     "objective.generator_size: must be in (0, 1]"),
    (["objective.name=electra", "objective.rtd_weight=0"], "objective.rtd_weight: must be"),
    (["objective.name=electra", "objective.generator_size=0.3"],
     "objective.generator_size: 0.3 gives the generator hidden size 230 and 4 heads"),
    (["objective.name=electra", "data.pack=true"], "data.pack: objective.name=electra fills"),
    (["objective.name=electra", "model.init_from=some/bert"], "model.init_from: objective.name"
                                                              "=electra trains a generator"),
])
def test_objective_config_errors_name_the_key(overrides, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, ["data.shards=x", *overrides])
    assert message in str(e.value)


def test_mlm_allows_one_segment_type():
    cfg = load_config(None, ["data.shards=x", "objective.name=mlm", "model.type_vocab_size=1"])
    assert cfg.objective.name == "mlm"


# ---- training on 2 ranks, resuming exactly, exporting

# Dropout on (the resume must restore the RNG), a checkpoint at step 3 of 6, evaluation at 6.
RUN = ["schedule.phases=[{seq_len: 64, micro_batch: 4, global_batch: 16, until_step: 6}]",
       "train.log_every=1", "model.dropout=0.1", "model.attention_dropout=0.1",
       "checkpoint.every=3", "checkpoint.keep=0", "eval.every=6", "eval.max_pairs=32"]


@pytest.mark.parametrize("name, stage", [("mlm", 3), ("sop", 2), ("mlm", 1)])
def test_objective_trains_resumes_exactly_and_exports(tiny_shards, tmp_path, name, stage):
    options = [f"objective.name={name}", f"train.zero_stage={stage}", *RUN]
    full = tmp_path / "full"
    train(tiny_shards, full, *options)
    history = metrics(full)
    assert history[-1]["train/loss"] < history[0]["train/loss"]
    part = tmp_path / "part"
    shutil.copytree(full, part)
    truncate_to(part, 3)
    train(tiny_shards, part, *options, "checkpoint.resume=true")
    resumed = metrics(part)
    assert [r["step"] for r in resumed] == [4, 5, 6]
    assert [r["train/loss"] for r in resumed] == [r["train/loss"] for r in history[3:]]
    ours, cfg, tokenizer_dir = load_checkpoint(full)
    theirs = load_checkpoint(part)[0].state_dict()
    assert all(torch.equal(v, theirs[k]) for k, v in ours.state_dict().items())

    # Resuming it as another objective stops before any work, naming the key.
    other = load_config(None, [f"data.shards={tiny_shards}", f"out_dir={full}",
                               "checkpoint.resume=true",
                               f"objective.name={'bert' if name == 'mlm' else 'mlm'}"])
    with pytest.raises(ConfigError, match=f"objective.name: {full} was trained with {name}"):
        check_run_dir(other)

    objective = objective_for(cfg)
    records = [json.loads(line) for line in (full / "metrics.jsonl").read_text().splitlines()]
    evaluation = next(r for r in records if "val/mlm_loss" in r)
    if name == "mlm":
        assert {"train/mlm_loss", "train/mlm_acc"} <= set(history[-1])
        assert not any("nsp" in k or "sop" in k for k in history[-1])
        assert history[-1]["data/fill"] > 0.95  # full rows, not pairs
        assert "val/nsp_acc" not in evaluation
        assert not any(k.startswith(("pooler.", "nsp_head.")) for k in ours.state_dict())
    else:
        assert 0.3 < np.mean([r["data/sop_swapped"] for r in history]) < 0.7
        assert 0 <= evaluation["val/sop_acc"] <= 1
    check_export(objective, ours, cfg, tokenizer_dir, tmp_path)


def check_export(objective, ours, cfg, tokenizer_dir, tmp_path):
    """The objective's export loads in plain transformers and computes our logits."""
    out = objective.export(ours.state_dict(), cfg.model, tokenizer_dir, tmp_path / "hf")
    torch.manual_seed(0)
    ids = torch.randint(5, cfg.model.vocab_size, (2, 20))
    types, mask = torch.zeros_like(ids), torch.ones_like(ids)
    with torch.no_grad():
        if objective.name == "mlm":
            hf = transformers.AutoModelForMaskedLM.from_pretrained(out).eval()
            assert type(hf).__name__ == "BertForMaskedLM"
            torch.testing.assert_close(hf(input_ids=ids).logits,
                                       ours.token_logits(ids, types, mask), atol=1e-4, rtol=0)
            fill = transformers.pipeline("fill-mask", model=str(out), device="cpu")
            assert len(fill("the value of the [MASK] is returned")) == 5
            # On request, BertForPreTraining: our MLM head and a fresh (seeded) NSP head.
            again = [objective.export(ours.state_dict(), cfg.model, tokenizer_dir,
                                      tmp_path / f"pt{i}", hf_class="BertForPreTraining")
                     for i in range(2)]
            pt = [transformers.BertForPreTraining.from_pretrained(d).eval() for d in again]
            got = [p(input_ids=ids) for p in pt]
            torch.testing.assert_close(got[0].prediction_logits,
                                       ours.token_logits(ids, types, mask), atol=1e-4, rtol=0)
            assert torch.equal(got[0].seq_relationship_logits, got[1].seq_relationship_logits)
        else:
            hf = transformers.AutoModelForPreTraining.from_pretrained(out).eval()
            assert type(hf).__name__ == "BertForPreTraining"
            got = hf(input_ids=ids, token_type_ids=types)
            mlm_logits, order_logits = ours(ids, types, mask)
            torch.testing.assert_close(got.prediction_logits, mlm_logits, atol=1e-4, rtol=0)
            torch.testing.assert_close(got.seq_relationship_logits, order_logits, atol=1e-4,
                                       rtol=0)


# ---- model.init_from a BERT folder lacking heads


def bert_folder(out, corpus, *, drop=(), hf_class=transformers.BertForPreTraining):
    """A tiny BERT folder as save_pretrained writes it (WordPiece vocab.txt), less the tensors
    whose names start with `drop`: HFL's RoBERTa-wwm is such a BERT without
    cls.seq_relationship."""
    out.mkdir(parents=True)
    wordpiece = BertWordPieceTokenizer(lowercase=True)
    wordpiece.train([str(corpus)], vocab_size=500,
                    special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])
    wordpiece.save_model(str(out))
    (out / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": True}))
    config = transformers.BertConfig(vocab_size=wordpiece.get_vocab_size(), hidden_size=64,
                                     num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=128, max_position_embeddings=64)
    torch.manual_seed(0)
    hf_class(config).save_pretrained(out)
    weights = load_file(str(out / "model.safetensors"))
    save_file({k: v for k, v in weights.items() if not k.startswith(drop)},
              str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


@pytest.fixture(scope="module")
def hfl_like(tmp_path_factory, tiny_corpus):
    return bert_folder(tmp_path_factory.mktemp("hfl") / "roberta-wwm", tiny_corpus,
                       drop=("cls.seq_relationship",))


def pretrained(folder, name):
    said = []
    cfg = pretrained_model_config(folder, ModelConfig(init_from=str(folder)))
    torch.manual_seed(0)
    model = load_pretrained(cfg, objective_for(ObjectiveConfig(name=name)), say=said.append)
    return model, said


def test_init_from_a_folder_without_the_nsp_head(hfl_like):
    weights = load_file(str(hfl_like / "model.safetensors"))
    model, said = pretrained(hfl_like, "bert")
    assert said == [f"model.init_from: {hfl_like} has no nsp_head.bias, nsp_head.weight: "
                    "freshly initialised"]
    sd = model.state_dict()
    assert torch.equal(sd["layers.1.ffn.up.weight"],
                       weights["bert.encoder.layer.1.intermediate.dense.weight"])
    assert torch.equal(sd["pooler.weight"], weights["bert.pooler.dense.weight"])
    assert torch.equal(sd["mlm_head.norm.weight"],
                       weights["cls.predictions.transform.LayerNorm.weight"])
    assert 0.01 < sd["nsp_head.weight"].std() < 0.03  # our init (N(0, 0.02)), not zeros
    # mlm needs none of the missing heads, and says which of the folder's it leaves out.
    model, said = pretrained(hfl_like, "mlm")
    assert said == ["model.init_from: not used by this objective: pooler.bias, pooler.weight"]
    assert torch.equal(model.state_dict()["embeddings.tokens.weight"],
                       weights["bert.embeddings.word_embeddings.weight"])


def test_init_from_a_masked_lm_folder_continued_with_bert(tmp_path, tiny_corpus):
    folder = bert_folder(tmp_path / "mlm", tiny_corpus, hf_class=transformers.BertForMaskedLM)
    _, said = pretrained(folder, "bert")
    assert said == [f"model.init_from: {folder} has no nsp_head.bias, nsp_head.weight, "
                    "pooler.bias, pooler.weight: freshly initialised"]


@pytest.mark.parametrize("change, message", [
    ("drop", "bert.encoder.layer.1.output.dense.bias"),
    ("shape", "has tensors of another shape than its config.json describes: "
              "['layers.0.ffn.up.bias (64,) (need (128,))']"),
])
def test_init_from_names_what_is_missing_or_mismatched_in_the_encoder(tmp_path, tiny_corpus,
                                                                    change, message):
    folder = bert_folder(tmp_path / "bad", tiny_corpus)
    weights = load_file(str(folder / "model.safetensors"))
    if change == "drop":
        del weights["bert.encoder.layer.1.output.dense.bias"]
    else:
        weights["bert.encoder.layer.0.intermediate.dense.bias"] = torch.zeros(64)
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError) as e:
        pretrained(folder, "mlm")
    assert "model.init_from" in str(e.value)
    assert message.replace("bert.encoder.layer.1.output.dense.bias",
                           "layers.1.ffn.down.bias") in str(e.value)


@pytest.fixture(scope="module")
def hfl_shards(tmp_path_factory, tiny_corpus, hfl_like):
    from mlm_dist.data.prepare import prepare_shards

    out = tmp_path_factory.mktemp("hfl-shards") / "shards"
    prepare_shards([tiny_corpus], hfl_like, out, docs_per_shard=40, valid_fraction=0.1, seed=0)
    return out


@pytest.mark.parametrize("name", ["mlm", "bert"])
def test_continue_a_folder_without_the_nsp_head(hfl_like, hfl_shards, tmp_path, name):
    run = tmp_path / "run"
    proc = train(hfl_shards, run, f"model.init_from={hfl_like}", f"objective.name={name}",
                 "masking.whole_word=true", "schedule.phases.0.until_step=6")
    fresh = [line for line in proc.stdout.splitlines() if "freshly initialised" in line]
    assert fresh == ([f"model.init_from: {hfl_like} has no nsp_head.bias, nsp_head.weight: "
                      "freshly initialised"] if name == "bert" else [])
    history = metrics(run)
    assert history[-1]["step"] == 6 and all(np.isfinite(r["train/loss"]) for r in history)
