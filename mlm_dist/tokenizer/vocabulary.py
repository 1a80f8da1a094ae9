"""The ids a tokenizer gives BERT's special tokens, and the tables masking needs, in one object."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Our SentencePiece tokenizers put the specials at these ids; a WordPiece one has its own.
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
PAD_ID, UNK_ID, CLS_ID, SEP_ID, MASK_ID = 0, 1, 2, 3, 4


@dataclass(frozen=True, eq=False)
class Vocabulary:
    """What the rest of mlm_dist needs to know about a tokenizer's ids, in one object.

    Passed wherever ids matter (batches, masking, evaluation), so a WordPiece model continued
    with `model.init_from` (other special ids than ours) can never meet a silent default.
    """

    size: int
    pad: int
    unk: int
    cls: int
    sep: int
    mask: int
    special: np.ndarray  # bool[size]: ids masking never chooses nor draws as replacements
    word_start: np.ndarray  # bool[size]: pieces that begin a word (whole-word masking)

    def __post_init__(self):
        for name in ("special", "word_start"):
            if np.shape(getattr(self, name)) != (self.size,):
                raise ValueError(f"Vocabulary.{name} has {np.shape(getattr(self, name))} entries "
                                 f"for a vocabulary of {self.size}: it must cover every id")

    @property
    def replacement_ids(self) -> np.ndarray:
        """The ids a random replacement (BERT's 10 %) is drawn from."""
        return np.flatnonzero(~self.special)
