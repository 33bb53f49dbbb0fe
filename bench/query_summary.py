"""bench.query's summary: the per-seed results of its work units gathered into mean ± std rows,
every difference paired within a seed (the same base, the same validation text)."""

from __future__ import annotations

from .sweep import mean_std


def _paired(values_a, values_b) -> dict:
    return mean_std([a - b for a, b in zip(values_a, values_b)])


def static_summary(seeds: list[dict]) -> dict:
    """Loss against the number k of static-table layers, the most and the least positional ones,
    before and after the fine-tune, each as Δ from the base (after: from the base fine-tuned for
    as long); and how the probe's per-layer share ranks its per-layer Δ."""
    n = len(seeds[0]["probe"]["layers"])
    rows = []
    for k in range(1, n + 1):
        row = {"k": k}
        for which in ("most", "least"):
            hits = [next(r for r in s["static"]["rows"] if r["k"] == k and r["which"] == which)
                    for s in seeds]
            row[which] = {
                "layers": [h["layers"] for h in hits],
                "delta_before": _paired([h["before"] for h in hits],
                                        [s["base_loss"] for s in seeds]),
                "delta_after": _paired([h["after"] for h in hits],
                                       [s["static"]["base_finetuned"] for s in seeds])}
        for when in ("before", "after"):   # > 0: the least positional layers cost more
            row[f"least_minus_most_{when}"] = _paired(
                [r[when] for r in _rows(seeds, k, "least")],
                [r[when] for r in _rows(seeds, k, "most")])
        rows.append(row)
    layers = [{"layer": i,
               "q_share": mean_std([s["probe"]["layers"][i]["q_share_layer"] for s in seeds]),
               "k_share": mean_std([s["probe"]["layers"][i]["k_share_layer"] for s in seeds]),
               "q_share_rotated": mean_std([s["probe"]["layers"][i].get("q_share_rotated_layer")
                                            for s in seeds]),
               "delta_loss": mean_std([s["probe"]["layers"][i]["delta_loss"] for s in seeds])}
              for i in range(n)]
    return {"n_layers": n, "finetune_steps": seeds[0]["static"]["finetune_steps"],
            "rows": rows, "layers": layers,
            "share_delta_spearman": mean_std([s["probe"]["share_delta_spearman"] for s in seeds]),
            "base_loss": mean_std([s["base_loss"] for s in seeds]),
            "base_finetuned": mean_std([s["static"]["base_finetuned"] for s in seeds])}


def _rows(seeds, k, which):
    return [next(r for r in s["static"]["rows"] if r["k"] == k and r["which"] == which)
            for s in seeds]


def uptrain_summary(seeds: list[dict], scratch: list[dict]) -> dict:
    """Per target and method: the loss as converted and after each fine-tune, against the target
    trained from scratch for the base budget plus the fine-tune's steps (paired by seed), with
    the training compute of both (FLOPs: the MHA base plus the fine-tune, or the scratch run)."""
    base_steps = seeds[0]["base_steps"]
    per_step = seeds[0]["flops_per_step"]
    scratch_rows, by_key = [], {}
    for r in scratch:
        by_key.setdefault((r["target"], r["fraction"]), {})[r["seed"]] = r
    for (target, f), runs in sorted(by_key.items()):
        steps = next(iter(runs.values()))["steps"]
        scratch_rows.append({"target": target, "fraction": f, "steps": steps,
                             "flops": steps * per_step[target],
                             "loss": mean_std([r["eval_loss"] for r in runs.values()])})
    rows = []
    for first in seeds[0]["uptrain"]:
        target, method = first["target"], first["method"]
        cells = {s["seed"]: c for s in seeds for c in s["uptrain"]
                 if (c["target"], c["method"]) == (target, method)}
        row = {"target": target, "method": method, "heads": first["heads"],
               "converted": mean_std([c["converted"] for c in cells.values()]), "fractions": []}
        for key, point in first["fractions"].items():
            f, mine = float(key), by_key.get((target, float(key)), {})
            losses = {seed: c["fractions"][key]["loss"] for seed, c in cells.items()
                      if key in c["fractions"]}
            paired = [loss - mine[seed]["eval_loss"] for seed, loss in losses.items()
                      if seed in mine]
            row["fractions"].append({
                "fraction": f, "steps": point["steps"],
                "flops": base_steps * per_step["mha"] + point["steps"] * per_step[target],
                "loss": mean_std(list(losses.values())),
                "delta_vs_scratch": mean_std(paired) if paired else None})
        rows.append(row)
    return {"base_steps": base_steps, "rows": rows, "scratch": scratch_rows,
            "mha": {"loss": mean_std([s["base_loss"] for s in seeds]),
                    "flops": base_steps * per_step["mha"]}}


def controls_summary(controls: list[dict], bases: list[dict]) -> list[dict]:
    """One row per variant, MHA first: parameters, loss, its change from the MHA of the same
    seed, and the layers' mean positional share of the query."""
    base = {b["seed"]: b["eval_loss"] for b in bases}
    rows = []
    for variant in dict.fromkeys(["mha"] * bool(bases) + [c["variant"] for c in controls]):
        runs = bases if variant == "mha" else [c for c in controls if c["variant"] == variant]
        rows.append({
            "variant": variant, "params": runs[0]["params"],
            "loss": mean_std([r["eval_loss"] for r in runs]),
            "delta_vs_mha": mean_std([r["eval_loss"] - base[r["seed"]] for r in runs
                                      if r["seed"] in base]),
            "q_share": mean_std([sum(r["q_share_layers"]) / len(r["q_share_layers"])
                                 for r in runs])})
    return rows
