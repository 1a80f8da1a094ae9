"""`mlm-dist <command>`: one entry point for every step and every topology."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from mlm_dist.config import ConfigError


def _tokenizer_train(args) -> None:
    from mlm_dist.data.corpus import iter_documents
    from mlm_dist.tokenizer import sentences_of, train_tokenizer

    tok = train_tokenizer(sentences_of(iter_documents(args.input)), args.out, args.vocab_size,
                          model_type=args.model_type, seed=args.seed,
                          input_sentence_size=args.input_sentence_size)
    print(f"wrote {tok.path} ({tok.vocab_size} pieces)")


def _prepare(args) -> None:
    from mlm_dist.data.prepare import prepare_shards

    manifest = prepare_shards(args.input, args.tokenizer, args.out,
                              docs_per_shard=args.docs_per_shard,
                              valid_fraction=args.valid_fraction, seed=args.seed)
    for split in manifest.splits:
        t = manifest.totals(split)
        print(f"{split}: {t['shards']} shards, {t['documents']} documents, "
              f"{t['sentences']} sentences, {t['tokens']} tokens")


def _train(args) -> None:
    from mlm_dist.config import load_config

    cfg = load_config(args.config, args.overrides)  # fails before any process group exists
    from mlm_dist.train import train

    train(cfg)


def _export_hf(args) -> None:
    from mlm_dist.inference import load_checkpoint
    from mlm_dist.hf_export import export_hf

    model, cfg, tokenizer_dir = load_checkpoint(args.checkpoint)
    export_hf(model.state_dict(), cfg.model, tokenizer_dir, args.out)
    print(f"wrote Hugging Face BertForPreTraining + tokenizer to {args.out}")


def _fill_mask(args) -> None:
    from mlm_dist.inference import fill_mask, load_checkpoint
    from mlm_dist.tokenizer import Tokenizer

    model, _, tokenizer_dir = load_checkpoint(args.checkpoint)
    tokenizer = Tokenizer.load(tokenizer_dir)
    for text in args.text:
        print(json.dumps({"text": text, "predictions": fill_mask(model, tokenizer, text,
                                                                 args.top_k)}))


def _demo(args) -> None:
    from mlm_dist.demo import run_demo

    run_demo(Path(args.out), steps=args.steps, ranks=args.ranks)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mlm-dist", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    tok = sub.add_parser("tokenizer", help="tokenizer commands").add_subparsers(
        dest="tokenizer_command", required=True)
    t = tok.add_parser("train", help="train a SentencePiece tokenizer with BERT's specials")
    t.add_argument("--input", nargs="+", required=True, help="text (.txt) or .jsonl files")
    t.add_argument("--vocab-size", type=int, required=True)
    t.add_argument("--out", required=True, help="directory to write tokenizer.model into")
    t.add_argument("--model-type", default="unigram", choices=["unigram", "bpe"])
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--input-sentence-size", type=int, default=2_000_000,
                   help="sentences sampled for training (bounds memory on big corpora)")
    t.set_defaults(func=_tokenizer_train)

    pr = sub.add_parser("prepare", help="tokenize a corpus into WebDataset shards")
    pr.add_argument("--input", nargs="+", required=True)
    pr.add_argument("--tokenizer", required=True, help="directory holding tokenizer.model")
    pr.add_argument("--out", required=True)
    pr.add_argument("--docs-per-shard", type=int, default=2000)
    pr.add_argument("--valid-fraction", type=float, default=0.02)
    pr.add_argument("--seed", type=int, default=0)
    pr.set_defaults(func=_prepare)

    tr = sub.add_parser("train", help="pretrain (alone, or under deepspeed/torchrun/srun)")
    tr.add_argument("--config", required=True, help="YAML run config")
    tr.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=1e-4")
    tr.set_defaults(func=_train)

    ex = sub.add_parser("export-hf", help="write a Hugging Face BertForPreTraining folder")
    ex.add_argument("--checkpoint", required=True, help="run dir, checkpoints dir or step dir")
    ex.add_argument("--out", required=True)
    ex.set_defaults(func=_export_hf)

    fm = sub.add_parser("fill-mask", help="print the top-k completions of [MASK]")
    fm.add_argument("--checkpoint", required=True)
    fm.add_argument("--top-k", type=int, default=5)
    fm.add_argument("text", nargs="+")
    fm.set_defaults(func=_fill_mask)

    de = sub.add_parser("demo", help="corpus -> tokenizer -> shards -> 2-rank training -> fill-mask")
    de.add_argument("--out", default="runs/demo")
    de.add_argument("--steps", type=int, default=800)
    de.add_argument("--ranks", type=int, default=2)
    de.set_defaults(func=_demo)
    return p


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    # The deepspeed launcher appends --local_rank=N; LOCAL_RANK in the environment says the same.
    argv = [a for a in argv if not a.startswith("--local_rank")]
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ConfigError, FileExistsError, FileNotFoundError, NotADirectoryError, ValueError) as e:
        print(f"mlm-dist {args.command}: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
