"""Our SentencePiece model as a Hugging Face fast tokenizer giving the same ids: apart from the
weights because it is the one place that knows both SentencePiece's and tokenizers' pipelines.

The exported tokenizer is a `tokenizers` Unigram (or BPE) model built from the pieces and
scores inside our SentencePiece `tokenizer.model`, with SentencePiece's own normalisation
replayed in front (the precompiled NFKC charsmap, then whitespace collapsing) and BERT's
`[CLS] A [SEP] B [SEP]` template behind. A model trained with `--byte-fallback` keeps it: the
tokenizers model spells characters it has no piece for as the same <0xNN> byte pieces, and
the decoder turns them back into text. A Japanese/Chinese tokenizer (no dummy prefix, spaces
next to CJK characters dropped: tokenizer/sentencepiece.py) keeps both. `AutoTokenizer` loads
it from `tokenizer.json` alone, without sentencepiece installed and without the network.
"""

from __future__ import annotations

from pathlib import Path

from mlm_dist.interop import ModelFolderError
from mlm_dist.tokenizer import (CLS_ID, MASK_ID, PAD_ID, SEP_ID, SPECIAL_TOKENS, UNK_ID,
                                Tokenizer)
from mlm_dist.tokenizer.sentencepiece import CJK_SPACES_PATTERN

# transformers, tokenizers and sentencepiece's protobuf are imported by the functions that use
# them: importing this module costs none of them until a tokenizer is built.


def hf_tokenizer(tokenizer_dir: str | Path, model_max_length: int):
    """A `transformers` fast tokenizer that gives the same ids as our `Tokenizer.encode`.

    Built from the SentencePiece model file, needing neither the network nor a slow tokenizer
    class. (transformers' `AlbertTokenizer` would also read a SentencePiece model, but it
    lower-cases, strips accents and penalises some pieces by default, i.e. different ids.)
    """
    from sentencepiece import sentencepiece_model_pb2
    from tokenizers import AddedToken, decoders, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    ours = Tokenizer.load(tokenizer_dir)  # validates the special-token layout
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(ours.path.read_bytes())
    norm, trainer = proto.normalizer_spec, proto.trainer_spec
    # These are what train_tokenizer produces (with or without the dummy prefix); the pipeline
    # below reproduces exactly them.
    if not (norm.remove_extra_whitespaces and norm.escape_whitespaces
            and trainer.split_by_whitespace and not trainer.treat_whitespace_as_suffix):
        raise ModelFolderError(f"{ours.path}: unsupported SentencePiece options for export "
                               "(expected the defaults used by `mlm-dist tokenizer train`)")

    byte_fallback = trainer.byte_fallback
    backend = _backend_model(proto, ours.path)
    steps = _normalizer_steps(norm, cjk=ours.cjk)
    if norm.add_dummy_prefix:
        backend.normalizer = normalizers.Sequence(steps)
        backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first",
                                                         split=True)
    else:
        backend.normalizer = normalizers.Sequence(steps + [normalizers.Replace(" ", "▁")])
        backend.pre_tokenizer = _no_dummy_prefix_pre_tokenizer()
    metaspace = decoders.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    # ByteFallback first: it turns runs of <0xNN> pieces back into the characters they spell.
    backend.decoder = decoders.Sequence([decoders.ByteFallback(), metaspace]) if byte_fallback \
        else metaspace
    cls, sep = SPECIAL_TOKENS[CLS_ID], SPECIAL_TOKENS[SEP_ID]
    backend.post_processor = processors.TemplateProcessing(
        single=f"{cls}:0 $A:0 {sep}:0",
        pair=f"{cls}:0 $A:0 {sep}:0 $B:1 {sep}:1",
        special_tokens=[(cls, CLS_ID), (sep, SEP_ID)],
    )

    def special(i: int) -> AddedToken:
        # normalized=False: matched in the raw text before normalisation, so "[MASK]" typed by
        # a user becomes the mask id (as fill-mask needs) rather than "▁[", "MASK", "]".
        # No lstrip (RoBERTa's <mask> has it): the normaliser already drops the space in front
        # of a [MASK], and lstrip would also swallow U+0085, which SentencePiece keeps.
        return AddedToken(SPECIAL_TOKENS[i], normalized=False, special=True)

    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=special(PAD_ID), unk_token=special(UNK_ID), cls_token=special(CLS_ID),
        sep_token=special(SEP_ID), mask_token=special(MASK_ID),
        model_max_length=model_max_length,
        model_input_names=["input_ids", "token_type_ids", "attention_mask"],
        clean_up_tokenization_spaces=False,
    )
    for i, name in enumerate(SPECIAL_TOKENS):
        if tok.convert_tokens_to_ids(name) != i:  # cannot happen for a valid model; cheap to check
            raise ValueError(f"exported tokenizer maps {name} to {tok.convert_tokens_to_ids(name)}, not {i}")
    return tok


