"""`mlm-dist bench convergence`: the reference's NSP instances follow Google's rules and its
sentence-order instances ALBERT's (but for a lone sentence, cut as ours cuts it), its mlm
blocks are run_mlm.py's grouped texts, its LR schedule is ours, the corpora have the promised
shapes, seeds are summarised by mean and sample spread, and the whole command runs end to end
for bert and mlm (2 real DeepSpeed ranks, a real transformers reference) on a tiny corpus."""

from __future__ import annotations

import importlib.metadata
import json
import math
import random
import shutil
from pathlib import Path

import numpy as np
import pytest

import mlm_dist
from mlm_dist.bench.convergence import source_digest
from mlm_dist.bench.corpora import write_corpus
from mlm_dist.bench.google_instances import (create_instances_from_document,
                                             create_training_instances, truncate_seq_pair)
from mlm_dist.bench.convergence_result import (mean_and_spread, standard_error_of_difference,
                                               targets_of)
from mlm_dist.bench.grouped_texts import GROUP_TEXTS_BATCH, group_texts, training_blocks
from mlm_dist.bench.reference_trainer import lr_factor
from mlm_dist.config import ObjectiveConfig
from mlm_dist.objectives import objective_for

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


def test_sentence_order_instances_follow_alberts_rules():
    """ALBERT's create_pretraining_data.py (random_next_sentence=False): B is the rest of A's
    chunk, the two swapped half the time; a chunk of one sentence is cut in two at a token, as
    ours cuts it (where ALBERT's script takes a random B), so B never leaves A's document."""
    rng = random.Random(3)
    documents = numbered_documents(200, rng)
    swapped, in_order, cut = 0, 0, 0
    for index, document in enumerate(documents):
        next_sentence = 0  # the first sentence of this document not yet in a pair
        for x in create_instances_from_document(documents, index, 64, 0.1, rng,
                                                sentence_order=True):
            a_docs, b_docs = {where(t)[0] for t in x.tokens_a}, {where(t)[0] for t in x.tokens_b}
            assert a_docs == b_docs == {index}
            first, second = (x.tokens_b, x.tokens_a) if x.is_random_next else (x.tokens_a,
                                                                                x.tokens_b)
            a, b = sentences_of(first), sentences_of(second)
            if a == b:  # one sentence, cut in two: unswapped, its start and then its rest
                assert a == [next_sentence]
                assert np.concatenate([first, second]).tolist() == document[a[0]].tolist()
                assert len(first) and len(second)
                cut += 1
            else:  # two consecutive runs of sentences, in the document's order once unswapped
                assert a[0] == next_sentence
                assert a == list(range(a[0], a[-1] + 1))
                assert b == list(range(a[-1] + 1, b[-1] + 1))
            swapped += x.is_random_next
            in_order += not x.is_random_next
            next_sentence = b[-1] + 1
        assert next_sentence == len(document)  # every sentence used once
    assert swapped > 500 and 0.42 < swapped / (swapped + in_order) < 0.58
    assert 0 < cut < 0.1 * (swapped + in_order)


