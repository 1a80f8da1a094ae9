"""Checkpoints on top of the DeepSpeed engine, and finding them again.

Layout of a run directory:
    config.yaml                     the resolved config of the run
    tensorboard/                    event files (rank 0)
    checkpoints/latest              tag of the newest checkpoint (written by DeepSpeed)
    checkpoints/step_00000100/      one DeepSpeed tag: per-rank ZeRO shards + model states,
                                    plus run_config.yaml and tokenizer.model so a checkpoint is
                                    self-describing (export and fill-mask need nothing else)
"""

from __future__ import annotations

import shutil
from pathlib import Path

from mlm_dist.config import RunConfig, dump_yaml, load_config

CHECKPOINTS = "checkpoints"
RUN_CONFIG = "run_config.yaml"
TOKENIZER_FILE = "tokenizer.model"


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def save(engine, run_dir: Path, step: int, cfg: RunConfig, tokenizer_path: Path,
         client_state: dict, is_rank0: bool) -> Path:
    """Collective: every rank must call it. Returns the tag directory."""
    root = run_dir / CHECKPOINTS
    tag = tag_for(step)
    engine.save_checkpoint(str(root), tag=tag, client_state=client_state)
    if is_rank0:
        (root / tag / RUN_CONFIG).write_text(dump_yaml(cfg))
        shutil.copyfile(tokenizer_path, root / tag / TOKENIZER_FILE)
    return root / tag


def latest_tag(root: Path) -> str | None:
    pointer = root / "latest"
    return pointer.read_text().strip() if pointer.is_file() else None


def resume(engine, run_dir: Path) -> dict | None:
    """Load the latest checkpoint of `run_dir` into the engine; return our client state."""
    root = run_dir / CHECKPOINTS
    tag = latest_tag(root)
    if tag is None:
        return None
    path, client_state = engine.load_checkpoint(str(root), tag=tag)
    if path is None:
        raise RuntimeError(f"could not load checkpoint {root / tag}")
    return client_state


def locate(path: str | Path) -> tuple[Path, str]:
    """Accept a run dir, its checkpoints/ dir, or one tag dir; return (checkpoints root, tag)."""
    p = Path(path)
    if (p / CHECKPOINTS).is_dir():
        p = p / CHECKPOINTS
    if (p / "latest").is_file():
        return p, latest_tag(p)
    if (p / RUN_CONFIG).is_file():
        return p.parent, p.name
    raise FileNotFoundError(
        f"{p} is not a checkpoint: expected a run directory, its {CHECKPOINTS}/ directory "
        f"(with a 'latest' file) or a step_* directory holding {RUN_CONFIG}")


def checkpoint_config(root: Path, tag: str) -> RunConfig:
    return load_config(root / tag / RUN_CONFIG)
