"""Layer specs and the named variants: where a layer's queries come from (QUERY_SOURCES), its head
layout as fractions of the model's head count (HEAD_LAYOUTS), the named variants built from the
two (VARIANTS), and LayerSpec with the parser that turns `sqa@128`, `table:xsqa` or `4/1` into
one. A new variant is a new entry of data here, never new code. Everything here is plain data;
validation errors name the field, the value and what is accepted."""

from __future__ import annotations

import re
from dataclasses import dataclass
from fractions import Fraction
from typing import Sequence, Union

QUERY_SOURCES = ("proj", "table", "rotary", "identity", "random")
"""Where a layer's queries come from: `proj` is W_q x (standard); `table` is a learned per-position
table Q[t, h] (static query, SQT); `rotary` is one learned vector per head rotated by RoPE at
position t (static rotary query: no table, so no length limit). The controls have no query
parameters: `identity` is W_q = I (n_q heads read the input's first n_q*head_dim features, head h
its h-th slice); `random` is a frozen random W_q (Synthesizer-style), a buffer drawn from
`LMConfig.query_seed` and the layer index at a projected query's initial scale."""

# The head layouts, as fractions of the model's nominal head count H. A fraction that does not give
# a whole number for the model's H is an error, never a rounding. `1` as an int means exactly one.
#              name     (query heads, kv heads)
HEAD_LAYOUTS: dict[str, tuple[Union[Fraction, int], Union[Fraction, int]]] = {
    "mha": (Fraction(1), Fraction(1)),           # multi-head: every query head has its own K/V
    "gqa": (Fraction(1), Fraction(1, 4)),        # grouped-query: 4 query heads share each K/V head
    "mqa": (Fraction(1), 1),                     # multi-query: one K/V head for all
    "sqa": (Fraction(1, 2), Fraction(1, 4)),     # sparse query: half the queries, GQA-sized KV
    "ssqa": (Fraction(1, 2), Fraction(1, 2)),    # symmetric SQA: half the queries, half the KV
    "xsqa": (Fraction(1, 4), Fraction(1, 4)),    # extreme SQA: a quarter of each
    "xsmqa": (Fraction(1, 4), 1),                # extreme SQA with a single K/V head
    "lsqa": (Fraction(3, 4), Fraction(1, 4)),    # light SQA: three quarters of the queries
    "rsqa": (Fraction(1, 4), Fraction(1, 2)),    # reverse SQA: fewer queries than KV heads
}

# Named variants = a query source plus a head layout. `sqt` is the static-table model of the SQT
# seed; `srq` its table-free rotary sibling; `idq` and `rndq` the parameter-free controls.
VARIANTS: dict[str, tuple[str, str]] = {
    **{name: ("proj", name) for name in HEAD_LAYOUTS},
    "sqt": ("table", "mha"),
    "srq": ("rotary", "mha"),
    "idq": ("identity", "mha"),    # control: W_q = I, no query parameters
    "rndq": ("random", "mha"),     # control: a frozen random W_q, no query parameters
}

_SPEC_RE = re.compile(
    r"^(?:(?P<query>[a-z]+):)?(?:(?P<name>[a-z]+)|(?P<nq>\d+)/(?P<nkv>\d+))(?:@(?P<window>\d+))?$"
)


