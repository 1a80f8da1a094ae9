import gzip
import io
import json
import shutil
import tarfile

import numpy as np
import pytest
import webdataset as wds

from corpus_files import cirrus_dump, compressed, write_parquet
from mlm_dist.data.corpus import iter_documents, split_sentences
from mlm_dist.demo.stdlib_corpus import write_stdlib_corpus
from mlm_dist.cli import main
from mlm_dist.data import encoding
from mlm_dist.data.encoding import EncodedDocument
from mlm_dist.data.partitions import merge_partitions
from mlm_dist.data.prepare import assign_splits, prepare_shards, shuffled_documents, split_of
from mlm_dist.data.shards import (MANIFEST_FILE, Manifest, decode_document, document_key,
                                  encode_document, encode_sample, file_sha256, npy_bytes,
                                  ShardFormatError, shard_paths, tar_end, token_dtype, token_ids,
                                  word_starts)


def read_samples(paths):
    """{key: [sentence ids, ...]} of every sample in the given shards, read with webdataset."""
    samples = {}
    for sample in wds.WebDataset(paths, shardshuffle=False):
        samples[sample["__key__"]] = [token_ids(s).tolist() for s in decode_document(sample)]
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
                    elif member.name.endswith(".tokens.npy"):
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
    docs = [EncodedDocument(file_index=i % 3, index=i // 3, fields={}, sentences=1, tokens=1)
            for i in range(300)]
    draws = [split_of(d, 1, 0.2) for d in docs]
    assert draws == [split_of(d, 1, 0.2) for d in docs]
    assert draws != [split_of(d, 2, 0.2) for d in docs]
    assert 30 < draws.count("valid") < 90
    # Mixed draws pass through unchanged.
    assert list(assign_splits(zip(draws, docs), 0.2)) == list(zip(draws, docs))
    # Draws that never pick valid still leave one document for it; one document stays in train.
    assert [s for s, _ in assign_splits([("train", 1), ("train", 2)], 1e-9)] == ["train", "valid"]
    assert list(assign_splits([("valid", 1)], 0.99)) == [("train", 1)]
    assert list(assign_splits([("valid", 1), ("valid", 2), ("train", 3)], 0.99)) == [
        ("valid", 1), ("valid", 2), ("train", 3)]
    assert list(assign_splits([("valid", 1), ("valid", 2)], 0.99)) == [("valid", 1), ("train", 2)]
    assert {s for s, _ in assign_splits([("train", i) for i in range(5)], 0.0)} == {"train"}
    assert list(assign_splits([], 0.5)) == []


def test_shuffle_buffer_is_a_seeded_permutation_within_its_window():
    import random

    docs = [("train", (i, EncodedDocument(0, i, {"ids.npy": b"x" * 10}, 1, 5))) for i in range(500)]
    order = [i for _, (i, _) in shuffled_documents(docs, 100, random.Random(3))]
    assert sorted(order) == list(range(500))
    assert order == [i for _, (i, _) in shuffled_documents(docs, 100, random.Random(3))]
    assert order != [i for _, (i, _) in shuffled_documents(docs, 100, random.Random(4))]
    # 100 bytes hold 10 documents: none leaves more than 10 places ahead of its turn.
    assert max(i - j for j, i in enumerate(order)) <= 10
    assert order != sorted(order)
    # A buffer larger than the corpus shuffles it whole; 0 keeps the corpus order.
    whole = [i for _, (i, _) in shuffled_documents(docs, 10**9, random.Random(3))]
    assert np.corrcoef(whole, range(500))[0, 1] < 0.2
    assert [i for _, (i, _) in shuffled_documents(docs, 0, random.Random(3))] == list(range(500))


def test_shards_sample_the_whole_of_a_corpus_given_in_order(tmp_path, tiny_tokenizer):
    """A corpus of two halves (say, two sources one after the other) must not give shards
    that each hold one half: the loader reads a shard at a time, so its batches would too."""
    corpus = tmp_path / "ordered.txt"
    halves = (["The cat sat on the mat.", "It was a sunny day."],
              ["Numbers are added by the machine.", "The result is printed."])
    corpus.write_text("\n\n".join("\n".join(halves[d >= 100]) for d in range(200)) + "\n")
    first_half = tiny_tokenizer.encode(halves[0][0])

    def halves_per_shard(out, **options):
        prepare_shards([corpus], tiny_tokenizer.path.parent, out, docs_per_shard=25,
                       valid_fraction=0.0, **options)
        return [{sentences[0] == first_half for sentences in read_samples([str(path)]).values()}
                for path in shard_paths(out, "train")]

    assert all(len(kinds) == 2 for kinds in halves_per_shard(tmp_path / "shuffled"))
    manifest = Manifest.load(tmp_path / "shuffled")
    assert manifest.prepare.shuffle_mb == 512 and manifest.totals("train")["documents"] == 200
    in_order = halves_per_shard(tmp_path / "in-order", shuffle_mb=0)
    assert in_order == [{True}] * 4 + [{False}] * 4


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
    with pytest.raises(ValueError, match="--shuffle-mb"):
        prepare_shards([tiny_corpus], tok, tmp_path / "c", shuffle_mb=-1)
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


@pytest.mark.parametrize("version, hint", [(1, "format 2 stores word boundaries"),
                                           (3, "the mlm_dist version that wrote them")])
def test_shards_of_another_format_name_the_fix(tmp_path, tiny_shards, version, hint):
    old = tmp_path / "old"
    shutil.copytree(tiny_shards, old)
    manifest = json.loads((old / MANIFEST_FILE).read_text())
    (old / MANIFEST_FILE).write_text(json.dumps({**manifest, "format": version}))
    with pytest.raises(ShardFormatError, match=f"shard format {version}, and this mlm_dist reads "
                       f"format 2.*{hint}"):
        Manifest.load(old)
    with pytest.raises(ShardFormatError, match="re-run `mlm-dist prepare`"):
        Manifest.load(old)


def test_manifest_save_never_overwrites(tmp_path, tiny_shards):
    manifest = Manifest.load(tiny_shards)
    manifest.save(tmp_path)
    assert Manifest.load(tmp_path) == manifest
    with pytest.raises(FileExistsError):
        manifest.save(tmp_path)


def test_decode_checks_lengths_against_tokens():
    sample = {"__key__": "000000007",
              **encode_document([[5, 6, 7], [8]], [[1, 0, 1], [0]], np.uint16)}
    assert [token_ids(s).tolist() for s in decode_document(sample)] == [[5, 6, 7], [8]]
    assert [word_starts(s).tolist() for s in decode_document(sample)] == [[1, 0, 1], [0]]
    assert all(s.dtype == np.int64 for s in decode_document(sample))
    sample["lengths.npy"] = npy_bytes(np.array([3, 2], dtype=np.int32))
    with pytest.raises(ValueError, match="'000000007'.*add up to 5 but there are 4 tokens"):
        decode_document(sample)
    sample["tokens.npy"] = sample["tokens.npy"][:-2]
    with pytest.raises(ValueError, match="'000000007'.*tokens.npy is not a readable"):
        decode_document(sample)
    with pytest.raises(ValueError, match="'000000008'.*no 'lengths.npy'"):
        decode_document({"__key__": "000000008", "tokens.npy": b""})
    sample = {"__key__": "000000009", **encode_document([[5, 6]], [[1, 0]], np.uint16)}
    sample["starts.npy"] = npy_bytes(np.array([1], dtype=np.uint8))
    with pytest.raises(ValueError, match="'000000009'.*starts.npy has 1 flags for 2 tokens"):
        decode_document(sample)


def test_decode_reads_npy_from_other_writers():
    # Big-endian data misses the fast header path and must still decode correctly.
    sample = {"__key__": "x",
              "tokens.npy": npy_bytes(np.array([9, 10, 11], dtype=">u2")),
              "lengths.npy": npy_bytes(np.array([1, 2], dtype=">i8")),
              "starts.npy": npy_bytes(np.array([1, 1, 0], dtype=">u2"))}
    assert [token_ids(s).tolist() for s in decode_document(sample)] == [[9], [10, 11]]


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


# ----------------------------------------------------------------------------- inputs, workers

# Every format `prepare` reads, each written by its own library (tests/corpus_files.py); file k
# of write_corpus_files has kind k % len(CORPUS_KINDS).
CORPUS_KINDS = ("txt", "jsonl", "txt.gz", "jsonl.gz", "parquet", "jsonl.zst", "txt.zst",
                "cirrussearch-content.json.bz2")


def write_corpus_files(directory, corpus, files=5):
    """tiny_corpus's documents dealt over `files` files of the kinds of CORPUS_KINDS."""
    documents = list(iter_documents([corpus]))
    directory.mkdir()
    for k in range(files):
        part = documents[k::files]
        kind = CORPUS_KINDS[k % len(CORPUS_KINDS)]
        path = directory / f"part{k}.{kind}"
        texts = [" ".join(doc) for doc in part]
        if kind == "parquet":
            write_parquet(path, {"id": list(range(len(texts))), "text": texts}, row_group_size=7)
            continue
        if kind.startswith("cirrussearch"):
            data = cirrus_dump([{"text": text} for text in texts])
        elif "json" in kind:
            data = "".join(json.dumps({"text": text}) + "\n" for text in texts).encode()
        else:
            data = "".join("\n".join(doc) + "\n\n" for doc in part).encode()
        path.write_bytes(compressed(kind, data))
    return directory


def shard_bytes(directory):
    return {p.name: p.read_bytes() for p in sorted(directory.glob("*.tar"))}


def test_gz_input_gives_the_same_shards_as_plain(tmp_path, tiny_shards, tiny_corpus, tiny_tokenizer):
    gz = tmp_path / "tiny.txt.gz"
    gz.write_bytes(gzip.compress(tiny_corpus.read_bytes()))
    prepare_shards([gz], tiny_tokenizer.path.parent, tmp_path / "shards",
                   docs_per_shard=40, valid_fraction=0.1, seed=0)
    assert shard_bytes(tmp_path / "shards") == shard_bytes(tiny_shards)


def test_invalid_utf8_is_counted_reported_and_recorded(tmp_path, capsys, tiny_tokenizer):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "x.txt").write_bytes(b"caf\xe9 ok.\nAnother \xff line.\n\nSecond document here.\n")
    (corpus / "y.txt").write_text("A clean document.\nWith two lines.\n")
    main(["prepare", "--input", str(corpus), "--tokenizer", str(tiny_tokenizer.path.parent),
          "--out", str(tmp_path / "shards"), "--workers", "1", "--quiet"])
    out, err = capsys.readouterr()
    assert f"{corpus / 'x.txt'}: 2 invalid UTF-8 sequences replaced" in err
    assert "y.txt" not in err
    assert "train: 1 shards" in out and "2 sequences replaced in 1 files" in out
    manifest = Manifest.load(tmp_path / "shards")
    assert manifest.totals("train")["documents"] + manifest.totals("valid")["documents"] == 3
    info = manifest.prepare
    assert (info.files, info.invalid_utf8, info.invalid_utf8_files) == (2, 2, 1)