def _backend_model(proto, path: Path):
    """The tokenizers model (Unigram or BPE) with our pieces, scores and byte fallback."""
    from sentencepiece import sentencepiece_model_pb2
    from tokenizers import Tokenizer as BackendTokenizer
    from tokenizers.models import BPE, Unigram

    trainer = proto.trainer_spec
    byte_fallback = trainer.byte_fallback
    byte_pieces = {p.piece for p in proto.pieces if p.type == p.BYTE}  # <0x00>…<0xFF>
    pieces = [(p.piece, p.score) for p in proto.pieces]
    if trainer.model_type == sentencepiece_model_pb2.TrainerSpec.UNIGRAM:
        pieces = _unmatchable_byte_pieces(pieces, byte_pieces)
        backend = BackendTokenizer(Unigram(pieces, unk_id=UNK_ID, byte_fallback=byte_fallback))
    elif trainer.model_type == sentencepiece_model_pb2.TrainerSpec.BPE:
        from transformers.tokenization_utils_base import generate_merges

        vocab = {piece: i for i, (piece, _) in enumerate(pieces)}
        # Byte pieces are never built by merging text, as in SentencePiece.
        merges = generate_merges({p: i for p, i in vocab.items() if p not in byte_pieces})
        backend = BackendTokenizer(BPE(vocab, merges, unk_token=SPECIAL_TOKENS[UNK_ID],
                                       fuse_unk=True, byte_fallback=byte_fallback, dropout=None))
    else:
        raise ModelFolderError(f"{path}: SentencePiece model type {trainer.model_type} cannot be "
                               "exported (unigram and bpe can)")
    return backend


