"""`electra`: replaced-token detection (Clark et al. 2020, ELECTRA).

Rows are `mlm`'s full rows of contiguous text (data/rows.py; the paper drops NSP). The masker
chooses its slots as for any objective (15 %, whole words where the shards have word starts);
a small generator (electra_model.py) predicts the masked tokens, a sample from its softmax
replaces each masked token, and the discriminator, the encoder a user keeps, tells every token
of the row whether it was replaced. A sample that happens to be the original token counts as
original, as in the paper. Loss = the generator's mean MLM cross entropy + `rtd_weight` (λ,
50) × the discriminator's binary cross entropy averaged over the rows' real tokens.

The replacements are drawn with a generator seeded from the masker's seed of the micro-batch
(MaskedBatch.seed): a resumed run draws what the uninterrupted run drew, and an evaluation of
the same weights the same.

Metrics: the generator's MLM loss and accuracy (train/gen_mlm_*, val/gen_mlm_*,
val/gen_perplexity); the discriminator's loss and accuracy over real tokens (train/rtd_*,
val/rtd_*), and on validation its precision, recall and F1 on replaced tokens (threshold
1/2) and its AUC; the share of real tokens replaced (train/replaced_frac, val/replaced_frac:
calling everything original scores 1 - that).

The AUC is estimated on the device: each batch adds its discriminator logits to two
histograms (replaced, original) of AUC_BINS equal bins over [-AUC_LOGIT, AUC_LOGIT] (the ends
take everything beyond), two vector terms summed like every other term; AUC = P(replaced
scores above original) with pairs in one bin counted half. Only pairs in one bin are
uncertain, so the estimate is within half their share of the exact AUC, logged as
val/rtd_auc_bound (the tests compare both with the exact rank AUC). Bins 1/128 of a logit wide
keep it small even early on, while the discriminator gives nearly every token about the same
logit (that of the share replaced): 256 bins 1/8 wide left bounds of 0.04-0.2 in `bench
convergence`'s 3,000 tiny steps, too loose to rank two runs. The exact rank AUC would need
every logit of the evaluation kept and sorted; 2 × 4,096 counts a batch are kept instead (64
KiB on the device until the pass adds up its batches in order: 64 MiB for 1,000 batches).

Exported as Hugging Face's `ElectraForPreTraining` (the discriminator) in the export folder,
with the generator as `ElectraForMaskedLM` in its `generator/` subfolder
(interop/electra.py): the folder is what fine-tuning loads, the subfolder what fill-mask runs.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from mlm_dist.data.rows import FullRowBuilder
from mlm_dist.electra_model import ElectraForPretraining
from mlm_dist.masking import mask_seed
from mlm_dist.model import masked_lm_loss
from mlm_dist.objectives.base import Objective

AUC_BINS = 4096
AUC_LOGIT = 16.0  # bins 1/128 wide in logit; beyond ±16 (p < 1e-7 from 0 or 1) in the end bins
SAMPLER_STREAM = 1  # the replacements' seed: mask_seed(masker's seed, this, 0, 0)


class Electra(Objective):
    name = "electra"
    hf_class = "ElectraForPreTraining"
    hf_classes = ("ElectraForPreTraining",)
    # The generator's MLM loss is what a reference's generator minimises alike; how well the
    # discriminator tells replaced tokens (RTD) is the task, its AUC free of the share replaced.
    headline = "val/gen_mlm_loss"
    task_metrics = ("val/rtd_acc", "val/rtd_auc")

    def __init__(self, cfg):
        super().__init__(cfg)
        self.samplers: dict[torch.device, torch.Generator] = {}

    def build_model(self, model, checkpoint_activations=None):
        return ElectraForPretraining(model, self.cfg.generator_size, checkpoint_activations)

    def flops_per_token(self, model, seq_len, max_predictions):
        from mlm_dist.config import generator_config
        from mlm_dist.flops import electra_flops_per_token

        return electra_flops_per_token(model, generator_config(model, self.cfg.generator_size),
                                       seq_len, max_predictions)

    def example_builder(self, seq_len, rng, data, vocab):
        return FullRowBuilder(seq_len, rng, sep_id=vocab.sep,
                              open_documents=data.open_documents)

    def sampler(self, device: torch.device, seed: int) -> torch.Generator:
        """This device's generator for the replacements, seeded for one micro-batch."""
        if device not in self.samplers:
            self.samplers[device] = torch.Generator(device=device)
        return self.samplers[device].manual_seed(mask_seed(seed, SAMPLER_STREAM, 0, 0))

    def losses(self, model, batch, masked):
        sampler = self.sampler(batch.input_ids.device, masked.seed)
        mlm_logits, rtd_logits, corrupted = model(
            masked.input_ids, batch.token_type_ids, batch.padding_mask, masked.positions,
            masked.labels, batch.input_ids, sampler, batch.packing)
        return electra_loss(mlm_logits, masked.labels, rtd_logits, corrupted, batch.input_ids,
                            batch.attention_mask, self.cfg.rtd_weight)

    def train_terms(self, losses, batch):
        return {"gen_mlm_loss": losses["gen_mlm_loss"].detach().float(),
                "gen_mlm_correct": (losses["gen_mlm_acc"] * losses["mlm_count"]).float(),
                "rtd_loss": losses["rtd_loss"].detach().float(),
                **{k: losses[k].float() for k in ("rtd_correct", "rtd_tokens", "replaced")}}

    def train_record(self, sums, micro_steps):
        tokens = max(1.0, sums["rtd_tokens"])
        return {"train/gen_mlm_loss": sums["gen_mlm_loss"] / micro_steps,
                "train/gen_mlm_acc": sums["gen_mlm_correct"] / max(1.0, sums["predicted"]),
                "train/rtd_loss": sums["rtd_loss"] / micro_steps,
                "train/rtd_acc": sums["rtd_correct"] / tokens,
                "train/replaced_frac": sums["replaced"] / tokens}

    def eval_terms(self, losses, batch):
        real, replaced = losses["real"], losses["replaced_at"]
        logits = losses["rtd_logits"].float()
        flagged = (logits > 0) & real
        return {"gen_mlm_loss_sum": losses["gen_mlm_loss"] * losses["mlm_count"],
                "gen_mlm_correct": losses["gen_mlm_acc"] * losses["mlm_count"],
                "rtd_loss_sum": losses["rtd_loss"] * losses["rtd_tokens"],
                "rtd_correct": losses["rtd_correct"], "rtd_tokens": losses["rtd_tokens"],
                "replaced": losses["replaced"], "flagged": flagged.sum(),
                "flagged_replaced": (flagged & replaced).sum(),
                "replaced_bins": logit_histogram(logits, replaced & real),
                "original_bins": logit_histogram(logits, ~replaced & real)}

    def eval_record(self, sums):
        predicted, tokens = max(1.0, sums["predicted"]), max(1.0, sums["rtd_tokens"])
        gen_loss = sums["gen_mlm_loss_sum"] / predicted
        precision = sums["flagged_replaced"] / max(1.0, sums["flagged"])
        recall = sums["flagged_replaced"] / max(1.0, sums["replaced"])
        auc, bound = auc_from_histograms(sums["replaced_bins"], sums["original_bins"])
        return {"val/gen_mlm_loss": gen_loss,
                "val/gen_perplexity": math.exp(min(gen_loss, 50.0)),
                "val/gen_mlm_acc": sums["gen_mlm_correct"] / predicted,
                "val/rtd_loss": sums["rtd_loss_sum"] / tokens,
                "val/rtd_acc": sums["rtd_correct"] / tokens,
                "val/rtd_auc": auc,
                "val/rtd_auc_bound": bound,
                "val/rtd_precision": precision,
                "val/rtd_recall": recall,
                "val/rtd_f1": 2 * precision * recall / max(1e-12, precision + recall),
                "val/replaced_frac": sums["replaced"] / tokens}

    def export(self, state_dict, model, tokenizer_dir, out, hf_class=""):
        from mlm_dist.config import ConfigError
        from mlm_dist.interop.electra import export_electra

        if hf_class not in ("", self.hf_class):
            raise ConfigError(f"--hf-class {hf_class}: objective electra exports as "
                              f"{self.hf_class}, with its generator as ElectraForMaskedLM in "
                              "generator/")
        return export_electra(state_dict, model, self.cfg.generator_size, tokenizer_dir, out)