def test_one_and_two_workers_write_identical_shards(tmp_path, monkeypatch, tiny_corpus, tiny_tokenizer):
    # Small batches, so that many are in flight at once and order really is at stake.
    monkeypatch.setattr(encoding, "SENTENCES_PER_BATCH", 16)
    inputs = [write_corpus_files(tmp_path / "corpus", tiny_corpus, files=len(CORPUS_KINDS))]
    runs = {n: prepare_shards(inputs, tiny_tokenizer.path.parent, tmp_path / f"w{n}",
                              docs_per_shard=20, valid_fraction=0.1, workers=n) for n in (1, 2)}
    assert runs[1] == runs[2]
    assert len(runs[1].splits["train"]) > 3
    # Every document of every kind of file reached the shards.
    assert sum(runs[1].totals(split)["documents"] for split in runs[1].splits) == len(
        list(iter_documents([tiny_corpus])))
    assert shard_bytes(tmp_path / "w1") == shard_bytes(tmp_path / "w2")
    assert [s.sha256 for s in runs[2].splits["train"]] == [
        file_sha256(tmp_path / "w2" / s.path) for s in runs[2].splits["train"]]


def test_shard_bytes_are_what_webdataset_writes():
    buffer = io.BytesIO()
    ours = b""
    with wds.TarWriter(buffer, encoder=False, mtime=0) as tar:
        for i, doc in enumerate([[[5, 6, 7], [8]], [list(range(5, 700))], [[9]] * 300]):
            fields = encode_document(doc, [[i % 2 for i in s] for s in doc], np.uint16)
            tar.write({"__key__": document_key(i, partition=3), **fields})
            ours += encode_sample(document_key(i, partition=3), fields)
    assert ours + tar_end(len(ours)) == buffer.getvalue()
    for dtype in ("uint16", "int32", "uint8", "int64"):
        for n in (0, 1, 7, 1000):
            array = np.arange(n, dtype=dtype)
            reference = io.BytesIO()
            np.save(reference, array)
            assert npy_bytes(array) == reference.getvalue(), (dtype, n)


