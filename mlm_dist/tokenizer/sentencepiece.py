"""SentencePiece tokenizer with BERT's special tokens at fixed ids.

[PAD]=0 [UNK]=1 [CLS]=2 [SEP]=3 [MASK]=4. [CLS]/[SEP]/[MASK] are SentencePiece *control*
symbols: they are never produced from raw text, so a corpus that happens to contain the string
"[SEP]" cannot inject a separator. Only `encode(..., parse_mask=True)` (used by fill-mask) turns
the literal "[MASK]" into the mask id.

Japanese and Chinese (`train_tokenizer(lang="ja" | "zh")`, `tokenizer train --lang`) are
written without spaces between words, and two SentencePiece habits made for text with spaces
put a lone "▁" in their way: the dummy prefix puts a "▁" in front of every sentence, and each
space a "▁" in front of what follows it, spaces that Japanese and Chinese text has only around
Latin words, numbers and symbols ("引き数 file の", "使用 Linux 系统"). A lone "▁" carries no
meaning, yet it became one of the most frequent pieces, and masked-LM learned to predict it
(issue 19). A tokenizer for these languages therefore has no dummy prefix, and a run of spaces
next to a Han, kana or CJK punctuation character is dropped before SentencePiece sees the text
("引き数fileの"; `drop_cjk_spaces`): it marks no word there, and cl-tohoku's and HFL's BERTs
keep no trace of such spaces either. Spaces between two other characters ("ls -l", "GNU
General Public License") still become "▁" in front of the next piece. The model file says
so itself (normalizer name `CJK_NORMALIZATION`; sha256 and every copy carry it), and the
Hugging Face export replays the same rule.
"""

from __future__ import annotations

import hashlib
import io
import re
from functools import cached_property
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import sentencepiece as spm

from mlm_dist.errors import PathExistsError, PathNotFoundError, UserError
from mlm_dist.tokenizer.vocabulary import (CLS_ID, MASK_ID, PAD_ID, SEP_ID, SPECIAL_TOKENS, UNK_ID,
                                           Vocabulary)

MODEL_FILE = "tokenizer.model"
WORD_BOUNDARY = "\u2581"  # SentencePiece's "▁", marks a piece that starts a word
# SentencePiece's advice for Japanese and Chinese (1.0 for small alphabets); see train_tokenizer.
DEFAULT_CHARACTER_COVERAGE = 0.9995
MIN_CHARACTER_COVERAGE = 0.98  # the lowest SentencePiece accepts
BYTE_PIECES = 256  # <0x00>…<0xFF>, which byte_fallback adds right after the special tokens
CJK_LANGUAGES = ("ja", "zh")  # written without spaces between words: see the module docstring
# The name a Japanese/Chinese tokenizer's model file gives its normalisation: SentencePiece's
# nmt_nfkc (the precompiled map it still holds) plus drop_cjk_spaces in front. SentencePiece
# reads only the map; the name is for us and the export.
CJK_NORMALIZATION = "nmt_nfkc_cjk"
# What SentencePiece's nmt_nfkc turns into a space (checked against it in the tests): ASCII
# and Unicode spaces, a few invisible format characters, U+FFFD, and "▁" itself.
_SPACES = ("\t\n\f\r \u00a0\u061c\u1680\u2000-\u200c\u200e\u200f\u2028\u2029\u202f\u205f"
           "\u2581\u3000\ufeff\ufffd")
# Characters written without spaces between them: CJK radicals and punctuation (not U+3000,
# a space), kana, Bopomofo, enclosed and compatibility forms, the ideographs of every block,
# full-width ASCII and half-width katakana (not half-width Hangul: Korean writes spaces).
_CJK = ("\u2e80-\u2fdf\u2ff0-\u2fff\u3001-\u303f\u3040-\u30ff\u3100-\u312f\u31a0-\u31ff"
        "\u3200-\u4dbf\u4e00-\u9fff\uf900-\ufaff\ufe30-\ufe4f\uff01-\uff9f\uffe0-\uffee"
        "\U0001b000-\U0001b16f\U00020000-\U0003134f")
