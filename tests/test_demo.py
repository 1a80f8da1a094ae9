"""`mlm-dist demo`, the README's main job, end to end at a few steps, as a user runs it: from an
installed copy of the package, in a directory of their own."""

import dataclasses
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from launch import REPO, env
from mlm_dist.cli import build_parser, main
from mlm_dist.config import load_config
from mlm_dist.demo import run
from mlm_dist.demo.manpage_corpus import CHINESE, JAPANESE, require_pages, unavailable


def pip_install(target) -> None:
    """The package as pip installs it from the checkout. pip builds in the source tree, so it
    builds a copy: no build/ left in the checkout, whose stale files would end up in wheels."""
    src = target.parent / "src"
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(
        ".*", "build", "runs", "tests", "*.egg-info", "__pycache__"))
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index",
           "--no-build-isolation", "--target", str(target), str(src)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"


def test_demo_runs_every_stage_from_a_wheel_and_shows_what_was_learned(tmp_path):
    site, home = tmp_path / "site", tmp_path / "home"
    pip_install(site)
    home.mkdir()
    # The installed copy only: first on the path of the demo and of the ranks it launches.
    proc = subprocess.run([sys.executable, "-m", "mlm_dist", "demo", "--steps", "30"],
                          env={**env(), "PYTHONPATH": str(site)}, cwd=home,
                          capture_output=True, text=True, timeout=300)
    out = proc.stdout
    assert proc.returncode == 0, f"exit {proc.returncode}\n{out[-3000:]}\n{proc.stderr[-3000:]}"
    assert f"--config {site / 'mlm_dist' / 'demo' / 'tiny.yaml'} " in out  # package data
    assert (site / "mlm_dist" / "demo" / "small.yaml").is_file()  # `--size small`'s
    for stage in ("[1/5] corpus", "[2/5] tokenizer", "[3/5] shards", "[4/5] pretraining",
                  "[5/5] exported"):
        assert stage in out, out
    before, after = map(float, re.search(
        r"validation perplexity ([\d.]+) \(initial weights\) -> ([\d.]+) \(trained\)", out).groups())
    assert after < 0.5 * before  # held-out text, not the training loss
    assert out.count("    -> ") == 3  # fill-mask answers for the three prompts
    assert (home / "runs" / "demo" / "hf").is_dir()  # the default --out, under the user's cwd


@pytest.mark.parametrize("lang, source", [("ja", JAPANESE), ("zh", CHINESE)])
def test_cjk_demo_without_its_package_stops_first_with_one_line(tmp_path, capsys, monkeypatch,
                                                                lang, source):
    """`mlm-dist demo --lang ja|zh` on a Debian system whose man directories hold only the base
    packages' pages: one line naming the package, and nothing written."""
    man = tmp_path / "man" / source.man_dir / "man1"
    man.mkdir(parents=True)
    (man / "passwd.1").write_text(".SH 説明\nこれは基本パッケージのページです。\n" * 3)
    info = tmp_path / "dpkg-info"  # dpkg's database, knowing only passwd
    info.mkdir()
    (info / "passwd.list").write_text(f"/.\n{man}\n{man / 'passwd.1'}\n")
    reason = unavailable(source)  # the demo's own check, on this machine
    if reason is None:
        run.DEMOS[lang].check_source()
    else:
        with pytest.raises(FileNotFoundError, match=re.escape(reason)):
            run.DEMOS[lang].check_source()
    # The same check, pointed at the fake system's man pages and dpkg database
    monkeypatch.setitem(run.DEMOS, lang, dataclasses.replace(
        run.DEMOS[lang], check_source=lambda: require_pages(source, tmp_path / "man", info)))
    out = tmp_path / "demo"
    with pytest.raises(SystemExit) as exit_:
        main(["demo", "--lang", lang, "--out", str(out)])
    assert exit_.value.code == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line == (f"mlm-dist demo: error: the {source.language} demo corpus needs Debian's "
                    f"{source.package}, which is not installed (other packages put 1 page in "
                    f"{tmp_path / 'man' / source.man_dir}): apt-get install {source.package}")
    assert not out.exists()


class Launched(Exception):
    """Where the size tests stop: at the launch of training, which the test above runs."""


def demo_launch(tmp_path, monkeypatch, options) -> tuple[str, list[str]]:
    """Run `mlm-dist demo OPTIONS` in tmp_path up to the training launch: the config and
    overrides every rank would read."""
    launched = []

    def launch_training(config, overrides, ranks):
        launched.append((config, overrides))
        raise Launched

    monkeypatch.setattr(run, "launch_training", launch_training)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(Launched):
        main(["demo", *options])
    ((path, overrides),) = launched
    return path, overrides


@pytest.mark.parametrize("options, config, steps, out", [
    ([], "tiny.yaml", 800, "runs/demo"),
    (["--size", "small"], "small.yaml", 2000, "runs/demo-small"),
    (["--size", "small", "--steps", "150", "--out", "mine"], "small.yaml", 150, "mine"),
])
def test_each_size_trains_its_config_for_its_steps_in_its_own_directory(
        tmp_path, monkeypatch, options, config, steps, out):
    """`demo --size small` trains small.yaml (package data) for its own steps in its own
    directory: a rerun resumes what is there, and a tiny run's checkpoints do not fit a small
    model. --steps and --out still win."""
    path, overrides = demo_launch(tmp_path, monkeypatch, options)
    assert Path(path) == Path(run.__file__).parent / config
    cfg = load_config(path, overrides)  # what every rank reads: valid, and the size's model
    assert cfg.schedule.phases[-1].until_step == steps
    assert Path(cfg.out_dir) == Path(out) / "run"
    assert (tmp_path / out / "shards" / "manifest.json").is_file()
    size = {"tiny.yaml": (128, 2), "small.yaml": (256, 4)}[config]
    assert (cfg.model.hidden_size, cfg.model.num_layers) == size


