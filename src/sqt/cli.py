"""The `sqt` command: `sqt generate CHECKPOINT --prompt TEXT` streams text from a trained
checkpoint; `sqt train ...` runs the trainer (sqt.train). A user error (missing or incompatible
checkpoint, empty or too long prompt, a character the model never saw, bad sampling options)
prints one line on stderr and exits with status 2, without a traceback."""

from __future__ import annotations

import argparse
import sys
from typing import Optional

USAGE_ERROR = 2


class UsageError(ValueError):
    """A problem with what the user asked for, reported as one line."""


def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="stream text from a checkpoint directory",
                       description="Generate text from a checkpoint written by `sqt train`, "
                                   "printed as it is produced.")
    p.add_argument("checkpoint", help="checkpoint directory (config.json + model.safetensors)")
    p.add_argument("--prompt", required=True, help="text to continue")
    p.add_argument("--max-new-tokens", type=int, default=200,
                   help="tokens to generate (capped by the model's context); default 200")
    p.add_argument("--temperature", type=float, default=0.8, help="0 is greedy; default 0.8")
    p.add_argument("--top-k", type=int, default=None, help="sample among the k likeliest")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass in (0, 1]")
    p.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")
    p.add_argument("--stop", default=None, help="a single character that ends generation")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, ...")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                   help="weights and cache precision; default float32")
    p.add_argument("--no-echo", action="store_true", help="do not print the prompt first")


def _resolve_device(name: str):
    import torch
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise UsageError(f"--device {name!r}: expected auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name!r}: CUDA is not available on this machine; use cpu")
    return device


def _tokenizer(meta: dict, vocab_size: int, directory: str):
    from .checkpoint import CheckpointError
    from .tokenizer import CharTokenizer
    spec = meta.get("tokenizer")
    if spec is None:
        raise CheckpointError(f"{directory!r} has no tokenizer in config.json: expected a "
                              "checkpoint written by `sqt train`")
    try:
        tok = CharTokenizer.from_dict(spec)
    except ValueError as e:
        raise CheckpointError(f"{directory!r}: incompatible tokenizer: {e}") from None
    if tok.vocab_size != vocab_size:
        raise CheckpointError(f"{directory!r}: the tokenizer has {tok.vocab_size} symbols but "
                              f"the model's vocab_size is {vocab_size}")
    return tok


def _encode(tok, text: str, option: str) -> list[int]:
    try:
        return tok.encode(text)
    except ValueError as e:
        raise UsageError(f"{option}: {e}") from None


def generate_command(args) -> int:
    import torch

    from .checkpoint import load_model
    from .engine import DecodeEngine
    from .generate import check_sampling

    if args.prompt == "":
        raise UsageError("--prompt is empty: give at least one character to continue")
    if args.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens {args.max_new_tokens}: expected an integer >= 1")
    try:
        check_sampling(args.temperature, args.top_k, args.top_p)
    except ValueError as e:
        raise UsageError("--" + str(e).replace("_", "-", 1)) from None
    if args.stop is not None and len(args.stop) != 1:
        raise UsageError(f"--stop {args.stop!r}: expected a single character")
    device = _resolve_device(args.device)
    model, meta = load_model(args.checkpoint, device)
    tok = _tokenizer(meta, model.config.vocab_size, args.checkpoint)
    ids = _encode(tok, args.prompt, "--prompt")
    stop = _encode(tok, args.stop, "--stop")[0] if args.stop is not None else None
    limit = model.max_positions
    new = args.max_new_tokens
    if limit is not None:
        if len(ids) >= limit:
            raise UsageError(f"--prompt is {len(ids)} characters but the model's context is "
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
    out = sys.stdout
    if not args.no_echo:
        out.write(args.prompt)
        out.flush()
    for nxt in engine.stream(idx, new, args.temperature, args.top_k, args.top_p, stop,
                             generator):
        out.write(tok.decode([int(nxt[0])]))
        out.flush()
    out.write("\n")
    out.flush()
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["train"]:
        # The trainer owns its arguments; imported lazily so `sqt generate` starts fast.
        from .train import main as train_main
        return train_main(argv[1:])
    parser = argparse.ArgumentParser(prog="sqt", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="{generate,train}")
    _add_generate(sub)
    sub.add_parser("train", help="train a model (see `sqt train --help`)")
    args = parser.parse_args(argv)
    from .checkpoint import CheckpointError
    try:
        return generate_command(args)
    except (UsageError, CheckpointError) as e:
        print(f"sqt {args.command}: error: {e}", file=sys.stderr)
        return USAGE_ERROR
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
