"""The Japanese and Chinese demo corpora: real prose from Debian's translated manual pages."""

from __future__ import annotations

import gzip
import re

import pytest

from mlm_dist.data.corpus import iter_documents
from mlm_dist.demo.manpage_corpus import (CHINESE, JAPANESE, MAN_ROOT, documents_of, join_lines,
                                          page_paragraphs, strip_escapes, write_chinese_corpus,
                                          write_japanese_corpus)

KANA = re.compile(r"[\u3041-\u30ff]")
HAN = re.compile(r"[\u4e00-\u9fff]")
DOCUMENTS = 60  # enough for the checks, a fraction of a second to build


def needs(source):
    if not (MAN_ROOT / source.man_dir).is_dir():
        pytest.skip(f"needs the {source.language} manual pages (Debian: apt-get install "
                    f"{source.package}; .ci/run installs it)")


@pytest.mark.parametrize("source, write", [(JAPANESE, write_japanese_corpus),
                                           (CHINESE, write_chinese_corpus)],
                         ids=["ja", "zh"])
def test_corpus_is_deterministic_prose_in_the_txt_format(tmp_path, source, write):
    needs(source)
    stats = write(tmp_path / "a.txt", max_documents=DOCUMENTS)
    again = write(tmp_path / "b.txt", max_documents=DOCUMENTS)
    assert (tmp_path / "a.txt").read_bytes() == (tmp_path / "b.txt").read_bytes()
    assert stats == again and stats["documents"] == DOCUMENTS
    assert stats["source"] == source.package
    assert stats["bytes"] == (tmp_path / "a.txt").stat().st_size

    documents = list(iter_documents([tmp_path / "a.txt"]))  # the project's own reader
    sentences = [s for doc in documents for s in doc]
    assert len(documents) == DOCUMENTS and len(sentences) == stats["sentences"]
    assert stats["sentences"] > 20 * DOCUMENTS  # many sentences a document, not word lists
    assert all(len(doc) >= 2 for doc in documents)
    ends = sum(s.endswith(("。", "！", "？", ".")) for s in sentences)
    assert ends > 0.6 * len(sentences)  # mostly whole sentences
    assert all(source.is_sentence(s) for s in sentences)
    # Backslashes are rare: only where the text talks about them (shell quoting, escapes)
    assert sum("\\" in s for s in sentences) < 0.02 * len(sentences)


def test_japanese_has_kana_and_chinese_has_none(tmp_path):
    needs(JAPANESE)
    needs(CHINESE)
    write_japanese_corpus(tmp_path / "ja.txt", max_documents=DOCUMENTS)
    write_chinese_corpus(tmp_path / "zh.txt", max_documents=DOCUMENTS)
    ja = [s for doc in iter_documents([tmp_path / "ja.txt"]) for s in doc]
    zh = [s for doc in iter_documents([tmp_path / "zh.txt"]) for s in doc]
    assert all(KANA.search(s) for s in ja)
    assert not any(KANA.search(s) for s in zh)
    assert all(len(HAN.findall(s)) >= 4 for s in zh)
    ja_text, zh_text = "".join(ja), "".join(zh)
    assert len(KANA.findall(ja_text)) > 0.3 * len(ja_text)
    assert len(HAN.findall(zh_text)) > 0.5 * len(zh_text)


def test_full_corpora_sizes(tmp_path):
    """The whole of each package: a few MB of prose, hundreds of documents."""
    needs(JAPANESE)
    needs(CHINESE)
    ja = write_japanese_corpus(tmp_path / "ja.txt")
    zh = write_chinese_corpus(tmp_path / "zh.txt")
    assert ja["documents"] > 500 and ja["sentences"] > 30_000 and ja["bytes"] > 3_000_000
    assert zh["documents"] > 400 and zh["sentences"] > 15_000 and zh["bytes"] > 1_500_000


def test_missing_package_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install manpages-ja"):
        write_japanese_corpus(tmp_path / "ja.txt", man_root=tmp_path / "man")
    (tmp_path / "man" / "zh_CN").mkdir(parents=True)  # installed with the pages excluded
    with pytest.raises(FileNotFoundError, match="apt-get install manpages-zh.*path-exclude"):
        write_chinese_corpus(tmp_path / "zh.txt", man_root=tmp_path / "man")
    assert not (tmp_path / "ja.txt").exists() and not (tmp_path / "zh.txt").exists()


