"""Our state dicts <-> Hugging Face `BertForPreTraining` / `BertForMaskedLM`, and export of a
loadable HF folder of either class; a HF BERT folder as the start of a run (`model.init_from`).

Imported only by export / import code paths, so training never pays for importing transformers.

The parameter mapping is one explicit table (`PARAMETER_NAMES`). Both directions use it and
both refuse leftovers, so a renamed module in model.py fails loudly here instead of exporting a
model with silently re-initialised weights.

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

import dataclasses
import json
import os
import re
import shutil
import uuid
from pathlib import Path

import torch
from safetensors.torch import load_file

from mlm_dist.config import ModelConfig
from mlm_dist.errors import PathExistsError, PathNotFoundError, UserError
from mlm_dist.model import BertForPretraining
from mlm_dist.tokenizer import (CLS_ID, MASK_ID, MODEL_FILE, PAD_ID, SEP_ID, SPECIAL_TOKENS,
                                UNK_ID, Tokenizer)
from mlm_dist.tokenizer.sentencepiece import CJK_SPACES_PATTERN

# transformers, tokenizers and sentencepiece's protobuf are imported by the functions that
# write or convert a folder: training imports this module (model.init_from, evaluation), and
# a rank should not wait seconds at start for what only an export needs.

# (ours, Hugging Face) for every parameter; "{i}" is the encoder layer index.
PARAMETER_NAMES: list[tuple[str, str]] = [
    ("embeddings.tokens.weight", "bert.embeddings.word_embeddings.weight"),
    ("embeddings.positions.weight", "bert.embeddings.position_embeddings.weight"),
    ("embeddings.token_types.weight", "bert.embeddings.token_type_embeddings.weight"),
    ("embeddings.norm.weight", "bert.embeddings.LayerNorm.weight"),
    ("embeddings.norm.bias", "bert.embeddings.LayerNorm.bias"),
    ("layers.{i}.attn.query.weight", "bert.encoder.layer.{i}.attention.self.query.weight"),
    ("layers.{i}.attn.query.bias", "bert.encoder.layer.{i}.attention.self.query.bias"),
    ("layers.{i}.attn.key.weight", "bert.encoder.layer.{i}.attention.self.key.weight"),
    ("layers.{i}.attn.key.bias", "bert.encoder.layer.{i}.attention.self.key.bias"),
    ("layers.{i}.attn.value.weight", "bert.encoder.layer.{i}.attention.self.value.weight"),
    ("layers.{i}.attn.value.bias", "bert.encoder.layer.{i}.attention.self.value.bias"),
    ("layers.{i}.attn.out.weight", "bert.encoder.layer.{i}.attention.output.dense.weight"),
    ("layers.{i}.attn.out.bias", "bert.encoder.layer.{i}.attention.output.dense.bias"),
    ("layers.{i}.attn_norm.weight", "bert.encoder.layer.{i}.attention.output.LayerNorm.weight"),
    ("layers.{i}.attn_norm.bias", "bert.encoder.layer.{i}.attention.output.LayerNorm.bias"),
    ("layers.{i}.ffn.up.weight", "bert.encoder.layer.{i}.intermediate.dense.weight"),
    ("layers.{i}.ffn.up.bias", "bert.encoder.layer.{i}.intermediate.dense.bias"),
    ("layers.{i}.ffn.down.weight", "bert.encoder.layer.{i}.output.dense.weight"),
    ("layers.{i}.ffn.down.bias", "bert.encoder.layer.{i}.output.dense.bias"),
    ("layers.{i}.ffn_norm.weight", "bert.encoder.layer.{i}.output.LayerNorm.weight"),
    ("layers.{i}.ffn_norm.bias", "bert.encoder.layer.{i}.output.LayerNorm.bias"),
    ("pooler.weight", "bert.pooler.dense.weight"),
    ("pooler.bias", "bert.pooler.dense.bias"),
    ("nsp_head.weight", "cls.seq_relationship.weight"),
    ("nsp_head.bias", "cls.seq_relationship.bias"),
    ("mlm_head.transform.weight", "cls.predictions.transform.dense.weight"),
    ("mlm_head.transform.bias", "cls.predictions.transform.dense.bias"),
    ("mlm_head.norm.weight", "cls.predictions.transform.LayerNorm.weight"),
    ("mlm_head.norm.bias", "cls.predictions.transform.LayerNorm.bias"),
    ("mlm_head.decoder.weight", "cls.predictions.decoder.weight"),
    ("mlm_head.decoder.bias", "cls.predictions.bias"),
]

# The rows of the pooler and the pair classifier: `BertForMaskedLM` (and our network of the same
# name) has neither; the rest of the table is what both classes hold.
PAIR_MODULES = ("pooler.", "nsp_head.")
MASKED_LM_NAMES = [(ours, hf) for ours, hf in PARAMETER_NAMES if not ours.startswith(PAIR_MODULES)]
HF_CLASSES = {"BertForPreTraining": PARAMETER_NAMES, "BertForMaskedLM": MASKED_LM_NAMES}
# Our modules that are heads on the encoder: a HF folder may lack them (load_pretrained).
HEAD_MODULES = PAIR_MODULES + ("mlm_head.",)

# Tied entries: a second name for the same tensor. A state dict may carry them or not (HF's
# save_pretrained drops them, so may checkpoint consolidators); conversion fills a missing one
# from its source, refuses one that differs from it, and always returns every key that the
# target model's own state_dict() has.
OUR_TIED = {"mlm_head.decoder.weight": "embeddings.tokens.weight"}
HF_TIED = {
    "cls.predictions.decoder.weight": "bert.embeddings.word_embeddings.weight",
    "cls.predictions.decoder.bias": "cls.predictions.bias",  # HF keeps the bias on the decoder too
}
# Buffers some HF checkpoints carry that are not parameters (recomputed by the model).
HF_BUFFERS = {"bert.embeddings.position_ids", "bert.embeddings.token_type_ids"}
# Prefixes wrappers put in front of our names: DDP/DeepSpeed's `module.`, torch.compile's.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


class ModelFolderError(UserError, ValueError):
    """A model or tokenizer that cannot be carried to or from Hugging Face: a folder that is not
    a BERT this run can continue, weights that do not fit, a tokenizer export cannot write."""


def _pattern(template: str) -> re.Pattern:
    return re.compile(re.escape(template).replace(r"\{i\}", r"(\d+)") + "$")


_OURS_TO_HF = [(_pattern(ours), hf) for ours, hf in PARAMETER_NAMES]
_HF_TO_OURS = [(_pattern(hf), ours) for ours, hf in PARAMETER_NAMES]


def _rename(key: str, table: list[tuple[re.Pattern, str]]) -> str | None:
    for pattern, target in table:
        m = pattern.match(key)
        if m:
            return target.replace("{i}", m.group(1)) if m.groups() else target
    return None


def _expected_keys(names: list[str], num_layers: int) -> set[str]:
    keys = set()
    for n in names:
        if "{i}" in n:
            keys.update(n.replace("{i}", str(i)) for i in range(num_layers))
        else:
            keys.add(n)
    return keys


def _num_layers(keys, prefix_pattern: str) -> int:
    indices = [int(m.group(1)) for k in keys if (m := re.match(prefix_pattern, k))]
    return max(indices) + 1 if indices else 0


def _strip_wrappers(key: str) -> str:
    while key.startswith(WRAPPER_PREFIXES):
        key = key.split(".", 1)[1]
    return key


def _fill_tied(sd: dict, tied: dict, side: str) -> dict:
    sd = dict(sd)
    for alias, source in tied.items():
        if source not in sd:
            continue  # reported as missing by _convert
        if alias not in sd:
            sd[alias] = sd[source]
        elif sd[alias] is not sd[source] and not torch.equal(sd[alias], sd[source]):
            raise ModelFolderError(f"{side} state dict: {alias} should be tied to {source} but differs")
    return sd


def _convert(sd: dict, table, side: str, layer_pattern: str, target_names: list[str]) -> dict:
    out, unknown = {}, []
    for key, tensor in sd.items():
        new = _rename(key, table)
        if new is None:
            unknown.append(key)
        else:
            out[new] = tensor
    if unknown:
        raise KeyError(f"{len(unknown)} {side} parameter(s) have no counterpart in "
                       f"huggingface.PARAMETER_NAMES: {sorted(unknown)[:8]}")
    missing = _expected_keys(target_names, _num_layers(out, layer_pattern)) - out.keys()
    if missing:
        raise KeyError(f"{side} state dict is incomplete: {len(missing)} parameter(s) missing, "
                       f"e.g. {sorted(missing)[:8]}")
    return out


def to_hf_state_dict(state_dict: dict[str, torch.Tensor],
                     names: list[tuple[str, str]] = PARAMETER_NAMES) -> dict[str, torch.Tensor]:
    """Our `BertForPretraining` names -> `transformers.BertForPreTraining` names (tensors
    shared); with `names=MASKED_LM_NAMES`, our `BertForMaskedLM` -> theirs."""
    sd = _fill_tied({_strip_wrappers(k): v for k, v in state_dict.items()}, OUR_TIED, "mlm_dist")
    hf_sd = _convert(sd, _OURS_TO_HF, "mlm_dist", r"bert\.encoder\.layer\.(\d+)\.",
                     [hf for _, hf in names])
    hf_sd["cls.predictions.decoder.bias"] = hf_sd["cls.predictions.bias"]
    return hf_sd


def from_hf_state_dict(hf_sd: dict[str, torch.Tensor],
                       heads_optional: bool = False) -> dict[str, torch.Tensor]:
    """`transformers.BertForPreTraining.state_dict()` names -> ours (inverse of to_hf_state_dict).
    `heads_optional`: only the encoder must be there (a `BertForMaskedLM` or `BertModel`, or
    a BERT without `cls.seq_relationship`: load_pretrained initialises what is missing).

    For starting from a published checkpoint, load it with
    `BertForPreTraining.from_pretrained(...)` first (which also renames legacy gamma/beta
    names) and pass its `state_dict()`.
    """
    sd = {k: v for k, v in hf_sd.items() if k not in HF_BUFFERS}
    if "cls.predictions.bias" not in sd and "cls.predictions.decoder.bias" in sd:
        sd["cls.predictions.bias"] = sd["cls.predictions.decoder.bias"]
    sd = _fill_tied(sd, HF_TIED, "Hugging Face")
    sd.pop("cls.predictions.decoder.bias", None)  # the same tensor as cls.predictions.bias (checked)
    required = [ours for ours, _ in PARAMETER_NAMES
                if not (heads_optional and ours.startswith(HEAD_MODULES))]
    return _convert(sd, _HF_TO_OURS, "Hugging Face", r"layers\.(\d+)\.", required)


def hf_bert_config(cfg: ModelConfig):
    """The `transformers.BertConfig` describing the same network as `cfg`."""
    from transformers import BertConfig

    return BertConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        intermediate_size=cfg.intermediate_size,
        hidden_act="gelu",  # exact erf GELU, as model.py computes it
        hidden_dropout_prob=cfg.dropout,
        attention_probs_dropout_prob=cfg.attention_dropout,
        max_position_embeddings=cfg.max_positions,
        type_vocab_size=cfg.type_vocab_size,
        initializer_range=cfg.init_std,
        layer_norm_eps=cfg.layer_norm_eps,
        pad_token_id=PAD_ID,
        tie_word_embeddings=True,
        architectures=["BertForPreTraining"],
    )


def pretrained_model_config(hf_dir: str | Path, cfg: ModelConfig) -> ModelConfig:
    """`cfg` with its shape taken from a Hugging Face BERT folder's config.json (`init_from`):
    the shape is the checkpoint's, never configured a second time."""
    path = Path(hf_dir) / "config.json"
    if not path.is_file():
        raise PathNotFoundError(f"model.init_from: {path} does not exist; point it at a Hugging "
                                "Face BERT folder (config.json, weights, tokenizer)")
    hf = json.loads(path.read_text())
    problems = [f"{k}={hf.get(k)!r} (need {v!r})" for k, v in
                (("model_type", "bert"), ("hidden_act", "gelu"),
                 ("position_embedding_type", "absolute")) if hf.get(k, v) != v]
    if problems:
        raise ModelFolderError(f"model.init_from: {path} is not a BERT mlm_dist can continue: "
                               + ", ".join(problems))
    return dataclasses.replace(
        cfg, vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
        num_layers=hf["num_hidden_layers"], num_heads=hf["num_attention_heads"],
        intermediate_size=hf["intermediate_size"],
        max_positions=hf["max_position_embeddings"],
        type_vocab_size=hf.get("type_vocab_size", 2),
        layer_norm_eps=hf.get("layer_norm_eps", 1e-12))


