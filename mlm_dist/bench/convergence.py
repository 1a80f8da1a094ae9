"""`mlm-dist bench convergence`: does our trainer give a model as good as a reference trainer's,
for the same compute, for each objective (`objective.name=bert|mlm|sop|electra`, an override
as in `mlm-dist train`)?

The same model (shape and initial weights) is trained on the same train shards, for the same
number of sequences of the same length, with the same global batch, LR schedule, precision and
gradient clipping, twice:

  ours       `mlm-dist train` under the deepspeed launcher on `--ranks` ranks: the objective's
             examples built online by the loader, masking on the device, ZeRO and the run's
             precision, a checkpoint every `--every` steps for the validation curve.
  reference  a loop written with torch and transformers only, as the objective's original
             recipe trains (bench/reference_trainer.py): bert's instances made the way Google's
             create_pretraining_data.py makes them, sop's the way ALBERT's does but for a lone
             sentence (bench/google_instances.py), all shuffled; mlm's and electra's blocks
             grouped as run_mlm.py groups texts (bench/grouped_texts.py);
             DataCollatorForLanguageModeling's 15 % with 80/10/10; transformers'
             BertForPreTraining (bert, sop), BertForMaskedLM (mlm), or ElectraForMaskedLM and
             ElectraForPreTraining sharing their embeddings, with the paper's loss (electra:
             bench/reference_electra.py); torch AdamW without decay on biases and LayerNorm
             weights; bf16 autocast; clipping; the same linear warmup and decay. One process,
             with as many threads as ours has over all its ranks.

`--seeds N` trains each side N times, with train.seed, train.seed + 1, ... (the seed sets the
initial weights both sides share, each side's data order and its masks): at a few thousand
tiny steps one run moves with the seed by more than the margin the targets test.

Then ONE evaluation scores both: every saved model, and the initial weights both sides share
(step 0), is loaded into the objective's network and scored by evaluate.py on the validation
split, with the same examples and masks for every model and seed. The JSON has, for each side,
every run (its final validation figures, the objective's named metrics: MLM loss, perplexity,
MLM accuracy and the pair task's loss and accuracy, or electra's generator MLM and
discriminator RTD figures; its wall time, tokens and validation curve) and the mean and sample
standard deviation over the seeds; the differences of the means (ours - reference) and their
standard errors; and whether our targets hold, on the means (bench/convergence_result.py): the objective's headline loss
(the MLM loss, the generator's for electra) at most the reference's + 0.02, its task figures
(NSP or SOP accuracy, RTD accuracy and AUC) at least the reference's - 0.01, less wall time. A
PNG draws both sides' validation curves of the headline loss, one line per seed.

Stages, each skipped when its output exists (as in the demo): corpus (bench/corpora.py) ->
tokenizer -> shards (shared by every objective and seed) -> for each seed: ours -> reference ->
evaluation, under --out/<objective>/seed-<seed>/; result.json and convergence.png under
--out/<objective>/. A side is reused only if it ran with the same config, overrides and ranks,
the same mlm_dist sources and the same torch, transformers and DeepSpeed (run_signature): a
figure belongs to the code that produced it, so a side trained before an edit or an upgrade is
refused, not averaged with the new ones.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

import mlm_dist
from mlm_dist.bench.convergence_eval import evaluate_runs, plot_curves
from mlm_dist.bench.convergence_result import assemble_result, model_shape
from mlm_dist.bench.corpora import write_corpus
from mlm_dist.bench.reference_trainer import REFERENCE_RECIPES, say, train_reference
from mlm_dist.commands.bench import CONVERGENCE_CONFIG, CONVERGENCE_VALID_FRACTION
from mlm_dist.config import ConfigError, RunConfig, SequencePhase, load_config
from mlm_dist.data.corpus import iter_documents
from mlm_dist.data.pipeline import LoaderSettings, ResumableLoader, manifest_shards
from mlm_dist.data.prepare import prepare_shards
from mlm_dist.data.shards import Manifest
from mlm_dist.data.workers import default_workers
from mlm_dist.errors import MissingPackageError, PathExistsError, UsageError
from mlm_dist.launch.local import RanksFailedError, free_port, launcher_command, remove_shm_buffers
from mlm_dist.objectives import objective_for
from mlm_dist.tokenizer import Tokenizer, sentences_of, train_tokenizer
from mlm_dist.training import checkpoint
from mlm_dist.training.preflight import resolve_data

# Book-sized documents are few: a larger valid fraction than `prepare`'s default keeps a few.
# A few shards per rank for either corpus (~100 books, ~50k short documents): our loader mixes
# the pairs of the documents of one shard at a time, as it would on a real corpus's shards.
DOCS_PER_SHARD = {"books": 16, "short": 4000}
SIDE_RECORD = "bench.json"  # written last in each side's directory: that side is done
CURVES_RECORD = "curves.json"  # a seed's evaluation, kept with the signature it scored
# What the two sides and the evaluation run on besides our code: a side trained under other
# versions of these is not comparable to one trained now.
SIGNATURE_LIBRARIES = ("torch", "transformers", "deepspeed")


# ---------------------------------------------------------------------------------------------
# Ours: `mlm-dist train` under the deepspeed launcher


def train_ours(config: Path, overrides: list[str], run_dir: Path, ranks: int) -> dict:
    port = free_port()
    cmd = launcher_command(ranks, port, "mlm_dist", "train", "--config", str(config),
                           *overrides, f"out_dir={run_dir}")
    say("$ " + " ".join(cmd[2:]))
    env = dict(os.environ)
    env.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
    start = time.perf_counter()
    try:
        # The run's log goes to our stderr, line by line: stdout is kept for the JSON result.
        with subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, errors="replace") as proc:
            for line in proc.stdout:
                sys.stderr.write(line)
        if proc.returncode:
            raise RanksFailedError(f"our training run failed (exit code {proc.returncode}; its log "
                                   f"is above); remove {run_dir} before running the benchmark again")
    finally:
        remove_shm_buffers(port)
    seconds = time.perf_counter() - start

    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "perf/step_time_ms" in r]
    # The loop's own time: the step time of each logging interval times its steps.
    loop_seconds, previous = 0.0, 0
    for r in train:
        loop_seconds += r["perf/step_time_ms"] / 1000 * (r["step"] - previous)
        previous = r["step"]
    last = checkpoint.latest_complete(run_dir / checkpoint.CHECKPOINTS)
    steps = int(last.name.split("_")[1]) if last is not None else 0
    return {"train_seconds": seconds, "loop_seconds": loop_seconds, "steps": steps,
            "ranks": ranks,
            "history": [{"step": r["step"], "train/loss": r["train/loss"]} for r in train]}


def ours_real_tokens(cfg, tokenizer, ranks: int, steps: int) -> int:
    """The non-padding tokens our run trained on, counted by replaying its loader: each rank's
    stream is a function of the seed, its rank and the world size only (what makes a resumed
    run exact), so the same loader built here yields the same batches."""
    phase = cfg.schedule.phases[0]
    micro_batches = steps * phase.global_batch // (phase.micro_batch * ranks)  # per rank
    total = 0
    for rank in range(ranks):
        loader = ResumableLoader(LoaderSettings(
            manifest_shards(cfg.data.shards), seq_len=phase.seq_len,
            micro_batch=phase.micro_batch, rank=rank, world_size=ranks, seed=cfg.train.seed,
            data=cfg.data, vocab=tokenizer.vocabulary,
            examples_of=objective_for(cfg).example_builder))
        try:
            for _ in range(micro_batches):
                total += int(next(loader).attention_mask.sum())
        finally:
            loader.close()
    return total


# ---------------------------------------------------------------------------------------------
# The whole benchmark


def check_comparable(cfg) -> None:
    """What the reference reproduces; anything else would compare two different recipes."""
    if cfg.objective.name not in REFERENCE_RECIPES:
        raise ConfigError(f"objective.name: bench convergence has a reference trainer for "
                          f"{', '.join(REFERENCE_RECIPES)}, not {cfg.objective.name}")
    if len(cfg.schedule.phases) != 1:
        raise ConfigError("schedule.phases: bench convergence compares one sequence phase "
                          f"(got {len(cfg.schedule.phases)}); the reference has no phase schedule")
    if cfg.optim.name != "adamw":
        raise ConfigError("optim.name: the reference trains with AdamW; use optim.name=adamw")
    if cfg.train.precision not in ("bf16", "fp32"):
        raise ConfigError("train.precision: the reference runs bf16 autocast or fp32; "
                          f"{cfg.train.precision} is not compared")
    if cfg.masking.whole_word:
        raise ConfigError("masking.whole_word: the reference masks single tokens "
                          "(DataCollatorForLanguageModeling); use masking.whole_word=false")
    if cfg.model.init_from:
        raise ConfigError("model.init_from: the benchmark trains from the initial weights of "
                          "train.seed; leave init_from empty")


def prepare_data(corpus: str, out: Path, vocab_size: int, valid_fraction: float,
                 max_documents: int | None) -> Path:
    """corpus -> tokenizer -> shards under `out`, each stage skipped when its output exists."""
    # An --out holds one corpus and its shards: a rerun must ask for the same ones.
    settings = {"corpus": corpus, "max_documents": max_documents, "vocab_size": vocab_size,
                "valid_fraction": valid_fraction}
    record = out / "data.json"
    if record.is_file() and json.loads(record.read_text()) != settings:
        raise UsageError(f"{out} holds the data of {json.loads(record.read_text())}, not of "
                         f"{settings}; choose another --out")
    record.write_text(json.dumps(settings))
    text, tokenizer, shards = out / f"{corpus}.txt", out / "tokenizer", out / "shards"
    if not text.exists():
        stats = write_corpus(corpus, text, max_documents=max_documents)
        say(f"[1/6] corpus '{corpus}': {stats['documents']} documents of {stats['min_sentences']}-"
            f"{stats['max_sentences']} sentences ({stats['sentences']} sentences, "
            f"{stats['bytes'] / 1e6:.1f} MB) -> {text}")
    if not (tokenizer / "tokenizer.model").exists():
        tok = train_tokenizer(sentences_of(iter_documents([text])), tokenizer, vocab_size)
        say(f"[2/6] tokenizer: SentencePiece unigram, {tok.vocab_size} pieces -> {tokenizer}")
    if not (shards / "manifest.json").exists():
        manifest = prepare_shards([text], tokenizer, shards, docs_per_shard=DOCS_PER_SHARD[corpus],
                                  valid_fraction=valid_fraction, workers=default_workers())
        t, v = manifest.totals("train"), manifest.totals("valid")
        say(f"[3/6] shards: train {t['documents']} documents, {t['tokens']} tokens; valid "
            f"{v['documents']} documents, {v['tokens']} tokens -> {shards}")
    if not Manifest.load(shards).totals("valid")["documents"]:
        raise UsageError(f"{shards} has no validation documents: remove it and run again with a "
                         "larger --valid-fraction")
    return shards


def _side_done(run_dir: Path, signature: dict) -> dict | None:
    """The record of a finished side trained with `signature`, or None if it has not run.
    A side that started and did not finish, or ran with other settings, code or libraries, is
    an error: its time or its checkpoints would not be this benchmark's."""
    record = run_dir / SIDE_RECORD
    if record.is_file():
        done = json.loads(record.read_text())
        if done["signature"] != signature:
            raise UsageError(f"{run_dir} was trained with "
                             f"{signature_difference(done['signature'], signature)}; choose "
                             "another --out or remove it")
        return done
    if run_dir.exists():
        raise PathExistsError(f"{run_dir} holds an unfinished run (no {SIDE_RECORD}); remove it "
                              "and run the benchmark again")
    return None