# A run of spaces with such a character on either side. The pattern holds the characters
# themselves (Python has turned the escapes above into them), which the export's regex engine
# (Oniguruma) reads as Python's re does.
CJK_SPACES_PATTERN = f"(?<=[{_CJK}])[{_SPACES}]+|[{_SPACES}]+(?=[{_CJK}])"
_CJK_SPACES = re.compile(CJK_SPACES_PATTERN)


class TokenizerError(UserError, ValueError):
    """A tokenizer that cannot be trained with the options given, or a folder that holds no
    tokenizer mlm_dist can use."""


def train_tokenizer(
    sentences: Iterable[str],
    out_dir: str | Path,
    vocab_size: int,
    *,
    model_type: str = "unigram",
    seed: int = 0,
    input_sentence_size: int = 2_000_000,
    character_coverage: float = DEFAULT_CHARACTER_COVERAGE,
    byte_fallback: bool = False,
    lang: str = "en",
) -> "Tokenizer":
    """Train on an iterable of sentences and write `out_dir/tokenizer.model`.

    SentencePiece samples at most `input_sentence_size` sentences (shuffled with the seeded
    generator), so memory stays bounded on large corpora. One thread keeps the result
    bit-for-bit reproducible for a given seed and input.

    `character_coverage` is the share of the corpus's character occurrences that characters with
    a piece of their own must cover, the most frequent first; the rarest characters beyond it
    become [UNK], or their UTF-8 bytes with `byte_fallback`. SentencePiece advises 0.9995 for languages with rich
    character sets (Japanese, Chinese) and 1.0 for the others; the default is 0.9995, which
    also drops only the stray rare symbols of an English corpus. SentencePiece accepts 0.98
    to 1.

    `byte_fallback` adds the 256 byte pieces <0x00>…<0xFF> (ids 5…260, counted in `vocab_size`):
    a character without a piece is then spelled as its UTF-8 bytes instead of [UNK], so no
    text is lost and decode gives it back. They are ordinary pieces to the model (never in
    `Vocabulary.special`) and never start with "▁": they continue the word they are in (a word
    that begins with such a character begins with a lone "▁" piece).

    `lang` is the corpus's language, a code of `prepare --lang` ("auto" is decided first, from
    the documents: `corpus_language`). "ja" and "zh" train a tokenizer for text without spaces
    between words (module docstring): no dummy prefix, spaces next to CJK characters dropped.
    Any other language gets SentencePiece's defaults, which suit text written with spaces.
    """
    out = Path(out_dir)
    target = out / MODEL_FILE
    if target.exists():
        raise PathExistsError(f"{target} already exists; choose another --out or remove it")
    _check_options(vocab_size, character_coverage, byte_fallback)
    cjk = _is_cjk(lang)
    out.mkdir(parents=True, exist_ok=True)
    spm.set_random_generator_seed(seed)
    model = io.BytesIO()
    source_errors: list[Exception] = []  # SentencePiece would turn them into "INTERNAL: …" text

    def non_empty(sentences: Iterable[str]) -> Iterator[str]:
        try:
            yield from (s for s in map(drop_cjk_spaces if cjk else str, sentences) if s.strip())
        except Exception as e:
            source_errors.append(e)
            raise

    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=non_empty(sentences),
            model_writer=model,
            vocab_size=vocab_size,
            model_type=model_type,
            character_coverage=character_coverage,
            byte_fallback=byte_fallback,
            add_dummy_prefix=not cjk,
            input_sentence_size=input_sentence_size,
            shuffle_input_sentence=True,
            pad_id=PAD_ID, pad_piece="[PAD]",
            unk_id=UNK_ID, unk_piece="[UNK]",
            bos_id=-1, eos_id=-1,
            control_symbols=["[CLS]", "[SEP]", "[MASK]"],
            num_threads=1,
            minloglevel=2,
        )
    except RuntimeError as e:
        if source_errors:  # the corpus reader's own error (bad JSON, damaged .gz) says it best
            raise source_errors[0] from None
        raise TokenizerError(_training_error(str(e), vocab_size, character_coverage,
                                         byte_fallback)) from None
    # Write under a temporary name first so a crash never leaves a half-written model behind.
    tmp = target.with_suffix(".model.tmp")
    tmp.write_bytes(_named_cjk(model.getvalue()) if cjk else model.getvalue())
    tmp.replace(target)
    return Tokenizer.load(out)


