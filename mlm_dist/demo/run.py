"""The main job on a corpus already on the machine: every stage of the real pipeline, on a CPU,
in minutes, in English, Japanese or Chinese.

    corpus -> SentencePiece -> WebDataset shards (sentences, and for ja/zh the segmenter's words)
    -> `deepspeed --num_gpus N` training of configs/tiny.yaml (ZeRO-2, bf16, CPU ranks;
       `--size small`: small.yaml, hidden 256 and 4 layers, for longer; `--objective`: BERT's
       MLM + NSP by default, or mlm, sop, electra)
    -> validation perplexity before/after -> Hugging Face export -> fill-mask

English reads the Python standard library's docstrings; Japanese and Chinese read Debian's
translated manual pages (manpages-ja, manpages-zh), with whole-word masking by MeCab / jieba
words as cl-tohoku's and HFL's BERTs are trained (for every objective: ELECTRA's generator
predicts whole words too). Each stage is skipped when its output already
exists, so a rerun continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path
from typing import Callable

from mlm_dist.config import ConfigError, load_config
from mlm_dist.data.corpus import iter_documents
from mlm_dist.data.prepare import prepare_shards
from mlm_dist.demo.manpage_corpus import (CHINESE, JAPANESE, require_pages,
                                          write_chinese_corpus, write_japanese_corpus)
from mlm_dist.demo.stdlib_corpus import write_stdlib_corpus
from mlm_dist.launch.local import free_port, launcher_command, remove_shm_buffers
from mlm_dist.tokenizer import Tokenizer, sentences_of, train_tokenizer

# Package data, so an installed wheel has it too (configs/tiny.yaml in a checkout links here).
# A wheel installs unpacked: this is a file the training processes can open by its path.
TINY_CONFIG = files("mlm_dist.demo") / "tiny.yaml"
SMALL_CONFIG = files("mlm_dist.demo") / "small.yaml"


@dataclass(frozen=True)
class Size:
    """One budget of the demo: the model's config and the steps it is pretrained for."""
    config: Path
    steps: int
    # Each size has its own default directory: a rerun resumes the checkpoints there, and
    # those of one model size cannot be resumed into the other.
    out: str


SIZES = {
    "tiny": Size(TINY_CONFIG, 800, "runs/demo"),
    "small": Size(SMALL_CONFIG, 2000, "runs/demo-small"),
}


@dataclass(frozen=True)
class Readout:
    """What the demo prints of a run of one objective, by the names of its train_record and
    eval_record (objectives/*.py): the masked-LM figures (ELECTRA's are its generator's, the
    network fill-mask runs) and the accuracy of its other task, if any."""
    mlm: str  # whose masked-LM figures: "" or "generator " (for the log)
    prefix: str  # of their metric names: "" or "gen_"
    task: dict[str, str]  # val/ metric of the other task -> its name in the log
    examples: str  # what the validation split is made of (val/sequences counts them)

    def names(self) -> tuple[str, list[str]]:
        """(the training metric, the validation metrics) the demo reads."""
        p = self.prefix
        return f"train/{p}mlm_loss", [f"val/{p}perplexity", f"val/{p}mlm_acc",
                                      *(f"val/{t}" for t in self.task), "val/sequences"]


READOUTS = {
    "bert": Readout("", "", {"nsp_acc": "NSP accuracy"}, "pairs"),
    "mlm": Readout("", "", {}, "rows"),
    "sop": Readout("", "", {"sop_acc": "sentence-order accuracy"}, "pairs"),
    # rtd_acc alone says little early on: calling every token original scores 1 - the share
    # replaced (about 0.85); the AUC is 0.5 for a discriminator that cannot tell.
    "electra": Readout("generator ", "gen_", {"rtd_acc": "replaced-token accuracy",
                                              "rtd_auc": "AUC"}, "rows"),
}


def demo_dir(size: str, objective: str) -> Path:
    """The default directory of a demo: the size's, with `-<objective>` for all but bert. A
    rerun resumes the checkpoints there and appends to its metrics, so objectives do not share
    one (the corpus and shards would be the same, the networks not)."""
    out = SIZES[size].out
    return Path(out if objective == "bert" else f"{out}-{objective}")


def check_objective(out: Path, objective: str) -> None:
    """Refuse an --out that holds a demo of another objective: its checkpoints do not load into
    this objective's network, its metrics.jsonl would mix the two and its export would stay."""
    saved = out / "run" / "config.yaml"  # written when a run starts, before any checkpoint
    if saved.is_file() and (was := load_config(saved).objective.name) != objective:
        raise ConfigError(f"--objective {objective}: {out} holds a demo of objective {was}; "
                          f"rerun it with --objective {was}, or give another --out")


