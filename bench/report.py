"""Regenerate docs/results.md entirely from the JSON under bench/results (no hand-typed numbers,
except the seed README's claim, which is quoted as such beside ours).

    python -m bench.report [--sweep DIR] [--layer-sweep DIR] [--out docs/results.md]
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import sys
from pathlib import Path

from sqt.utils import atomic_write_bytes

from .layer_sweep import render_rows
from .sweep import fmt, pct, quality_table, seed_table, speed_note, speed_table, table

# The SQT seed README's table, quoted verbatim: character-level Tiny Shakespeare, seq 256, batch 64,
# 2000 steps, one seed, on an RTX 3050. It is their claim, not a measurement of this code.
SEED_CLAIM = {
    "setup": "RTX 3050; Tiny Shakespeare (char), seq 256, batch 64, 2000 steps, one seed",
    "rows": {
        "tiny": {"params": "305 k", "baseline_ppl": 11.61, "sqt_ppl": 12.00, "delta": "+3.4 %",
                 "inference": "-8.3 % faster"},
        "small": {"params": "2.2 M", "baseline_ppl": 8.47, "sqt_ppl": 11.49, "delta": "+35 %",
                  "inference": "unchanged"},
        "medium": {"params": "7.0 M", "baseline_ppl": 7.80, "sqt_ppl": 9.59, "delta": "+23 %",
                   "inference": "-16 % faster"},
    },
}
OTHER_SECTIONS = ("bench.throughput", "bench.decode")


def newest_summary(results: Path, kind: str) -> Path | None:
    """The newest `<results>/<kind>/<run id>/summary.json`; run ids start with a UTC timestamp."""
    found = sorted((results / kind).glob("*/summary.json"))
    return found[-1] if found else None


def load_summary(path: Path) -> dict:
    path = Path(path)
    if path.is_dir():
        path = path / "summary.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"summary {str(path)!r} does not exist: run bench.sweep or "
                                "bench.layer_sweep first, or name an existing run folder") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"summary {str(path)!r} is not valid JSON ({e})") from None


def provenance(summary: dict, path: Path) -> str:
    rec = summary["run_record"]
    return (f"Source: `{path}`. Device: {rec.get('device')}; torch {rec.get('torch')}"
            + (f", CUDA {rec['cuda']}" if rec.get("cuda") else "")
            + f"; date {rec.get('date')}; git {rec.get('git') or 'unknown'}. "
            f"Command: `{rec.get('command', '?')}`.")


def hparam_line(summary: dict) -> str:
    parts = [f"{s}: lr {h['lr']:g}, dropout {h['dropout']:g}"
             for s, h in (summary.get("hparams") or {}).items() if h]
    over = {k: v for k, v in (summary.get("overrides") or {}).items() if v is not None}
    shared = summary.get("shared") or {}
    return ("Hyperparameters — " + "; ".join(parts)
            + (f" (overridden: {over})" if over else "")
            + (f"; shared: {', '.join(f'{k} {v:g}' for k, v in shared.items())}" if shared
               else "")
            + "; AdamW, warmup then cosine to lr/10, no decay on norms/biases/embeddings/static "
              "query tables.")


def seed_comparison(summary: dict) -> str | None:
    """Our mha vs sqt numbers beside the seed's, size by size."""
    by = {(r["size"], r["variant"]): r for r in summary["rows"]}
    out = []
    for size, claim in SEED_CLAIM["rows"].items():
        base, sqt = by.get((size, "mha")), by.get((size, "sqt"))
        if base is None or sqt is None:
            continue
        bp, sp = base["best_val_ppl"]["mean"], sqt["best_val_ppl"]["mean"]
        out.append([size, claim["params"], f"{base['params'] / 1e6:.2f} M / "
                    f"{sqt['params'] / 1e6:.2f} M", f"{claim['baseline_ppl']:.2f}",
                    fmt(base["best_val_ppl"], 3), f"{claim['sqt_ppl']:.2f}",
                    fmt(sqt["best_val_ppl"], 3), claim["delta"], pct(sp, bp), claim["inference"],
                    pct(sqt["forward_ms"], base["forward_ms"]),
                    pct(sqt["decode_ms_per_token"], base["decode_ms_per_token"])])
    if not out:
        return None
    return table(["size", "params (seed)", "params (ours: mha / sqt)", "baseline ppl (seed)",
                  "baseline ppl (ours)", "SQT ppl (seed)", "SQT ppl (ours)", "Δ ppl (seed)",
                  "Δ ppl (ours)", "inference (seed)", "forward latency (ours)",
                  "decode latency (ours)"], out)