def pretrained_state_dict(hf_dir: str | Path) -> dict[str, torch.Tensor]:
    """Our state dict from a Hugging Face BertForPreTraining folder's weights, or of any BERT
    folder with heads missing (BertForMaskedLM, BertModel, a BERT without an NSP head): the
    encoder must be complete, the heads it has are converted."""
    d = Path(hf_dir)
    if (d / "model.safetensors").is_file():
        hf_sd = load_file(str(d / "model.safetensors"))
    elif (d / "pytorch_model.bin").is_file():
        hf_sd = torch.load(d / "pytorch_model.bin", map_location="cpu", weights_only=True)
    else:
        raise PathNotFoundError(f"model.init_from: no model.safetensors or pytorch_model.bin "
                                f"in {d}")
    if not any(k.startswith(("bert.", "cls.")) for k in hf_sd):
        hf_sd = {f"bert.{k}": v for k, v in hf_sd.items()}  # a BertModel's names have no prefix
    try:
        return from_hf_state_dict({k: v.float() for k, v in hf_sd.items()}, heads_optional=True)
    except KeyError as e:
        raise ModelFolderError(f"model.init_from: {d} is not a BERT this run can continue: "
                               f"{e.args[0]}") from None


def load_pretrained(cfg: ModelConfig, objective=None, say=print):
    """The network of `objective` (default: bert's) with `cfg.init_from`'s weights (`cfg` as
    resolve_data made it: the folder's shape).

    Heads the folder lacks (HFL's RoBERTa-wwm has no `cls.seq_relationship`; a
    `BertForMaskedLM` has no pooler either; a `BertModel` no MLM head) start from our own
    initialisation, and `say` (None: silent) names them in one line; heads the objective does
    not use (an NSP head continued with `mlm`) are left out, named too. Anything else missing
    or of another shape is an error naming the tensors, never a random weight."""
    theirs = pretrained_state_dict(cfg.init_from)  # first: a folder without weights fails fast
    model = objective.build_model(cfg) if objective is not None else BertForPretraining(cfg)
    own = model.state_dict()
    fresh = sorted(k for k in own if k not in theirs)
    unused = sorted(k for k in theirs if k not in own)
    not_heads = [k for k in fresh if not k.startswith(HEAD_MODULES)]
    if not_heads:  # the mapping requires the encoder: only a model of another shape gets here
        raise ModelFolderError(f"model.init_from: {cfg.init_from} lacks {not_heads[:8]}")
    wrong = [f"{k} {tuple(theirs[k].shape)} (need {tuple(own[k].shape)})"
             for k in own if k in theirs and theirs[k].shape != own[k].shape]
    if wrong:
        raise ModelFolderError(f"model.init_from: {cfg.init_from} has tensors of another shape than "
                               f"its config.json describes: {wrong[:8]}")
    model.load_state_dict({k: v for k, v in theirs.items() if k in own}, strict=False)
    if say is not None and fresh:
        say(f"model.init_from: {cfg.init_from} has no {', '.join(fresh)}: freshly initialised")
    if say is not None and unused:
        say(f"model.init_from: not used by this objective: {', '.join(unused)}")
    return model


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


