"""export_hf writes a folder that plain transformers loads: same logits, same token ids."""

from __future__ import annotations

import ast
import functools
import json
import re
import textwrap
from pathlib import Path

import pytest
import torch

from mlm_dist.config import ModelConfig
from mlm_dist.hf_export import export_hf
from mlm_dist.model import BertForPretraining
from mlm_dist.tokenizer import (CLS_ID, MASK_ID, MODEL_FILE, PAD_ID, SEP_ID, UNK_ID,
                                train_tokenizer)

transformers = pytest.importorskip("transformers")

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Return a new dictionary, e.g. {'a': 1}; raise ValueError if the key is missing!",
    "  Leading and trailing spaces,   runs of spaces\tand a tab.  ",
    "Café naïve ÉLÈVE — full width ＡＢＣ and the ﬁ ligature.",
    "Unknown scripts 日本語 and emoji 😀😀 become the unknown id.",
    "numbers 3.14159 and 2,718 and 1e-10",
    "",
]


@functools.cache
def docstring_sentences() -> tuple[str, ...]:
    """A few hundred English lines from the docstrings of some stdlib modules."""
    import argparse
    import collections
    import dataclasses
    import json as json_module
    import pathlib

    lines = []
    for module in (argparse, collections, dataclasses, json_module, pathlib, textwrap):
        tree = ast.parse(Path(module.__file__).read_text())
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node) or ""
                lines += [line.strip() for line in doc.splitlines() if len(line.strip()) > 10]
    return tuple(lines)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return train_tokenizer(docstring_sentences(), tmp_path_factory.mktemp("tok"), vocab_size=400)


@pytest.fixture(scope="module")
def exported(tokenizer, tmp_path_factory):
    cfg = ModelConfig(vocab_size=tokenizer.vocab_size, hidden_size=64, num_layers=2, num_heads=4,
                      intermediate_size=128, max_positions=64)
    torch.manual_seed(0)
    model = BertForPretraining(cfg)
    with torch.no_grad():  # move biases and LayerNorms off their init values
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    out = tmp_path_factory.mktemp("export") / "hf"
    assert export_hf(model.state_dict(), cfg, tokenizer.path.parent, out) == out
    return model.eval(), cfg, out


def test_folder_contents(exported):
    _, _, out = exported
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", MODEL_FILE} <= names
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temp dir left
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "bert" and config["hidden_act"] == "gelu"
    assert config["architectures"] == ["BertForPreTraining"]
    tokenizer_config = json.loads((out / "tokenizer_config.json").read_text())
    assert tokenizer_config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert isinstance(transformers.AutoTokenizer.from_pretrained(out), transformers.PreTrainedTokenizerFast)


def test_model_loads_without_missing_weights_and_gives_same_logits(exported, tokenizer):
    model, cfg, out = exported
    hf, info = transformers.BertForPreTraining.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    hf.eval()
    assert hf.cls.predictions.decoder.weight is hf.bert.embeddings.word_embeddings.weight
    torch.testing.assert_close(hf.cls.predictions.decoder.bias, model.mlm_head.decoder.bias, rtol=0, atol=0)

    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    enc = hf_tok(["A short one.", SENTENCES[0], "Café naïve"], ["b", SENTENCES[1][:40], "naïve ÉLÈVE"],
                 padding=True, return_tensors="pt")
    assert enc["attention_mask"].min() == 0  # the batch really has padding
    with torch.no_grad():
        mlm_logits, nsp_logits = model(enc["input_ids"], enc["token_type_ids"], enc["attention_mask"])
        ref = hf(**enc)
    assert (mlm_logits - ref.prediction_logits).abs().max() < 1e-4
    assert (nsp_logits - ref.seq_relationship_logits).abs().max() < 1e-4


