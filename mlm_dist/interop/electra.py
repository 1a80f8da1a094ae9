"""Our ELECTRA (electra_model.py) -> Hugging Face: the discriminator as `ElectraForPreTraining`
in the export folder, the generator as `ElectraForMaskedLM` in its `generator/` subfolder,
each with the tokenizer (as export.export_hf writes it).

The folder is what `from_pretrained(folder)` and fine-tuning load (AutoModelFor... of an
ElectraConfig: the discriminator, the encoder ELECTRA trains for); `pipeline("fill-mask",
model=folder/generator)` runs the generator. Both hold the shared embeddings (the generator
at the discriminator's width, `embedding_size`, projected by `embeddings_project`), as
Google's released ELECTRA generators and discriminators do.

The names are one table per network, built from bert_names.PARAMETER_NAMES's encoder rows
(Hugging Face's ELECTRA encoder is BERT's under `electra.`); every one of our tensors must
land in one of the two networks and every one of theirs must come from ours, or the export
stops naming the tensors. The same tables read backwards bring a pair of transformers ELECTRA
networks to our names (`from_hf_state_dicts`: `bench convergence` scores its reference that way).
"""

from __future__ import annotations

from pathlib import Path

import torch

from mlm_dist.config import ModelConfig, generator_config
from mlm_dist.interop.bert_names import PARAMETER_NAMES, _strip_wrappers
from mlm_dist.interop.export import tokenizer_for_export, write_folders
from mlm_dist.tokenizer import PAD_ID

ENCODER_ROWS = [(ours, hf.replace("bert.", "electra.", 1)) for ours, hf in PARAMETER_NAMES
                if ours.startswith(("embeddings.", "layers."))]
DISCRIMINATOR_HEAD = [
    ("rtd_head.dense.weight", "discriminator_predictions.dense.weight"),
    ("rtd_head.dense.bias", "discriminator_predictions.dense.bias"),
    ("rtd_head.score.weight", "discriminator_predictions.dense_prediction.weight"),
    ("rtd_head.score.bias", "discriminator_predictions.dense_prediction.bias"),
]
GENERATOR_HEAD = [
    ("mlm_head.transform.weight", "generator_predictions.dense.weight"),
    ("mlm_head.transform.bias", "generator_predictions.dense.bias"),
    ("mlm_head.norm.weight", "generator_predictions.LayerNorm.weight"),
    ("mlm_head.norm.bias", "generator_predictions.LayerNorm.bias"),
    ("embeddings.tokens.weight", "generator_lm_head.weight"),  # tied to the token matrix
    ("mlm_head.decoder.bias", "generator_lm_head.bias"),
]
PROJECTION = [("generator.project.weight", "electra.embeddings_project.weight"),
              ("generator.project.bias", "electra.embeddings_project.bias")]
# Second names of a tensor in our state dict (the tied matrix).
OUR_ALIASES = {"mlm_head.decoder.weight": "embeddings.tokens.weight"}


def _rows(rows: list[tuple[str, str]], num_layers: int) -> list[tuple[str, str]]:
    out = []
    for ours, hf in rows:
        if "{i}" in ours:
            out += [(ours.replace("{i}", str(i)), hf.replace("{i}", str(i)))
                    for i in range(num_layers)]
        else:
            out.append((ours, hf))
    return out


def discriminator_names(cfg: ModelConfig) -> list[tuple[str, str]]:
    """(ours, ElectraForPreTraining's) for every tensor of the discriminator."""
    return _rows(ENCODER_ROWS, cfg.num_layers) + DISCRIMINATOR_HEAD


def generator_names(cfg: ModelConfig, generator_size: float) -> list[tuple[str, str]]:
    """(ours, ElectraForMaskedLM's) for every tensor of the generator."""
    g = generator_config(cfg, generator_size)
    layers = [(f"generator.{ours}", hf) for ours, hf in _rows(ENCODER_ROWS, g.num_layers)
              if ours.startswith("layers.")]
    embeddings = [(ours, hf) for ours, hf in _rows(ENCODER_ROWS, 0)
                  if ours.startswith("embeddings.")]
    projection = PROJECTION if g.hidden_size != cfg.hidden_size else []
    return embeddings + projection + layers + GENERATOR_HEAD


