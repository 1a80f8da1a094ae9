"""Splitting running text (JSONL documents) into sentences, in many languages.

The splitter is sentencex (Wikimedia, MIT, a Rust core in a wheel with no dependencies): rule
sets for ~30 languages, abbreviation lists ("Dr.", "U.S.", "e.g."), quotes and brackets. pysbd
was the other candidate: it got fewer of tests/test_sentences.py's ja/zh/en cases right (it
cuts “…。” before ” and ？！ in two, and never ends a sentence at 」), is orders of magnitude
slower, which matters when `prepare` reads many GB in one process, and has had no release
since 2021; sentencex is maintained.

sentencex's rules come from Latin-script text and get a few Japanese/Chinese cases wrong; for
"ja" and "zh" its cuts are repaired here (`_split_cjk`), so that
  - 。！？｡． end a sentence whatever follows, digits and Latin letters included
    (sentencex continues a sentence before a lowercase letter or a digit: 。2023年 …);
  - an ASCII . ! or ? (a run of ! and ?, not "...") right after a Han or kana character or a
    full-width closing bracket or quote, and followed by a space, a Han or kana character or a
    full-width opening bracket or quote, ends a sentence too ("…を参照.次に…", "…が必要です.
    詳しくは…": translated manual pages and much web text write ASCII stops). Decimal numbers
    (1.2.3), file names (ls.1, a.out, 設定.conf), URLs and abbreviations (U.S., e.g.) have no Han
    or kana right before the stop, or no space or Han/kana after it, so they are not cut;
  - of sentencex's own cuts only those after a stop that ends a Latin-text sentence are kept
    ("… in C. The …"), not those before list items ("、 (d) ダンプ"), after an ellipsis
    ("$1, ... $n"), a lone stop ("find . -name", "! コマンド"), a stop with no space after it
    (" .An", "#!/bin/sh") or a stop after Latin text and before Japanese/Chinese text
    ("file... で", "`.' が", "ls. によって");
  - a closing quote or bracket stays with its sentence, and one that closes after a sentence
    end ends the sentence (sentencex does so after 」 and ” only, not after 』 or ）);
  - nothing is cut inside a matched bracket or quote pair (sentencex cuts 『…。』 before 』);
    an ASCII ( [ with a space after it or ) ] with a space before it is no bracket but a
    character the text talks about ("[ の次の文字が…。 ] は…");
  - Japanese only: a quote followed by a quotative or case particle (「…。」と言った, also with a
    space between) continues the sentence; a quote followed by anything else (「…。」それから)
    ends it;
  - a period between letters or digits with no space after it (U.S.の, ASP.NET, ３．２９) is
    not a sentence end.
sentencex gets "en" rules for ja and zh text too (its "ja" rules are the generic ones with no
abbreviations, its "zh" falls back to "en"), so English inside Japanese/Chinese text keeps its
abbreviations. In the other languages one repair: a cut after . ? or ! with no space after it
(io.TextIOWrapper, self.__abs__) is undone.

`detect_language` picks the rules for a document by script; see its docstring.
"""

from __future__ import annotations

import bisect
import re
from itertools import accumulate

import sentencex

from mlm_dist.errors import UsageError

# Languages sentencex has rule sets of its own for (any other code it silently treats as
# English, so we refuse it instead), plus "zh", which is repaired here like "ja".
SUPPORTED_LANGUAGES = ("am", "ar", "bg", "bn", "ca", "da", "de", "el", "en", "es", "fi", "fr",
                       "gu", "hi", "hy", "it", "ja", "kk", "kn", "ml", "mr", "my", "nl", "pa",
                       "pl", "pt", "ru", "sk", "ta", "te", "uk", "zh")
AUTO = "auto"  # detect the language of each document
_CJK = ("ja", "zh")


def check_language(lang: str) -> str:
    """The language code `lang` names ("zh-TW" -> "zh"), or a ValueError naming the choices."""
    code = str(lang).strip().lower().replace("_", "-").split("-")[0]
    if code == AUTO or code in SUPPORTED_LANGUAGES:
        return code
    raise UsageError(f"unknown language {lang!r} for sentence splitting; use one of "
                     f"{AUTO}, {', '.join(SUPPORTED_LANGUAGES)}")