def _is_cjk(lang: str) -> bool:
    from mlm_dist.data.sentences import AUTO, check_language

    code = check_language(lang)  # an unknown code is named with the known ones
    if code == AUTO:
        raise ValueError("lang 'auto' is decided from the documents before training: pass "
                         "corpus_language(documents) (as `tokenizer train --lang auto` does)")
    return code in CJK_LANGUAGES


def _named_cjk(model: bytes) -> bytes:
    """The model with its normalisation named CJK_NORMALIZATION: the mark that text goes
    through drop_cjk_spaces before SentencePiece."""
    proto = _model_proto(model)
    proto.normalizer_spec.name = CJK_NORMALIZATION
    return proto.SerializeToString()


def _model_proto(model: bytes):
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model)
    return proto


def drop_cjk_spaces(text: str) -> str:
    """`text` without the runs of spaces that touch a Han, kana or CJK punctuation character
    ("引き数 file の" -> "引き数fileの"): what a Japanese/Chinese tokenizer encodes."""
    return _CJK_SPACES.sub("", text)


def _drop_cjk_spaces_keeping_places(text: str) -> tuple[str, np.ndarray | None]:
    """drop_cjk_spaces(text), and for each of its characters and its end, the offset in `text`
    (None if nothing was dropped)."""
    dropped = [m.span() for m in _CJK_SPACES.finditer(text)]
    if not dropped:
        return text, None
    kept = np.ones(len(text) + 1, dtype=bool)
    for begin, end in dropped:
        kept[begin:end] = False
    return _CJK_SPACES.sub("", text), np.flatnonzero(kept)


def corpus_language(documents: Iterable) -> str:
    """The language a tokenizer for these documents (corpus.Document, each with the language
    `--lang auto` detected for it) is trained for: Japanese or Chinese, the larger, when their
    documents hold at least half of the characters, else the language holding the most."""
    characters: dict[str, int] = {}
    for document in documents:
        characters[document.lang] = (characters.get(document.lang, 0)
                                     + sum(map(len, document.sentences)))
    if not characters:
        return "en"
    cjk = {lang: n for lang, n in characters.items() if lang in CJK_LANGUAGES}
    if 2 * sum(cjk.values()) >= sum(characters.values()):
        characters = cjk
    return max(characters, key=characters.get)


def _check_options(vocab_size: int, character_coverage: float, byte_fallback: bool) -> None:
    if not MIN_CHARACTER_COVERAGE <= character_coverage <= 1:  # SentencePiece refuses others
        raise TokenizerError(f"--character-coverage {character_coverage} must be between "
                             f"{MIN_CHARACTER_COVERAGE} and 1 (0.9995 for Japanese or Chinese, 1.0 "
                             "for small alphabets)")
    reserved = len(SPECIAL_TOKENS) + (BYTE_PIECES if byte_fallback else 0)
    if vocab_size <= reserved:
        bytes_ = f" and the {BYTE_PIECES} byte pieces of --byte-fallback" if byte_fallback else ""
        raise TokenizerError(f"--vocab-size {vocab_size} is too small: the {len(SPECIAL_TOKENS)} "
                             f"special tokens{bytes_} take {reserved} ids, and the corpus's "
                             "characters and words need more on top")


# SentencePiece's messages for a vocabulary that does not fit the corpus; they name its own
# flags (--character_coverage), which our command line does not have.
_TOO_FEW_PIECES = re.compile(r"Vocabulary size is smaller than required_chars\. (\d+) vs (\d+)")
_TOO_MANY_PIECES = re.compile(r"Vocabulary size too high \((\d+)\)\. Please set it to a value "
                              r"<= (\d+)")


