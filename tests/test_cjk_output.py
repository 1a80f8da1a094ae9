"""What a Japanese or Chinese user reads on the command line: their text as written, not as
\\uXXXX escapes, in the JSON that `fill-mask` and `eval` print."""

import json

from cjk_text import JAPANESE, write_corpus
from launch import cli, train
from mlm_dist.data.prepare import prepare_shards
from mlm_dist.tokenizer import train_tokenizer


def test_fill_mask_and_eval_print_japanese_as_written(tmp_path):
    corpus = tmp_path / "ja.txt"
    write_corpus(corpus, JAPANESE, copies=20)
    sentences = [s for doc in JAPANESE for s in doc]
    train_tokenizer(sentences * 4, tmp_path / "tokenizer", vocab_size=300, seed=0)
    prepare_shards([corpus], tmp_path / "tokenizer", tmp_path / "shards", docs_per_shard=40,
                   valid_fraction=0.1, lang="ja")
    run = tmp_path / "実験"  # a run directory named in Japanese: eval prints its path
    train(tmp_path / "shards", run, "schedule.phases.0.until_step=5", launcher="alone", ranks=1)

    prompt = "東京は日本の[MASK]です。"
    out = cli("fill-mask", "--checkpoint", str(run), "--top-k", "5", prompt).stdout
    assert prompt in out and "\\u" not in out, out
    (line,) = out.splitlines()
    result = json.loads(line)
    assert result["text"] == prompt
    tokens = [p["token"] for p in result["predictions"][0]]
    assert len(tokens) == 5 and all(token in out for token in tokens)
    assert any(not token.isascii() for token in tokens)  # Japanese answers, shown as such

    out = cli("eval", "--checkpoint", str(run), "--max-pairs", "8", "--micro-batch", "4").stdout
    assert json.loads(out.splitlines()[-1])["checkpoint"] == str(run)
    assert str(run) in out