# ----------------------------------------------------------------------------- partitions

def prepare_partition(inputs, tokenizer, out, index, count=2):
    return prepare_shards(inputs, tokenizer.path.parent, out, docs_per_shard=20,
                          valid_fraction=0.1, num_partitions=count, partition_index=index)


def test_partitions_merge_into_what_one_run_makes(tmp_path, tiny_corpus, tiny_tokenizer):
    inputs = [str(write_corpus_files(tmp_path / "corpus", tiny_corpus) / "part*")]
    out = tmp_path / "shards"
    parts = [prepare_partition(inputs, tiny_tokenizer, out, i) for i in (1, 0)]
    assert [p.prepare.files for p in parts] == [2, 3]  # file k goes to partition k % 2
    assert sorted(p.name for p in out.glob("manifest*")) == [
        "manifest.p00000-of-00002.json", "manifest.p00001-of-00002.json"]
    assert all(p.name.startswith(("train-p0000", "valid-p0000")) for p in out.glob("*.tar"))
    with pytest.raises(FileNotFoundError, match="partial manifests.*prepare --merge"):
        Manifest.load(out)  # a loader never sees half a partitioned run

    main(["prepare", "--merge", str(out)])
    merged = Manifest.load(out)
    whole = prepare_shards(inputs, tiny_tokenizer.path.parent, tmp_path / "whole",
                           docs_per_shard=20, valid_fraction=0.1)
    samples, whole_samples = all_samples(out), all_samples(tmp_path / "whole")
    assert len(samples) == sum(merged.totals(s)["documents"] for s in merged.splits)
    assert all(key.startswith(("p00000-", "p00001-")) for key in samples)
    assert sorted(map(str, samples.values())) == sorted(map(str, whole_samples.values()))
    # A document's split is drawn from its identity, not its position in a partition, so the
    # splits agree too (a partition would only deviate if one of its splits drew nothing).
    for split in ("train", "valid"):
        assert {k: v for k, v in merged.totals(split).items() if k != "shards"} == {
            k: v for k, v in whole.totals(split).items() if k != "shards"}
    assert (merged.prepare.files, merged.prepare.num_partitions, merged.prepare.partition) == (5, 2, None)
    assert merged.prepare.inputs_sha256 == whole.prepare.inputs_sha256
    with pytest.raises(FileExistsError, match="merged already"):
        merge_partitions(out)


