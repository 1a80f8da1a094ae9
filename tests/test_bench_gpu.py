"""`mlm-dist bench gpu` on CPU ranks, end to end, as CI runs it: every part runs or says why not,
and the checks that can run on a CPU pass. Then the judging, driven with made-up reports: a
failed check fails the command."""

import json
import warnings

import pytest

from launch import cli
from mlm_dist.bench import gpu, syncs


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> tuple[dict, object]:
    pytest.importorskip("transformers")  # bench train compares with Hugging Face's BERT
    work = tmp_path_factory.mktemp("bench-gpu") / "work"
    proc = cli("bench", "gpu", "--out", str(work), "--steps", "8")
    return json.loads(proc.stdout), work


def test_gpu_only_parts_say_why_they_were_skipped(report):
    r, _ = report
    assert r["device"]["device"] == "cpu" and "DS_ACCELERATOR=cpu" in r["device"]["reason"]
    assert r["device"]["torch"] in r["device"]["report"]
    assert "CUDA" in r["attention"]["kernels"]["skipped"]
    assert {case: plan["mask"] for case, plan in r["attention"]["plans"].items()} == {
        "no_padding": None, "padding": "padding", "packed": "pairs"}
    assert "CUDA" in r["memory"]["peak"]["skipped"]
    assert "CUDA" in r["syncs"]["per_steady_step"]["cuda_syncs"]["skipped"]
    assert r["failed"] == [] and "ok" not in r["attention"]


def test_a_steady_step_waits_only_to_skip_non_finite_gradients(report):
    s = report[0]["syncs"]
    assert s["ok"] and s["not_allowed"] == {}
    assert s["steady_steps"] == [1, 2, 3, 5, 6, 7, 8]  # 10 steps, a log step every 5
    assert s["per_steady_step"]["synchronize"] == 0
    # tiny.yaml trains at ZeRO 2: DeepSpeed reads the gradient norm before it steps and clips
    assert s["per_steady_step"]["host_reads"] >= 1
    assert all(syncs.reading_frame(key) in syncs.NON_FINITE_CHECKS for key in s["where"])


def test_the_resumed_run_repeats_the_uninterrupted_one_exactly(report):
    r, work = report
    resume = r["resume"]
    assert resume["ok"] and resume["said_resumed"] and resume["resumed_at"] == 4
    assert resume["losses"] == resume["resumed_losses"] and len(resume["losses"]) == 4
    assert all(isinstance(loss, float) for loss in resume["losses"])
    assert (work / "resume" / "resumed.log").is_file()  # --out keeps the work files


def test_bench_train_and_memory_figures(report):
    r, _ = report
    train = r["train"]
    assert set(train) == {"seq_128", "seq_512", "packed_512", "seconds"}
    for name in ("seq_128", "seq_512", "packed_512"):
        run = train[name]
        assert run["ratio"] > 0
        assert run["ours"]["tokens_per_s"] > 0 and run["hf"]["tokens_per_s"] > 0
    assert train["seq_512"]["seq_len"] == 512 and train["seq_512"]["data"] == "synthetic"
    assert "micro-batches of" in train["packed_512"]["data"]
    activations = r["memory"]["activations"]  # on a CPU the formula is exact
    assert activations["measured"] == activations["predicted"] > 0


def test_out_must_be_new_or_empty(tmp_path):
    (tmp_path / "kept.txt").write_text("mine")
    proc = cli("bench", "gpu", "--out", str(tmp_path), check=False)
    assert proc.returncode == 2 and "--out" in proc.stderr and "not an empty" in proc.stderr
    assert (tmp_path / "kept.txt").read_text() == "mine"


def test_a_check_that_fails_fails_the_command():
    report = {"device": {"device": "cuda:0"}, "attention": {"ok": True},
              "train": {"seq_128": {}}, "resume": {"ok": False}, "failed": []}
    assert gpu.failed_checks(report) == ["resume"]
    crashed = gpu.run_part("memory", lambda: 1 / 0)
    assert crashed["ok"] is False and "ZeroDivisionError" in crashed["error"]


def test_resume_comparison_is_bit_for_bit():
    full = {s: 10.0 - s / 7 for s in range(1, 7)}
    same = gpu.compare_resumed(full, {s: full[s] for s in (4, 5, 6)}, at=3, steps=6,
                               said_resumed=True, seconds=(1, 1))
    assert same["ok"] and same["differ_at"] == []
    later = {4: full[4], 5: full[5] + 1e-7, 6: full[6]}
    off = gpu.compare_resumed(full, later, at=3, steps=6, said_resumed=True, seconds=(1, 1))
    assert not off["ok"] and off["differ_at"] == [5] and "step 4" in off["note"]
    fresh = gpu.compare_resumed(full, {s: full[s] for s in range(1, 7)}, at=3, steps=6,
                                said_resumed=False, seconds=(1, 1))
    assert not fresh["ok"] and fresh["unexpected_steps"]["resumed"] == [1, 2, 3]


def test_sync_summary_flags_any_other_wait():
    allowed = "Tensor.item deepspeed/runtime/utils.py:233 is_invalid_grad_norm < x.py:1 step"
    report = {"steps": {str(s): {allowed: 1} for s in range(10)}}
    report["steps"]["6"] = {allowed: 1, "synchronize mlm_dist/training/step.py:80 train_step < "
                                        "mlm_dist/training/loop.py:100 train": 2}
    report["steps"]["4"] = {"Tensor.tolist mlm_dist/training/loop.py:170 flush < a.py:1 b": 1}
    s = syncs.summary(report, log_every=5)
    assert s["steady_steps"] == [1, 2, 3, 5, 6, 7, 8]  # step 4 logs: its read is allowed
    assert not s["ok"] and list(s["not_allowed"]) == [6]
    assert s["per_steady_step"]["synchronize"] == 2 and s["per_steady_step"]["host_reads"] == 1
    assert not syncs.summary({"steps": {"0": {}, "1": {}}}, log_every=1)["ok"]


def torch_reports_a_sync():
    warnings.warn(f"{syncs.CUDA_SYNC_WARNING} (Triggered internally at CUDAFunctions.h:120.)")


def test_torchs_sync_warnings_are_counted_every_time_where_they_happen():
    """On CUDA torch reports each synchronizing operation with a warning; Python would show a
    repeated one once, and the counter must see them all, at the line that caused them."""
    counter = syncs.SyncCounter()
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("default")
        with counter.counting_warnings():
            counter.start(3)
            for _ in range(3):
                torch_reports_a_sync()
            warnings.warn("something else")
    (key, calls), = counter.counts[3].items()
    assert calls == 3 and key.startswith("cuda_sync tests/test_bench_gpu.py:")
    assert syncs.reading_frame(key)[1] == "torch_reports_a_sync"
    assert [str(w.message) for w in shown] == ["something else"]
