"""Reading the inputs people have: txt / jsonl, gzipped, directories, globs, bad bytes."""

import gzip
import json

import pytest

from mlm_dist.data.corpus import (CorpusReader, check_readable, iter_documents, resolve_inputs,
                                  split_sentences)

DOCS = [["The first document starts here.", "It has a second sentence."],
        ["Another one follows!", "Does it work?", "Yes."]]


def as_txt(documents):
    return "".join("\n".join(doc) + "\n\n" for doc in documents)


def as_jsonl(documents):
    return "".join(json.dumps({"text": " ".join(doc)}) + "\n" for doc in documents)


def test_gz_inputs_read_like_plain_ones(tmp_path):
    (tmp_path / "a.txt.gz").write_bytes(gzip.compress(as_txt(DOCS).encode()))
    (tmp_path / "b.jsonl.gz").write_bytes(gzip.compress(as_jsonl(DOCS).encode()))
    (tmp_path / "c.txt").write_text(as_txt(DOCS))
    (tmp_path / "d.jsonl").write_text(as_jsonl(DOCS))
    for name in ("a.txt.gz", "b.jsonl.gz", "c.txt", "d.jsonl"):
        assert list(iter_documents([tmp_path / name])) == DOCS, name


def test_directory_is_recursed_sorted_and_takes_known_suffixes(tmp_path):
    for name in ("b/z.txt", "b/a.jsonl.gz", "a.txt.gz", "c.jsonl", "notes.md", ".hidden.txt",
                 ".git/x.txt", "data.parquet"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    assert resolve_inputs([tmp_path]) == [tmp_path / n for n in ("a.txt.gz", "b/a.jsonl.gz",
                                                                 "b/z.txt", "c.jsonl",
                                                                 "data.parquet")]
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.md").write_text("x")
    with pytest.raises(FileNotFoundError, match=r"empty holds no input files.*\.txt, \.jsonl, "
                                                r"\.txt\.gz, \.jsonl\.gz"):
        resolve_inputs([empty])


def test_globs_are_expanded_sorted_and_keep_argument_order(tmp_path):
    for name in ("x/2.txt", "x/10.txt", "x/sub/3.txt", "y.jsonl", "x/odd.data"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("One sentence here.\n")
    assert resolve_inputs([tmp_path / "y.jsonl", str(tmp_path / "x" / "*.txt")]) == [
        tmp_path / "y.jsonl", tmp_path / "x/10.txt", tmp_path / "x/2.txt"]
    # A pattern names files whatever their suffix; ** recurses; a matched directory is recursed.
    assert resolve_inputs([str(tmp_path / "x" / "**" / "*.*")]) == [
        tmp_path / n for n in ("x/10.txt", "x/2.txt", "x/odd.data", "x/sub/3.txt")]
    assert resolve_inputs([str(tmp_path / "x" / "su?")]) == [tmp_path / "x/sub/3.txt"]


def test_glob_matching_nothing_and_missing_file_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"pattern '.*nothing-\*\.txt' matches nothing"):
        resolve_inputs([str(tmp_path / "nothing-*.txt")])
    with pytest.raises(FileNotFoundError, match="missing.txt does not exist"):
        resolve_inputs([tmp_path / "missing.txt"])
    with pytest.raises(ValueError, match="no inputs"):
        resolve_inputs([])


def test_a_file_named_twice_is_refused(tmp_path):
    (tmp_path / "a.txt").write_text("Text.\n")
    with pytest.raises(ValueError, match=r"a.txt is named twice .*name each file once"):
        resolve_inputs([tmp_path / "a.txt", tmp_path])


def test_invalid_utf8_is_replaced_counted_and_reported(tmp_path):
    (tmp_path / "bad.txt").write_bytes(b"caf\xe9 ok.\nA \xff\xfe line.\n\n"
                                       b"Fine \xef\xbf\xbd already replaced.\n")
    (tmp_path / "bad.jsonl").write_bytes(b'{"text": "Bad \xc3 byte. Lone \\ud800 surrogate."}\n')
    (tmp_path / "good.txt").write_text("All fine here.\n")
    reports = []
    reader = CorpusReader(resolve_inputs([tmp_path]), report=reports.append)
    documents = [d.sentences for d in reader.documents()]
    assert documents == [["Bad \ufffd byte.", "Lone \ufffd surrogate."],
                         ["caf\ufffd ok.", "A \ufffd\ufffd line."],
                         ["Fine \ufffd already replaced."],
                         ["All fine here."]]
    assert reader.invalid_utf8 == {tmp_path / "bad.jsonl": 2, tmp_path / "bad.txt": 3}
    assert reports == [f"{tmp_path / 'bad.jsonl'}: 2 invalid UTF-8 sequences replaced",
                       f"{tmp_path / 'bad.txt'}: 3 invalid UTF-8 sequences replaced"]


def test_empty_lines_and_documents_are_skipped(tmp_path):
    (tmp_path / "a.txt").write_bytes(b"\n\n  \nFirst line.\r\nSecond line.\r\n\r\n\t\n\n"
                                     b"Old Mac line.\rAnother.\r\rLast, no newline.")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": ""}) + "\n\n" + json.dumps({"text": "  \n "})
                                      + "\n" + json.dumps({"text": "Kept. Yes."}) + "\n")
    reader = CorpusReader([tmp_path / "a.txt", tmp_path / "b.jsonl"])
    assert [(d.file_index, d.index, d.sentences) for d in reader.documents()] == [
        (0, 0, ["First line.", "Second line."]),
        (0, 1, ["Old Mac line.", "Another."]),
        (0, 2, ["Last, no newline."]),
        (1, 0, ["Kept.", "Yes."])]


