"""Learning-rate and dropout probes: sweep folders tagged `probe-...` (single-variant sweeps run
with --lr/--dropout overrides), in one table beside the per-size defaults."""

from __future__ import annotations

from ..claims import SEED_SIZES
from ..markdown import fmt, table


def section(ctx) -> str | None:
    _, probes = ctx.sweeps
    if not probes:
        return None
    rows = []
    for summary, path in probes:
        for r in summary["rows"]:
            h = r["hparams"]
            rows.append([r["size"], r["variant"], f"{h['lr']:g}", f"{h['dropout']:g}",
                         fmt(r["best_val_loss"], 4), str(r["seeds"]), f"`{path.parent.name}`"])
    rows.sort(key=lambda x: (SEED_SIZES.index(x[0]) if x[0] in SEED_SIZES else 9, x[2], x[3]))
    return "\n\n".join([
        "## Learning-rate and dropout probes",
        "Baseline (`mha`) runs with the learning rate or dropout overridden, 2000 steps, one seed "
        "each, trained concurrently on one device. The per-size defaults in `bench/sweep.py` "
        "(shown in each sweep's hyperparameter line) were kept where no probe beat them clearly.",
        table(["size", "variant", "lr", "dropout", "best val loss (nats)", "seeds", "run"], rows)])
