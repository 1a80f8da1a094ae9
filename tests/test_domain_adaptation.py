"""Continuing MLM from a Hugging Face BERT (its WordPiece tokenizer, config and weights) on new
text: prepare with its tokenizer, train with model.init_from, perplexity before and after; and
the whole domain adaptation of a task: its train texts (`bench task-text`), the continued run,
fine-tuning before and after."""

import itertools
import json
import math

import pytest
import torch
from tokenizers.implementations import BertWordPieceTokenizer
from transformers import BertConfig, BertForPreTraining

from launch import cli, metrics, records, train
from mlm_dist.bench.tasks import file_task
from mlm_dist.config import DataConfig
from mlm_dist.data.corpus import iter_documents
from mlm_dist.demo.stdlib_corpus import stdlib_documents
from mlm_dist.tokenizer import Tokenizer, sentences_of


def wordpiece_folder(out, corpus, vocab_size: int) -> BertWordPieceTokenizer:
    """`out` made a folder with a lower-casing WordPiece vocab.txt trained on `corpus`, as a
    downloaded BERT's; the weights are the caller's."""
    out.mkdir()
    wordpiece = BertWordPieceTokenizer(lowercase=True)
    wordpiece.train([str(corpus)], vocab_size=vocab_size,
                    special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])
    wordpiece.save_model(str(out))
    (out / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": True}))
    return wordpiece


@pytest.fixture(scope="module")
def hf_bert(tmp_path_factory, tiny_corpus):
    """A small BERT folder as `save_pretrained` writes it, with a WordPiece vocab.txt."""
    out = tmp_path_factory.mktemp("hf") / "bert"
    wordpiece = wordpiece_folder(out, tiny_corpus, 500)
    config = BertConfig(vocab_size=wordpiece.get_vocab_size(), hidden_size=64,
                        num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                        max_position_embeddings=64)
    BertForPreTraining(config).save_pretrained(out)
    return out


def test_wordpiece_tokenizer_reads_the_folder(hf_bert):
    tok = Tokenizer.load(hf_bert)
    assert tok.cls_id == 2 and tok.mask_id == 4 and tok.vocab_size == 500
    ids = tok.encode("Returns the unbelievably long value.")
    starts = tok.vocabulary.word_start
    assert any(not starts[i] for i in ids)  # '##' continuations are not word starts
    assert all(starts[[tok.pad_id, tok.cls_id, tok.sep_id, tok.mask_id]])


def test_continue_pretraining_lowers_perplexity(hf_bert, tiny_corpus, tmp_path):
    shards = tmp_path / "shards"
    cli("prepare", "--input", str(tiny_corpus), "--tokenizer", str(hf_bert), "--out",
        str(shards), "--docs-per-shard", "40", "--valid-fraction", "0.1", "--quiet")
    evaluate = ("--data", str(shards), "--seq-len", "64", "--max-pairs", "32", "--micro-batch", "8")
    before = json.loads(cli("eval", "--checkpoint", str(hf_bert), *evaluate).stdout
                        .splitlines()[-1])
    run = tmp_path / "run"
    train(shards, run, f"model.init_from={hf_bert}", "masking.whole_word=true",
          "schedule.phases.0.until_step=30", "optim.lr=2e-3")
    # the run took the checkpoint's shape, not the tiny config's
    assert "vocab_size: 500" in (run / "config.yaml").read_text()
    after = json.loads(cli("eval", "--checkpoint", str(run), *evaluate).stdout.splitlines()[-1])
    assert after["val/perplexity"] < before["val/perplexity"], (before, after)
    assert metrics(run)[-1]["step"] == 30
    # the export keeps the WordPiece tokenizer
    cli("export-hf", "--checkpoint", str(run), "--out", str(tmp_path / "hf"))
    assert (tmp_path / "hf" / "vocab.txt").is_file()


def test_tokenizer_mismatch_is_a_clear_error(hf_bert, tiny_shards, tmp_path):
    proc = train(tiny_shards, tmp_path / "run", f"model.init_from={hf_bert}",
                 launcher="alone", check=False)
    assert proc.returncode == 2
    assert "were not made with" in proc.stderr and "tokenizer" in proc.stderr


@pytest.mark.parametrize("file", ["vocab.txt", "tokenizer.json"])
def test_wordpiece_text_never_becomes_special_ids(hf_bert, tmp_path, file):
    """Corpus text is text: a literal "[SEP]" must not become a separator in prepared shards.
    Only encode(parse_mask=True), as fill-mask uses it, turns "[MASK]" into the mask id."""
    if file == "tokenizer.json":
        BertWordPieceTokenizer(str(hf_bert / "vocab.txt"), lowercase=True).save(str(tmp_path / file))
    tok = Tokenizer.load(hf_bert if file == "vocab.txt" else tmp_path)
    assert tok.path.name == file
    specials = {tok.pad_id, tok.unk_id, tok.cls_id, tok.sep_id, tok.mask_id}
    text = "a [SEP] b [MASK] c [CLS] [PAD] [UNK] x[SEP]y"
    assert not specials & set(tok.encode(text))
    assert not specials & {i for ids in tok.encode_batch([text, "[MASK]"]) for i in ids}
    assert tok.encode("[SEP]") == tok.encode("[ sep ]")  # the characters, as any other text

    masked = tok.encode("the [MASK] of it [MASK].", parse_mask=True)
    assert masked == (tok.encode("the") + [tok.mask_id] + tok.encode("of it") + [tok.mask_id]
                      + tok.encode("."))
    assert tok.encode("a [SEP] b", parse_mask=True) == tok.encode("a [SEP] b")


# ---------------------------------------------------------------------------------------------
# Domain adaptation end to end, as the Hugging Face course's chapter does it: a BERT folder,
# continued on a task's own unlabelled text (its train split, by `bench task-text`), then
# fine-tuned before and after on the task.


@pytest.fixture(scope="module")
def general_bert(tiny_corpus, tmp_path_factory):
    """A BERT folder of the general domain (tiny_corpus) that knows something, as a downloaded
    one does: how common each of its pieces is there (its MLM output bias holds their log
    frequencies). Its loss is then well below ln(vocabulary) = that of random weights, which
    tells whether a run started from it. 2,000 WordPiece pieces, for a wide gap."""
    out = tmp_path_factory.mktemp("general") / "bert"
    wordpiece = wordpiece_folder(out, tiny_corpus, 2000)
    vocab = wordpiece.get_vocab_size()
    counts = torch.ones(vocab)
    for sentence in sentences_of(iter_documents([tiny_corpus])):
        counts += torch.bincount(torch.tensor(wordpiece.encode(sentence, add_special_tokens=False)
                                              .ids, dtype=torch.long), minlength=vocab)
    config = BertConfig(vocab_size=vocab, hidden_size=64, num_hidden_layers=2,
                        num_attention_heads=4, intermediate_size=128, max_position_embeddings=64)
    torch.manual_seed(0)
    model = BertForPreTraining(config)
    with torch.no_grad():
        model.cls.predictions.bias.copy_((counts / counts.sum()).log())
    model.save_pretrained(out)
    return out


def _task_examples(tiny_corpus) -> list[dict]:
    """A task from another part of the standard library than tiny_corpus (its first docstrings):
    a docstring's first sentences, labelled by whether they mention returning."""
    seen = sum(1 for _ in iter_documents([tiny_corpus]))
    documents = itertools.islice(stdlib_documents(), seen, seen + 200)
    return [{"text": " ".join(doc[:3]), "label": int("return" in " ".join(doc[:3]).lower())}
            for doc in documents]


def test_adapting_to_a_tasks_text_then_fine_tuning_before_and_after(general_bert, tiny_corpus,
                                                                    tmp_path):
    task = tmp_path / "task.jsonl"
    task.write_text("".join(json.dumps(e) + "\n" for e in _task_examples(tiny_corpus)))

    # 1. the train split's texts, as a corpus: nothing of dev or test
    text = tmp_path / "task.txt"
    written = json.loads(cli("bench", "task-text", "--train", str(task), "--out",
                             str(text)).stdout)
    split = file_task(str(task), None, None, None, text_field="text", label_field="label",
                      fraction=0.1, seed=0)  # bench finetune's split of the same file
    corpus = [" ".join(doc) for doc in iter_documents([text])]
    assert corpus == [e.text for e in split.train] and written["documents"] == len(split.train)
    assert written["sentences"] > written["documents"]  # each text split into its sentences
    assert not set(corpus) & {e.text for e in split.dev + split.test}

    # 2. perplexity on held-out task text: the folder, then the run continued from it
    shards = tmp_path / "shards"
    cli("prepare", "--input", str(text), "--tokenizer", str(general_bert), "--out", str(shards),
        "--valid-fraction", "0.2", "--quiet")
    evaluate = ("--data", str(shards), "--seq-len", "64", "--max-pairs", "0", "--micro-batch", "8")
    before = json.loads(cli("eval", "--checkpoint", str(general_bert), *evaluate).stdout)
    assert before["val/mlm_loss"] < math.log(2000) - 0.5  # it knows the common pieces
    run = tmp_path / "run"
    # The eval of a folder reads and masks with the default data and masking settings: the run
    # keeps them (tests/launch.py's shuffle buffer is smaller), so both see the same pairs and
    # masks. It evaluates after every step, as `eval` does (one pass, batches of 8).
    train(shards, run, f"model.init_from={general_bert}", "schedule.phases.0.until_step=30",
          "optim.lr=2e-3", f"data.shuffle_buffer={DataConfig.shuffle_buffer}", "eval.every=1")
    val = {r["step"]: r["val/mlm_loss"] for r in records(run) if "val/mlm_loss" in r}
    # The run starts where the folder is: one small step (lr 4e-4) from the folder's figure,
    # where random weights would be ~0.7 above it.
    assert abs(val[1] - before["val/mlm_loss"]) < 0.05, (val, before)
    after = json.loads(cli("eval", "--checkpoint", str(run), *evaluate).stdout)
    assert after["val/mlm_loss"] == pytest.approx(val[30], abs=0.02)  # the run's last figure
    for same in ("val/sequences", "val/predictions", "val/mask_rate"):
        assert after[same] == before[same], (same, before, after)
    assert after["val/perplexity"] < 0.8 * before["val/perplexity"], (before, after)

    # 3. downstream, before and after side by side, scored on dev and test: step 1 left them out
    out = cli("bench", "finetune", "--model", str(general_bert), "--compare", str(run),
              "--train", str(task), "--seeds", "1", "--lrs", "1e-3", "--epochs", "2")
    report = json.loads(out.stdout)
    assert report["task"]["sizes"] == written["sizes"]
    assert list(report["side_by_side"]) == ["model", "random weights", "compare 1"]
    folder, _, adapted = report["models"]
    assert folder["source"] == f"Hugging Face folder {general_bert}"
    assert adapted["source"].startswith("checkpoint ") and adapted["weights"] == "pretrained"
    for m in report["models"]:
        assert 0 <= m["test"]["accuracy"]["mean"] <= 1


def test_task_text_of_a_tagged_task_joins_words_as_the_language_writes_them(tmp_path):
    def conll(name, sentences):
        (tmp_path / name).write_text("\n\n".join(
            "\n".join(f"{w} {tag}" for w, tag in s) for s in sentences) + "\n", encoding="utf-8")
        return str(tmp_path / name)

    tokyo = [("東京", "B-LOC"), ("に", "O"), ("行く", "O"), ("。", "O")]
    paris = [("Alice", "B-PER"), ("went", "O"), ("to", "O"), ("Paris", "B-LOC"), (".", "O")]
    kyoto = [("京都", "B-LOC"), ("で", "O"), ("Bob", "B-PER"), ("に", "O"), ("会う", "O")]
    files = [conll("train.conll", [tokyo, paris, kyoto]), conll("dev.conll", [paris]),
             conll("test.conll", [[("Bob", "B-PER"), ("left", "O")]])]
    text = tmp_path / "train.txt"
    written = json.loads(cli("bench", "task-text", "--train", files[0], "--dev", files[1],
                             "--test", files[2], "--out", str(text)).stdout)
    assert written["kind"] == "tokens" and written["left_out_in_dev_or_test"] == 1
    # one document a sentence; spaces only where the script has them, as fine-tuning reads it
    assert text.read_text(encoding="utf-8") == "東京に行く。\n\n京都でBobに会う\n\n"


def test_task_text_errors_are_one_line(tmp_path):
    (tmp_path / "task.tsv").write_text("text\tlabel\nGood film.\tpos\nBad film.\tneg\n")
    (tmp_path / "taken.txt").write_text("something\n")
    for args, message in [
        (["--train", str(tmp_path / "task.tsv"), "--out", str(tmp_path / "taken.txt")],
         f"--out {tmp_path / 'taken.txt'} already exists"),
        (["--train", str(tmp_path / "task.tsv"), "--dev", str(tmp_path / "task.tsv"), "--test",
          str(tmp_path / "task.tsv"), "--out", str(tmp_path / "x.txt")],
         "train split holds no text outside dev and test"),
        (["--train", str(tmp_path / "task.tsv"), "--lang", "xx", "--out",
          str(tmp_path / "x.txt")], "unknown language 'xx'"),
        (["--task", "zh-news", "--test", "t.tsv", "--out", str(tmp_path / "x.txt")],
         "--test go with --train FILE, not with --task"),
    ]:
        out = cli("bench", "task-text", *args, check=False)
        assert out.returncode == 2 and message in out.stderr, out.stderr
        assert "Traceback" not in out.stderr and not (tmp_path / "x.txt").exists()
    assert (tmp_path / "taken.txt").read_text() == "something\n"
