"""`prepare` reads the corpora people download: Parquet, zstd, Wikipedia's CirrusSearch dumps,
WikiExtractor's JSON, with --text-field; each file is written by its own library
(tests/corpus_files.py)."""

import bz2
import gzip
import json
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from corpus_files import cirrus_dump, compressed, write_parquet, zstd_frames
from mlm_dist.cli import main
from mlm_dist.data.corpus import CorpusReader, check_readable, iter_documents, resolve_inputs
from mlm_dist.data.partitions import merge_partitions
from mlm_dist.data.prepare import prepare_shards
from mlm_dist.data.shards import Manifest

# Real prose, as the sentences a reader splits it into; a document's text is their concatenation
# (with a space in English).
SENTENCES = {
    "en": ["The river rises in the hills.", "It reaches the sea after 300 km."],
    "ja": ["富士山は静岡県と山梨県にまたがる活火山である。", "標高は3776メートルで、日本最高峰の山である。",
           "古くから信仰の対象とされてきた。"],
    "zh": ["长城是中国古代的军事防御工程。", "它东起山海关，西至嘉峪关，全长约两万多公里。",
           "1987年，长城被列入世界遗产名录。"],
    "ja2": ["京都市は京都府の府庁所在地である。", "794年に平安京が置かれた。"],
}
TEXT = {k: (" " if k == "en" else "").join(v) for k, v in SENTENCES.items()}


def read(paths, **options):
    """(the documents' sentences, the reader: its counts) of `paths`."""
    reader = CorpusReader(list(paths), **options)
    return [d.sentences for d in reader.documents()], reader


# ----------------------------------------------------------------------------- Parquet

def test_parquet_rows_are_documents_and_rows_without_text_are_skipped_and_counted(tmp_path):
    path = write_parquet(tmp_path / "train-00000-of-00001.parquet",
                         {"id": [0, 1, 2, 3, 4], "url": ["u0", "u1", "u2", "u3", "u4"],
                          "text": [TEXT["en"], None, "", TEXT["zh"], TEXT["ja"]]},
                         row_group_size=2)
    reports = []
    documents, reader = read([path], lang="auto", report=reports.append)
    assert documents == [SENTENCES["en"], SENTENCES["zh"], SENTENCES["ja"]]
    assert reader.missing_text == {path: 1}  # the null; an empty text is a document without text
    assert reports == [f"{path}: 1 record without the field 'text' skipped"]


def test_invalid_utf8_in_parquet_is_replaced_and_counted(tmp_path):
    # pyarrow checks UTF-8 when it builds a string array, not every writer does: viewing bytes
    # as strings writes what such a writer would.
    raw = pa.array([b"caf\xe9 ok. Two \xff\xfe here.", None, b"All fine."]).view(pa.string())
    path = write_parquet(tmp_path / "bytes.parquet", {"text": raw})
    documents, reader = read([path])
    assert documents == [["caf\ufffd ok.", "Two \ufffd\ufffd here."], ["All fine."]]
    assert (reader.invalid_utf8, reader.missing_text) == ({path: 3}, {path: 1})


def test_parquet_memory_does_not_grow_with_the_file(tmp_path):
    """Arrow's own allocator counts every buffer pyarrow holds: reading a file ten times as
    long (ten times the row groups) must not need more of it. Reading the column whole, or
    with pyarrow's default pre-buffering, needs ten times as much."""
    words = "the river rises in hills and reaches sea after many long winding miles".split()
    rng = random.Random(0)
    peaks = {}
    for row_groups in (3, 30):
        rows = row_groups * 100
        # Random words: text that compresses as little as prose does, so what is read ahead
        # weighs what it would in a real file.
        path = write_parquet(tmp_path / f"{row_groups}.parquet",
                             {"text": [" ".join(rng.choices(words, k=200)) + "."
                                       for _ in range(rows)]}, row_group_size=100)
        before = pa.total_allocated_bytes()
        peak = documents = 0
        for _ in CorpusReader([path]).documents():
            peak = max(peak, pa.total_allocated_bytes() - before)
            documents += 1
        assert documents == rows
        peaks[row_groups] = peak
    assert 0 < peaks[30] < 1.5 * peaks[3], peaks


