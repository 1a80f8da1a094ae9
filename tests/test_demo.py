"""`mlm-dist demo`, the README's main job, end to end at a few steps."""

import re

from launch import cli


def test_demo_runs_every_stage_and_shows_what_was_learned(tmp_path):
    out = cli("demo", "--out", str(tmp_path / "demo"), "--steps", "30").stdout
    for stage in ("[1/5] corpus", "[2/5] tokenizer", "[3/5] shards", "[4/5] pretraining",
                  "[5/5] exported"):
        assert stage in out, out
    before, after = map(float, re.search(
        r"validation perplexity ([\d.]+) \(initial weights\) -> ([\d.]+) \(trained\)", out).groups())
    assert after < 0.5 * before  # held-out text, not the training loss
    assert out.count("    -> ") == 3  # fill-mask answers for the three prompts