def _name_tokenizer_class(config_file: Path, name: str) -> None:
    # transformers 5 writes "TokenizersBackend", a name transformers 4 does not know. The older
    # "PreTrainedTokenizerFast" means "load tokenizer.json as it is" in both (5 aliases it).
    config = json.loads(config_file.read_text())
    config["tokenizer_class"] = name
    config_file.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")


def export_hf(state_dict: dict[str, torch.Tensor], cfg: ModelConfig,
              tokenizer_dir: str | Path, out_dir: str | Path,
              hf_class: str = "BertForPreTraining") -> Path:
    """Write a folder that `<hf_class>.from_pretrained` and `AutoTokenizer.from_pretrained` load.

    `hf_class`: "BertForPreTraining" or "BertForMaskedLM" (HF_CLASSES). A network without the
    pair classifier (the `mlm` objective's) exported as `BertForPreTraining` gets a pooler and
    NSP head freshly initialised by transformers (seeded: every export of the same weights is
    the same folder), for tools that want that class; a network with them exported as
    `BertForMaskedLM` leaves them out.

    Contents: config.json, model.safetensors (fp32), tokenizer.json + tokenizer_config.json, and
    a copy of our tokenizer.model. Everything is written to a temporary sibling directory that is
    renamed into place at the end, so a failed export leaves nothing half-written behind.
    """
    import transformers

    if hf_class not in HF_CLASSES:
        raise ValueError(f"hf_class {hf_class!r}: export writes one of {sorted(HF_CLASSES)}")
    out = Path(out_dir)
    ours = tokenizer_for_export(out, tokenizer_dir, cfg)

    state_dict = {_strip_wrappers(k): v for k, v in state_dict.items()}
    has_pair = any(k.startswith(PAIR_MODULES) for k in state_dict)
    if hf_class == "BertForMaskedLM":
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith(PAIR_MODULES)}
    names = HF_CLASSES[hf_class] if has_pair else MASKED_LM_NAMES
    hf_sd = {k: v.detach().to("cpu", torch.float32)
             for k, v in to_hf_state_dict(state_dict, names).items()}
    config = hf_bert_config(cfg)
    config.pad_token_id = ours.pad_id
    config.architectures = [hf_class]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # the fresh pooler and NSP head, if any: the same every export
        model = getattr(transformers, hf_class)(config)
    # Any shape or name mismatch is an error here, never a random weight later; the one
    # exception is the fresh pooler and NSP head asked for above.
    fresh = {hf for ours_name, hf in PARAMETER_NAMES if ours_name.startswith(PAIR_MODULES)}
    missing, unexpected = model.load_state_dict(hf_sd, strict=False)
    if unexpected or set(missing) - fresh:
        raise ValueError(f"export to {hf_class}: missing {sorted(set(missing) - fresh)}, "
                         f"unexpected {sorted(unexpected)}")
    return write_folders(out, [(model, "")], ours, cfg.max_positions)


