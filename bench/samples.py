"""Generated samples of a trained run, to read beside its numbers: fixed prompts cut from the
validation split (each starting a document or a line), continued at temperature 0.8 with a fixed
seed, decoded. Every run of a grid gets the same prompts."""

from __future__ import annotations

PROMPTS = 3
PROMPT_TOKENS = 16
NEW_TOKENS = 64
TEMPERATURE = 0.8
SEED = 1234
SEARCH = 4096     # how far past its spread-out offset a prompt may move to find a boundary


def prompt_starts(val, tokenizer, *, n: int = PROMPTS, length: int = PROMPT_TOKENS) -> list[int]:
    """`n` offsets spread evenly over the validation tokens `val`, each moved forward to just
    after an end-of-text token or a token that ends a line, where one is near."""
    last = len(val) - length - 1
    if last < 1:
        raise ValueError(f"the validation split has {len(val)} tokens: too few for a prompt of "
                         f"{length}")
    starts = []
    for k in range(n):
        target = max(1, k * last // n)
        start = target
        for p in range(target, min(last, target + SEARCH)):
            prev = int(val[p - 1])
            if prev == tokenizer.eot_id or tokenizer.decode([prev]).endswith("\n"):
                start = p
                break
        starts.append(start)
    return starts


def generate_samples(model, data, device, *, new_tokens: int = NEW_TOKENS) -> list[dict]:
    """[{prompt, completion}] for the dataset's fixed prompts, up to `new_tokens` each; a
    completion ends at the first end-of-text token."""
    import torch
    from sqt.generate import generate
    tok = data.tokenizer
    starts = prompt_starts(data.val, tok)
    idx = torch.tensor([[int(t) for t in data.val[s:s + PROMPT_TOKENS]] for s in starts],
                       device=device)
    room = model.max_positions - PROMPT_TOKENS if model.max_positions else new_tokens
    gen = torch.Generator(device=device).manual_seed(SEED)
    out = generate(model, idx, min(new_tokens, room), temperature=TEMPERATURE, generator=gen)
    samples = []
    for row in out.tolist():
        new = row[PROMPT_TOKENS:]
        if tok.eot_id is not None and tok.eot_id in new:
            new = new[:new.index(tok.eot_id)]
        samples.append({"prompt": tok.decode(row[:PROMPT_TOKENS]), "completion": tok.decode(new)})
    return samples