def run_mlm_group_texts(examples: dict, max_seq_length: int) -> dict:
    """run_mlm.py's group_texts, verbatim in substance."""
    concatenated_examples = {k: sum(examples[k], []) for k in examples}
    total_length = len(concatenated_examples[list(examples.keys())[0]])
    total_length = (total_length // max_seq_length) * max_seq_length
    return {k: [t[i: i + max_seq_length] for i in range(0, total_length, max_seq_length)]
            for k, t in concatenated_examples.items()}


def test_mlm_blocks_are_run_mlms_grouped_texts():
    rng = random.Random(4)
    # Enough documents for three map batches: each batch drops its own remainder.
    documents = [[np.arange(rng.randint(1, 9)) + 1000 * d + 10 * s
                  for s in range(rng.randint(1, 4))] for d in range(2 * GROUP_TEXTS_BATCH + 300)]
    blocks = group_texts(documents, 16, cls_id=2, sep_id=3)
    # What run_mlm.py gets from the tokenizer for each text: [CLS] text [SEP].
    texts = [[2, *np.concatenate(d).tolist(), 3] for d in documents]
    theirs = []
    for start in range(0, len(texts), GROUP_TEXTS_BATCH):  # map(batched=True)
        theirs += run_mlm_group_texts({"input_ids": texts[start:start + GROUP_TEXTS_BATCH]},
                                      16)["input_ids"]
    assert blocks.tolist() == theirs
    rows, epochs = training_blocks(blocks, 2 * len(blocks) + 5, random.Random(0))
    assert epochs == 3 and len(rows) == 2 * len(blocks) + 5
    # Each epoch hands out every block once, in a new order.
    first = [r.tolist() for r in rows[:len(blocks)]]
    assert sorted(first) == sorted(blocks.tolist()) and first != blocks.tolist()
    assert first != [r.tolist() for r in rows[len(blocks):2 * len(blocks)]]


def test_seeds_are_summarised_by_mean_and_sample_spread():
    runs = [{"val_mlm_loss": 1.0, "train_seconds": 10.0},
            {"val_mlm_loss": 2.0, "train_seconds": 12.0},
            {"val_mlm_loss": 4.0, "train_seconds": 14.0}]
    s = mean_and_spread(runs, ["val_mlm_loss", "train_seconds"])
    assert s["mean"] == {"val_mlm_loss": pytest.approx(7 / 3), "train_seconds": 12.0}
    # Sample standard deviation (n - 1): sqrt(((1-7/3)² + (2-7/3)² + (4-7/3)²) / 2) = sqrt(7/3)
    assert s["std"]["val_mlm_loss"] == pytest.approx(math.sqrt(7 / 3))
    assert s["std"]["train_seconds"] == pytest.approx(2.0)
    assert mean_and_spread(runs[:1], ["val_mlm_loss"])["std"] == {"val_mlm_loss": None}
    # The difference of two means of 3 and 2 seeds: sqrt(7/3 / 3 + 2² / 2) = sqrt(25/9)
    error = standard_error_of_difference(s["std"], {"val_mlm_loss": 2.0, "train_seconds": None},
                                         3, 2)
    assert error == {"val_mlm_loss": pytest.approx(5 / 3), "train_seconds": None}

    sop, mlm, electra = (objective_for(ObjectiveConfig(name=name))
                         for name in ("sop", "mlm", "electra"))
    ours = {"val_mlm_loss": 6.115, "val_sop_acc": 0.70, "train_seconds": 100.0}
    reference = {"val_mlm_loss": 6.10, "val_sop_acc": 0.705, "train_seconds": 400.0}
    assert all(targets_of(ours, reference, sop).values())
    assert len(targets_of(ours, reference, sop)) == 3
    worse = {**ours, "val_mlm_loss": 6.121}
    assert not targets_of(worse, reference, mlm)[
        "val_mlm_loss mean <= reference mean + 0.02"]
    assert len(targets_of(ours, reference, mlm)) == 2  # mlm: no pair task
    # electra: the generator's MLM loss, and the discriminator's RTD accuracy and AUC.
    ours = {"val_gen_mlm_loss": 6.5, "val_rtd_acc": 0.90, "val_rtd_auc": 0.70,
            "train_seconds": 100.0}
    reference = {"val_gen_mlm_loss": 6.49, "val_rtd_acc": 0.905, "val_rtd_auc": 0.72,
                 "train_seconds": 400.0}
    assert targets_of(ours, reference, electra) == {
        "val_gen_mlm_loss mean <= reference mean + 0.02": True,
        "val_rtd_acc mean >= reference mean - 0.01": True,
        "val_rtd_auc mean >= reference mean - 0.01": False,
        "train_seconds mean < reference mean": True}


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


def test_source_digest_changes_with_any_source_file_and_only_with_them(tmp_path):
    """A kept side is reused only under the digest it was trained with: an edit, a new or a
    renamed source file changes it; bytecode and other files do not."""
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "a.py").write_text("x = 1\n")
    (package / "sub" / "b.yaml").write_text("k: 1\n")
    first = source_digest(package)
    (package / "sub" / "b.cpython-311.pyc").write_bytes(b"\0")
    (package / "notes.txt").write_text("not code")
    assert source_digest(package) == first
    (package / "sub" / "b.yaml").write_text("k: 2\n")
    edited = source_digest(package)
    assert edited != first
    (package / "a.py").rename(package / "c.py")
    assert source_digest(package) not in (first, edited)


def tiny_convergence(out) -> list[str]:
    """`bench convergence` of 4 steps of the tiny model on 2 ranks / 2 threads, under `out`."""
    return ["bench", "convergence", "--corpus", "short", "--out", str(out), "--steps", "4",
            "--every", "2", "--max-documents", "150", "--vocab-size", "600",
            "--valid-fraction", "0.1",
            "schedule.phases.0.micro_batch=4", "schedule.phases.0.global_batch=8",
            "optim.warmup_steps=1", "train.log_every=2", "eval.max_pairs=64"]


