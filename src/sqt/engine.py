"""A decode engine: what a user would ship to generate text fast.

`sqt.generate` is the readable reference loop: every step is a Python forward with a cache that
grows by slicing, so a small model decodes at the speed of kernel launches. The engine keeps
every shape static instead:

- a preallocated KV cache per layer, sized by that layer's K/V heads, whose write position is a
  device tensor (written with `index_copy_`, advanced in place by the step itself);
- prefill through the model's ordinary attention backend (the causal kernel);
- each decode step attends over a fixed-length view of the cache (a "bucket", a multiple of
  `bucket` positions that covers the current length) with a mask from the position, so on CUDA
  the step is captured once per bucket as a CUDA graph and replayed. Buckets keep the bytes read
  per step proportional to the current length, not to `max_len`;
- sampling (temperature, top-k, top-p) on the device with `sqt.generate.sample_next`, outside
  the graph (a few kernels; the model is the heavy part) so any torch.Generator works;
- no host synchronisation per token except where a caller asks for the token's value.

On the CPU the same code runs without graphs. Greedy output equals the eager loop's and the full
forward's argmax (tests/test_engine.py)."""

from __future__ import annotations

from typing import Callable, Iterator, Optional

import torch

from .generate import apply_stop, check_prompt, check_sampling, sample_next
from .attention import KVCache
from .model import TransformerLM


class StaticKVCache(KVCache):
    """The core KV cache plus a write position on the device.

    The model reads `length` as its offset and assigns `length = offset + T` after a forward.
    During prefill `length` is a Python int (the model takes its ordinary sliced path); during
    decoding it is the device tensor `pos`, so the offset, the cache write and the mask all come
    from device memory and the assignment becomes an in-place copy a graph can replay."""

    def __init__(self, model: TransformerLM, batch_size: int, max_len: int):
        p = model.tok_emb.weight
        self.pos = torch.zeros((), dtype=torch.long, device=p.device)
        self.decoding = False
        self.view_len = max_len      # positions a decode step attends over (the bucket)
        self._host_length = 0
        super().__init__(model.config, batch_size, max_len, p.device, p.dtype)

    @property
    def length(self):
        return self.pos if self.decoding else self._host_length

    @length.setter
    def length(self, value):
        if isinstance(value, int):
            self._host_length = value
            self.pos.fill_(value)
        else:
            self.pos.copy_(value)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, offset):
        if isinstance(offset, int):
            return super().update(layer, k, v, offset)
        T = k.shape[2]
        index = offset.reshape(1) if T == 1 else offset + torch.arange(T, device=k.device)
        self.k[layer].index_copy_(2, index, k)
        self.v[layer].index_copy_(2, index, v)
        return self.k[layer][:, :, :self.view_len], self.v[layer][:, :, :self.view_len]


def kv_bytes_per_token(model: TransformerLM) -> int:
    """Bytes of K and V one position adds to the cache (one sequence), at the model's dtype."""
    size = model.tok_emb.weight.element_size()
    return sum(2 * s.n_kv_heads * model.config.head_dim * size for s in model.specs)


