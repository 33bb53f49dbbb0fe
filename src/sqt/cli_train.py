"""`sqt train`: its flags, made from the LMConfig and TrainConfig fields (a new field gets a flag
with no code here; --help shows the default preset's value), the settings resolved as preset (its
model and recipe) < --config run file < flags, and the body that prints the resolved run and
trains it. sqt.cli lists it with the other subcommands and reports its errors as one line."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import typing

from .cli_errors import RUN_FAILED, UsageError


class _FromBelow:
    """The default of a flag whose value comes from a lower layer (the preset, its recipe, the run
    file): shown by --help, and never mistaken for a value the user gave."""

    def __init__(self, text: str):
        self.text = text

    def __str__(self) -> str:
        return self.text


def _given(value):
    return None if isinstance(value, _FromBelow) else value


def _preset_default(name: str) -> str:
    """--help's default for a model or training field: the default preset's value where presets
    or recipes set it, else the dataclass default."""
    from .config import PRESETS, RECIPES, LMConfig
    from .runconfig import DEFAULT_PRESET, TrainConfig
    if name == "vocab_size":
        return "the dataset's"
    if name == "max_seq_len":
        return f"the preset's, or seq_len when longer; {DEFAULT_PRESET}: " \
               f"{PRESETS[DEFAULT_PRESET]['max_seq_len']}"
    value = PRESETS[DEFAULT_PRESET].get(name, RECIPES[DEFAULT_PRESET].get(name))
    if isinstance(value, dict):
        return f"per preset; {DEFAULT_PRESET}: {value['cuda']} on CUDA, {value['cpu']} on the CPU"
    if value is not None:
        return f"per preset; {DEFAULT_PRESET}: {value}"
    cls = LMConfig if name in {f.name for f in dataclasses.fields(LMConfig)} else TrainConfig
    return str(next(f.default for f in dataclasses.fields(cls) if f.name == name))


def _add_fields(parser, group, cls, budget_group=None) -> None:
    """One flag per dataclass field, with its metadata's help: `--d-model`, `--tie-embeddings /
    --no-tie-embeddings`, `--layers SPEC [SPEC ...]`. New fields get flags with no code here."""
    from .runconfig import BUDGETS
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        kinds = [t for t in (typing.get_args(hints[f.name]) or (hints[f.name],))
                 if t is not type(None)]
        flag, shown = "--" + f.name.replace("_", "-"), _FromBelow(_preset_default(f.name))
        target = budget_group if budget_group is not None and f.name in BUDGETS else group
        help_text = f.metadata["help"] + " (default: %(default)s)"
        if bool in kinds:
            action = target.add_argument(flag, dest=f.name, default=shown,
                                         action=argparse.BooleanOptionalAction)
            action.help = help_text   # set afterwards: some Pythons append their own default
        elif tuple in kinds:
            target.add_argument(flag, dest=f.name, default=shown, nargs="+", metavar="SPEC",
                                help=help_text)
        else:
            target.add_argument(flag, dest=f.name, default=shown, type=kinds[0],
                                metavar=kinds[0].__name__.upper(), help=help_text)


def _add_train(sub) -> None:
    from .config import PRESETS, LMConfig
    from .runconfig import DEFAULT_DATA, DEFAULT_PRESET, TrainConfig
    p = sub.add_parser(
        "train", help="train a model (a preset, a TOML run file, flags)",
        description="Train a language model. Settings combine as: preset (its model and training "
                    "recipe) < --config file < flags. The resolved configuration is printed on "
                    "stderr at the start, in the run file format; stdout carries JSON lines only "
                    "(one per evaluation when stderr is not a terminal, and the result).")
    p.add_argument("--preset", "--size", dest="preset", choices=list(PRESETS),
                   default=_FromBelow(f"the config file's, else {DEFAULT_PRESET}"),
                   help="named starting point: a model and its training recipe "
                        "(default: %(default)s)")
    p.add_argument("--config", default=None, metavar="FILE",
                   help="TOML run file: top-level preset and data, sections [model] and [train] "
                        "(default: %(default)s)")
    p.add_argument("--data", default=_FromBelow(f"the config file's, else {DEFAULT_DATA}"),
                   help="'tinyshakespeare' (bundled), a directory written by `sqt prepare`, "
                        "or a UTF-8 text file, tokenized by character (default: %(default)s)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run whose checkpoint is in --out-dir; a finished run is "
                        "left as it is (default: %(default)s)")
    _add_fields(p, p.add_argument_group("model (LMConfig fields)"), LMConfig)
    group = p.add_argument_group("training (TrainConfig fields; one of --steps, --tokens, "
                                 "--epochs)")
    _add_fields(p, group, TrainConfig, budget_group=group.add_mutually_exclusive_group())
    p.set_defaults(run=train_command)


def _flag_settings(args) -> dict:
    from .runconfig import MODEL_FIELDS, TRAIN_FIELDS
    settings = {}
    for name in MODEL_FIELDS + TRAIN_FIELDS:
        value = _given(getattr(args, name))
        if isinstance(value, list):
            value = value[0] if len(value) == 1 else tuple(value)
        settings[name] = value
    return settings


def resolve_train(args):
    """(preset, data spec, dataset, LMConfig, TrainConfig) of `sqt train ARGS`: the preset and its
    recipe, under the run file, under the flags."""
    from .data import load_dataset
    from .runconfig import DEFAULT_DATA, DEFAULT_PRESET, merge_settings, read_run_file, recipe
    file = read_run_file(args.config) if args.config else {"settings": {}}
    preset_name = _given(args.preset) or file.get("preset") or DEFAULT_PRESET
    data_spec = next((d for d in (_given(args.data), file.get("data")) if d is not None),
                     DEFAULT_DATA)   # an empty --data is refused, not read as "not given"
    # The seam for prepared token datasets: load_dataset turns the spec into a dataset.
    dataset = load_dataset(data_spec)
    settings = merge_settings({"vocab_size": dataset.tokenizer.vocab_size}, file["settings"],
                              _flag_settings(args))
    model_cfg, train_cfg = recipe(preset_name, **settings)
    return preset_name, data_spec, dataset, model_cfg, train_cfg


RESULT_KEYS = ("params", "best_val_loss", "best_step", "final_val_loss", "final_val_acc",
               "ms_per_step", "tokens_per_s", "mfu", "wall_s")


def train_command(args) -> int:
    from .distributed import launch_rank, launch_world_size
    from .runconfig import run_file_text
    from .train import NonFiniteLoss, check_run, train
    # Under torchrun every process runs this; rank 0 prints the run and its result.
    main = launch_rank() == 0
    preset_name, data_spec, dataset, model_cfg, cfg = resolve_train(args)
    n_train = len(dataset.train)
    text = run_file_text(preset_name=preset_name, data=data_spec, model=model_cfg,
                         train=cfg.resolve(n_train), budget=cfg.budget(n_train))
    # Refused before the resolved run is printed, so that a refusal is one line.
    if args.resume and not cfg.out_dir:
        raise UsageError("--resume needs --out-dir: the run directory to continue")
    if args.resume and cfg.overwrite:
        raise UsageError("--resume and --overwrite: expected at most one (--resume continues the "
                         "run in --out-dir, --overwrite starts it again)")
    check_run(model_cfg, cfg, dataset, resume=args.resume, world_size=launch_world_size(),
              directory=main)
    if main:
        print(text, file=sys.stderr, flush=True)
    try:
        result = train(model_cfg, cfg, dataset, resume=args.resume, run_file=text,
                       label=preset_name)
    except NonFiniteLoss as e:
        if main:    # every rank stops here with the same message: one prints it
            print(f"sqt train: error: {e}", file=sys.stderr)
        return RUN_FAILED
    result.pop("model")
    if main:
        print(json.dumps({"event": "result", **{k: result.get(k) for k in RESULT_KEYS},
                          "steps": result["budget"]["steps"], "world_size": result["world_size"],
                          "out_dir": cfg.out_dir}), flush=True)
    return 0

