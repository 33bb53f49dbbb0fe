"""The language model: blocks (norm, attention, MLP or mixture of experts) stacked from per-layer
specs, and the seed's constructors BaselineLM, SQTLM and HybridLM, which only choose that list of
specs."""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Mapping, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from . import modeldir
from .attention import Attention, KVCache
from .config import LMConfig, preset
from .kernels import cached_bias
from .moe import MoE
from .utils import check_token_id_tensor, check_token_ids, resolve_device
from .variants import LayersArg, hybrid_layers


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


class MLP(nn.Module):
    """GELU MLP (classic block) or SwiGLU (modern block)."""

    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.swiglu = cfg.block == "modern"
        bias = not self.swiglu
        # SwiGLU's gate and up projections are one matmul (gate rows first), as Q/K/V are.
        self.up = nn.Linear(cfg.d_model, 2 * cfg.d_ff if self.swiglu else cfg.d_ff, bias=bias)
        self.down = nn.Linear(cfg.d_ff, cfg.d_model, bias=bias)

    def forward(self, x):
        if self.swiglu:
            gate, up = self.up(x).chunk(2, dim=-1)
            return self.down(F.silu(gate) * up)
        return self.down(F.gelu(self.up(x)))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Checkpoints written before the fusion hold `gate` and `up` apart.
        if prefix + "gate.weight" in state_dict:
            state_dict[prefix + "up.weight"] = torch.cat(
                [state_dict.pop(prefix + "gate.weight"), state_dict[prefix + "up.weight"]], dim=0)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def _norm(cfg: LMConfig) -> nn.Module:
    return (nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps) if cfg.block == "classic"
            else RMSNorm(cfg.d_model, cfg.norm_eps))


class Block(nn.Module):
    def __init__(self, cfg: LMConfig, spec, layer_idx: int):
        super().__init__()
        self.norm1, self.norm2 = _norm(cfg), _norm(cfg)
        self.attn = Attention.from_config(cfg, spec, layer_idx)
        self.mlp = MoE(cfg) if cfg.n_experts else MLP(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, cache=None, *, decode=False, positions=None, bias=None):
        a = self.attn(self.norm1(x), cache, decode=decode, positions=positions, bias=bias)
        x = x + self.drop(a)
        return x + self.drop(self.mlp(self.norm2(x)))


def _tracing(idx: torch.Tensor) -> bool:
    """Inside torch.compile's trace or a CUDA graph capture, where reading a value back on the
    host is impossible (or would be baked in)."""
    return torch.compiler.is_compiling() or (
        idx.is_cuda and torch.cuda.is_current_stream_capturing())


