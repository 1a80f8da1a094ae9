"""`bert`: BERT's masked LM + next-sentence prediction (the default objective).

Rows are NSP pairs (data/nsp.py: [CLS] A [SEP] B [SEP], B the actual next text or, half the
time, text of another document), one a row or several with packing. The network is
`BertForPreTraining`'s: MLM head plus a pooler and a two-way classifier on each pair's [CLS];
the loss is mean MLM cross entropy + mean NSP cross entropy. Exported as Hugging Face's
`BertForPreTraining` (or `BertForMaskedLM`, without the pair classifier and pooler).
"""

from __future__ import annotations

from mlm_dist.data.nsp import IS_RANDOM, nsp_pairs
from mlm_dist.model import IGNORE_INDEX, BertForPretraining, pretraining_loss
from mlm_dist.objectives.base import (Objective, mlm_eval_record, mlm_eval_terms,
                                      mlm_train_record, mlm_train_terms)


class PairObjective(Objective):
    """MLM + a two-way classifier of each pair (NSP here, sentence order in sop.py): the
    network, loss and metrics they share. `task` names the classifier's metrics; `balance`
    is the metric of the share of examples whose label is `flagged`."""

    task = ""
    balance = ""
    flagged = 1
    hf_class = "BertForPreTraining"
    hf_classes = ("BertForPreTraining", "BertForMaskedLM")

    @property
    def task_metrics(self):
        return (f"val/{self.task}_acc",)

    def build_model(self, model, checkpoint_activations=None):
        return BertForPretraining(model, checkpoint_activations)

    def losses(self, model, batch, masked):
        mlm_logits, pair_logits = model(masked.input_ids, batch.token_type_ids,
                                        batch.padding_mask, masked.positions, batch.packing)
        return pretraining_loss(mlm_logits, masked.labels, pair_logits, batch.example_label)

    def train_terms(self, losses, batch):
        return {**mlm_train_terms(losses),
                "pair_loss": losses["nsp_loss"].detach().float(),
                "pair_acc": losses["nsp_acc"].float(),
                "flagged": (batch.example_label == self.flagged).sum().float()}

    def train_record(self, sums, micro_steps):
        t = self.task
        return {**mlm_train_record(sums, micro_steps),
                f"train/{t}_loss": sums["pair_loss"] / micro_steps,
                f"train/{t}_acc": sums["pair_acc"] / micro_steps,
                self.balance: sums["flagged"] / max(1.0, sums["examples"])}

    def eval_terms(self, losses, batch):
        pairs = (batch.example_label != IGNORE_INDEX).sum()
        return {**mlm_eval_terms(losses),
                "pair_loss_sum": losses["nsp_loss"] * pairs,
                "pair_correct": losses["nsp_acc"] * pairs}

    def eval_record(self, sums):
        t, pairs = self.task, max(1.0, sums["examples"])
        return {**mlm_eval_record(sums),
                f"val/{t}_loss": sums["pair_loss_sum"] / pairs,
                f"val/{t}_acc": sums["pair_correct"] / pairs}


class Bert(PairObjective):
    name = "bert"
    task = "nsp"
    # The share of pairs whose B is random (1/2 and more: as in BERT, a one-sentence chunk
    # always gets a random B, so short documents raise it).
    balance = "data/nsp_random"
    flagged = IS_RANDOM

    def example_builder(self, seq_len, rng, data, vocab):
        return nsp_pairs(seq_len, rng, data, vocab)


