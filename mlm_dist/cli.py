"""`mlm-dist <command>`: one entry point for every step and every topology.

Glue only: each command's options and a handler of a few lines that imports the module doing
the work when it runs, so building the parser imports neither torch nor DeepSpeed (`--help`
and a mistyped option answer at once). A mistake the user can fix ends in one line that names
the thing and the fix (exit code 2); anything else shows its traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from mlm_dist.bench import convergence as bench_convergence
from mlm_dist.bench import data as bench_data
from mlm_dist.bench import finetune as bench_finetune
from mlm_dist.bench import gpu as bench_gpu
from mlm_dist.bench import memory as bench_memory
from mlm_dist.bench import task_text as bench_task_text
from mlm_dist.bench import train as bench_train
from mlm_dist.errors import PathExistsError, UsageError, UserError
from mlm_dist.launch import slurm


def _tokenizer_train(args) -> None:
    from mlm_dist.data.corpus import CorpusReader, check_readable, resolve_inputs
    from mlm_dist.data.sentences import AUTO
    from mlm_dist.tokenizer import corpus_language, sentences_of, train_tokenizer

    files = resolve_inputs(args.input)  # every input problem surfaces before training starts
    check_readable(files, args.text_field)
    # JSONL is split into sentences in --lang, as `prepare` splits it ("auto": per document).
    reader = CorpusReader(files, report=lambda line: print(line, file=sys.stderr, flush=True),
                          lang=args.lang, text_field=args.text_field)
    lang = reader.lang
    if lang == AUTO:  # one more pass over the corpus: the tokenizer serves all of it
        lang = corpus_language(CorpusReader(files, lang=AUTO,
                                            text_field=args.text_field).documents())
        print(f"--lang auto: training for {lang} text", file=sys.stderr, flush=True)
    tok = train_tokenizer(sentences_of(d.sentences for d in reader.documents()), args.out,
                          args.vocab_size, model_type=args.model_type, seed=args.seed,
                          input_sentence_size=args.input_sentence_size,
                          character_coverage=args.character_coverage,
                          byte_fallback=args.byte_fallback, lang=lang)
    print(f"wrote {tok.path} ({tok.vocab_size} pieces) from {len(files)} input files")


# `prepare` options that only make sense when building shards (not with --verify / --merge),
# and their defaults; they default to None on the command line so a stray one is noticed.
_PREPARE_BUILD_DEFAULTS = {"tokenizer": None, "out": None, "docs_per_shard": 2000,
                           "valid_fraction": 0.02, "seed": 0, "num_partitions": 1,
                           "partition_index": None, "lang": "en", "shuffle_mb": 512,
                           "text_field": "text"}


def _prepare(args) -> None:
    if args.verify or args.merge:
        _refuse_build_options(args)
        return _prepare_verify(args) if args.verify else _prepare_merge(args)
    _build_options(args)
    from mlm_dist.data.prepare import prepare_shards
    from mlm_dist.data.workers import default_workers

    manifest = prepare_shards(args.input, args.tokenizer, args.out,
                              docs_per_shard=args.docs_per_shard,
                              valid_fraction=args.valid_fraction, seed=args.seed,
                              workers=default_workers() if args.workers is None else args.workers,
                              num_partitions=args.num_partitions,
                              partition_index=args.partition_index or 0,
                              progress=not args.quiet, lang=args.lang,
                              shuffle_mb=args.shuffle_mb, text_field=args.text_field)
    _print_totals(manifest)
    info = manifest.prepare
    if info.invalid_utf8:
        print(f"invalid UTF-8: {info.invalid_utf8} sequences replaced in {info.invalid_utf8_files} "
              "files (named above)")
    if info.missing_text:
        print(f"without the field {info.text_field!r}: {info.missing_text} records skipped in "
              f"{info.missing_text_files} files (named above)")
    if info.partition is not None:
        print(f"partition {info.partition} of {info.num_partitions} done; when all are, run "
              f"`mlm-dist prepare --merge {args.out}`")


def _refuse_build_options(args) -> None:
    flag = "--verify" if args.verify else "--merge"
    stray = [k for k in _PREPARE_BUILD_DEFAULTS if getattr(args, k) is not None]
    if stray:
        raise UsageError(f"{flag} takes only a directory (and --workers, --quiet); drop "
                         + ", ".join("--" + k.replace("_", "-") for k in stray))


def _build_options(args) -> None:
    """The defaults of the options left out, and the combinations argparse cannot check."""
    for key, default in _PREPARE_BUILD_DEFAULTS.items():
        if getattr(args, key) is None:
            setattr(args, key, default)
    if args.tokenizer is None or args.out is None:
        raise UsageError("prepare --input needs --tokenizer DIR and --out DIR")
    if args.num_partitions > 1 and args.partition_index is None:
        raise UsageError(f"--num-partitions {args.num_partitions} needs --partition-index "
                         f"(0..{args.num_partitions - 1}; in a Slurm array job, "
                         "$SLURM_ARRAY_TASK_ID)")


def _prepare_verify(args) -> None:
    from mlm_dist.data.verify import verify_shards
    from mlm_dist.data.workers import default_workers

    workers = default_workers() if args.workers is None else args.workers
    checks = verify_shards(args.verify, workers=workers,
                           progress=not args.quiet)
    bad = [c for c in checks if c.problems]
    for check in bad:
        for problem in check.problems:
            print(problem)
    found = {k: sum(c.found[k] for c in checks) for k in ("documents", "sentences", "tokens")}
    counts = ", ".join(f"{v} {k}" for k, v in found.items())
    if bad:
        print(f"{sum(len(c.problems) for c in bad)} problems in {len(bad)} of {len(checks)} shards "
              f"of {args.verify} ({counts} readable); copy the bad shards again, or re-create "
              "the directory with `mlm-dist prepare`")
        sys.exit(2)
    print(f"all {len(checks)} shards of {args.verify} match its manifest ({counts})")


def _prepare_merge(args) -> None:
    from mlm_dist.data.partitions import merge_partitions

    manifest = merge_partitions(args.merge)
    print(f"merged {manifest.prepare.num_partitions} partitions into "
          f"{Path(args.merge) / 'manifest.json'}")
    _print_totals(manifest)


def _print_totals(manifest) -> None:
    for split in manifest.splits:
        t = manifest.totals(split)
        print(f"{split}: {t['shards']} shards, {t['documents']} documents, "
              f"{t['sentences']} sentences, {t['tokens']} tokens")


def _train(args) -> None:
    from mlm_dist.config import load_config

    cfg = load_config(args.config, args.overrides)  # fails before any process group exists
    from mlm_dist.training.loop import train

    train(cfg)


def _export_hf(args) -> None:
    from mlm_dist.objectives import objective_for
    from mlm_dist.training.checkpoint import load_checkpoint

    model, cfg, tokenizer_dir = load_checkpoint(args.checkpoint)
    objective = objective_for(cfg)
    hf_class = args.hf_class or objective.hf_class
    objective.export(model.state_dict(), cfg.model, tokenizer_dir, args.out, hf_class)
    print(f"wrote Hugging Face {hf_class} + tokenizer to {args.out} "
          f"(objective {objective.name})")


def _fill_mask(args) -> None:
    from mlm_dist.interop.fill_mask import fill_mask
    from mlm_dist.training.checkpoint import load_checkpoint
    from mlm_dist.tokenizer import Tokenizer

    model, _, tokenizer_dir = load_checkpoint(args.checkpoint)
    tokenizer = Tokenizer.load(tokenizer_dir)
    for text in args.text:
        # ensure_ascii=False: Japanese or Chinese text as written, not as \uXXXX escapes
        print(json.dumps({"text": text, "predictions": fill_mask(model, tokenizer, text,
                                                                 args.top_k)},
                         ensure_ascii=False))


def _eval(args) -> None:
    from mlm_dist.training.evaluate import evaluate_saved_model

    results = evaluate_saved_model(args.checkpoint, data=args.data, seq_len=args.seq_len,
                                   micro_batch=args.micro_batch, max_pairs=args.max_pairs,
                                   seed=args.seed, overrides=args.overrides, like=args.like)
    print(json.dumps({"checkpoint": str(args.checkpoint), **results}, ensure_ascii=False))


def _consolidate(args) -> None:
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


def _demo(args) -> None:
    from mlm_dist.demo.run import run_demo

    run_demo(Path(args.out) if args.out else None, steps=args.steps, ranks=args.ranks,
             lang=args.lang, size=args.size, objective=args.objective)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mlm-dist", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    for add_parser in (_add_tokenizer, _add_prepare, _add_train, _add_export_hf, _add_fill_mask,
                       _add_eval, _add_consolidate, _add_bench, _add_demo, slurm.add_parser):
        add_parser(sub)  # each command's options and handler
    return p


def _add_tokenizer(sub) -> None:
    tok = sub.add_parser("tokenizer", help="tokenizer commands").add_subparsers(
        dest="tokenizer_command", required=True)
    t = tok.add_parser("train", help="train a SentencePiece tokenizer with BERT's specials")
    t.add_argument("--input", nargs="+", required=True, metavar="PATH",
                   help="files, directories or glob patterns, as for `prepare --input` (quote "
                        "patterns: expanded by mlm-dist)")
    t.add_argument("--vocab-size", type=int, required=True)
    t.add_argument("--out", required=True, help="directory to write tokenizer.model into")
    t.add_argument("--model-type", default="unigram", choices=["unigram", "bpe"])
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--input-sentence-size", type=int, default=2_000_000,
                   help="sentences sampled for training (bounds memory on big corpora)")
    # The default is tokenizer.DEFAULT_CHARACTER_COVERAGE, spelled out so that building the
    # parser imports no SentencePiece (a test checks the two agree).
    t.add_argument("--character-coverage", type=float, default=0.9995, metavar="SHARE",
                   help="share of the corpus's characters that get a piece of their own; rarer "
                        "ones become [UNK] (or bytes with --byte-fallback). SentencePiece "
                        "advises 0.9995 for rich character sets (Japanese, Chinese), 1.0 for "
                        "small alphabets; 0.98 to 1 (default: 0.9995)")
    t.add_argument("--byte-fallback", action="store_true",
                   help="spell characters that have no piece as their UTF-8 bytes (<0x00>…"
                        "<0xFF>, 256 pieces counted in --vocab-size) instead of [UNK]")
    t.add_argument("--lang", default="en", metavar="CODE",
                   help="language of the corpus, as for `prepare --lang`: ja or zh train for "
                        "text without spaces between words (no lone ▁ before each sentence or "
                        "around Latin words); auto decides from the corpus (one more pass "
                        "over it); JSONL is split into sentences in it (default: en)")
    t.add_argument("--text-field", default="text", metavar="NAME",
                   help="as for `prepare --text-field` (default: text)")
    t.set_defaults(func=_tokenizer_train)


def _add_prepare(sub) -> None:
    pr = sub.add_parser(
        "prepare", help="tokenize a corpus into WebDataset shards; verify or merge shards",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Three modes:\n"
                    "  --input PATH… --tokenizer DIR --out DIR   tokenize a corpus into shards\n"
                    "  --verify DIR   check every shard against DIR/manifest.json (size, sha256,\n"
                    "                 samples decode, counts); exit code 2 if anything is wrong\n"
                    "  --merge DIR    join the partial manifests of a partitioned run into\n"
                    "                 DIR/manifest.json (all partitions must be present and agree)",
        epilog="A huge corpus on many nodes (one Slurm array task per partition, one shared --out):\n"
               "  sbatch --array=0-7 --wrap 'mlm-dist prepare --input \"corpus/*.jsonl.gz\" \\\n"
               "      --tokenizer tok --out shards --num-partitions 8 \\\n"
               "      --partition-index $SLURM_ARRAY_TASK_ID'\n"
               "  mlm-dist prepare --merge shards        # after all 8 tasks succeeded\n"
               "Input file k (after expansion and sorting) goes to partition k % P; partition i\n"
               "writes train-pIIIII-NNNNNN.tar and manifest.pIIIII-of-PPPPP.json.")
    mode = pr.add_mutually_exclusive_group(required=True)
    mode.add_argument("--input", nargs="+", metavar="PATH",
                      help=".txt, .jsonl, .parquet files, .gz/.bz2/.zst-compressed text and JSON "
                           "lines, Wikipedia CirrusSearch dumps; directories (their files with "
                           "those suffixes, recursively) or glob patterns (quote them)")
    mode.add_argument("--verify", metavar="DIR", help="check the shards of DIR (or of a URL: "
                      "https://, s3://, gs://, 'pipe:CMD {}') against its manifest")
    mode.add_argument("--merge", metavar="DIR", help="merge the partition manifests of DIR")
    pr.add_argument("--tokenizer", metavar="DIR", help="directory holding tokenizer.model")
    pr.add_argument("--out", metavar="DIR", help="directory for the shards (never overwritten)")
    pr.add_argument("--docs-per-shard", type=int, metavar="N", help="documents per shard (default 2000)")
    pr.add_argument("--valid-fraction", type=float,
                    help="probability that a document goes to valid (default 0.02)")
    pr.add_argument("--seed", type=int, help="seed of the train/valid draw (default 0)")
    pr.add_argument("--workers", type=int, metavar="N",
                    help="processes tokenizing (or verifying); default: all cores this job may "
                         "use. The shards are identical whatever the number")
    pr.add_argument("--num-partitions", type=int, metavar="P",
                    help="split the input files into P partitions (default 1: no partitioning)")
    pr.add_argument("--partition-index", type=int, metavar="I",
                    help="the partition this run prepares, 0..P-1")
    pr.add_argument("--lang", metavar="CODE",
                    help="language of the text (default en): splits .jsonl documents into "
                         "sentences and, for ja (MeCab) and zh (jieba), finds the words "
                         "whole-word masking masks; auto: decide per document")
    pr.add_argument("--shuffle-mb", type=int, metavar="MB",
                    help="documents reach the shards through a shuffle buffer of this size, so "
                         "a shard is a sample of the corpus, not one region of it (default 512; "
                         "0: keep the corpus order)")
    pr.add_argument("--text-field", metavar="NAME",
                    help="the field of a JSON line or the column of a Parquet row that holds "
                         "the document's text (default text); dotted for nested objects and "
                         "struct columns: meta.body")
    pr.add_argument("--quiet", action="store_true", help="no progress bar")
    pr.set_defaults(func=_prepare)


def _add_train(sub) -> None:
    tr = sub.add_parser("train", help="pretrain (alone, or under deepspeed/torchrun/srun)")
    tr.add_argument("--config", required=True, help="YAML run config")
    tr.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=1e-4")
    tr.set_defaults(func=_train)


def _add_export_hf(sub) -> None:
    ex = sub.add_parser("export-hf", help="write a Hugging Face folder (BertForPreTraining, or "
                        "BertForMaskedLM for objective.name=mlm; for electra "
                        "ElectraForPreTraining, its generator ElectraForMaskedLM in generator/)")
    ex.add_argument("--checkpoint", required=True, help="run dir, checkpoints dir or step dir")
    ex.add_argument("--out", required=True)
    ex.add_argument("--hf-class", choices=("BertForPreTraining", "BertForMaskedLM"),
                    default="", help="the transformers class to write (default: the "
                    "objective's; BertForPreTraining from an mlm run gets a fresh NSP head)")
    ex.set_defaults(func=_export_hf)


def _add_fill_mask(sub) -> None:
    fm = sub.add_parser("fill-mask", help="print the top-k completions of [MASK]")
    fm.add_argument("--checkpoint", required=True)
    fm.add_argument("--top-k", type=int, default=5)
    fm.add_argument("text", nargs="+")
    fm.set_defaults(func=_fill_mask)


def _add_eval(sub) -> None:
    ev = sub.add_parser(
        "eval", help="validation loss, perplexity and accuracies (JSON)",
        description="Reads and masks as the run's config says (a Hugging Face folder: as the "
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
    ev.set_defaults(func=_eval)


def _add_consolidate(sub) -> None:
    co = sub.add_parser("consolidate", help="one fp32 state dict from a sharded checkpoint")
    co.add_argument("--checkpoint", required=True)
    co.add_argument("--out", required=True, help="file to write (torch.save)")
    co.set_defaults(func=_consolidate)


def _add_bench(sub) -> None:
    bench = sub.add_parser("bench", help="benchmarks that print figures (JSON)").add_subparsers(
        dest="bench_command", required=True)
    for module in (bench_data, bench_train, bench_memory, bench_convergence, bench_finetune,
                   bench_task_text, bench_gpu):
        module.add_parser(bench)  # options only: each imports its heavy parts when it runs


def _add_demo(sub) -> None:
    de = sub.add_parser("demo", help="corpus -> tokenizer -> shards -> 2-rank training -> fill-mask")
    de.add_argument("--out", help="default: runs/demo, runs/demo-small for --size small; "
                                  "-<objective> appended for an --objective other than bert")
    de.add_argument("--size", default="tiny", choices=["tiny", "small"],
                    help="tiny: hidden 128, 2 layers, 800 steps (a few minutes); small: hidden "
                         "256, 4 layers, 2000 steps (see README's Downstream accuracy)")
    de.add_argument("--steps", type=int, help="pretraining steps (default: the size's)")
    de.add_argument("--ranks", type=int, default=2)
    de.add_argument("--lang", default="en", choices=["en", "ja", "zh"],
                    help="en: stdlib docstrings; ja / zh: Debian's manpages-ja / manpages-zh, "
                         "whole-word masking by MeCab / jieba words")
    de.add_argument("--objective", default="bert", choices=("bert", "mlm", "sop", "electra"),
                    help="what the model learns (objective.name): bert: MLM + next-sentence "
                         "prediction; mlm: MLM on full rows (RoBERTa); sop: MLM + sentence "
                         "order (ALBERT); electra: replaced-token detection, fill-mask by its "
                         "generator (default: bert)")
    de.set_defaults(func=_demo)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    # The deepspeed launcher appends --local_rank=N; LOCAL_RANK in the environment says the same.
    argv = [a for a in argv if not a.startswith("--local_rank")]
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except UserError as e:  # anything else is a bug, or a failure nobody foresaw: its traceback
        print(f"mlm-dist {args.command}: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
