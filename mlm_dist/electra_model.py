"""ELECTRA's two networks in one module (Clark et al. 2020), in plain torch on model.py's blocks.

- The discriminator is our BERT encoder (embeddings and post-LN layers of the model config)
  with a per-token head, dense + GELU + one logit: "was this token replaced?" It is what a
  user keeps and fine-tunes (Hugging Face's `ElectraForPreTraining`).
- The generator is a smaller masked LM: the same number of layers, hidden size, heads and
  FFN scaled by `objective.generator_size` (config.generator_config), and an MLM head
  (dense to the embedding size, GELU, LayerNorm, the tied vocabulary projection), as Hugging
  Face's `ElectraForMaskedLM`.
- The two share their embeddings: tokens, positions, segments and the embedding LayerNorm
  (the paper ties them; the generator's vocabulary projection is the token matrix too). They
  have the discriminator's width; the generator projects them to its own (`project`, Hugging
  Face's `embeddings_project`), as ElectraModel does when embedding and hidden sizes differ.

One forward pass runs the generator on the masked ids, samples a replacement for every masked
slot from its softmax, and runs the discriminator on the original ids with those samples
written in. Both networks are parameters of this one module, so one DeepSpeed engine trains
both under any ZeRO stage and one checkpoint holds both. The loss is the objective's
(objectives/electra.py).

Sampling is Gumbel-max: argmax(logits + Gumbel noise) is a draw from softmax(logits), made of
elementwise ops and an argmax, so nothing waits for the device (torch.multinomial checks its
input). The noise comes from a generator the caller seeds, so a resumed run and every
evaluation draw the same replacements. No gradient flows through the samples: the generator
learns from its MLM loss only, as in the paper.

This file knows nothing of ranks, DeepSpeed or data loading.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from mlm_dist.config import ConfigError, ModelConfig, generator_config
from mlm_dist.model import (IGNORE_INDEX, Encoder, EncoderLayer, MaskedLMHead, Packing,
                            run_layers)


class GeneratorHead(MaskedLMHead):
    """BERT's MLM head reading the generator's width: transform from the generator's hidden
    size back to the embedding size, GELU, LayerNorm, the tied vocabulary projection."""

    def __init__(self, cfg: ModelConfig, generator_hidden: int):
        super().__init__(cfg)
        self.transform = nn.Linear(generator_hidden, cfg.hidden_size)


class Generator(nn.Module):
    """The generator's own parameters: the projection from the shared embeddings (none when
    the widths are equal) and its layers. Its embeddings and head live on ElectraForPretraining
    (`embeddings`, `mlm_head`), where the tied matrix is a parameter of every module using it."""

    def __init__(self, cfg: ModelConfig, embedding_size: int):
        super().__init__()
        self.cfg = cfg
        self.project = (nn.Identity() if cfg.hidden_size == embedding_size
                        else nn.Linear(embedding_size, cfg.hidden_size))
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.num_layers))


class DiscriminatorHead(nn.Module):
    """ELECTRA's per-token classifier: dense, GELU (exact, the config's hidden_act), one logit."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.score = nn.Linear(cfg.hidden_size, 1)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.score(F.gelu(self.dense(h))).squeeze(-1)


