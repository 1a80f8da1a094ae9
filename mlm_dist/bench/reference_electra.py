"""ELECTRA's reference network for `mlm-dist bench convergence`: transformers' two classes,
trained as the paper trains them, in plain torch (Clark et al. 2020; Google's TensorFlow
pretraining code is the only other loop there is, and transformers has none).

- The generator is `ElectraForMaskedLM`, the discriminator `ElectraForPreTraining`, of the
  shapes our objective builds (interop/electra.py's configs: the generator
  `objective.generator_size` of the model's width, projecting the embeddings down to it).
  They share ONE embeddings module, tokens, positions, segments and LayerNorm, as the paper
  ties them and as our electra_model.py does; the generator's output matrix is that token
  matrix. Both start from our initial weights.
- One forward: the generator reads the collator's masked ids and gives its MLM loss (mean
  cross entropy over the masked positions); at every masked position a token is drawn from its
  softmax (torch.multinomial, no gradient through the draw) and written into the original ids;
  the discriminator tells every real token whether it differs from the original (a draw equal
  to the original counts as original, as in the paper) and gives its mean binary cross entropy.
  loss = MLM + λ·RTD, λ = objective.rtd_weight, both means as transformers computes them.

The draws come from a generator seeded from train.seed, so a seed repeats its run.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
from transformers import ElectraForMaskedLM, ElectraForPreTraining

from mlm_dist.interop.electra import from_hf_state_dicts, hf_electra_configs, to_hf_state_dicts
from mlm_dist.model import IGNORE_INDEX

# The draws' seed is train.seed + this: DataCollatorForLanguageModeling's own generator is
# seeded with train.seed, and one stream for both would tie the draws to the masks.
SAMPLER_SEED_OFFSET = 1


@dataclass
class ElectraReferenceOutput:
    loss: torch.Tensor  # generator_loss + λ · rtd_loss, what the loop back-propagates
    generator_loss: torch.Tensor
    rtd_loss: torch.Tensor


class ElectraReference(nn.Module):
    """The generator and the discriminator on one embeddings module; `forward` takes what
    DataCollatorForLanguageModeling hands a model and returns the paper's loss."""

    def __init__(self, cfg, device: torch.device):
        super().__init__()
        self.model_cfg, self.generator_size = cfg.model, cfg.objective.generator_size
        self.rtd_weight = cfg.objective.rtd_weight
        discriminator_config, generator_config = hf_electra_configs(cfg.model,
                                                                    self.generator_size)
        self.discriminator = ElectraForPreTraining(discriminator_config)
        self.generator = ElectraForMaskedLM(generator_config)
        shared = self.discriminator.electra.embeddings
        self.generator.electra.embeddings = shared
        self.generator.generator_lm_head.weight = shared.word_embeddings.weight
        self.sampler = torch.Generator(device=device).manual_seed(
            cfg.train.seed + SAMPLER_SEED_OFFSET)

    def load_ours(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Our network's weights (objectives/electra.py), strictly: every tensor placed."""
        discriminator, generator = to_hf_state_dicts(state_dict, self.model_cfg,
                                                     self.generator_size)
        self.discriminator.load_state_dict(discriminator, strict=True)
        self.generator.load_state_dict(generator, strict=True)  # the shared ones: equal values

    def our_state_dict(self) -> dict[str, torch.Tensor]:
        """The weights as an fp32 state dict of our network, under our names."""
        return from_hf_state_dicts(self.discriminator.state_dict(), self.generator.state_dict(),
                                   self.model_cfg, self.generator_size)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor,
                labels: torch.Tensor, attention_mask: torch.Tensor | None = None
                ) -> ElectraReferenceOutput:
        generated = self.generator(input_ids=input_ids, token_type_ids=token_type_ids,
                                   attention_mask=attention_mask, labels=labels)
        masked = labels != IGNORE_INDEX  # the collator's labels: the original id where masked
        original = torch.where(masked, labels, input_ids)
        with torch.no_grad():
            probs = generated.logits[masked].float().softmax(-1)
            draws = torch.multinomial(probs, 1, generator=self.sampler).squeeze(-1)
        corrupted = original.masked_scatter(masked, draws)  # row-major, as logits[masked]
        discriminated = self.discriminator(input_ids=corrupted, token_type_ids=token_type_ids,
                                           attention_mask=attention_mask,
                                           labels=(corrupted != original).long())
        return ElectraReferenceOutput(generated.loss + self.rtd_weight * discriminated.loss,
                                      generated.loss, discriminated.loss)
