"""`mlm-dist bench convergence`: does our trainer give a model as good as a reference trainer's,
for the same compute?

The same model (shape and initial weights) is trained on the same train shards, for the same
number of sequences of the same length, with the same global batch, LR schedule, precision and
gradient clipping, twice:

  ours       `mlm-dist train` under the deepspeed launcher on `--ranks` ranks: NSP pairs built
             online by the loader, masking on the device, ZeRO and the run's precision, a
             checkpoint every `--every` steps for the validation curve.
  reference  a loop written with torch and transformers only, as the original BERT recipe
             trains: instances made the way Google's create_pretraining_data.py makes them
             (written again below) from all the train documents, all shuffled;
             DataCollatorForLanguageModeling's 15 % with 80/10/10; transformers'
             BertForPreTraining; torch AdamW without decay on biases and LayerNorm weights;
             bf16 autocast; clipping; the same linear warmup and decay. One process, with as
             many threads as ours has over all its ranks.

Then ONE evaluation scores both: every saved model, and the initial weights both sides share
(step 0), is loaded into our BertForPretraining and scored by evaluate.py on the validation split,
with the same pairs and masks for every model. The JSON has each side's validation MLM loss, MLM
accuracy and NSP accuracy, training wall time and tokens, the differences (ours - reference), and
whether our targets hold: validation MLM loss at most the reference's + 0.02, NSP accuracy at
least the reference's - 0.01, less wall time. A PNG draws both validation MLM-loss curves.

Stages, each skipped when its output exists (as in the demo): corpus (bench_corpora.py) ->
tokenizer -> shards -> ours -> reference -> evaluation, all under --out.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported where used: registering the command must stay cheap
    import numpy as np

# torch, numpy, transformers and deepspeed are imported where they are used, so that
# registering the command costs `mlm-dist --help` nothing.

from mlm_dist.demo.run import TINY_CONFIG as REPO_CONFIG  # packaged: found in a wheel too
# The targets: ours must match the reference's quality for the same tokens, in less time.
MLM_LOSS_MARGIN = 0.02
NSP_ACC_MARGIN = 0.01
# Book-sized documents are few: a larger valid fraction than `prepare`'s default keeps a few.
DEFAULT_VALID_FRACTION = 0.05
# A few shards per rank for either corpus (~100 books, ~50k short documents): our loader mixes
# the pairs of the documents of one shard at a time, as it would on a real corpus's shards.
DOCS_PER_SHARD = {"books": 16, "short": 4000}
EVAL_MICRO_BATCH = 32
SIDE_RECORD = "bench.json"  # written last in each side's directory: that side is done


def say(message: str) -> None:
    """Progress goes to stderr; stdout is the JSON result."""
    print(message, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# The reference's data: Google's create_pretraining_data.py, NSP part, on token ids


@dataclass
class Instance:
    tokens_a: np.ndarray
    tokens_b: np.ndarray
    is_random_next: bool


def truncate_seq_pair(tokens_a, tokens_b, max_num_tokens: int, rng: random.Random):
    """Google's truncate_seq_pair on arrays: while the pair is too long, take one token off the
    longer segment (b on a tie), from the front or the back with probability 1/2 each. The same
    decisions as the original's list loop, one rng.random() per token removed."""
    a0, a1, b0, b1 = 0, len(tokens_a), 0, len(tokens_b)
    while (a1 - a0) + (b1 - b0) > max_num_tokens:
        if a1 - a0 > b1 - b0:
            if rng.random() < 0.5:
                a0 += 1
            else:
                a1 -= 1
        else:
            if rng.random() < 0.5:
                b0 += 1
            else:
                b1 -= 1
    return tokens_a[a0:a1], tokens_b[b0:b1]


