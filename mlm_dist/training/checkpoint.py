"""Checkpoints on top of the DeepSpeed engine that survive crashes, and finding them again.

Layout of a run directory:
    config.yaml                     the resolved config of the run
    metrics.jsonl, tensorboard/     what rank 0 logged
    checkpoints/step_00000100/      one DeepSpeed tag: per-rank ZeRO shards + model states,
                                    run_config.yaml and the tokenizer's files (self-describing),
                                    complete.json (written last: the checkpoint counts)
    checkpoints/latest              tag of the newest complete checkpoint
    checkpoints/universal/step_…/   DeepSpeed's universal form of a tag, made when a run resumes
                                    it on another number of ranks

DeepSpeed writes its files under their final names and, left to itself, points `latest` at a
tag before every rank has finished writing. We do not trust either: every rank writes, all
ranks meet at a barrier, and only then rank 0 writes `complete.json` and atomically moves the
`latest` pointer. A checkpoint without `complete.json` is a crashed save and is never resumed
from; resuming looks for the newest *complete* checkpoint, whatever `latest` says, and removes
the crashed saves first (they can be as large as a whole checkpoint on a disk that filled up).

This module is the layout and its crash-safety; when a run saves and what it restores is the
Checkpointer's (checkpointer.py).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path

import torch.distributed as dist
import torch.nn as nn

from mlm_dist.config import ConfigError, RunConfig, dump_yaml, load_config
from mlm_dist.errors import PathNotFoundError, UserError
from mlm_dist.training import faults

CHECKPOINTS = "checkpoints"
RUN_CONFIG = "run_config.yaml"
COMPLETE = "complete.json"
UNIVERSAL = "universal"
_TAG = re.compile(r"step_(\d{8,})$")


class CheckpointSaveError(UserError, RuntimeError):
    """A save failed (usually a full disk); the message says how much room checkpoints need."""


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


def universal_dir(tag_dir: Path) -> Path:
    """Where DeepSpeed's universal form of the checkpoint `tag_dir` is made and loaded from."""
    return tag_dir.parent / UNIVERSAL / tag_dir.name


def save(engine, run_dir: Path, step: int, *, cfg: RunConfig, tokenizer_files: list[Path],
         client_state: dict, rank: int, keep: int) -> Path:
    """Collective: every rank calls it. Returns the tag directory once it is complete; a rank
    whose part fails raises CheckpointSaveError."""
    root = run_dir / CHECKPOINTS
    tag_dir = root / tag_for(step)
    if rank == 0 and tag_dir.exists():
        # Leftovers of a save that crashed at this very step (or of a rolled-back future).
        shutil.rmtree(tag_dir)
    dist.barrier()
    # A failing rank raises at once rather than joining the next barrier; the launcher then
    # stops the others. A full disk surfaces as OSError or as torch's RuntimeError
    # "enforce fail at inline_container.cc ... unexpected pos", which names neither cause nor fix.
    try:
        engine.save_checkpoint(str(root), tag=tag_dir.name, client_state=client_state,
                               save_latest=False)
        faults.maybe_kill_during_save(step)
        dist.barrier()  # every rank's files are on disk
    except (OSError, RuntimeError) as err:
        if _failed_writing(err):
            raise CheckpointSaveError(_save_failed(tag_dir, rank, keep, err)) from err
        if _lost_peers(err):  # another rank failed (its own message says why) and left
            raise CheckpointSaveError(f"could not save checkpoint {tag_dir}: rank {rank} lost "
                                      "the other ranks during the save; the error of the rank "
                                      "that failed says why") from err
        raise  # neither: a bug, shown whole
    if rank == 0:
        try:
            _complete(tag_dir, step, cfg, tokenizer_files)
        except OSError as err:
            raise CheckpointSaveError(_save_failed(tag_dir, rank, keep, err)) from err
        prune(root, keep)
    dist.barrier()
    return tag_dir


def _failed_writing(err: BaseException) -> bool:
    """An OSError, or torch's serializer failing to write (its RuntimeErrors for a short write:
    "unexpected pos …", "file write failed")."""
    text = str(err)
    return isinstance(err, OSError) or any(
        sign in text for sign in ("unexpected pos", "write failed", "No space left"))


def _lost_peers(err: BaseException) -> bool:
    """A collective that failed because another rank is gone (gloo / NCCL wording)."""
    return any(sign in str(err) for sign in ("Connection closed by peer", "remote worker",
                                               "Connection reset by peer", "NCCL error"))


