"""The quality benchmark's grids: the two regimes (model preset, tokenizer, variants, budget,
evaluation), a grid's identity (what runs must share to belong to one grid: regime, recipe,
corpus and tokenizer hashes, token budget) and its folder of run and part records, read back so
that a grid can be run in parts and resumed."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

# The dense SQT+SQA hybrid: static query tables (with SQA's heads: 8 query heads from the table,
# 4 K/V heads) in the first quarter of the layers, SQA in the rest. A quarter because the
# character-level layer sweep kept one static layer of four within 2 % of MHA's perplexity and
# lost more with two (bench/results/layer_sweep); SQA's heads so that the hybrid asks what static
# queries add to the query-side saving SQA already makes.
DENSE_HYBRID = ("table:sqa",) * 2 + ("sqa",) * 6


@dataclass(frozen=True)
class Regime:
    """One regime of the benchmark: everything but the corpus path and the run's options."""
    name: str
    preset: str
    tokenizer: str                  # sqt prepare's spec
    variants: dict                  # label -> layers: a variant name, or one spec per layer
    budget: dict                    # {"epochs": E} or {"tokens": N}, resolved on the train split
    eval_points: int                # evaluations per run: the learning curve's points
    eval_batches: int               # per evaluation, of the recipe's batch (on CUDA)
    val_fraction: float             # sqt prepare's
    jobs: int                       # worker processes on CUDA by default
    about: str
    secondary: Optional[dict] = field(default=None)   # the secondary corpus's budget and split


REGIMES = {
    # 10 variants x 3 seeds of the SQA blog's dense model at 2 epochs of enwiki_100M (~51M tokens,
    # ~780 steps of 64 x 1024 on the recipe). Measured eager at 1k x 128 an MHA step took 100 ms
    # and xSQA's 68 ms; compiled and at half the batch, about 25-35 ms: ~25 s a run, ~13 min of
    # training for the grid, in two parts of < 9 minutes. 4 jobs: a compile (30-60 s of CPU)
    # hides behind three runs training; each waiting run holds ~10 GB of the GPU.
    "dense": Regime(
        name="dense", preset="sqa-dense", tokenizer="bpe:10000",
        variants={"mha": "mha", "gqa": "gqa", "mqa": "mqa", "sqa": "sqa", "ssqa": "ssqa",
                  "xsqa": "xsqa", "xsmqa": "xsmqa", "lsqa": "lsqa", "sqt": "sqt",
                  "sqt2+sqa": DENSE_HYBRID},
        budget={"epochs": 2.0}, eval_points=12, eval_batches=4, val_fraction=0.01, jobs=4,
        about="the SQA blog's dense model (8 layers, d_model 256, 16 heads, context 1024) on a "
              "10k BPE of Wikipedia (enwiki_100M)"),
    # The model card's micro MoE, its five layouts plus MHA (8/2, 8/1, 4/2, 4/4, 2/2, 8/8 at 8
    # heads). Primary: 2 epochs of gutenberg_100M (~59M tokens, ~1,800 steps of 128 x 256),
    # seconds a run on an H100. Secondary: the TinyStories excerpt, 5 epochs as the card trained
    # (its 1.02M tokens are 1/500 of the card's data), split 95/5 so that validation is ~50k
    # tokens rather than 10k.
    "micro": Regime(
        name="micro", preset="sqat-micro", tokenizer="bpe:5000",
        variants={"gqa": "gqa", "mqa": "mqa", "sqa": "sqa", "ssqa": "ssqa", "xsqa": "xsqa",
                  "mha": "mha"},
        budget={"epochs": 2.0}, eval_points=12, eval_batches=8, val_fraction=0.01, jobs=8,
        about="the SQAT-mm model card's micro MoE (6 layers, d_model 128, 8 heads, 12 experts "
              "top-2, context 256) on a 5k BPE",
        secondary={"budget": {"epochs": 5.0}, "val_fraction": 0.05,
                   "about": "1/500 of the card's data: the 4 MB lowercased TinyStories excerpt "
                            "(the card: full TinyStories, 5 epochs, 2.3B tokens)"}),
}

# TrainConfig fields that change what a run learns; the others (device, compile, logging, the
# way a batch is split into micro-batches) do not, and runs differing in them share a grid.
RECIPE_FIELDS = ("batch_size", "seq_len", "lr", "min_lr", "warmup", "weight_decay", "beta1",
                 "beta2", "grad_clip", "eval_every", "eval_batches", "dtype")
MODEL_FREE = ("layers", "backend", "checkpoint_blocks", "moe_impl")


def identity(regime: Regime, role: str, model_cfg, train_cfg, described: dict,
             budget_asked: dict) -> dict:
    """What every run of one grid shares. `model_cfg`/`train_cfg`: any variant's resolved
    configs; `described`: the dataset's describe(); `budget_asked`: the budget as given."""
    budget = train_cfg.budget(described["train_tokens"])
    return {
        "regime": regime.name, "role": role, "preset": regime.preset,
        "corpus": {"name": described["name"], "sha256": described["sha256"]},
        "tokenizer_sha256": described["tokenizer_sha256"], "vocab_size": described["vocab_size"],
        "train_tokens": described["train_tokens"], "val_tokens": described["val_tokens"],
        "budget": {"asked": budget_asked, "steps": budget["steps"],
                   "tokens_per_step": budget["tokens_per_step"], "tokens": budget["tokens"],
                   "epochs": round(budget["epochs"], 4)},
        "recipe": {k: getattr(train_cfg, k) for k in RECIPE_FIELDS},
        "model": {k: v for k, v in model_cfg.to_dict().items() if k not in MODEL_FREE},
    }


def grid_id(ident: dict) -> str:
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:10]


def resolve_steps(budget: dict, train_tokens: int, tokens_per_step: int) -> int:
    """A budget of epochs or tokens as whole steps: the same rule as TrainConfig.resolve."""
    if "tokens" in budget:
        return math.ceil(budget["tokens"] / tokens_per_step)
    return max(1, math.ceil(budget["epochs"] * train_tokens / tokens_per_step))


def corpus_stem(name: str) -> str:
    for suffix in (".gz", ".txt"):
        name = name[:-len(suffix)] if name.endswith(suffix) else name
    return name


def grid_folder(out: Path, ident: dict) -> Path:
    stem = corpus_stem(ident["corpus"]["name"])
    return Path(out) / "quality" / f"{ident['regime']}-{ident['role']}-{stem}-{grid_id(ident)}"


def run_file(folder: Path, label: str, seed: int) -> Path:
    safe = label.replace("/", "_").replace(":", "-")
    return Path(folder) / "runs" / f"{safe}-s{seed}.json"


def read_runs(folder: Path) -> dict:
    """(label, seed) -> the record of every run written in the grid's folder."""
    runs = {}
    for path in sorted((Path(folder) / "runs").glob("*.json")):
        try:
            r = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue     # half a file cannot be there (atomic writes); anything else: re-run
        runs[(r.get("variant"), r.get("seed"))] = r
    return runs


def prior_estimates(runs: dict) -> tuple[float, float]:
    """The longest device time and setup time of the grid's trained runs: what the wall-time
    guard assumes for the next run until this part trains one."""
    ok = [r for r in runs.values() if r.get("status") == "ok"]
    return (max((r.get("gpu_s") or 0.0 for r in ok), default=0.0),
            max((r.get("setup_s") or 0.0 for r in ok), default=0.0))
