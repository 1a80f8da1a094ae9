import functools
import gzip
import io
import re

import pytest
import sentencepiece as spm

from mlm_dist.cli import main
from mlm_dist.data.corpus import iter_documents
from mlm_dist.tokenizer import (CLS_ID, MASK_ID, MODEL_FILE, SEP_ID, SPECIAL_TOKENS,
                                WORD_BOUNDARY, Tokenizer, sentences_of, train_tokenizer)


def corpus_sentences(path):
    return list(sentences_of(iter_documents([path])))


def test_special_tokens_have_fixed_ids(tiny_tokenizer):
    assert [tiny_tokenizer.id_to_piece(i) for i in range(5)] == list(SPECIAL_TOKENS)
    assert [tiny_tokenizer.sp.piece_to_id(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3, 4]
    special = tiny_tokenizer.vocabulary.special
    assert special[:5].all() and not special[5:].any()


def test_same_seed_and_input_give_identical_model(tmp_path, tiny_corpus):
    sentences = corpus_sentences(tiny_corpus)
    a = train_tokenizer(sentences, tmp_path / "a", vocab_size=400, seed=3)
    b = train_tokenizer(sentences, tmp_path / "b", vocab_size=400, seed=3)
    assert a.sha256 == b.sha256
    assert (tmp_path / "a" / MODEL_FILE).read_bytes() == (tmp_path / "b" / MODEL_FILE).read_bytes()


def test_special_token_text_never_becomes_special_ids(tiny_tokenizer):
    text = "a [CLS] b [SEP] c [MASK] d [PAD] [UNK] x[SEP]y"
    specials = {CLS_ID, SEP_ID, MASK_ID}
    assert not specials & set(tiny_tokenizer.encode(text))
    assert not specials & {i for ids in tiny_tokenizer.encode_batch([text, "[MASK]"]) for i in ids}


def test_parse_mask_gives_mask_id(tiny_tokenizer):
    ids = tiny_tokenizer.encode("Return the [MASK] of the file.", parse_mask=True)
    assert ids.count(MASK_ID) == 1
    assert tiny_tokenizer.encode("[MASK]", parse_mask=True) == [MASK_ID]


def test_refuses_to_overwrite_existing_model(tmp_path, tiny_corpus):
    existing = tmp_path / MODEL_FILE
    existing.write_bytes(b"precious")
    with pytest.raises(FileExistsError, match="already exists"):
        train_tokenizer(corpus_sentences(tiny_corpus), tmp_path, vocab_size=400)
    assert existing.read_bytes() == b"precious"


def test_load_rejects_foreign_sentencepiece_model(tmp_path, tiny_corpus):
    model = io.BytesIO()
    # SentencePiece's defaults put <unk>, <s>, </s> at 0..2: not our special ids.
    spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus_sentences(tiny_corpus)),
                                   model_writer=model, vocab_size=300, minloglevel=2)
    (tmp_path / MODEL_FILE).write_bytes(model.getvalue())
    with pytest.raises(ValueError, match="not an mlm_dist tokenizer.*mlm-dist tokenizer train"):
        Tokenizer.load(tmp_path)


def test_load_missing_tokenizer_names_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="mlm-dist tokenizer train"):
        Tokenizer.load(tmp_path / "nowhere")


def test_cli_trains_on_directories_globs_and_gz_and_reports_bad_bytes(tmp_path, capsys, tiny_corpus):
    corpus = tmp_path / "corpus"
    (corpus / "sub").mkdir(parents=True)
    (corpus / "sub" / "a.txt.gz").write_bytes(gzip.compress(tiny_corpus.read_bytes()))
    (corpus / "b.txt").write_bytes(b"caf\xe9 ok.\nAnother sentence.\n")
    main(["tokenizer", "train", "--input", str(corpus), "--vocab-size", "400",
          "--out", str(tmp_path / "tok")])
    out, err = capsys.readouterr()
    assert f"{corpus / 'b.txt'}: 1 invalid UTF-8 sequence replaced" in err
    assert "from 2 input files" in out
    # The same text through a glob gives the same model: inputs, not their packaging, matter.
    main(["tokenizer", "train", "--input", str(corpus / "**" / "*.*"), "--vocab-size", "400",
          "--out", str(tmp_path / "tok2")])
    assert Tokenizer.load(tmp_path / "tok").sha256 == Tokenizer.load(tmp_path / "tok2").sha256


