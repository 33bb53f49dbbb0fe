"""FlexAttention as sqt runs it on CUDA (compiled once, every new shape compiled rather than
falling back to the unfused reference), for probes that time the op outside the library."""

from __future__ import annotations

import torch
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

from sqt.utils import allow_many_recompiles


def compiled_flex():
    allow_many_recompiles()
    return torch.compile(flex_attention, dynamic=False)


def causal_block_mask(T: int, device, *, reverse: bool = False):
    """The block-sparse causal mask over T tokens (`reverse`: anti-causal, key >= query), built
    compiled so the dense (T, T) grid is never materialised."""
    def causal(b, h, q, k):
        return q >= k

    def anti_causal(b, h, q, k):
        return k >= q
    return create_block_mask(anti_causal if reverse else causal, None, None, T, T,
                             device=device, _compile=True)