def test_long_document_is_one_document(tmp_path):
    text = " ".join(f"Sentence number {i} is here." for i in range(5000))
    (tmp_path / "long.jsonl").write_text(json.dumps({"text": text}) + "\n")
    [document] = iter_documents([tmp_path / "long.jsonl"])
    assert len(document) == 5000 and document == split_sentences(text)


def test_damaged_gzip_is_named(tmp_path):
    not_gzip = tmp_path / "plain.txt.gz"
    not_gzip.write_text("Not compressed.\n")
    with pytest.raises(ValueError, match="plain.txt.gz is named .gz but is not gzip"):
        check_readable([not_gzip])
    truncated = tmp_path / "cut.txt.gz"
    truncated.write_bytes(gzip.compress(as_txt(DOCS * 50).encode())[:-30])
    check_readable([truncated])  # the header is fine; the damage shows while reading
    with pytest.raises(ValueError, match="cut.txt.gz is a damaged gzip file"):
        list(iter_documents([truncated]))


def test_bad_jsonl_line_is_named(tmp_path):
    (tmp_path / "x.jsonl").write_text('{"text": "Fine."}\n[1, 2]\n')
    with pytest.raises(ValueError, match=r'x.jsonl:2: expected an object with a "text"'):
        list(iter_documents([tmp_path / "x.jsonl"]))


# Real prose, one document per language; a JSONL reader splits each in its language.
JA_DOC = ("東京都は日本の首都である。1868年に江戸から改称された。"
          "「東京」という名は「東の京」を意味する。")
ZH_DOC = "北京是中华人民共和国的首都。2020年，北京市常住人口约为2,189万人。他说：“北京欢迎你。”"
EN_DOC = ("Dr. Smith moved to the U.S. in 1999. She earned $1,000 a week, e.g. in 2001. "
          "It was enough.")
SENTENCES = {"ja": ["東京都は日本の首都である。", "1868年に江戸から改称された。",
                    "「東京」という名は「東の京」を意味する。"],
             "zh": ["北京是中华人民共和国的首都。", "2020年，北京市常住人口约为2,189万人。",
                    "他说：“北京欢迎你。”"],
             "en": ["Dr. Smith moved to the U.S. in 1999.",
                    "She earned $1,000 a week, e.g. in 2001.", "It was enough."]}


def test_jsonl_documents_are_split_in_their_detected_language(tmp_path):
    (tmp_path / "mixed.jsonl").write_text("".join(json.dumps({"text": t}, ensure_ascii=False)
                                                  + "\n" for t in (JA_DOC, ZH_DOC, EN_DOC)))
    reader = CorpusReader([tmp_path / "mixed.jsonl"], lang="auto")
    assert [d.sentences for d in reader.documents()] == [
        SENTENCES["ja"], SENTENCES["zh"], SENTENCES["en"]]
    assert list(iter_documents([tmp_path / "mixed.jsonl"], lang="auto")) == [
        SENTENCES["ja"], SENTENCES["zh"], SENTENCES["en"]]
    # Named languages: the same where the rules agree; English rules let 。 run into a year.
    assert list(iter_documents([tmp_path / "mixed.jsonl"], lang="zh"))[1] == SENTENCES["zh"]
    assert list(iter_documents([tmp_path / "mixed.jsonl"], lang="en"))[1][0] == (
        "北京是中华人民共和国的首都。2020年，北京市常住人口约为2,189万人。")


def test_plain_text_keeps_one_sentence_a_line_in_any_language(tmp_path):
    lines = ["東京は晴れ。大阪は雨。", "Dr. Smith arrived. He left.", "他说：“好。”然后走了。"]
    (tmp_path / "a.txt").write_text("\n".join(lines) + "\n\n" + ZH_DOC + "\n")
    for lang in ("en", "ja", "zh", "auto"):
        assert list(iter_documents([tmp_path / "a.txt"], lang=lang)) == [lines, [ZH_DOC]], lang


def test_unknown_language_is_refused_before_reading(tmp_path):
    with pytest.raises(ValueError, match=r"unknown language 'jp' .*auto, am, .*ja, .*zh"):
        CorpusReader([tmp_path / "never-read.jsonl"], lang="jp")
    (tmp_path / "a.jsonl").write_text(json.dumps({"text": EN_DOC}) + "\n")
    with pytest.raises(ValueError, match="unknown language 'klingon'"):
        list(iter_documents([tmp_path / "a.jsonl"], lang="klingon"))
