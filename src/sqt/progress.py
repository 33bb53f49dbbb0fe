"""What a training run says while it trains: a progress bar on stderr and/or one JSON line per
evaluation on stdout (what a pipe or a log file gets)."""

from __future__ import annotations

import json
import sys


class Reporter:
    def __init__(self, total: int, initial: int, *, bar: bool, log: bool, label: str):
        self.bar, self.plain, self.log, self.total, self.label = None, bar, log, total, label
        if bar:
            try:
                from tqdm import tqdm
                self.bar = tqdm(total=total, initial=initial, desc=label, dynamic_ncols=True)
                self.plain = False
            except ImportError:
                pass

    def update(self, n: int):
        if self.bar is not None:
            self.bar.update(n)

    def evaluation(self, point: dict):
        text = f"train {point['train_loss']:.3f} val {point['val_loss']:.3f}"
        if self.bar is not None:
            self.bar.set_postfix_str(text)
        elif self.plain:
            print(f"step {point['step']}/{self.total} {text}", file=sys.stderr, flush=True)
        if self.log:
            print(json.dumps({"event": "eval", "label": self.label, **point}), flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()