def _training_error(message: str, vocab_size: int, character_coverage: float,
                    byte_fallback: bool) -> str:
    """SentencePiece's failure, told in terms of our options."""
    reserved = len(SPECIAL_TOKENS) + (BYTE_PIECES if byte_fallback else 0)
    if m := _TOO_FEW_PIECES.search(message):
        needed = int(m.group(2))  # the characters plus the special (and byte) pieces
        unknown = "their UTF-8 bytes" if byte_fallback else "[UNK]"
        lower = (f", or lower --character-coverage below {character_coverage:g} so that more "
                 f"rare characters become {unknown}"
                 if character_coverage > MIN_CHARACTER_COVERAGE else "")
        return (f"--vocab-size {vocab_size} is too small for this corpus: at "
                f"--character-coverage {character_coverage:g}, {needed - reserved} distinct "
                f"characters each need a piece of their own, {needed} ids with the {reserved} "
                f"reserved ones. Raise --vocab-size to at least {needed} (more leaves room for "
                f"words){lower}")
    if m := _TOO_MANY_PIECES.search(message):
        return (f"--vocab-size {vocab_size} is too large for this corpus: SentencePiece finds "
                f"at most {m.group(2)} pieces in it. Lower --vocab-size to {m.group(2)} or less, "
                "or train on more text")
    return f"SentencePiece training failed: {message}"


