"""The commands that read a saved model: `export-hf`, `fill-mask`, `eval`, `consolidate`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from mlm_dist.errors import PathExistsError


def add_export_hf_arguments(ex: argparse.ArgumentParser) -> None:
    ex.add_argument("--checkpoint", required=True, help="run dir, checkpoints dir or step dir")
    ex.add_argument("--out", required=True)
    ex.add_argument("--hf-class", choices=("BertForPreTraining", "BertForMaskedLM"),
                    default="", help="the transformers class to write (default: the "
                    "objective's; BertForPreTraining from an mlm run gets a fresh NSP head)")
    ex.set_defaults(func=export_hf)


def add_fill_mask_arguments(fm: argparse.ArgumentParser) -> None:
    fm.add_argument("--checkpoint", required=True)
    fm.add_argument("--top-k", type=int, default=5)
    fm.add_argument("text", nargs="+")
    fm.set_defaults(func=fill_mask_command)


def add_eval_arguments(ev: argparse.ArgumentParser) -> None:
    ev.description = ("Reads and masks as the run's config says (a Hugging Face folder: as the "
                      "defaults say), then as --like RUN's, then as the dotted settings.")
    ev.add_argument("--checkpoint", required=True,
                    help="run dir, checkpoints dir, step dir, or a Hugging Face BERT folder")
    ev.add_argument("--data", help="shard directory (default: the run's data.shards)")
    ev.add_argument("--like", metavar="RUN",
                    help="read, mask and score as RUN's evaluation does: its masking.*, eval.*, "
                         "data reading settings and last phase's seq_len, and for a folder "
                         "its objective (the 'before' of a domain adaptation: --like the run "
                         "that continued the folder)")
    ev.add_argument("--seq-len", type=int, default=0,
                    help="default: the last phase's (of --like RUN, else of the run)")
    ev.add_argument("--micro-batch", type=int, default=16)
    ev.add_argument("--max-pairs", type=int,
                    help="stop after this many validation pairs; 0 = the whole split "
                         "(default: eval.max_pairs)")
    ev.add_argument("--seed", type=int, help="the pairs' and masks' seed (default: eval.seed)")
    ev.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                    help="dotted settings, as for `train`: masking.*, eval.*, data."
                         "{shuffle_buffer,open_documents,short_seq_prob,stream_*}, and for a "
                         "Hugging Face folder objective.* (e.g. masking.whole_word=true "
                         "objective.name=mlm)")
    ev.set_defaults(func=evaluate)


def add_consolidate_arguments(co: argparse.ArgumentParser) -> None:
    co.add_argument("--checkpoint", required=True)
    co.add_argument("--out", required=True, help="file to write (torch.save)")
    co.set_defaults(func=consolidate)


def export_hf(args) -> None:
    # The handlers import their work when they run, not at the top: it is torch's, which
    # `--help` and a mistyped option should not wait for.
    from mlm_dist.objectives import objective_for
    from mlm_dist.training.checkpoint import load_checkpoint

    model, cfg, tokenizer_dir = load_checkpoint(args.checkpoint)
    objective = objective_for(cfg)
    hf_class = args.hf_class or objective.hf_class
    objective.export(model.state_dict(), cfg.model, tokenizer_dir, args.out, hf_class)
    print(f"wrote Hugging Face {hf_class} + tokenizer to {args.out} "
          f"(objective {objective.name})")


def fill_mask_command(args) -> None:
    from mlm_dist.interop.fill_mask import fill_mask
    from mlm_dist.tokenizer import Tokenizer
    from mlm_dist.training.checkpoint import load_checkpoint

    model, _, tokenizer_dir = load_checkpoint(args.checkpoint)
    tokenizer = Tokenizer.load(tokenizer_dir)
    for text in args.text:
        # ensure_ascii=False: Japanese or Chinese text as written, not as \uXXXX escapes
        print(json.dumps({"text": text, "predictions": fill_mask(model, tokenizer, text,
                                                                 args.top_k)},
                         ensure_ascii=False))


def evaluate(args) -> None:
    from mlm_dist.training.evaluate import evaluate_saved_model

    results = evaluate_saved_model(args.checkpoint, data=args.data, seq_len=args.seq_len,
                                   micro_batch=args.micro_batch, max_pairs=args.max_pairs,
                                   seed=args.seed, overrides=args.overrides, like=args.like)
    print(json.dumps({"checkpoint": str(args.checkpoint), **results}, ensure_ascii=False))


def consolidate(args) -> None:
    import torch

    from mlm_dist.training.checkpoint import load_checkpoint

    out = Path(args.out)
    if out.exists():
        raise PathExistsError(f"--out {out} already exists; choose another path")
    model, cfg, _ = load_checkpoint(args.checkpoint)
    tmp = out.with_name(out.name + ".tmp")
    torch.save(model.state_dict(), tmp)
    tmp.replace(out)
    print(f"wrote one fp32 state dict ({len(model.state_dict())} tensors) to {out}")
