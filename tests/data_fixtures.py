"""Shard sets with chosen sizes, written with the real WebDataset TarWriter and our manifest."""

from __future__ import annotations

from pathlib import Path

import webdataset as wds

from mlm_dist.data.shards import (Manifest, ShardInfo, TokenizerInfo, document_key,
                                  encode_document, file_sha256, token_dtype)


def write_shards(out: Path, documents: list[list[list[int]]], sizes: list[int],
                 tokenizer) -> Path:
    """Write `documents` (lists of sentences of ids) into train shards of the given sizes."""
    out.mkdir(parents=True)
    dtype = token_dtype(tokenizer.vocab_size)
    infos, start = [], 0
    for n, size in enumerate(sizes):
        name = f"train-{n:06d}.tar"
        docs = [documents[(start + i) % len(documents)] for i in range(size)]
        with wds.TarWriter(str(out / name), encoder=False, mtime=0) as tar:
            for i, doc in enumerate(docs):
                starts = [tokenizer.vocabulary.word_start[s] for s in doc]
                tar.write({"__key__": document_key(start + i),
                           **encode_document(doc, starts, dtype)})
        start += size
        infos.append(ShardInfo(path=name, documents=size, sentences=sum(len(d) for d in docs),
                               tokens=sum(len(s) for d in docs for s in d),
                               sha256=file_sha256(out / name),
                               bytes=(out / name).stat().st_size))
    Manifest(tokenizer=TokenizerInfo(sha256=tokenizer.sha256, vocab_size=tokenizer.vocab_size,
                                     path=str(tokenizer.path.parent.resolve())),
             dtype=dtype.name, splits={"train": infos, "valid": infos[:1]}).save(out)
    return out


def corpus_documents(tiny_corpus, tokenizer) -> list[list[list[int]]]:
    from mlm_dist.data.corpus import iter_documents
    return [[tokenizer.encode(s) for s in doc] for doc in iter_documents([tiny_corpus])]
