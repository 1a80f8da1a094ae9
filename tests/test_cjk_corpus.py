"""The Japanese and Chinese demo corpora: real prose from Debian's translated manual pages."""

from __future__ import annotations

import gzip
import re

import pytest

from mlm_dist.data.corpus import iter_documents
from mlm_dist.demo.manpage_corpus import (CHINESE, JAPANESE, documents_of, join_lines,
                                          page_paragraphs, strip_escapes, unavailable,
                                          write_chinese_corpus, write_japanese_corpus)

KANA = re.compile(r"[\u3041-\u30ff]")
HAN = re.compile(r"[\u4e00-\u9fff]")
DOCUMENTS = 60  # enough for the checks, a fraction of a second to build


def needs(source):
    """Skip unless the package is installed, asked as the demo asks (not "the directory has
    files": base packages put a few pages there)."""
    reason = unavailable(source)
    if reason is not None:
        pytest.skip(f"{reason} (.ci/run installs it)")


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


# ---- is the package there: asked of dpkg's database, in a fake system built in tmp_path

def page(description: str) -> bytes:
    """A gzipped man page whose description is `description`."""
    return gzip.compress(f".TH X 1\n.SH 名前\nx \\- 名前\n.SH 説明\n.PP\n{description}\n".encode())


# What Debian's base packages put in /usr/share/man/ja and zh_CN without manpages-ja/-zh
BASE_PAGES = {
    "passwd": {"ja/man1/passwd.1.gz": page("passwd はユーザのパスワードを変更する。"
                                           "一般ユーザは自分のパスワードだけを変更できる。"),
               "ja/man8/useradd.8.gz": page("useradd は新しいユーザを作成する。"
                                            "オプションを指定しないと既定値を使用する。"),
               "zh_CN/man1/passwd.1.gz": page("passwd 用于更改用户的密码。普通用户只能更改自己的密码。")},
    "man-db": {"ja/man1/man.1.gz": page("man はシステムのマニュアルを表示する。"
                                        "各ページにはセクションがある。")},
}


def fake_system(root, packages: dict) -> tuple:
    """(man root, dpkg info directory) of a system with `packages` ({name: {page path below
    the man root: bytes}}) installed, and dpkg itself, as every Debian system has."""
    man, info = root / "man", root / "dpkg-info"
    info.mkdir(parents=True)
    (info / "dpkg.list").write_text("/.\n/usr\n/usr/bin\n/usr/bin/dpkg\n")
    for name, pages in packages.items():
        listed = {"/."}
        for relative, data in pages.items():
            path = man / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
            listed.update(str(d) for d in path.parents if d.is_relative_to(man))  # dpkg lists dirs
            listed.add(str(path))
        (info / f"{name}.list").write_text("".join(f"{p}\n" for p in sorted(listed)))
    return man, info


def test_base_system_pages_alone_name_the_package(tmp_path):
    """A Debian system without manpages-ja/-zh still has pages in ja/ and zh_CN/: the corpus
    is refused, naming the package, before a line is written."""
    man, info = fake_system(tmp_path, BASE_PAGES)
    with pytest.raises(FileNotFoundError) as ja:
        write_japanese_corpus(tmp_path / "ja.txt", man_root=man, dpkg_info=info)
    assert str(ja.value) == (
        f"the Japanese demo corpus needs Debian's manpages-ja, which is not installed (other "
        f"packages put 3 pages in {man / 'ja'}): apt-get install manpages-ja")
    with pytest.raises(FileNotFoundError, match=r"manpages-zh, which is not installed \(other "
                                                r"packages put 1 page in .*\): apt-get install "
                                                r"manpages-zh$"):
        write_chinese_corpus(tmp_path / "zh.txt", man_root=man, dpkg_info=info)
    assert not (tmp_path / "ja.txt").exists() and not (tmp_path / "zh.txt").exists()
    assert unavailable(JAPANESE, man, info) == str(ja.value)  # what the tests skip with


def test_installed_package_reads_every_page_of_the_directory(tmp_path):
    """With the package, the corpus is the directory's pages, the base packages' too (the
    corpus the demo has always read); a Multi-Arch list name counts as well."""
    own = {"ja/man1/ls.1.gz": page("ls はディレクトリの内容を一覧表示する。"
                                   "既定では名前の順に並べて表示する。")}
    man, info = fake_system(tmp_path, {**BASE_PAGES, "manpages-ja": own})
    stats = write_japanese_corpus(tmp_path / "ja.txt", man_root=man, dpkg_info=info)
    assert stats["documents"] == 4 and stats["source"] == "manpages-ja"
    assert "ls はディレクトリの内容を一覧表示する。" in (tmp_path / "ja.txt").read_text()
    (info / "manpages-ja.list").rename(info / "manpages-ja:amd64.list")
    assert unavailable(JAPANESE, man, info) is None


def test_package_without_its_pages_is_named(tmp_path):
    """Installed, but a dpkg path-exclude (Docker images have one for /usr/share/man) kept
    its pages off the disk."""
    man, info = fake_system(tmp_path, {**BASE_PAGES, "manpages-zh": {
        "zh_CN/man1/ls.1.gz": page("ls 列出目录的内容。默认按名称排序。")}})
    (man / "zh_CN" / "man1" / "ls.1.gz").unlink()
    with pytest.raises(FileNotFoundError, match=r"^manpages-zh is installed but none of its pages "
                                                r"is in .*path-exclude.*apt-get install "
                                                r"--reinstall manpages-zh$"):
        write_chinese_corpus(tmp_path / "zh.txt", man_root=man, dpkg_info=info)


def test_without_dpkg_the_directory_is_read(tmp_path):
    """No dpkg database (another distribution): the pages there are all there is to go by."""
    man, _ = fake_system(tmp_path, BASE_PAGES)
    stats = write_japanese_corpus(tmp_path / "ja.txt", man_root=man, dpkg_info=tmp_path / "none")
    assert stats["documents"] == 3
    with pytest.raises(FileNotFoundError, match=r"needs the Chinese manual pages in "
                                                r".*/empty/zh_CN: apt-get install manpages-zh"):
        write_chinese_corpus(tmp_path / "zh.txt", man_root=tmp_path / "empty",
                             dpkg_info=tmp_path / "none")


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
    stats = write_japanese_corpus(tmp_path / "ja.txt", man_root=tmp_path / "man",
                                  dpkg_info=tmp_path / "no-dpkg")
    assert stats["documents"] == 1 and stats["sentences"] == 3
