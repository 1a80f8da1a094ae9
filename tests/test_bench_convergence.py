"""`mlm-dist bench convergence`: the reference's NSP instances follow Google's rules, its LR
schedule is ours, the corpora have the promised shapes, and the whole command runs end to end
(2 real DeepSpeed ranks, a real transformers reference) on a tiny corpus."""

from __future__ import annotations

import json
import math
import random
import shutil

import numpy as np
import pytest

from mlm_dist.bench.corpora import write_corpus
from mlm_dist.bench.google_instances import (create_instances_from_document,
                                             create_training_instances, truncate_seq_pair)
from mlm_dist.bench.reference_trainer import lr_factor

SENTENCE = 5  # tokens per sentence in the synthetic documents below


def numbered_documents(n_docs: int, rng: random.Random) -> list[list[np.ndarray]]:
    """Documents whose every token says where it came from: id = doc·10^6 + sentence·10 + pos.
    Sentences are SENTENCE tokens long, so truncation (which removes less than the overshoot
    of one sentence past the target) never removes a whole sentence."""
    return [[np.arange(SENTENCE) + d * 10**6 + s * 10 for s in range(rng.randint(1, 120))]
            for d in range(n_docs)]


def where(token) -> tuple[int, int]:
    return int(token) // 10**6, int(token) % 10**6 // 10


def sentences_of(tokens) -> list[int]:
    return sorted({where(t)[1] for t in tokens})


def test_instances_follow_google_rules():
    rng = random.Random(0)
    documents = numbered_documents(200, rng)
    max_seq_length = 64
    labels = []
    for index, document in enumerate(documents):
        instances = create_instances_from_document(documents, index, max_seq_length, 0.1, rng)
        next_sentence = 0  # the first sentence the next instance's A must start with
        for x in instances:
            a, b = x.tokens_a, x.tokens_b
            assert len(a) >= 1 and len(b) >= 1 and len(a) + len(b) <= max_seq_length - 3
            # A: consecutive sentences of this document, starting where the last pair stopped
            # (a random B puts the chunk's unused sentences back).
            assert {where(t)[0] for t in a} == {index}
            a_sentences = sentences_of(a)
            assert a_sentences == list(range(a_sentences[0], a_sentences[-1] + 1))
            assert a_sentences[0] == next_sentence
            b_docs = {where(t)[0] for t in b}
            assert len(b_docs) == 1
            if x.is_random_next:
                assert b_docs != {index}  # another document (200 to choose from, 10 tries)
                next_sentence = a_sentences[-1] + 1
            else:
                # The actual next: B starts with the sentence right after A's last.
                assert b_docs == {index}
                b_sentences = sentences_of(b)
                assert b_sentences == list(range(a_sentences[-1] + 1, b_sentences[-1] + 1))
                next_sentence = b_sentences[-1] + 1
            labels.append(x.is_random_next)
        assert next_sentence == len(document)  # every sentence was used, once, as A or B
    # Balanced: a coin per pair, plus the chunks of one sentence that must take a random B.
    assert len(labels) > 1000
    assert 0.45 < np.mean(labels) < 0.58


def test_training_instances_are_shuffled_passes_over_all_documents():
    rng = random.Random(1)
    documents = numbered_documents(20, rng)
    one_pass, passes = create_training_instances(documents, 64, 0.1, random.Random(2))
    assert passes == 1
    many, passes = create_training_instances(documents, 64, 0.1, random.Random(2),
                                             min_instances=3 * len(one_pass))
    assert passes >= 3 and len(many) >= 3 * len(one_pass)
    # ALL instances are shuffled: documents are interleaved, not one document after another.
    first_docs = [where(x.tokens_a[0])[0] for x in many[:50]]
    assert len(set(first_docs)) > 10