def test_corpus_errors_surface_as_themselves(tmp_path, tiny_corpus):
    (tmp_path / "x.jsonl").write_text('{"text": "Fine. Fine."}\nnot json\n')
    with pytest.raises(ValueError, match=r"^.*x.jsonl:2: not valid JSON"):
        train_tokenizer(sentences_of(iter_documents([tiny_corpus, tmp_path / "x.jsonl"])),
                        tmp_path / "tok", vocab_size=400)
    assert not (tmp_path / "tok" / MODEL_FILE).exists()


def test_mask_tokenizes_like_the_word_it_replaces(tiny_tokenizer, tiny_corpus):
    """Replacing a one-piece word by [MASK] replaces exactly that piece by the mask id: what
    follows keeps the pieces it had after the word ("list." is "▁list" ".", so "[MASK]." is
    [MASK] "."), never an extra "▁" the model did not see in training."""
    tok = tiny_tokenizer
    checked = before_punctuation = 0
    for sentence in corpus_sentences(tiny_corpus):
        ids = tok.encode(sentence)
        for word in re.finditer(r"(?<!\S)\w+", sentence):  # words that start after a space
            piece = tok.sp.piece_to_id(WORD_BOUNDARY + word.group())
            before = tok.encode(sentence[:word.start()])
            k = len(before)
            if piece == tok.unk_id or ids[:k] != before or ids[k:k + 1] != [piece]:
                continue  # not one piece here (e.g. "▁list." is a piece of its own)
            masked = sentence[:word.start()] + "[MASK]" + sentence[word.end():]
            assert tok.encode(masked, parse_mask=True) == ids[:k] + [MASK_ID] + ids[k + 1:], masked
            checked += 1
            before_punctuation += sentence[word.end():word.end() + 1] in ".,;:)"
    assert checked > 1000 and before_punctuation > 100, (checked, before_punctuation)


def test_whitespace_around_mask_leaves_no_lone_word_boundary(tiny_tokenizer):
    tok = tiny_tokenizer
    enc = functools.partial(tok.encode, parse_mask=True)
    the, is_ = tok.encode("the"), tok.encode("is")
    assert len(the) == len(is_) == 1  # "▁the", "▁is": no lone "▁" of their own
    assert enc("the  [MASK]") == the + [MASK_ID]
    assert enc("  [MASK] is") == [MASK_ID] + is_
    assert enc("[MASK]  [MASK] ") == [MASK_ID, MASK_ID]
    assert enc("the\t[MASK]\tis") == the + [MASK_ID] + is_
    assert enc("the  [MASK]  is in it") == the + [MASK_ID] + tok.encode("is in it")
    # No space after [MASK]: the text continues the masked word, with no "▁" in front.
    dot = tok.sp.piece_to_id(".")
    assert enc("the end [MASK].") == tok.encode("the end") + [MASK_ID, dot]
    assert enc("[MASK][MASK].") == [MASK_ID, MASK_ID, dot]


CJK_SENTENCES = [
    "東京は日本の首都です。", "大阪は日本の大きな都市です。", "日本の首都は東京です。",
    "京都には古いお寺がたくさんあります。", "私は毎朝コーヒーを飲みます。",
    "北京是中国的首都。", "上海是中国最大的城市。", "我每天早上喝咖啡。", "中国的首都是北京。",
]


def test_mask_in_text_without_spaces(tmp_path):
    """Japanese and Chinese have no spaces: the rest of the sentence after a [MASK] continues
    the word, so it must not get a "▁" in front ("の首都です。", not "▁の首都です。")."""
    tok = train_tokenizer(CJK_SENTENCES * 10, tmp_path, vocab_size=60)
    for text, word in (("東京は日本の首都です。", "日本"), ("北京是中国的首都。", "中国")):
        ids = tok.encode(text.replace(word, "[MASK]"), parse_mask=True)
        k = ids.index(MASK_ID)
        head, tail = ids[:k], ids[k + 1:]
        assert head == tok.encode(text.split(word)[0])
        # The rest keeps the pieces it has in the unmasked sentence.
        assert tail == tok.encode(text)[-len(tail):]
        assert not tok.id_to_piece(tail[0]).startswith(WORD_BOUNDARY), text
    assert tok.encode("[MASK]是中国的首都。", parse_mask=True)[:2] == \
        [MASK_ID, tok.sp.piece_to_id("是")]