def test_merge_refuses_missing_mismatched_or_escaping_partitions(tmp_path, tiny_corpus, tiny_tokenizer):
    inputs = [write_corpus_files(tmp_path / "corpus", tiny_corpus)]
    out = tmp_path / "shards"
    prepare_partition(inputs, tiny_tokenizer, out, 0)
    with pytest.raises(FileNotFoundError, match=r"1 of 2 partitions are missing "
                                                r"\(manifest.p00001-of-00002.json\).*--partition-index 1"):
        merge_partitions(out)
    prepare_partition(inputs, tiny_tokenizer, out, 1)
    partial = out / "manifest.p00001-of-00002.json"
    original = partial.read_text()
    data = json.loads(original)
    data["tokenizer"]["sha256"] = "0" * 64
    partial.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="differ in tokenizer sha256.*same --tokenizer"):
        merge_partitions(out)
    data = json.loads(original)
    data["splits"]["train"][0]["path"] = "../elsewhere.tar"
    partial.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="not a relative path inside the shard directory"):
        merge_partitions(out)
    assert not (out / MANIFEST_FILE).exists()
    partial.write_text(original)
    assert merge_partitions(out) == Manifest.load(out)


def test_partition_refuses_only_its_own_outputs(tmp_path, tiny_corpus, tiny_tokenizer):
    inputs = [write_corpus_files(tmp_path / "corpus", tiny_corpus, files=3)]
    out = tmp_path / "shards"
    prepare_partition(inputs, tiny_tokenizer, out, 0, count=3)
    before = shard_bytes(out)
    with pytest.raises(FileExistsError, match="partition 0 of 3 is already done"):
        prepare_partition(inputs, tiny_tokenizer, out, 0, count=3)
    (out / "train-p00001-000000.tar").write_bytes(b"left by a killed job")
    with pytest.raises(FileExistsError, match=r"shards of partition 1 \(train-p00001-000000.tar\) "
                                              r"but no manifest.p00001-of-00003.json.*Remove them"):
        prepare_partition(inputs, tiny_tokenizer, out, 1, count=3)
    (out / "train-p00001-000000.tar").unlink()
    with pytest.raises(FileExistsError, match="--num-partitions 3, not 2"):
        prepare_partition(inputs, tiny_tokenizer, out, 1, count=2)
    with pytest.raises(FileExistsError, match="already holds shards"):
        prepare_shards(inputs, tiny_tokenizer.path.parent, out)
    prepare_partition(inputs, tiny_tokenizer, out, 2, count=3)  # another partition is welcome
    assert {k: v for k, v in shard_bytes(out).items() if k in before} == before
    with pytest.raises(ValueError, match="--num-partitions 4 is more than the 3 input files"):
        prepare_partition(inputs, tiny_tokenizer, tmp_path / "x", 0, count=4)
    with pytest.raises(ValueError, match=r"--partition-index must be in 0..2"):
        prepare_partition(inputs, tiny_tokenizer, tmp_path / "x", 3, count=3)
    assert not (tmp_path / "x").exists()


