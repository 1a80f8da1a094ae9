import io
import json
import shutil
import tarfile

import numpy as np
import pytest
import webdataset as wds

from mlm_dist.data.corpus import iter_documents, split_sentences
from mlm_dist.data.demo_corpus import write_stdlib_corpus
from mlm_dist.data.prepare import assign_splits, prepare_shards
from mlm_dist.data.shards import (MANIFEST_FILE, Manifest, decode_document, encode_document,
                                  file_sha256, npy_bytes, shard_paths, token_dtype)


def read_samples(paths):
    """{key: [sentence ids, ...]} of every sample in the given shards, read with webdataset."""
    samples = {}
    for sample in wds.WebDataset(paths, shardshuffle=False):
        samples[sample["__key__"]] = [s.tolist() for s in decode_document(sample)]
    return samples


def expected_documents(tokenizer, documents):
    return [[tokenizer.encode(s) for s in doc] for doc in documents]


def all_samples(shard_dir):
    return {**read_samples(shard_paths(shard_dir, "train")),
            **read_samples(shard_paths(shard_dir, "valid"))}


def test_txt_round_trip(tiny_shards, tiny_corpus, tiny_tokenizer):
    expected = expected_documents(tiny_tokenizer, iter_documents([tiny_corpus]))
    samples = all_samples(tiny_shards)
    assert sorted(samples) == [f"{i:09d}" for i in range(len(expected))]
    for key, sentences in samples.items():
        assert sentences == expected[int(key)], key


def test_jsonl_round_trip_drops_empty_documents(tmp_path, tiny_tokenizer):
    texts = ["The first document is short. It has two sentences.",
             "",
             "   ",
             "Another document follows here! Does it work? Yes.\nA new paragraph starts here."]
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    manifest = prepare_shards([corpus], tiny_tokenizer.path.parent, tmp_path / "shards",
                              valid_fraction=0.0)
    expected = expected_documents(tiny_tokenizer, [split_sentences(t) for t in texts if t.strip()])
    assert manifest.totals("valid")["documents"] == 0
    assert read_samples(shard_paths(tmp_path / "shards", "train")) == {
        f"{i:09d}": doc for i, doc in enumerate(expected)}


def test_manifest_counts_and_sha256_match_the_tars(tiny_shards):
    manifest = Manifest.load(tiny_shards)
    assert len(manifest.splits["train"]) > 1, "fixture should span several shards"
    for split, shards in manifest.splits.items():
        for shard in shards:
            path = tiny_shards / shard.path
            counts = {"documents": 0, "sentences": 0, "tokens": 0}
            # Read with plain tarfile: the check should not trust our own reader.
            with tarfile.open(path) as tar:
                for member in tar.getmembers():
                    array = np.load(io.BytesIO(tar.extractfile(member).read()))
                    if member.name.endswith(".lengths.npy"):
                        counts["documents"] += 1
                        counts["sentences"] += array.size
                    else:
                        counts["tokens"] += array.size
            assert counts == {k: getattr(shard, k) for k in counts}, shard.path
            assert shard.sha256 == file_sha256(path)
            assert shard.bytes == path.stat().st_size


def test_small_vocab_is_stored_as_uint16(tiny_shards, tiny_tokenizer):
    manifest = Manifest.load(tiny_shards)
    assert manifest.dtype == "uint16"
    assert manifest.tokenizer.vocab_size == tiny_tokenizer.vocab_size
    assert manifest.tokenizer.sha256 == tiny_tokenizer.sha256
    assert manifest.tokenizer.path == str(tiny_tokenizer.path.parent.resolve())
    sample = next(iter(wds.WebDataset(shard_paths(tiny_shards, "train"), shardshuffle=False)))
    assert np.load(io.BytesIO(sample["tokens.npy"])).dtype == np.uint16
    assert np.load(io.BytesIO(sample["lengths.npy"])).dtype == np.int32
    assert token_dtype(65536) == np.uint16 and token_dtype(65537) == np.int32


def test_valid_split_is_non_empty_and_disjoint_from_train(tiny_shards):
    train = read_samples(shard_paths(tiny_shards, "train"))
    valid = read_samples(shard_paths(tiny_shards, "valid"))
    assert valid and train
    assert not set(train) & set(valid)


