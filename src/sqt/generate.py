"""Sampling (temperature, top-k, top-p) and the reference generation loop, which wraps a model:
prefill a KV cache, then decode one token per step, streamed as an iterator or through a callback,
with an optional stop token. Prompts in a batch have equal length. The model knows nothing of
this module."""

from __future__ import annotations

import math
from typing import Callable, Iterator, Optional

import torch

from .model import check_model
from .utils import check_token_ids


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def check_sampling(temperature: float, top_k: Optional[int], top_p: Optional[float]) -> None:
    if not _number(temperature) or not 0 <= temperature < math.inf:
        raise ValueError(f"temperature={temperature!r}: expected a finite number >= 0 (0 is "
                         "greedy)")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k={top_k!r}: expected None or an integer >= 1")
    if top_p is not None and not (_number(top_p) and 0 < top_p <= 1):
        raise ValueError(f"top_p={top_p!r}: expected None or a number in (0, 1]")


def _device_type(generator: torch.Generator) -> str:
    try:
        return generator.device.type
    except RuntimeError:   # a generator of a device type without one (meta)
        return "unknown"


def check_generation(model, idx, max_new_tokens: int, *, limit: Optional[int],
                     limit_name: str = "the model's max_seq_len", temperature, top_k, top_p,
                     stop_token, generator) -> None:
    """Every argument of a generation call, where it enters (no later step checks anything):
    the prompt (`check_prompt`, its ids within the vocabulary, on the model's device), the
    sampling settings, the stop token and the generator."""
    check_model(model)
    vocab = model.config.vocab_size
    check_prompt(idx, max_new_tokens, limit, limit_name=limit_name)
    check_token_ids(idx, vocab, name="prompt")
    device = model.tok_emb.weight.device
    if idx.device != device:
        raise ValueError(f"prompt is on {idx.device} but the model is on {device}: move the "
                         "prompt to the model's device")
    check_sampling(temperature, top_k, top_p)
    if stop_token is not None and (isinstance(stop_token, bool) or not isinstance(
            stop_token, int) or not 0 <= stop_token < vocab):
        raise ValueError(f"stop_token={stop_token!r}: expected None or a token id in "
                         f"[0, {vocab}) (vocab_size={vocab})")
    if generator is not None and (not isinstance(generator, torch.Generator)
                                  or _device_type(generator) != device.type):
        got = getattr(generator, "device", type(generator).__name__)
        raise ValueError(f"generator on {got}: expected None or a torch.Generator on the "
                         f"model's device type ({device.type})")


def sample_next(logits: torch.Tensor, *, temperature: float = 1.0, top_k: Optional[int] = None,
                top_p: Optional[float] = None,
                generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """logits: (B, V) -> token ids (B,). Temperature 0 is greedy. Runs on the logits' device with
    no host synchronisation, so it can sit inside a captured graph."""
    check_sampling(temperature, top_k, top_p)   # host-side only: free
    if temperature == 0:
        return logits.argmax(dim=-1)
    # The largest logit at 0 first: dividing by a tiny temperature then gives 0 and -inf, never
    # inf - inf (NaN).
    # A temperature below float32's smallest normal number would round to 0 there.
    logits = logits.float()
    logits = (logits - logits.amax(dim=-1, keepdim=True)) / max(
        temperature, torch.finfo(torch.float32).tiny)
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # Drop a token when the mass before it already reaches top_p. The mass before the first
        # is exactly 0 (a shifted cumsum, not cum - p, whose rounding can exceed a tiny top_p),
        # so the first always stays.
        before = torch.cat([torch.zeros_like(cum[..., :1]), cum[..., :-1]], dim=-1)
        # A top_p below float32's smallest normal number would round to 0 there.
        drop_sorted = before >= max(top_p, torch.finfo(cum.dtype).tiny)
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def apply_stop(nxt: torch.Tensor, done: torch.Tensor, stop_token: Optional[int]):
    """A sequence that has produced `stop_token` keeps producing it. Returns (tokens, done)."""
    if stop_token is None:
        return nxt, done
    nxt = torch.where(done, torch.full_like(nxt, stop_token), nxt)
    return nxt, done | (nxt == stop_token)


def check_prompt(idx: torch.Tensor, max_new_tokens: int, limit: Optional[int], *,
                 limit_name: str = "the model's max_seq_len") -> None:
    """The checks every generation path makes: a (batch, seq_len) prompt, at least one token,
    a positive token count, and room for prompt plus new tokens within `limit` (None: none)."""
    if not isinstance(idx, torch.Tensor) or idx.dim() != 2:
        shape = tuple(idx.shape) if isinstance(idx, torch.Tensor) else type(idx).__name__
        raise ValueError(f"prompt is {shape}: expected a (batch, seq_len) tensor of token ids; "
                         "batched prompts must have equal length")
    if idx.shape[0] == 0 or idx.shape[1] == 0:
        raise ValueError(f"prompt is empty (shape {tuple(idx.shape)}): expected at least one "
                         "sequence of at least one token")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens!r}: expected an integer >= 1")
    if limit is not None and idx.shape[1] + max_new_tokens > limit:
        raise ValueError(
            f"prompt length {idx.shape[1]} + max_new_tokens={max_new_tokens} exceeds "
            f"{limit_name}={limit}; shorten the prompt or ask for at most "
            f"{max(limit - idx.shape[1], 0)} new tokens")