def _normalizer_steps(norm, *, cjk: bool) -> list:
    """SentencePiece's normalisation as tokenizers normalizers, up to the word-start marks
    (which depend on the dummy prefix: hf_tokenizer adds them)."""
    from tokenizers import Regex, normalizers

    # SentencePiece normalises in this order: the precompiled character map (NFKC and friends),
    # then drops leading/trailing spaces and collapses runs, then marks word starts with "▁"
    # (add_dummy_prefix puts one in front of the first word). Only ASCII space counts as
    # whitespace at that point, hence " " in the regexes rather than \s.
    # The normaliser runs on each piece of text between added tokens ([MASK]) on its own, so it
    # keeps a leading space: that space is what makes the text after a [MASK] start a new word,
    # as in Tokenizer.encode(parse_mask=True). A leading space of the whole text becomes the
    # "▁" that prepend_scheme="first" would otherwise add; "[MASK]." gets none. A trailing
    # space is dropped, so "the [MASK]" leaves no lone "▁" in front of the [MASK].
    # A Japanese/Chinese tokenizer drops the spaces next to CJK characters before SentencePiece
    # reads the text (Tokenizer.encode): the same pattern, on the same raw text, comes first.
    steps = [normalizers.Replace(Regex(CJK_SPACES_PATTERN), "")] if cjk else []
    if norm.precompiled_charsmap:
        # SentencePiece applies its map at each position with the longest matching key, and
        # keys of several characters compose, e.g. "ｶﾞ" (half-width katakana and sound mark)
        # or "か" U+3099 (macOS's decomposed kana) into "ガ", "が". The tokenizers Precompiled
        # looks up whole grapheme clusters instead: one of 6 UTF-8 bytes or more character by
        # character (so "ｶﾞ" became "カ" U+3099, another character than SentencePiece's), a
        # shorter one by its shortest matching key (so decomposed Vietnamese "ệ" lost its
        # circumflex). Canonical composition (NFC) around the map gives its lookups single
        # characters and composes what it leaves decomposed; on single characters NFC changes
        # nothing of SentencePiece's result (checked for every code point), and NFKC in front
        # would not do: SentencePiece keeps the full-width tilde "～" of Japanese text.
        steps += [normalizers.NFC(), normalizers.Precompiled(norm.precompiled_charsmap),
                  normalizers.NFC()]
    # A run of spaces keeps its first one (not a new one in its place), which stays where the
    # run began in the text: for the text's leading run that is offset 0, by which Metaspace's
    # prepend_scheme="first" knows the text's first piece (_no_dummy_prefix_pre_tokenizer).
    steps += [normalizers.Replace(Regex("(?<= ) +"), ""), normalizers.Replace(Regex(" $"), "")]
    return steps


def _no_dummy_prefix_pre_tokenizer():
    """Words as SentencePiece without its dummy prefix sees them, on text whose spaces the
    normaliser has made "▁": a "▁" begins a word; the whole text's leading space is dropped
    (SentencePiece strips it), but not that of the text after a [MASK] ("[MASK] file" is
    [MASK] "▁file", as in Tokenizer.encode(parse_mask=True)).

    The normaliser sees each piece of text between added tokens on its own and cannot tell the
    first one, so that is done here: Metaspace's prepend_scheme="first" puts its replacement in
    front of the piece that starts the text only. With a plain space as the replacement (the
    normalised text has none left, and Metaspace's own space -> replacement is then a no-op)
    that mark finds the first piece, and the split after it removes the mark and the "▁" of a
    leading space with it.
    """
    from tokenizers import Regex, pre_tokenizers

    return pre_tokenizers.Sequence([
        pre_tokenizers.Metaspace(replacement=" ", prepend_scheme="first", split=False),
        pre_tokenizers.Split(Regex(r"\A ▁?"), behavior="removed"),
        pre_tokenizers.Split("▁", behavior="merged_with_next"),
    ])


def _unmatchable_byte_pieces(pieces: list[tuple[str, float]],
                             byte_pieces: set[str]) -> list[tuple[str, float]]:
    """`pieces` with the byte pieces scored below any segmentation of their own spelling.

    SentencePiece reaches a byte piece only by falling back from a character it has no piece
    for; the text "<0x41>" is never that piece. The tokenizers Unigram matches every piece of
    its vocabulary against the text, and SentencePiece scores byte pieces 0 (the best score), so
    "<0x41>" typed in the text would become byte 0x41. Scored below six of the worst ordinary
    pieces, the six characters always win instead, as in SentencePiece. The byte fallback
    itself looks the byte pieces up by name and never uses their score, and the unknown-
    character score that moves along with the lowest score is the same on every path.
    Still different: "<0x41>" typed in a text where one of its six characters has no piece of
    its own (that character's unknown score is below any piece's, so the byte piece wins).
    """
    if not byte_pieces:
        return pieces
    ordinary = [score for piece, score in pieces if piece not in byte_pieces]
    unreachable = 6 * min(ordinary + [0.0]) - 1.0  # len("<0x41>") pieces of the lowest score
    return [(piece, unreachable if piece in byte_pieces else score) for piece, score in pieces]
