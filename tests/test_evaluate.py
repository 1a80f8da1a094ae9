"""Evaluation: one deterministic pass over the whole validation split, masked as the run masks,
with the same numbers on 1 or 2 ranks."""

import dataclasses
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from launch import cli, train
from mlm_dist.config import ConfigError, load_config
from mlm_dist.data.pipeline import ReaderStream, manifest_shards
from mlm_dist.training.evaluate import evaluate, evaluate_saved_model
from mlm_dist.model import BertForPretraining


def run_config(shards, *overrides):
    return load_config(None, [f"data.shards={shards}", "model.vocab_size=600",
                              "model.hidden_size=32", "model.num_layers=1", "model.num_heads=2",
                              "model.intermediate_size=64", "model.max_positions=64",
                              "schedule.phases=[{seq_len: 64, micro_batch: 4, global_batch: 8}]",
                              *overrides])


def pass_pairs(cfg, seq_len=64) -> int:
    stream = ReaderStream(manifest_shards(cfg.data.shards, "valid"), reader=0, readers=1,
                          seq_len=seq_len, seed=cfg.eval.seed, data=cfg.data)
    return sum(1 for _ in stream.examples(epochs=1))


def test_one_pass_covers_the_whole_split_and_the_cap_holds(tiny_shards, tiny_tokenizer):
    cfg = run_config(tiny_shards, "eval.max_pairs=0")
    torch.manual_seed(0)
    model = BertForPretraining(cfg.model).eval()
    vocab = tiny_tokenizer.vocabulary
    pairs = pass_pairs(cfg)
    # A micro-batch that leaves the last batch partial: it must count only its rows.
    micro = next(m for m in range(3, pairs) if pairs % m)
    phase = dataclasses.replace(cfg.schedule.phases[0], micro_batch=micro, global_batch=micro)
    whole = evaluate(model, cfg, phase, vocab)
    assert whole["val/sequences"] == pairs
    assert whole == evaluate(model, cfg, phase, vocab)  # fixed pairs and masks
    assert abs(whole["val/mask_rate"] - cfg.masking.prob) < 0.01
    capped = evaluate(model, run_config(tiny_shards, "eval.max_pairs=10"), phase, vocab)
    assert capped["val/sequences"] == 10


def test_masks_follow_the_runs_masking_settings(tiny_shards, tiny_tokenizer):
    vocab = tiny_tokenizer.vocabulary
    seen = []

    def forward(input_ids, token_type_ids, attention_mask, positions, packing):
        seen.append((input_ids, positions))
        batch, k = positions.shape
        return torch.zeros(batch, k, vocab.size), torch.zeros(batch, 2)

    cfg = run_config(tiny_shards, "masking.whole_word=true", "masking.mask_frac=1.0",
                     "masking.random_frac=0.0", "eval.max_pairs=0")
    evaluate(forward, cfg, cfg.schedule.phases[0], vocab)
    masked = torch.cat([ids for ids, _ in seen])
    is_mask = (masked == vocab.mask).numpy()
    assert is_mask.sum() > 100
    # mask_frac=1: every chosen token is [MASK]; whole words: a [MASK] is never followed by a
    # continuation piece left as it was (the rest of its word is masked too).
    starts = vocab.word_start[masked.numpy()]
    assert not (is_mask[:, :-1] & ~starts[:, 1:] & ~is_mask[:, 1:]).any()


PROBE = """
import json, sys, torch, torch.distributed as dist
sys.path.insert(0, {tests!r})
from test_evaluate import run_config
from mlm_dist.training.evaluate import evaluate
from mlm_dist.objectives import objective_for
from mlm_dist.tokenizer import Tokenizer
rank, world = int(sys.argv[1]), int(sys.argv[2])
torch.set_num_threads(1)
dist.init_process_group("gloo", init_method="file://{store}", rank=rank, world_size=world)
cfg = run_config({shards!r}, "eval.max_pairs=0", "objective.name={objective}")
torch.manual_seed(0)
model = objective_for(cfg).build_model(cfg.model).eval()
result = evaluate(model, cfg, cfg.schedule.phases[0], Tokenizer.load({tokenizer!r}).vocabulary,
                  rank=rank, world_size=world)
if rank == 0:
    print(json.dumps(result))
dist.barrier()
dist.destroy_process_group()  # gloo's threads otherwise die with the interpreter: abort()
"""