def test_dotted_text_field_reads_nested_json_objects_and_parquet_structs(tmp_path):
    metas = [{"body": TEXT["en"], "lang": "en"},
             {"lang": "en"},  # no body: skipped and counted
             None,  # no meta at all: the same
             {"body": TEXT["zh"], "lang": "zh"}]
    jsonl = tmp_path / "nested.jsonl"
    jsonl.write_text("".join(json.dumps({"id": i, **({} if m is None else {"meta": m})},
                                        ensure_ascii=False) + "\n" for i, m in enumerate(metas)))
    parquet = write_parquet(tmp_path / "nested.parquet", {"id": [0, 1, 2, 3], "meta": metas})
    assert pa.types.is_struct(pq.read_schema(parquet).field("meta").type)
    for path in (jsonl, parquet):
        check_readable([path], "meta.body")
        documents, reader = read([path], lang="auto", text_field="meta.body")
        assert documents == [SENTENCES["en"], SENTENCES["zh"]], path.name
        assert reader.missing_text == {path: 2}, path.name


# ----------------------------------------------------------------------------- compression

def test_zstd_text_and_jsonl_are_read_across_frames_and_long_windows(tmp_path):
    documents = [SENTENCES[k] * 20 for k in ("en", "ja", "zh", "ja2")]  # ~9 kB, two frames
    txt = "".join("\n".join(doc) + "\n\n" for doc in documents).encode()
    jsonl = "".join(json.dumps({"text": " ".join(doc)}, ensure_ascii=False) + "\n"
                    for doc in documents).encode()
    (tmp_path / "a.txt.zst").write_bytes(zstd_frames(txt))
    (tmp_path / "b.jsonl.zst").write_bytes(zstd_frames(jsonl))
    check_readable([tmp_path / "a.txt.zst", tmp_path / "b.jsonl.zst"])
    assert list(iter_documents([tmp_path / "a.txt.zst"])) == documents
    assert list(iter_documents([tmp_path / "b.jsonl.zst"], lang="auto")) == documents


def test_damaged_or_mislabelled_compressed_inputs_are_named(tmp_path):
    jsonl = "".join(json.dumps({"text": f"Line {i} of the corpus."}) + "\n" for i in range(3000))
    cut = tmp_path / "cut.jsonl.zst"
    cut.write_bytes(zstd_frames(jsonl.encode())[:-40])
    check_readable([cut])  # the start is fine; the damage shows while reading
    with pytest.raises(ValueError, match=r"cut.jsonl.zst is a damaged zstd file \(.*cut short"):
        list(iter_documents([cut]))
    cut_bz2 = tmp_path / "cut.txt.bz2"
    cut_bz2.write_bytes(bz2.compress(jsonl.encode())[:-40])
    with pytest.raises(ValueError, match="cut.txt.bz2 is a damaged bzip2 file"):
        list(iter_documents([cut_bz2]))
    for name, data, kind in (("gz.txt.zst", gzip.compress(b"Text.\n"), "zstd"),
                             ("plain.jsonl.bz2", b'{"text": "x"}\n', "bzip2"),
                             ("zst.txt.gz", zstd_frames(b"Text.\n"), "gzip")):
        (tmp_path / name).write_bytes(data)
        suffix = "." + name.rsplit(".", 1)[1]
        with pytest.raises(ValueError, match=f"{name} is named {suffix} but is not "
                                             f"{kind}-compressed"):
            check_readable([tmp_path / name])


# ----------------------------------------------------------------------------- Wikipedia

PAGES = [{"title": "富士山", "text": TEXT["ja"], "opening_text": SENTENCES["ja"][0],
          "auxiliary_text": ["富士山（2010年撮影）"]},
         {"title": "长城", "text": TEXT["zh"], "opening_text": SENTENCES["zh"][0]},
         {"title": "空のページ", "redirect": []},  # a page without text: skipped and counted
         {"title": "京都市", "text": TEXT["ja2"], "heading": ["歴史", "地理"]}]


