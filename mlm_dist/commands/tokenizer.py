"""`mlm-dist tokenizer train`: a SentencePiece tokenizer with BERT's specials, from the same
inputs `prepare` reads."""

from __future__ import annotations

import argparse
import sys

from mlm_dist.data.corpus import CorpusReader, check_readable, resolve_inputs
from mlm_dist.data.sentences import AUTO
from mlm_dist.tokenizer import (DEFAULT_CHARACTER_COVERAGE, corpus_language, sentences_of,
                                train_tokenizer)


def add_train_arguments(t: argparse.ArgumentParser) -> None:
    t.add_argument("--input", nargs="+", required=True, metavar="PATH",
                   help="files, directories or glob patterns, as for `prepare --input` (quote "
                        "patterns: expanded by mlm-dist)")
    t.add_argument("--vocab-size", type=int, required=True)
    t.add_argument("--out", required=True, help="directory to write tokenizer.model into")
    t.add_argument("--model-type", default="unigram", choices=["unigram", "bpe"])
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--input-sentence-size", type=int, default=2_000_000,
                   help="sentences sampled for training (bounds memory on big corpora)")
    t.add_argument("--character-coverage", type=float, default=DEFAULT_CHARACTER_COVERAGE,
                   metavar="SHARE",
                   help="share of the corpus's characters that get a piece of their own; rarer "
                        "ones become [UNK] (or bytes with --byte-fallback). SentencePiece "
                        "advises 0.9995 for rich character sets (Japanese, Chinese), 1.0 for "
                        f"small alphabets; 0.98 to 1 (default: {DEFAULT_CHARACTER_COVERAGE})")
    t.add_argument("--byte-fallback", action="store_true",
                   help="spell characters that have no piece as their UTF-8 bytes (<0x00>…"
                        "<0xFF>, 256 pieces counted in --vocab-size) instead of [UNK]")
    t.add_argument("--lang", default="en", metavar="CODE",
                   help="language of the corpus, as for `prepare --lang`: ja or zh train for "
                        "text without spaces between words (no lone ▁ before each sentence or "
                        "around Latin words); auto decides from the corpus (one more pass "
                        "over it); JSONL is split into sentences in it (default: en)")
    t.add_argument("--text-field", default="text", metavar="NAME",
                   help="as for `prepare --text-field` (default: text)")
    t.set_defaults(func=train)


def train(args) -> None:
    files = resolve_inputs(args.input)  # every input problem surfaces before training starts
    check_readable(files, args.text_field)
    # JSONL is split into sentences in --lang, as `prepare` splits it ("auto": per document).
    reader = CorpusReader(files, report=lambda line: print(line, file=sys.stderr, flush=True),
                          lang=args.lang, text_field=args.text_field)
    lang = reader.lang
    if lang == AUTO:  # one more pass over the corpus: the tokenizer serves all of it
        lang = corpus_language(CorpusReader(files, lang=AUTO,
                                            text_field=args.text_field).documents())
        print(f"--lang auto: training for {lang} text", file=sys.stderr, flush=True)
    tok = train_tokenizer(sentences_of(d.sentences for d in reader.documents()), args.out,
                          args.vocab_size, model_type=args.model_type, seed=args.seed,
                          input_sentence_size=args.input_sentence_size,
                          character_coverage=args.character_coverage,
                          byte_fallback=args.byte_fallback, lang=lang)
    print(f"wrote {tok.path} ({tok.vocab_size} pieces) from {len(files)} input files")