class DecodeEngine:
    """Static-shape batched generation for one model, batch size and maximum length.

    `use_graphs` (default: on CUDA) captures the decode step as a CUDA graph per bucket, lazily,
    the first time a sequence reaches that bucket. `bucket` is the granularity of the attended
    cache view, in positions. `compile` fuses the step with torch.compile before it is captured
    (fewer, larger kernels: what bounds a small model's step); it compiles once per bucket, so it
    pays for short contexts and many tokens."""

    def __init__(self, model: TransformerLM, batch_size: int, max_len: int,
                 use_graphs: Optional[bool] = None, bucket: int = 256, compile: bool = False):
        for name, value in (("batch_size", batch_size), ("max_len", max_len), ("bucket", bucket)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r}: expected an integer >= 1")
        limit = model.max_positions
        if limit is not None and max_len > limit:
            raise ValueError(f"max_len={max_len} exceeds the model's max_seq_len={limit} "
                             "(learned positions or a static query table)")
        self.model = model.eval()
        self.device = model.tok_emb.weight.device
        if use_graphs is None:
            use_graphs = self.device.type == "cuda"
        if use_graphs and self.device.type != "cuda":
            raise ValueError(f"use_graphs=True on device {self.device}: CUDA graphs need a CUDA "
                             "device; use use_graphs=False or None")
        self.use_graphs = use_graphs
        self.compiled = bool(compile)
        if compile:
            from .utils import allow_many_recompiles
            allow_many_recompiles()   # one compile per (batch, bucket): never fall back silently
        self._forward = torch.compile(model, dynamic=False) if compile else model
        self.batch_size, self.max_len, self.bucket = batch_size, max_len, bucket
        self.cache = StaticKVCache(model, batch_size, max_len)
        # Static input and output of the captured step.
        self.tokens = torch.zeros(batch_size, 1, dtype=torch.long, device=self.device)
        self.logits = torch.zeros(batch_size, model.config.vocab_size, device=self.device,
                                  dtype=model.tok_emb.weight.dtype)
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._pool = torch.cuda.graph_pool_handle() if use_graphs else None
        self.length = 0   # host-side copy of the position: picks the bucket without a sync

    # -- the two phases ------------------------------------------------------------------------

    @torch.no_grad()
    def prefill(self, idx: torch.Tensor) -> torch.Tensor:
        """Reset the cache to `idx` (B, T) and return the last position's logits (B, V)."""
        self._check_prompt(idx, 1)
        self.cache.decoding = False
        self.cache.length = 0
        logits = self.model(idx.to(self.device), self.cache)[:, -1]
        self.cache.decoding = True
        self.length = idx.shape[1]
        self.logits.copy_(logits)
        return self.logits

    def seek(self, length: int) -> None:
        """Position the cache at `length` without a prefill, so the next step writes position
        `length`. For benchmarks, which time long contexts without paying for their prefill;
        earlier positions keep whatever they hold (see `randomize_cache`)."""
        if isinstance(length, bool) or not isinstance(length, int) \
                or not 1 <= length < self.max_len:
            raise ValueError(f"seek({length!r}): expected an integer in 1..{self.max_len - 1}")
        self.cache.decoding = False
        self.cache.length = length
        self.cache.decoding = True
        self.length = length

    @torch.no_grad()
    def randomize_cache(self, generator: Optional[torch.Generator] = None) -> None:
        """Fill every cached key and value with random numbers, once, before timing steps after
        `seek`: a zero-filled cache can run faster than real data and hides a step that reads
        nothing."""
        for buf in self.cache.k + self.cache.v:
            buf.normal_(generator=generator)

    @torch.no_grad()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed one token per sequence (B,) and return the next logits (B, V) (a static buffer,
        overwritten by the next step)."""
        if self.length == 0:
            raise RuntimeError("DecodeEngine.step before prefill: call prefill(prompt) first")
        if self.length >= self.max_len:
            raise ValueError(f"the cache is full (max_len={self.max_len}); build the engine with "
                             "a larger max_len")
        self.tokens.copy_(tokens.view(self.batch_size, 1))
        view_len = min(self.max_len, -(-(self.length + 1) // self.bucket) * self.bucket)
        if self.use_graphs:
            graph = self._graphs.get(view_len)
            if graph is None:
                graph = self._capture(view_len)
            graph.replay()
        else:
            self.cache.view_len = view_len
            self._step_body()
        self.length += 1
        return self.logits

    def _step_body(self) -> None:
        self.logits.copy_(self._forward(self.tokens, self.cache)[:, -1])

    def _capture(self, view_len: int) -> "torch.cuda.CUDAGraph":
        self.cache.view_len = view_len
        saved = self.cache.pos.clone()
        # One eager run on a side stream first (cuBLAS and SDPA initialise workspaces lazily,
        # which cannot happen during capture). It writes the same K/V the captured step will.
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            self._step_body()
            self.cache.pos.copy_(saved)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            self._step_body()
        self._graphs[view_len] = graph
        return graph

    # -- generation ----------------------------------------------------------------------------

    def _check_prompt(self, idx, max_new_tokens: int) -> None:
        check_prompt(idx, max_new_tokens, self.max_len, "the engine's max_len")
        if idx.shape[0] != self.batch_size:
            raise ValueError(f"prompt batch={idx.shape[0]}: this engine was built for "
                             f"batch_size={self.batch_size}")

    @torch.no_grad()
    def stream(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
               top_k: Optional[int] = None, top_p: Optional[float] = None,
               stop_token: Optional[int] = None, generator: Optional[torch.Generator] = None,
               check_every: int = 1) -> Iterator[torch.Tensor]:
        """Yield the next token ids (B,) per step, as `sqt.generate.stream` does. With a stop
        token, whether every sequence has stopped is read back every `check_every` steps (a
        host sync), so a caller that does not print each token can avoid one sync per token;
        steps past the stop then repeat `stop_token`, as stopped sequences do anyway."""
        self._check_prompt(idx, max_new_tokens)
        check_sampling(temperature, top_k, top_p)
        logits = self.prefill(idx)
        done = torch.zeros(self.batch_size, dtype=torch.bool, device=self.device)
        for i in range(max_new_tokens):
            nxt, done = apply_stop(sample_next(logits, temperature, top_k, top_p, generator),
                                   done, stop_token)
            yield nxt
            if stop_token is not None and (i + 1) % check_every == 0 and bool(done.all()):
                return
            if i + 1 < max_new_tokens:
                logits = self.step(nxt)

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: Optional[int] = None, top_p: Optional[float] = None,
                 stop_token: Optional[int] = None, generator: Optional[torch.Generator] = None,
                 callback: Optional[Callable[[torch.Tensor], None]] = None,
                 check_every: int = 16) -> torch.Tensor:
        """Prompt (B, T) -> (B, T + n), n <= max_new_tokens, exactly what
        `sqt.generate.generate` returns: when every sequence stops early the output ends at the
        step where the last one produced `stop_token`."""
        steps = []
        for nxt in self.stream(idx, max_new_tokens, temperature, top_k, top_p, stop_token,
                               generator, check_every=1 if callback else check_every):
            if callback is not None:
                callback(nxt)
            steps.append(nxt)
        out = torch.stack(steps, dim=1)
        if stop_token is not None:
            # Trim the steps run between the last sequence stopping and the next check.
            stopped = (out == stop_token).cummax(dim=1).values.all(dim=0)
            if bool(stopped.any()):
                out = out[:, :int(stopped.int().argmax()) + 1]
        return torch.cat([idx.to(out.device), out], dim=1)
