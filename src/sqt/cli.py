"""The `sqt` command: the parser that lists every subcommand, and main, which runs one and turns a
user error into one line. Each subcommand is one parser (`_add_X`) and one body (`X_command`) that
calls the library. `sqt generate CHECKPOINT --prompt TEXT` streams text from a checkpoint, and `sqt
probe` and `sqt convert` study and change a model's queries (here); `sqt train` trains a model from
a preset, a TOML run file and flags (sqt.cli_train); `sqt prepare`, `sqt export` and `sqt
import-hf` move data and models between formats (sqt.cli_formats). A user error (bad settings,
missing or incompatible checkpoint, a prompt the model cannot take, a file that cannot be read or
written) prints one line on stderr and exits with status 2, without a traceback; a training run
whose loss stops being finite exits with status 1 after one line saying where and what is kept."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Optional

from .cli_errors import RUN_FAILED, USAGE_ERROR, UsageError
from .cli_formats import _add_export, _add_import_hf, _add_prepare
from .cli_train import _add_train


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line (`sqt train: error: ...`) with exit status 2."""

    def error(self, message):
        self.exit(USAGE_ERROR, f"{self.prog}: error: {message}\n")


# ---------------------------------------------------------------------------------------- generate

def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="stream text from a checkpoint directory",
                       description="Generate text from a checkpoint written by `sqt train` or "
                                   "`sqt import-hf`, decoded with its tokenizer and printed as "
                                   "it is produced. With a tokenizer that has an end-of-text "
                                   "token (<|endoftext|>), generation stops there unless "
                                   "--no-stop is given.")
    p.add_argument("checkpoint", help="a run directory (sqt train --out-dir), a checkpoint or "
                                      "model directory (config.json + model.safetensors + "
                                      "tokenizer.json)")
    p.add_argument("--prompt", required=True, help="text to continue")
    p.add_argument("--max-new-tokens", type=int, default=200,
                   help="tokens to generate, capped by the model's context (default: %(default)s)")
    p.add_argument("--temperature", type=float, default=0.8,
                   help="sampling temperature, 0 is greedy (default: %(default)s)")
    p.add_argument("--top-k", type=int, default=None,
                   help="sample among the k likeliest tokens (default: %(default)s, all)")
    p.add_argument("--top-p", type=float, default=None,
                   help="nucleus sampling mass in (0, 1] (default: %(default)s, all)")
    p.add_argument("--seed", type=int, default=None,
                   help="seed for reproducible sampling (default: %(default)s, a fresh one)")
    stop = p.add_mutually_exclusive_group()
    stop.add_argument("--stop", default=None, metavar="TEXT",
                      help="text of exactly one token that ends generation, printed (default: "
                           "%(default)s: the end-of-text token, not printed, when the tokenizer "
                           "has one)")
    stop.add_argument("--no-stop", action="store_true",
                      help="generate all --max-new-tokens tokens, past any end-of-text token "
                           "(default: %(default)s)")
    p.add_argument("--device", default="auto",
                   help="auto (CUDA when available), cpu, cuda or cuda:N (default: %(default)s)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                   help="weights and cache precision (default: %(default)s)")
    p.add_argument("--no-echo", action="store_true",
                   help="do not print the prompt first (default: %(default)s)")
    p.set_defaults(run=generate_command)


def _tokenizer(vocab_size: int, directory: str):
    from .checkpoint import CheckpointError, load_run_tokenizer
    tok = load_run_tokenizer(directory)
    if tok is None:
        raise CheckpointError(f"{directory!r} has no tokenizer (no tokenizer.json, none in "
                              "config.json): expected a checkpoint written by `sqt train`")
    if tok.vocab_size != vocab_size:   # an id past the tokenizer could not be printed
        raise CheckpointError(f"{directory!r}: the tokenizer has {tok.vocab_size} symbols but "
                              f"the model's vocab_size is {vocab_size}")
    return tok


def _encode(tok, text: str, option: str) -> list[int]:
    try:
        return tok.encode(text)
    except ValueError as e:
        raise UsageError(f"{option}: {e}") from None


def _stop_token(tok, args) -> tuple[Optional[int], bool]:
    """(the token that ends generation, whether it is printed)."""
    if args.no_stop:
        return None, False
    if args.stop is None:
        return tok.eot_id, False
    ids = _encode(tok, args.stop, "--stop")
    if len(ids) != 1:
        raise UsageError(f"--stop {args.stop!r} is {len(ids)} tokens for this tokenizer: "
                         "expected text of exactly one token")
    return ids[0], True


def generate_command(args) -> int:
    import torch

    from .checkpoint import load_model
    from .engine import DecodeEngine
    from .generate import check_sampling
    from .tokenizer import decode_stream
    from .utils import resolve_device

    if args.prompt == "":
        raise UsageError("--prompt is empty: give at least one character to continue")
    if args.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens {args.max_new_tokens}: expected an integer >= 1")
    try:
        check_sampling(args.temperature, args.top_k, args.top_p)
    except ValueError as e:
        raise UsageError("--" + str(e).replace("_", "-", 1)) from None
    if args.seed is not None and not -(2 ** 63) <= args.seed < 2 ** 64:
        raise UsageError(f"--seed {args.seed}: expected an integer in [-2**63, 2**64)")
    device = resolve_device(args.device, name="--device")
    model, _ = load_model(args.checkpoint, device)
    tok = _tokenizer(model.config.vocab_size, args.checkpoint)
    ids = _encode(tok, args.prompt, "--prompt")
    stop, print_stop = _stop_token(tok, args)
    limit = model.max_positions
    new = args.max_new_tokens
    if limit is not None:
        if len(ids) >= limit:
            raise UsageError(f"--prompt is {len(ids)} tokens but the model's context is "
                             f"{limit}: give at most {limit - 1}")
        if len(ids) + new > limit:
            new = limit - len(ids)
            print(f"sqt generate: note: --max-new-tokens capped at {new} by the model's "
                  f"context of {limit}", file=sys.stderr)
    if args.dtype == "bfloat16":
        model = model.to(torch.bfloat16)
    generator = torch.Generator(device=device)
    generator.manual_seed(args.seed) if args.seed is not None else generator.seed()
    idx = torch.tensor([ids], dtype=torch.long, device=device)
    engine = DecodeEngine(model, batch_size=1, max_len=len(ids) + new)

    def tokens():
        for nxt in engine.stream(idx, new, temperature=args.temperature, top_k=args.top_k,
                                 top_p=args.top_p, stop_token=stop, generator=generator):
            token = int(nxt[0])
            if token != stop or print_stop:
                yield token

    out = sys.stdout
    if not args.no_echo:
        out.write(args.prompt)
        out.flush()
    for text in decode_stream(tok, tokens()):   # whole characters only, never half a UTF-8 one
        out.write(text)
        out.flush()
    out.write("\n")
    out.flush()
    return 0


# ------------------------------------------------------------------------------------------- probe

def _add_data_options(p, what: str) -> None:
    p.add_argument("--data", default=None,
                   help=f"{what}: 'tinyshakespeare', a prepared directory or a text file "
                        "(default: %(default)s, the run's own data)")
    p.add_argument("--seq-len", type=int, default=None,
                   help="tokens per window (default: %(default)s, the run's training window)")
    p.add_argument("--eval-batch-size", type=int, default=16,
                   help="windows per forward pass when measuring (default: %(default)s)")
    p.add_argument("--device", default="auto",
                   help="auto (CUDA when available), cpu, cuda or cuda:N (default: %(default)s)")


def _add_probe(sub) -> None:
    p = sub.add_parser("probe", help="how positional each layer's and head's query is",
                       description="Probe a checkpoint on validation text: per layer and head, "
                                   "the share of the query's (and key's) variance that position "
                                   "alone explains, and the loss the model loses when a layer's "
                                   "queries are replaced by their per-position mean. Writes "
                                   "probe.json, probe.md and probe.png; prints the table.")
    p.add_argument("run_dir", metavar="RUN",
                   help="checkpoint or run directory (a trained or imported model)")
    _add_data_options(p, "validation text")
    p.add_argument("--tokens", type=int, default=32768,
                   help="validation tokens to probe on (default: %(default)s)")
    p.add_argument("--per-head", action="store_true",
                   help="also the loss change of replacing each head's queries alone "
                        "(default: %(default)s)")
    p.add_argument("--out", default=None,
                   help="directory for the files (default: %(default)s, the run directory)")
    p.set_defaults(run=probe_command)


def probe_command(args) -> int:
    from .probe_report import probe_markdown, probe_run
    from .utils import resolve_device
    report, written = probe_run(args.run_dir, data=args.data, tokens=args.tokens,
                                seq_len=args.seq_len, batch_size=args.eval_batch_size,
                                per_head=args.per_head, out=args.out,
                                device=resolve_device(args.device, name="--device"))
    print(probe_markdown(report, title=f"Query probe of {args.run_dir}"), end="")
    for kind, where in written.items():
        print(f"sqt probe: {kind}: {where}", file=sys.stderr)
    return 0


# ----------------------------------------------------------------------------------------- convert

def _add_convert(sub) -> None:
    from .convert import METHODS
    p = sub.add_parser("convert", help="convert a trained model to another variant",
                       description="Convert a checkpoint's layers to another variant (a static "
                                   "table, GQA/MQA, the SQA family) by a documented "
                                   "initialisation (sqt.convert), optionally fine-tune it, and "
                                   "save it as an ordinary checkpoint with conversion.json.")
    p.add_argument("run_dir", metavar="RUN", help="checkpoint or run directory to convert")
    p.add_argument("--to", required=True, nargs="+", metavar="SPEC",
                   help="target layer spec for every converted layer, or one per converted "
                        "layer: sqt, table:gqa, gqa, mqa, sqa, ssqa, xsqa, nq/nkv, ...")
    p.add_argument("--out", required=True, help="new directory for the converted checkpoint")
    p.add_argument("--method", choices=METHODS, default="first",
                   help="which query heads a layout with fewer keeps: the first, the most "
                        "content-dependent by the probe, or pooled runs (default: %(default)s)")
    p.add_argument("--layers", type=int, nargs="+", default=None, metavar="I",
                   help="layer indices to convert (default: %(default)s: all)")
    _add_data_options(p, "text for tables, head ranking, scoring and fine-tuning")
    p.add_argument("--corpus-tokens", type=int, default=65536,
                   help="training-split tokens that tables average over and the probe ranks "
                        "heads on (default: %(default)s)")
    p.add_argument("--eval-tokens", type=int, default=16384,
                   help="validation tokens to score the model on before and after; 0 skips "
                        "(default: %(default)s)")
    p.add_argument("--tokens", type=int, default=None,
                   help="fine-tune the converted model for this many tokens (default: "
                        "%(default)s, no fine-tune)")
    for flag, kind, text in (("--lr", float, "peak learning rate of the fine-tune"),
                             ("--warmup", int, "warm-up steps of the fine-tune (default: "
                                               "%(default)s, a tenth of its steps)"),
                             ("--batch-size", int, "sequences per fine-tune step"),
                             ("--seed", int, "seed of the fine-tune's windows and dropout")):
        p.add_argument(flag, type=kind, default=None, help=text if "default" in text else
                       text + " (default: %(default)s, the source run's)")
    p.set_defaults(run=convert_command)


def convert_command(args) -> int:
    from .convert import convert_run
    from .utils import resolve_device
    device = resolve_device(args.device, name="--device")
    record = convert_run(args.run_dir, args.out, args.to if len(args.to) > 1 else args.to[0],
                         layers=args.layers, method=args.method, data=args.data,
                         corpus_tokens=args.corpus_tokens, seq_len=args.seq_len,
                         eval_tokens=args.eval_tokens, tokens=args.tokens, device=device,
                         eval_batch_size=args.eval_batch_size, lr=args.lr, warmup=args.warmup,
                         batch_size=args.batch_size, seed=args.seed)
    print(json.dumps({"event": "converted", "out": args.out,
                      **{k: record.get(k) for k in ("to", "method", "layers", "loss_source",
                                                    "loss_converted", "loss_finetuned")}}))
    return 0


# -------------------------------------------------------------------------------------------- main

COMMANDS = (_add_train, _add_prepare, _add_generate, _add_export, _add_import_hf, _add_probe,
            _add_convert)


def parser() -> argparse.ArgumentParser:
    p = _Parser(prog="sqt", description="sqt: the query side of attention. `sqt COMMAND --help` "
                                        "describes each command.")
    sub = p.add_subparsers(dest="command", required=True)
    for add in COMMANDS:
        add(sub)
    return p


def _one_line(error: Exception) -> str:
    text = " ".join(str(error).split("\n")).strip()
    return text or type(error).__name__


def main(argv: Optional[list[str]] = None) -> int:
    try:
        args = parser().parse_args(sys.argv[1:] if argv is None else argv)
    except SystemExit as e:   # --help, or a usage error already printed as one line
        return e.code
    try:
        return args.run(args)
    except (ValueError, OSError) as e:   # CheckpointError, UsageError, FileNotFoundError included
        print(f"sqt {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return USAGE_ERROR
    except (RuntimeError, MemoryError) as e:
        from .utils import is_out_of_memory
        if not is_out_of_memory(e):
            raise
        print(f"sqt {args.command}: error: out of memory ({_one_line(e)[:200]}): ask for less "
              "(a smaller batch, sequence or model)", file=sys.stderr)
        return RUN_FAILED
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
