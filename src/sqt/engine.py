"""A decode engine: what a user would ship to generate text fast.

`sqt.generate` is the readable reference loop: every step is a Python forward, so a small model
decodes at the speed of kernel launches. The engine keeps every shape static instead:

- one preallocated `KVCache` (sized per layer by its K/V heads), whose write position `pos` is a
  device tensor that the model advances in place;
- prefill through the model's ordinary attention backend (the causal kernel);
- each decode step attends over a fixed-length view of the cache (`cache.view_len`: a "bucket",
  a multiple of `bucket` positions that covers the current length) with a mask built from the
  position, so on CUDA the step is captured once per bucket as a CUDA graph and replayed.
  Buckets keep the bytes read per step proportional to the current length, not to `max_len`;
- sampling (temperature, top-k, top-p) on the device with `sqt.generate.sample_next`, outside
  the graph (a few kernels; the model is the heavy part) so any torch.Generator works;
- no host synchronisation per token except where a caller asks for the token's value.

The cache's only position lives on the device; the engine keeps its own count on the host
(`length`) to choose buckets without reading it back. On the CPU the same code runs without
graphs. Greedy output equals the reference loop's and the full forward's argmax
(tests/test_engine.py)."""

from __future__ import annotations

from typing import Callable, Iterator, Optional

import torch

from .generate import apply_stop, check_generation, sample_next
from .model import TransformerLM, check_model
from .utils import check_token_id_tensor


