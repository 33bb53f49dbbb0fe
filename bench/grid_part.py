"""One part of a quality grid: one invocation of bench.quality training what its grids' folders
lack, writing each run as it ends and a part record (command, device, MPS, wall time from process
start, what trained, failed or was skipped) that it keeps current, so that a part stopped from
outside still says how long it held the GPU."""

from __future__ import annotations

import datetime
import os
import sys
import time
from pathlib import Path

import torch

from sqt.utils import atomic_write_json

from . import quality_grid as qg
from .common import report_run
from .execution import run_grid
from .gpus import parse_gpus
from .mps import mps_daemon
from .quality_task import quality_run


def part_specs(grids: list[dict], regime: qg.Regime) -> list[dict]:
    """Every run still to train, seed-major (each variant's first seed before any second one),
    so a part cut short by its deadline leaves whole seeds of the grid rather than whole
    variants missing."""
    specs = []
    for key, g in enumerate(grids):
        for seed in sorted({s for _, s in g["todo"]}):
            for label, s in g["todo"]:
                if s == seed:
                    specs.append({"key": key, "grid": f"{g['ident']['regime']}-{g['role']}",
                                  "grid_id": g["id"], "data_dir": g["data_dir"], "label": label,
                                  "layers": regime.variants[label], "seed": seed,
                                  "overrides": g["overrides"]})
    return specs


def run_part(args, regime: qg.Regime, grids: list[dict], *, device, peak: float,
             prepare_s: float, record: dict, process_start: float) -> int:
    cuda = device.type == "cuda"
    # --gpus: one worker per GPU, pinned to it; each run has a GPU alone, so no device slots.
    gpus = parse_gpus(args.gpus, available=torch.cuda.device_count()) if args.gpus else None
    jobs = len(gpus) if gpus else args.jobs or (regime.jobs if cuda else 1)
    slots = args.device_slots if cuda and jobs > 1 and not gpus else None
    specs = part_specs(grids, regime)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    part_id = f"{stamp}-{os.getpid()}"
    # Two parts of one process within a second (a script calling main twice) get distinct ids.
    taken = {p.stem for g in grids for p in (Path(g["folder"]) / "parts").glob("*.json")}
    part_id = next(i for i in (part_id, *(f"{part_id}-{n}" for n in range(2, 10 ** 6)))
                   if i not in taken)
    started = time.time() - (time.perf_counter() - process_start)
    deadline = started + 60 * args.max_minutes if args.max_minutes else None
    part = {"kind": "quality_part", "id": part_id, "regime": regime.name,
            "grids": [g["id"] for g in grids], "run_record": record,
            "command": "python -m bench.quality " + " ".join(sys.argv[1:]),
            "jobs": jobs, "device_slots": slots, "gpus": gpus, "max_minutes": args.max_minutes,
            "matmul_peak_tflops": peak, "prepare_s": prepare_s, "wall_from": "process start",
            "planned": [f"{s['grid']}/{s['label']}/s{s['seed']}" for s in specs],
            "ok": [], "failed": [], "skipped": [], "complete": False}

    def save_part() -> None:
        part["wall_s"] = time.time() - started
        for g in grids:
            atomic_write_json(Path(g["folder"]) / "parts" / f"{part_id}.json", part)

    def on_record(spec: dict, r: dict) -> None:
        g = grids[spec["key"]]
        r.update(variant=spec["label"], seed=spec["seed"], grid_id=spec["grid_id"],
                 regime=regime.name, role=g["role"], part=part_id,
                 concurrent_jobs=jobs, device_slots=slots)
        name = f"{spec['grid']}/{spec['label']}/s{spec['seed']}"
        if r["status"] != "skipped":
            atomic_write_json(qg.run_file(g["folder"], spec["label"], spec["seed"]), r)
            g["runs"][(spec["label"], spec["seed"])] = r
        part[r["status"]].append(name if r["status"] == "ok" else
                                 {"run": name, "why": r.get("error") or r.get("reason"),
                                  "failure": r.get("failure")})
        save_part()
        if r["status"] == "ok":
            print(f"  done {name}: best val {r['best_val_loss']:.4f} "
                  f"(acc {100 * r['best_val_acc']:.2f} %), {r['ms_per_step'] or float('nan'):.2f} "
                  f"ms/step alone, {r['gpu_s'] or 0:.1f} s on the device", flush=True)
        else:
            print(f"  {r['status']} {name}: {r.get('error') or r.get('reason')}", flush=True)

    common = {"preset": regime.preset, "device": str(device), "peak_tflops": peak,
              "samples": args.sample_tokens}
    print(f"quality {regime.name}: {len(specs)} runs on {record['device']} (torch "
          f"{record['torch']}), jobs={jobs}, device slots={slots}"
          + (f", stopping new runs {args.max_minutes:g} min after start" if deadline else ""),
          flush=True)
    save_part()
    with mps_daemon(args.mps and cuda) as mps:
        part["mps"] = mps
        save_part()
        if specs:
            run_grid(quality_run, specs, common, jobs=jobs, slots=slots, gpus=gpus,
                     deadline=deadline,
                     estimates=[g["estimates"][0] for g in grids],
                     ready_estimates=[g["estimates"][1] for g in grids], on_record=on_record)
    part["mps"] = mps
    part["complete"] = all(g["runs"].get((v, s), {}).get("status") == "ok"
                           for g in grids for v in regime.variants for s in range(3))
    save_part()
    print(f"\npart {part_id}: {len(part['ok'])} trained, {len(part['failed'])} failed, "
          f"{len(part['skipped'])} skipped, {part['wall_s'] / 60:.2f} min from process start"
          + (f" (MPS: {'on' if mps['running'] else 'off: ' + mps.get('error', '')})"
             if mps["requested"] else ""), flush=True)
    if part["skipped"]:
        print("skipped by the wall-time guard: "
              + ", ".join(s["run"] for s in part["skipped"])
              + "\nrun the same command again to train them", flush=True)
    for g in grids:
        print()
        report_run(g["folder"], *([] if cuda else ["--no-plot"]))
    return 0
