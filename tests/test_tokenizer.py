import functools
import gzip
import io
import re

import pytest
import sentencepiece as spm

from mlm_dist.cli import main
from mlm_dist.data.corpus import iter_documents
from mlm_dist.tokenizer import (CLS_ID, MASK_ID, MODEL_FILE, SEP_ID, SPECIAL_TOKENS, UNK_ID,
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


@pytest.mark.parametrize("lang", ["en", "ja"])
def test_mask_in_text_without_spaces(tmp_path, lang):
    """Japanese and Chinese have no spaces: the rest of the sentence after a [MASK] continues
    the word, so it must not get a "▁" in front ("の首都です。", not "▁の首都です。")."""
    tok = train_tokenizer(CJK_SENTENCES * 10, tmp_path, vocab_size=60, lang=lang)
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


# ----------------------------------------------------------------------------- CJK options

def trainer_spec(tok):
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(tok.path.read_bytes())
    return proto.trainer_spec


@pytest.fixture(scope="module")
def byte_tokenizer(tmp_path_factory, tiny_corpus):
    """English and a little Japanese/Chinese, with byte fallback."""
    sentences = corpus_sentences(tiny_corpus) + CJK_SENTENCES * 3
    return train_tokenizer(sentences, tmp_path_factory.mktemp("bytes"), vocab_size=700,
                           byte_fallback=True)


def test_byte_fallback_adds_256_ordinary_byte_pieces(byte_tokenizer):
    tok = byte_tokenizer
    assert trainer_spec(tok).byte_fallback
    assert [tok.id_to_piece(i) for i in range(5, 5 + 256)] == [f"<0x{b:02X}>" for b in range(256)]
    assert all(tok.sp.is_byte(i) for i in range(5, 261)) and not tok.sp.is_byte(261)
    # Byte pieces are text to us: masked, predicted and drawn as random replacements.
    special = tok.vocabulary.special
    assert special[:5].all() and not special[5:].any()
    assert set(range(5, 261)) <= set(tok.vocabulary.replacement_ids.tolist())
    # They never start with "▁", so they continue the word they are in.
    assert not tok.vocabulary.word_start[5:261].any()


@pytest.mark.parametrize("text", ["東京は😀日本の鬱です", "家族👨‍👩‍👧で", "麤 and 𠮷", "emoji 😀"])
def test_byte_fallback_spells_unseen_characters_as_bytes(byte_tokenizer, text):
    tok = byte_tokenizer
    ids = tok.encode(text)
    assert UNK_ID not in ids and any(tok.sp.is_byte(i) for i in ids)
    assert tok.decode(ids) == text  # nothing lost (these texts are unchanged by NFKC)
    # A word starting with an unseen character starts with a lone "▁", the bytes follow it.
    first = ids.index(next(i for i in ids if tok.sp.is_byte(i)))
    words = text.split()
    if any(w[0] in "😀麤𠮷" for w in words):
        assert WORD_BOUNDARY in [tok.id_to_piece(i) for i in ids[:first]]


def test_without_byte_fallback_unseen_characters_are_unk(tiny_tokenizer):
    assert not trainer_spec(tiny_tokenizer).byte_fallback
    assert UNK_ID in tiny_tokenizer.encode("emoji 😀")
    assert not any(tiny_tokenizer.sp.is_byte(i) for i in range(tiny_tokenizer.vocab_size))


def test_character_coverage_reaches_sentencepiece(tmp_path):
    sentences = CJK_SENTENCES * 10
    full = train_tokenizer(sentences, tmp_path / "full", vocab_size=60, character_coverage=1.0)
    part = train_tokenizer(sentences, tmp_path / "part", vocab_size=60, character_coverage=0.98)
    assert trainer_spec(full).character_coverage == 1.0
    assert abs(trainer_spec(part).character_coverage - 0.98) < 1e-6
    assert UNK_ID not in full.encode("".join(CJK_SENTENCES))
    assert UNK_ID in part.encode("".join(CJK_SENTENCES))  # its rarest characters were left out


def test_vocab_smaller_than_the_characters_names_our_flags(tmp_path, capsys):
    with pytest.raises(ValueError) as e:
        train_tokenizer(CJK_SENTENCES * 10, tmp_path / "a", vocab_size=30)
    message = str(e.value)
    assert "--vocab-size 30" in message and "--character-coverage 0.9995" in message
    assert "at least 60" in message and "character_coverage" not in message
    assert not (tmp_path / "a" / MODEL_FILE).exists()

    (tmp_path / "cjk.txt").write_text("\n".join(CJK_SENTENCES) + "\n")
    with pytest.raises(SystemExit) as exit_:
        main(["tokenizer", "train", "--input", str(tmp_path / "cjk.txt"), "--vocab-size", "300",
              "--byte-fallback", "--out", str(tmp_path / "b")])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "--vocab-size 300 is too small" in err and "character_coverage" not in err
    assert "--character-coverage" in err and "their UTF-8 bytes" in err


def test_byte_fallback_needs_room_for_the_byte_pieces(tmp_path):
    with pytest.raises(ValueError, match=r"--vocab-size 261 is too small: the 5 special tokens "
                                         r"and the 256 byte pieces of --byte-fallback"):
        train_tokenizer(CJK_SENTENCES, tmp_path / "tok", vocab_size=261, byte_fallback=True)
    assert not (tmp_path / "tok").exists()


def test_vocab_larger_than_the_corpus_names_the_largest(tmp_path):
    with pytest.raises(ValueError, match=r"--vocab-size 5000 is too large for this corpus: "
                                         r"SentencePiece finds at most (\d+) pieces"):
        train_tokenizer(CJK_SENTENCES, tmp_path / "tok", vocab_size=5000)


@pytest.mark.parametrize("coverage", [0.0, 0.97, 1.5])
def test_character_coverage_out_of_range(tmp_path, coverage):
    with pytest.raises(ValueError, match="--character-coverage .* must be between 0.98 and 1"):
        train_tokenizer(CJK_SENTENCES, tmp_path / "tok", vocab_size=60, character_coverage=coverage)


def test_cli_passes_coverage_and_byte_fallback(tmp_path):
    from mlm_dist.cli import build_parser
    from mlm_dist.tokenizer import DEFAULT_CHARACTER_COVERAGE

    args = build_parser().parse_args(["tokenizer", "train", "--input", "x", "--vocab-size", "9",
                                      "--out", "y"])
    assert (args.character_coverage, args.byte_fallback) == (DEFAULT_CHARACTER_COVERAGE, False)
    (tmp_path / "cjk.txt").write_text("\n".join(CJK_SENTENCES * 30) + "\n")
    main(["tokenizer", "train", "--input", str(tmp_path / "cjk.txt"), "--vocab-size", "320",
          "--character-coverage", "1.0", "--byte-fallback", "--out", str(tmp_path / "tok")])
    spec = trainer_spec(Tokenizer.load(tmp_path / "tok"))
    assert spec.byte_fallback and spec.character_coverage == 1.0


# ----------------------------------------------------------------------------- --lang ja / zh

# Latin words, options and numbers inside Japanese/Chinese text, with the spaces translated
# manual pages put around them.
MIXED = ["引き数 file の Macintosh タイプを変更する。", "ls -l コマンドでファイルの一覧を表示する。",
         "GNU General Public License の下で配布される。", "使用 Linux 系统 的 GNU 工具。",
         "file には対応する .AppleDouble ファイルが存在しなければならない。"]


@pytest.fixture(scope="module")
def cjk_pair(tmp_path_factory):
    """(tokenizer trained with the defaults, tokenizer trained with lang="ja"), same text."""
    root = tmp_path_factory.mktemp("cjk-pair")
    sentences = (CJK_SENTENCES + MIXED) * 10
    return (train_tokenizer(sentences, root / "en", vocab_size=130),
            train_tokenizer(sentences, root / "ja", vocab_size=130, lang="ja"))


def normalizer_spec(tok):
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(tok.path.read_bytes())
    return proto.normalizer_spec


def test_cjk_tokenizer_has_no_lone_word_boundary(cjk_pair):
    """The defaults put a "▁" in front of every sentence, often a piece of its own; with
    lang="ja" no piece of a sentence without spaces starts with "▁", and the text comes back."""
    en, ja = cjk_pair
    lone = en.sp.piece_to_id(WORD_BOUNDARY)
    assert sum(en.encode(s).count(lone) for s in CJK_SENTENCES) >= 3  # what issue 19 saw
    assert all(en.id_to_piece(en.encode(s)[0]).startswith(WORD_BOUNDARY) for s in CJK_SENTENCES)
    for sentence in CJK_SENTENCES:
        ids = ja.encode(sentence)
        assert not [i for i in ids if ja.id_to_piece(i).startswith(WORD_BOUNDARY)], sentence
        assert ja.decode(ids) == sentence
    # The model file says what it is: every copy of it (and its sha256) carries the choice.
    assert (normalizer_spec(en).add_dummy_prefix, normalizer_spec(en).name) == (True, "nmt_nfkc")
    assert (normalizer_spec(ja).add_dummy_prefix, normalizer_spec(ja).name) == (False,
                                                                                "nmt_nfkc_cjk")
    assert (en.cjk, ja.cjk) == (False, True)
    assert (Tokenizer.load(ja.path.parent).cjk, Tokenizer.load(en.path).cjk) == (True, False)


def test_cjk_tokenizer_drops_spaces_next_to_cjk_characters(cjk_pair):
    """Spaces around Latin words in Japanese text mark no word: gone, as in the text written
    without them. Between two Latin words (or symbols) a space still begins the next piece."""
    en, ja = cjk_pair
    pieces = lambda text: [ja.id_to_piece(i) for i in ja.encode(text)]  # noqa: E731
    for spaced, written in (("引き数 file の Macintosh タイプ", "引き数fileのMacintoshタイプ"),
                            ("使用 Linux 系统", "使用Linux系统"), ("東京\u3000 大阪\t 京都。 次", "東京大阪京都。次"),
                            ("  前後 に 空白  ", "前後に空白"), ("ＡＢＣ １２３ です", "ＡＢＣ１２３です")):
        assert ja.encode(spaced) == ja.encode(written), spaced
        assert en.encode(spaced) != en.encode(written), spaced  # the defaults keep every space
    assert not any(p.startswith(WORD_BOUNDARY) for p in pieces("引き数 file の Macintosh タイプ"))
    assert any(p.startswith(WORD_BOUNDARY) for p in pieces("General Public License の下"))
    assert ja.decode(ja.encode("ls -l コマンド")) == "ls -lコマンド"
    # Korean writes spaces between words: they stay.
    assert ja.encode("한국어 단어") != ja.encode("한국어단어")


def test_the_dropped_spaces_are_what_sentencepiece_reads_as_spaces(cjk_pair):
    """drop_cjk_spaces removes exactly the characters SentencePiece's normaliser would turn
    into a "▁" (tabs, U+3000, the other Unicode spaces, a few invisible ones): checked for
    every code point."""
    from mlm_dist.tokenizer.sentencepiece import _SPACES

    _, ja = cjk_pair
    ours = re.compile(f"[{_SPACES}]")
    spaces = {c for c in map(chr, range(0x110000)) if not 0xD800 <= ord(c) < 0xE000
              and ja.sp.normalize(f"a{c}b") == f"a{WORD_BOUNDARY}b"}
    assert len(spaces) > 20
    assert {c for c in map(chr, range(0x110000)) if ours.fullmatch(c)} == spaces


@pytest.mark.parametrize("char,cjk", [(c, True) for c in "漢かカｶ。、「（Ａ１𠮷㍿ㄅ々〇"] +
                         [(c, False) for c in "a1é(-한ㄱ\u3000Ω"])
def test_which_characters_take_no_space_next_to_them(char, cjk):
    from mlm_dist.tokenizer import drop_cjk_spaces

    assert drop_cjk_spaces(f"x {char} x") == (f"x{char}x" if cjk else f"x {char} x")


def test_cjk_spans_point_into_the_text_as_given(cjk_pair):
    """encode_spans gives characters of the text before spaces were dropped (the word
    segmenters read that text); no span covers a dropped space."""
    _, ja = cjk_pair
    text = "引き数  file の Macintosh\u3000タイプを ls -l で変更する。"
    (ids, spans), = ja.encode_spans([text])
    assert ids == ja.encode(text)
    for i, (begin, end) in zip(ids, spans):
        piece = ja.id_to_piece(i)
        if not ja.sp.is_byte(i) and i != UNK_ID:
            assert text[begin:end].replace(" ", WORD_BOUNDARY) == piece, (piece, begin, end)
    covered = {k for begin, end in spans for k in range(begin, end)}
    assert {k for k, c in enumerate(text) if c in " \u3000"} - covered == {
        3, 4, 9, 11, 21, 26, 32}  # all but the space between "ls" and "-l"


def test_cjk_mask_keeps_the_spaces_that_mean_a_word(cjk_pair):
    """After a [MASK], a space next to a CJK character is dropped as anywhere else, and one
    before a Latin word begins it ("▁file"), as in training."""
    _, ja = cjk_pair
    enc = functools.partial(ja.encode, parse_mask=True)
    assert enc("東京は[MASK] です。") == ja.encode("東京は") + [MASK_ID] + enc("[MASK]です。")[1:]
    assert not ja.id_to_piece(enc("東京は[MASK] です。")[2]).startswith(WORD_BOUNDARY)
    after = enc("[MASK] General")[1]
    assert ja.id_to_piece(after).startswith(WORD_BOUNDARY)
    assert enc("[MASK]General")[1:] == ja.encode("General")  # no space: the word goes on
    # A Latin word masked in Japanese text: one [MASK] for its pieces, the rest unchanged.
    text = "引き数 file の Macintosh タイプを変更する。"
    ids, head, word = ja.encode(text), ja.encode("引き数"), ja.encode("file")
    assert ids[:len(head) + len(word)] == head + word
    assert enc(text.replace("file", "[MASK]")) == head + [MASK_ID] + ids[len(head) + len(word):]
    text = "GNU General Public License の下で配布される。"
    assert ja.id_to_piece(ja.encode(text)[0]) == "GNU"
    assert enc(text.replace("GNU", "[MASK]")) == [MASK_ID] + ja.encode(text)[1:]


def test_cjk_tokenizer_is_reproducible(tmp_path):
    a = train_tokenizer(CJK_SENTENCES * 10, tmp_path / "a", vocab_size=60, lang="zh", seed=1)
    b = train_tokenizer(CJK_SENTENCES * 10, tmp_path / "b", vocab_size=60, lang="zh", seed=1)
    assert a.cjk and a.sha256 == b.sha256


@pytest.mark.parametrize("lang,message", [("xx", "unknown language 'xx'.*auto, am"),
                                          ("auto", "corpus_language")])
def test_lang_must_be_a_language(tmp_path, lang, message):
    with pytest.raises(ValueError, match=message):
        train_tokenizer(CJK_SENTENCES * 10, tmp_path / "tok", vocab_size=60, lang=lang)
    assert not (tmp_path / "tok").exists()


def test_corpus_language_weighs_characters():
    from mlm_dist.data.corpus import Document
    from mlm_dist.tokenizer import corpus_language

    def docs(*pairs):
        return [Document(0, i, [text], lang) for i, (lang, text) in enumerate(pairs)]

    assert corpus_language(docs(("ja", "あ" * 30), ("en", "a" * 50), ("zh", "中" * 25))) == "ja"
    assert corpus_language(docs(("ja", "あ" * 30), ("en", "a" * 50), ("zh", "中" * 10))) == "en"
    assert corpus_language(docs(("zh", "中" * 10), ("ru", "б" * 9))) == "zh"
    assert corpus_language([]) == "en"


def test_cli_lang(tmp_path, capsys):
    (tmp_path / "cjk.txt").write_text("\n".join((CJK_SENTENCES + MIXED) * 10) + "\n")
    (tmp_path / "en.jsonl").write_text('{"text": "The list is empty. Add one item first."}\n' * 60
                                       + '{"text": "Return the value of the key."}\n' * 60)
    sizes = {"cjk.txt": "130", "en.jsonl": "30"}
    for lang, corpus, cjk in (("ja", "cjk.txt", True), ("zh", "cjk.txt", True),
                              ("auto", "cjk.txt", True), ("auto", "en.jsonl", False),
                              ("en", "cjk.txt", False)):
        out = tmp_path / f"{lang}-{corpus}"
        main(["tokenizer", "train", "--input", str(tmp_path / corpus), "--vocab-size",
              sizes[corpus], "--lang", lang, "--out", str(out)])
        assert Tokenizer.load(out).cjk == cjk, (lang, corpus)
        err = capsys.readouterr().err
        assert ("--lang auto: training for " + ("ja" if cjk else "en")) in err or lang != "auto"
    with pytest.raises(SystemExit) as exit_:
        main(["tokenizer", "train", "--input", str(tmp_path / "cjk.txt"), "--vocab-size", "60",
              "--lang", "klingon", "--out", str(tmp_path / "x")])
    assert exit_.value.code == 2 and "unknown language 'klingon'" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
