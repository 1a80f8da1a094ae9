"""`sop`: masked LM + sentence-order prediction (ALBERT; HFL's MacBERT uses it).

Rows are two consecutive segments of one document, swapped with probability
`objective.swap_prob` (data/sop.py; label 1 = swapped). NSP's random B can be told from A by
topic alone; the order of two segments of one text cannot, so the classifier has to learn
coherence. The network, loss and packing are BERT's (objectives/bert.py): the same pooler and
two-way classifier, here predicting order. Exported as Hugging Face's `BertForPreTraining`,
whose `cls.seq_relationship` is that order classifier: logit 0 = in order, 1 = swapped (not
next / random as for a BERT).
"""

from __future__ import annotations

from mlm_dist.data.sop import SWAPPED, SentenceOrderBuilder
from mlm_dist.objectives.bert import PairObjective


class SentenceOrder(PairObjective):
    name = "sop"
    task = "sop"
    balance = "data/sop_swapped"  # the share of pairs swapped: objective.swap_prob
    flagged = SWAPPED

    def example_builder(self, seq_len, rng, data, vocab):
        return SentenceOrderBuilder(seq_len, rng, short_seq_prob=data.short_seq_prob,
                                    open_documents=data.open_documents,
                                    swap_prob=self.cfg.swap_prob)