@dataclass(frozen=True)
class Demo:
    source: str  # where the text comes from, for the log
    write_corpus: Callable[[Path], dict]  # -> {"documents": …, "sentences": …}
    prompts: list[str]
    overrides: list[str] = field(default_factory=list)  # for `mlm-dist train`
    byte_fallback: bool = False  # characters the tokenizer never saw become bytes, not [UNK]
    # Raises, naming the fix, if the text is not on this machine: asked before anything is
    # written, so a missing package is one line, not a half-built demo directory.
    check_source: Callable[[], None] = lambda: None


def _japanese_pages() -> None:
    require_pages(JAPANESE)


def _chinese_pages() -> None:
    require_pages(CHINESE)


DEMOS = {
    "en": Demo("the Python standard library's docstrings", write_stdlib_corpus, [
        "Return the [MASK] of the list.",
        "If the file does not [MASK], an exception is raised.",
        "This function is [MASK] for backward compatibility.",
    ]),
    "ja": Demo("Debian's Japanese manual pages (manpages-ja)", write_japanese_corpus, [
        "このオプションを指定すると、[MASK]を表示する。",
        "ファイルが存在しない場合は[MASK]を返す。",
        "詳しくは[MASK]を参照すること。",
    ], ["masking.whole_word=true"], byte_fallback=True, check_source=_japanese_pages),
    "zh": Demo("Debian's Chinese manual pages (manpages-zh)", write_chinese_corpus, [
        "如果没有指定文件，则从标准[MASK]读取。",
        "该选项用于显示[MASK]信息。",
        "详细信息请参阅[MASK]手册。",
    ], ["masking.whole_word=true"], byte_fallback=True, check_source=_chinese_pages),
}


def launch_training(config: Path, overrides: list[str], ranks: int) -> None:
    """Run `mlm-dist train` under the deepspeed launcher, as a user would on one node."""
    port = free_port()
    cmd = launcher_command(ranks, port, "mlm_dist", "train", "--config", str(config), *overrides)
    print("$ " + " ".join(cmd[2:]), flush=True)
    env = dict(os.environ)
    if "DS_ACCELERATOR" not in env:
        # torch and what needs it are imported where they are used, not at the top, so that
        # `mlm-dist demo --help` (whose options are in this module) does not wait for them.
        import torch
        env["DS_ACCELERATOR"] = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        subprocess.run(cmd, check=True, env=env)
    finally:
        remove_shm_buffers(port)