def create_instances_from_document(all_documents: list, document_index: int,
                                   max_seq_length: int, short_seq_prob: float,
                                   rng: random.Random) -> list[Instance]:
    """The NSP instances of one document, as create_pretraining_data.py builds them.

    Segments (sentences) are accumulated until they reach a target length (max_seq_length - 3,
    or with probability short_seq_prob a random length from 2 up, drawn once per document);
    the chunk is split at a random segment boundary a_end into A and B. B is the actual rest of
    the chunk, or (probability 1/2, and always when the chunk is a single segment) text from a
    random other document, in which case the chunk's unused segments are put back to start the
    next chunk. Then the pair is truncated to fit [CLS] A [SEP] B [SEP].
    """
    import numpy as np

    document = all_documents[document_index]
    max_num_tokens = max_seq_length - 3  # [CLS], [SEP], [SEP]
    target_seq_length = max_num_tokens
    if rng.random() < short_seq_prob:
        target_seq_length = rng.randint(2, max_num_tokens)

    instances = []
    current_chunk: list = []
    current_length = 0
    i = 0
    while i < len(document):
        segment = document[i]
        current_chunk.append(segment)
        current_length += len(segment)
        if i == len(document) - 1 or current_length >= target_seq_length:
            if current_chunk:
                a_end = 1
                if len(current_chunk) >= 2:
                    a_end = rng.randint(1, len(current_chunk) - 1)
                tokens_a = np.concatenate(current_chunk[:a_end])

                if len(current_chunk) == 1 or rng.random() < 0.5:
                    is_random_next = True
                    target_b_length = target_seq_length - len(tokens_a)
                    # Ten tries at another document (a corpus of one document has none).
                    for _ in range(10):
                        random_document_index = rng.randint(0, len(all_documents) - 1)
                        if random_document_index != document_index:
                            break
                    random_document = all_documents[random_document_index]
                    random_start = rng.randint(0, len(random_document) - 1)
                    taken, length = [], 0
                    for j in range(random_start, len(random_document)):
                        taken.append(random_document[j])
                        length += len(random_document[j])
                        if length >= target_b_length:
                            break
                    tokens_b = np.concatenate(taken)
                    # The segments after A were not used: they go back to the document.
                    i -= len(current_chunk) - a_end
                else:
                    is_random_next = False
                    tokens_b = np.concatenate(current_chunk[a_end:])
                tokens_a, tokens_b = truncate_seq_pair(tokens_a, tokens_b, max_num_tokens, rng)
                assert len(tokens_a) >= 1 and len(tokens_b) >= 1
                instances.append(Instance(tokens_a, tokens_b, is_random_next))
            current_chunk, current_length = [], 0
        i += 1
    return instances


def create_training_instances(documents: list, max_seq_length: int, short_seq_prob: float,
                              rng: random.Random, min_instances: int = 0
                              ) -> tuple[list[Instance], int]:
    """All documents shuffled, instances made from each, as many passes over the corpus as it
    takes to have `min_instances` (Google's dupe_factor: each pass pairs anew), then ALL
    instances shuffled together. Returns (instances, passes)."""
    documents = [[s for s in doc if len(s)] for doc in documents]
    documents = [doc for doc in documents if doc]
    if not documents:
        raise ValueError("no document with any tokens to make instances from")
    rng.shuffle(documents)
    instances: list[Instance] = []
    passes = 0
    while passes == 0 or len(instances) < min_instances:
        for document_index in range(len(documents)):
            instances.extend(create_instances_from_document(
                documents, document_index, max_seq_length, short_seq_prob, rng))
        passes += 1
    rng.shuffle(instances)
    return instances, passes


def read_train_documents(shards_dir: str | Path) -> list:
    """Every train document of the shards (lists of sentence id arrays), in manifest order."""
    from mlm_dist.data.pipeline import manifest_shards
    from mlm_dist.data.reader import SkipCounter, read_documents
    from mlm_dist.data.shards import token_ids

    skips = SkipCounter()
    documents = []
    for shard in manifest_shards(shards_dir, "train"):
        documents.extend([token_ids(s) for s in document]  # ids only: the reference masks tokens
                         for document in read_documents(shard.path, shard.documents, 1, 0, skips))
    if skips.documents:
        raise ValueError(f"{skips.documents} train documents of {shards_dir} could not be read "
                         "(warnings above); check the shards with `mlm-dist prepare --verify`")
    return documents