def split_sentences(text: str, lang: str = "en") -> list[str]:
    """The sentences of `text`: each line is a paragraph, split into stripped, non-empty
    sentences. `lang` is a code of SUPPORTED_LANGUAGES or "auto" (detect from `text`)."""
    lang = check_language(lang)
    if lang == AUTO:
        lang = detect_language(text)
    split = _split_cjk if lang in _CJK else _split_other
    sentences = []
    for paragraph in text.splitlines():
        if paragraph and not paragraph.isspace():
            sentences.extend(s for s in map(str.strip, split(paragraph, lang)) if s)
    return sentences


def _split_other(paragraph: str, lang: str) -> list[str]:
    # sentencex also cuts where no space follows . ? or ! (io.TextIOWrapper, binascii.Error,
    # self.__abs__, "the command '?' is"): in languages written with spaces, a sentence that
    # ends there is followed by one. Its pieces keep their trailing spaces, so those are the
    # pieces that end in the stop itself.
    sentences: list[str] = []
    for piece in sentencex.segment(lang, paragraph):
        if sentences and sentences[-1][-1] in ".?!":
            sentences[-1] += piece
        else:
            sentences.append(piece)
    return sentences


# ----------------------------------------------------------------------------- ja / zh repairs

_OPENS = "「『（“‘《【〈〔［｛〖(["
_CLOSES = "」』）”’》】〉〕］｝〗)]"
_CLOSER_OF = dict(zip(_OPENS, _CLOSES))
_SYMMETRIC = "\"＂"  # open or close by turns: Chinese web text often quotes with ASCII "
_BRACKET = re.compile(f"[{re.escape(_OPENS + _CLOSES + _SYMMETRIC)}]")
_CJK_STOPS = "。！？｡．"
# A full-width sentence end with the closing quotes and brackets that follow it.
_CJK_END = re.compile(f"[{_CJK_STOPS}]+[{re.escape(_CLOSES)}]*")
# Particles that continue a sentence after a quote: 「…」と言った, 「…」って, 「…」は, 「…」の …
_JA_PARTICLES = frozenset("とってはがをにのでもやへ")
_NEXT_CHAR = re.compile(r"\s*(\S?)")
_ALNUM = re.compile(r"[0-9A-Za-z０-９Ａ-Ｚａ-ｚ]")
_HAN = "\u3005\u3007\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0003134f"
_KANA = "\u3041-\u309f\u30a1-\u30fa\u30fc-\u30ff\u31f0-\u31ff\uff66-\uff9d"
_WIDE_CLOSES = "」』）”’》】〉〕］｝〗"
_WIDE_OPENS = "「『（“‘《【〈〔［｛〖"
# An ASCII sentence end in Japanese/Chinese text: . or a run of ! and ? between CJK text, with
# the closing quotes and brackets after it ("…を参照.次に", "…です. 詳しくは", "（…）.次").
# It starts with the stop, and looks back from there, so that re scans for . ! ? quickly.
_ASCII_CJK_END = re.compile(f"[.!?](?<=[{_HAN}{_KANA}{_WIDE_CLOSES}].)(?:(?<=\\.)|(?<=[!?])[!?]*)"
                            f"[{_WIDE_CLOSES}]*(?=\\s|[{_HAN}{_KANA}{_WIDE_OPENS}])")
_URL = re.compile(r"(?:[A-Za-z][A-Za-z0-9+.-]*://|www\.)[^\s、。，；！？「」『』（）【】《》<>\"']+")
# Japanese/Chinese text, or its punctuation and full-width forms, after a cut.
_CJK_START = re.compile(f"\\s*[(\\[\"'`]?[{_HAN}{_KANA}{_WIDE_OPENS}\u3000-\u303f\uff00-\uffef]")


def _split_cjk(paragraph: str, lang: str) -> list[str]:
    pieces = sentencex.segment("en", paragraph)  # they add up to the paragraph exactly
    cuts = {cut for cut in accumulate(map(len, pieces[:-1]))
            if _ends_latin_sentence(paragraph, cut)}
    cuts.update(m.end() for m in _CJK_END.finditer(paragraph))
    cuts.update(_ascii_cjk_ends(paragraph))
    enclosed = _enclosed_spans(paragraph)
    starts = [start for start, _ in enclosed]
    ends = {end for _, end in enclosed}
    kept = sorted({cut for cut in (_past_sentence_end(paragraph, c, ends) for c in cuts)
                   if _is_boundary(paragraph, cut, lang, enclosed, starts)})
    bounds = [0, *kept, len(paragraph)]
    return [paragraph[a:b] for a, b in zip(bounds, bounds[1:])]