def test_tokenizer_gives_our_ids(exported, tokenizer):
    _, _, out = exported
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    # Runs of one repeated character can tie exactly; see the test below.
    extra = [line for line in docstring_sentences()[::10] if not re.search(r"(.)\1\1", line)]
    assert len(extra) > 50
    for text in SENTENCES + extra:
        assert hf_tok(text, add_special_tokens=False)["input_ids"] == tokenizer.encode(text), text
        assert hf_tok(text)["input_ids"] == [CLS_ID] + tokenizer.encode(text) + [SEP_ID], text
    assert tokenizer.encode(SENTENCES[4]).count(UNK_ID) > 0  # the unknown-character path is covered
    assert hf_tok.decode(hf_tok(SENTENCES[0])["input_ids"], skip_special_tokens=True) == \
        tokenizer.decode(tokenizer.encode(SENTENCES[0]))


def test_tokenizer_differs_only_in_the_order_of_tied_pieces(exported, tokenizer):
    """Known difference: when two segmentations score exactly the same, e.g. ">>>" as ">" ">>"
    or ">>" ">", SentencePiece's float32 Viterbi and the tokenizers library's pick different
    ones, and SentencePiece's choice even depends on the preceding text through rounding.
    That only happens in runs of one repeated character and only reorders equal pieces."""
    _, _, out = exported
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    for text in docstring_sentences():
        ours, theirs = tokenizer.encode(text), hf_tok(text, add_special_tokens=False)["input_ids"]
        if ours != theirs:
            assert sorted(ours) == sorted(theirs), text
            assert re.search(r"(.)\1\1", text), text


def test_tokenizer_special_tokens_and_pair_layout(exported, tokenizer):
    _, cfg, out = exported
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    assert (hf_tok.pad_token_id, hf_tok.unk_token_id, hf_tok.cls_token_id, hf_tok.sep_token_id,
            hf_tok.mask_token_id) == (PAD_ID, UNK_ID, CLS_ID, SEP_ID, MASK_ID)
    assert hf_tok.model_max_length == cfg.max_positions

    a, b = "the first sentence.", "and the second one"
    enc = hf_tok(a, b)
    ids_a, ids_b = tokenizer.encode(a), tokenizer.encode(b)
    assert enc["input_ids"] == [CLS_ID] + ids_a + [SEP_ID] + ids_b + [SEP_ID]
    assert enc["token_type_ids"] == [0] * (len(ids_a) + 2) + [1] * (len(ids_b) + 1)
    assert enc["attention_mask"] == [1] * len(enc["input_ids"])

    for text in ("the [MASK] of the list.", "[MASK][MASK] x[MASK]y", "Return [MASK]"):
        expected = [CLS_ID] + tokenizer.encode(text, parse_mask=True) + [SEP_ID]
        assert hf_tok(text)["input_ids"] == expected, text

    padded = hf_tok(["short", "a somewhat longer sentence here"], padding=True)
    assert padded["input_ids"][0][-1] == PAD_ID and padded["attention_mask"][0][-1] == 0


MASKED = [
    "[MASK] starts the sentence.", "the [MASK] of the list.", "Return the [MASK]",
    "Return the [MASK].", "the end, the [MASK], the rest", "a w[MASK]rd", "[MASK][MASK] x[MASK]y",
    "  spaces  [MASK]  around  [MASK]  ", "tab\t[MASK]\tand [MASK]\u200bzero width", "[MASK]",
]


def test_tokenizer_mask_in_text_gives_our_ids(exported, tokenizer):
    """[MASK] typed in the text: the same ids as Tokenizer.encode(parse_mask=True), where the
    text around a [MASK] tokenizes as around a real word ("[MASK]." is [MASK] ".")."""
    _, _, out = exported
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    texts = MASKED + [re.sub(r"\w+", "[MASK]", line, count=1) for line in docstring_sentences()[::5]
                      if not re.search(r"(.)\1\1", line)]  # ties, as in the test above
    for text in texts:
        ours = tokenizer.encode(text, parse_mask=True)
        assert hf_tok(text)["input_ids"] == [CLS_ID] + ours + [SEP_ID], text
    dot = tokenizer.sp.piece_to_id(".")
    assert tokenizer.encode("the list.")[-1] == dot  # as "▁list" ".", so "[MASK]" "."
    assert hf_tok("the [MASK].", add_special_tokens=False)["input_ids"] == \
        tokenizer.encode("the") + [MASK_ID, dot]