# ---------------------------------------------------------------------------------------------
# The reference's training loop


def lr_factor(step: int, warmup_steps: int, total_steps: int) -> float:
    """Linear warmup over warmup_steps, then linear decay to 0 at total_steps; optimizer step
    `step` (0-based) runs at lr × lr_factor(step). optim.learning_rate_factor's single-phase
    case, written again so the reference depends on nothing of ours (a test checks they agree)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))


def initial_state_dict(cfg) -> dict:
    """Our model's initial weights, built exactly as train.py builds them (same seed, same
    constructor), so both sides start from the same point."""
    import torch

    from mlm_dist.model import BertForPretraining

    torch.manual_seed(cfg.train.seed)
    return BertForPretraining(cfg.model).state_dict()


def save_state_dict(state: dict, path: Path) -> None:
    import torch

    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


def train_reference(cfg, run_dir: Path, every: int, threads: int) -> dict:
    """Train transformers' BertForPreTraining with a plain torch loop; save our-named fp32 state
    dicts every `every` steps into run_dir; return the figures of the run."""
    import numpy as np
    import torch
    from transformers import BertForPreTraining, DataCollatorForLanguageModeling

    from mlm_dist.bench.train import hf_collator_tokenizer
    from mlm_dist.interop.huggingface import from_hf_state_dict, hf_bert_config, to_hf_state_dict
    from mlm_dist.tokenizer import CLS_ID, SEP_ID

    start = time.perf_counter()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    threads_before = torch.get_num_threads()
    torch.set_num_threads(threads)
    phase = cfg.schedule.phases[0]
    total = cfg.schedule.total_steps
    accumulation = phase.global_batch // phase.micro_batch
    needed = total * phase.global_batch

    # ---- data: every train document, instances made and shuffled before training starts
    documents = read_train_documents(cfg.data.shards)
    instances, passes = create_training_instances(
        documents, phase.seq_len, cfg.data.short_seq_prob, random.Random(cfg.train.seed),
        min_instances=needed)
    del documents
    data_seconds = time.perf_counter() - start
    say(f"reference: {len(instances)} instances in {passes} passes over the corpus "
        f"({data_seconds:.0f} s), {needed} used")
    collator = DataCollatorForLanguageModeling(
        tokenizer=hf_collator_tokenizer(cfg.model.vocab_size, cfg.model.max_positions),
        mlm_probability=cfg.masking.prob, mask_replace_prob=cfg.masking.mask_frac,
        random_replace_prob=cfg.masking.random_frac, seed=cfg.train.seed)

    def example(instance: Instance) -> dict:
        a, b = instance.tokens_a, instance.tokens_b
        ids = np.concatenate([[CLS_ID], a, [SEP_ID], b, [SEP_ID]]).astype(np.int64)
        types = np.zeros(len(ids), dtype=np.int64)
        types[len(a) + 2:] = 1
        return {"input_ids": ids.tolist(), "token_type_ids": types.tolist(),
                "next_sentence_label": int(instance.is_random_next)}  # 1 = random, as ours

    # ---- model: our initial weights in transformers' BertForPreTraining
    model = BertForPreTraining(hf_bert_config(cfg.model))
    model.load_state_dict(to_hf_state_dict(initial_state_dict(cfg)), strict=True)
    model.to(device).train()
    torch.manual_seed(cfg.train.seed)  # dropout's stream, whatever the constructors drew
    # BERT's optimizer groups: no weight decay on biases and LayerNorm weights.
    named = list(model.named_parameters())
    no_decay = ("bias", "LayerNorm.weight")
    groups = [{"params": [p for n, p in named if not n.endswith(no_decay)],
               "weight_decay": cfg.optim.weight_decay},
              {"params": [p for n, p in named if n.endswith(no_decay)], "weight_decay": 0.0}]
    o = cfg.optim
    optimizer = torch.optim.AdamW(groups, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps,
                                  fused=True)  # the HF Trainer's default (adamw_torch_fused)
    params = [p for _, p in named]
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
            rows = [example(x) for x in instances[used:used + phase.micro_batch]]
            used += len(rows)
            real_tokens += sum(len(r["input_ids"]) for r in rows)
            batch = {k: v.to(device) for k, v in collator(rows).items()}
            with autocast:
                loss = model(**batch).loss  # mean MLM cross entropy + mean NSP cross entropy
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
            state = {k: v.detach().float().cpu().clone() for k, v in model.state_dict().items()}
            save_state_dict(from_hf_state_dict(state), run_dir / f"step_{done:08d}.pt")
    loop_seconds = time.perf_counter() - loop_start
    torch.set_num_threads(threads_before)
    return {"train_seconds": time.perf_counter() - start, "loop_seconds": loop_seconds,
            "data_seconds": data_seconds, "steps": total, "sequences": used,
            "tokens": used * phase.seq_len, "real_tokens": real_tokens,
            "instances": len(instances), "passes": passes,
            "nsp_random_fraction": float(np.mean([x.is_random_next for x in instances])),
            "threads": threads, "history": history}


# ---------------------------------------------------------------------------------------------
# Ours: `mlm-dist train` under the deepspeed launcher


def train_ours(config: Path, overrides: list[str], run_dir: Path, ranks: int) -> dict:
    import torch

    from mlm_dist.training import checkpoint
    from mlm_dist.launch.local import free_port, launcher_command, remove_shm_buffers

    port = free_port()
    cmd = launcher_command(ranks, port, "mlm_dist", "train", "--config", str(config),
                           *overrides, f"out_dir={run_dir}")
    say("$ " + " ".join(cmd[2:]))
    env = dict(os.environ)
    env.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
    start = time.perf_counter()
    try:
        # The run's log goes to our stderr, line by line: stdout is kept for the JSON result.
        with subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, errors="replace") as proc:
            for line in proc.stdout:
                sys.stderr.write(line)
        if proc.returncode:
            raise RuntimeError(f"our training run failed (exit code {proc.returncode}; its log "
                               f"is above); remove {run_dir} before running the benchmark again")
    finally:
        remove_shm_buffers(port)
    seconds = time.perf_counter() - start

    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "perf/step_time_ms" in r]
    # The loop's own time: the step time of each logging interval times its steps.
    loop_seconds, previous = 0.0, 0
    for r in train:
        loop_seconds += r["perf/step_time_ms"] / 1000 * (r["step"] - previous)
        previous = r["step"]
    last = checkpoint.latest_complete(run_dir / checkpoint.CHECKPOINTS)
    steps = int(last.name.split("_")[1]) if last is not None else 0
    return {"train_seconds": seconds, "loop_seconds": loop_seconds, "steps": steps,
            "ranks": ranks,
            "history": [{"step": r["step"], "train/loss": r["train/loss"]} for r in train]}


def ours_real_tokens(cfg, tokenizer, ranks: int, steps: int) -> int:
    """The non-padding tokens our run trained on, counted by replaying its loader: each rank's
    stream is a function of the seed, its rank and the world size only (what makes a resumed
    run exact), so the same loader built here yields the same batches."""
    from mlm_dist.data.pipeline import ResumableLoader, manifest_shards

    phase = cfg.schedule.phases[0]
    micro_batches = steps * phase.global_batch // (phase.micro_batch * ranks)  # per rank
    total = 0
    for rank in range(ranks):
        loader = ResumableLoader(manifest_shards(cfg.data.shards), seq_len=phase.seq_len,
                                 micro_batch=phase.micro_batch, rank=rank, world_size=ranks,
                                 seed=cfg.train.seed, data=cfg.data, vocab=tokenizer.vocabulary)
        try:
            for _ in range(micro_batches):
                total += int(next(loader).attention_mask.sum())
        finally:
            loader.close()
    return total


# ---------------------------------------------------------------------------------------------
# One evaluation for both


def score(model, cfg, shards, tokenizer) -> dict:
    """Validation figures of `model` (our BertForPretraining) on the valid split of `shards`:
    evaluate.py's one deterministic pass (the first eval.max_pairs pairs), the same pairs and
    masks whatever the model, so both sides' numbers compare."""
    import dataclasses

    from mlm_dist.training.evaluate import evaluate

    phase = dataclasses.replace(cfg.schedule.phases[-1], micro_batch=EVAL_MICRO_BATCH)
    model.eval()
    return evaluate(model, cfg, phase, tokenizer.vocabulary, shards=str(shards), rank=0,
                    world_size=1, device="cpu")


