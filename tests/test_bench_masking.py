"""Smoke test of the masking benchmark: it runs offline and reports every figure. No timing
assertions: the machine is shared and noisy."""

import pytest

from mlm_dist.bench.masking import bench_masking

KEYS = {"batch", "seq_len", "ours_ms", "ours_whole_word_ms", "hf_collator_ms", "ratio", "threads"}


@pytest.mark.parametrize("whole_word", [False, True])
def test_bench_masking_reports_positive_timings(tiny_tokenizer, whole_word):
    result = bench_masking(str(tiny_tokenizer.path.parent), batch=8, seq_len=64, repeats=2,
                           whole_word=whole_word)
    assert set(result) == KEYS
    assert (result["batch"], result["seq_len"]) == (8, 64) and result["threads"] >= 1
    for key in ("ours_ms", "ours_whole_word_ms", "hf_collator_ms", "ratio"):
        assert result[key] > 0, key
    ours = result["ours_whole_word_ms"] if whole_word else result["ours_ms"]
    assert result["ratio"] == pytest.approx(ours / result["hf_collator_ms"])


def test_bench_masking_trains_its_own_tokenizer_without_one():
    result = bench_masking(batch=4, seq_len=32, repeats=1)
    assert set(result) == KEYS and result["hf_collator_ms"] > 0