class TransformerLM(nn.Module):
    """A decoder-only LM whose layers each choose their query side. `layers` (one variant for all
    layers, or one per layer) overrides `cfg.layers`; the resolved config is `self.config`.

    `check_ids` (default True): a forward that starts a sequence checks that its token ids lie in
    [0, vocab_size), a host synchronisation on CUDA. A caller whose ids are known to be in range
    (the trainer, which checks its dataset once) turns it off."""

    check_ids: bool = True

    def __init__(self, cfg: LMConfig, layers: Optional[LayersArg] = None):
        super().__init__()
        if not isinstance(cfg, LMConfig):
            raise ValueError(f"cfg={type(cfg).__name__}: expected an LMConfig")
        self.config = cfg = cfg.with_layers(layers) if layers is not None else cfg
        self.specs = cfg.layer_specs()
        # Read by every forward: kept here, as the specs are, so a compiled forward does not trace
        # the parsing of the layer names (their fractions break a graph on torch 2.11).
        self._max_positions = cfg.max_positions
        self.windows = tuple(dict.fromkeys(s.window for s in self.specs))   # distinct, in order
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = (nn.Embedding(cfg.max_seq_len, cfg.d_model)
                        if cfg.block == "classic" else None)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg, s, i) for i, s in enumerate(self.specs))
        self.norm_f = _norm(cfg)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=cfg.block == "classic")
        self.apply(self._init)
        # GPT-2's scaled init of the projections that write into the residual stream.
        for name, p in self.named_parameters():
            if name.endswith(("o_proj.weight", "down.weight", "mlp.w_down")):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * cfg.n_layers))
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight

    @staticmethod
    def _init(m: nn.Module):
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=0.02)

    @classmethod
    def from_preset(cls, name: str, layers: Optional[LayersArg] = None, **overrides):
        return cls(preset(name, **overrides), layers)

    @classmethod
    def from_state(cls, cfg: LMConfig, state: Mapping, *, where: str = "state") -> "TransformerLM":
        """A model of config `cfg` holding the weights `state` (a tied LM head may be left out).
        The fit is checked on a model without storage first, so a config that does not match
        allocates nothing and the ValueError lists every tensor that differs."""
        state = dict(state)
        if cfg.tie_embeddings and "tok_emb.weight" in state:
            head = state.setdefault("lm_head.weight", state["tok_emb.weight"])
            if head is not state["tok_emb.weight"] and not torch.equal(
                    head, state["tok_emb.weight"]):
                raise ValueError(f"{where} does not match its config: it holds an lm_head.weight "
                                 "of its own but the config ties it to tok_emb.weight "
                                 "(tie_embeddings=True)")
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")   # "copying into a meta parameter is a no-op"
            try:
                cls(cfg).load_state_dict(dict(state))
            except RuntimeError as e:
                raise ValueError(f"{where} does not match its config: "
                                 f"{modeldir.describe_mismatch(e)}") from None
        model = cls(cfg)
        model.load_state_dict(state)
        return model

    @classmethod
    def from_pretrained(cls, path, *, device="cpu") -> "TransformerLM":
        """The model (in eval mode) of a model directory written by `save_pretrained`, or of a
        checkpoint or run directory written by `sqt train`. Its tokenizer, when it has one:
        `sqt.load_tokenizer(path)` for a model directory, `sqt.checkpoint.load_run_tokenizer`
        for any of them."""
        return modeldir.load(cls, path, device)[0]

    def save_pretrained(self, directory, *, tokenizer=None) -> Path:
        """Write a model directory: config.json, model.safetensors and, given a tokenizer,
        tokenizer.json. The directory is replaced as a whole, never left half written; one that
        holds other files is refused."""
        return modeldir.write_model_dir(directory, self.config, self.state_dict(),
                                        tokenizer=tokenizer)

    @property
    def max_positions(self) -> Optional[int]:
        """The longest sequence the model can read, or None where nothing limits it (RoPE and no
        static table)."""
        return self._max_positions

    def backends(self, *, seq_len: Optional[int] = None) -> list[str]:
        """The attention op each layer runs on the model's current device (`sdpa`, `flex`,
        `flash` or `eager`) for a sequence of `seq_len` tokens (default: max_seq_len), in the
        model's mode: after `train()` with a backward pass, after `eval()` without. `auto`
        chooses `flash` by head dim and length (sqt.kernels.AUTO_FLASH), so the answer can
        differ between lengths; `flash` where it cannot run is a ValueError saying why."""
        device = self.tok_emb.weight.device
        seq_len = self.config.max_seq_len if seq_len is None else seq_len
        return [b.attn.backend_for(device, seq_len=seq_len, grad=self.training)
                for b in self.blocks]

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def new_cache(self, batch_size: int, max_len: int, *, device=None, dtype=None) -> KVCache:
        """A KV cache for this model, on its device and in its dtype unless told otherwise;
        `max_len` beyond `max_positions` is refused."""
        p = self.tok_emb.weight
        if isinstance(device, str):
            device = resolve_device(device)
        return KVCache(self.config, batch_size, max_len, device=device or p.device,
                       dtype=dtype or p.dtype)

    def forward(self, idx: torch.Tensor, cache: Optional[KVCache] = None, *,
                decode: bool = False, return_aux: bool = False):
        """idx: (B, T) token ids -> logits (B, T, vocab_size).

        Without a cache, a causal forward from position 0. With one and `decode=False`, a
        prefill: idx starts at position 0, its keys and values are stored and `cache.pos`
        becomes T. With `decode=True`, idx continues the cached sequence at `cache.pos`, read on
        the device only, and the cache advances by T in place: no host synchronisation, so a
        CUDA graph can replay the step. Decoding cannot check lengths on the host; the cache
        refuses to be larger than the model can read, and callers check prompt plus new tokens
        up front (`sqt.generate`, the decode engine).

        Bad input is a ValueError: a non-integer dtype, an empty batch or sequence, ids on another
        device, and, outside compilation and graph capture and unless `check_ids` is off, ids
        outside [0, vocab_size) (decode steps excepted: their ids come from the sampler).

        With `return_aux`, returns (logits, aux_loss): the MoE layers' weighted auxiliary losses,
        summed (0 for a dense model)."""
        check_token_id_tensor(idx)
        if idx.dim() != 2:
            raise ValueError(f"idx has shape {tuple(idx.shape)}: expected (batch, seq_len)")
        B, T = idx.shape
        if B == 0 or T == 0:
            raise ValueError(f"idx has shape {tuple(idx.shape)}: expected at least one sequence "
                             "of at least one token")
        if idx.device != self.tok_emb.weight.device:
            raise ValueError(f"idx is on {idx.device} but the model is on "
                             f"{self.tok_emb.weight.device}: move one to the other")
        if cache is not None:
            self._check_cache(cache, B, prefill=not decode)
        if self.check_ids and not decode and not _tracing(idx):
            # Decode steps are the hot loop, fed the ids a sampler drew: their callers check.
            check_token_ids(idx, self.config.vocab_size)
        positions, biases = None, {}
        if decode:
            if cache is None:
                raise ValueError("decode=True needs the KVCache the sequence continues")
            positions = cache.pos + torch.arange(T, device=idx.device)
            # One mask per distinct window, shared by every layer: for a small model a mask per
            # layer would be a fifth of the step's kernels.
            dtype = cache.k[0].dtype
            biases = {w: cached_bias(positions, cache.view_len, w, dtype=dtype)
                      for w in self.windows}
        else:
            limit = self.max_positions
            if limit is not None and T > limit:
                raise ValueError(
                    f"sequence length {T} exceeds max_seq_len={limit}, the longest this model "
                    "can read (learned positions or a static query table)")
        x = self.tok_emb(idx)
        if self.pos_emb is not None:
            x = x + self.pos_emb(positions if decode else torch.arange(T, device=idx.device))
        x = self.drop(x)
        recompute = self.config.checkpoint_blocks and self.training and torch.is_grad_enabled()
        for block in self.blocks:
            if recompute and cache is None:
                # Dropout masks are replayed exactly: checkpoint restores the RNG state.
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x, cache, decode=decode, positions=positions,
                          bias=biases.get(block.attn.spec.window))
        if cache is not None:
            if decode:
                cache.pos.add_(T)
            else:
                cache.pos.fill_(T)
        logits = self.lm_head(self.norm_f(x))
        return (logits, self.aux_loss()) if return_aux else logits

    def _check_cache(self, cache: KVCache, batch: int, *, prefill: bool) -> None:
        """A cache made for this model and batch (host-side shapes only); a prefill also checks
        every layer's buffer (and the attention layer, that the sequence fits)."""
        if not isinstance(cache, KVCache) or len(cache.k) != len(self.blocks) or \
                cache.k[0].shape[0] != batch:
            got = (f"{len(cache.k)} layers, batch {cache.k[0].shape[0]}"
                   if isinstance(cache, KVCache) else type(cache).__name__)
            raise ValueError(f"cache has {got}: expected a KVCache of this model's "
                             f"{len(self.blocks)} layers for batch {batch} (model.new_cache)")
        if not prefill:
            return
        for i, (block, k) in enumerate(zip(self.blocks, cache.k)):
            want = (batch, block.attn.spec.n_kv_heads, cache.max_len, self.config.head_dim)
            if tuple(k.shape) != want:
                raise ValueError(f"cache layer {i} has shape {tuple(k.shape)}: expected {want}, "
                                 "a KVCache made for this model (model.new_cache)")

    def moe_layers(self) -> list[MoE]:
        return [b.mlp for b in self.blocks if isinstance(b.mlp, MoE)]

    def aux_loss(self) -> torch.Tensor:
        """The MoE layers' weighted auxiliary losses of the last forward, summed (fp32)."""
        total = torch.zeros((), device=self.tok_emb.weight.device)
        for moe in self.moe_layers():
            total = total + moe.aux_loss
        return total

    def expert_load(self) -> list[torch.Tensor]:
        """Per MoE layer, the token-slot count of each expert in the last forward: the layers' live
        (n_experts,) int64 buffers on the model's device (copy them to keep; reading them on the
        host is the caller's synchronisation)."""
        return [moe.load for moe in self.moe_layers()]


def BaselineLM(cfg: LMConfig) -> TransformerLM:
    """Every layer standard multi-head attention."""
    return TransformerLM(cfg, "mha")


def SQTLM(cfg: LMConfig) -> TransformerLM:
    """Every layer a static query table."""
    return TransformerLM(cfg, "sqt")


def HybridLM(cfg: LMConfig, n_sqt_layers: int) -> TransformerLM:
    """The first `n_sqt_layers` layers SQT, the rest standard."""
    return TransformerLM(cfg, hybrid_layers(cfg.n_layers, n_sqt_layers))


def check_model(model) -> None:
    """A ValueError unless `model` is an sqt TransformerLM (or a torch.compile wrapper of one)."""
    if not isinstance(getattr(model, "_orig_mod", model), TransformerLM):
        raise ValueError(f"model is a {type(model).__name__}: expected an sqt TransformerLM")
