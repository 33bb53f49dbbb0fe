"""Conversions between variants of a trained model: each a documented initialisation of the target
layers from the source's weights, which a short fine-tune may follow (`sqt convert --tokens`).

- Static table: a layer's query becomes `table`, row t of the table the mean query (before RoPE)
  at position t over a corpus, computed in the unchanged model, all layers in one pass; rows past
  the corpus windows hold the mean over their positions. On that corpus the converted layer sees
  exactly the queries the probe's Δ loss replaces.
- Head layouts (MHA/GQA -> GQA, MQA, SQA, sSQA, xSQA, ...): the target's query heads are chosen
  from the source's (`METHODS`), then split in order into the target's K/V groups: target query
  head i reads target K/V head i // (n_q / n_kv), as every sqt layer does. A target K/V head is
  the mean of the source K/V heads its group's query heads read: with every query head kept this
  is the GQA paper's mean-pooling of K/V heads within groups, and it is exact where those heads
  were equal. A target head's o_proj columns are the sum of its source heads' columns.
- METHODS, for a target with fewer query heads (n_q' of n_q; all heads kept is exact whatever the
  method): `first` keeps source heads 0 .. n_q'-1; `content` keeps the n_q' heads with the lowest
  positional share (the probe's most content-dependent heads), in index order; `pooled` merges
  runs of n_q / n_q' consecutive heads: the query is their mean and the o_proj columns their sum.
  Mean and sum because then the merge is exact wherever the merged heads computed the same thing
  (equal queries give the same attention, equal outputs add up), and the layer's output keeps its
  scale (mean o_proj columns would divide it by the group size). Dropped heads' contributions to
  the output are simply gone: no rescaling.

The result is an ordinary TransformerLM of the target config; `sqt convert` saves it as an
ordinary checkpoint, which trains (a fresh run started from it) and exports like any other.
"""

from __future__ import annotations

import torch

from .model import TransformerLM
from .probe import heads_by_content, positional_means, query_probe
from .variants import LayerSpec, parse_layer, variant_name

METHODS = ("first", "content", "pooled")


def _targets(model, to, layers) -> dict[int, LayerSpec]:
    cfg, n = model.config, model.config.n_layers
    chosen = list(range(n)) if layers is None else list(layers)
    for i in chosen:
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < n:
            raise ValueError(f"layers: {i!r} is not a layer index in 0..{n - 1}")
    if len(set(chosen)) != len(chosen):
        raise ValueError(f"layers={chosen}: each layer at most once")
    specs = [to] if isinstance(to, (str, LayerSpec)) else list(to)
    if len(specs) not in (1, len(chosen)):
        raise ValueError(f"to: {len(specs)} specs for {len(chosen)} layers: give one spec for "
                         "every converted layer, or one per converted layer")
    specs = specs * len(chosen) if len(specs) == 1 else specs
    return {i: parse_layer(s, cfg.n_heads) for i, s in zip(chosen, specs)}


def _check(i: int, src: LayerSpec, dst: LayerSpec, block: str) -> None:
    where = f"layer {i} ({src.name} -> {dst.name})"
    if src.n_q_heads < src.n_kv_heads or dst.n_q_heads < dst.n_kv_heads:
        raise ValueError(f"{where}: conversions keep query heads at least as many as K/V heads "
                         "(reverse SQA layouts, where a query head serves several K/V heads, "
                         "are neither read nor written)")
    if dst.n_q_heads > src.n_q_heads:
        raise ValueError(f"{where}: {dst.n_q_heads} query heads from {src.n_q_heads}: "
                         "conversions keep or merge query heads, they do not invent them")
    if dst.query != src.query:
        ok = dst.query == "table" and (src.query in ("proj", "identity", "random") or (
            src.query == "rotary" and block == "modern"))
        if not ok:
            raise ValueError(f"{where}: query {src.query} -> {dst.query}: a conversion keeps "
                             "the query source or makes it a static table (from proj, identity "
                             "or random; from rotary in the modern block, where tables are "
                             "rotated too)")


