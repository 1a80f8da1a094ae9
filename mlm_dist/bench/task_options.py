"""The options that name a fine-tuning task and its split, and the task they name: one
definition for `bench finetune` and `bench task-text`, so that the same options mean the same
split. Standard library and the task readers only: `mlm-dist bench finetune --help` imports it.
"""

from __future__ import annotations

import argparse

from mlm_dist.bench.tasks import FORMATS, Task, TaskError, file_task
from mlm_dist.bench.tasks_builtin import BUILTIN_TASKS, builtin_task


def add_task_options(parser: argparse.ArgumentParser) -> None:
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


def read_task(args) -> Task:
    """The task of the options add_task_options adds, dev and test included: the same split
    for every command given the same options (`bench task-text` writes only its train texts)."""
    if args.task:
        stray = [f"--{k}" for k in ("dev", "test", "format") if getattr(args, k)]
        if stray:
            raise TaskError(f"{' '.join(stray)} go with --train FILE, not with --task")
        return builtin_task(args.task, fraction=args.split_fraction, seed=args.split_seed)
    return file_task(args.train, args.dev, args.test, args.format,
                     text_field=args.text_field, label_field=args.label_field,
                     fraction=args.split_fraction, seed=args.split_seed)