def saved_steps(every: int, total: int) -> list[int]:
    return sorted(set(range(every, total + 1, every)) | {total})


def evaluate_runs(cfg, tokenizer, ours_dir: Path, reference_dir: Path, every: int) -> dict:
    """Score the shared initial weights (step 0) and every saved model of both sides."""
    import torch

    from mlm_dist.training.checkpoint import CHECKPOINTS, tag_for
    from mlm_dist.interop.fill_mask import load_checkpoint
    from mlm_dist.model import BertForPretraining

    shards = cfg.data.shards
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    model = BertForPretraining(cfg.model)
    model.load_state_dict(initial_state_dict(cfg), strict=True)
    initial = {"step": 0, **score(model, cfg, shards, tokenizer)}
    curves = {"ours": [initial], "reference": [initial]}
    for step in saved_steps(every, cfg.schedule.total_steps):
        ours, _, _ = load_checkpoint(ours_dir / CHECKPOINTS / tag_for(step))
        curves["ours"].append({"step": step, **score(ours, cfg, shards, tokenizer)})
        model.load_state_dict(torch.load(reference_dir / f"{tag_for(step)}.pt",
                                          map_location="cpu", weights_only=True), strict=True)
        curves["reference"].append({"step": step, **score(model, cfg, shards, tokenizer)})
        say(f"evaluated step {step}: val MLM loss ours {curves['ours'][-1]['val/mlm_loss']:.4f}, "
            f"reference {curves['reference'][-1]['val/mlm_loss']:.4f}")
    return curves


