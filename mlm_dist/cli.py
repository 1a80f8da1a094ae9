"""`mlm-dist <command>`: one entry point for every step and every topology.

Glue only: one table of commands, each naming the function that adds its options. A command's
module is imported only when that command is parsed, so `--help`, `mlm-dist train --help` and a
mistyped option answer at once, without torch or DeepSpeed. A mistake the user can fix ends in
one line that names the thing and the fix (exit code 2); anything else shows its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from dataclasses import dataclass

from mlm_dist.errors import UserError


@dataclass(frozen=True)
class Command:
    """`options` is "module:function": the function adds the command's options to its parser and
    sets `func`, the handler, unless `run` names it ("module:function" too, imported only when
    the command runs: a benchmark imports torch at its top, its options must not); a group has
    `subcommands` instead."""
    name: str
    help: str
    options: str = ""
    run: str = ""
    subcommands: tuple[Command, ...] = ()


COMMANDS = (
    Command("tokenizer", "tokenizer commands", subcommands=(
        Command("train", "train a SentencePiece tokenizer with BERT's specials",
                "mlm_dist.commands.tokenizer:add_train_arguments"),
    )),
    Command("prepare", "tokenize a corpus into WebDataset shards; verify or merge shards",
            "mlm_dist.commands.prepare:add_arguments"),
    Command("train", "pretrain (alone, or under deepspeed/torchrun/srun)",
            "mlm_dist.commands.train:add_arguments"),
    Command("export-hf", "write a Hugging Face folder (BertForPreTraining, or BertForMaskedLM "
            "for objective.name=mlm; for electra ElectraForPreTraining, its generator "
            "ElectraForMaskedLM in generator/)",
            "mlm_dist.commands.checkpoint:add_export_hf_arguments"),
    Command("fill-mask", "print the top-k completions of [MASK]",
            "mlm_dist.commands.checkpoint:add_fill_mask_arguments"),
    Command("eval", "validation loss, perplexity and accuracies (JSON)",
            "mlm_dist.commands.checkpoint:add_eval_arguments"),
    Command("consolidate", "one fp32 state dict from a sharded checkpoint",
            "mlm_dist.commands.checkpoint:add_consolidate_arguments"),
    Command("bench", "benchmarks that print figures (JSON)", subcommands=(
        Command("data", "loader sequences/s per worker, fill and documents per micro-batch; "
                "on-device masking cost against transformers' DataCollatorForLanguageModeling",
                "mlm_dist.commands.bench:add_data_arguments", "mlm_dist.bench.data:data_command"),
        Command("train", "training-step throughput and MFU of our stack (optionally against "
                "transformers' BertForPreTraining), JSON", "mlm_dist.commands.bench:add_train_arguments",
                "mlm_dist.bench.train:train_command"),
        Command("memory", "bytes per rank (params, grads, optimizer states, peak RSS) under "
                "ZeRO stages on N ranks, against the ZeRO paper's formulas, and a micro-batch's "
                "activations against ours, JSON", "mlm_dist.commands.bench:add_memory_arguments",
                "mlm_dist.bench.memory:memory_command"),
        Command("convergence", "ours vs a transformers+torch reference trainer, per objective: "
                "validation loss and wall time for the same tokens, over seeds (JSON + PNG)",
                "mlm_dist.commands.bench:add_convergence_arguments",
                "mlm_dist.bench.convergence:convergence_command"),
        Command("finetune", "downstream accuracy: fine-tune a model and the same architecture "
                "from random weights on a classification or NER task (JSON)",
                "mlm_dist.commands.bench:add_finetune_arguments",
                "mlm_dist.bench.finetune:finetune_command"),
        Command("task-text", "write a task's training texts as a corpus for `prepare` (domain "
                "adaptation before fine-tuning)", "mlm_dist.commands.bench:add_task_text_arguments",
                "mlm_dist.bench.task_text:task_text_command"),
        Command("gpu", "the one-GPU check (minutes): device and versions, attention kernels, "
                "syncs per step, bench train vs HF, exact resume under deepspeed, peak memory "
                "vs the formula; JSON, exit 1 if a check fails", "mlm_dist.commands.bench:add_gpu_arguments",
                "mlm_dist.bench.gpu:gpu_command"),
    )),
    Command("demo", "corpus -> tokenizer -> shards -> 2-rank training -> fill-mask",
            "mlm_dist.demo.run:add_arguments"),
    Command("slurm", "write (and --submit) an sbatch script: srun, requeue on time limit",
            "mlm_dist.launch.slurm:add_arguments"),
    Command("launch", "start `mlm-dist train` on every host of a hostfile with the deepspeed "
            "launcher (pdsh over ssh)", "mlm_dist.launch.multinode:add_arguments"),
)


def _function(path: str):
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


class _CommandParser(argparse.ArgumentParser):
    """A command's parser that asks the command's module for its options only when this command
    is parsed or its help shown: building the whole parser imports none of them."""

    def __init__(self, *args, options: str = "", **kwargs):
        super().__init__(*args, **kwargs)
        self._options = options

    def _add_options(self) -> None:
        if self._options:
            options, self._options = self._options, ""
            _function(options)(self)

    def parse_known_args(self, args=None, namespace=None):
        self._add_options()
        return super().parse_known_args(args, namespace)

    def format_help(self) -> str:
        self._add_options()
        return super().format_help()


def _add_commands(parser: argparse.ArgumentParser, commands: tuple[Command, ...],
                  dest: str) -> None:
    sub = parser.add_subparsers(dest=dest, required=True, parser_class=_CommandParser)
    for command in commands:
        p = sub.add_parser(command.name, help=command.help, options=command.options)
        if command.run:
            p.set_defaults(func=command.run)
        if command.subcommands:
            _add_commands(p, command.subcommands, f"{command.name}_command")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mlm-dist", description=__doc__.split("\n\n")[0])
    _add_commands(p, COMMANDS, "command")
    return p


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    # The deepspeed launcher appends --local_rank=N; LOCAL_RANK in the environment says the same.
    argv = [a for a in argv if not a.startswith("--local_rank")]
    args = build_parser().parse_args(argv)
    run = _function(args.func) if isinstance(args.func, str) else args.func
    try:
        run(args)
    except UserError as e:  # anything else is a bug, or a failure nobody foresaw: its traceback
        print(f"mlm-dist {args.command}: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
