"""Real Japanese and Chinese prose for the CJK demos: Debian's translated manual pages.

Like the English demo (data/demo_corpus.py), the text must already be on the machine or come
from a package registry: nothing is downloaded at run time. Debian ships the Linux manual pages
translated by volunteers, as roff sources under /usr/share/man/<lang>:

  Japanese  `apt-get install manpages-ja`  /usr/share/man/ja      JM Project translations; each
            page under the license of its English original (GPL, BSD-style, the man-pages
            licence: all DFSG-free, redistribution allowed; see /usr/share/doc/manpages-ja/copyright)
  Chinese   `apt-get install manpages-zh`  /usr/share/man/zh_CN   Simplified Chinese (CMPP
            project and others), GFDL-1.2+ (a few pages GPL-2.0+; see
            /usr/share/doc/manpages-zh/copyright)

The pages are technical prose, as the stdlib docstrings are for English. Each page is read with
a small roff reader below (not `man`/`groff`, whose output depends on their version and the
terminal width): code blocks, tables, synopses, option tags and colophons are dropped, wrapped
lines are joined (without a space between two CJK characters), and the prose is split into
sentences by the project's splitter (`mlm_dist.data.sentences.split_sentences`, "ja" or "zh":
。！？, and ASCII . ! ? between CJK text, which older translations use). Sentences that are not
mostly Japanese/Chinese prose are dropped. One page with at least two sentences is one document.

Whether the package is installed is asked of dpkg, not of the directory: Debian's base packages
(man-db, passwd, login, and apt, dpkg, vim when present) put a few dozen translated pages in
/usr/share/man/ja and zh_CN themselves, too few for a demo to learn from (see `unavailable`).

Output is the txt format (one sentence a line, a blank line between documents). It is
deterministic for a given package version (and sentencex version): pages are read in sorted
order and exact duplicate pages are kept once.
"""

from __future__ import annotations

import gzip
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

from mlm_dist.data.corpus import distinct_documents, write_txt_corpus
from mlm_dist.data.sentences import split_sentences
from mlm_dist.errors import PathNotFoundError

MAN_ROOT = Path("/usr/share/man")
# dpkg's database of installed packages: <package>.list (<package>:<arch>.list when the package
# is Multi-Arch: same) names every path the package put on the disk. It is what `dpkg-query -L`
# prints, read here without starting a process.
DPKG_INFO = Path("/var/lib/dpkg/info")
_MIN_DOCUMENT_SENTENCES = 2


# ----------------------------------------------------------------------------- what is prose

_KANA = re.compile(r"[\u3041-\u309f\u30a0-\u30ff\u31f0-\u31ff\uff66-\uff9f]")
_HAN = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")
_HANGUL = re.compile(r"[\u1100-\u11ff\uac00-\ud7af\u3130-\u318f]")
# Characters that sit between two CJK characters without a space: ideographs, kana, CJK
# punctuation (、。「」…) and full-width forms (（），：).
_WIDE = re.compile(r"[\u2e80-\u303f\u3041-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
                   r"\uff00-\uffef]")
_MIN_CJK_CHARS = 5
_MIN_CJK_SHARE = 0.3  # of the non-space characters: option names and paths may fill the rest


def is_japanese_sentence(sentence: str) -> bool:
    """Japanese prose always has kana; Chinese (which shares the ideographs) never does."""
    return bool(_KANA.search(sentence)) and _mostly_cjk(sentence)


def is_chinese_sentence(sentence: str) -> bool:
    return not _KANA.search(sentence) and not _HANGUL.search(sentence) and \
        len(_HAN.findall(sentence)) >= 4 and _mostly_cjk(sentence)


def _mostly_cjk(sentence: str) -> bool:
    wide = len(_WIDE.findall(sentence))
    visible = len(sentence) - sentence.count(" ")
    return wide >= _MIN_CJK_CHARS and wide >= _MIN_CJK_SHARE * visible