def electra_loss(mlm_logits: torch.Tensor, mlm_labels: torch.Tensor, rtd_logits: torch.Tensor,
                 corrupted: torch.Tensor, original: torch.Tensor, attention_mask: torch.Tensor,
                 rtd_weight: float) -> dict[str, torch.Tensor]:
    """loss = generator MLM + rtd_weight · RTD, and what the metrics need: 0-dim tensors, and
    the per-token logits and labels ([B, S]) for evaluation. RTD: binary cross entropy of
    "replaced" (`corrupted` differs from `original`) averaged over real tokens (`attention_mask`
    1), in float32. Nothing here reads the device."""
    mlm = masked_lm_loss(mlm_logits, mlm_labels)
    real = attention_mask.bool()
    replaced = corrupted != original
    logits = rtd_logits.float()
    tokens = real.sum()
    per_token = F.binary_cross_entropy_with_logits(logits, replaced.float(), reduction="none")
    rtd_loss = (per_token * real).sum() / tokens.clamp(min=1)
    return {"loss": mlm["mlm_loss"] + rtd_weight * rtd_loss,
            "gen_mlm_loss": mlm["mlm_loss"], "gen_mlm_acc": mlm["mlm_acc"],
            "mlm_count": mlm["mlm_count"], "rtd_loss": rtd_loss,
            "rtd_correct": (((logits > 0) == replaced) & real).sum(), "rtd_tokens": tokens,
            "replaced": (replaced & real).sum(),
            "rtd_logits": logits.detach(), "replaced_at": replaced, "real": real}


def logit_histogram(logits: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
    """Counts of `logits` at `where` in AUC_BINS equal bins over [-AUC_LOGIT, AUC_LOGIT], the
    end bins taking everything beyond; float64 [AUC_BINS]. A scatter_add into fixed bins:
    no host sync (torch.bincount and histc size or range their output from the data)."""
    scaled = (logits.detach().float() + AUC_LOGIT) * (AUC_BINS / (2 * AUC_LOGIT))
    bins = scaled.floor().clamp(0, AUC_BINS - 1).long().flatten()
    counts = torch.zeros(AUC_BINS, dtype=torch.float64, device=logits.device)
    return counts.scatter_add_(0, bins, where.flatten().double())


def auc_from_histograms(positive, negative) -> tuple[float, float]:
    """(AUC, bound): the probability that a positive scores above a negative, from their
    counts per bin (bins in ascending score order), pairs in one bin counted half; `bound` is
    half the share of pairs in one bin, how far the exact AUC can be from it. NaN without
    positives or negatives."""
    total_pos, total_neg = sum(positive), sum(negative)
    if not total_pos or not total_neg:
        return math.nan, math.nan
    above = tied = 0.0
    below = 0.0  # negatives in the bins under the current one
    for pos, neg in zip(positive, negative):
        above += pos * below
        tied += pos * neg
        below += neg
    pairs = total_pos * total_neg
    return (above + tied / 2) / pairs, tied / 2 / pairs