class DecodeEngine:
    """Static-shape batched generation for one model, batch size and maximum length.

    `use_graphs` (default: on CUDA) captures the decode step as a CUDA graph per bucket, lazily,
    the first time a sequence reaches that bucket. `bucket` is the granularity of the attended
    cache view, in positions. `compile` fuses the step with torch.compile before it is captured
    (fewer, larger kernels: what bounds a small model's step); it compiles once per bucket, so it
    pays for short contexts and many tokens.

    `length` is the number of positions written as the host counts them (the prompt plus the
    steps run); `cache.pos` is the same number on the device, the one the model reads."""

    def __init__(self, model: TransformerLM, batch_size: int, max_len: int, *,
                 use_graphs: Optional[bool] = None, bucket: int = 256, compile: bool = False):
        if isinstance(bucket, bool) or not isinstance(bucket, int) or bucket < 1:
            raise ValueError(f"bucket={bucket!r}: expected an integer >= 1")
        check_model(model)
        # Refuses a max_len beyond what the model can read: decode steps cannot check on the host.
        self.cache = model.new_cache(batch_size, max_len)
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
        # Static input and output of the captured step.
        self.tokens = torch.zeros(batch_size, 1, dtype=torch.long, device=self.device)
        self.logits = torch.zeros(batch_size, model.config.vocab_size, device=self.device,
                                  dtype=model.tok_emb.weight.dtype)
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._pool = torch.cuda.graph_pool_handle() if use_graphs else None
        self.length = 0   # the host's count of cache.pos: picks the bucket without a sync

    # -- the two phases ------------------------------------------------------------------------

    @torch.no_grad()
    def prefill(self, idx: torch.Tensor) -> torch.Tensor:
        """Reset the cache to `idx` (B, T) and return the last position's logits (B, V)."""
        idx = self._check_prompt(idx, 1)
        self.cache.reset()
        logits = self.model(idx, self.cache)[:, -1]
        self.length = idx.shape[1]
        self.logits.copy_(logits)
        return self.logits

    @torch.no_grad()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed one token per sequence (B,) and return the next logits (B, V) (a static buffer,
        overwritten by the next step). The step is the fast path: the tokens' values are not
        checked (that would synchronise); ids the engine samples are in range by construction."""
        check_token_id_tensor(tokens, name="tokens")
        if tokens.numel() != self.batch_size:
            raise ValueError(f"tokens has shape {tuple(tokens.shape)}: expected one token per "
                             f"sequence, ({self.batch_size},)")
        if self.length == 0:
            raise RuntimeError("DecodeEngine.step before prefill: call prefill(prompt) first")
        if self.length >= self.max_len:
            raise ValueError(f"the cache is full (max_len={self.max_len}); build the engine with "
                             "a larger max_len")
        self.tokens.copy_(tokens.view(self.batch_size, 1))
        view_len = min(self.max_len, -(-(self.length + 1) // self.bucket) * self.bucket)
        # A captured graph holds the view's shape; setting it keeps the cache's state honest.
        self.cache.view_len = view_len
        if self.use_graphs:
            graph = self._graphs.get(view_len)
            if graph is None:
                graph = self._capture(view_len)
            graph.replay()
        else:
            self._step_body()
        self.length += 1
        return self.logits

    def _step_body(self) -> None:
        self.logits.copy_(self._forward(self.tokens, self.cache, decode=True)[:, -1])

    def _capture(self, view_len: int) -> "torch.cuda.CUDAGraph":
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

    def _check_prompt(self, idx, max_new_tokens: int, **sampling) -> torch.Tensor:
        """The prompt on the engine's device, every argument checked."""
        if isinstance(idx, torch.Tensor):
            idx = idx.to(self.device)
        sampling = {"temperature": 0, "top_k": None, "top_p": None, "stop_token": None,
                    "generator": None, **sampling}
        check_generation(self.model, idx, max_new_tokens, limit=self.max_len,
                         limit_name="the engine's max_len", **sampling)
        if idx.shape[0] != self.batch_size:
            raise ValueError(f"prompt batch={idx.shape[0]}: this engine was built for "
                             f"batch_size={self.batch_size}")
        return idx

    @torch.no_grad()
    def stream(self, idx: torch.Tensor, max_new_tokens: int, *, temperature: float = 1.0,
               top_k: Optional[int] = None, top_p: Optional[float] = None,
               stop_token: Optional[int] = None, generator: Optional[torch.Generator] = None,
               check_every: int = 1) -> Iterator[torch.Tensor]:
        """Yield the next token ids (B,) per step, as `sqt.generate.stream` does. With a stop
        token, whether every sequence has stopped is read back every `check_every` steps (a
        host sync), so a caller that does not print each token can avoid one sync per token;
        steps past the stop then repeat `stop_token`, as stopped sequences do anyway."""
        if isinstance(check_every, bool) or not isinstance(check_every, int) or check_every < 1:
            raise ValueError(f"check_every={check_every!r}: expected an integer >= 1")
        idx = self._check_prompt(idx, max_new_tokens, temperature=temperature, top_k=top_k,
                                 top_p=top_p, stop_token=stop_token, generator=generator)
        logits = self.prefill(idx)
        done = torch.zeros(self.batch_size, dtype=torch.bool, device=self.device)
        for i in range(max_new_tokens):
            nxt, done = apply_stop(sample_next(logits, temperature=temperature, top_k=top_k,
                                               top_p=top_p, generator=generator),
                                   done, stop_token)
            yield nxt
            if stop_token is not None and (i + 1) % check_every == 0 and bool(done.all()):
                return
            if i + 1 < max_new_tokens:
                logits = self.step(nxt)

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, *, temperature: float = 1.0,
                 top_k: Optional[int] = None, top_p: Optional[float] = None,
                 stop_token: Optional[int] = None, generator: Optional[torch.Generator] = None,
                 callback: Optional[Callable[[torch.Tensor], None]] = None,
                 check_every: int = 16) -> torch.Tensor:
        """Prompt (B, T) -> (B, T + n), n <= max_new_tokens, exactly what
        `sqt.generate.generate` returns: when every sequence stops early the output ends at the
        step where the last one produced `stop_token`."""
        if callback is not None and not callable(callback):
            raise ValueError(f"callback={callback!r}: expected None or a function of the new "
                             "tokens")
        steps = []
        for nxt in self.stream(idx, max_new_tokens, temperature=temperature, top_k=top_k,
                               top_p=top_p, stop_token=stop_token, generator=generator,
                               check_every=1 if callback else check_every):
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