@dataclass(frozen=True)
class CorpusSource:
    language: str
    lang: str  # the code split_sentences splits it with
    man_dir: str  # below MAN_ROOT
    package: str  # the Debian package that installs it
    is_sentence: Callable[[str], bool]


JAPANESE = CorpusSource("Japanese", "ja", "ja", "manpages-ja", is_japanese_sentence)
CHINESE = CorpusSource("Chinese", "zh", "zh_CN", "manpages-zh", is_chinese_sentence)


# ----------------------------------------------------------------------------- writing

def write_japanese_corpus(path: str | Path, max_documents: int | None = None,
                          man_root: str | Path = MAN_ROOT,
                          dpkg_info: str | Path = DPKG_INFO) -> dict:
    """Write the Japanese manual pages (Debian `manpages-ja`) to `path` as a txt corpus."""
    return write_corpus(JAPANESE, path, max_documents, man_root, dpkg_info)


def write_chinese_corpus(path: str | Path, max_documents: int | None = None,
                         man_root: str | Path = MAN_ROOT,
                         dpkg_info: str | Path = DPKG_INFO) -> dict:
    """Write the Simplified Chinese manual pages (Debian `manpages-zh`) to `path` as a txt corpus."""
    return write_corpus(CHINESE, path, max_documents, man_root, dpkg_info)


def write_corpus(source: CorpusSource, path: str | Path, max_documents: int | None,
                 man_root: str | Path = MAN_ROOT, dpkg_info: str | Path = DPKG_INFO) -> dict:
    """One sentence a line, a blank line between documents; returns documents, sentences,
    bytes and the source package."""
    def documents() -> Iterator[list[str]]:
        # Looked for once writing starts: an existing output is refused first, and a missing
        # package stops the write before a line of it is kept.
        yield from documents_of(source, man_pages(source, Path(man_root), Path(dpkg_info)))

    stats = write_txt_corpus(path, documents(), max_documents)
    return {**stats, "source": source.package}


def man_pages(source: CorpusSource, man_root: Path = MAN_ROOT,
              dpkg_info: Path = DPKG_INFO) -> list[Path]:
    """The page files of the source's directory in a fixed order, once its package is there.

    All of the directory's pages, also the few other packages put there: the corpus is the
    one the demo has always read, which README's figures describe."""
    require_pages(source, man_root, dpkg_info)
    return _page_files(Path(man_root) / source.man_dir)


def require_pages(source: CorpusSource, man_root: Path = MAN_ROOT,
                  dpkg_info: Path = DPKG_INFO) -> None:
    """Stop with the fix if the source's package is not there (see `unavailable`)."""
    reason = unavailable(source, man_root, dpkg_info)
    if reason is not None:
        raise PathNotFoundError(reason)


def unavailable(source: CorpusSource, man_root: Path = MAN_ROOT,
                dpkg_info: Path = DPKG_INFO) -> str | None:
    """Why the source's corpus cannot be built on this machine, naming the fix; None if it can.

    On a system dpkg manages, the package is there when pages its file list names are on the
    disk. A directory with pages in it is not enough: the base packages put a few dozen there,
    and a demo on those alone would stop later, at the tokenizer, with advice that leads the
    wrong way (a smaller vocabulary, for a corpus that is not the one meant).
    Without a dpkg database (another distribution, whose package of the same translations has
    another name, e.g. Fedora's man-pages-ja) nothing tells whose a page is, so the directory's
    pages are taken as they are: refusing would stop the users who have the translations."""
    directory, dpkg_info = Path(man_root) / source.man_dir, Path(dpkg_info)
    install = f"apt-get install {source.package}"
    if not any(dpkg_info.glob("*.list")):
        if _page_files(directory):
            return None
        return (f"the {source.language} demo corpus needs the {source.language} manual pages "
                f"in {directory}: {install} (Debian's package; elsewhere, the translations of "
                "the Linux manual pages your distribution packages)")
    listed = package_files(source.package, dpkg_info)
    if listed is None:
        others = len(_page_files(directory))
        found = (f" (other packages put {others} page{'s' * (others != 1)} in {directory})"
                 if others else "")
        return (f"the {source.language} demo corpus needs Debian's {source.package}, which is "
                f"not installed{found}: {install}")
    if not any(Path(f).is_file() for f in listed if f.startswith(f"{directory}/")):
        return (f"{source.package} is installed but none of its pages is in {directory} (a dpkg "
                "path-exclude, as slim Docker images have): put path-include="
                f"{directory}/* in a file of /etc/dpkg/dpkg.cfg.d, then apt-get install "
                f"--reinstall {source.package}")
    return None