def _ascii_cjk_ends(paragraph: str) -> list[int]:
    ends = [m.end() for m in _ASCII_CJK_END.finditer(paragraph)]
    if ends and ("://" in paragraph or "www." in paragraph):
        urls = [m.span() for m in _URL.finditer(paragraph)]  # https://例子.中国/索引.html
        ends = [end for end in ends if not any(start < end < stop for start, stop in urls)]
    return ends


def _past_sentence_end(paragraph: str, cut: int, quote_ends: set[int]) -> int:
    # Closing quotes and stops just after a cut belong to the sentence before it (sentencex
    # cuts 『…。』 before 』 and （…。）。 before 。). A " closes only where a pair ends.
    while cut < len(paragraph) and (paragraph[cut] in _CLOSES or paragraph[cut] in _CJK_STOPS
                                     or cut + 1 in quote_ends):
        cut += 1
    return cut


def _is_boundary(paragraph: str, cut: int, lang: str, enclosed: list[tuple[int, int]],
                 starts: list[int]) -> bool:
    if not 0 < cut < len(paragraph):
        return False
    i = bisect.bisect_left(starts, cut) - 1
    if i >= 0 and enclosed[i][1] > cut:
        return False  # inside 「…」 or （…）: the quote is part of a longer sentence
    before, after = paragraph[cut - 1], paragraph[cut]
    if lang == "ja" and _NEXT_CHAR.match(paragraph, cut).group(1) in _JA_PARTICLES:
        # 「…。」と, and 「…。」 と in text with spaces (man pages)
        quote = cut
        while quote > 1 and paragraph[quote - 1].isspace():
            quote -= 1
        if paragraph[quote - 1] in _CLOSES or paragraph[quote - 1] in _SYMMETRIC:
            return False
    glued_period = (before in ".．" and not after.isspace()
                    and cut >= 2 and _ALNUM.match(paragraph[cut - 2]))
    return not glued_period


def _ends_latin_sentence(paragraph: str, cut: int) -> bool:
    """Whether sentencex's cut at `cut` in Japanese/Chinese text is a sentence end: one after
    。！？ (which _CJK_END cuts at anyway) or after a Latin-text sentence ("… in C. The …").

    sentencex also cuts before list items ("、 (d) ダンプ", "構成される: (1) …"), after stops
    that end no sentence here: an ellipsis ("$1, $2, ... $n"), a stop alone ("find . -name",
    "! コマンド"), one with no space after it (" .An", "`!'", "#!/bin/sh") and a stop before
    Japanese/Chinese text ("file... で", "`.' が", "ls. によって", "Heads. (ヘッダー数)"); the
    stops before Japanese/Chinese text that do end a sentence follow Japanese/Chinese text,
    and _ASCII_CJK_END cuts there.
    """
    end = cut  # just after the stop and its closing quotes or brackets
    while end > 0 and paragraph[end - 1].isspace():
        end -= 1
    stop = end  # just after the stop
    while stop > 0 and (paragraph[stop - 1] in _CLOSES or paragraph[stop - 1] in "'\"＂"):
        stop -= 1
    mark = paragraph[stop - 1] if stop > 0 else ""
    if mark and mark in _CJK_STOPS:
        return True
    if not mark or mark not in ".!?" or stop < 2 or paragraph[stop - 2].isspace():
        return False
    if mark == "." and paragraph[stop - 2] == ".":
        return False
    return end < len(paragraph) and paragraph[end].isspace() and \
        not _CJK_START.match(paragraph, end)


