"""Word boundaries of Japanese and Chinese from real segmenters, stored in the shards, used by
whole-word masking: the mask rate holds and no masked span splits a segmenter word."""

import itertools

import numpy as np
import pytest
import torch

from cjk_text import CHINESE, JAPANESE, write_corpus
from mlm_dist.config import DataConfig, MaskingConfig
from mlm_dist.data.pipeline import LoaderSettings, ResumableLoader, manifest_shards
from mlm_dist.data.prepare import prepare_shards
from mlm_dist.data.reader import SkipCounter, read_documents
from mlm_dist.data.shards import token_ids, word_starts
from mlm_dist.data.words import WordSegmenter, piece_word_starts, token_word_starts
from mlm_dist.masking import IGNORE_INDEX, TokenMasker
from mlm_dist.tokenizer import WORD_BOUNDARY, train_tokenizer

TEXTS = {"ja": JAPANESE, "zh": CHINESE}


@pytest.fixture(scope="module", params=["en", "ja"], ids=["tokenizer-en", "tokenizer-ja"])
def cjk(tmp_path_factory, request):
    """{lang: (tokenizer, shards dir)}: a tokenizer trained on both languages' text (with the
    defaults, or for text without spaces: lang="ja"), and each language's corpus prepared with
    its segmenter."""
    root = tmp_path_factory.mktemp("cjk")
    sentences = [s for docs in TEXTS.values() for doc in docs for s in doc]
    tokenizer = train_tokenizer(sentences * 4, root / "tokenizer", vocab_size=520, seed=0,
                                lang=request.param)
    assert tokenizer.cjk == (request.param == "ja")
    out = {}
    for lang, documents in TEXTS.items():
        corpus = root / f"{lang}.txt"
        write_corpus(corpus, documents, copies=20)
        prepare_shards([corpus], root / "tokenizer", root / lang, docs_per_shard=30,
                       valid_fraction=0.1, lang=lang)
        out[lang] = (tokenizer, root / lang)
    return out


def test_segmenters_find_the_words():
    assert WordSegmenter("ja").word_starts("東京は日本の首都である。") >= {0, 2, 3, 5, 6, 8}
    assert WordSegmenter("zh").word_starts("北京是中国的首都。") == {0, 2, 3, 5, 6, 8}


def test_token_flags_follow_the_first_character_a_token_covers():
    text = "東京大学は😀です"
    words = {0, 2, 4, 5, 6}  # 東京 大学 は 😀 です
    spans = [(0, 0), (0, 1), (1, 3), (3, 4), (4, 5), (5, 5), (5, 5), (5, 6), (6, 8)]
    # "▁" goes with the word after it; 京大 covers the end of 東京 and the start of 大学, which
    # makes 東京大学 one unit; the byte pieces of 😀 (first ones empty) begin it together.
    assert token_word_starts(text, spans, words).tolist() == [
        True, False, False, False, True, True, False, False, True]


def test_shards_store_the_segmenters_word_starts(cjk):
    for lang, (tokenizer, shards) in cjk.items():
        segmenter = WordSegmenter(lang)
        texts = {tuple(tokenizer.encode(s)): s for doc in TEXTS[lang] for s in doc}
        checked = 0
        for shard in manifest_shards(shards):
            for document in read_documents(shard.path, shard.documents, 1, 0, SkipCounter()):
                for sentence in document:
                    text = texts[tuple(token_ids(sentence).tolist())]
                    (ids, spans), = tokenizer.encode_spans([text])
                    expected = token_word_starts(text, spans, segmenter.word_starts(text))
                    assert word_starts(sentence).tolist() == expected.tolist(), text
                    checked += 1
        assert checked > 100
        # a segmenter word is more than one token now and then: whole words are not tokens
        assert any(not word_starts(s).all() for s in document)


def test_segmenter_words_begin_where_they_begin_whatever_the_tokenizer(cjk):
    """With the defaults every sentence begins with "▁" (often a lone one), which goes with
    the word after it; a tokenizer for text without spaces has no "▁" there, and its first
    piece begins the first word."""
    for lang, (tokenizer, _) in cjk.items():
        segmenter = WordSegmenter(lang)
        texts = [s for doc in TEXTS[lang] for s in doc]
        lone = tokenizer.sp.piece_to_id(WORD_BOUNDARY)
        lones = 0
        for text, (ids, spans) in zip(texts, tokenizer.encode_spans(texts)):
            flags = token_word_starts(text, spans, segmenter.word_starts(text))
            assert flags[0], text
            # each word's first piece (or the lone "▁" in front of it) is a start
            firsts = {next(t for t, (b, e) in enumerate(spans) if e > start)
                      for start in segmenter.word_starts(text)}
            firsts = {t - 1 if t and ids[t - 1] == lone else t for t in firsts}
            assert set(np.flatnonzero(flags)) <= firsts and 0 in firsts, text
            lones += ids.count(lone)
        assert (lones == 0) if tokenizer.cjk else (lones > 5), lones