class ElectraForPretraining(Encoder):
    """The discriminator is the Encoder this class is (`embeddings`, `layers`) plus `rtd_head`;
    the generator is `generator` (projection, layers) plus `mlm_head` on the same embeddings."""

    HEADS = ("mlm_head", "rtd_head", "generator")

    def __init__(self, cfg: ModelConfig, generator_size: float,
                 checkpoint_activations: bool | None = None):
        super().__init__(cfg, checkpoint_activations)
        self.generator_cfg = generator_config(cfg, generator_size)
        g = self.generator_cfg
        if g.hidden_size % g.num_heads:
            raise ConfigError(f"objective.generator_size {generator_size}: generator hidden size "
                              f"{g.hidden_size} is not divisible by its {g.num_heads} heads")
        self.generator = Generator(g, cfg.hidden_size)
        self.mlm_head = GeneratorHead(cfg, g.hidden_size)
        self.mlm_head.decoder.weight = self.embeddings.tokens.weight  # tied, as in the paper
        self.rtd_head = DiscriminatorHead(cfg)
        self.apply(self._init_weights)

    def generate(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor,
                 attention_mask: torch.Tensor | None, masked_positions: torch.Tensor | None,
                 packing: Packing | None = None) -> torch.Tensor:
        """The generator's MLM logits at `masked_positions` ([B, K, V]; every position,
        [B, S, V], when None). Its last layer computes only the positions read."""
        x = self.embeddings(input_ids, token_type_ids,
                            None if packing is None else packing.position_ids)
        x = self.generator.project(x)
        recompute = self.checkpoint_activations and self.training and torch.is_grad_enabled()
        x = run_layers(self.generator.layers, x, attention_mask, packing, masked_positions,
                       recompute)
        return self.mlm_head(x)

    def discriminate(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor,
                     attention_mask: torch.Tensor | None,
                     packing: Packing | None = None) -> torch.Tensor:
        """[B, S]: the discriminator's logit of "replaced" at every position."""
        return self.rtd_head(self.encode(input_ids, token_type_ids, attention_mask, packing,
                                         None))

    def forward(
        self,
        masked_ids: torch.Tensor,  # [B, S] the masker's ids ([MASK] / random / kept)
        token_type_ids: torch.Tensor,  # [B, S]
        attention_mask: torch.Tensor | None,  # [B, S], 1 = real token; None: no padding
        masked_positions: torch.Tensor,  # [B, K] the masker's slots
        labels: torch.Tensor,  # [B, K] original ids at the slots, IGNORE_INDEX on unused ones
        original_ids: torch.Tensor,  # [B, S] the ids before masking
        sampler: torch.Generator,  # seeded by the caller: the replacements' randomness
        packing: Packing | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(generator logits [B, K, V], discriminator logits [B, S], the discriminator's input
        ids [B, S]: `original_ids` with a sample from the generator at every used slot)."""
        mlm_logits = self.generate(masked_ids, token_type_ids, attention_mask, masked_positions,
                                   packing)
        corrupted = replace_masked(original_ids, masked_positions, labels,
                                   sample_tokens(mlm_logits.detach(), sampler))
        return mlm_logits, self.discriminate(corrupted, token_type_ids, attention_mask,
                                             packing), corrupted

    def token_logits(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor,
                     attention_mask: torch.Tensor | None) -> torch.Tensor:
        """[B, S, V]: the generator's MLM head at every position (fill-mask)."""
        return self.generate(input_ids, token_type_ids, attention_mask, None)


@torch.no_grad()
def sample_tokens(logits: torch.Tensor, sampler: torch.Generator) -> torch.Tensor:
    """One id per row of `logits` ([..., V]) drawn from softmax(logits), by Gumbel-max:
    argmax(logits - log(-log(u))), u uniform in [0, 1). u = 0 gives -inf noise (never chosen);
    u < 1 always, so no noise is +inf. In float32 whatever the logits' dtype."""
    u = torch.rand(logits.shape, generator=sampler, device=logits.device)
    return (logits.float() - torch.log(-torch.log(u))).argmax(-1)


def replace_masked(original_ids: torch.Tensor, positions: torch.Tensor, labels: torch.Tensor,
                   samples: torch.Tensor) -> torch.Tensor:
    """`original_ids` with `samples` ([B, K]) written at the used slots' positions. Unused slots
    point at position 0, which a used slot may also hold; as in masking.mask_tokens they repeat
    slot 0's write (its sample, or position 0's own id when slot 0 is unused too), so two
    different values never race for one position."""
    used = labels != IGNORE_INDEX
    values = torch.where(used, samples, torch.gather(original_ids, 1, positions))
    where = torch.where(used, positions, positions[:, :1])
    return original_ids.scatter(1, where, torch.where(used, values, values[:, :1]))