def package_files(package: str, dpkg_info: Path = DPKG_INFO) -> list[str] | None:
    """The paths dpkg's database lists for a package; None if it has no list (not installed)."""
    lists = sorted(dpkg_info.glob(f"{package}.list")) + \
        sorted(dpkg_info.glob(f"{package}:*.list"))
    if not lists:
        return None
    return [line for file in lists for line in file.read_text(errors="replace").splitlines()]


def _page_files(directory: Path) -> list[Path]:
    """The page files below `directory`, sorted; symlinks are other names of a page read anyway."""
    return sorted(p for p in directory.rglob("*") if p.is_file() and not p.is_symlink()) \
        if directory.is_dir() else []


def documents_of(source: CorpusSource, pages: Iterable[Path]) -> Iterator[list[str]]:
    """The sentences of each page that has enough prose, each distinct page once."""
    # NFC only: NFKC would turn the full-width punctuation of real text into ASCII, and the
    # tokenizer (which normalises with NFKC itself) should see the text as people write it.
    return distinct_documents(([s for paragraph in page_paragraphs(read_page(page))
                                for s in split_sentences(unicodedata.normalize("NFC", paragraph),
                                                         source.lang)
                                if source.is_sentence(s)]
                               for page in pages), _MIN_DOCUMENT_SENTENCES)


def read_page(page: Path) -> str:
    data = page.read_bytes()
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    return data.decode("utf-8", errors="replace")


# ----------------------------------------------------------------------------- lines

_SPACES = re.compile(r"\s+")


def join_lines(lines: list[str]) -> str:
    """Undo roff's line wrapping: a space between two lines, except between two CJK characters
    (Japanese and Chinese put none between words)."""
    text = ""
    for line in (line.strip() for line in lines):
        if not line:
            continue
        if text and not (_WIDE.match(text[-1]) and _WIDE.match(line[0])):
            text += " "
        text += line
    return _SPACES.sub(" ", text).strip()


# ----------------------------------------------------------------------------- roff

# Sections that hold no prose: names, synopses, cross references, authors, translators,
# copyright notices. Matched as substrings of the heading (headings mix languages: "描述 DESCRIPTION").
_SKIPPED_SECTIONS = re.compile(
    r"NAME|SYNOPSIS|SEE ALSO|AUTHOR|COPYRIGHT|TRANSLAT|KEYWORDS|COLOPHON|名前|名称|書式|概要|"
    r"概述|总览|大纲|関連項目|参见|另见|参照|著者|作者|译者|翻訳|翻译|著作権|版权|跋|中文版|謝辞|"
    r"この文書について|关键字", re.IGNORECASE)
# Blocks of literal text: examples, code, tables, equations, pictures, pod2man/Tcl verbatim.
_LITERAL_BLOCKS = {"nf": "fi", "EX": "EE", "Vb": "Ve", "CS": "CE", "TS": "TE", "EQ": "EN",
                   "PS": "PE", "Bd": "Ed",
                   "Dl": None}  # .Dl: a one-line display, on the macro line itself
_IGNORED_BLOCKS = {"de", "de1", "am", "ig", "ds1"}  # macro definitions and comments, up to ".."
_SECTION_MACROS = {"SH", "Sh"}
_BREAK_MACROS = {"PP", "LP", "P", "TP", "TQ", "IP", "HP", "sp", "br", "RS", "RE", "SS", "Ss",
                 "Pp", "Lp", "It", "Sp", "Bl", "El", "in", "ti", "bp", "ne", "SY", "YS", "D1"}