def test_a_sentence_begins_a_word_without_a_word_boundary_piece(tmp_path, tiny_corpus):
    """English prepared with a tokenizer for text without spaces (a mixed corpus, --lang en or
    auto): the first word of a sentence has no "▁", and still begins a word in the shards."""
    from mlm_dist.data.corpus import iter_documents
    from mlm_dist.tokenizer import sentences_of

    english = list(sentences_of(iter_documents([tiny_corpus])))
    japanese = [s for doc in JAPANESE for s in doc]
    tokenizer = train_tokenizer((english + japanese * 4), tmp_path / "tok", vocab_size=600,
                                lang="ja")
    table = tokenizer.vocabulary.word_start
    ids = tokenizer.encode(english[0])
    assert not table[ids[0]] and piece_word_starts(table, ids)[0]
    assert (piece_word_starts(table, ids)[1:] == table[ids[1:]]).all()
    prepare_shards([tiny_corpus], tmp_path / "tok", tmp_path / "shards", docs_per_shard=50,
                   lang="en")
    shard = manifest_shards(tmp_path / "shards")[0]
    firsts = 0
    for document in itertools.islice(read_documents(shard.path, shard.documents, 1, 0,
                                                    SkipCounter()), 20):
        for sentence in document:
            flags, pieces = word_starts(sentence), token_ids(sentence)
            assert flags[0] and (flags[1:] == table[pieces[1:]]).all()
            firsts += not table[pieces[0]]
    assert firsts > 20  # first words without "▁" were there to be flagged


def test_english_word_starts_are_the_tokenizers_marks(tiny_shards, tiny_tokenizer):
    shard = manifest_shards(tiny_shards)[0]
    table = tiny_tokenizer.vocabulary.word_start
    for document in itertools.islice(read_documents(shard.path, shard.documents, 1, 0,
                                                    SkipCounter()), 20):
        for sentence in document:
            assert (word_starts(sentence) == table[token_ids(sentence)]).all()


@pytest.mark.parametrize("lang", ["ja", "zh", "en"])
def test_whole_word_mask_rate_is_prob(cjk, tiny_shards, tiny_tokenizer, lang):
    tokenizer, shards = cjk[lang] if lang in cjk else (tiny_tokenizer, tiny_shards)
    masker = TokenMasker(tokenizer.vocabulary, MaskingConfig(whole_word=True),
                         max_predictions=24, seed=0, rank=0, device="cpu")
    loader = ResumableLoader(LoaderSettings(manifest_shards(shards), seq_len=128, micro_batch=32,
                                            rank=0, world_size=1, seed=0,
                                            data=DataConfig(num_workers=0),
                                            vocab=tokenizer.vocabulary))
    masked = eligible = 0
    for step, batch in enumerate(itertools.islice(loader, 40)):
        out = masker(batch.input_ids, step, word_starts=batch.word_starts)
        masked += (out.labels != IGNORE_INDEX).sum().item()
        eligible += out.eligible.item()
    assert abs(masked / eligible - 0.15) <= 0.005, masked / eligible


@pytest.mark.parametrize("lang", ["ja", "zh"])
def test_no_masked_span_splits_a_segmenter_word(cjk, lang):
    """Rows of real sentences, flags from the segmenter, masked many times: every segmenter
    word is masked whole or not at all."""
    tokenizer, _ = cjk[lang]
    vocab = tokenizer.vocabulary
    segmenter = WordSegmenter(lang)
    texts = [s for doc in TEXTS[lang] for s in doc]
    rows, flags, words_of_rows = [], [], []
    for text, (ids, spans) in zip(texts, tokenizer.encode_spans(texts)):
        starts = segmenter.word_starts(text)
        flags.append([False] + token_word_starts(text, spans, starts).tolist() + [False])
        rows.append([vocab.cls] + ids + [vocab.sep])
        # each segmenter word as the row positions of the tokens covering its characters
        bounds = sorted(starts) + [len(text)]
        words = []
        for begin, end in zip(bounds, bounds[1:]):
            covering = [1 + t for t, (b, e) in enumerate(spans) if b < end and e > begin]
            if covering:
                words.append(covering)
        words_of_rows.append(words)
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), vocab.pad)
    starts = torch.zeros(len(rows), width, dtype=torch.bool)
    for r, (row, flag) in enumerate(zip(rows, flags)):
        ids[r, :len(row)] = torch.tensor(row)
        starts[r, :len(flag)] = torch.tensor(flag)
    masker = TokenMasker(vocab, MaskingConfig(whole_word=True, prob=0.3),
                         max_predictions=width, seed=0, rank=0, device="cpu")
    split = chosen = 0
    for step in range(50):
        out = masker(ids, step, word_starts=starts)
        labelled = np.zeros(ids.shape, dtype=bool)
        used = (out.labels != IGNORE_INDEX).numpy()
        for r in range(len(rows)):
            labelled[r, out.positions[r].numpy()[used[r]]] = True
        for r, words in enumerate(words_of_rows):
            for word in words:
                hit = labelled[r, word]
                split += hit.any() and not hit.all()
                chosen += hit.all()
    assert split == 0 and chosen > 500