@torch.no_grad()
def stream(model, idx: torch.Tensor, max_new_tokens: int, *, temperature: float = 1.0,
           top_k: Optional[int] = None, top_p: Optional[float] = None,
           stop_token: Optional[int] = None,
           generator: Optional[torch.Generator] = None) -> Iterator[torch.Tensor]:
    """Yield the next token ids (B,) one step at a time. A sequence that has produced
    `stop_token` keeps producing it; the iterator ends when every sequence has stopped."""
    check_model(model)
    check_generation(model, idx, max_new_tokens, limit=model.max_positions,
                     temperature=temperature, top_k=top_k, top_p=top_p, stop_token=stop_token,
                     generator=generator)
    was_training = model.training
    model.eval()
    try:
        cache = model.new_cache(idx.shape[0], idx.shape[1] + max_new_tokens)
        logits = model(idx, cache)[:, -1]
        length = idx.shape[1]    # positions written, counted on the host
        done = torch.zeros(idx.shape[0], dtype=torch.bool, device=idx.device)
        for _ in range(max_new_tokens):
            nxt, done = apply_stop(sample_next(logits, temperature=temperature, top_k=top_k,
                                               top_p=top_p, generator=generator),
                                   done, stop_token)
            yield nxt
            if stop_token is not None and bool(done.all()):
                return
            if length < cache.max_len:
                # Attend over what is written only, so a step reads as much as it needs.
                cache.view_len = length + 1
                logits = model(nxt[:, None], cache, decode=True)[:, -1]
                length += 1
    finally:
        model.train(was_training)


@torch.no_grad()
def generate(model, idx: torch.Tensor, max_new_tokens: int, *, temperature: float = 1.0,
             top_k: Optional[int] = None, top_p: Optional[float] = None,
             stop_token: Optional[int] = None, generator: Optional[torch.Generator] = None,
             callback: Optional[Callable[[torch.Tensor], None]] = None) -> torch.Tensor:
    """Prompt (B, T) -> prompt plus generated tokens (B, T + n), n <= max_new_tokens (fewer when
    every sequence reached `stop_token`). `callback(tokens)` is called with each new (B,) step."""
    if callback is not None and not callable(callback):
        raise ValueError(f"callback={callback!r}: expected None or a function of the new tokens")
    out = [idx]
    for nxt in stream(model, idx, max_new_tokens, temperature=temperature, top_k=top_k,
                      top_p=top_p, stop_token=stop_token, generator=generator):
        if callback is not None:
            callback(nxt)
        out.append(nxt[:, None])
    return torch.cat(out, dim=1)
