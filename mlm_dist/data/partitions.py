"""Preparing one corpus on many nodes: partitions of the input files, and merging their manifests.

`mlm-dist prepare --num-partitions P --partition-index i` (one Slurm array task per i) reads
input file k only if k % P == i, after every node has expanded and sorted the same inputs. All
partitions may write into one directory on a shared filesystem, so each one's names carry its
index and nothing ever collides:

    train-p00003-000012.tar        shards of partition 3
    p00003-000000042               document keys inside them
    manifest.p00003-of-00008.json  partition 3's manifest, written once its shards are complete

`mlm-dist prepare --merge DIR` checks that all P partial manifests are there and agree
(tokenizer, dtype, inputs, seed) and writes manifest.json, which the loader reads.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from mlm_dist.data.formats import CorpusError
from mlm_dist.data.shards import MANIFEST_FILE, Manifest, PrepareInfo, ShardFormatError
from mlm_dist.errors import PathExistsError, PathNotFoundError, UsageError

_PARTIAL_MANIFEST = re.compile(r"manifest\.p(\d{5,})-of-(\d{5,})\.json")


def partial_manifest_name(index: int, count: int) -> str:
    return f"manifest.p{index:05d}-of-{count:05d}.json"


def shard_prefix(split: str, partition: int | None) -> str:
    return split if partition is None else f"{split}-p{partition:05d}"


def check_partition(count, index):
    for name, value in (("--num-partitions", count), ("--partition-index", index)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise UsageError(f"{name} must be an integer, got {value!r}")
    if count < 1:
        raise UsageError(f"--num-partitions must be at least 1, got {count}")
    if not 0 <= index < count:
        raise UsageError(f"--partition-index must be in 0..{count - 1} for --num-partitions "
                         f"{count}, got {index} (a Slurm array --array=0-{count - 1} gives "
                         "$SLURM_ARRAY_TASK_ID in that range)")


def partition_file_indices(files: int, count: int, index: int) -> list[int]:
    """Indices (into the whole sorted input list) of the files partition `index` reads."""
    if files < count:
        raise UsageError(f"--num-partitions {count} is more than the {files} input files: inputs "
                         "are partitioned by file, so use at most that many partitions (or split "
                         "the corpus into more files)")
    return list(range(index, files, count))


def inputs_sha256(files: list[Path]) -> str:
    """Fingerprint of the whole input list: partitions that saw different lists must not merge."""
    return hashlib.sha256("\n".join(map(str, files)).encode("utf-8", "surrogateescape")).hexdigest()


def check_out_dir(out: Path, count: int, index: int):
    """Refuse an --out where this run would overwrite or mix with shards already written."""
    if out.exists() and not out.is_dir():
        raise PathExistsError(f"--out {out} is a file; give a directory for the shards")
    if not out.is_dir():
        return
    partials = sorted(p.name for p in out.iterdir() if _PARTIAL_MANIFEST.fullmatch(p.name))
    if count == 1:
        if (out / MANIFEST_FILE).exists() or partials or any(out.glob("*.tar")):
            raise PathExistsError(f"{out} already holds shards; choose a new --out directory "
                                  "(shards are never overwritten)")
        return
    if (out / MANIFEST_FILE).exists():
        raise PathExistsError(f"{out} already holds finished shards ({MANIFEST_FILE}); choose a "
                              "new --out directory (shards are never overwritten)")
    other_counts = {int(_PARTIAL_MANIFEST.fullmatch(n).group(2)) for n in partials} - {count}
    if other_counts:
        raise PathExistsError(f"{out} holds partitions of a run with --num-partitions "
                              f"{min(other_counts)}, not {count}; use that run's --num-partitions "
                              "or a new --out directory")
    own = partial_manifest_name(index, count)
    if (out / own).exists():
        raise PathExistsError(f"partition {index} of {count} is already done: {out / own} "
                              "exists (shards are never overwritten); run the missing partitions, "
                              f"then `mlm-dist prepare --merge {out}`")
    leftovers = sorted(p.name for split in ("train", "valid")
                       for p in out.glob(f"{shard_prefix(split, index)}-*.tar"))
    if leftovers:
        raise PathExistsError(
            f"{out} already holds shards of partition {index} ({', '.join(leftovers[:3])}"
            f"{', …' if len(leftovers) > 3 else ''}) but no {own}: an interrupted run of this "
            f"partition left them. Remove them ({out}/train-p{index:05d}-*.tar and "
            f"{out}/valid-p{index:05d}-*.tar) and run it again, or use a new --out directory")


# ----------------------------------------------------------------------------- merge

def merge_partitions(directory: str | Path) -> Manifest:
    """Join the partial manifests of `directory` into its manifest.json and return it."""
    root = Path(directory)
    if not root.is_dir():
        raise PathNotFoundError(f"--merge {root}: no such directory")
    if (root / MANIFEST_FILE).exists():
        raise PathExistsError(f"{root / MANIFEST_FILE} already exists: the partitions are merged "
                              "already (manifests are never overwritten)")
    found = {}
    for path in root.iterdir():
        match = _PARTIAL_MANIFEST.fullmatch(path.name)
        if match:
            found[int(match.group(1)), int(match.group(2))] = path
    if not found:
        raise PathNotFoundError(f"{root} has no partial manifests (manifest.pNNNNN-of-NNNNN.json); "
                                "make them with `mlm-dist prepare … --num-partitions P "
                                "--partition-index i` for each i")
    counts = sorted({count for _, count in found})
    if len(counts) > 1:
        raise ShardFormatError(f"{root} mixes partitions of runs with --num-partitions "
                               f"{', '.join(map(str, counts))}; a directory must hold one run")
    count = counts[0]
    missing = [i for i in range(count) if (i, count) not in found]
    if missing:
        names = ", ".join(partial_manifest_name(i, count) for i in missing[:5])
        raise PathNotFoundError(
            f"{root}: {len(missing)} of {count} partitions are missing ({names}"
            f"{', …' if len(missing) > 5 else ''}); those jobs failed or are still running: run "
            f"`mlm-dist prepare … --num-partitions {count} --partition-index i` for them "
            "(--partition-index " + ", ".join(map(str, missing[:5])) + "), then merge again")
    parts = [(found[i, count], Manifest.read(found[i, count])) for i in range(count)]
    _check_partitions_agree(root, parts, count)

    first = parts[0][1]
    splits: dict[str, list] = {}
    for _, manifest in parts:
        for split, shards in manifest.splits.items():
            splits.setdefault(split, []).extend(shards)
    infos = [manifest.prepare for _, manifest in parts]
    merged = Manifest(tokenizer=first.tokenizer, dtype=first.dtype, splits=splits,
                      prepare=PrepareInfo(
                          files=sum(i.files for i in infos), inputs_sha256=first.prepare.inputs_sha256,
                          seed=first.prepare.seed, valid_fraction=first.prepare.valid_fraction,
                          invalid_utf8=sum(i.invalid_utf8 for i in infos),
                          invalid_utf8_files=sum(i.invalid_utf8_files for i in infos),
                          num_partitions=count, lang=first.prepare.lang,
                          shuffle_mb=first.prepare.shuffle_mb,
                          text_field=first.prepare.text_field,
                          missing_text=sum(i.missing_text for i in infos),
                          missing_text_files=sum(i.missing_text_files for i in infos)))
    if merged.totals("train")["documents"] == 0:
        raise CorpusError(f"no partition of {root} has any train document: the inputs have no "
                          "text; nothing to merge")
    merged.save(root)
    return merged


def _check_partitions_agree(root: Path, parts: list[tuple[Path, Manifest]], count: int):
    """Everything that must be the same in every partition is; every shard is there, once."""
    first_path, first = parts[0]
    seen: dict[str, Path] = {}
    for index, (path, manifest) in enumerate(parts):
        info = manifest.prepare
        if info is None or info.partition != index or info.num_partitions != count:
            raise ShardFormatError(f"{path} does not describe partition {index} of {count} (its "
                                   f"'prepare' entry says {info}); it was renamed or edited: make it "
                                   "again with `mlm-dist prepare`")
        for what, mine, theirs, fix in (
                ("tokenizer sha256", manifest.tokenizer.sha256, first.tokenizer.sha256,
                 "every partition must use the same --tokenizer"),
                ("dtype", manifest.dtype, first.dtype, "every partition must use the same --tokenizer"),
                ("input list", info.inputs_sha256, first.prepare.inputs_sha256,
                 "every partition must see the same --input files (did files change between jobs?)"),
                ("seed", info.seed, first.prepare.seed, "use the same --seed"),
                ("shuffle buffer", info.shuffle_mb, first.prepare.shuffle_mb,
                 "use the same --shuffle-mb"),
                ("valid fraction", info.valid_fraction, first.prepare.valid_fraction,
                 "use the same --valid-fraction"),
                ("language", info.lang, first.prepare.lang, "use the same --lang"),
                ("text field", info.text_field, first.prepare.text_field,
                 "use the same --text-field")):
            if mine != theirs:
                raise ShardFormatError(f"{path.name} and {first_path.name} in {root} differ in {what} "
                                       f"({mine} vs {theirs}): {fix}; re-run the partitions that differ")
        for shards in manifest.splits.values():
            for shard in shards:
                if shard.path in seen:
                    raise ShardFormatError(f"shard {shard.path} is listed by both {seen[shard.path].name} "
                                           f"and {path.name}; re-run those partitions into a new --out")
                seen[shard.path] = path
                file = root / shard.path  # inside root: Manifest.read checked the path
                if not file.is_file() or file.stat().st_size != shard.bytes:
                    raise PathNotFoundError(
                        f"shard {file} listed in {path.name} is missing or not {shard.bytes} bytes; "
                        f"copy it again, or delete {path.name} and that partition's shards and "
                        "re-run it")
