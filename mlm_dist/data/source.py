"""A run's shards, found once: `data.shards` (a directory, or a URL: remote.py) and
`data.tokenizer` turned into what training reads, with every check a user can fail on the way.

The pre-flight calls `resolve_shards` once, on every rank and on a launching host that sees the
data; what it returns travels to the loader, so the manifest is read once per process, with the
run's stream settings, and a URL is checked before any process group or job starts.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mlm_dist.config import ConfigError, DataConfig
from mlm_dist.data import remote
from mlm_dist.data.shards import Manifest
from mlm_dist.tokenizer import Tokenizer


@dataclass(frozen=True)
class ShardSource:
    """Shards a run can read: where they are, what they are, what made them."""
    location: str  # an absolute directory, or the URL as given
    manifest: Manifest  # read from `location` and checked (Manifest.load)
    tokenizer: Tokenizer  # data.tokenizer or the manifest's: the one the shards were made with


def resolve_shards(data: DataConfig, required: bool = True) -> ShardSource | None:
    """The shards of `data.shards` and their tokenizer, checked: the manifest readable, the
    tokenizer the shards' own; behind a URL, one shard readable from here and a tokenizer on
    this host. `required=False` (a launching host, which may not mount the ranks' filesystem):
    None when `data.shards` is a directory this host does not have. A URL names the same
    shards from every host, so it is always checked."""
    if not required and not remote.is_remote(data.shards) and not Path(data.shards).is_dir():
        return None
    settings = remote.StreamSettings.of(data)
    manifest = Manifest.load(data.shards, settings)
    if remote.is_remote(data.shards):
        location = data.shards
        # The objects readable with this host's credentials, not just the manifest, and an HTTP
        # server answering range requests (without them no stream could resume).
        shards = manifest.splits.get("train") or [s for split in manifest.splits.values()
                                                  for s in split]
        if shards:
            remote.check_readable(location, shards[0].path, settings)
        # The manifest's tokenizer path is on the host that ran `prepare`.
        if not data.tokenizer and not Path(manifest.tokenizer.path).exists():
            raise ConfigError(f"data.tokenizer: the shards at {remote.redacted(location)} "
                              f"were made with the tokenizer at {manifest.tokenizer.path}, which "
                              "this host does not have; set data.tokenizer to a copy of it "
                              f"(sha256 {manifest.tokenizer.sha256[:12]}…)")
    else:
        location = str(Path(data.shards).resolve())
    tokenizer = Tokenizer.load(data.tokenizer or manifest.tokenizer.path)
    if tokenizer.sha256 != manifest.tokenizer.sha256:
        raise ConfigError(f"data.tokenizer: {tokenizer.path} is not the tokenizer the shards in "
                          f"{data.shards} were made with; point data.tokenizer at that one "
                          "or re-run `mlm-dist prepare`")
    return ShardSource(location, manifest, tokenizer)
