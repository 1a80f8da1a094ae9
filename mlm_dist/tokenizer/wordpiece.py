"""A Hugging Face BERT tokenizer (WordPiece: tokenizer.json or vocab.txt), for continuing the
pretraining of an existing BERT on new text (domain adaptation, `model.init_from`).

It offers what the rest of mlm_dist asks of a tokenizer (see sentencepiece.Tokenizer): ids of
the five special tokens, encode/encode_batch without specials, the special and word-start
tables (a piece starting with "##" continues a word), and the files that describe it.
"""

from __future__ import annotations

import hashlib
import json
from functools import cached_property
from pathlib import Path
from typing import Iterable

import numpy as np

from mlm_dist.tokenizer.sentencepiece import TokenizerError
from mlm_dist.tokenizer.vocabulary import SPECIAL_TOKENS, Vocabulary


def is_wordpiece_dir(directory: Path) -> bool:
    return (directory / "tokenizer.json").is_file() or (directory / "vocab.txt").is_file()


class WordPieceTokenizer:
    def __init__(self, directory: Path):
        from tokenizers import Tokenizer as Backend
        from tokenizers.implementations import BertWordPieceTokenizer

        self.directory = directory
        config_file = directory / "tokenizer_config.json"
        config = json.loads(config_file.read_text()) if config_file.is_file() else {}
        if (directory / "tokenizer.json").is_file():
            self.path = directory / "tokenizer.json"
            self.backend = Backend.from_file(str(self.path))
        else:
            self.path = directory / "vocab.txt"
            self.backend = BertWordPieceTokenizer(
                str(self.path), lowercase=config.get("do_lower_case", True),
                strip_accents=config.get("strip_accents"))._tokenizer
        self.backend.no_padding()
        self.backend.no_truncation()
        # Corpus text is text: a literal "[SEP]" must not inject a separator (HF tokenizers match
        # their special tokens in raw text unless told not to). Only encode(parse_mask=True)
        # turns "[MASK]" into the mask id.
        self.backend.encode_special_tokens = True
        self.files = [self.path] + [directory / n for n in ("tokenizer_config.json",
                                                             "special_tokens_map.json")
                                    if (directory / n).is_file()]
        ids = [self.backend.token_to_id(t) for t in SPECIAL_TOKENS]
        if None in ids:
            missing = [t for t, i in zip(SPECIAL_TOKENS, ids) if i is None]
            raise TokenizerError(f"{self.path} has no {', '.join(missing)}: not a BERT tokenizer")
        self.pad_id, self.unk_id, self.cls_id, self.sep_id, self.mask_id = ids

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    @cached_property
    def sha256(self) -> str:
        return hashlib.sha256(self.path.read_bytes()).hexdigest()

    def encode(self, text: str, parse_mask: bool = False) -> list[int]:
        if not parse_mask:
            return self.backend.encode(text, add_special_tokens=False).ids
        # BERT's pre-tokenizer splits at spaces and punctuation, so encoding each side of a
        # [MASK] on its own gives what a real word would have around it: "[MASK]." is [MASK] ".".
        first, *rest = text.split("[MASK]")
        ids = self.backend.encode(first, add_special_tokens=False).ids
        for part in rest:
            ids += [self.mask_id] + self.backend.encode(part, add_special_tokens=False).ids
        return ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.backend.encode_batch(texts, add_special_tokens=False)]

    def encode_spans(self, texts: list[str]) -> list[tuple[list[int], list[tuple[int, int]]]]:
        """Ids and, per token, the (begin, end) characters of the text it came from."""
        return [(e.ids, list(e.offsets))
                for e in self.backend.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self.backend.decode([int(i) for i in ids])

    def id_to_piece(self, i: int) -> str:
        return self.backend.id_to_token(int(i))

    @cached_property
    def vocabulary(self) -> Vocabulary:
        special = np.zeros(self.vocab_size, dtype=bool)
        special[[self.pad_id, self.unk_id, self.cls_id, self.sep_id, self.mask_id]] = True
        # A piece starting with "##" continues the word before it.
        word_start = np.array([not (self.id_to_piece(i) or "").startswith("##")
                               for i in range(self.vocab_size)], dtype=bool) | special
        return Vocabulary(self.vocab_size, self.pad_id, self.unk_id, self.cls_id, self.sep_id,
                          self.mask_id, special, word_start)