def _enclosed_spans(paragraph: str) -> list[tuple[int, int]]:
    """(start, end) of each outermost matched bracket or quote pair, in order.

    Only pairs that close count, so a stray 「 does not swallow the rest of the paragraph.
    An ASCII ( or [ with a space after it, or ) or ] with a space before it, is a character the
    text talks about, not a bracket ("[ の次の文字が ! ならば…。 ] は…": man pages).
    """
    open_at: list[tuple[str, int]] = []  # (expected closer, position) of pairs still open
    spans = []
    for m in _BRACKET.finditer(paragraph):
        char = m.group()
        if char in "([" and (m.end() == len(paragraph) or paragraph[m.end()].isspace()):
            continue
        if char in ")]" and (m.start() == 0 or paragraph[m.start() - 1].isspace()):
            continue
        if char in _CLOSER_OF:
            open_at.append((_CLOSER_OF[char], m.start()))
        elif char in _SYMMETRIC and all(closer != char for closer, _ in open_at):
            open_at.append((char, m.start()))
        else:
            # A closer closes the innermost pair it matches; pairs opened inside that one and
            # never closed are dropped. A closer that matches nothing is ignored.
            for depth in range(len(open_at) - 1, -1, -1):
                if open_at[depth][0] == char:
                    spans.append((open_at[depth][1], m.end()))
                    del open_at[depth:]
                    break
    spans.sort()
    outermost: list[tuple[int, int]] = []
    for start, end in spans:
        if not outermost or start >= outermost[-1][1]:
            outermost.append((start, end))
    return outermost


# ----------------------------------------------------------------------------- detection

_SAMPLE = 1000  # characters of a document looked at: plenty to tell, cheap for long documents
_CJK_CHARS = re.compile(f"[{_HAN}{_KANA}]+")
_KANA_CHARS = re.compile(f"[{_KANA}]+")
_LATIN_WORD = re.compile(r"[A-Za-z\u00c0-\u024f]+")
# Words of letters that are neither Latin nor Han/kana: the scripts below, Hangul, Hebrew, …
_OTHER_WORD = re.compile(f"[^\\W\\d_A-Za-z\u00c0-\u024f{_HAN}{_KANA}]+")
# Scripts written by one language with rules of its own, or (Cyrillic: ru, uk, bg, kk; Arabic:
# ar, ur, fa; Devanagari: hi, mr) whose rules suit the script's other languages well enough.
_SCRIPT_LANGUAGE = [(0x0370, 0x03FF, "el"), (0x0400, 0x052F, "ru"), (0x0530, 0x058F, "hy"),
                    (0x0600, 0x06FF, "ar"), (0x0750, 0x077F, "ar"), (0x0900, 0x097F, "hi"),
                    (0x0980, 0x09FF, "bn"), (0x0A00, 0x0A7F, "pa"), (0x0A80, 0x0AFF, "gu"),
                    (0x0B80, 0x0BFF, "ta"), (0x0C00, 0x0C7F, "te"), (0x0C80, 0x0CFF, "kn"),
                    (0x0D00, 0x0D7F, "ml"), (0x1000, 0x109F, "my"), (0x1200, 0x139F, "am")]
_SCRIPT_STARTS = [start for start, _, _ in _SCRIPT_LANGUAGE]


def detect_language(text: str) -> str:
    """The code of the rules to split `text` with, from the scripts of its first 1,000 characters.

    Han and kana characters are counted against words of the alphabetic scripts (a character
    of Japanese or Chinese carries about as much as a word), and the largest count wins:
    Han/kana -> "ja" if at least a fifth of them are kana (Japanese prose has 30-60 %), else "zh"
    (so a Chinese article quoting a Japanese title in kana stays "zh"); Latin -> "en" (English
    rules suit other Latin-script languages well enough); Greek, Cyrillic, Armenian, Arabic, the
    Indic scripts, Myanmar and Ethiopic -> the language of _SCRIPT_LANGUAGE; scripts without
    rules of their own (Hangul, Hebrew, Thai, …) and text without letters -> "en". An English
    text naming 東京 stays "en".
    """
    sample = text[:_SAMPLE]
    if sample.isascii():
        return "en"  # most English documents: no need to count anything
    cjk = sum(map(len, _CJK_CHARS.findall(sample)))
    # Every word takes a character at least: with more Han/kana than anything else, they win
    # without counting words (most Japanese and Chinese documents).
    if cjk * 2 <= len(sample):
        counts = {"en": len(_LATIN_WORD.findall(sample))}
        for word in _OTHER_WORD.findall(sample):
            language = _script_language(word[0])
            counts[language] = counts.get(language, 0) + 1
        best = max(counts, key=counts.get)
        if cjk <= counts[best]:
            return best
    kana = sum(map(len, _KANA_CHARS.findall(sample)))
    return "ja" if kana * 5 >= cjk else "zh"


def _script_language(char: str) -> str:
    i = bisect.bisect_right(_SCRIPT_STARTS, ord(char)) - 1
    return _SCRIPT_LANGUAGE[i][2] if i >= 0 and ord(char) <= _SCRIPT_LANGUAGE[i][1] else "en"