def run_signature(config: Path, run_overrides: list[str], ranks: int) -> dict:
    """What a side's record must carry to be reused: the run's config, overrides and ranks, a
    digest of mlm_dist's sources (both sides' trainers and the evaluation are in them) and the
    versions of SIGNATURE_LIBRARIES."""
    return {"config": Path(config).read_text(), "overrides": run_overrides, "ranks": ranks,
            "code": source_digest(Path(mlm_dist.__file__).parent),
            "libraries": {name: importlib.metadata.version(name)
                          for name in SIGNATURE_LIBRARIES}}


def source_digest(package: Path) -> str:
    """sha256 over the path and bytes of every .py and .yaml file under `package`: changes
    with any edit to the code or its bundled configs, whatever git knows of it (an installed
    package has no repository)."""
    digest = hashlib.sha256()
    for path in sorted(p for p in package.rglob("*") if p.suffix in (".py", ".yaml")):
        digest.update(str(path.relative_to(package)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def signature_difference(had: dict, wanted: dict) -> str:
    """What `had` (a kept side's signature) ran with that `wanted` does not, in words."""
    differences = []
    if any(had.get(k) != wanted[k] for k in ("config", "overrides", "ranks")):
        differences.append(f"another config, other overrides or ranks (it had "
                           f"{had.get('overrides')} on {had.get('ranks')} ranks)")
    if had.get("code") != wanted["code"]:
        differences.append("other mlm_dist sources (a file of the package has changed since)")
    if had.get("libraries") != wanted["libraries"]:
        differences.append(f"other libraries (it had {had.get('libraries')}, now "
                           f"{wanted['libraries']})")
    return " and ".join(differences)


@dataclass
class Setup:
    """What both sides of one seed run with, resolved once before either trains."""
    corpus: str
    config: Path
    run_overrides: list[str]  # ours gets them on its command line; cfg is them resolved
    cfg: RunConfig
    tokenizer: Tokenizer
    shards: Path
    run_dir: Path  # this seed's: ours/, reference/ and the evaluation
    steps: int
    every: int
    ranks: int
    threads: int  # the reference's
    signature: dict  # what a side's record must carry to be reused

    @property
    def phase(self) -> SequencePhase:
        return self.cfg.schedule.phases[0]

    @property
    def seed(self) -> int:
        return self.cfg.train.seed

    @property
    def ours_dir(self) -> Path:
        return self.run_dir / "ours"

    @property
    def reference_dir(self) -> Path:
        return self.run_dir / "reference"


def run_convergence(corpus: str, out: Path, steps: int, *, config: Path = CONVERGENCE_CONFIG,
                    overrides: list[str] = (), ranks: int = 2, every: int = 0, seeds: int = 1,
                    vocab_size: int = 8000, valid_fraction: float = CONVERGENCE_VALID_FRACTION,
                    max_documents: int | None = None) -> dict:
    """The whole benchmark under `out`, each stage skipped when its output exists; returns the
    result that the command prints and writes to <out>/<objective>/result.json."""
    require_matplotlib()
    if seeds < 1:
        raise UsageError(f"--seeds {seeds}: give 1 or more (3 or more to compare means)")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    every = every or max(1, steps // 10)
    shards = prepare_data(corpus, out, vocab_size, valid_fraction, max_documents).resolve()
    setups = [resolve_setup(corpus, config, overrides, shards=shards, out=out, steps=steps,
                            every=every, ranks=ranks, seed=seed)
              for seed in bench_seeds(config, overrides, seeds)]
    for setup in setups:  # every side of every seed, before any trains
        for side in (setup.ours_dir, setup.reference_dir):
            _side_done(side, setup.signature)
    runs = []
    for setup in setups:
        ours = run_ours(setup)
        reference = run_reference(setup)
        add_ours_tokens(setup, ours)
        runs.append((ours, reference, evaluate_seed(setup)))
    plot = setups[0].run_dir.parent / "convergence.png"
    plot_curves([curves for _, _, curves in runs], plot,
                plot_title(setups[0], runs[0][0]["tokens"]),
                objective_for(setups[0].cfg).headline)
    return assemble_result(setups, runs, plot)


def require_matplotlib() -> None:
    if importlib.util.find_spec("matplotlib") is None:  # before the hours of training, not after
        raise MissingPackageError("bench convergence draws its curves with matplotlib: "
                                  "pip install matplotlib (it is in mlm-dist's [test] extra)")


def bench_seeds(config: Path, overrides: list[str], n: int) -> list[int]:
    """The seeds of the N runs a side: the config's train.seed (with the overrides) and the
    next N - 1."""
    first = load_config(config, [*overrides, "data.shards=unused"]).train.seed
    return [first + k for k in range(n)]


def resolve_setup(corpus: str, config: Path, overrides: list[str], *, shards: Path, out: Path,
                  steps: int, every: int, ranks: int, seed: int) -> Setup:
    """The run config of both sides of one seed (checked for what the reference reproduces),
    the reference's threads, and the signature of this seed's sides."""
    # Ours gets these on its command line; the reference reads the same resolved config.
    run_overrides = [*overrides, f"data.shards={shards}", f"schedule.phases.0.until_step={steps}",
                     f"checkpoint.every={every}", "checkpoint.keep=0", "checkpoint.resume=false",
                     "eval.every=0", f"train.seed={seed}"]
    cfg = load_config(config, run_overrides)
    run_dir = (out / cfg.objective.name / f"seed-{seed}").resolve()
    cfg = load_config(config, [*run_overrides, f"out_dir={run_dir / 'ours'}"])
    check_comparable(cfg)
    cfg, data = resolve_data(cfg)  # model.vocab_size from the tokenizer, as train does
    tokenizer = data.tokenizer
    phase = cfg.schedule.phases[0]
    if phase.global_batch % (phase.micro_batch * ranks):
        raise UsageError(f"schedule.phases.0.global_batch {phase.global_batch} is not divisible "
                         f"by micro_batch × ranks = {phase.micro_batch} × {ranks}")
    # Ours gives each rank cores // ranks threads (engine.init_distributed); the reference
    # gets as many threads in total.
    cores = len(os.sched_getaffinity(0))
    threads = ranks * max(1, cores // ranks)
    signature = run_signature(config, run_overrides, ranks)
    return Setup(corpus=corpus, config=Path(config), run_overrides=run_overrides, cfg=cfg,
                 tokenizer=tokenizer, shards=shards, run_dir=run_dir, steps=steps, every=every,
                 ranks=ranks, threads=threads, signature=signature)


def run_ours(setup: Setup) -> dict:
    """Our side's record: of the run already in ours/, or of a new one."""
    ours = _side_done(setup.ours_dir, setup.signature)
    if ours is None:
        say(f"[4/6] ours, seed {setup.seed}: mlm-dist train ({setup.cfg.objective.name}) on "
            f"{setup.ranks} DeepSpeed ranks, {setup.steps} steps")
        setup.run_dir.mkdir(parents=True, exist_ok=True)
        ours = {"signature": setup.signature,
                **train_ours(setup.config, setup.run_overrides, setup.ours_dir, setup.ranks)}
        write_side_record(setup.ours_dir, ours)
    return ours


def run_reference(setup: Setup) -> dict:
    """The reference side's record: of the run already in reference/, or of a new one."""
    reference = _side_done(setup.reference_dir, setup.signature)
    if reference is None:
        say(f"[5/6] reference, seed {setup.seed}: transformers "
            f"{REFERENCE_RECIPES[setup.cfg.objective.name]} + torch, {setup.threads} threads, "
            f"{setup.steps} steps")
        setup.reference_dir.mkdir(parents=True)
        reference = {"signature": setup.signature,
                     **train_reference(setup.cfg, setup.reference_dir, setup.every,
                                       setup.threads)}
        write_side_record(setup.reference_dir, reference)
    return reference


def write_side_record(run_dir: Path, record: dict) -> None:
    (run_dir / SIDE_RECORD).write_text(json.dumps(record, indent=1))


def add_ours_tokens(setup: Setup, ours: dict) -> None:
    """Our run's sequences and tokens, and its non-padding tokens: counted by replaying its
    loader the first time, then kept in its record."""
    ours["sequences"] = ours["steps"] * setup.phase.global_batch
    ours["tokens"] = ours["sequences"] * setup.phase.seq_len
    if "real_tokens" not in ours:
        ours["real_tokens"] = ours_real_tokens(setup.cfg, setup.tokenizer, setup.ranks,
                                               ours["steps"])
        write_side_record(setup.ours_dir, ours)


def evaluate_seed(setup: Setup) -> dict:
    """Both sides' validation curves of one seed: scored the first time, then kept with the
    signature of the runs they score (both sides were trained with it)."""
    record = setup.run_dir / CURVES_RECORD
    if record.is_file():
        kept = json.loads(record.read_text())
        if kept["signature"] == setup.signature:
            return kept["curves"]
    say(f"[6/6] evaluation, seed {setup.seed}: the initial weights and every saved model of "
        "both sides")
    curves = evaluate_runs(setup.cfg, setup.tokenizer, setup.ours_dir, setup.reference_dir,
                           setup.every)
    record.write_text(json.dumps({"signature": setup.signature, "curves": curves}))
    return curves


def plot_title(setup: Setup, tokens: int) -> str:
    phase, cfg = setup.phase, setup.cfg
    return (f"{cfg.objective.name}, corpus '{setup.corpus}': {model_shape(cfg.model)}\nseq "
            f"{phase.seq_len}, batch {phase.global_batch}, {setup.steps} steps "
            f"({tokens / 1e6:.1f}M tokens), {cfg.train.precision}, lr {cfg.optim.lr:g}")


# ---------------------------------------------------------------------------------------------
# command line


def convergence_command(args) -> None:
    result = run_convergence(args.corpus, Path(args.out), args.steps, config=Path(args.config),
                             overrides=args.overrides, ranks=args.ranks, every=args.every,
                             seeds=args.seeds, vocab_size=args.vocab_size,
                             valid_fraction=args.valid_fraction,
                             max_documents=args.max_documents)
    (Path(args.out) / result["objective"] / "result.json").write_text(
        json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2, ensure_ascii=False))  # the corpus and plot paths as written
    if args.check and not result["targets_hold"]:
        sys.exit(1)
