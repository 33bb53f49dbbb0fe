"""One run of a quality grid (bench.quality), in a worker process when --jobs > 1: the model its
regime's recipe gives for a variant and seed, trained by bench.execution on the grid's prepared
corpus, with what a quality run adds while it holds the device (samples, active parameters,
perplexities, expert load). bench.grid_part hands these runs to the workers."""

from __future__ import annotations

import math

_DATA: dict = {}


def _dataset(path: str):
    if path not in _DATA:
        from sqt.data import PreparedDataset
        _DATA[path] = PreparedDataset(path)
    return _DATA[path]


def _extras(model, result: dict, *, data, samples: int) -> dict:
    """What a quality run adds while it still holds the device: samples, active parameters,
    perplexities, and each MoE layer's expert load at the last evaluation."""
    from sqt.accounting import active_param_count
    from .samples import generate_samples
    load = (result["curves"][-1].get("expert_load") if result["curves"] else None)
    return {
        "active_params": active_param_count(model.config),
        "best_val_ppl": math.exp(result["best_val_loss"]),
        "final_val_ppl": math.exp(result["final_val_loss"]),
        "final_expert_load": load,
        # 1.0 is a uniform share; the busiest expert of the busiest layer
        "busiest_expert_share": max(max(row) * len(row) for row in load) if load else None,
        "samples": generate_samples(model, data, result["device"], new_tokens=samples)
        if samples else [],
    }


def quality_run(spec: dict, common: dict) -> dict:
    """One run of a grid (in a worker process when --jobs > 1); its record, which the parent
    writes into the grid's folder."""
    from functools import partial
    from sqt.runconfig import recipe
    from sqt.variants import parse_layer
    from .execution import train_run
    data = _dataset(spec["data_dir"])
    mcfg, tcfg = recipe(common["preset"], vocab_size=data.tokenizer.vocab_size,
                        layers=spec["layers"], seed=spec["seed"], device=common["device"],
                        **spec["overrides"])
    record = train_run(mcfg, tcfg, data, label=f"{spec['grid']}/{spec['label']}/s{spec['seed']}",
                       key=spec["key"], peak_tflops=common.get("peak_tflops"),
                       after=partial(_extras, data=data, samples=common["samples"]))
    layers = [spec["layers"]] if isinstance(spec["layers"], str) else spec["layers"]
    layouts = sorted({f"{s.n_q_heads}/{s.n_kv_heads}" + (" table" if s.query == "table" else "")
                      for s in (parse_layer(x, mcfg.n_heads) for x in layers)})
    record.update(layouts=layouts)
    return record
