"""The reference trainer of `mlm-dist bench convergence`: a loop written with torch and
transformers only, as each objective's original recipe trains.

  data       by objective (REFERENCE_RECIPES), all made from the train documents before
             training starts:
               bert  the NSP instances of google_instances.py (Google's
                     create_pretraining_data.py), all shuffled;
               sop   the sentence-order instances of google_instances.py (ALBERT's
                     create_pretraining_data.py, a lone sentence cut as ours cuts it),
                     all shuffled;
               mlm   blocks of contiguous text as run_mlm.py groups texts (grouped_texts.py),
                     shuffled every epoch;
               electra  mlm's blocks: ours trains both on full rows of contiguous text.
             DataCollatorForLanguageModeling masks them (masking.prob, 80/10/10 by
             masking.mask_frac and masking.random_frac) one micro-batch at a time.
  model      transformers' BertForPreTraining (bert, sop: the pair classifier predicts next
             sentence or order), BertForMaskedLM (mlm), or ElectraForMaskedLM feeding
             ElectraForPreTraining with the paper's loss (electra: reference_electra.py),
             loaded with our model's initial weights (the same seed and constructor as
             training/loop.py), so both sides start from the same point.
  optimizer  torch's fused AdamW (the HF Trainer's default) without weight decay on biases and
             LayerNorm weights; our linear warmup and decay (lr_factor); bf16 autocast or fp32;
             gradient clipping; micro-batch losses averaged over the step, as DeepSpeed's
             accumulation does.

One process, with the threads it is given. Every `every` steps the model is saved as an fp32
state dict under our parameter names (of the objective's network: objectives/), for the one
evaluation that scores both sides.
"""

from __future__ import annotations

import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import transformers
from transformers import DataCollatorForLanguageModeling

from mlm_dist.bench.google_instances import (Instance, create_training_instances,
                                             read_train_documents)
from mlm_dist.bench.grouped_texts import group_texts, training_blocks
from mlm_dist.bench.reference_electra import ElectraReference
from mlm_dist.bench.steps import hf_adamw
from mlm_dist.bench.workload import hf_collator_tokenizer, synthetic_vocabulary
from mlm_dist.interop.bert_names import HF_CLASSES, from_hf_state_dict, to_hf_state_dict
from mlm_dist.interop.export import hf_bert_config
from mlm_dist.objectives import objective_for
from mlm_dist.tokenizer import CLS_ID, SEP_ID

# The objectives a reference recipe exists for, and the transformers class each trains.
REFERENCE_RECIPES = {"bert": "BertForPreTraining", "sop": "BertForPreTraining",
                     "mlm": "BertForMaskedLM",
                     "electra": "ElectraForMaskedLM + ElectraForPreTraining"}
# The objectives whose rows are full rows of contiguous text (ours: data/rows.py), which the
# reference makes as run_mlm.py does.
FULL_ROWS = ("mlm", "electra")

# torch, numpy and transformers are imported where they are used, so that registering the
# command costs `mlm-dist --help` nothing.


def say(message: str) -> None:
    """Progress goes to stderr; stdout is the bench's JSON result."""
    print(message, file=sys.stderr, flush=True)


def lr_factor(step: int, warmup_steps: int, total_steps: int) -> float:
    """Linear warmup over warmup_steps, then linear decay to 0 at total_steps; optimizer step
    `step` (0-based) runs at lr × lr_factor(step). optim.learning_rate_factor's single-phase
    case, written again so the reference depends on nothing of ours (a test checks they agree)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))


def initial_state_dict(cfg) -> dict:
    """Our model's initial weights, built exactly as training/loop.py builds them (same seed, the
    objective's constructor), so both sides start from the same point."""
    torch.manual_seed(cfg.train.seed)
    return objective_for(cfg).build_model(cfg.model).state_dict()