def test_cirrussearch_dump_gives_page_texts_never_titles_under_any_name(tmp_path):
    """Action lines are told by their content, so renamed, recompressed or split dumps read
    the same; they are skipped without being counted as records without text."""
    dump = cirrus_dump(PAGES)
    names = ["jawiki-20240101-cirrussearch-content.json.gz",  # as Wikimedia names it
             "jawiki_content-20240101-00000.json.bz2", "dump.jsonl.zst", "part-00",
             "split-at-an-odd-line"]
    for name in names[:-1]:
        (tmp_path / name).write_bytes(compressed(name, dump))
    (tmp_path / names[-1]).write_bytes(dump.split(b"\n", 1)[1])  # starts with a page line
    assert resolve_inputs([tmp_path]) == [tmp_path / n for n in sorted(names[:3])]
    for name in names:
        path = tmp_path / name
        check_readable([path])
        reader = CorpusReader([path], lang="auto")
        documents = [(d.lang, d.sentences) for d in reader.documents()]
        assert documents == [("ja", SENTENCES["ja"]), ("zh", SENTENCES["zh"]),
                             ("ja", SENTENCES["ja2"])], name
        assert reader.missing_text == {path: 1}, name


def test_wikiextractor_json_output_is_read_as_json_lines(tmp_path):
    """WikiExtractor --json writes extracted/AA/wiki_00, … (no suffix): one object a line, the
    title in its own field, non-ASCII escaped. A file of another unknown name stays text."""
    pages = {"AA": [("1", "Alexandre de Rhodes", TEXT["en"]), ("4", "富士山", TEXT["ja"])],
             "AB": [("13", "长城", TEXT["zh"])]}
    for folder, folder_pages in pages.items():
        (tmp_path / "extracted" / folder).mkdir(parents=True)
        (tmp_path / "extracted" / folder / "wiki_00").write_text("".join(
            json.dumps({"id": i, "revid": "9", "url": f"https://ja.wikipedia.org/wiki?curid={i}",
                        "title": title, "text": text}) + "\n" for i, title, text in folder_pages))
    (tmp_path / "extracted" / "notes").write_text("{Braces} open this plain text.\nA line.\n")
    files = resolve_inputs([str(tmp_path / "extracted" / "*" / "wiki_*"),
                            tmp_path / "extracted" / "notes"])
    documents, reader = read(files, lang="auto")
    assert documents == [SENTENCES["en"], SENTENCES["ja"], SENTENCES["zh"],
                         ["{Braces} open this plain text.", "A line."]]
    assert not reader.missing_text


# ----------------------------------------------------------------------------- --text-field

def test_text_field_mistakes_stop_the_run_before_anything_is_read(tmp_path):
    parquet = write_parquet(tmp_path / "a.parquet", {"id": [1], "content": ["Text here."],
                                                     "meta": [{"body": "Nested text."}]})
    check_readable([parquet], "content")
    check_readable([parquet], "meta.body")
    for field, message in (
            ("text", r"a.parquet has no column 'text' \(its columns: id, content, meta\); name "
                     "the text column with --text-field"),
            ("id", "column 'id' is int64, not a string"),
            ("meta", "column 'meta' is struct<body: string>, not a string"),
            ("meta.title", r"column 'meta' has no field 'title' \(its fields: body\)"),
            ("content.x", r"column 'content' has no field 'x' \(it is string\)")):
        with pytest.raises(ValueError, match=message):
            check_readable([parquet], field)

    jsonl = tmp_path / "a.jsonl"
    jsonl.write_text("".join(json.dumps({"id": i, "content": "Text."}) + "\n" for i in range(150)))
    with pytest.raises(ValueError, match=r"a.jsonl: none of its first records has the field "
                                         r"'text' \(the first has: id, content\); name the text "
                                         "field with --text-field"):
        check_readable([jsonl])
    # One record without the field is a gap in the corpus, not a wrong name: counted when read.
    some = tmp_path / "some.jsonl"
    some.write_text(json.dumps({"id": 0}) + "\n" + json.dumps({"text": "Kept."}) + "\n")
    check_readable([some])
    assert read([some])[1].missing_text == {some: 1}

    not_text = tmp_path / "not-text.jsonl"
    not_text.write_text(json.dumps({"text": "Fine."}) + "\n" + json.dumps({"text": ["a"]}) + "\n")
    with pytest.raises(ValueError, match=r"not-text.jsonl:2: the field 'text' holds a list, not "
                                         "a string"):
        list(iter_documents([not_text]))
    pretty = tmp_path / "dataset_info.json"
    pretty.write_text(json.dumps({"features": {"text": "string"}}, indent=2))
    with pytest.raises(ValueError, match="dataset_info.json:1: not valid JSON"):
        check_readable([pretty])
    for field in ("", "meta..body", ".text"):
        with pytest.raises(ValueError, match=f"--text-field '{field}' is not a field name"):
            check_readable([some], field)