def _complete(tag_dir: Path, step: int, cfg: RunConfig, tokenizer_files: list[Path]) -> None:
    """Rank 0, once every rank's files are on disk: our files, then the marker, then `latest`."""
    (tag_dir / RUN_CONFIG).write_text(dump_yaml(cfg))
    for f in tokenizer_files:  # tokenizer.model, or a HF tokenizer's files
        shutil.copyfile(f, tag_dir / f.name)
    _write_atomically(tag_dir / COMPLETE, json.dumps(
        {"step": step, "world_size": dist.get_world_size(), "time": time.time()}))
    _write_atomically(tag_dir.parent / "latest", tag_dir.name)


def _save_failed(tag_dir: Path, rank: int, keep: int, err: BaseException) -> str:
    cause = (str(err).strip().splitlines() or [type(err).__name__])[0]
    newest = latest_complete(tag_dir.parent)
    last = (f"the last complete checkpoint, {newest.name}, takes {_human(_disk_bytes(newest))}"
            if newest is not None else "there is no complete checkpoint yet")
    kept = f"now {keep}" if keep else "now 0: all are kept"
    return (f"could not save checkpoint {tag_dir} (rank {rank}: {cause}); {last} and "
            f"{_free_space(tag_dir)} is free on that filesystem. Free space there, set "
            f"checkpoint.keep to keep fewer checkpoints ({kept}), or point out_dir at a larger "
            "disk; resuming removes this incomplete checkpoint")


def _disk_bytes(d: Path) -> int:
    """Space the files under `d` take on disk (what `du` counts), not their apparent size."""
    total = 0
    for parent, _, files in os.walk(d):
        for name in files:
            try:
                st = os.lstat(os.path.join(parent, name))
            except OSError:  # gone meanwhile: a message is no reason to fail again
                continue
            total += getattr(st, "st_blocks", st.st_size // 512) * 512
    return total


def _free_space(path: Path) -> str:
    while not path.exists() and path != path.parent:  # the failed save may not have made it
        path = path.parent
    try:
        return _human(shutil.disk_usage(path).free)
    except OSError:
        return "an unknown amount"


def _human(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000


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


def remove_incomplete(root: Path) -> list[Path]:
    """Delete the crashed saves under `root`: step_* directories without the completion marker.
    Complete checkpoints, symlinks and anything not named step_* are left alone."""
    doomed = [d for _, d, ok in tags(root) if not ok and not d.is_symlink()]
    for d in doomed:
        shutil.rmtree(d)
    if doomed:
        print("removed incomplete checkpoints (saves that did not finish): "
              + ", ".join(str(d) for d in doomed), flush=True)
    return doomed


def saved_world_size(tag_dir: Path) -> int:
    return json.loads((tag_dir / COMPLETE).read_text())["world_size"]


def resume(engine, run_dir: Path, to_universal=None) -> dict | None:
    """Load the newest complete checkpoint of `run_dir` into the engine; return our state.
    `to_universal(tag_dir, out_dir)`: when given, load through DeepSpeed's universal checkpoint
    it makes in universal_dir(tag_dir) (rank 0 converts, the others wait), for a run on
    another number of ranks."""
    if dist.get_rank() == 0:
        remove_incomplete(run_dir / CHECKPOINTS)
    tag_dir = latest_complete(run_dir / CHECKPOINTS)
    if tag_dir is None:
        return None
    if to_universal is not None:
        if dist.get_rank() == 0:
            to_universal(tag_dir, universal_dir(tag_dir))
        dist.barrier()
        tag_dir = universal_dir(tag_dir)
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
        raise PathNotFoundError(f"{p} is an incomplete checkpoint (a save that did not finish: "
                                f"no {COMPLETE}); use an earlier step_* directory")
    raise PathNotFoundError(
        f"{p} is not a checkpoint: expected a run directory, its {CHECKPOINTS}/ directory "
        f"or a step_* directory holding {COMPLETE}")


def checkpoint_config(root: Path, tag: str) -> RunConfig:
    return load_config(root / tag / RUN_CONFIG)


def load_checkpoint(path: str | Path) -> tuple[nn.Module, RunConfig, Path]:
    """A checkpoint on one process, its shards consolidated: (fp32 model of the run's
    objective in eval mode, the run's config, directory holding the tokenizer)."""
    from mlm_dist.engine import consolidated_state_dict  # imports deepspeed: only when needed

    root, tag = locate(path)
    cfg = checkpoint_config(root, tag)
    from mlm_dist.objectives import objective_for

    model = objective_for(cfg).build_model(cfg.model)
    state = consolidated_state_dict(str(root), tag, model)
    state.setdefault("mlm_head.decoder.weight", state["embeddings.tokens.weight"])  # tied
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ConfigError(f"checkpoint {root / tag} does not match the model in its config: "
                          f"missing {missing}, unexpected {unexpected}")
    return model.eval(), cfg, root / tag
