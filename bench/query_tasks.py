"""The work units of bench.query, each run in a worker process: a model trained from scratch (a
seed's MHA base, a from-scratch target, a control) and, once a seed's base exists, everything done
to it: the probe, static tables in its most and in its least positional layers, and its
conversions to SQA-family layouts, each scored before and after a short fine-tune.

Every loss here is one evaluator's: `sqt.probe.mean_loss` (float32 weights, TF32 matmuls on CUDA)
on the validation windows the trainer scores on (`sqt.windows.fixed_windows`), so differences
between runs are paired on the same text."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import torch

from sqt.accounting import train_step_flops
from sqt.checkpoint import load_model
from sqt.convert import convert, finetune_config
from sqt.probe import layers_by_share, mean_loss, query_probe
from sqt.rundata import CORPUS_SEED, token_windows
from sqt.runconfig import recipe
from sqt.train import train
from sqt.utils import atomic_write_json
from sqt.windows import fixed_windows

SUMMARY_KEYS = ("label", "role", "seed", "steps", "variant", "target", "fraction", "eval_loss",
                "params", "wall_s", "ms_per_step", "q_share_layers")
_DATA: dict = {}
_SLOTS = None     # in a worker: a semaphore shared by every run, or None


def init_worker(slots, threads) -> None:
    global _SLOTS
    _SLOTS = slots
    if threads:
        torch.set_num_threads(threads)
    # train() turns TF32 on in its process; on from the start, every evaluation uses it alike.
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True


def dataset(spec: str):
    if spec not in _DATA:
        from sqt.data import load_dataset
        _DATA[spec] = load_dataset(spec)
    return _DATA[spec]


def run_train(model_cfg, train_cfg, data, *, label: str, init_from=None) -> dict:
    """sqt.train.train, holding a device slot from the moment the step is compiled and captured
    (the setup of other runs overlaps; their training steps do not share the device)."""
    held = {"slot": False}

    def take_slot():
        if _SLOTS is not None:
            _SLOTS.acquire()
            held["slot"] = True

    try:
        return train(model_cfg, train_cfg, data, init_from=init_from, label=label,
                     on_ready=take_slot)
    finally:
        if held["slot"]:
            _SLOTS.release()


def configs(common: dict, layers, seed: int, steps: int):
    """(LMConfig, TrainConfig) of a from-scratch run: the preset's recipe, as `sqt train`. A
    random query's frozen matrix is drawn from the run's seed."""
    return recipe(common["preset"], vocab_size=dataset(common["data"]).tokenizer.vocab_size,
                  layers=layers, seed=seed, query_seed=seed, device=common["device"],
                  steps=steps, progress=False, log=False, **common["overrides"])


def windows_for(common: dict) -> dict:
    """The text every seed is scored, probed and converted on."""
    data, (_, tcfg) = dataset(common["data"]), configs(common, "mha", 0, 1)
    x, y = fixed_windows(data.val, tcfg.eval_batches * tcfg.batch_size, tcfg.seq_len, "cpu")
    return {"eval": torch.cat([x, y[:, -1:]], 1),
            "probe": token_windows(data.val, common["probe_tokens"], tcfg.seq_len),
            "corpus": token_windows(data.train, common["corpus_tokens"], tcfg.seq_len,
                                    seed=CORPUS_SEED)}


def _score(model, common, text) -> float:
    return mean_loss(model.float(), text["eval"], batch_size=common["eval_batch"])


def train_task(spec: dict, common: dict) -> dict:
    """Train one model from scratch (spec: role, label, layers, seed, steps); write its run JSON.
    A base keeps its checkpoint for the conversions; bases and controls are probed (shares)."""
    data = dataset(common["data"])
    mcfg, tcfg = configs(common, spec["layers"], spec["seed"], spec["steps"])
    if spec["role"] == "base":
        # A base without its run JSON was cut short: it trains again, over what it left.
        tcfg = dataclasses.replace(tcfg, out_dir=str(Path(common["run_dir"]) / spec["model_dir"]),
                                   overwrite=True)
    result = run_train(mcfg, tcfg, data, label=spec["label"])
    model = result.pop("model")
    text = windows_for(common)
    result.update(spec, eval_loss=_score(model, common, text))
    if spec["role"] in ("base", "control"):
        probe = query_probe(model, text["probe"], batch_size=common["eval_batch"], ablate=False)
        result["q_share_layers"] = [r["q_share_layer"] for r in probe["layers"]]
    atomic_write_json(Path(common["run_dir"]) / "runs" / f"{spec['label']}.json", result)
    print(f"  done {spec['label']}: loss {result['eval_loss']:.4f}, "
          f"{result['wall_s']:.1f} s", flush=True)
    return {k: result[k] for k in SUMMARY_KEYS if k in result}


class _Finetuner:
    """Short fine-tunes of converted models: a fresh run from the converted weights with the
    base run's recipe over `steps` (sqt.convert.finetune_config), eager with the step captured as
    a CUDA graph where there is one: a short run would spend longer compiling than training."""

    def __init__(self, common: dict, base_train: dict, text: dict):
        self.common, self.base_train, self.text = common, base_train, text
        self.per_step = base_train["batch_size"] * base_train["seq_len"]
        self.runs = []

    def __call__(self, model, steps: int, label: str) -> float:
        cfg = finetune_config(self.base_train, tokens=steps * self.per_step,
                              seq_len=self.base_train["seq_len"], compile=False,
                              eval_every=steps,   # its own score is taken once, at the end
                              progress=False, log=False, device=self.common["device"])
        result = run_train(model.config, cfg, dataset(self.common["data"]), label=label,
                           init_from=model.state_dict())
        loss = _score(result["model"], self.common, self.text)
        self.runs.append({"label": label, "steps": steps, "loss": loss,
                          "ms_per_step": result["ms_per_step"], "wall_s": result["wall_s"]})
        return loss


def _static(base, probe, text, finetune, ft_steps: int, common: dict) -> dict:
    """Static tables in the k most and the k least positional layers, k = 1 .. n_layers."""
    order = layers_by_share(probe)
    done, rows = {}, []
    for k in range(1, len(order) + 1):
        for which, layers in (("most", order[:k]), ("least", order[::-1][:k])):
            key = tuple(sorted(layers))
            if key not in done:
                to = [f"table:{base.specs[i].n_q_heads}/{base.specs[i].n_kv_heads}" for i in key]
                conv, _ = convert(base, to, layers=key, corpus=text["corpus"],
                                  batch_size=common["eval_batch"])
                done[key] = {"before": _score(conv, common, text),
                             "after": finetune(conv, ft_steps, f"static-{'-'.join(map(str, key))}")}
            rows.append({"k": k, "which": which, "layers": list(key), **done[key]})
    return {"order": order, "finetune_steps": ft_steps, "rows": rows,
            "base_finetuned": finetune(base, ft_steps, "static-base")}


def _uptrain(base, probe, text, finetune, base_steps: int, common: dict, done: list) -> list:
    """Every layer converted to each target by each method, scored as converted and after
    fine-tunes of each fraction of the base budget. Rows in `done` (an earlier command on this
    run folder) that hold every fraction asked are kept, not redone."""
    kept = {(r["target"], r["method"]): r for r in done}
    for target in common["targets"]:
        for method in common["methods"]:
            old = kept.get((target, method))
            if old and all(str(f) in old["fractions"] for f in common["fractions"]):
                continue
            conv, record = convert(base, target, method=method, corpus=text["corpus"],
                                   probe=probe, batch_size=common["eval_batch"])
            row = {"target": target, "method": method, "heads": record["heads"],
                   "converted": _score(conv, common, text), "fractions": {}}
            for f in common["fractions"]:
                steps = max(1, round(f * base_steps))
                row["fractions"][str(f)] = {
                    "steps": steps, "loss": finetune(conv, steps, f"up-{target}-{method}-{f}")}
            kept[(target, method)] = row
    return list(kept.values())


def after_base(seed: int, common: dict) -> dict:
    """Everything done to seed `seed`'s trained MHA: its probe, the static-table experiment and
    the conversion experiment, as the experiments asked, on top of what an earlier command on
    this run folder did. Writes seeds/s{seed}.json."""
    t0 = time.perf_counter()
    run_dir = Path(common["run_dir"])
    path = run_dir / "seeds" / f"s{seed}.json"
    out = json.loads(path.read_text()) if path.is_file() else {}
    base, meta = load_model(run_dir / f"models/base-s{seed}", common["device"])
    text = windows_for(common)
    probe = query_probe(base, text["probe"], batch_size=common["eval_batch"],
                        per_head=common["per_head"])
    finetune = _Finetuner(common, meta["train"], text)
    base_steps = meta["train"]["steps"]
    targets = ["mha", *common["targets"], *out.get("flops_per_step", {})]
    out.update(seed=seed, base_loss=_score(base, common, text), probe=probe,
               base_steps=base_steps,
               flops_per_step={t: train_step_flops(base.config.with_layers(t), meta["train"][
                   "batch_size"], meta["train"]["seq_len"]) for t in dict.fromkeys(targets)})
    if "static" in common["experiments"] and "static" not in out:
        ft = max(1, round(common["finetune_fraction"] * base_steps))
        out["static"] = _static(base, probe, text, finetune, ft, common)
    if "uptrain" in common["experiments"]:
        out["uptrain"] = _uptrain(base, probe, text, finetune, base_steps, common,
                                  out.get("uptrain", []))
    out.update(finetunes=out.get("finetunes", []) + finetune.runs,
               wall_s=out.get("wall_s", 0.0) + time.perf_counter() - t0)
    atomic_write_json(path, out)
    print(f"  done seed {seed}'s conversions: {len(finetune.runs)} fine-tunes, "
          f"{time.perf_counter() - t0:.1f} s", flush=True)
    return out