def evaluate_on(ranks: int, shards, tokenizer, store, objective: str) -> dict:
    # A file rendezvous: no port to race for with the other tests' launches
    code = PROBE.format(tests=os.path.dirname(__file__), store=str(store), shards=str(shards),
                        tokenizer=str(tokenizer.path.parent), objective=objective)
    procs = [subprocess.Popen([sys.executable, "-c", code, str(r), str(ranks)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r in range(ranks)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in outs]
    return json.loads(outs[0][0].splitlines()[-1])


# electra: its AUC comes from histograms, vector terms summed across ranks with the rest.
@pytest.mark.parametrize("objective", ["bert", "electra"])
def test_the_same_numbers_on_one_or_two_ranks(tiny_shards, tiny_tokenizer, tmp_path, objective):
    one = evaluate_on(1, tiny_shards, tiny_tokenizer, tmp_path / "one.store", objective)
    two = evaluate_on(2, tiny_shards, tiny_tokenizer, tmp_path / "two.store", objective)
    assert one == two
    assert np.isfinite(list(one.values())).all() and one["val/predictions"] > 0


# ---------------------------------------------------------------------------------------------
# `mlm-dist eval` of a Hugging Face folder with the settings of the run that continued it: the
# before and after of a domain adaptation score the same examples with the same masks.


def test_a_folder_evaluated_like_its_run_scores_the_same_masks(tiny_shards, tmp_path):
    run, folder = tmp_path / "run", tmp_path / "hf"
    # Not the defaults of a folder's evaluation: another objective (full rows, no NSP head),
    # whole-word masks, a smaller shuffle buffer (tests/launch.py) and pass.
    train(tiny_shards, run, "objective.name=mlm", "masking.whole_word=true",
          "schedule.phases.0.until_step=4", "optim.warmup_steps=1", "eval.max_pairs=48")
    cli("export-hf", "--checkpoint", str(run), "--out", str(folder))
    after = evaluate_saved_model(run)
    like = json.loads(cli("eval", "--checkpoint", str(folder), "--data", str(tiny_shards),
                          "--like", str(run)).stdout)
    settings = evaluate_saved_model(folder, data=tiny_shards, seq_len=64, overrides=[
        "objective.name=mlm", "masking.whole_word=true", "data.shuffle_buffer=32",
        "eval.max_pairs=48"])
    defaults = evaluate_saved_model(folder, data=tiny_shards, seq_len=64, max_pairs=48)
    for before in (like, settings):
        for same in ("seq_len", "val/sequences", "val/predictions", "val/mask_rate"):
            assert before[same] == after[same], (same, before, after)
        # the same weights, network and masks: the same loss
        assert before["val/mlm_loss"] == pytest.approx(after["val/mlm_loss"], rel=1e-5)
    # What `eval` of a folder did without them: pairs of another network, other masks.
    assert "val/nsp_loss" in defaults
    assert defaults["val/predictions"] != after["val/predictions"]


def test_a_setting_that_is_not_an_evaluations_is_one_clear_error(tmp_path):
    out = cli("eval", "--checkpoint", str(tmp_path / "run"), "model.hidden_size=64",
              check=False)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert "model.hidden_size: not a setting of an evaluation" in out.stderr
    assert "masking.*" in out.stderr  # and it says what is
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    # raised before anything is read (neither the run nor the folder exist as such)
    for source, key, message in [
        (tmp_path / "run", "train.seed=3", "train.seed: not a setting of an evaluation"),
        (tmp_path / "run", "optim.lr=1", "optim.lr: not a setting of an evaluation"),
        (tmp_path / "run", "data.pack=true", "data.pack: not a setting of an evaluation"),
        (tmp_path / "run", "data.shards=x", "data.shards: give the shard directory"),
        (tmp_path / "run", "objective.name=mlm", "objective.name: a run is evaluated with its "
                                                 "own objective"),
        (folder, "schedule.phases.0.seq_len=32", "schedule.phases.0.seq_len: not a setting"),
    ]:
        with pytest.raises(ConfigError, match=re.escape(message)):
            evaluate_saved_model(source, data="unused", overrides=[key])


def test_like_takes_a_runs_reading_and_masking_and_a_folders_objective(tiny_shards):
    from mlm_dist.training.evaluate import settings_like

    mine = run_config(tiny_shards)
    theirs = run_config(tiny_shards, "objective.name=mlm", "masking.whole_word=true",
                        "data.shuffle_buffer=7", "data.num_workers=3", "eval.seed=5",
                        "optim.lr=0.5")
    folder = settings_like(mine, theirs, folder=True)
    assert (folder.objective, folder.masking, folder.eval) == (
        theirs.objective, theirs.masking, theirs.eval)
    assert folder.data.shuffle_buffer == 7
    assert folder.data.num_workers == mine.data.num_workers and folder.optim == mine.optim
    with pytest.raises(ConfigError, match="--like: that run's objective.name is mlm"):
        settings_like(mine, theirs, folder=False)