def tokenizer_for_export(out: Path, tokenizer_dir: str | Path, cfg: ModelConfig) -> Tokenizer:
    """Before any work: `out` must be new (or an empty directory), and the tokenizer the one
    of the model's vocabulary. Returns the tokenizer to write beside the weights."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise PathExistsError(f"export target {out} already exists and is not empty; "
                              "choose another --out or remove it")
    ours = Tokenizer.load(tokenizer_dir)
    if ours.vocab_size != cfg.vocab_size:
        raise ModelFolderError(f"tokenizer {ours.path} has {ours.vocab_size} pieces but the model's "
                               f"vocab_size is {cfg.vocab_size}; export with the tokenizer it was trained with")
    return ours


def write_folders(out: Path, models: list, ours: Tokenizer, max_positions: int) -> Path:
    """Each (transformers model, subfolder) of `models` saved with the tokenizer into `out`
    ("" the folder itself). Everything is written to a temporary sibling directory renamed
    into place at the end, so a failed export leaves nothing half-written behind."""
    # A model continued from a Hugging Face BERT keeps that BERT's WordPiece tokenizer files.
    wordpiece = not hasattr(ours, "sp")
    tokenizer = None if wordpiece else hf_tokenizer(ours.path, model_max_length=max_positions)

    out.parent.mkdir(parents=True, exist_ok=True)
    # A sibling, so the final rename stays on one filesystem; mkdir (not mkdtemp) so the
    # folder gets the user's usual permissions rather than 0700.
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        for model, subfolder in models:
            folder = tmp / subfolder
            model.save_pretrained(folder)
            if wordpiece:
                for f in ours.files:
                    shutil.copyfile(f, folder / f.name)
            else:
                tokenizer.save_pretrained(folder)
                _name_tokenizer_class(folder / "tokenizer_config.json", "PreTrainedTokenizerFast")
                shutil.copyfile(ours.path, folder / MODEL_FILE)
        if out.exists():
            out.rmdir()  # empty (checked above); rename cannot replace a directory elsewhere
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