def plot_curves(curves: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display: write the file only
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for side, style in (("ours", "-o"), ("reference", "--s")):
        points = curves[side]
        ax.plot([p["step"] for p in points], [p["val/mlm_loss"] for p in points], style,
                label=side, markersize=3)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("validation MLM loss")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp" + path.suffix)
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)


# ---------------------------------------------------------------------------------------------
# The whole benchmark


def check_comparable(cfg) -> None:
    """What the reference reproduces; anything else would compare two different recipes."""
    from mlm_dist.config import ConfigError

    if len(cfg.schedule.phases) != 1:
        raise ConfigError("schedule.phases: bench convergence compares one sequence phase "
                          f"(got {len(cfg.schedule.phases)}); the reference has no phase schedule")
    if cfg.optim.name != "adamw":
        raise ConfigError("optim.name: the reference trains with AdamW; use optim.name=adamw")
    if cfg.train.precision not in ("bf16", "fp32"):
        raise ConfigError("train.precision: the reference runs bf16 autocast or fp32; "
                          f"{cfg.train.precision} is not compared")
    if cfg.masking.whole_word:
        raise ConfigError("masking.whole_word: the reference masks single tokens "
                          "(DataCollatorForLanguageModeling); use masking.whole_word=false")
    if cfg.model.init_from:
        raise ConfigError("model.init_from: the benchmark trains from the initial weights of "
                          "train.seed; leave init_from empty")


