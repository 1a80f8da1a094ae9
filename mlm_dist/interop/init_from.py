"""`model.init_from`: a Hugging Face BERT folder as the start of a run, its shape and weights.

Apart from export because training imports it (model.init_from, evaluation): it needs neither
transformers nor tokenizers, and a rank should not wait seconds at start for what only an export
needs.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from mlm_dist.config import ModelConfig
from mlm_dist.errors import PathNotFoundError
from mlm_dist.interop import ModelFolderError
from mlm_dist.interop.bert_names import HEAD_MODULES, from_hf_state_dict
from mlm_dist.model import BertForPretraining


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
