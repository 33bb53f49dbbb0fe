"""The `sqt` subcommands that move data and models between formats: `sqt prepare` (a corpus into
memory-mapped token files), `sqt export` and `sqt import-hf` (a checkpoint to and from a Hugging Face
directory). Each is one parser (`_add_X`) and one body (`X_command`) that calls the library; sqt.cli
lists them with the others and reports their errors as one line."""

from __future__ import annotations

import json
from pathlib import Path


def _add_prepare(sub) -> None:
    p = sub.add_parser("prepare", help="tokenize a corpus once into a prepared data directory",
                       description="Tokenize CORPUS (UTF-8 text, plain or .gz; lines holding only "
                                   "<|endoftext|> separate documents) into memory-mapped "
                                   "train/val token files, tokenizer.json and meta.json in --out, "
                                   "for `sqt train --data DIR`. Re-running it on the same corpus "
                                   "with the same settings does nothing.")
    p.add_argument("corpus", help="the corpus file (.txt or .txt.gz)")
    p.add_argument("--tokenizer", required=True, metavar="SPEC",
                   help="char (the corpus's characters), bpe:VOCAB (a byte-level BPE of VOCAB "
                        "symbols trained on the corpus, e.g. bpe:10000) or the path of a "
                        "tokenizer.json (or a directory holding one) to reuse")
    p.add_argument("--out", required=True, metavar="DATA_DIR", help="directory to write")
    p.add_argument("--val-fraction", type=float, default=0.01, metavar="F",
                   help="validation share in (0, 0.5]: every round(1/F)-th document, or the last "
                        "F of the tokens of a corpus with too few documents "
                        "(default: %(default)s)")
    p.add_argument("--min-frequency", type=int, default=2, metavar="N",
                   help="times a pair must be seen to become a BPE merge (default: %(default)s)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a dataset in --out prepared from another corpus or with other "
                        "settings (default: %(default)s)")
    p.set_defaults(run=prepare_command)


def prepare_command(args) -> int:
    from .data import prepare
    from .prepared import META_FILE
    meta = Path(args.out) / META_FILE
    before = meta.read_bytes() if meta.is_file() else None
    ds = prepare(args.corpus, args.tokenizer, args.out, val_fraction=args.val_fraction,
                 min_frequency=args.min_frequency, overwrite=args.overwrite)
    info = ds.describe()
    what = "unchanged" if meta.read_bytes() == before else "prepared"
    print(f"{what}: {args.out}: {info['train_tokens']:,} train + {info['val_tokens']:,} val "
          f"tokens, {type(ds.tokenizer).__name__} of {info['vocab_size']:,} symbols; train "
          f"with: sqt train --data {args.out}", flush=True)
    return 0


# ------------------------------------------------------------------------------ export, import-hf

def _add_export(sub) -> None:
    p = sub.add_parser("export", help="write a checkpoint as a Hugging Face model directory",
                       description="Write a checkpoint (and its tokenizer) as a directory that "
                                   "transformers' AutoModelForCausalLM and AutoTokenizer load "
                                   "without remote code, computing the same logits. Needs a "
                                   "modern-block model (--block modern).")
    p.add_argument("checkpoint", metavar="RUN", help="checkpoint directory (sqt train --out-dir)")
    p.add_argument("--format", default="hf", choices=("hf",),
                   help="output format: hf, a Llama (Qwen2 with a sliding window) directory "
                        "(default: %(default)s)")
    p.add_argument("--out", required=True, metavar="DIR", help="directory to write (new or empty)")
    p.add_argument("--pad-mixed", action="store_true",
                   help="write layers of different head layouts all MHA-shaped (same logits, "
                        "more compute) instead of refusing (default: %(default)s)")
    p.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"),
                   help="weight dtype of the export (default: %(default)s, the checkpoint's)")
    p.set_defaults(run=export_command)


def export_command(args) -> int:
    from .hf import export_checkpoint
    out = export_checkpoint(args.checkpoint, args.out, pad_mixed=args.pad_mixed, dtype=args.dtype)
    hc = json.loads((out / "config.json").read_text())
    tokenizer = "with" if (out / "tokenizer.json").is_file() else "without"
    print(f"exported {args.checkpoint} to {out}: {hc['architectures'][0]}, "
          f"{hc['num_attention_heads']} query / {hc['num_key_value_heads']} key-value heads of "
          f"{hc['head_dim']}, {tokenizer} a tokenizer", flush=True)
    return 0


def _add_import_hf(sub) -> None:
    p = sub.add_parser("import-hf", help="read a Hugging Face Llama-format directory as a "
                                         "checkpoint",
                       description="Turn a LlamaForCausalLM-format directory (Llama, Mistral, "
                                   "Qwen2; any head layout; safetensors) into an sqt checkpoint "
                                   "that `sqt generate` and the library load.")
    p.add_argument("hf_dir", metavar="DIR", help="the Hugging Face model directory")
    p.add_argument("--out", required=True, metavar="RUN", help="checkpoint directory to write")
    p.set_defaults(run=import_hf_command)


def import_hf_command(args) -> int:
    from .checkpoint import load_model
    from .hf import import_checkpoint
    out = import_checkpoint(args.hf_dir, args.out)
    model, _ = load_model(out)
    tokenizer = "with" if (out / "tokenizer.json").is_file() else "without"
    print(f"imported {args.hf_dir} to {out}: {model.num_params():,} parameters, layers="
          f"{model.config.layers!r}, {tokenizer} a tokenizer", flush=True)
    return 0