def test_refuses_existing_output_and_bad_limit(tmp_path):
    (tmp_path / "ja.txt").write_text("keep")
    with pytest.raises(FileExistsError):
        write_japanese_corpus(tmp_path / "ja.txt", man_root=tmp_path)
    assert (tmp_path / "ja.txt").read_text() == "keep"
    with pytest.raises(ValueError, match="max_documents"):
        write_japanese_corpus(tmp_path / "other.txt", max_documents=0)


PAGE = r""".\" a comment
.TH LS 1 "2021年5月" "GNU coreutils" "ユーザーコマンド"
.SH 名前
ls \- ディレクトリの内容をリスト表示する
.SH 書式
.B ls
[\fI\,オプション\/\fR]... [\fI\,ファイル\/\fR]...
.SH 説明
.PP
FILE (デフォルトは現在のディレクトリ) に関する情報を一覧表示します。
\fB\-cftuvSUX\fR のいずれも指定されず、
要素はアルファベット順でソートされます。
.TP
\fB\-a\fR, \fB\-\-all\fR
\&. で始まる要素を無視しない
.nf
ls \-l /tmp
.fi
.if n \{\
.ds Aq '
.\}
.SH 関連項目
.BR dir (1)
"""


def test_roff_reader_keeps_prose_only():
    assert page_paragraphs(PAGE) == [
        "FILE (デフォルトは現在のディレクトリ) に関する情報を一覧表示します。 -cftuvSUX "
        "のいずれも指定されず、要素はアルファベット順でソートされます。",
        "-a, --all",  # the option tag: a paragraph of its own (then dropped as not Japanese)
        ". で始まる要素を無視しない",
    ]


def test_roff_escapes_and_line_joining():
    assert strip_escapes(r"\fB\-\-all\fP \(lqx\(rq \*(C`y\*(C' \[u30A2] \s-1S\s0 a\"c") == \
        '--all “x” "y" ア S a'
    assert join_lines(["日本語の", "文章です。", "ASCII", "words", "と漢字"]) == \
        "日本語の文章です。 ASCII words と漢字"


def test_pages_are_split_by_the_project_splitter(tmp_path):
    """Sentences come from data/sentences.split_sentences ("ja"/"zh"); lines that are not
    mostly Japanese/Chinese prose are dropped."""
    pages = tmp_path / "man"
    (pages / "ja").mkdir(parents=True)
    (pages / "zh_CN").mkdir()
    (pages / "ja" / "a.1").write_text(
        ".SH 説明\n一つ目の文です。二つ目の文だ！「三つ目の文か？」四つ目の文になります\n"
        ".PP\n\\&. で始まる要素を無視しない。詳細は `.' を参照してください.\n")
    # Older translations end sentences with ASCII periods; numbers and file names stay whole.
    (pages / "zh_CN" / "a.1").write_text(
        ".SH 描述\n传送过去的数据.不管服务器是否需要. 版本 1.2 和 a.out 文件都会被保存。\n")
    assert list(documents_of(JAPANESE, [pages / "ja" / "a.1"])) == [[
        "一つ目の文です。", "二つ目の文だ！", "「三つ目の文か？」", "四つ目の文になります",
        ". で始まる要素を無視しない。", "詳細は `.' を参照してください."]]
    assert list(documents_of(CHINESE, [pages / "zh_CN" / "a.1"])) == [[
        "传送过去的数据.", "不管服务器是否需要.", "版本 1.2 和 a.out 文件都会被保存。"]]


def test_reads_gzip_pages_and_skips_symlinks(tmp_path):
    pages = tmp_path / "man" / "ja" / "man1"
    pages.mkdir(parents=True)
    text = ".SH 説明\n" + "これは日本語の文です。\n" * 3
    (pages / "a.1.gz").write_bytes(gzip.compress(text.encode()))
    (pages / "b.1.gz").symlink_to("a.1.gz")  # another name of the same page
    stats = write_japanese_corpus(tmp_path / "ja.txt", man_root=tmp_path / "man")
    assert stats["documents"] == 1 and stats["sentences"] == 3