def hf_electra_configs(cfg: ModelConfig, generator_size: float):
    """(discriminator's, generator's) `transformers.ElectraConfig`: the networks of `cfg`."""
    from transformers import ElectraConfig

    def config(model: ModelConfig, architecture: str) -> ElectraConfig:
        return ElectraConfig(
            vocab_size=cfg.vocab_size, embedding_size=cfg.hidden_size,
            hidden_size=model.hidden_size, num_hidden_layers=model.num_layers,
            num_attention_heads=model.num_heads, intermediate_size=model.intermediate_size,
            hidden_act="gelu",  # exact erf GELU, as model.py computes it
            hidden_dropout_prob=cfg.dropout, attention_probs_dropout_prob=cfg.attention_dropout,
            max_position_embeddings=cfg.max_positions, type_vocab_size=cfg.type_vocab_size,
            initializer_range=cfg.init_std, layer_norm_eps=cfg.layer_norm_eps,
            pad_token_id=PAD_ID, tie_word_embeddings=True, architectures=[architecture])

    return (config(cfg, "ElectraForPreTraining"),
            config(generator_config(cfg, generator_size), "ElectraForMaskedLM"))


def to_hf_state_dicts(state_dict: dict[str, torch.Tensor], cfg: ModelConfig,
                      generator_size: float) -> tuple[dict, dict]:
    """(ElectraForPreTraining's, ElectraForMaskedLM's) state dicts from ours (fp32, on the
    CPU). A tensor of ours in neither, or one of theirs missing from ours, is an error."""
    sd = {_strip_wrappers(k): v for k, v in state_dict.items()}
    for alias, source in OUR_ALIASES.items():
        if alias in sd and source in sd and not torch.equal(sd[alias], sd[source]):
            raise ValueError(f"mlm_dist state dict: {alias} should be tied to {source} but differs")
        sd.pop(alias, None)
    tables = discriminator_names(cfg), generator_names(cfg, generator_size)
    missing = sorted({ours for table in tables for ours, _ in table} - sd.keys())
    unused = sorted(sd.keys() - {ours for table in tables for ours, _ in table})
    if missing or unused:
        raise KeyError(f"ELECTRA export: our state dict lacks {missing[:8]} and has "
                       f"{unused[:8]} that neither network takes")
    return tuple({hf: sd[ours].detach().to("cpu", torch.float32) for ours, hf in table}
                 for table in tables)


def from_hf_state_dicts(discriminator: dict[str, torch.Tensor], generator: dict[str, torch.Tensor],
                        cfg: ModelConfig, generator_size: float) -> dict[str, torch.Tensor]:
    """Our state dict (fp32 copies, on the CPU) from (ElectraForPreTraining's,
    ElectraForMaskedLM's): the export's tables read backwards. A tensor of ours that both
    networks hold (the shared embeddings; the token matrix, also the generator's output
    matrix) must be equal wherever it appears, since ours holds it once; a tensor of theirs in
    no table, or one the table wants and they lack, is an error."""
    ours: dict[str, torch.Tensor] = {}
    for hf_class, hf_sd, table in (
            ("ElectraForPreTraining", discriminator, discriminator_names(cfg)),
            ("ElectraForMaskedLM", generator, generator_names(cfg, generator_size))):
        missing = sorted({hf for _, hf in table} - hf_sd.keys())
        unused = sorted(hf_sd.keys() - {hf for _, hf in table})
        if missing or unused:
            raise KeyError(f"{hf_class} state dict: lacks {missing[:8]} and has {unused[:8]} "
                           "that our ELECTRA does not take")
        for name, hf in table:
            tensor = hf_sd[hf].detach().to("cpu", torch.float32, copy=True)
            if name in ours and not torch.equal(ours[name], tensor):
                raise ValueError(f"{hf_class}: {hf} should equal the other copy of our {name} "
                                 "(ELECTRA shares it) but differs")
            ours[name] = tensor
    for alias, source in OUR_ALIASES.items():
        ours[alias] = ours[source]
    return ours


def export_electra(state_dict: dict[str, torch.Tensor], cfg: ModelConfig, generator_size: float,
                   tokenizer_dir: str | Path, out_dir: str | Path) -> Path:
    """Write `out_dir` (ElectraForPreTraining + tokenizer) and `out_dir/generator`
    (ElectraForMaskedLM + tokenizer); `out_dir` must be new or empty."""
    import transformers

    out = Path(out_dir)
    ours = tokenizer_for_export(out, tokenizer_dir, cfg)
    models = []
    for (hf_class, subfolder), config, hf_sd in zip(
            (("ElectraForPreTraining", ""), ("ElectraForMaskedLM", "generator")),
            hf_electra_configs(cfg, generator_size),
            to_hf_state_dicts(state_dict, cfg, generator_size)):
        config.pad_token_id = ours.pad_id
        model = getattr(transformers, hf_class)(config)
        # Strict: any name or shape that does not fit is an error here, never a random weight.
        missing, unexpected = model.load_state_dict(hf_sd, strict=False)
        if missing or unexpected:
            raise ValueError(f"export to {hf_class}: missing {sorted(missing)}, "
                             f"unexpected {sorted(unexpected)}")
        models.append((model, subfolder))
    return write_folders(out, models, ours, cfg.max_positions)
