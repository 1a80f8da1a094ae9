"""A run's weights and tokenizer as a Hugging Face folder (`BertForPreTraining` or
`BertForMaskedLM`): the interop module that writes, so the write-whole-or-nothing lives once,
here; electra.py writes its two folders with the same `tokenizer_for_export` and `write_folders`.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

import torch

from mlm_dist.config import ModelConfig
from mlm_dist.errors import PathExistsError
from mlm_dist.interop import ModelFolderError
from mlm_dist.interop.bert_names import (HF_CLASSES, MASKED_LM_NAMES, PAIR_MODULES,
                                         PARAMETER_NAMES, _strip_wrappers, to_hf_state_dict)
from mlm_dist.interop.hf_tokenizer import hf_tokenizer
from mlm_dist.tokenizer import MODEL_FILE, PAD_ID, Tokenizer

# transformers is imported by the functions that use it: importing this module (for
# hf_bert_config) costs no transformers import until a config or a folder is built.


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
