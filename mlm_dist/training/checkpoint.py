"""Checkpoints on top of the DeepSpeed engine that survive crashes, and finding them again.

Layout of a run directory:
    config.yaml                     the resolved config of the run
    metrics.jsonl, tensorboard/     what rank 0 logged
    checkpoints/step_00000100/      one DeepSpeed tag: per-rank ZeRO shards + model states,
                                    run_config.yaml and the tokenizer's files (self-describing),
                                    complete.json (written last: the checkpoint counts)
    checkpoints/latest              tag of the newest complete checkpoint

DeepSpeed writes its files under their final names and, left to itself, points `latest` at a
tag before every rank has finished writing. We do not trust either: every rank writes, all
ranks meet at a barrier, and only then rank 0 writes `complete.json` and atomically moves the
`latest` pointer. A checkpoint without `complete.json` is a crashed save and is never resumed
from; resuming looks for the newest *complete* checkpoint, whatever `latest` says.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path

import torch.distributed as dist

from mlm_dist.training import faults
from mlm_dist.config import RunConfig, dump_yaml, load_config

CHECKPOINTS = "checkpoints"
RUN_CONFIG = "run_config.yaml"
COMPLETE = "complete.json"
_TAG = re.compile(r"step_(\d{8,})$")


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


def tags(root: Path) -> list[tuple[int, Path, bool]]:
    """(step, directory, complete?) of every checkpoint under `root`, oldest first."""
    found = []
    if root.is_dir():
        for d in root.iterdir():
            m = _TAG.match(d.name)
            if m and d.is_dir():
                found.append((int(m.group(1)), d, (d / COMPLETE).is_file()))
    return sorted(found)


def latest_complete(root: Path) -> Path | None:
    complete = [d for _, d, ok in tags(root) if ok]
    return complete[-1] if complete else None


def save(engine, run_dir: Path, step: int, cfg: RunConfig, tokenizer_files: list[Path],
         client_state: dict, rank: int, keep: int) -> Path:
    """Collective: every rank calls it. Returns the tag directory once it is complete."""
    root = run_dir / CHECKPOINTS
    tag_dir = root / tag_for(step)
    if rank == 0 and tag_dir.exists():
        # Leftovers of a save that crashed at this very step (or of a rolled-back future).
        shutil.rmtree(tag_dir)
    dist.barrier()
    engine.save_checkpoint(str(root), tag=tag_dir.name, client_state=client_state,
                           save_latest=False)
    faults.maybe_kill_during_save(step)
    dist.barrier()  # every rank's files are on disk
    if rank == 0:
        (tag_dir / RUN_CONFIG).write_text(dump_yaml(cfg))
        for f in tokenizer_files:  # tokenizer.model, or a HF tokenizer's files
            shutil.copyfile(f, tag_dir / f.name)
        _write_atomically(tag_dir / COMPLETE, json.dumps(
            {"step": step, "world_size": dist.get_world_size(), "time": time.time()}))
        _write_atomically(root / "latest", tag_dir.name)
        prune(root, keep)
    dist.barrier()
    return tag_dir


def prune(root: Path, keep: int) -> None:
    """Keep the newest `keep` complete checkpoints (0 = all); drop crashed saves older than
    the newest complete one. The newest complete checkpoint is never deleted."""
    found = tags(root)
    complete = [d for _, d, ok in found if ok]
    if not complete:
        return
    newest = complete[-1]
    doomed = complete[:-keep] if keep else []
    doomed += [d for step, d, ok in found if not ok and d.name < newest.name]
    for d in doomed:
        if d != newest:
            shutil.rmtree(d, ignore_errors=True)


def saved_world_size(tag_dir: Path) -> int:
    return json.loads((tag_dir / COMPLETE).read_text())["world_size"]


def resume(engine, run_dir: Path, universal=None) -> dict | None:
    """Load the newest complete checkpoint of `run_dir` into the engine; return our state.
    `universal(tag_dir) -> dir`: when given, load through DeepSpeed's universal checkpoint
    made by it (rank 0 converts, the others wait), for a run on another number of ranks."""
    tag_dir = latest_complete(run_dir / CHECKPOINTS)
    if tag_dir is None:
        return None
    if universal is not None:
        if dist.get_rank() == 0:
            universal(tag_dir)
        dist.barrier()
        tag_dir = tag_dir.parent / "universal" / tag_dir.name
    path, client_state = engine.load_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {tag_dir}")
    return client_state


def locate(path: str | Path) -> tuple[Path, str]:
    """Accept a run dir, its checkpoints/ dir, or one tag dir; return (checkpoints root, tag)."""
    p = Path(path)
    if (p / CHECKPOINTS).is_dir():
        p = p / CHECKPOINTS
    if _TAG.match(p.name) and (p / COMPLETE).is_file():
        return p.parent, p.name
    newest = latest_complete(p)
    if newest is not None:
        return p, newest.name
    if _TAG.match(p.name) and p.is_dir():
        raise FileNotFoundError(f"{p} is an incomplete checkpoint (a save that did not finish: "
                                f"no {COMPLETE}); use an earlier step_* directory")
    raise FileNotFoundError(
        f"{p} is not a checkpoint: expected a run directory, its {CHECKPOINTS}/ directory "
        f"or a step_* directory holding {COMPLETE}")


def checkpoint_config(root: Path, tag: str) -> RunConfig:
    return load_config(root / tag / RUN_CONFIG)
