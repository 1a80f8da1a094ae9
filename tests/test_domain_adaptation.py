"""Continuing MLM from a Hugging Face BERT (its WordPiece tokenizer, config and weights) on new
text: prepare with its tokenizer, train with model.init_from, perplexity before and after."""

import json

import pytest
from tokenizers.implementations import BertWordPieceTokenizer
from transformers import BertConfig, BertForPreTraining

from launch import cli, metrics, train
from mlm_dist.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def hf_bert(tmp_path_factory, tiny_corpus):
    """A small BERT folder as `save_pretrained` writes it, with a WordPiece vocab.txt."""
    out = tmp_path_factory.mktemp("hf") / "bert"
    out.mkdir()
    wordpiece = BertWordPieceTokenizer(lowercase=True)
    wordpiece.train([str(tiny_corpus)], vocab_size=500,
                    special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])
    wordpiece.save_model(str(out))
    (out / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": True}))
    config = BertConfig(vocab_size=wordpiece.get_vocab_size(), hidden_size=64,
                        num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                        max_position_embeddings=64)
    BertForPreTraining(config).save_pretrained(out)
    return out


def test_wordpiece_tokenizer_reads_the_folder(hf_bert):
    tok = Tokenizer.load(hf_bert)
    assert tok.cls_id == 2 and tok.mask_id == 4 and tok.vocab_size == 500
    ids = tok.encode("Returns the unbelievably long value.")
    starts = tok.vocabulary.word_start
    assert any(not starts[i] for i in ids)  # '##' continuations are not word starts
    assert all(starts[[tok.pad_id, tok.cls_id, tok.sep_id, tok.mask_id]])


def test_continue_pretraining_lowers_perplexity(hf_bert, tiny_corpus, tmp_path):
    shards = tmp_path / "shards"
    cli("prepare", "--input", str(tiny_corpus), "--tokenizer", str(hf_bert), "--out",
        str(shards), "--docs-per-shard", "40", "--valid-fraction", "0.1", "--quiet")
    evaluate = ("--data", str(shards), "--seq-len", "64", "--max-pairs", "32", "--micro-batch", "8")
    before = json.loads(cli("eval", "--checkpoint", str(hf_bert), *evaluate).stdout
                        .splitlines()[-1])
    run = tmp_path / "run"
    train(shards, run, f"model.init_from={hf_bert}", "masking.whole_word=true",
          "schedule.phases.0.until_step=30", "optim.lr=2e-3")
    # the run took the checkpoint's shape, not the tiny config's
    assert "vocab_size: 500" in (run / "config.yaml").read_text()
    after = json.loads(cli("eval", "--checkpoint", str(run), *evaluate).stdout.splitlines()[-1])
    assert after["val/perplexity"] < before["val/perplexity"], (before, after)
    assert metrics(run)[-1]["step"] == 30
    # the export keeps the WordPiece tokenizer
    cli("export-hf", "--checkpoint", str(run), "--out", str(tmp_path / "hf"))
    assert (tmp_path / "hf" / "vocab.txt").is_file()


def test_tokenizer_mismatch_is_a_clear_error(hf_bert, tiny_shards, tmp_path):
    proc = train(tiny_shards, tmp_path / "run", f"model.init_from={hf_bert}",
                 launcher="alone", check=False)
    assert proc.returncode == 2
    assert "were not made with" in proc.stderr and "tokenizer" in proc.stderr


@pytest.mark.parametrize("file", ["vocab.txt", "tokenizer.json"])
def test_wordpiece_text_never_becomes_special_ids(hf_bert, tmp_path, file):
    """Corpus text is text: a literal "[SEP]" must not become a separator in prepared shards.
    Only encode(parse_mask=True), as fill-mask uses it, turns "[MASK]" into the mask id."""
    if file == "tokenizer.json":
        BertWordPieceTokenizer(str(hf_bert / "vocab.txt"), lowercase=True).save(str(tmp_path / file))
    tok = Tokenizer.load(hf_bert if file == "vocab.txt" else tmp_path)
    assert tok.path.name == file
    specials = {tok.pad_id, tok.unk_id, tok.cls_id, tok.sep_id, tok.mask_id}
    text = "a [SEP] b [MASK] c [CLS] [PAD] [UNK] x[SEP]y"
    assert not specials & set(tok.encode(text))
    assert not specials & {i for ids in tok.encode_batch([text, "[MASK]"]) for i in ids}
    assert tok.encode("[SEP]") == tok.encode("[ sep ]")  # the characters, as any other text

    masked = tok.encode("the [MASK] of it [MASK].", parse_mask=True)
    assert masked == (tok.encode("the") + [tok.mask_id] + tok.encode("of it") + [tok.mask_id]
                      + tok.encode("."))
    assert tok.encode("a [SEP] b", parse_mask=True) == tok.encode("a [SEP] b")