def test_bench_convergence_end_to_end(tmp_path, capsys):
    """Both sides train 4 steps of the tiny model on 2 ranks / 2 threads, for bert and then mlm
    on the same shards; one evaluation each; a rerun reuses every stage."""
    from mlm_dist.cli import main

    out = tmp_path / "bench"
    command = tiny_convergence(out)
    results = {}
    for objective, pair_acc in (("bert", "val_nsp_acc"), ("mlm", None)):
        main([*command, f"objective.name={objective}"])
        result = results[objective] = json.loads(capsys.readouterr().out)
        assert result["objective"] == objective and result["seeds"] == [1234]
        assert result["setup"]["reference"] == ("BertForMaskedLM" if objective == "mlm"
                                                else "BertForPreTraining")
        for side in (result["ours"], result["reference"]):
            (run,) = side["runs"]
            assert run["seed"] == 1234
            for key in ("val_mlm_loss", "val_mlm_acc", "val_perplexity", "train_seconds",
                        "tokens"):
                assert math.isfinite(run[key]), key
            assert (pair_acc in run) == (pair_acc is not None)
            assert not any(k.startswith(("val_nsp", "val_sop")) for k in run) or pair_acc
            assert run["steps"] == 4 and [p["step"] for p in run["curve"]] == [0, 2, 4]
            assert side["mean"]["val_mlm_loss"] == run["val_mlm_loss"]
            assert side["std"]["val_mlm_loss"] is None  # one seed: no spread
        ours, reference = result["ours"]["runs"][0], result["reference"]["runs"][0]
        assert ours["tokens"] == reference["tokens"] == 4 * 8 * 128
        # One initial model for both: the same weights score the same at step 0.
        assert ours["curve"][0] == reference["curve"][0]
        assert set(result["delta"]) >= {"val_mlm_loss", "train_seconds"}
        assert result["delta_standard_error"]["val_mlm_loss"] is None  # one seed a side
        assert isinstance(result["targets_hold"], bool)
        png = out / objective / "convergence.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert json.loads((out / objective / "result.json").read_text()) == result
    # mlm's rows are full: its reference's blocks and our rows carry (nearly) no padding,
    # where bert's pairs leave some.
    mlm_ours = results["mlm"]["ours"]["runs"][0]
    assert mlm_ours["real_tokens"] > 0.97 * mlm_ours["tokens"]
    assert results["bert"]["ours"]["runs"][0]["real_tokens"] < mlm_ours["real_tokens"]

    # Run again: every stage is reused (nothing trains, nothing is scored anew).
    main([*command, "objective.name=mlm"])
    captured = capsys.readouterr()
    assert json.loads(captured.out)["ours"] == results["mlm"]["ours"]
    assert "[4/6]" not in captured.err and "[6/6]" not in captured.err

    # A side trained by other sources (an edit since, here written into its record) is
    # refused, not averaged with new runs; the result names the code that produced it.
    assert results["mlm"]["setup"]["code"] == source_digest(Path(mlm_dist.__file__).parent)
    assert results["mlm"]["setup"]["libraries"]["torch"] == importlib.metadata.version("torch")
    record = out / "mlm" / "seed-1234" / "ours" / "bench.json"
    kept = json.loads(record.read_text())
    kept["signature"]["code"] = "0" * 64
    record.write_text(json.dumps(kept))
    with pytest.raises(SystemExit):
        main([*command, "objective.name=mlm"])
    assert "ours was trained with other mlm_dist sources" in capsys.readouterr().err

    # Our side gone and other settings: refused before ours trains again, not after.
    shutil.rmtree(out / "bert" / "seed-1234" / "ours")
    with pytest.raises(SystemExit):
        main([*command, "optim.lr=5e-4"])
    assert "reference was trained with another config" in capsys.readouterr().err
    assert not (out / "bert" / "seed-1234" / "ours").exists()


def test_bench_convergence_of_electra_end_to_end(tmp_path, capsys):
    """electra against transformers' ElectraForMaskedLM + ElectraForPreTraining: both sides
    train 4 tiny steps, the one evaluation scores both in our network, and the result compares
    the generator's MLM loss and the discriminator's RTD figures."""
    from mlm_dist.cli import main

    out = tmp_path / "bench"
    main([*tiny_convergence(out), "objective.name=electra"])
    result = json.loads(capsys.readouterr().out)
    assert result["objective"] == "electra"
    assert result["setup"]["reference"] == "ElectraForMaskedLM + ElectraForPreTraining"
    for side in (result["ours"], result["reference"]):
        (run,) = side["runs"]
        for key in ("val_gen_mlm_loss", "val_gen_mlm_acc", "val_rtd_acc", "val_rtd_auc",
                    "val_rtd_loss", "val_replaced_frac", "train_seconds", "tokens"):
            assert math.isfinite(run[key]), key
        assert not any(k.startswith(("val_mlm", "val_nsp", "val_sop")) for k in run)
        assert run["steps"] == 4 and [p["step"] for p in run["curve"]] == [0, 2, 4]
        assert 0 < run["val_replaced_frac"] < 0.16
        assert side["mean"]["val_gen_mlm_loss"] == run["val_gen_mlm_loss"]
    ours, reference = result["ours"]["runs"][0], result["reference"]["runs"][0]
    assert ours["tokens"] == reference["tokens"] == 4 * 8 * 128
    assert ours["curve"][0] == reference["curve"][0]  # one initial model for both
    # Both trained: the generator's loss fell from the shared start on either side.
    for run in (ours, reference):
        assert run["val_gen_mlm_loss"] < run["curve"][0]["val_gen_mlm_loss"]
    assert set(result["targets"]) == {
        "val_gen_mlm_loss mean <= reference mean + 0.02",
        "val_rtd_acc mean >= reference mean - 0.01",
        "val_rtd_auc mean >= reference mean - 0.01", "train_seconds mean < reference mean"}
    assert (out / "electra" / "convergence.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
