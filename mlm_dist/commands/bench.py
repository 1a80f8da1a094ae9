"""`mlm-dist bench <name>`'s options, one `add_<name>_arguments` a benchmark.

Apart from the benchmarks themselves, which import torch, transformers and DeepSpeed at their
top: `mlm-dist bench train --help` and a mistyped option import only this module. The command
table (cli.py) names each handler, imported when its command runs. A default an option shows
is defined here, and the benchmark reads it from here; a command's description is its
benchmark module's docstring, read from the source file rather than by importing the module.
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
from pathlib import Path

from mlm_dist.bench.task_options import add_task_options
from mlm_dist.config import DataConfig
from mlm_dist.demo.run import TINY_CONFIG

DEFAULT_VOCAB = 30522  # BERT's WordPiece vocabulary, when the config leaves vocab_size to the tokenizer
PRECISIONS = ("bf16", "fp16", "fp32")
CONVERGENCE_CONFIG = TINY_CONFIG  # packaged: found in a wheel too
CONVERGENCE_VALID_FRACTION = 0.05
# BERT fine-tunes for 2-4 epochs; on a task of a few hundred examples that is a few dozen
# steps, too few for a small model to learn anything (ja-ner: entity F1 0.0 after 3 epochs,
# 0.24 after 20, a tiny model from random weights). So at least this many steps by default.
FINETUNE_MIN_EPOCHS, FINETUNE_MIN_STEPS = 3, 300
GPU_CONFIG = "configs/bert-base.yaml"
GPU_RESUME_STEPS = 20


def _description(module: str, paragraphs: slice = slice(None)) -> str:
    """Paragraphs of `module`'s docstring, as its `__doc__` holds them, without importing it."""
    source = Path(importlib.util.find_spec(module).origin).read_text(encoding="utf-8")
    doc = ast.get_docstring(ast.parse(source), clean=False)
    return "\n\n".join(doc.split("\n\n")[paragraphs])


def add_data_arguments(d: argparse.ArgumentParser) -> None:
    d.add_argument("--shards", required=True, help="directory written by `mlm-dist prepare`, "
                   "or a URL where it is served (as data.shards): compare the two")
    d.add_argument("--seq-len", type=int, nargs="+", default=[128, 512])
    d.add_argument("--micro-batch", type=int, default=32)
    d.add_argument("--batches", type=int, default=200)
    d.add_argument("--open-documents", type=int, default=DataConfig.open_documents,
                   help="documents whose pairs are interleaved (data.open_documents)")
    d.add_argument("--objective", choices=("bert", "mlm", "sop", "electra"), default="bert",
                   help="whose examples the loader builds (objective.name)")
    d.add_argument("--tokenizer", help="tokenizer dir for the masking figures "
                   "(default: the shards' tokenizer)")
    d.add_argument("--mask-batch", type=int, default=256)
    d.add_argument("--mask-seq-len", type=int, default=512)
    d.add_argument("--repeats", type=int, default=5)


def add_train_arguments(t: argparse.ArgumentParser) -> None:
    t.description = _description("mlm_dist.bench.train", slice(1, 2))
    t.add_argument("--config", required=True, help="YAML run config (model dims, masking, optim)")
    t.add_argument("--seq-len", type=int, help="default: the config's first phase")
    t.add_argument("--micro-batch", type=int, help="default: that phase's micro batch")
    t.add_argument("--max-predictions", type=int,
                   help="MLM slots per sequence (default: the phase's, or derived from seq_len)")
    t.add_argument("--steps", type=int, default=10, help="timed rounds (default 10)")
    t.add_argument("--warmup", type=int, default=3, help="untimed rounds first (default 3; the "
                   "CPU heap settles over the first steps)")
    t.add_argument("--shards", help="time real batches of these shards (`mlm-dist prepare`), "
                   "one per round, the same for both sides; default: synthetic full rows")
    t.add_argument("--compare-hf", action="store_true",
                   help="also time transformers' BertForPreTraining + DataCollatorForLanguageModeling, "
                        "interleaved")
    t.add_argument("--precision", choices=PRECISIONS,
                   help="default: train.precision (bf16/fp16 = autocast)")
    t.add_argument("--device", help="default: cuda if available, else cpu")
    t.add_argument("--compile", action="store_true",
                   help="torch.compile our model (and time it uncompiled too, interleaved: "
                        "compile_speedup)")
    t.add_argument("--checkpoint-activations", action="store_true",
                   help="recompute each encoder layer in backward (saves memory, costs time)")
    t.add_argument("--vocab-size", type=int, default=0,
                   help=f"when the config leaves model.vocab_size to the tokenizer (default {DEFAULT_VOCAB})")
    t.add_argument("--matmul-size", type=int, default=4096, help="n of the n^3 peak matmul")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--default-malloc", action="store_true",
                   help="leave glibc's malloc as it is (default on a CPU: no mmap/trim for big "
                        "blocks, see allocator.py; applies to both sides)")
    t.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. model.num_layers=4")


