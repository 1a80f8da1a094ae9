"""The figures of `bench finetune`: accuracy and macro-F1 of classification, entity F1 of token
classification.

Entity F1 is seqeval's, in its default mode (what conlleval, CoNLL-2003's scorer, counts, and
what the Hugging Face token-classification examples report): an entity is a maximal span of one
type, it counts only when the predicted span and type are both exact, and F1 is micro-averaged
over all entities. In that mode an I- after O or after another type starts an entity (IOB1
files score as written). seqeval knows B/I/E/S; BMES files spell the middle M, read as I.
"""

from __future__ import annotations

from mlm_dist.errors import MissingPackageError

PRIMARY = {"classification": "accuracy", "tokens": "entity_f1"}  # what picks the learning rate


def classification_scores(gold: list[int], pred: list[int]) -> dict:
    """Accuracy, and macro-F1 over the labels that occur in `gold` or `pred` (a label neither
    has would add an F1 of 0/0)."""
    accuracy = sum(g == p for g, p in zip(gold, pred)) / len(gold)
    f1s = []
    for label in sorted(set(gold) | set(pred)):
        tp = sum(g == p == label for g, p in zip(gold, pred))
        predicted, actual = pred.count(label), gold.count(label)
        f1s.append(2 * tp / (predicted + actual))  # = 2PR/(P+R); predicted + actual > 0 here
    return {"accuracy": accuracy, "macro_f1": sum(f1s) / len(f1s)}


def entity_scores(gold: list[list[str]], pred: list[list[str]]) -> dict:
    """Entity precision, recall and F1 over exact spans (seqeval's default mode)."""
    try:
        from seqeval.metrics import f1_score, precision_score, recall_score
    except ImportError:
        raise MissingPackageError("entity F1 is counted by seqeval, which is not installed: "
                                  "pip install 'mlm-dist[bench]' (or pip install seqeval)") from None
    gold, pred = _as_bioes(gold), _as_bioes(pred)
    # zero_division=0: no entity predicted (a model that learnt nothing yet) scores 0, quietly.
    return {"entity_f1": f1_score(gold, pred, zero_division=0),
            "precision": precision_score(gold, pred, zero_division=0),
            "recall": recall_score(gold, pred, zero_division=0)}


def _as_bioes(sequences: list[list[str]]) -> list[list[str]]:
    return [["I" + tag[1:] if tag.startswith("M") else tag for tag in seq] for seq in sequences]
