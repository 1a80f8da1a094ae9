"""Our parameter names <-> Hugging Face `BertForPreTraining` / `BertForMaskedLM`'s, and state
dicts converted by them both ways: the one table export, init_from and electra all build on.

The parameter mapping is one explicit table (`PARAMETER_NAMES`). Both directions use it and
both refuse leftovers, so a renamed module in model.py fails loudly here instead of exporting a
model with silently re-initialised weights.
"""

from __future__ import annotations

import re

import torch

from mlm_dist.interop import ModelFolderError

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
                       f"bert_names.PARAMETER_NAMES: {sorted(unknown)[:8]}")
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