def add_memory_arguments(m: argparse.ArgumentParser) -> None:
    m.add_argument("--config", required=True, help="YAML run config")
    m.add_argument("--stages", type=int, nargs="+", default=[0, 1, 2, 3])
    m.add_argument("--ranks", type=int, default=2)
    m.add_argument("--seq-len", type=int, help="default: the config's first phase")
    m.add_argument("--micro-batch", type=int, help="default: that phase's micro batch")
    m.add_argument("--steps", type=int, default=2, help="training steps per rank (>= 2: the "
                   "figures are taken in the last one, with optimizer states allocated)")
    m.add_argument("--vocab-size", type=int, default=0,
                   help=f"when the config leaves model.vocab_size to the tokenizer (default {DEFAULT_VOCAB})")
    m.add_argument("--checkpoint-activations", action="store_true",
                   help="recompute each encoder layer in backward (peak RSS shows the saving)")
    m.add_argument("overrides", nargs="*", help="dotted config overrides")


def add_convergence_arguments(c: argparse.ArgumentParser) -> None:
    c.formatter_class = argparse.RawDescriptionHelpFormatter
    c.description = _description("mlm_dist.bench.convergence")
    c.add_argument("--corpus", required=True, choices=["books", "short"],
                   help="book-length documents (200-2,000 sentences) or short ones (1-40), "
                        "built from docstrings on this machine")
    c.add_argument("--out", required=True, help="directory for the corpus and shards, and "
                   "under <objective>/ both sides' runs of every seed, result.json and "
                   "convergence.png (stages already there are reused)")
    c.add_argument("--steps", type=int, default=2500, help="optimizer steps of each side "
                   "(default 2500)")
    c.add_argument("--every", type=int, default=0,
                   help="steps between saved models for the validation curve (default steps/10)")
    c.add_argument("--config", default=str(CONVERGENCE_CONFIG), help="YAML run config (default "
                   "configs/tiny.yaml); one sequence phase")
    c.add_argument("--seeds", type=int, default=1,
                   help="runs a side, with train.seed, train.seed + 1, ...: the result has "
                        "each side's mean and sample standard deviation (default 1; 3 or more "
                        "to compare means within 0.02)")
    c.add_argument("--ranks", type=int, default=2, help="DeepSpeed ranks of our run")
    c.add_argument("--vocab-size", type=int, default=8000)
    c.add_argument("--valid-fraction", type=float, default=CONVERGENCE_VALID_FRACTION)
    c.add_argument("--max-documents", type=int,
                   help="cut the corpus after this many documents (quick runs)")
    c.add_argument("--check", action="store_true", help="exit 1 when a target does not hold")
    c.add_argument("overrides", nargs="*", help="dotted config overrides for both sides, "
                   "e.g. objective.name=mlm optim.lr=5e-4")


def add_finetune_arguments(f: argparse.ArgumentParser) -> None:
    f.formatter_class = argparse.RawDescriptionHelpFormatter
    f.description = _description("mlm_dist.bench.finetune")
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
                   help=f"passes over the training examples (default {FINETUNE_MIN_EPOCHS}, or "
                        f"more to make at least {FINETUNE_MIN_STEPS} steps)")
    f.add_argument("--batch-size", type=int, default=32)
    f.add_argument("--max-length", type=int,
                   help="pieces per example, [CLS] and [SEP] included (default 128, or the "
                        "model's max_position_embeddings if smaller)")
    f.add_argument("--max-train", type=int, metavar="N",
                   help="fine-tune on a seeded sample of N training examples (quick runs)")


def add_task_text_arguments(t: argparse.ArgumentParser) -> None:
    t.formatter_class = argparse.RawDescriptionHelpFormatter
    t.description = _description("mlm_dist.bench.task_text")
    add_task_options(t)
    t.add_argument("--out", required=True, metavar="FILE",
                   help=".txt corpus to write: one sentence a line, a blank line between "
                        "documents (never overwritten)")
    t.add_argument("--lang", default="auto", metavar="CODE",
                   help="language the texts are split into sentences in, as for `prepare "
                        "--lang` (default auto: decided per text by its script)")


def add_gpu_arguments(g: argparse.ArgumentParser) -> None:
    g.description = _description("mlm_dist.bench.gpu", slice(0, 1))
    g.add_argument("--config", help=f"YAML run config (default: {GPU_CONFIG} on a GPU, the "
                                    "demo's tiny config made smaller on a CPU)")
    g.add_argument("--out", help="directory for the corpus, shards, runs and their logs, kept "
                                 "(new or empty; default: a temporary directory, removed)")
    g.add_argument("--steps", type=int, default=GPU_RESUME_STEPS,
                   help="steps of the resumed run: saved at half of them, resumed to the end "
                        f"(default {GPU_RESUME_STEPS})")
    g.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. train.zero_stage=2")
