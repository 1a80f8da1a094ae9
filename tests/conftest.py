"""Shared fixtures: a tiny real-English corpus, a tokenizer trained on it, and shards made from both.

They are session-scoped (built once, in well under a second) and shared by many tests, so tests
must treat them as read-only: copy before modifying.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from mlm_dist.data.corpus import iter_documents
from mlm_dist.demo.stdlib_corpus import write_stdlib_corpus
from mlm_dist.data.prepare import prepare_shards
from mlm_dist.tokenizer import Tokenizer, sentences_of, train_tokenizer

TINY_DOCUMENTS = 150  # ~450 sentences of stdlib docstrings
TINY_VOCAB_SIZE = 600


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory):
    """Path of a .txt corpus (one sentence a line, blank line between documents)."""
    path = tmp_path_factory.mktemp("corpus") / "tiny.txt"
    write_stdlib_corpus(path, max_documents=TINY_DOCUMENTS)
    return path


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory, tiny_corpus) -> Tokenizer:
    """A Tokenizer trained on tiny_corpus; its directory is `tiny_tokenizer.path.parent`."""
    out = tmp_path_factory.mktemp("tokenizer")
    return train_tokenizer(sentences_of(iter_documents([tiny_corpus])), out,
                           vocab_size=TINY_VOCAB_SIZE, seed=0)


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory, tiny_corpus, tiny_tokenizer):
    """Directory of shards of tiny_corpus: several train shards, one or more valid ones."""
    out = tmp_path_factory.mktemp("shards") / "shards"
    prepare_shards([tiny_corpus], tiny_tokenizer.path.parent, out,
                   docs_per_shard=40, valid_fraction=0.1, seed=0)
    return out


def _mapped_shm() -> set[str]:
    names = set()
    for maps in Path("/proc").glob("[0-9]*/maps"):
        try:
            names.update(line.rsplit("/", 1)[-1].strip() for line in maps.read_text().splitlines()
                         if "/dev/shm/deepspeed_allreduce_buffer_" in line)
        except OSError:
            pass
    return names


@pytest.fixture(autouse=True)
def _remove_deepspeed_shm_buffers():
    """DeepSpeed's CPU all-reduce never unlinks its /dev/shm segments (~66 MiB per rank and
    launch); over the suite they would fill memory. After each test, drop the ones no live
    process maps and that are more than a minute old: a launch of another pytest session
    creates its segment a moment before its ranks map it."""
    yield
    in_use = _mapped_shm()
    for path in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_{os.getuid()}_*"):
        try:
            if path.name not in in_use and time.time() - path.stat().st_mtime > 60:
                path.unlink()
        except OSError:
            pass