def check_int(field_name: str, value, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{field_name}={value!r}: expected an integer >= {minimum}")


def check_number(field_name: str, value, *, positive: bool = False) -> None:
    """A finite number >= 0 (> 0 when `positive`): NaN and infinity never pass."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
            0 <= value < float("inf")) or (positive and value == 0):
        raise ValueError(f"{field_name}={value!r}: expected a finite number "
                         f"{'> 0' if positive else '>= 0'}")


@dataclass(frozen=True)
class LayerSpec:
    """One attention layer: where its queries come from, its head counts, an optional window.

    Head counts are absolute; `head_dim` is fixed by the model (d_model // n_heads). One of the two
    counts must divide the other: with more query heads, K/V heads are shared (GQA); with more K/V
    heads (reverse SQA), each query head is broadcast to several K/V heads."""

    n_q_heads: int
    n_kv_heads: int
    query: str = "proj"
    window: int | None = None

    def __post_init__(self):
        check_int("n_q_heads", self.n_q_heads)
        check_int("n_kv_heads", self.n_kv_heads)
        if self.query not in QUERY_SOURCES:
            raise ValueError(f"query={self.query!r}: expected one of {', '.join(QUERY_SOURCES)}")
        big, small = max(self.n_q_heads, self.n_kv_heads), min(self.n_q_heads, self.n_kv_heads)
        if big % small:
            raise ValueError(
                f"n_q_heads={self.n_q_heads}, n_kv_heads={self.n_kv_heads}: one head count must "
                "divide the other")
        if self.window is not None:
            check_int("window", self.window)

    @property
    def n_attn_heads(self) -> int:
        """Heads the attention op computes (and o_proj's input width in heads): the larger count."""
        return max(self.n_q_heads, self.n_kv_heads)

    @property
    def name(self) -> str:
        """Canonical string, parseable by `parse_layer`: `query:nq/nkv[@window]`."""
        s = f"{self.query}:{self.n_q_heads}/{self.n_kv_heads}"
        return s + (f"@{self.window}" if self.window else "")


def check_query_width(spec: LayerSpec, d_model: int, head_dim: int, *, where: str = "") -> None:
    """An identity query reads its heads straight from the input, so they must fit in it."""
    if spec.query == "identity" and spec.n_q_heads * head_dim > d_model:
        raise ValueError(
            f"{where}{spec.name}: an identity query of {spec.n_q_heads} heads needs "
            f"{spec.n_q_heads} x {head_dim} = {spec.n_q_heads * head_dim} input features but "
            f"d_model={d_model}; use at most {d_model // head_dim} query heads")


def parse_layer(spec: Union[str, LayerSpec], n_heads: int) -> LayerSpec:
    """Turn a variant string into a LayerSpec for a model with `n_heads` nominal heads.

    Accepted forms: a variant name (`mha`, `gqa`, `mqa`, `sqa`, `ssqa`, `xsqa`, `xsmqa`, `lsqa`,
    `rsqa`, `sqt`, `srq`, `idq`, `rndq`); an explicit `nq/nkv`; either prefixed by a query source
    (`table:xsqa` is SQT with xSQA's heads, `rotary:gqa`, `identity:xsqa`, `random:gqa`) and
    suffixed by a sliding window (`sqa@128`)."""
    if isinstance(spec, LayerSpec):
        return spec
    if not isinstance(spec, str):
        raise ValueError(f"layer spec {spec!r}: expected a variant name string or a LayerSpec")
    m = _SPEC_RE.match(spec.strip().lower())
    if not m:
        raise ValueError(
            f"layer spec {spec!r}: expected '[query:]name[@window]' or '[query:]nq/nkv[@window]' "
            f"with name in {', '.join(VARIANTS)} and query in {', '.join(QUERY_SOURCES)}")
    window = int(m["window"]) if m["window"] else None
    if m["nq"]:
        return LayerSpec(int(m["nq"]), int(m["nkv"]), m["query"] or "proj", window)
    name = m["name"]
    if name not in VARIANTS:
        raise ValueError(f"variant {name!r} (in {spec!r}): expected one of {', '.join(VARIANTS)}")
    query, layout = VARIANTS[name]
    if m["query"]:
        if name not in HEAD_LAYOUTS:
            raise ValueError(f"layer spec {spec!r}: a query source prefix needs a head layout "
                             f"({', '.join(HEAD_LAYOUTS)}), not {name!r}")
        query = m["query"]
    counts = []
    for side, frac in zip(("n_q_heads", "n_kv_heads"), HEAD_LAYOUTS[layout]):
        if isinstance(frac, int):
            counts.append(frac)
            continue
        value = frac * n_heads
        if value.denominator != 1 or value < 1:
            raise ValueError(
                f"variant {name!r} with n_heads={n_heads}: {side} would be {frac} x {n_heads} = "
                f"{float(value):g}, not a whole number; use n_heads divisible by "
                f"{frac.denominator} or an explicit 'nq/nkv' spec")
        counts.append(int(value))
    return LayerSpec(counts[0], counts[1], query, window)


def variant_name(spec: LayerSpec, n_heads: int) -> str:
    """A short string `parse_layer` reads back as `spec` for `n_heads` heads: a named variant
    (`sqt`, `gqa@64`), a prefixed layout (`rotary:sqa`), else `nq/nkv`. One K/V head first: with 4
    heads, 4/1 is `mqa` more than it is `gqa`."""
    for layout in sorted(HEAD_LAYOUTS, key=lambda n: not isinstance(HEAD_LAYOUTS[n][1], int)):
        try:
            hit = parse_layer(layout, n_heads)
        except ValueError:
            continue
        if (hit.n_q_heads, hit.n_kv_heads) == (spec.n_q_heads, spec.n_kv_heads):
            named = [v for v, q_l in VARIANTS.items() if q_l == (spec.query, layout)]
            name = named[0] if named else f"{spec.query}:{layout}"
            return name + (f"@{spec.window}" if spec.window else "")
    return spec.name.removeprefix("proj:")


LayersArg = Union[str, LayerSpec, Sequence[Union[str, LayerSpec]]]


def hybrid_layers(n_layers: int, n_sqt_layers: int, first: str = "sqt", rest: str = "mha"):
    """The SQT seed's hybrid: the first N layers `first`, the others `rest`."""
    if isinstance(n_sqt_layers, bool) or not isinstance(n_sqt_layers, int) or not (
            0 <= n_sqt_layers <= n_layers):
        raise ValueError(f"n_sqt_layers={n_sqt_layers!r}: expected an integer in 0..{n_layers}")
    return tuple([first] * n_sqt_layers + [rest] * (n_layers - n_sqt_layers))
