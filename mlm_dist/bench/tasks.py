"""Downstream tasks for `bench finetune`: the file formats a user already has, and the seeded
dev/test split of a task that comes as one file.

Two kinds of task:
  classification   one label per text: TSV (a header naming a `text` and a `label` column) or
                   JSONL (`{"text": ..., "label": ...}` a line)
  tokens           one tag per word: CoNLL, one word a line with its tag in the last column and
                   a blank line between sentences; tags in BIO (IOB2 or IOB1), BIOES or BMES
                   (M for a middle word), with or without a type (B-PER, B). Character-tagged
                   Chinese or Japanese is the same file with one character a line.

Standard library only: the command's parser imports this module to list the built-in tasks.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

from mlm_dist.errors import PathNotFoundError, UserError

CLASSIFICATION = "classification"
TOKENS = "tokens"
FORMATS = ("tsv", "jsonl", "conll")
# File name endings that say the format, so --format can usually be left out.
_SUFFIX_FORMATS = {".tsv": "tsv", ".jsonl": "jsonl", ".conll": "conll", ".bio": "conll",
                   ".iob": "conll", ".bmes": "conll"}
_TAG = re.compile(r"O|[BIEMS](-.+)?")


class TaskError(UserError, ValueError):
    """A fine-tuning task that cannot be read or split as given: its files, their format,
    their labels; the message names the file (and line) and the option to change."""


@dataclass(frozen=True)
class TextExample:
    text: str
    label: str


@dataclass(frozen=True)
class TaggedSentence:
    words: tuple[str, ...]
    tags: tuple[str, ...]


@dataclass
class Task:
    name: str
    kind: str  # CLASSIFICATION or TOKENS
    train: list
    dev: list
    test: list
    source: dict = field(default_factory=dict)  # where it came from, licence, what was dropped

    @property
    def labels(self) -> list[str]:
        """Every label (classification) or tag (tokens) of any split, sorted: the head's outputs.
        A label seen only in dev or test still gets an output, so predicting it is possible.
        Computed from the examples at each access: read it once outside loops."""
        found = set()
        for example in self.train + self.dev + self.test:
            found.update([example.label] if self.kind == CLASSIFICATION else example.tags)
        return sorted(found)

    def sizes(self) -> dict:
        return {"train": len(self.train), "dev": len(self.dev), "test": len(self.test)}


# ---------------------------------------------------------------------------------------------
# Readers


def format_of(path: str | Path, given: str | None) -> str:
    if given:
        return given
    found = _SUFFIX_FORMATS.get(Path(path).suffix.lower())
    if found is None:
        raise TaskError(f"cannot tell the format of {path} from its name; add --format "
                        + "|".join(FORMATS))
    return found


def read_examples(path: str | Path, fmt: str, text_field: str = "text",
                  label_field: str = "label") -> list:
    """The examples of one file: TextExample for tsv/jsonl, TaggedSentence for conll."""
    path = Path(path)
    if not path.is_file():
        raise PathNotFoundError(f"task file {path} does not exist")
    lines = path.read_text(encoding="utf-8").splitlines()
    if fmt == "tsv":
        examples = _read_tsv(path, lines, text_field, label_field)
    elif fmt == "jsonl":
        examples = _read_jsonl(path, lines, text_field, label_field)
    elif fmt == "conll":
        examples = read_conll_lines(path, lines)
    else:
        raise TaskError(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}")
    if not examples:
        raise TaskError(f"{path} holds no examples")
    return examples


def _read_tsv(path: Path, lines: list[str], text_field: str, label_field: str) -> list:
    header = lines[0].split("\t") if lines else []
    if text_field not in header or label_field not in header:
        raise TaskError(f"{path}: the first line must name the tab-separated columns, among "
                        f"them {text_field!r} and {label_field!r} (it is {header}); other "
                        "names: --text-field, --label-field")
    text_at, label_at = header.index(text_field), header.index(label_field)
    examples = []
    for n, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        cells = line.split("\t")
        if len(cells) != len(header):
            raise TaskError(f"{path}:{n}: {len(cells)} tab-separated cells, the header has "
                            f"{len(header)} (a tab inside a text?)")
        examples.append(_text_example(path, n, cells[text_at], cells[label_at]))
    return examples


def _read_jsonl(path: Path, lines: list[str], text_field: str, label_field: str) -> list:
    examples = []
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise TaskError(f"{path}:{n}: not a JSON object ({e.msg})") from None
        if not isinstance(record, dict) or text_field not in record or label_field not in record:
            raise TaskError(f"{path}:{n}: needs the keys {text_field!r} and {label_field!r} "
                            "(other names: --text-field, --label-field)")
        examples.append(_text_example(path, n, record[text_field], record[label_field]))
    return examples


def _text_example(path: Path, n: int, text, label) -> TextExample:
    text, label = str(text).strip(), str(label).strip()
    if not text or not label:
        raise TaskError(f"{path}:{n}: empty {'text' if not text else 'label'}")
    return TextExample(text, label)


def read_conll_lines(path: str | Path, lines: list[str]) -> list[TaggedSentence]:
    """Sentences of a CoNLL-style file: the word is the first column, the tag the last; other
    columns (part of speech, readings) are ignored; -DOCSTART- lines end a sentence."""
    sentences, words, tags = [], [], []
    for n, line in enumerate(lines + [""], start=1):
        cells = line.split()
        if not cells or cells[0] == "-DOCSTART-":
            if words:
                sentences.append(TaggedSentence(tuple(words), tuple(tags)))
            words, tags = [], []
            continue
        if len(cells) < 2:
            raise TaskError(f"{path}:{n}: a word and its tag, separated by whitespace, "
                            f"expected; found {line!r}")
        if not _TAG.fullmatch(cells[-1]):
            raise TaskError(f"{path}:{n}: {cells[-1]!r} is not a BIO, BIOES or BMES tag "
                            "(O, or B/I/E/M/S optionally followed by -TYPE)")
        words.append(cells[0])
        tags.append(cells[-1])
    return sentences


def kind_of(examples: list) -> str:
    return TOKENS if isinstance(examples[0], TaggedSentence) else CLASSIFICATION


# ---------------------------------------------------------------------------------------------
# Splits and cleaning


def complete_splits(train: list, dev: list | None, test: list | None, *, fraction: float,
                    seed: int) -> tuple[list, list, list, dict]:
    """(train, dev, test, note): the missing ones of dev and test taken out of train, each
    `fraction` of it, by a shuffle seeded with `seed` (so every model and every run of the
    command sees the same split). Train keeps its file order."""
    missing = [name for name, part in (("dev", dev), ("test", test)) if part is None]
    if not missing:
        return train, dev, test, {}
    if not 0 < fraction < 0.5:
        raise TaskError(f"--split-fraction {fraction}: choose a share between 0 and 0.5")
    take = round(len(train) * fraction)
    if take < 1 or len(train) - take * len(missing) < 1:
        raise TaskError(f"{len(train)} training examples are too few to take {fraction:.0%} "
                        f"each for {' and '.join(missing)}; give them as files "
                        f"(--{' --'.join(missing)})")
    order = list(range(len(train)))
    random.Random(seed).shuffle(order)
    parts, start = {}, 0
    for name in missing:
        parts[name] = [train[i] for i in order[start:start + take]]
        start += take
    kept = sorted(order[start:])
    note = {"split": f"{' and '.join(missing)} taken from train: {take} examples each, "
                     f"seeded shuffle (seed {seed})"}
    return ([train[i] for i in kept], parts.get("dev", dev), parts.get("test", test), note)


def distinct_examples(examples: list) -> tuple[list, dict]:
    """`examples` with each text (or word sequence) once, in first-seen order, and without the
    texts that carry two different labels (tag sequences): a repeated text would sit in train
    and test alike, and a contradicted one teaches nothing. Returns (kept, counts)."""
    labels: dict = {}
    for e in examples:
        labels.setdefault(_key(e), set()).add(_value(e))
    conflicting = {k for k, found in labels.items() if len(found) > 1}
    kept, seen = [], set()
    for e in examples:
        k = _key(e)
        if k not in conflicting and k not in seen:
            seen.add(k)
            kept.append(e)
    counts = {"read": len(examples), "kept": len(kept),
              "repeats_dropped": len(examples) - len(labels),
              "conflicting_dropped": len(conflicting)}
    return kept, counts


def _key(e):
    return e.text if isinstance(e, TextExample) else e.words


def _value(e):
    return e.label if isinstance(e, TextExample) else e.tags


def sample(examples: list, limit: int | None, seed: int) -> list:
    """At most `limit` of `examples` (a seeded choice, file order kept), for quick runs."""
    if not limit or limit >= len(examples):
        return examples
    chosen = sorted(random.Random(seed).sample(range(len(examples)), limit))
    return [examples[i] for i in chosen]


def file_task(train: str, dev: str | None, test: str | None, fmt: str | None, *,
              text_field: str, label_field: str, fraction: float, seed: int) -> Task:
    """A task from the user's files (`--train FILE [--dev FILE] [--test FILE]`); `fmt` None:
    each file's format from its name."""
    def read(path):
        if path is None:
            return None
        return read_examples(path, format_of(path, fmt), text_field, label_field)

    parts = [read(train), read(dev), read(test)]
    if len({kind_of(p) for p in parts if p is not None}) > 1:
        raise TaskError("--train, --dev and --test must be of one kind of task")
    train_part, dev_part, test_part, note = complete_splits(*parts, fraction=fraction, seed=seed)
    source = {"train": str(train), "dev": str(dev) if dev else None,
              "test": str(test) if test else None, "format": format_of(train, fmt), **note}
    return Task(Path(train).stem, kind_of(train_part), train_part, dev_part, test_part, source)
