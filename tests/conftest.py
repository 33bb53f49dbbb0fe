import pytest
import torch

from sqt import LMConfig, TransformerLM

# Every named variant plus the mixes a researcher would build: windows, SQT with fewer query
# heads, the static rotary query, the parameter-free controls with other head layouts, a
# per-layer hybrid.
LAYER_CASES = [
    "mha", "gqa", "mqa", "sqa", "ssqa", "xsqa", "xsmqa", "lsqa", "rsqa", "sqt", "srq", "idq",
    "rndq", "mha@3", "sqa@5", "table:xsqa", "rotary:gqa", "identity:xsqa", "random:gqa",
    ("sqt", "xsqa"), ("mha@4", "rsqa"), ("idq", "random:rsqa"),
]


def case_id(layers) -> str:
    return "+".join(layers) if isinstance(layers, tuple) else layers


def small_config(block="classic", layers="mha", **kw) -> LMConfig:
    base = dict(vocab_size=37, d_model=32, n_heads=8, n_layers=2, d_ff=48, max_seq_len=24,
                block=block, layers=layers)
    return LMConfig(**{**base, **kw})


def build(block="classic", layers="mha", seed=0, **kw) -> TransformerLM:
    torch.manual_seed(seed)
    return TransformerLM(small_config(block, layers, **kw)).eval()


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(1234)
    yield


def prefill_then_decode(model, x, prefill: int = 6):
    """(full forward logits, prefill-then-one-token-at-a-time logits, the cache) of `model` on
    `x`: the cached path's two ops (prefill, decode) against the uncached forward."""
    B, T = x.shape
    with torch.no_grad():
        full = model(x)
        cache = model.new_cache(B, T)
        parts = [model(x[:, :prefill], cache)] + [model(x[:, i:i + 1], cache, decode=True)
                                                  for i in range(prefill, T)]
    return full, torch.cat(parts, dim=1), cache