def google_truncate_seq_pair(tokens_a: list, tokens_b: list, max_num_tokens: int, rng):
    """create_pretraining_data.py's truncate_seq_pair, verbatim in substance."""
    while True:
        total_length = len(tokens_a) + len(tokens_b)
        if total_length <= max_num_tokens:
            break
        trunc_tokens = tokens_a if len(tokens_a) > len(tokens_b) else tokens_b
        assert len(trunc_tokens) >= 1
        if rng.random() < 0.5:
            del trunc_tokens[0]
        else:
            trunc_tokens.pop()


@pytest.mark.parametrize("la,lb,max_tokens", [(30, 10, 25), (10, 30, 25), (20, 20, 11),
                                              (3, 4, 10), (50, 49, 40)])
def test_truncation_makes_googles_choices(la, lb, max_tokens):
    a, b = np.arange(la), np.arange(100, 100 + lb)
    ours = truncate_seq_pair(a, b, max_tokens, random.Random(7))
    theirs_a, theirs_b = a.tolist(), b.tolist()
    google_truncate_seq_pair(theirs_a, theirs_b, max_tokens, random.Random(7))
    assert ours[0].tolist() == theirs_a and ours[1].tolist() == theirs_b


def test_reference_lr_schedule_is_ours():
    from mlm_dist.config import load_config
    from mlm_dist.optim import learning_rate_factor

    cfg = load_config(None, ["data.shards=x", "schedule.phases.0.until_step=50",
                             "optim.warmup_steps=7"])
    for step in range(55):
        assert lr_factor(step, 7, 50) == pytest.approx(learning_rate_factor(cfg, step))


def test_corpora_have_the_promised_shapes(tmp_path):
    from mlm_dist.data.corpus import iter_documents

    short = write_corpus("short", tmp_path / "short.txt", max_documents=40)
    docs = list(iter_documents([tmp_path / "short.txt"]))
    assert short["documents"] == len(docs) == 40
    assert all(1 <= len(d) <= 40 for d in docs)
    books = write_corpus("books", tmp_path / "books.txt", max_documents=3,
                         book_sentences=(30, 60))
    docs = list(iter_documents([tmp_path / "books.txt"]))
    assert books["documents"] == len(docs) == 3
    assert all(30 <= len(d) <= 60 for d in docs)
    with pytest.raises(FileExistsError):
        write_corpus("short", tmp_path / "short.txt")


def test_bench_convergence_end_to_end(tmp_path, capsys):
    """Both sides train 4 steps of the tiny model on 2 ranks / 2 threads; one evaluation."""
    from mlm_dist.cli import main

    out = tmp_path / "bench"
    command = ["bench", "convergence", "--corpus", "short", "--out", str(out), "--steps", "4",
               "--every", "2", "--max-documents", "150", "--vocab-size", "600",
               "--valid-fraction", "0.1",
               "schedule.phases.0.micro_batch=4", "schedule.phases.0.global_batch=8",
               "optim.warmup_steps=1", "train.log_every=2", "eval.max_pairs=64"]
    main(command)
    result = json.loads(capsys.readouterr().out)
    ours, reference = result["ours"], result["reference"]
    for side in (ours, reference):
        for key in ("val_mlm_loss", "val_mlm_acc", "val_nsp_acc", "train_seconds", "tokens"):
            assert math.isfinite(side[key]), key
        assert side["steps"] == 4 and [p["step"] for p in side["curve"]] == [0, 2, 4]
    assert ours["tokens"] == reference["tokens"] == 4 * 8 * 128
    # One initial model for both: the same weights score the same at step 0.
    assert ours["curve"][0] == reference["curve"][0]
    assert set(result["delta"]) >= {"val_mlm_loss", "val_nsp_acc", "train_seconds"}
    assert isinstance(result["targets_hold"], bool)
    png = out / "convergence.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((out / "result.json").read_text()) == result

    # Our side gone and other settings: refused before ours trains again, not after.
    shutil.rmtree(out / "ours")
    with pytest.raises(SystemExit):
        main([*command, "train.seed=5"])
    assert "reference was trained with another config" in capsys.readouterr().err
    assert not (out / "ours").exists()