def prepare_data(corpus: str, out: Path, vocab_size: int, valid_fraction: float,
                 max_documents: int | None) -> Path:
    """corpus -> tokenizer -> shards under `out`, each stage skipped when its output exists."""
    from mlm_dist.bench.corpora import write_corpus
    from mlm_dist.data.corpus import iter_documents
    from mlm_dist.data.prepare import prepare_shards
    from mlm_dist.data.workers import default_workers
    from mlm_dist.tokenizer import sentences_of, train_tokenizer

    # An --out holds one corpus and its shards: a rerun must ask for the same ones.
    settings = {"corpus": corpus, "max_documents": max_documents, "vocab_size": vocab_size,
                "valid_fraction": valid_fraction}
    record = out / "data.json"
    if record.is_file() and json.loads(record.read_text()) != settings:
        raise ValueError(f"{out} holds the data of {json.loads(record.read_text())}, not of "
                         f"{settings}; choose another --out")
    record.write_text(json.dumps(settings))
    text, tokenizer, shards = out / f"{corpus}.txt", out / "tokenizer", out / "shards"
    if not text.exists():
        stats = write_corpus(corpus, text, max_documents=max_documents)
        say(f"[1/6] corpus '{corpus}': {stats['documents']} documents of {stats['min_sentences']}-"
            f"{stats['max_sentences']} sentences ({stats['sentences']} sentences, "
            f"{stats['bytes'] / 1e6:.1f} MB) -> {text}")
    if not (tokenizer / "tokenizer.model").exists():
        tok = train_tokenizer(sentences_of(iter_documents([text])), tokenizer, vocab_size)
        say(f"[2/6] tokenizer: SentencePiece unigram, {tok.vocab_size} pieces -> {tokenizer}")
    if not (shards / "manifest.json").exists():
        manifest = prepare_shards([text], tokenizer, shards, docs_per_shard=DOCS_PER_SHARD[corpus],
                                  valid_fraction=valid_fraction, workers=default_workers())
        t, v = manifest.totals("train"), manifest.totals("valid")
        say(f"[3/6] shards: train {t['documents']} documents, {t['tokens']} tokens; valid "
            f"{v['documents']} documents, {v['tokens']} tokens -> {shards}")
    from mlm_dist.data.shards import Manifest

    if not Manifest.load(shards).totals("valid")["documents"]:
        raise ValueError(f"{shards} has no validation documents: remove it and run again with a "
                         "larger --valid-fraction")
    return shards


def _side_done(run_dir: Path, signature: dict) -> dict | None:
    """The record of a finished side trained with `signature`, or None if it has not run.
    A side that started and did not finish, or ran with other settings, is an error: its
    time or its checkpoints would not be this benchmark's."""
    record = run_dir / SIDE_RECORD
    if record.is_file():
        done = json.loads(record.read_text())
        if done["signature"] != signature:
            raise ValueError(f"{run_dir} was trained with another config, other overrides or "
                             f"ranks (it had {done['signature']['overrides']} on "
                             f"{done['signature']['ranks']} ranks); choose another --out or "
                             "remove it")
        return done
    if run_dir.exists():
        raise FileExistsError(f"{run_dir} holds an unfinished run (no {SIDE_RECORD}); remove it "
                              "and run the benchmark again")
    return None