_FONT_MACROS = {"B", "I", "SM", "SB"}  # arguments with spaces between them
_ALTERNATING_MACROS = {"BR", "RB", "IR", "RI", "BI", "IB"}  # arguments run together
_MDOC_MACRO = re.compile(r"^[A-Z][a-z]$")
_ARGUMENT = re.compile(r'"((?:[^"]|"")*)"?|(\S+)')


@dataclass
class _PageState:
    paragraphs: list[list[str]]
    lines: list[str]
    skipping_section: bool = False
    heading_next: bool = False  # ".SH" alone: the heading is the next line
    tag_next: bool = False  # ".TP": the next line is an option tag, a paragraph of its own
    block_end: str | None = None  # inside a literal or ignored block, until this macro
    brace_depth: int = 0  # inside a conditional's \{ … \} block

    def flush(self):
        if self.lines and not self.skipping_section:
            self.paragraphs.append(self.lines)
        self.lines = []


def page_paragraphs(roff: str) -> list[str]:
    """The prose paragraphs of one man page (man or mdoc macros), as plain text."""
    state = _PageState(paragraphs=[], lines=[])
    for line in roff.splitlines():
        _read_line(state, line)
    state.flush()
    return [text for text in map(join_lines, state.paragraphs) if text]


def _read_line(state: _PageState, line: str) -> None:
    if state.brace_depth > 0:  # the body of `.if … \{`: string definitions and the like
        state.brace_depth += line.count("\\{") - line.count("\\}")
        return
    if state.block_end is not None:
        if _macro_name(line) == state.block_end or (state.block_end == ".." and
                                                    line.strip() == ".."):
            state.block_end = None
        return
    if line[:1] in (".", "'"):
        _read_control_line(state, line)
        return
    text = strip_escapes(line)
    if state.heading_next:
        state.heading_next = False
        state.skipping_section = bool(_SKIPPED_SECTIONS.search(text))
    elif state.tag_next:
        state.tag_next = False
        state.lines.append(text)
        state.flush()
    else:
        state.lines.append(text)


def _read_control_line(state: _PageState, line: str) -> None:
    name = _macro_name(line)
    if name == '\\"':
        return  # a comment line
    if line.count("\\{") > line.count("\\}"):  # a conditional block: roff logic, not text
        state.brace_depth = line.count("\\{") - line.count("\\}")
        return
    arguments = line.lstrip(".' \t")[len(name):]
    if name in _LITERAL_BLOCKS:
        if name != "Bd" or re.search(r"-(literal|unfilled)", arguments):
            state.flush()
            state.block_end = _LITERAL_BLOCKS[name]
        return
    if name in _IGNORED_BLOCKS:
        state.block_end = ".."
        return
    if name in _SECTION_MACROS:
        state.flush()
        heading = strip_escapes(" ".join(macro_arguments(arguments)))
        state.skipping_section = bool(_SKIPPED_SECTIONS.search(heading))
        state.heading_next = not heading
    elif name in _BREAK_MACROS:
        state.flush()
        state.tag_next = name in ("TP", "TQ")
    elif name in _FONT_MACROS or name in _ALTERNATING_MACROS or _MDOC_MACRO.match(name):
        text = _inline_macro_text(name, macro_arguments(arguments))
        if text:
            _read_line(state, text if not text.startswith((".", "'")) else "\\&" + text)
    # Anything else (.TH, .ds, .nr, .ft, .ad, .UR …) sets up formatting: no text.


def _inline_macro_text(name: str, arguments: list[str]) -> str:
    if name in _ALTERNATING_MACROS:
        return "".join(arguments)
    if name in _FONT_MACROS:
        return " ".join(arguments)
    # mdoc (.Nm .Xr .Fl …): the arguments, minus the names of macros called inside the line
    return " ".join(a for a in arguments if not _MDOC_MACRO.match(a))