def test_the_size_option_offers_every_size():
    for size in run.SIZES:  # the parser lists them without importing the demo
        assert build_parser().parse_args(["demo", "--size", size]).size == size


def test_steps_below_the_warmup_stop_before_anything_is_built(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["demo", "--size", "small", "--steps", "40", "--out", str(tmp_path / "demo")])
    assert exit_.value.code == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line == ("mlm-dist demo: error: optim.warmup_steps: must be in [0, total steps=40] "
                    "(the last phase's until_step)")
    assert not (tmp_path / "demo").exists()


@pytest.mark.parametrize("options, objective, out", [
    ([], "bert", "runs/demo"),
    (["--objective", "mlm"], "mlm", "runs/demo-mlm"),
    (["--objective", "electra", "--size", "small"], "electra", "runs/demo-small-electra"),
    (["--objective", "sop", "--out", "mine"], "sop", "mine"),
])
def test_each_objective_trains_in_its_own_directory(tmp_path, monkeypatch, options, objective,
                                                    out):
    """`demo --objective X` trains objective X; its default directory is not another
    objective's, whose checkpoints it could not resume and whose metrics it would append to."""
    path, overrides = demo_launch(tmp_path, monkeypatch, options)
    cfg = load_config(path, overrides)  # what every rank reads
    assert cfg.objective.name == objective
    assert Path(cfg.out_dir) == Path(out) / "run"
    assert (tmp_path / out / "shards" / "manifest.json").is_file()


@pytest.mark.parametrize("objective", ["bert", "mlm", "sop", "electra"])
def test_the_demo_reads_metrics_its_objective_records(objective):
    """The figures the demo prints are looked up by name in the objective's training and
    evaluation records: each name must be one the objective writes."""
    from collections import defaultdict

    from mlm_dist.config import ObjectiveConfig
    from mlm_dist.objectives import OBJECTIVES, objective_for

    assert set(run.READOUTS) == set(OBJECTIVES)  # every objective has its readout
    chosen = objective_for(ObjectiveConfig(name=objective))
    # Any sums: only the names of the records matter here (electra's histograms are lists).
    sums = defaultdict(lambda: 1.0, replaced_bins=[1.0, 0.0], original_bins=[0.0, 1.0])
    loss, val = run.READOUTS[objective].names()
    assert loss in chosen.train_record(sums, micro_steps=1)
    evaluated = {**chosen.eval_record(sums), "val/sequences": 1.0}  # evaluate() adds this one
    assert set(val) <= set(evaluated), set(val) - set(evaluated)


def test_the_objective_option_offers_every_objective():
    from mlm_dist.objectives import OBJECTIVES

    for objective in OBJECTIVES:  # the parser lists them without importing the objectives
        assert build_parser().parse_args(["demo", "--objective", objective]).objective == objective


def test_a_demo_directory_of_another_objective_is_refused_before_anything_is_built(
        tmp_path, capsys):
    """A rerun with another --objective into the same --out: one line naming both objectives,
    before the corpus, not a failure of every rank at the checkpoint."""
    from mlm_dist.config import dump_yaml

    out = tmp_path / "demo"
    (out / "run").mkdir(parents=True)
    saved = load_config(run.TINY_CONFIG, [f"data.shards={out / 'shards'}",
                                          f"out_dir={out / 'run'}", "objective.name=mlm"])
    (out / "run" / "config.yaml").write_text(dump_yaml(saved))  # as a started run leaves it
    with pytest.raises(SystemExit) as exit_:
        main(["demo", "--objective", "electra", "--out", str(out)])
    assert exit_.value.code == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line == (f"mlm-dist demo: error: --objective electra: {out} holds a demo of "
                    "objective mlm; rerun it with --objective mlm, or give another --out")
    assert not (out / "corpus.txt").exists()


def test_an_electra_demo_prints_its_generator_and_discriminator_figures(tmp_path):
    """The demo end to end under another objective (from the checkout, a few steps): its
    metrics read, its export written (the generator beside the discriminator) and fill-mask
    answered by the generator."""
    out = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "-m", "mlm_dist", "demo", "--objective", "electra",
                           "--steps", "30", "--out", str(out)],
                          env={**env(), "PYTHONPATH": str(REPO)}, cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    text = proc.stdout
    assert proc.returncode == 0, f"exit {proc.returncode}\n{text[-3000:]}\n{proc.stderr[-3000:]}"
    assert "objective.name=electra" in text
    assert re.search(r"Generator MLM loss [\d.]+ \(step \d+\) -> [\d.]+ \(step 30\)", text), text
    before, after = map(float, re.search(
        r"validation generator perplexity ([\d.]+) \(initial weights\) -> ([\d.]+) \(trained\), "
        r"MLM accuracy [\d.]+ -> [\d.]+, replaced-token accuracy [\d.]+ -> [\d.]+, "
        r"AUC [\d.]+ -> [\d.]+ \(\d+ held-out rows\)", text).groups())
    assert after < before
    assert "ElectraForPreTraining.from_pretrained" in text
    assert (out / "hf" / "config.json").is_file()
    assert (out / "hf" / "generator" / "config.json").is_file()
    assert "fill-mask with the trained generator:" in text
    assert text.count("    -> ") == 3
