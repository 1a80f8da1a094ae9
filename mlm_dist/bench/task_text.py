"""`mlm-dist bench task-text`: the unlabelled text of a task's training split, written as a
corpus `mlm-dist prepare` reads, to continue a model on the task's own text before fine-tuning
it (domain adaptation, as in the Hugging Face course's chapter on it):

  mlm-dist bench task-text --task en-sentiment --out reviews.txt
  mlm-dist prepare --input reviews.txt --tokenizer bert/ --out reviews-shards
  mlm-dist train --config … model.init_from=bert/ data.shards=reviews-shards …

Only the train split is written, split as `bench finetune` splits it given the same task
options (--split-fraction, --split-seed, --dev, --test): dev and test stay unseen, so the
fine-tuning figures after the adaptation are measured on text the model never read. A train
text that also stands in dev or test (a task file may repeat one) is left out as well.

The corpus is one sentence a line, a blank line between documents, and a document is one
example: one review, headline or phrase of a classification task, one sentence of a CoNLL task
with its words joined as the language writes them (spaces only between words of scripts written
with spaces). Each text is split into sentences in --lang, as `prepare` splits JSONL. Such
documents are a sentence or two, so next-sentence prediction has little to learn from them:
BERT's pairs give a one-sentence document a B from another document every time (they are all
"random"), and only documents of two sentences or more give "next" pairs. The MLM loss is what
the adaptation is for.
"""

from __future__ import annotations

import json
from pathlib import Path

from mlm_dist.bench.finetune_encode import join_words
from mlm_dist.bench.task_options import read_task
from mlm_dist.bench.tasks import CLASSIFICATION, Task, TaskError
from mlm_dist.data.corpus import write_txt_corpus
from mlm_dist.data.sentences import check_language, split_sentences
from mlm_dist.errors import PathExistsError


def example_text(task: Task, example) -> str:
    """The text of one example as it would be written: a classification text as it is, a
    tagged sentence's words joined as its language writes them (what fine-tuning reads too)."""
    if task.kind == CLASSIFICATION:
        return example.text
    return join_words(example.words)[0]


def train_documents(task: Task, lang: str) -> tuple[list[list[str]], dict]:
    """(the train split's texts as documents of sentences, counts): each example one
    document; texts that also stand in dev or test left out."""
    held_out = {example_text(task, e) for e in task.dev + task.test}
    documents, in_dev_or_test = [], 0
    for example in task.train:
        text = example_text(task, example)
        if text in held_out:
            in_dev_or_test += 1
            continue
        sentences = split_sentences(text, lang)
        if sentences:
            documents.append(sentences)
    return documents, {"train_examples": len(task.train),
                       "left_out_in_dev_or_test": in_dev_or_test}


def task_text_command(args) -> None:
    lang = check_language(args.lang)  # an unknown code stops here, before the task is read
    out = Path(args.out)
    if out.exists():
        raise PathExistsError(f"--out {out} already exists; choose another path or remove it")
    task = read_task(args)
    documents, counts = train_documents(task, lang)
    if not documents:
        raise TaskError(f"task {task.name}'s train split holds no text outside dev and test; "
                        "nothing to write")
    written = write_txt_corpus(out, documents)
    print(json.dumps({"task": task.name, "kind": task.kind, "split": "train",
                      "sizes": task.sizes(), **counts, "out": str(out), "lang": args.lang,
                      **written, "source": task.source}, ensure_ascii=False))
