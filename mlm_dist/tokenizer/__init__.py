"""Tokenizers: our SentencePiece model (sentencepiece.py) and, for continuing a Hugging Face
BERT, its WordPiece tokenizer (wordpiece.py), behind one interface; `Tokenizer.load` opens
either. The special ids and word-start table travel as one `Vocabulary` (vocabulary.py)."""

from mlm_dist.tokenizer.sentencepiece import (CJK_LANGUAGES, DEFAULT_CHARACTER_COVERAGE,
                                              MODEL_FILE, WORD_BOUNDARY, Tokenizer,
                                              corpus_language, drop_cjk_spaces, sentences_of,
                                              train_tokenizer)
from mlm_dist.tokenizer.vocabulary import (CLS_ID, MASK_ID, PAD_ID, SEP_ID, SPECIAL_TOKENS,
                                           UNK_ID, Vocabulary)

__all__ = ["CJK_LANGUAGES", "CLS_ID", "DEFAULT_CHARACTER_COVERAGE", "MASK_ID", "MODEL_FILE",
           "PAD_ID", "SEP_ID", "SPECIAL_TOKENS", "UNK_ID", "WORD_BOUNDARY", "Tokenizer",
           "Vocabulary", "corpus_language", "drop_cjk_spaces", "sentences_of", "train_tokenizer"]
