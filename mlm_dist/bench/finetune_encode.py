"""Task examples -> model inputs for `bench finetune`, and the word <-> piece alignment of
token classification.

A tagged sentence is turned back into the text it was cut from, and the tokenizer's character
offsets say which pieces hold which word; each word's tag goes on the first piece that holds
one of its characters, the other pieces are not scored (-100). Two other ways look simpler and
are wrong for our tokenizers:
  - `is_split_into_words=True` tokenizes each word as if it followed a space. A SentencePiece
    tokenizer then starts every word, and so every character of character-tagged Chinese, with
    a piece "▁" of its own, and the tag lands on that "▁": the model is asked to tag spaces
    that the pretraining text never had (entity F1 0.0 in issue 21's pilot).
  - Words joined with spaces for every language: Japanese and Chinese text has none, so the
    pieces differ from the ones pretraining saw.
So words are joined as the language writes them (a space only where neither side is a
character of a script written without spaces), and a piece that is only the word-boundary
mark ("▁" before the first word, or a space) never takes a tag.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mlm_dist.bench.tasks import CLASSIFICATION, Task
from mlm_dist.errors import UsageError

IGNORE = -100  # the label torch's cross-entropy (and transformers' heads) skip

# Scripts written without spaces between words: CJK ideographs, kana, CJK punctuation and
# full-width forms, Thai, Lao, Khmer, Myanmar. (Hangul is written with spaces.)
_NO_SPACE_RANGES = ((0x0E00, 0x0EFF), (0x1000, 0x109F), (0x1780, 0x17FF), (0x2E80, 0x2FDF),
                    (0x3000, 0x30FF), (0x3190, 0x31FF), (0x3400, 0x4DBF), (0x4E00, 0x9FFF),
                    (0xF900, 0xFAFF), (0xFE30, 0xFE4F), (0xFF00, 0xFFEF), (0x20000, 0x3134F))


def written_without_spaces(ch: str) -> bool:
    c = ord(ch)
    return any(lo <= c <= hi for lo, hi in _NO_SPACE_RANGES)


def join_words(words) -> tuple[str, list[tuple[int, int]]]:
    """(text, the [start, end) character span of each word in it)."""
    parts, spans, pos = [], [], 0
    for i, word in enumerate(words):
        if i and not (written_without_spaces(words[i - 1][-1]) or written_without_spaces(word[0])):
            parts.append(" ")
            pos += 1
        parts.append(word)
        spans.append((pos, pos + len(word)))
        pos += len(word)
    return "".join(parts), spans


def first_pieces(spans, offsets, skip) -> list[int | None]:
    """For each word span, the index of the first piece that holds one of its characters (None
    when no piece does: the text was cut at max_length, or the word normalises to nothing).
    A piece that spans the end of one word and the start of the next is the first piece of
    both. `skip[t]`: piece t holds no text of any word (special tokens, a bare "▁")."""
    firsts, t = [], 0
    for start, end in spans:
        while t < len(offsets) and (skip[t] or offsets[t][1] <= start):
            t += 1
        firsts.append(t if t < len(offsets) and offsets[t][0] < end else None)
    return firsts


@dataclass
class Encoded:
    """One split, ready for the model: token ids and labels per example, and for token tasks
    where each word's prediction is read (`firsts`) and the gold tags it is scored against."""
    input_ids: list[list[int]]
    labels: list  # an id per example (classification) or per piece (tokens, IGNORE where unscored)
    firsts: list[list[int | None]] = field(default_factory=list)
    gold: list = field(default_factory=list)  # label ids (classification) / tag strings (tokens)
    counts: dict = field(default_factory=dict)


def encode(tokenizer, task: Task, split: list, max_length: int) -> Encoded:
    if not tokenizer.is_fast:
        raise UsageError(f"{tokenizer.name_or_path}: bench finetune needs a fast tokenizer "
                         "(tokenizer.json): it reads the character offsets of the pieces")
    label_ids = {label: i for i, label in enumerate(task.labels)}
    if task.kind == CLASSIFICATION:
        return _encode_texts(tokenizer, split, label_ids, max_length)
    return _encode_tagged(tokenizer, split, label_ids, max_length)


def _encode_texts(tokenizer, examples, label_ids, max_length) -> Encoded:
    # The overflow comes back as extra rows: a text with more than one row was cut.
    enc = tokenizer([e.text for e in examples], truncation=True, max_length=max_length,
                    return_overflowing_tokens=True)
    ids, cut = [], set()
    for seq, i in zip(enc["input_ids"], enc["overflow_to_sample_mapping"]):
        if i < len(ids):
            cut.add(i)
        else:
            ids.append(seq)
    labels = [label_ids[e.label] for e in examples]
    return Encoded(ids, labels, gold=labels, counts={"examples": len(examples),
                                                     "cut_at_max_length": len(cut)})


def _encode_tagged(tokenizer, sentences, tag_ids, max_length) -> Encoded:
    joined = [join_words(s.words) for s in sentences]
    enc = tokenizer([text for text, _ in joined], truncation=True, max_length=max_length,
                    return_offsets_mapping=True, return_special_tokens_mask=True)
    blank = _blank_pieces(tokenizer)
    out = Encoded([], [], counts={"sentences": len(sentences), "words": 0,
                                  "words_sharing_a_piece": 0, "words_without_a_piece": 0})
    for s, (_, spans), ids, offsets, special in zip(sentences, joined, enc["input_ids"],
                                                   enc["offset_mapping"],
                                                   enc["special_tokens_mask"]):
        skip = [bool(sp) or a == b or blank(i) for i, (a, b), sp in zip(ids, offsets, special)]
        firsts = first_pieces(spans, offsets, skip)
        labels = [IGNORE] * len(ids)
        for tag, t in zip(s.tags, firsts):
            if t is not None and labels[t] == IGNORE:  # a shared piece keeps the first word's tag
                labels[t] = tag_ids[tag]
        out.input_ids.append(ids)
        out.labels.append(labels)
        out.firsts.append(firsts)
        out.gold.append(list(s.tags))
        out.counts["words"] += len(firsts)
        out.counts["words_without_a_piece"] += firsts.count(None)
        out.counts["words_sharing_a_piece"] += sum(
            t is not None and t == prev for prev, t in zip([None] + firsts, firsts))
    return out


def _blank_pieces(tokenizer):
    """is_blank(id): the piece decodes to nothing but whitespace (SentencePiece's lone "▁")."""
    cache: dict[int, bool] = {}

    def is_blank(i: int) -> bool:
        if i not in cache:
            cache[i] = not tokenizer.decode([i]).strip()
        return cache[i]
    return is_blank