# ----------------------------------------------------------------------------- verify

def verify(directory, capsys, *options):
    """(exit code, stdout) of `mlm-dist prepare --verify directory`."""
    try:
        main(["prepare", "--verify", str(directory), "--quiet", *options])
        code = 0
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().out


def test_verify_passes_good_shards(tiny_shards, capsys):
    code, out = verify(tiny_shards, capsys, "--workers", "2")
    manifest = Manifest.load(tiny_shards)
    documents = sum(manifest.totals(s)["documents"] for s in manifest.splits)
    assert code == 0
    assert f"all {sum(map(len, manifest.splits.values()))} shards" in out
    assert f"({documents} documents" in out


def test_verify_reports_every_damaged_shard(tmp_path, tiny_shards, capsys):
    copy = tmp_path / "copy"
    shutil.copytree(tiny_shards, copy)
    with open(copy / "train-000000.tar", "r+b") as f:
        f.truncate(5000)
    with tarfile.open(copy / "train-000001.tar") as tar:
        tokens = next(m for m in tar.getmembers() if m.name.endswith(".tokens.npy"))
    data = bytearray((copy / "train-000001.tar").read_bytes())
    data[tokens.offset_data + tokens.size - 1] ^= 0x01  # a token id changes: only sha256 can tell
    (copy / "train-000001.tar").write_bytes(bytes(data))
    data = bytearray((copy / "train-000002.tar").read_bytes())
    data[0] ^= 0x20  # in the first member's name: the tar header checksum fails
    (copy / "train-000002.tar").write_bytes(bytes(data))
    (copy / "valid-000000.tar").unlink()
    code, out = verify(copy, capsys, "--workers", "1")
    assert code == 2
    lines = out.splitlines()
    named = lambda name: [line for line in lines if name in line]  # noqa: E731
    assert "5000 bytes" in named("train-000000.tar")[0]
    assert any("damaged tar" in line for line in named("train-000000.tar"))
    assert len(named("train-000001.tar")) == 1 and "sha256" in named("train-000001.tar")[0]
    assert any("damaged tar" in line and "checksum" in line for line in named("train-000002.tar"))
    assert named("valid-000000.tar") == [f"{copy / 'valid-000000.tar'}: missing (listed in manifest.json)"]
    assert not named("train-000003.tar")
    assert "in 4 of" in lines[-1] and "copy the bad shards again" in lines[-1]


def test_verify_refuses_a_manifest_path_outside_the_directory(tmp_path, tiny_shards, capsys):
    write_manifest_with_shard_path(tmp_path / "m", tiny_shards, "../train-000000.tar")
    with pytest.raises(SystemExit) as exit_:
        main(["prepare", "--verify", str(tmp_path / "m"), "--quiet"])
    assert exit_.value.code == 2
    assert "not a relative path inside the shard directory" in capsys.readouterr().err