def test_split_assignment_is_seeded_and_guarantees_both_splits():
    docs = [[[i + 5]] for i in range(50)]
    first = list(assign_splits(docs, 0.2, seed=1))
    assert first == list(assign_splits(docs, 0.2, seed=1))
    assert first != list(assign_splits(docs, 0.2, seed=2))
    assert sorted(index for _, index, _ in first) == list(range(50))
    # Draws that never pick valid still leave one document for it; one document stays in train.
    assert [split for split, _, _ in assign_splits(docs[:2], 1e-9, seed=0)] == ["train", "valid"]
    assert [split for split, _, _ in assign_splits(docs[:1], 0.99, seed=0)] == ["train"]
    assert {split for split, _, _ in assign_splits(docs, 0.0, seed=0)} == {"train"}


def test_prepare_is_deterministic(tmp_path, tiny_shards, tiny_corpus, tiny_tokenizer):
    again = prepare_shards([tiny_corpus], tiny_tokenizer.path.parent, tmp_path / "again",
                           docs_per_shard=40, valid_fraction=0.1, seed=0)
    assert again == Manifest.load(tiny_shards)


def test_refuses_to_overwrite_existing_shards(tmp_path, tiny_corpus, tiny_tokenizer):
    for existing in (MANIFEST_FILE, "old-000000.tar"):
        out = tmp_path / existing.replace(".", "_")
        out.mkdir()
        (out / existing).write_bytes(b"precious")
        with pytest.raises(FileExistsError, match="already holds shards"):
            prepare_shards([tiny_corpus], tiny_tokenizer.path.parent, out)
        assert sorted(p.name for p in out.iterdir()) == [existing]
        assert (out / existing).read_bytes() == b"precious"


def test_failed_run_leaves_nothing_behind(tmp_path, tiny_tokenizer):
    corpus = tmp_path / "broken.jsonl"
    corpus.write_text('{"text": "One fine document. It has two sentences."}\n' * 5 + "not json\n")
    out = tmp_path / "shards"
    with pytest.raises(ValueError, match="broken.jsonl:6"):
        prepare_shards([corpus], tiny_tokenizer.path.parent, out, docs_per_shard=1)
    assert list(out.iterdir()) == []


def test_corpus_without_text_is_refused(tmp_path, tiny_tokenizer):
    corpus = tmp_path / "empty.txt"
    corpus.write_text("\n\n   \n")
    with pytest.raises(ValueError, match="no document in .*empty.txt has any text"):
        prepare_shards([corpus], tiny_tokenizer.path.parent, tmp_path / "shards")
    assert list((tmp_path / "shards").iterdir()) == []


def test_bad_arguments_fail_before_any_work(tmp_path, tiny_corpus, tiny_tokenizer):
    tok = tiny_tokenizer.path.parent
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        prepare_shards([tiny_corpus, tmp_path / "missing.txt"], tok, tmp_path / "a")
    with pytest.raises(ValueError, match="valid_fraction"):
        prepare_shards([tiny_corpus], tok, tmp_path / "b", valid_fraction=1.0)
    with pytest.raises(ValueError, match="docs_per_shard"):
        prepare_shards([tiny_corpus], tok, tmp_path / "c", docs_per_shard=0)
    with pytest.raises(FileNotFoundError, match="mlm-dist tokenizer train"):
        prepare_shards([tiny_corpus], tmp_path / "no-tokenizer", tmp_path / "d")
    assert not any((tmp_path / name).exists() for name in "abcd")


def write_manifest_with_shard_path(directory, source_dir, shard_path):
    data = json.loads((source_dir / MANIFEST_FILE).read_text())
    data["splits"]["train"][0]["path"] = shard_path
    directory.mkdir()
    (directory / MANIFEST_FILE).write_text(json.dumps(data))


@pytest.mark.parametrize("bad_path", ["../x.tar", "a/../../x.tar", "/etc/x.tar", "C:\\x.tar",
                                      "..\\x.tar", ""])
def test_manifest_rejects_paths_outside_the_directory(tmp_path, tiny_shards, bad_path):
    write_manifest_with_shard_path(tmp_path / "m", tiny_shards, bad_path)
    with pytest.raises(ValueError, match="not a relative path inside the shard directory"):
        Manifest.load(tmp_path / "m")


