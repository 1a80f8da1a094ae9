"""Real training runs: 2 CPU ranks under the deepspeed launcher (gloo), ZeRO 2 and 3, plus the
same command alone and under torchrun. These are the slowest tests (seconds each)."""

import json
import shutil
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import torch
from transformers import AutoTokenizer, BertForPreTraining

from data_fixtures import corpus_documents, write_shards
from launch import cli, metrics, train
from mlm_dist.training.checkpoint import load_checkpoint
from mlm_dist.tokenizer import Tokenizer

REQUIRED_TAGS = {"train/loss", "train/mlm_loss", "train/nsp_loss", "train/mlm_acc",
                 "train/nsp_acc", "train/lr", "train/grad_norm", "train/seq_len",
                 "perf/tokens_per_s", "data/mask_rate", "perf/tokens_per_s_rank_min",
                 "perf/tokens_per_s_rank_max", "perf/data_wait_frac", "perf/samples_per_s",
                 "perf/step_time_ms", "perf/peak_memory_gb_rank_max", "train/skipped_steps",
                 "data/skipped_samples", "perf/mfu", "perf/real_tokens_per_s", "data/fill",
                 "data/nsp_random"}


@pytest.fixture(scope="module")
def zero2_run(tiny_shards, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("zero2") / "run"
    train(tiny_shards, out, "train.zero_stage=2", "schedule.phases.0.until_step=40", "optim.lr=2e-3",
          "data.num_workers=1")
    return out


def test_zero2_two_ranks_loss_falls(zero2_run):
    history = metrics(zero2_run)
    assert [r["step"] for r in history] == [5, 10, 15, 20, 25, 30, 35, 40]
    first, last = history[0], history[-1]
    assert last["train/mlm_loss"] < first["train/mlm_loss"] - 0.5, (first, last)
    assert 0.10 < last["data/mask_rate"] < 0.20


def test_zero2_checkpoint_has_one_shard_per_rank(zero2_run):
    tag = zero2_run / "checkpoints" / "step_00000040"
    assert (zero2_run / "checkpoints" / "latest").read_text().strip() == tag.name
    shards = sorted(p.name for p in tag.glob("*zero_pp_rank_*optim_states.pt"))
    assert len(shards) == 2 and "rank_0" in shards[0] and "rank_1" in shards[1]
    assert (tag / "run_config.yaml").is_file() and (tag / "tokenizer.model").is_file()


def test_tensorboard_has_the_scalars_and_config(zero2_run):
    events = EventAccumulator(str(zero2_run / "tensorboard"), size_guidance={"tensors": 0})
    events.Reload()
    tags = events.Tags()
    assert REQUIRED_TAGS <= set(tags["scalars"]), REQUIRED_TAGS - set(tags["scalars"])
    assert [e.step for e in events.Scalars("train/loss")] == [5, 10, 15, 20, 25, 30, 35, 40]
    assert any("config" in t for t in tags["tensors"])  # add_text is stored as a tensor
    run_text = events.Tensors("run/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "world size 2" in run_text and "rank 1:" in run_text
    last = metrics(zero2_run)[-1]
    assert (last["perf/tokens_per_s_rank_min"] <= last["perf/tokens_per_s_rank_max"]
            <= last["perf/tokens_per_s"])
    assert 0 <= last["perf/data_wait_frac"] <= last["perf/data_wait_frac_rank_max"] <= 1
    # Real tokens are the non-padding share of the positions computed.
    assert 0.2 < last["data/fill"] < 1.0
    assert last["perf/real_tokens_per_s"] == pytest.approx(
        last["data/fill"] * last["perf/tokens_per_s"], rel=1e-6)


def test_resume_continues_from_latest(zero2_run, tiny_shards, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(zero2_run, run)
    proc = train(tiny_shards, run, "schedule.phases.0.until_step=50", launcher="alone", check=False)
    assert proc.returncode == 2 and "checkpoint.resume=true" in proc.stderr  # never mixes runs
    proc = train(tiny_shards, run, "train.zero_stage=2", "schedule.phases.0.until_step=50", "optim.lr=2e-3",
                 "data.num_workers=1", "checkpoint.resume=true")
    assert "resumed from step 40" in proc.stdout
    assert [r["step"] for r in metrics(run)][-3:] == [40, 45, 50]
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_00000050"


def test_export_hf_from_sharded_checkpoint(zero2_run, tmp_path):
    out = tmp_path / "hf"
    cli("export-hf", "--checkpoint", str(zero2_run), "--out", str(out))
    hf = BertForPreTraining.from_pretrained(out).eval()
    hf_tokenizer = AutoTokenizer.from_pretrained(out)
    ours, cfg, tokenizer_dir = load_checkpoint(zero2_run)
    tokenizer = Tokenizer.load(tokenizer_dir)
    text_a, text_b = "Return the number of items in the list.", "The file is closed."
    batch = hf_tokenizer([text_a, text_a], [text_b, "No."], padding=True, return_tensors="pt")
    assert batch["input_ids"][0].tolist() == ([2] + tokenizer.encode(text_a) + [3]
                                              + tokenizer.encode(text_b) + [3])
    with torch.no_grad():
        hf_out = hf(**batch)
        mlm, nsp = ours(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"])
    assert (hf_out.prediction_logits - mlm).abs().max() < 1e-4
    assert (hf_out.seq_relationship_logits - nsp).abs().max() < 1e-4
    # export never writes over an existing folder
    again = cli("export-hf", "--checkpoint", str(zero2_run), "--out", str(out), check=False)
    assert again.returncode == 2 and str(out) in again.stderr


def test_zero3_two_ranks_then_fill_mask(tiny_shards, tmp_path):
    out = tmp_path / "run"
    train(tiny_shards, out, "train.zero_stage=3", "schedule.phases.0.until_step=10")
    assert metrics(out)[-1]["step"] == 10
    assert len(list((out / "checkpoints" / "step_00000010").glob("*zero_pp_rank_*"))) >= 2
    proc = cli("fill-mask", "--checkpoint", str(out), "--top-k", "3", "The [MASK] is open.")
    (line,) = proc.stdout.splitlines()
    predictions = json.loads(line)["predictions"]
    assert len(predictions) == 1 and len(predictions[0]) == 3
    assert all(0 <= p["prob"] <= 1 for p in predictions[0])


def test_two_ranks_two_workers_over_uneven_shards(tiny_corpus, tiny_tokenizer, tmp_path):
    # 3 shards of 1, 5 and 90 documents for 2 ranks x 2 workers = 4 readers: shards are shared
    # and some readers run through their data many times faster than others. No rank may hang.
    shards = write_shards(tmp_path / "shards", corpus_documents(tiny_corpus, tiny_tokenizer),
                          [1, 5, 90], tiny_tokenizer)
    out = tmp_path / "run"
    train(shards, out, "schedule.phases.0.until_step=40", "data.num_workers=2", "schedule.phases.0.micro_batch=4",
          "schedule.phases.0.global_batch=8", "train.log_every=10")
    assert [r["step"] for r in metrics(out)] == [10, 20, 30, 40]
    assert metrics(out)[-1]["data/skipped_samples"] == 0


def test_alone_zero0_bf16_exports_fp32_master_weights(tiny_shards, tmp_path):
    out = tmp_path / "run"
    train(tiny_shards, out, "schedule.phases.0.until_step=5", "train.zero_stage=0", launcher="alone")
    assert metrics(out)[-1]["step"] == 5
    model, _, _ = load_checkpoint(out)
    w = model.layers[0].ffn.up.weight
    # bf16 training weights round-trip through bf16 unchanged; the fp32 masters do not.
    assert not torch.equal(w, w.bfloat16().float())


def test_same_command_under_torchrun(tiny_shards, tmp_path):
    out = tmp_path / "run"
    train(tiny_shards, out, "schedule.phases.0.until_step=5", "train.zero_stage=1", launcher="torchrun")
    assert metrics(out)[-1]["step"] == 5


@pytest.mark.parametrize("override, message", [
    ("train.zero_stage=4", "train.zero_stage: ZeRO stage 4 does not exist"),
    ("train.precision=fp16", "train.precision: fp16 is not supported on cpu"),
])
def test_user_errors_stop_before_any_work(tiny_shards, tmp_path, override, message):
    if override == "train.precision=fp16" and _cpu_has_fp16():
        pytest.skip("this CPU computes fp16 (oneDNN fp16 kernels): the refusal is tested on a "
                    "stand-in accelerator in test_engine.py")
    proc = train(tiny_shards, tmp_path / "run", override, launcher="alone", check=False)
    assert proc.returncode == 2
    assert message in proc.stderr
    assert not (tmp_path / "run").exists()


def test_bad_data_past_the_budget_stops_the_run(tiny_shards, tmp_path):
    shards = tmp_path / "shards"
    shutil.copytree(tiny_shards, shards)
    (shards / "train-000001.tar").unlink()
    ok = tmp_path / "ok"
    train(shards, ok, "schedule.phases.0.until_step=10", "train.log_every=5", launcher="alone")
    assert metrics(ok)[-1]["data/skipped_samples"] > 0  # skipped, counted, and the run went on
    proc = train(shards, tmp_path / "strict", "schedule.phases.0.until_step=10",
                 "train.log_every=5", "data.max_skipped_samples=0", launcher="alone",
                 check=False)
    assert proc.returncode == 2
    assert "more than data.max_skipped_samples=0" in proc.stderr
    assert "train-000001.tar" in proc.stderr  # the warning names the shard


def _cpu_has_fp16() -> bool:
    import torch

    return bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())