def run_demo(out: Path | None = None, steps: int | None = None, ranks: int = 2,
             config: Path | None = None, lang: str = "en", size: str = "tiny",
             objective: str = "bert") -> None:
    """The demo at one of SIZES with one of READOUTS' objectives; `out` defaults to
    demo_dir's, `steps` and `config` to the size's."""
    if lang not in DEMOS:
        raise ValueError(f"--lang {lang}: the demo speaks {', '.join(DEMOS)}")
    if size not in SIZES:
        raise ValueError(f"--size {size}: the demo comes in {', '.join(SIZES)}")
    if objective not in READOUTS:
        raise ValueError(f"--objective {objective}: the demo trains {', '.join(READOUTS)}")
    demo, readout = DEMOS[lang], READOUTS[objective]
    out = demo_dir(size, objective) if out is None else Path(out)
    steps = SIZES[size].steps if steps is None else steps
    config = SIZES[size].config if config is None else config
    if not config.is_file():
        raise FileNotFoundError(f"{config} not found")
    corpus, tokenizer, shards, run = (out / "corpus.txt", out / "tokenizer", out / "shards",
                                      out / "run")
    training = [f"data.shards={shards}", f"out_dir={run}",
                f"schedule.phases.0.until_step={steps}", f"objective.name={objective}",
                *demo.overrides]
    # What the ranks will read, checked before anything is built: a --steps below the
    # config's warmup is one line now, not a failure of every rank after the corpus.
    load_config(config, training)
    check_objective(out, objective)
    if not corpus.exists():  # a rerun that has its corpus needs the text no more
        demo.check_source()
    out.mkdir(parents=True, exist_ok=True)

    if not corpus.exists():
        stats = demo.write_corpus(corpus)
        print(f"[1/5] corpus: {stats['documents']} documents, {stats['sentences']} sentences "
              f"from {demo.source} -> {corpus}", flush=True)
    if not (tokenizer / "tokenizer.model").exists():
        tok = train_tokenizer(sentences_of(iter_documents([corpus])), tokenizer, vocab_size=8000,
                              byte_fallback=demo.byte_fallback, lang=lang)
        print(f"[2/5] tokenizer: SentencePiece unigram, {tok.vocab_size} pieces -> {tokenizer}",
              flush=True)
    if not (shards / "manifest.json").exists():
        manifest = prepare_shards([corpus], tokenizer, shards, docs_per_shard=500,
                                  valid_fraction=0.02, lang=lang)
        t = manifest.totals("train")
        print(f"[3/5] shards: {t['shards']} train shards, {t['documents']} documents, "
              f"{t['tokens']} tokens -> {shards}", flush=True)

    print(f"[4/5] pretraining on {ranks} DeepSpeed ranks", flush=True)
    resume = (run / "checkpoints" / "latest").exists()
    launch_training(config, [*training, f"checkpoint.resume={str(resume).lower()}"], ranks)

    history = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    first, last = history[0], history[-1]
    loss, (perplexity, accuracy, *task, examples) = readout.names()
    print(f"{readout.mlm.capitalize()}MLM loss {first[loss]:.3f} (step {first['step']}) -> "
          f"{last[loss]:.3f} (step {last['step']})", flush=True)

    import torch

    from mlm_dist.interop.fill_mask import fill_mask
    from mlm_dist.objectives import objective_for
    from mlm_dist.training.checkpoint import load_checkpoint
    from mlm_dist.training.evaluate import evaluate

    model, cfg, tokenizer_dir = load_checkpoint(run)
    tok = Tokenizer.load(tokenizer_dir)
    # What was learned, on text the model never trained on: the held-out split, scored with the
    # run's initial weights (same seed) and with the trained ones, on the same examples and masks.
    run_objective = objective_for(cfg)
    torch.manual_seed(cfg.train.seed)
    initial = run_objective.build_model(cfg.model).eval()
    phase = cfg.schedule.phases[-1]
    before, after = (evaluate(m, cfg, phase, tok.vocabulary) for m in (initial, model))
    figures = [f"validation {readout.mlm}perplexity {before[perplexity]:.1f} (initial weights) "
               f"-> {after[perplexity]:.1f} (trained)",
               f"MLM accuracy {before[accuracy]:.3f} -> {after[accuracy]:.3f}",
               *(f"{label} {before[k]:.3f} -> {after[k]:.3f}"
                 for k, label in zip(task, readout.task.values()))]
    print(", ".join(figures) + f" ({after[examples]:.0f} held-out {readout.examples})",
          flush=True)
    hf_dir = out / "hf"
    if not hf_dir.exists():
        run_objective.export(model.state_dict(), cfg.model, tokenizer_dir, hf_dir)
    generator = ("; generator/ holds the generator, ElectraForMaskedLM"
                 if objective == "electra" else "")
    print(f"[5/5] exported to {hf_dir} (transformers.{run_objective.hf_class}.from_pretrained "
          f"loads it{generator}); fill-mask with the trained {readout.mlm.strip() or 'model'}:",
          flush=True)
    for prompt in demo.prompts:
        (top,) = fill_mask(model, tok, prompt, top_k=5)
        print(f"  {prompt}\n    -> " + ", ".join(f"{p['token']} ({p['prob']:.2f})" for p in top))


def demo_command(args) -> None:
    run_demo(Path(args.out) if args.out else None, steps=args.steps, ranks=args.ranks,
             lang=args.lang, size=args.size, objective=args.objective)


def add_arguments(de: argparse.ArgumentParser) -> None:
    """`mlm-dist demo`'s options."""
    de.add_argument("--out", help="default: runs/demo, runs/demo-small for --size small; "
                                  "-<objective> appended for an --objective other than bert")
    de.add_argument("--size", default="tiny", choices=["tiny", "small"],
                    help="tiny: hidden 128, 2 layers, 800 steps (a few minutes); small: hidden "
                         "256, 4 layers, 2000 steps (see README's Downstream accuracy)")
    de.add_argument("--steps", type=int, help="pretraining steps (default: the size's)")
    de.add_argument("--ranks", type=int, default=2)
    de.add_argument("--lang", default="en", choices=["en", "ja", "zh"],
                    help="en: stdlib docstrings; ja / zh: Debian's manpages-ja / manpages-zh, "
                         "whole-word masking by MeCab / jieba words")
    de.add_argument("--objective", default="bert", choices=("bert", "mlm", "sop", "electra"),
                    help="what the model learns (objective.name): bert: MLM + next-sentence "
                         "prediction; mlm: MLM on full rows (RoBERTa); sop: MLM + sentence "
                         "order (ALBERT); electra: replaced-token detection, fill-mask by its "
                         "generator (default: bert)")
    de.set_defaults(func=demo_command)