def test_missing_or_truncated_shard_is_named(tmp_path, tiny_shards):
    copy = tmp_path / "copy"
    shutil.copytree(tiny_shards, copy)
    (copy / "train-000001.tar").unlink()
    with pytest.raises(FileNotFoundError, match="train-000001.tar.*missing"):
        shard_paths(copy, "train")
    shutil.copy(tiny_shards / "train-000001.tar", copy)
    with open(copy / "valid-000000.tar", "r+b") as f:
        f.truncate(1024)
    with pytest.raises(ValueError, match="valid-000000.tar is 1024 bytes.*truncated"):
        shard_paths(copy, "valid")
    assert shard_paths(copy, "train") == [str(copy.resolve() / s.path)
                                          for s in Manifest.load(copy).splits["train"]]
    with pytest.raises(ValueError, match="no split 'test'.*train, valid"):
        shard_paths(copy, "test")


def test_manifest_load_errors_name_the_fix(tmp_path, tiny_shards):
    with pytest.raises(FileNotFoundError, match="does not exist.*mlm-dist prepare"):
        Manifest.load(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="no manifest.json.*mlm-dist prepare"):
        Manifest.load(tmp_path)
    good = json.loads((tiny_shards / MANIFEST_FILE).read_text())
    broken = {
        "not JSON": "{",
        "missing key 'dtype'": {k: v for k, v in good.items() if k != "dtype"},
        "format 2": {**good, "format": 2},
        "documents should be int": {**good, "splits": {"train": [
            {**good["splits"]["train"][0], "documents": "7"}]}},
        "cannot hold": {**good, "tokenizer": {**good["tokenizer"], "vocab_size": 70000}},
    }
    for i, (message, content) in enumerate(broken.items()):
        directory = tmp_path / f"broken{i}"
        directory.mkdir()
        text = content if isinstance(content, str) else json.dumps(content)
        (directory / MANIFEST_FILE).write_text(text)
        with pytest.raises(ValueError, match=f"malformed.*{message}.*mlm-dist prepare"):
            Manifest.load(directory)


def test_manifest_save_never_overwrites(tmp_path, tiny_shards):
    manifest = Manifest.load(tiny_shards)
    manifest.save(tmp_path)
    assert Manifest.load(tmp_path) == manifest
    with pytest.raises(FileExistsError):
        manifest.save(tmp_path)


def test_decode_checks_lengths_against_tokens():
    sample = {"__key__": "000000007", **encode_document([[5, 6, 7], [8]], np.uint16)}
    assert [s.tolist() for s in decode_document(sample)] == [[5, 6, 7], [8]]
    assert all(s.dtype == np.int64 for s in decode_document(sample))
    sample["lengths.npy"] = npy_bytes(np.array([3, 2], dtype=np.int32))
    with pytest.raises(ValueError, match="'000000007'.*add up to 5 but there are 4 tokens"):
        decode_document(sample)
    sample["tokens.npy"] = sample["tokens.npy"][:-2]
    with pytest.raises(ValueError, match="'000000007'.*tokens.npy is not a readable"):
        decode_document(sample)
    with pytest.raises(ValueError, match="'000000008'.*no 'lengths.npy'"):
        decode_document({"__key__": "000000008", "tokens.npy": b""})


def test_decode_reads_npy_from_other_writers():
    # Big-endian data misses the fast header path and must still decode correctly.
    sample = {"__key__": "x",
              "tokens.npy": npy_bytes(np.array([9, 10, 11], dtype=">u2")),
              "lengths.npy": npy_bytes(np.array([1, 2], dtype=">i8"))}
    assert [s.tolist() for s in decode_document(sample)] == [[9], [10, 11]]


def test_stdlib_corpus_is_deterministic_real_text(tmp_path):
    a = write_stdlib_corpus(tmp_path / "a.txt", max_documents=200)
    b = write_stdlib_corpus(tmp_path / "b.txt", max_documents=200)
    assert (tmp_path / "a.txt").read_bytes() == (tmp_path / "b.txt").read_bytes()
    assert a == b
    documents = list(iter_documents([tmp_path / "a.txt"]))
    assert a["documents"] == len(documents) == 200
    assert a["sentences"] == sum(map(len, documents))
    assert a["bytes"] == (tmp_path / "a.txt").stat().st_size
    assert all(len(doc) >= 2 for doc in documents)
    text = (tmp_path / "a.txt").read_text()
    assert ">>>" not in text and "----" not in text and "====" not in text
    with pytest.raises(FileExistsError):
        write_stdlib_corpus(tmp_path / "a.txt", max_documents=1)
    assert not list(tmp_path.glob("*.tmp"))