class Tokenizer:
    """Our SentencePiece tokenizer. `Tokenizer.load` also opens a Hugging Face BERT WordPiece
    tokenizer (see wordpiece.py), which has the same interface and other special ids."""

    pad_id, unk_id, cls_id, sep_id, mask_id = PAD_ID, UNK_ID, CLS_ID, SEP_ID, MASK_ID

    def __init__(self, model_path: Path):
        self.path = model_path
        self.files = [model_path]
        self.sp = spm.SentencePieceProcessor(model_file=str(model_path))
        for i, tok in enumerate(SPECIAL_TOKENS):
            if self.sp.id_to_piece(i) != tok:
                raise TokenizerError(f"{model_path} is not an mlm_dist tokenizer: id {i} is "
                                     f"{self.sp.id_to_piece(i)!r}, expected {tok!r}; "
                                     "train one with `mlm-dist tokenizer train`")
        normalizer = _model_proto(self.sp.serialized_model_proto()).normalizer_spec
        # For Japanese/Chinese text (module docstring): spaces next to CJK characters dropped.
        self.cjk = normalizer.name == CJK_NORMALIZATION
        self._dummy_prefix = normalizer.add_dummy_prefix

    @classmethod
    def load(cls, path: str | Path) -> "Tokenizer":
        p = Path(path)
        model = p / MODEL_FILE if p.is_dir() else p
        if p.is_dir() and not model.is_file():
            from mlm_dist.tokenizer.wordpiece import WordPieceTokenizer, is_wordpiece_dir
            if is_wordpiece_dir(p):
                return WordPieceTokenizer(p)
        if not model.is_file():
            raise PathNotFoundError(f"no tokenizer at {p}: expected {MODEL_FILE} (train one with "
                                    "`mlm-dist tokenizer train --input … --out DIR`) or a "
                                    "Hugging Face BERT tokenizer (tokenizer.json or vocab.txt)")
        return cls(model)

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    @cached_property
    def sha256(self) -> str:
        return hashlib.sha256(self.path.read_bytes()).hexdigest()

    def encode(self, text: str, parse_mask: bool = False) -> list[int]:
        if not parse_mask:
            return self.sp.encode(self._sentencepiece_text(text))
        # Each side of a [MASK] must tokenize as it would around a real word: the text after a
        # [MASK] starts a new word ("▁of") only if a space separates them; "[MASK]." gives ".",
        # never a "▁" "." the model did not see in training. Each side is its own text for
        # drop_cjk_spaces too, as in the export ("日本の[MASK] です" is [MASK] "です").
        first, *rest = text.split("[MASK]")
        ids = self.sp.encode(self._sentencepiece_text(first))
        continuing = self._continuing_sp
        for part in map(self._sentencepiece_text, rest):
            ids.append(MASK_ID)
            ids.extend((self._word_sp if _starts_word(continuing, part) else continuing)
                       .encode(part))
        return ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self.sp.encode([self._sentencepiece_text(t) for t in texts] if self.cjk else texts)

    def _sentencepiece_text(self, text: str) -> str:
        return drop_cjk_spaces(text) if self.cjk else text

    def encode_spans(self, texts: list[str]) -> list[tuple[list[int], list[tuple[int, int]]]]:
        """Ids and, per token, the (begin, end) characters of the text it came from (empty for
        a "▁" SentencePiece added, shared by the byte pieces of one character). A dropped
        space (drop_cjk_spaces) is in no token's span."""
        # The text SentencePiece reads, and where each of its characters was (None: the same).
        prepared = ([_drop_cjk_spaces_keeping_places(t) for t in texts] if self.cjk
                    else [(t, None) for t in texts])
        out = []
        for (text, places), proto in zip(prepared, self.sp.encode([t for t, _ in prepared],
                                                                   return_type="proto")):
            pieces = proto.pieces
            # SentencePiece counts UTF-8 bytes, we count characters: a byte offset is the
            # number of characters that end at or before it.
            codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
            ends = np.cumsum(1 + (codes >= 0x80) + (codes >= 0x800) + (codes >= 0x10000))
            bounds = np.fromiter((b for p in pieces for b in (p.begin, p.end)), dtype=np.int64,
                                 count=2 * len(pieces))
            chars = np.searchsorted(ends, bounds, side="right").reshape(-1, 2)
            if places is not None:
                chars = _original_spans(chars, places)
            out.append(([p.id for p in pieces], [tuple(span) for span in chars.tolist()]))
        return out

    def decode(self, ids: Iterable[int]) -> str:
        return self.sp.decode([int(i) for i in ids if int(i) >= len(SPECIAL_TOKENS)])

    def id_to_piece(self, i: int) -> str:
        return self.sp.id_to_piece(int(i))

    @cached_property
    def _continuing_sp(self) -> spm.SentencePieceProcessor:
        """`sp` without the dummy prefix (the "▁" in front of the first word), for text that
        continues the word before it."""
        return self._sp_with_dummy_prefix(False)

    @cached_property
    def _word_sp(self) -> spm.SentencePieceProcessor:
        """`sp` with the dummy prefix, for text after a [MASK] that starts a new word: a
        Japanese/Chinese tokenizer has none (no "▁" begins a sentence), but a space inside a
        sentence still puts a "▁" in front of the word after it."""
        return self._sp_with_dummy_prefix(True)

    def _sp_with_dummy_prefix(self, dummy_prefix: bool) -> spm.SentencePieceProcessor:
        if dummy_prefix == self._dummy_prefix:
            return self.sp
        proto = _model_proto(self.sp.serialized_model_proto())
        proto.normalizer_spec.add_dummy_prefix = dummy_prefix
        return spm.SentencePieceProcessor(model_proto=proto.SerializeToString())

    @cached_property
    def vocabulary(self) -> Vocabulary:
        special = np.zeros(self.vocab_size, dtype=bool)
        special[: len(SPECIAL_TOKENS)] = True
        # A piece beginning with "▁" begins a word; every special is a word of its own.
        word_start = np.array([self.sp.id_to_piece(i).startswith(WORD_BOUNDARY)
                               for i in range(self.vocab_size)], dtype=bool) | special
        return Vocabulary(self.vocab_size, PAD_ID, UNK_ID, CLS_ID, SEP_ID, MASK_ID, special,
                          word_start)


def _original_spans(spans: np.ndarray, places: np.ndarray) -> np.ndarray:
    """(begin, end) pairs in drop_cjk_spaces's text -> in the text it was given; `places` are
    the offsets of its characters and its end in that text. An empty span stays empty."""
    begins, ends = places[spans[:, 0]], places[np.maximum(spans[:, 1] - 1, 0)] + 1
    return np.stack([begins, np.where(spans[:, 1] > spans[:, 0], ends, begins)], axis=1)


def _starts_word(continuing: spm.SentencePieceProcessor, part: str) -> bool:
    """Whether text following a [MASK] starts a new word. SentencePiece's normalisation decides
    what is a space (it maps U+200B to one and deletes U+000B, unlike str.isspace), so ask it;
    the "]" of the [MASK] in front keeps a leading space from being stripped as leading."""
    return continuing.normalize("]" + part).startswith("]" + WORD_BOUNDARY)


def sentences_of(documents: Iterable[list[str]]) -> Iterator[str]:
    for doc in documents:
        yield from doc