def sweep_section(summary: dict, path: Path, doc_dir: Path) -> str:
    rec = summary["run_record"]
    parts = ["## Size sweep", provenance(summary, path),
             f"{summary['steps']} steps, batch {summary['batch_size']} × {summary['seq_len']}, "
             f"{summary['seeds']} seed(s), mean ± std over seeds; perplexity = exp(val loss in "
             "nats per character), on the same fixed validation batches for every run.",
             hparam_line(summary)]
    seed = seed_comparison(summary)
    if seed:
        parts += ["### Beside the seed's claim",
                  f"The seed's columns are quoted from its README ({SEED_CLAIM['setup']}); ours "
                  "are best-validation perplexities measured by this code.", seed]
    parts += [f"### Every variant against {summary['baseline']}",
              seed_table(summary["rows"], summary["baseline"]),
              "### Variant quality", quality_table(summary["rows"])]
    if summary.get("plot"):
        img = Path(os.path.relpath(path.parent / summary["plot"], doc_dir))
        parts += ["### Learning curves", f"![learning curves]({img.as_posix()})"]
    parts += ["### Speed", speed_table(summary["rows"]), speed_note(summary["rows"], rec),
              f"Sweep wall time: {rec['total_wall_s']:.1f} s (training {rec['train_wall_s']:.1f} s"
              ", including compilation and evaluation)."]
    return "\n\n".join(parts)


def layer_section(summary: dict, path: Path) -> str:
    return "\n\n".join([
        "## Layer sweep", provenance(summary, path),
        f"Size {summary['size']}: the first N of {summary['n_layers']} layers `{summary['sqt']}`, "
        f"the rest `{summary['rest']}`; {summary['steps']} steps, {summary['seeds']} seed(s).",
        render_rows(summary["rows"]),
        f"Largest N whose best-val ppl stays within {100 * summary['tolerance']:g} % of N = 0 "
        f"(≤ {summary['ppl_limit']:.3f}): **N = {summary['largest_n_within']}**.",
        speed_note(summary["rows"], summary["run_record"])])


def other_sections(results: Path) -> list[str]:
    out = []
    for name in OTHER_SECTIONS:
        if importlib.util.find_spec(name) is None:
            continue
        module = importlib.import_module(name)
        fn = getattr(module, "markdown_section", None)
        if fn is not None:
            text = fn(results)
            if text:
                out.append(text.strip())
    return out


def render(results: Path, doc_dir: Path, sweep: Path | None = None,
           layer: Path | None = None) -> str:
    sweep = sweep or newest_summary(results, "sweep")
    layer = layer or newest_summary(results, "layer_sweep")
    parts = ["# Results",
             "Generated by `python -m bench.report` from the JSON under "
             f"`{results.as_posix()}`; do not edit by hand. Re-run the benchmarks and this command "
             "to update it."]
    if sweep is not None:
        sweep = Path(sweep) / "summary.json" if Path(sweep).is_dir() else Path(sweep)
        parts.append(sweep_section(load_summary(sweep), sweep, doc_dir))
    if layer is not None:
        layer = Path(layer) / "summary.json" if Path(layer).is_dir() else Path(layer)
        parts.append(layer_section(load_summary(layer), layer))
    parts += other_sections(results)
    if len(parts) == 2:
        parts.append("No results yet: run `python -m bench.sweep` and `python -m "
                     "bench.layer_sweep` first.")
    return "\n\n".join(parts) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__.split("\n")[0])
    p.add_argument("--results", default="bench/results")
    p.add_argument("--sweep", default=None, help="a sweep run folder or summary (default: newest)")
    p.add_argument("--layer-sweep", default=None, help="a layer-sweep run folder or summary "
                   "(default: newest)")
    p.add_argument("--out", default="docs/results.md")
    args = p.parse_args(argv)
    out = Path(args.out)
    try:
        text = render(Path(args.results), out.parent, args.sweep, args.layer_sweep)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    atomic_write_bytes(out, text.encode())
    print(f"wrote {out} ({len(text.splitlines())} lines)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