def test_prepare_reads_the_formats_and_records_what_it_skipped(tmp_path, capsys, tiny_tokenizer):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    write_parquet(corpus / "a.parquet", {"content": [TEXT["en"], None, "The second row. It ends."]})
    records = [{"content": "One more text. Right here."}, {"title": "x"}, {"content": None},
               {"content": "And the last one."}]
    (corpus / "b.jsonl.zst").write_bytes(zstd_frames(
        "".join(json.dumps(r) + "\n" for r in records).encode()))
    (corpus / "c.txt").write_text("Plain text stays plain.\nTwo lines.\n")
    tokenizer, out = str(tiny_tokenizer.path.parent), tmp_path / "shards"
    with pytest.raises(SystemExit):  # a typo: stopped before anything was written
        main(["prepare", "--input", str(corpus), "--tokenizer", tokenizer, "--out", str(out),
              "--text-field", "contents", "--quiet"])
    assert "a.parquet has no column 'contents'" in capsys.readouterr().err
    assert not out.exists()

    main(["prepare", "--input", str(corpus), "--tokenizer", tokenizer, "--out", str(out),
          "--text-field", "content", "--workers", "1", "--quiet"])
    stdout, stderr = capsys.readouterr()
    assert stderr.splitlines() == [f"{corpus / 'a.parquet'}: 1 record without the field "
                                   "'content' skipped",
                                   f"{corpus / 'b.jsonl.zst'}: 2 records without the field "
                                   "'content' skipped"]
    assert "without the field 'content': 3 records skipped in 2 files" in stdout
    manifest = Manifest.load(out)
    info = manifest.prepare
    assert (info.text_field, info.missing_text, info.missing_text_files) == ("content", 3, 2)
    assert sum(manifest.totals(s)["documents"] for s in manifest.splits) == 5
    with pytest.raises(SystemExit):
        main(["prepare", "--verify", str(out), "--text-field", "content"])
    assert "--verify takes only a directory" in capsys.readouterr().err


def test_tokenizer_train_reads_the_same_inputs_with_the_same_text_field(tmp_path, capsys,
                                                                         tiny_corpus):
    documents = [" ".join(doc) for doc in iter_documents([tiny_corpus])]
    corpus = write_parquet(tmp_path / "docs.parquet", {"content": documents + [None]})
    common = ["tokenizer", "train", "--input", str(corpus), "--vocab-size", "600"]
    with pytest.raises(SystemExit):
        main(common + ["--out", str(tmp_path / "x")])
    assert "docs.parquet has no column 'text' (its columns: content)" in capsys.readouterr().err
    main(common + ["--out", str(tmp_path / "tok"), "--text-field", "content"])
    stdout, stderr = capsys.readouterr()
    assert f"{corpus}: 1 record without the field 'content' skipped" in stderr
    assert (tmp_path / "tok" / "tokenizer.model").is_file() and "(600 pieces)" in stdout


def test_partitions_add_up_skipped_records_and_must_agree_on_the_text_field(tmp_path,
                                                                           tiny_tokenizer):
    files = []
    for k in range(2):
        files.append(tmp_path / f"part{k}.jsonl")
        files[-1].write_text("".join(json.dumps(r) + "\n" for r in (
            {"body": f"Part {k} has text. It has two sentences."}, {"id": k},
            {"body": f"Another document of part {k}."})))
    tokenizer = tiny_tokenizer.path.parent
    for index in (0, 1):
        prepare_shards(files, tokenizer, tmp_path / "shards", valid_fraction=0.0,
                       num_partitions=2, partition_index=index, text_field="body")
    merged = merge_partitions(tmp_path / "shards")
    assert (merged.prepare.missing_text, merged.prepare.missing_text_files,
            merged.prepare.text_field) == (2, 2, "body")

    mixed = [tmp_path / "mixed0.jsonl", tmp_path / "mixed1.jsonl"]  # partition k reads file k
    for path, field in zip(mixed, ("body", "text")):
        path.write_text(json.dumps({field: "Some text. More of it."}) + "\n")
    for index, field in enumerate(("body", "text")):
        prepare_shards(mixed, tokenizer, tmp_path / "mixed", num_partitions=2,
                       partition_index=index, valid_fraction=0.0, text_field=field)
    with pytest.raises(ValueError, match=r"differ in text field \(text vs body\): use the same "
                                         "--text-field"):
        merge_partitions(tmp_path / "mixed")
