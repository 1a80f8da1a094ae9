"""Where words begin, token by token: decided at `prepare` time and stored in the shards.

Whole-word masking needs words. In English a tokenizer marks them itself (SentencePiece's "▁"
begins a word, WordPiece's "##" continues one; `piece_word_starts`), but Japanese and Chinese
are written without spaces: SentencePiece's marks would make a whole sentence one "word" (a
tokenizer trained for them has no "▁" at all there: tokenizer/sentencepiece.py). There the
words come from a real segmenter, as for the models users measure
themselves against: MeCab with UniDic (through fugashi and unidic-lite) for Japanese, as
cl-tohoku's bert-base-japanese does, and jieba for Chinese, as HFL's Chinese BERT-wwm does.
Both ship their dictionaries inside their packages: nothing is downloaded.

A token begins a word when the first character it covers is the first character of a
segmenter word. A token that covers the end of one word and the start of the next makes the
two one masking unit, so a masked span never splits a segmenter word.
"""

from __future__ import annotations

from functools import cached_property

import numpy as np

from mlm_dist.errors import UsageError

SEGMENTERS = {"ja": "MeCab (fugashi + unidic-lite)", "zh": "jieba"}


def check_language(lang: str) -> str:
    """Before any work: the language is known (its code returned, "zh-TW" -> "zh"), and its
    segmenter is installed."""
    from mlm_dist.data.sentences import check_language as check_splitter

    lang = check_splitter(lang)  # an unknown language is the splitter's error, naming the known
    for code in (SEGMENTERS if lang == "auto" else [lang] if lang in SEGMENTERS else []):
        WordSegmenter(code).word_starts("")  # imports it: a missing package is named now
    return lang


class WordSegmenter:
    """Character offsets where words begin, for one language; built lazily in each worker."""

    def __init__(self, lang: str):
        if lang not in SEGMENTERS:
            raise UsageError(f"no word segmenter for {lang!r}; segmented languages: "
                             f"{', '.join(SEGMENTERS)}")
        self.lang = lang

    def __getstate__(self):
        return {"lang": self.lang}  # segmenters do not cross processes; each worker loads its own

    @cached_property
    def _segment(self):
        if self.lang == "ja":
            try:
                import fugashi
            except ImportError:
                raise ImportError("Japanese word segmentation needs fugashi and unidic-lite: "
                                  "pip install fugashi unidic-lite") from None
            tagger = fugashi.Tagger()
            return lambda text: [w.surface for w in tagger(text)]
        try:
            import jieba
        except ImportError:
            raise ImportError("Chinese word segmentation needs jieba: pip install jieba") from None
        jieba.setLogLevel(60)  # its dictionary-loading chatter would fill prepare's output
        return lambda text: [w for w, _, _ in jieba.tokenize(text)]

    def word_starts(self, text: str) -> set[int]:
        """Offsets of the characters that begin a word of `text`."""
        starts, position = set(), 0
        for surface in self._segment(text):
            # Segmenters drop whitespace between words; find each word where it really is.
            found = text.find(surface, position) if surface else -1
            if found < 0:
                continue
            starts.add(found)
            position = found + len(surface)
        return starts


def piece_word_starts(word_start: np.ndarray, ids: list[int]) -> np.ndarray:
    """Bool per token of a sentence, from the tokenizer's own marks (`Vocabulary.word_start`).
    A sentence's first token begins a word whatever its piece: a Japanese/Chinese tokenizer
    (no dummy prefix) puts no "▁" in front of the first word of an English sentence."""
    flags = word_start[ids]
    flags[:1] = True
    return flags


def token_word_starts(text: str, spans: list[tuple[int, int]], starts: set[int]) -> np.ndarray:
    """Bool per token: does it begin a word? `spans` are the tokens' (begin, end) characters in
    `text`, `starts` the characters where words begin.

    A token whose text is empty or only space (SentencePiece's "▁" before a word) goes with the
    token after it; a further byte piece of the character the previous token began (byte
    fallback) goes with that one."""
    flags = np.zeros(len(spans), dtype=bool)
    pending: list[int] = []  # space-only tokens waiting for the next token with text
    last = -1  # the character the last token with text began at
    for i, (begin, end) in enumerate(spans):
        first = begin
        while first < end and text[first].isspace():
            first += 1
        if first >= end:
            pending.append(i)
            continue
        if first <= last:
            continue
        last = first
        if first in starts:
            flags[pending[0] if pending else i] = True
        pending = []
    return flags