def save_state_dict(state: dict, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


def train_reference(cfg, run_dir: Path, every: int, threads: int) -> dict:
    """Train the objective's transformers model with a plain torch loop; save our-named fp32
    state dicts every `every` steps into run_dir; return the figures of the run."""
    start = time.perf_counter()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    threads_before = torch.get_num_threads()
    torch.set_num_threads(threads)
    phase, total, o = cfg.schedule.phases[0], cfg.schedule.total_steps, cfg.optim
    accumulation = phase.global_batch // phase.micro_batch

    data = reference_data(cfg, needed=total * phase.global_batch)
    data_seconds = time.perf_counter() - start
    collator = reference_collator(cfg)
    model = reference_model(cfg, device)
    optimizer = hf_adamw(model, o)
    params = list(model.parameters())
    autocast = torch.autocast(device.type, dtype=torch.bfloat16,
                              enabled=cfg.train.precision == "bf16")

    # ---- the loop
    used, real_tokens = 0, 0
    history, loss_sum, loss_count = [], 0.0, 0
    loop_start = time.perf_counter()
    for step in range(total):
        for group in optimizer.param_groups:
            group["lr"] = o.lr * lr_factor(step, o.warmup_steps, total)
        for _ in range(accumulation):
            rows = [data.example(x) for x in data.rows[used:used + phase.micro_batch]]
            used += len(rows)
            real_tokens += sum(len(r["input_ids"]) for r in rows)
            batch = {k: v.to(device) for k, v in collator(rows).items()}
            with autocast:
                # mean MLM cross entropy (+ mean pair cross entropy, or λ × mean RTD)
                loss = model(**batch).loss
            # Micro-batch means averaged over the step, as DeepSpeed's accumulation does.
            (loss / accumulation).backward()
            loss_sum += loss.detach().float()  # read at the logging cadence only
            loss_count += 1
        if cfg.train.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, cfg.train.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

        done = step + 1
        if done % cfg.train.log_every == 0 or done == total:
            mean = float(loss_sum) / loss_count
            history.append({"step": done, "train/loss": mean})
            say(f"reference: step {done:>7} | loss {mean:.4f}")
            loss_sum, loss_count = 0.0, 0
        if done % every == 0 or done == total:
            save_state_dict(our_state_dict(cfg, model), run_dir / f"step_{done:08d}.pt")
    loop_seconds = time.perf_counter() - loop_start
    torch.set_num_threads(threads_before)
    return {"train_seconds": time.perf_counter() - start, "loop_seconds": loop_seconds,
            "data_seconds": data_seconds, "steps": total, "sequences": used,
            "tokens": used * phase.seq_len, "real_tokens": real_tokens, **data.figures,
            "threads": threads, "history": history}


def our_state_dict(cfg, model) -> dict:
    """The reference's weights as an fp32 state dict of the objective's network, under our
    names."""
    if isinstance(model, ElectraReference):
        return model.our_state_dict()
    state = {k: v.detach().float().cpu().clone() for k, v in model.state_dict().items()}
    # BertForMaskedLM has no pooler and no pair classifier.
    return from_hf_state_dict(state, heads_optional=REFERENCE_RECIPES[cfg.objective.name]
                              == "BertForMaskedLM")


@dataclass
class ReferenceData:
    """The reference's sequences for the whole run, made before training starts."""
    rows: list  # one per sequence, in training order; at least the run's
    example: Callable[..., dict]  # a row -> what a Trainer hands DataCollatorForLanguageModeling
    figures: dict  # how they were made, for the JSON result


def reference_data(cfg, *, needed: int) -> ReferenceData:
    """Every train document, made into the objective's reference rows (see the module
    docstring), `needed` of them at least."""
    start = time.perf_counter()
    phase, name = cfg.schedule.phases[0], cfg.objective.name
    documents = read_train_documents(cfg.data.shards)
    if name in FULL_ROWS:
        blocks = group_texts(documents, phase.seq_len, CLS_ID, SEP_ID)
        rows, epochs = training_blocks(blocks, needed, random.Random(cfg.train.seed))
        say(f"reference: {len(blocks)} blocks of {phase.seq_len} tokens, {epochs} epochs "
            f"({time.perf_counter() - start:.0f} s), {needed} used")
        return ReferenceData(rows, block_example, {"blocks": len(blocks), "passes": epochs})
    instances, passes = create_training_instances(
        documents, phase.seq_len, cfg.data.short_seq_prob, random.Random(cfg.train.seed),
        min_instances=needed, sentence_order=name == "sop")
    say(f"reference: {len(instances)} instances in {passes} passes over the corpus "
        f"({time.perf_counter() - start:.0f} s), {needed} used")
    # The share of pairs labelled 1: B random (bert), or swapped (sop).
    flagged = "sop_swapped_fraction" if name == "sop" else "nsp_random_fraction"
    return ReferenceData(instances, example, {
        "instances": len(instances), "passes": passes,
        flagged: float(np.mean([x.is_random_next for x in instances]))})


def reference_collator(cfg):
    return DataCollatorForLanguageModeling(
        tokenizer=hf_collator_tokenizer(synthetic_vocabulary(cfg.model.vocab_size),
                                       cfg.model.max_positions),
        mlm_probability=cfg.masking.prob, mask_replace_prob=cfg.masking.mask_frac,
        random_replace_prob=cfg.masking.random_frac, seed=cfg.train.seed)


def reference_model(cfg, device):
    """Our initial weights in the objective's transformers classes (REFERENCE_RECIPES), in
    training mode."""
    if cfg.objective.name == "electra":
        model = ElectraReference(cfg, device)
        model.load_ours(initial_state_dict(cfg))
    else:
        hf_class = REFERENCE_RECIPES[cfg.objective.name]
        model = getattr(transformers, hf_class)(hf_bert_config(cfg.model))
        model.load_state_dict(to_hf_state_dict(initial_state_dict(cfg), HF_CLASSES[hf_class]),
                              strict=True)
    model.to(device).train()
    torch.manual_seed(cfg.train.seed)  # dropout's stream, whatever the constructors drew
    return model


def example(instance: Instance) -> dict:
    """A Google instance as the example a Trainer hands DataCollatorForLanguageModeling."""
    a, b = instance.tokens_a, instance.tokens_b
    ids = np.concatenate([[CLS_ID], a, [SEP_ID], b, [SEP_ID]]).astype(np.int64)
    types = np.zeros(len(ids), dtype=np.int64)
    types[len(a) + 2:] = 1
    return {"input_ids": ids.tolist(), "token_type_ids": types.tolist(),
            # 1 = random (NSP) or swapped (SOP), as ours
            "next_sentence_label": int(instance.is_random_next)}


def block_example(block) -> dict:
    """A run_mlm.py block as the example its Trainer hands DataCollatorForLanguageModeling:
    one segment, no label but the masked tokens."""
    return {"input_ids": block.tolist(), "token_type_ids": [0] * len(block)}