def test_tokenizer_mask_in_text_without_spaces(tmp_path):
    from mlm_dist.hf_export import hf_tokenizer

    sentences = ["東京は日本の首都です。", "日本の首都は東京です。", "北京是中国的首都。",
                 "中国的首都是北京。"]
    ours = train_tokenizer(sentences * 10, tmp_path, vocab_size=25)
    hf_tok = hf_tokenizer(tmp_path, model_max_length=64)
    for text in ("東京は[MASK]の首都です。", "[MASK]是中国的首都。", "中国的首都是[MASK]",
                 "東京は日本の首都です。"):
        ids = hf_tok(text)["input_ids"]
        assert ids == [CLS_ID] + ours.encode(text, parse_mask=True) + [SEP_ID], text
    tokens = hf_tok.tokenize("東京は[MASK]の首都です。")
    assert tokens[tokens.index("[MASK]") + 1] == "の"  # the word goes on: no "▁" in front


def test_fill_mask_pipeline_agrees_with_ours(exported, tokenizer):
    from mlm_dist.inference import fill_mask

    model, _, out = exported
    text = "Return the [MASK] of the list [MASK]."
    theirs = transformers.pipeline("fill-mask", model=str(out), top_k=5)(text)
    for ours, hf in zip(fill_mask(model, tokenizer, text, top_k=5), theirs, strict=True):
        assert [p["token"] for p in ours] == [tokenizer.id_to_piece(p["token"]) for p in hf]
        assert max(abs(p["prob"] - q["score"]) for p, q in zip(ours, hf)) < 1e-3


def test_special_token_strings_in_text_differ_from_ours_as_documented(exported, tokenizer):
    """Known difference: like every transformers tokenizer, the export turns a literal "[SEP]"
    (or [CLS]/[PAD]/[UNK]) in the text into that special id, whereas our Tokenizer.encode never
    produces control ids from text. Ordinary text does not contain these strings."""
    _, _, out = exported
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    text = "one [SEP] two"
    assert SEP_ID not in tokenizer.encode(text)
    assert hf_tok(text, add_special_tokens=False)["input_ids"] == \
        tokenizer.encode("one") + [SEP_ID] + tokenizer.encode("two")


def test_refuses_non_empty_out_dir_and_leaves_it_alone(exported, tokenizer, tmp_path):
    model, cfg, _ = exported
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        export_hf(model.state_dict(), cfg, tokenizer.path.parent, out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]

    empty = tmp_path / "empty"
    empty.mkdir()  # an existing empty folder is fine
    export_hf(model.state_dict(), cfg, tokenizer.path.parent, empty)
    assert (empty / "model.safetensors").is_file()


def test_refuses_tokenizer_of_another_vocab_size(exported, tokenizer, tmp_path):
    model, cfg, _ = exported
    wrong = ModelConfig(**{**cfg.__dict__, "vocab_size": cfg.vocab_size + 1})
    with pytest.raises(ValueError, match="vocab_size"):
        export_hf(model.state_dict(), wrong, tokenizer.path.parent, tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_bpe_tokenizer_exports_too(tmp_path):
    from mlm_dist.hf_export import hf_tokenizer

    bpe = train_tokenizer(docstring_sentences(), tmp_path, vocab_size=400, model_type="bpe")
    hf_tok = hf_tokenizer(tmp_path, model_max_length=64)
    for text in SENTENCES + list(docstring_sentences()[::10]):
        assert hf_tok(text)["input_ids"] == [CLS_ID] + bpe.encode(text) + [SEP_ID], text