def _macro_name(line: str) -> str:
    if line[:1] not in (".", "'"):
        return ""
    rest = line[1:].lstrip(" \t")
    if rest.startswith('\\"'):
        return '\\"'  # a comment line
    m = re.match(r"[^\s\\]+", rest)
    return m.group() if m else ""


def macro_arguments(text: str) -> list[str]:
    """A macro line's arguments: space separated, or "quoted" ("" is a quote inside quotes)."""
    text = text.split('\\"', 1)[0]  # a comment after the arguments
    return [quoted.replace('""', '"') if quoted is not None else bare
            for quoted, bare in ((m.group(1), m.group(2)) for m in _ARGUMENT.finditer(text))]


# ----------------------------------------------------------------------------- roff escapes

_SPECIAL_CHARACTERS = {
    "em": "—", "en": "–", "hy": "-", "mi": "-", "bu": "•", "lq": "“", "rq": "”", "oq": "‘",
    "cq": "’", "aq": "'", "dq": '"', "co": "©", "rg": "®", "tm": "™", "ti": "~", "ha": "^",
    "rs": "\\", "sl": "/", "mu": "×", "di": "÷", "+-": "±", "<=": "≤", ">=": "≥", "!=": "≠",
    "->": "→", "<-": "←", "de": "°", "ul": "_", "ba": "|", "bv": "|", "ga": "`", "aa": "´",
    "Fo": "«", "Fc": "»", "fo": "‹", "fc": "›", "ts": '"', "Do": "$", "at": "@", "sh": "#",
    "**": "*", "pl": "+", "eq": "=",
}
# Strings that man pages generated by pod2man and others define (\*(C` … \*(C' quote code).
_STRINGS = {"lq": "“", "rq": "”", 'L"': "“", 'R"': "”", "C`": '"', "C'": '"', "Aq": "'",
            "--": "—", "PI": "π", "Tm": "™", "R": "®", "Lq": "“", "Rq": "”", "q": '"'}
_SIMPLE_ESCAPES = {"-": "-", "e": "\\", "\\": "\\", " ": " ", "~": " ", "0": " ", "t": " ",
                   "'": "'", "`": "`", ".": ".", "_": "_"}
_ESCAPE = re.compile(r"""\\(?:
      (?P<comment>["\#].*)                                  # \" comment to the end of the line
    | \((?P<char2>..)                                       # \(xx special character
    | \[(?P<charn>[^\]]*)\]                                 # \[name] special character
    | \*(?:\((?P<str2>..)|\[(?P<strn>[^\]]*)\]|(?P<str1>.))  # \*x \*(xx \*[name] strings
    | [fFgmMnYk](?:\(..|\[[^\]]*\]|.)                       # font, colour, register: no text
    | s(?:[-+]?\(\d\d|\[[^\]]*\]|[-+]?\d|'[^']*')            # size change
    | (?P<delimited>[hvwoHlLSXZDNRbxCA])(?P<d>.).*?(?P=d)     # escapes with a delimited argument
    | (?P<other>.|$)                    # one character; at the end, a continued line
    )""", re.VERBOSE)


def strip_escapes(line: str) -> str:
    """roff text -> plain text: fonts and spacing dropped, named characters spelled out."""
    return _ESCAPE.sub(_escape_text, line)


def _escape_text(m: re.Match) -> str:
    name = m.group("char2") or m.group("charn")
    if name is not None:
        return _named_character(name)
    string = m.group("str2") or m.group("strn") or m.group("str1")
    if string is not None:
        return _STRINGS.get(string, "")
    if m.group("delimited") == "C":  # \C'name': a named character too
        return _named_character(m.group()[3:-1])
    other = m.group("other")
    return _SIMPLE_ESCAPES.get(other, "") if other is not None else ""


def _named_character(name: str) -> str:
    if re.fullmatch(r"u[0-9A-Fa-f]{4,6}(?:_[0-9A-Fa-f]{4,6})*", name):  # \[u30A2]
        return "".join(chr(int(code, 16)) for code in name[1:].split("_"))
    return _SPECIAL_CHARACTERS.get(name, "")
