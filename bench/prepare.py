"""Prepare benchmark: `sqt prepare` of a corpus end to end (tokenizer training included), its
phases, and how many tokens it makes, against issue 12's target (the 100 MB Wikipedia corpus with a
10k BPE in at most 3 minutes on a 2-core CPU).

`python -m bench.prepare CORPUS [--tokenizer bpe:10000] [--val-fraction 0.01] [--out DIR]
[--work-dir DIR]`. Writes bench/results/prepare/<time>-<corpus>-<tokenizer>.json.

Method (also written into the JSON):
- One cold-start run of `sqt.data.prepare` into an empty directory, timed by the wall clock
  (perf_counter) around the call; CPU seconds (all threads of the process) beside it show how much
  of the machine it used. The phases are prepare's own clocks: `tokenizer` (a pass over the corpus
  that trains the BPE or collects the characters), `encode` (a second pass: read, tokenize in
  parallel batches, write the token files), `write` (tokenizer.json).
- `read_pass` times one bare pass of reading the corpus (decompress, decode, sha256), the floor
  under each of the two passes. `rerun` times prepare again on the finished directory: it only
  hashes the corpus and finds nothing to do.
- `peak_rss_mib` is the process's peak resident memory. The corpus is streamed, never held
  whole: what it counts is the imports (about 220 MiB, torch among them), the BPE trainer's word
  counts (about 340 MiB on the Wikipedia corpus), and one batch of text and its ids.
- The machine's load average before and after is recorded: other processes on the same cores
  slow every phase, so a figure is comparable only with others taken at a similar load.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import resource
import shutil
import tempfile
import time
from pathlib import Path

from sqt.corpus import corpus_sha256
from sqt.data import prepare
from sqt.utils import atomic_write_json, run_record

TARGET_S = 180.0
TARGET = ("issue 12: the 100 MB Wikipedia corpus (enwiki_100M.txt.gz) with a 10k BPE, tokenizer "
          "training included, in at most 3 minutes on a 2-core CPU")
RESULTS = Path(__file__).resolve().parent / "results" / "prepare"


def _timed(fn):
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - wall, time.process_time() - cpu


def run(corpus: Path, tokenizer: str, *, val_fraction: float, out_dir: Path) -> dict:
    load_before = os.getloadavg()
    _, read_s, read_cpu = _timed(lambda: corpus_sha256(corpus))
    ds, wall, cpu = _timed(lambda: prepare(corpus, tokenizer, out_dir, val_fraction=val_fraction,
                                           overwrite=True))
    _, rerun_s, _ = _timed(lambda: prepare(corpus, tokenizer, out_dir, val_fraction=val_fraction))
    meta = ds.meta
    return {
        "benchmark": "prepare",
        "run": {**run_record("cpu"), "cpu_count": os.cpu_count(),
                "cpu_model": _cpu_model(), "load_avg_1_5_15_before": load_before,
                "load_avg_1_5_15_after": os.getloadavg()},
        "method": __doc__.split("Method (also written into the JSON):\n")[1].strip(),
        "corpus": meta["corpus"],
        "tokenizer": meta["tokenizer"],
        "settings": meta["settings"],
        "dtype": meta["dtype"],
        "split": meta["split"],
        "tokens": meta["tokens"],
        "documents": meta["documents"],
        "tokens_per_byte": meta["tokens_per_byte"],
        "seconds": {"total": round(wall, 2), "cpu": round(cpu, 2),
                    **{k: v for k, v in meta["timing_s"].items() if k != "total"},
                    "read_pass": round(read_s, 2), "read_pass_cpu": round(read_cpu, 2),
                    "rerun": round(rerun_s, 2)},
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "target": {"what": TARGET, "seconds": TARGET_S},
    }


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.prepare", description=__doc__.split("\n")[0])
    p.add_argument("corpus", type=Path, help="UTF-8 text file, plain or .gz")
    p.add_argument("--tokenizer", default="bpe:10000",
                   help="char, bpe:VOCAB or a tokenizer.json path; default bpe:10000")
    p.add_argument("--val-fraction", type=float, default=0.01, help="default 0.01")
    p.add_argument("--out", type=Path, default=RESULTS,
                   help="folder for the result JSON; default bench/results/prepare")
    p.add_argument("--work-dir", type=Path, default=None,
                   help="where the prepared dataset goes (kept); default a temporary folder, "
                        "removed afterwards")
    args = p.parse_args(argv)
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="sqt-prepare-bench-"))
    try:
        result = run(args.corpus, args.tokenizer, val_fraction=args.val_fraction, out_dir=work)
    finally:
        if args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    name = re.sub(r"[^A-Za-z0-9.]+", "-", f"{args.corpus.name.split('.')[0]}-{args.tokenizer}")
    path = args.out / f"{stamp}-{name}.json"
    atomic_write_json(path, result)
    s, t = result["seconds"], result["tokens"]
    load = result["run"]["load_avg_1_5_15_before"][0]
    print(f"prepare {args.corpus.name} --tokenizer {args.tokenizer}: {s['total']:.1f} s wall "
          f"({s['cpu']:.1f} s CPU on {result['run']['cpu_count']} cores, load {load:.1f} before): "
          f"tokenizer {s['tokenizer']:.1f} s, encode {s['encode']:.1f} s; read pass "
          f"{s['read_pass']:.1f} s; re-run {s['rerun']:.1f} s")
    print(f"  {t['train']:,} train + {t['val']:,} val tokens, "
          f"{result['tokens_per_byte']:.3f} tokens/byte, {result['dtype']}; peak memory "
          f"{result['peak_rss_mib']} MiB")
    print(f"  target: <= {TARGET_S:.0f} s ({TARGET}); measured {s['total']:.1f} s")
    print(f"  wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