def head_groups(src: LayerSpec, dst: LayerSpec, method: str, *,
                content_order=None) -> list[list[int]]:
    """For each target query head, the source query heads it is made of (see METHODS)."""
    nq, keep = src.n_q_heads, dst.n_q_heads
    if method not in METHODS:
        raise ValueError(f"method={method!r}: expected one of {', '.join(METHODS)}")
    if keep == nq or method == "first":
        return [[h] for h in range(keep)]
    if method == "content":
        return [[h] for h in sorted(content_order[:keep])]
    if nq % keep:
        raise ValueError(f"method='pooled' from {nq} to {keep} query heads: pooling merges equal "
                         f"runs of heads, so {keep} must divide {nq}")
    m = nq // keep
    return [list(range(g * m, (g + 1) * m)) for g in range(keep)]


def _layer_tensors(attn, dst: LayerSpec, groups, mean_q, max_seq_len: int) -> dict:
    """The target layer's attention tensors (names relative to `attn.`)."""
    src, hd = attn.spec, attn.head_dim
    sd = {k: v.detach() for k, v in attn.state_dict().items()}
    q_w, kv_w, _ = attn.qkv_split
    heads = lambda t, n: t.view(n, hd, *t.shape[1:])          # noqa: E731  rows per head
    parts = {}
    for kind in ("weight", "bias"):
        if "qkv_proj." + kind in sd:
            q, k, v = sd["qkv_proj." + kind].split(attn.qkv_split)
            parts[kind] = (q, heads(k, src.n_kv_heads), heads(v, src.n_kv_heads))
    # K/V: group j of the target's query heads reads the mean of the source K/V heads it read.
    G_src, G_dst = src.n_q_heads // src.n_kv_heads, dst.n_q_heads // dst.n_kv_heads
    kv_sets = [sorted({h // G_src for g in groups[j * G_dst:(j + 1) * G_dst] for h in g})
               for j in range(dst.n_kv_heads)]
    out = {}
    for kind, (q, k, v) in parts.items():
        pool = lambda t: torch.cat([t[s].mean(0) for s in kv_sets])  # noqa: E731
        rows = [pool(k), pool(v)]
        if dst.query == "proj":
            qh = heads(q, src.n_q_heads)
            rows.insert(0, torch.cat([qh[g].mean(0) for g in groups]))
        out["qkv_proj." + kind] = torch.cat(rows)
    o = sd["o_proj.weight"]
    o_heads = o.view(o.shape[0], src.n_attn_heads, hd)
    out["o_proj.weight"] = torch.cat([o_heads[:, g].sum(1) for g in groups], dim=1)
    if "o_proj.bias" in sd:
        out["o_proj.bias"] = sd["o_proj.bias"]
    if dst.query == "table":
        table = sd["q_table"] if src.query == "table" else mean_q.to(o.dtype)
        table = torch.stack([table[:, g].mean(1) for g in groups], dim=1)
        if table.shape[0] < max_seq_len:   # positions the corpus never reached: the mean
            fill = table.mean(0, keepdim=True).expand(max_seq_len - table.shape[0], -1, -1)
            table = torch.cat([table, fill])
        out["q_table"] = table
    elif dst.query == "rotary":
        out["q_vec"] = torch.stack([sd["q_vec"][g].mean(0) for g in groups])
    elif dst.query == "random":   # the kept heads' rows of the frozen matrix
        kept = [g[0] for g in groups]
        out["q_random"] = sd["q_random"].view(src.n_q_heads, hd, -1)[kept].reshape(-1, o.shape[0])
    return out


def plan(model: TransformerLM, to, layers=None) -> dict[int, LayerSpec]:
    """{layer: target spec} of a conversion, every pair checked."""
    targets = _targets(model, to, layers)
    for i, dst in targets.items():
        _check(i, model.specs[i], dst, model.config.block)
    return targets


def needs_corpus(model: TransformerLM, targets: dict, method: str) -> bool:
    """Whether a conversion reads text: a new static table, or heads ranked by the probe."""
    return any((d.query == "table" != model.specs[i].query) or (
        method == "content" and d.n_q_heads < model.specs[i].n_q_heads)
        for i, d in targets.items())


def convert(model: TransformerLM, to, *, layers=None, method: str = "first", corpus=None,
            probe: dict | None = None, batch_size: int = 16) -> tuple[TransformerLM, dict]:
    """`model` with the chosen `layers` (default: all) converted to `to` (one layer spec for all
    of them, or one per chosen layer; e.g. "sqt", "table:gqa", "gqa", "xsqa"). `corpus`, (N, T+1)
    token windows, is needed for a static table (the mean query per position) and for the
    `content` method (its head ranking; or pass a `query_probe` report as `probe`). Returns the
    new model (eval mode, on the source's device) and a JSON-ready record of what was done."""
    cfg = model.config
    targets = plan(model, to, layers)
    groups = {}
    for i, dst in targets.items():
        src = model.specs[i]
        if method == "content" and dst.n_q_heads < src.n_q_heads and probe is None:
            if corpus is None:
                raise ValueError("method='content' ranks heads by the probe: give corpus "
                                 "windows or a probe report")
            probe = query_probe(model, corpus, batch_size=batch_size, ablate=False)
        order = heads_by_content(probe, i) if probe is not None else None
        groups[i] = head_groups(src, dst, method, content_order=order)
        if src.query in ("identity", "random") and groups[i] != [[h] for h in range(
                dst.n_q_heads)] and dst.query != "table":
            raise ValueError(f"layer {i}: a {src.query} query is a control fixed by its layer; "
                             f"only its first heads can be kept (method='first'), not {method!r}")
    needs_mean = [i for i, d in targets.items() if d.query == "table" != model.specs[i].query]
    means = None
    if needs_mean:
        if corpus is None:
            raise ValueError(f"layers {needs_mean} become static tables: give corpus windows to "
                             "average their queries over")
        if corpus.shape[1] - 1 > cfg.max_seq_len:
            raise ValueError(f"corpus windows of {corpus.shape[1] - 1} tokens are longer than "
                             f"the table (max_seq_len={cfg.max_seq_len})")
        means = positional_means(model, corpus, batch_size=batch_size)
    given = [cfg.layers] * cfg.n_layers if isinstance(cfg.layers, str) else list(cfg.layers)
    names = [variant_name(targets[i], cfg.n_heads) if i in targets else given[i]
             for i in range(cfg.n_layers)]
    new_cfg = cfg.with_layers(names[0] if len(set(names)) == 1 else tuple(names))
    state = {k: v.detach() for k, v in model.state_dict().items()}
    for i, dst in targets.items():
        pre = f"blocks.{i}.attn."
        state = {k: v for k, v in state.items() if not k.startswith(pre)}
        attn = model.blocks[i].attn
        new = _layer_tensors(attn, dst, groups[i], means[i] if means else None, cfg.max_seq_len)
        state.update({pre + k: v for k, v in new.items()})
    out = TransformerLM(new_cfg).to(next(model.parameters()).device)
    out.load_state_dict(state)
    record = {"from": given, "to": names, "method": method,
              "layers": sorted(targets), "heads": {str(i): groups[i] for i in sorted(targets)},
              "corpus": None if corpus is None else {"windows": int(corpus.shape[0]),
                                                     "seq_len": int(corpus.shape[1] - 1)}}
    return out.eval(), record


def finetune_config(trained: dict | None, *, tokens: int, seq_len: int, **overrides):
    """The TrainConfig of a fine-tune of `tokens` tokens after a conversion: the source run's own
    recorded settings (TrainConfig's defaults where it recorded none, e.g. a model imported from
    Hugging Face), the budget replaced by `tokens`, evaluation every eighth of it, and a warm-up
    of a tenth of its steps; `overrides` (TrainConfig fields; None keeps) on top."""
    import math

    from .runconfig import TRAIN_FIELDS, TrainConfig
    settings = {k: v for k, v in (trained or {}).items() if k in TRAIN_FIELDS}
    settings.setdefault("seq_len", seq_len)
    settings.update(steps=None, epochs=None, tokens=tokens, eval_every=None, out_dir=None,
                    checkpoint_every=0)
    settings.update({k: v for k, v in overrides.items() if v is not None})
    if overrides.get("warmup") is None:
        per_step = settings.get("batch_size", TrainConfig.batch_size) * settings["seq_len"]
        settings["warmup"] = max(1, math.ceil(tokens / per_step) // 10)
    return TrainConfig(**settings)


def convert_run(run, out, to, *, layers=None, method: str = "first", data=None,
                corpus_tokens: int = 65536, seq_len=None, eval_tokens: int = 16384,
                tokens=None, device="cpu", eval_batch_size: int = 16, **train_overrides) -> dict:
    """`sqt convert RUN --to SPEC --out OUT`: convert the model of a checkpoint directory, score
    it before and after on validation windows of its data (when it has data: a head conversion
    needs none), and save it in `out` as an ordinary checkpoint; with `tokens`, first fine-tune it for that many tokens (sqt.train, starting from
    the converted weights, the source run's recipe; `train_overrides` are TrainConfig fields).
    `out/conversion.json` records what was done. Returns that record."""
    from pathlib import Path

    from .checkpoint import load_model, load_run_tokenizer, save_model
    from .probe import mean_loss
    from .rundata import CORPUS_SEED, check_count, default_seq_len, open_data, token_windows
    from .train import train
    from .utils import atomic_write_json
    for name, value, minimum, optional in (
            ("seq_len", seq_len, 2, True), ("eval_batch_size", eval_batch_size, 1, False),
            ("corpus_tokens", corpus_tokens, 2, False), ("tokens", tokens, 1, True),
            ("batch_size", train_overrides.get("batch_size"), 1, True)):
        check_count(name, value, minimum, optional=optional)
    if eval_tokens != 0:
        check_count("eval_tokens", eval_tokens, 2)   # 0 skips the scoring
    out = Path(out)
    if out.is_file():
        raise ValueError(f"--out {str(out)!r} is a file: expected a new directory")
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"--out {str(out)!r} is not empty: convert into a new directory")
    model, meta = load_model(run, device)
    spec = dataset = corpus = None
    needed = tokens or needs_corpus(model, plan(model, to, layers), method)
    if needed or eval_tokens:
        try:
            spec, dataset = open_data(run, meta, model, data)
        except ValueError:
            if needed or data:
                raise
            eval_tokens = 0   # only the scoring wanted text, and the run records none: unscored
        seq_len = min(seq_len or default_seq_len(model, meta), model.config.max_seq_len)
    if dataset is not None:
        corpus = token_windows(dataset.train, corpus_tokens, seq_len, seed=CORPUS_SEED)
    new, record = convert(model, to, layers=layers, method=method, corpus=corpus,
                          batch_size=eval_batch_size)
    record.update(source=str(run), data=spec, tokens=tokens)
    val = token_windows(dataset.val, eval_tokens, seq_len) if eval_tokens else None
    if val is not None:
        record.update(loss_source=mean_loss(model, val, batch_size=eval_batch_size),
                      loss_converted=mean_loss(new, val, batch_size=eval_batch_size))
    if tokens:
        cfg = finetune_config(meta.get("train"), tokens=tokens, seq_len=seq_len,
                              out_dir=str(out), device=str(device), **train_overrides)
        result = train(new.config, cfg, dataset, init_from=new.state_dict(), label="convert")
        new = result.pop("model").eval()
        atomic_write_json(out / "result.json", result)
        record["finetune"] = {"steps": cfg.resolve(len(dataset.train)).steps,
                              "tokens": result["budget"]["tokens"],
                              "final_val_loss": result["final_val_loss"]}
        if val is not None:
            record["loss_finetuned"] = mean_loss(new, val, batch_size=eval_batch_size)
    else:
        tok = load_run_tokenizer(run)
        meta = {"conversion": {"source": str(run), "data": spec}}
        if dataset is not None:
            meta["dataset"] = dataset.describe()
        if hasattr(tok, "to_dict"):   # where readers of older checkpoints look for it
            meta["tokenizer"] = tok.to_dict()
        save_model(out, new, tokenizer=tok, meta=meta)
    atomic_write_json(out / "conversion.json", record)
    return record
