"""`mlm-dist prepare`: tokenize a corpus into shards, verify shards against their manifest, or
merge the manifests of a partitioned run."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mlm_dist.data.partitions import merge_partitions
from mlm_dist.data.prepare import prepare_shards
from mlm_dist.data.verify import verify_shards
from mlm_dist.data.workers import default_workers
from mlm_dist.errors import UsageError


def add_arguments(pr: argparse.ArgumentParser) -> None:
    pr.formatter_class = argparse.RawDescriptionHelpFormatter
    pr.description = ("Three modes:\n"
                      "  --input PATH… --tokenizer DIR --out DIR   tokenize a corpus into shards\n"
                      "  --verify DIR   check every shard against DIR/manifest.json (size, sha256,\n"
                      "                 samples decode, counts); exit code 2 if anything is wrong\n"
                      "  --merge DIR    join the partial manifests of a partitioned run into\n"
                      "                 DIR/manifest.json (all partitions must be present and agree)")
    pr.epilog = ("A huge corpus on many nodes (one Slurm array task per partition, one shared --out):\n"
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
    pr.set_defaults(func=prepare)


# `prepare` options that only make sense when building shards (not with --verify / --merge),
# and their defaults; they default to None on the command line so a stray one is noticed.
_PREPARE_BUILD_DEFAULTS = {"tokenizer": None, "out": None, "docs_per_shard": 2000,
                           "valid_fraction": 0.02, "seed": 0, "num_partitions": 1,
                           "partition_index": None, "lang": "en", "shuffle_mb": 512,
                           "text_field": "text"}


def prepare(args) -> None:
    if args.verify or args.merge:
        _refuse_build_options(args)
        return _prepare_verify(args) if args.verify else _prepare_merge(args)
    _build_options(args)
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
    manifest = merge_partitions(args.merge)
    print(f"merged {manifest.prepare.num_partitions} partitions into "
          f"{Path(args.merge) / 'manifest.json'}")
    _print_totals(manifest)


def _print_totals(manifest) -> None:
    for split in manifest.splits:
        t = manifest.totals(split)
        print(f"{split}: {t['shards']} shards, {t['documents']} documents, "
              f"{t['sentences']} sentences, {t['tokens']} tokens")
