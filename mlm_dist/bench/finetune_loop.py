"""One fine-tuning run of `bench finetune`: a task model from a Hugging Face folder (its weights,
or the same architecture from random weights), trained by a plain torch loop, then scored.

The model classes are transformers' `AutoModelForSequenceClassification` and
`AutoModelForTokenClassification`. The loop is written out rather than transformers' Trainer:
Trainer needs `accelerate` (not otherwise installed), writes checkpoints and logs of its own,
and hides its defaults; the recipe here is BERT's fine-tuning recipe in plain sight: AdamW
(weight decay 0.01, none on biases and LayerNorm), linear warmup over the first 10 % of the
steps then linear decay to 0, gradient clipping at 1.0, shuffled batches padded to their
longest example, the model after the last epoch is the one scored.

Loading a pretraining folder into a task model drops the pretraining heads (`cls.*` for BERT;
the pooler too for token classification, which has none) and initialises the task head (with
the pooler, for sequence classification from a folder that has none);
transformers reports both in a LOAD REPORT table. Here the load goes through a path that
expects exactly that: the report is withheld, the loading info is checked, and anything
else (an encoder weight missing, unused, or of another shape) is an error naming the weights,
so a model is never silently judged with part of its encoder at random values.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time

import torch
from transformers import (AutoConfig, AutoModelForSequenceClassification,
                          AutoModelForTokenClassification)
from transformers.utils import logging as hf_logging

from mlm_dist.bench.finetune_encode import IGNORE, Encoded
from mlm_dist.bench.finetune_metrics import classification_scores, entity_scores
from mlm_dist.bench.tasks import CLASSIFICATION, Task
from mlm_dist.interop import ModelFolderError

WARMUP_FRACTION = 0.1
WEIGHT_DECAY = 0.01
CLIP_NORM = 1.0


# ---------------------------------------------------------------------------------------------
# The model


def task_model(folder, task: Task, *, pretrained: bool, seed: int):
    """The task model of `folder`'s architecture: with its weights (`pretrained`) or from
    random ones. `seed` sets the task head's initial weights (and every weight when random)."""
    model_class = (AutoModelForSequenceClassification if task.kind == CLASSIFICATION
                   else AutoModelForTokenClassification)
    labels = task.labels
    config = AutoConfig.from_pretrained(folder, num_labels=len(labels),
                                        id2label=dict(enumerate(labels)),
                                        label2id={label: i for i, label in enumerate(labels)})
    torch.manual_seed(seed)
    if not pretrained:
        return model_class.from_config(config)
    with _load_report_withheld():
        model, info = model_class.from_pretrained(folder, config=config, output_loading_info=True)
    check_loading(model, info, folder)
    return model


def check_loading(model, info: dict, folder) -> dict:
    """Refuse a load that left encoder weights random or unused; return what was dropped
    (the pretraining heads) and what is new (the task head), by name.

    A folder with no pooler at all (a BertForMaskedLM export: pretrained without a sentence
    task, as our `mlm` objective or RoBERTa train) gives sequence classification a fresh
    pooler, which is then part of the task head, as transformers treats it; a pooler only
    partly there is an error like any other encoder weight."""
    base = model.base_model_prefix + "."
    missing, unexpected = set(info["missing_keys"]), set(info["unexpected_keys"])
    dropped_heads = {k for k in unexpected if not k.startswith(base)}
    # The pooler: BertForTokenClassification is built without it.
    no_place = {k for k in unexpected - dropped_heads if ".pooler." not in k}
    pooler = {k for k, _ in model.named_parameters() if k.startswith(base) and ".pooler." in k}
    fresh_pooler = pooler if pooler and pooler <= missing else set()
    random_encoder = {k for k in missing - fresh_pooler if k.startswith(base)}
    mismatched = [k for k, *_ in info.get("mismatched_keys", [])]
    if no_place or random_encoder or mismatched:
        raise ModelFolderError(
            f"{folder}: its weights do not fit {type(model).__name__}'s encoder "
            f"(missing: {sorted(random_encoder)[:6]}, unused: {sorted(no_place)[:6]}, other "
            f"shape: {mismatched[:6]}); fine-tuning would start part of the encoder from "
            "random values. Is config.json the one the weights were saved with?")
    return {"dropped": sorted(unexpected), "new": sorted(missing)}


class _WithoutLoadReport(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        # transformers 5's table; transformers 4's "Some weights of ... were not used / newly
        # initialized" paragraphs
        return "LOAD REPORT" not in message and not message.startswith("Some weights of")


@contextlib.contextmanager
def _load_report_withheld():
    """transformers' report of unused and new weights left out (check_loading decides on the
    same facts), and its per-load progress bar with it (a command loads a model per run)."""
    logger = logging.getLogger("transformers.modeling_utils")
    report_filter = _WithoutLoadReport()
    bars = hf_logging.is_progress_bar_enabled()
    logger.addFilter(report_filter)
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        logger.removeFilter(report_filter)
        if bars:
            hf_logging.enable_progress_bar()


# ---------------------------------------------------------------------------------------------
# Training and scoring


def optimizer_for(model, lr: float) -> torch.optim.AdamW:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if name.endswith("bias") or "LayerNorm" in name else decay).append(p)
    return torch.optim.AdamW([{"params": decay, "weight_decay": WEIGHT_DECAY},
                              {"params": no_decay, "weight_decay": 0.0}], lr=lr)


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warmup to 1 over `warmup` steps, then linear decay to 0 at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, (total - step) / max(1, total - warmup))


