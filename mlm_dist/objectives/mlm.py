"""`mlm`: masked LM alone on full rows of contiguous text (RoBERTa's recipe, BERT's network;
HFL's Chinese RoBERTa-wwm is trained this way).

Rows are seq_len tokens of contiguous text, crossing documents with a [SEP] between them
(data/rows.py says why, and why not packing); one segment, no pair task. The network is
`BertForMaskedLM`'s (no pooler, no pair classifier), the loss mean MLM cross entropy. Exported
as Hugging Face's `BertForMaskedLM`, or as `BertForPreTraining` with a freshly initialised
pooler and NSP head for tools that want that class.
"""

from __future__ import annotations

from mlm_dist.data.rows import FullRowBuilder
from mlm_dist.model import BertForMaskedLM, masked_lm_loss
from mlm_dist.objectives.base import (Objective, mlm_eval_record, mlm_eval_terms,
                                      mlm_train_record, mlm_train_terms)


class MaskedLM(Objective):
    name = "mlm"
    hf_class = "BertForMaskedLM"
    hf_classes = ("BertForMaskedLM", "BertForPreTraining")

    def build_model(self, model, checkpoint_activations=None):
        return BertForMaskedLM(model, checkpoint_activations)

    def example_builder(self, seq_len, rng, data, vocab):
        return FullRowBuilder(seq_len, rng, sep_id=vocab.sep,
                              open_documents=data.open_documents)

    def losses(self, model, batch, masked):
        mlm_logits = model(masked.input_ids, batch.token_type_ids, batch.padding_mask,
                           masked.positions, batch.packing)
        losses = masked_lm_loss(mlm_logits, masked.labels)
        return {"loss": losses["mlm_loss"], **losses}

    def train_terms(self, losses, batch):
        return mlm_train_terms(losses)

    def train_record(self, sums, micro_steps):
        return mlm_train_record(sums, micro_steps)

    def eval_terms(self, losses, batch):
        return mlm_eval_terms(losses)

    def eval_record(self, sums):
        return mlm_eval_record(sums)