def run_convergence(corpus: str, out: Path, steps: int, config: Path = REPO_CONFIG,
                    overrides: list[str] = (), ranks: int = 2, every: int = 0,
                    vocab_size: int = 8000, valid_fraction: float = DEFAULT_VALID_FRACTION,
                    max_documents: int | None = None) -> dict:
    from mlm_dist.config import load_config
    from mlm_dist.preflight import resolve_data

    if importlib.util.find_spec("matplotlib") is None:  # before the hours of training, not after
        raise ValueError("bench convergence draws its curves with matplotlib: "
                         "pip install matplotlib (it is in mlm-dist's [test] extra)")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    every = every or max(1, steps // 10)
    shards = prepare_data(corpus, out, vocab_size, valid_fraction, max_documents).resolve()
    ours_dir, reference_dir = (out / "ours").resolve(), (out / "reference").resolve()
    # Ours gets these on its command line; the reference reads the same resolved config.
    run_overrides = [*overrides, f"data.shards={shards}", f"schedule.phases.0.until_step={steps}",
                     f"checkpoint.every={every}", "checkpoint.keep=0", "checkpoint.resume=false",
                     "eval.every=0"]
    cfg = load_config(config, [*run_overrides, f"out_dir={ours_dir}"])
    check_comparable(cfg)
    cfg, tokenizer = resolve_data(cfg)  # model.vocab_size from the tokenizer, as train does
    phase = cfg.schedule.phases[0]
    if phase.global_batch % (phase.micro_batch * ranks):
        raise ValueError(f"schedule.phases.0.global_batch {phase.global_batch} is not divisible "
                         f"by micro_batch × ranks = {phase.micro_batch} × {ranks}")
    # Ours gives each rank cores // ranks threads (engine.init_distributed); the reference
    # gets as many threads in total.
    cores = len(os.sched_getaffinity(0))
    threads = ranks * max(1, cores // ranks)
    signature = {"config": Path(config).read_text(), "overrides": run_overrides,
                 "ranks": ranks}

    ours = _side_done(ours_dir, signature)
    if ours is None:
        say(f"[4/6] ours: mlm-dist train on {ranks} DeepSpeed ranks, {steps} steps")
        ours = {"signature": signature, **train_ours(Path(config), run_overrides, ours_dir, ranks)}
        (ours_dir / SIDE_RECORD).write_text(json.dumps(ours, indent=1))
    reference = _side_done(reference_dir, signature)
    if reference is None:
        say(f"[5/6] reference: transformers BertForPreTraining + torch, {threads} threads, "
            f"{steps} steps")
        reference_dir.mkdir(parents=True)
        reference = {"signature": signature,
                     **train_reference(cfg, reference_dir, every, threads)}
        (reference_dir / SIDE_RECORD).write_text(json.dumps(reference, indent=1))
    ours["sequences"] = ours["steps"] * phase.global_batch
    ours["tokens"] = ours["sequences"] * phase.seq_len
    if "real_tokens" not in ours:
        ours["real_tokens"] = ours_real_tokens(cfg, tokenizer, ranks, ours["steps"])
        (ours_dir / SIDE_RECORD).write_text(json.dumps(ours, indent=1))

    say("[6/6] evaluation: the initial weights and every saved model of both sides")
    curves = evaluate_runs(cfg, tokenizer, ours_dir, reference_dir, every)
    m = cfg.model
    shape = (f"{m.num_layers} layers, hidden {m.hidden_size}, {m.num_heads} heads, vocab "
             f"{m.vocab_size}")
    plot = out / "convergence.png"
    plot_curves(curves, plot, f"corpus '{corpus}': {shape}\nseq {phase.seq_len}, batch "
                f"{phase.global_batch}, {steps} steps ({ours['tokens'] / 1e6:.1f}M tokens), "
                f"{cfg.train.precision}, lr {cfg.optim.lr:g}")

    sides = {}
    for name, run in (("ours", ours), ("reference", reference)):
        final = curves[name][-1]
        sides[name] = {
            "val_mlm_loss": final["val/mlm_loss"], "val_perplexity": final["val/perplexity"],
            "val_mlm_acc": final["val/mlm_acc"], "val_nsp_acc": final["val/nsp_acc"],
            # the sample behind them: the same pairs and predicted positions for both sides
            "val_pairs": final["val/sequences"], "val_predictions": final["val/predictions"],
            "train_seconds": run["train_seconds"], "loop_seconds": run["loop_seconds"],
            "steps": run["steps"], "sequences": run["sequences"], "tokens": run["tokens"],
            # tokens that are not padding: what the pairing put into those sequences
            "real_tokens": run["real_tokens"],
            "curve": [{"step": p["step"], "val_mlm_loss": p["val/mlm_loss"],
                       "val_nsp_acc": p["val/nsp_acc"]} for p in curves[name]],
        }
    sides["reference"].update({k: reference[k] for k in ("data_seconds", "passes",
                                                          "nsp_random_fraction", "threads")})
    o, r = sides["ours"], sides["reference"]
    delta = {k: o[k] - r[k] for k in ("val_mlm_loss", "val_mlm_acc", "val_nsp_acc",
                                      "train_seconds", "loop_seconds")}
    targets = {
        f"val_mlm_loss <= reference + {MLM_LOSS_MARGIN}":
            o["val_mlm_loss"] <= r["val_mlm_loss"] + MLM_LOSS_MARGIN,
        f"val_nsp_acc >= reference - {NSP_ACC_MARGIN}":
            o["val_nsp_acc"] >= r["val_nsp_acc"] - NSP_ACC_MARGIN,
        "train_seconds < reference": o["train_seconds"] < r["train_seconds"],
    }
    return {
        "corpus": corpus,
        "setup": {"model": shape, "seq_len": phase.seq_len, "micro_batch": phase.micro_batch,
                  "global_batch": phase.global_batch, "steps": steps, "every": every,
                  "lr": cfg.optim.lr, "warmup_steps": cfg.optim.warmup_steps,
                  "precision": cfg.train.precision, "ranks": ranks, "reference_threads": threads,
                  "train_shards": split_totals(shards, "train"),
                  "valid_shards": split_totals(shards, "valid")},
        "ours": o, "reference": r, "delta": delta,
        "targets": targets, "targets_hold": all(targets.values()),
        "plot": str(plot),
    }


def split_totals(shards: Path, split: str) -> dict:
    from mlm_dist.data.shards import Manifest

    return Manifest.load(shards).totals(split)


# ---------------------------------------------------------------------------------------------
# command line


def convergence_command(args) -> None:
    result = run_convergence(args.corpus, Path(args.out), args.steps, Path(args.config),
                             args.overrides, ranks=args.ranks, every=args.every,
                             vocab_size=args.vocab_size, valid_fraction=args.valid_fraction,
                             max_documents=args.max_documents)
    (Path(args.out) / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    if args.check and not result["targets_hold"]:
        sys.exit(1)


def add_parser(bench_subparsers):
    """Register `bench convergence` under `mlm-dist bench`; returns its parser (cli.py sets
    the handler, which imports this module's heavy parts only when the command runs)."""
    c = bench_subparsers.add_parser(
        "convergence", help="ours vs a transformers+torch reference trainer: validation loss "
                            "and wall time for the same tokens (JSON + PNG)",
        formatter_class=argparse.RawDescriptionHelpFormatter, description=__doc__)
    c.add_argument("--corpus", required=True, choices=["books", "short"],
                   help="book-length documents (200-2,000 sentences) or short ones (1-40), "
                        "built from docstrings on this machine")
    c.add_argument("--out", required=True, help="directory for the corpus, shards, both runs, "
                   "result.json and convergence.png (stages already there are reused)")
    c.add_argument("--steps", type=int, default=2500, help="optimizer steps of each side "
                   "(default 2500: ~10 minutes for ours with configs/tiny.yaml on 2 CPU cores)")
    c.add_argument("--every", type=int, default=0,
                   help="steps between saved models for the validation curve (default steps/10)")
    c.add_argument("--config", default=str(REPO_CONFIG), help="YAML run config (default "
                   "configs/tiny.yaml); one sequence phase")
    c.add_argument("--ranks", type=int, default=2, help="DeepSpeed ranks of our run")
    c.add_argument("--vocab-size", type=int, default=8000)
    c.add_argument("--valid-fraction", type=float, default=DEFAULT_VALID_FRACTION)
    c.add_argument("--max-documents", type=int,
                   help="cut the corpus after this many documents (quick runs)")
    c.add_argument("--check", action="store_true", help="exit 1 when a target does not hold")
    c.add_argument("overrides", nargs="*", help="dotted config overrides for both sides, "
                   "e.g. optim.lr=5e-4")
    return c