def batch_of(data: Encoded, rows, pad_id: int, device) -> dict:
    """Padded tensors of the examples `rows`: to the longest of them, not to max_length."""
    seqs = [data.input_ids[i] for i in rows]
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for r, s in enumerate(seqs):
        ids[r, :len(s)] = torch.tensor(s)
        mask[r, :len(s)] = 1
    if isinstance(data.labels[0], list):
        labels = torch.full((len(seqs), width), IGNORE, dtype=torch.long)
        for r, i in enumerate(rows):
            labels[r, :len(data.labels[i])] = torch.tensor(data.labels[i])
    else:
        labels = torch.tensor([data.labels[i] for i in rows])
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device),
            "labels": labels.to(device)}


def train(model, data: Encoded, *, lr: float, epochs: int, batch_size: int, seed: int,
          pad_id: int, device) -> dict:
    model.to(device).train()
    optimizer = optimizer_for(model, lr)
    per_epoch = math.ceil(len(data.input_ids) / batch_size)
    total = epochs * per_epoch
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, math.ceil(WARMUP_FRACTION * total), total))
    order = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(epochs):
        perm = torch.randperm(len(data.input_ids), generator=order).tolist()
        for b in range(per_epoch):
            loss = model(**batch_of(data, perm[b * batch_size:(b + 1) * batch_size], pad_id,
                                    device)).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP_NORM)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
    tail = losses[-per_epoch:]
    return {"steps": total, "last_epoch_loss": sum(tail) / len(tail)}


@torch.no_grad()
def predict(model, data: Encoded, *, batch_size: int, pad_id: int, device) -> list:
    """The predicted label id of each example (classification), or the list of predicted tag
    ids of each example's pieces (tokens)."""
    model.to(device).eval()
    out = []
    for b in range(0, len(data.input_ids), batch_size):
        rows = list(range(b, min(b + batch_size, len(data.input_ids))))
        batch = batch_of(data, rows, pad_id, device)
        best = model(input_ids=batch["input_ids"],
                     attention_mask=batch["attention_mask"]).logits.argmax(-1).cpu()
        out.extend(best.tolist())
    return out


def score(task: Task, data: Encoded, predictions: list) -> dict:
    if task.kind == CLASSIFICATION:
        return classification_scores(data.gold, predictions)
    tags = task.labels
    predicted = [word_tags(firsts, [tags[i] for i in pieces])
                 for firsts, pieces in zip(data.firsts, predictions)]
    return entity_scores(data.gold, predicted)


def entity_f1_ceiling(task: Task, data: Encoded) -> float:
    """The entity F1 of a perfect tagger of the pieces: every piece predicted with the tag it
    is trained on. Below 1 when pieces span two words whose tags the one piece cannot both
    carry, or words were cut at max_length: what the tokenization allows at best."""
    pieces = [[0 if label == IGNORE else label for label in labels] for labels in data.labels]
    return score(task, data, pieces)["entity_f1"]


def word_tags(firsts: list[int | None], piece_tags: list[str]) -> list[str]:
    """The tag of each word from the tags predicted for the pieces: a word's first piece says
    it; a word inside a piece that began in the word before (a piece "北京" of the characters
    北, 京) continues that word's entity, as the one piece can only be one thing; a word with
    no piece (cut at max_length) is O."""
    tags, before = [], None
    for t in firsts:
        if t is None:
            tags.append("O")
        elif t == before:
            tag = piece_tags[t]
            tags.append("O" if tag == "O" else "I" + tag[1:])
        else:
            tags.append(piece_tags[t])
        before = t
    return tags


def run(folder, task: Task, splits: dict[str, Encoded], *, pretrained: bool, lr: float,
        seed: int, epochs: int, batch_size: int, pad_id: int, device) -> dict:
    """Fine-tune once and score dev and test: {"dev": {...}, "test": {...}, ...}."""
    start = time.perf_counter()
    model = task_model(folder, task, pretrained=pretrained, seed=seed)
    trained = train(model, splits["train"], lr=lr, epochs=epochs, batch_size=batch_size,
                    seed=seed, pad_id=pad_id, device=device)
    result = {"lr": lr, "seed": seed, **trained}
    for name in ("dev", "test"):
        predictions = predict(model, splits[name], batch_size=batch_size, pad_id=pad_id,
                              device=device)
        result[name] = score(task, splits[name], predictions)
    result["seconds"] = time.perf_counter() - start
    return result
