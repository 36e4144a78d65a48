"""Device memory of a collection, predicted per phase before anything runs (the check that refuses a run that would
not fit is :mod:`.fit`).

``plan_phases(...)`` predicts the peak device memory of each phase of ``sf.analyze`` (pass 1 of
each task, the preparation, pass 2, scoring) for the settings actually used: the statistics the
variant/normaliser/codec keep (:func:`sketchfisher.collect.needed_statistics`) and their precision,
the batch, and the number of devices the layers are spread over. Its terms:

* weights: parameters × bytes per parameter (bf16: 2), split over the devices;
* statistics: kept quantities × collected parameters × 4 (fp32) or 8 (fp64) bytes, the plain sums (Σ|g|, Σg, the
  half sum) in 2 (bf16, stochastically rounded) where the statistics are fp32;
* preparations (pass 2 of sketches): task A's weight w_a in fp32 and, with variance reduction, the
  balance w_b and the two centres, in one byte where the statistics are fp32 (else fp32); task B's single pass
  holds no w_a (it is built again after the pass); the statistics have then been released; the conflict test's
  weights in one byte;
* capture: the factors of every hooked projection, B·T·Σ(in + out) numbers per layer, in the model's dtype
  where it is bf16/fp16 (2 bytes) and in fp32 otherwise;
* activations kept for the backward pass: B·T·(26·hidden + 11·intermediate) bytes per layer for a
  bf16 model with PyTorch's fused attention, plus B·T·vocabulary·10 bytes for the logits and their
  fp32 loss (fitted on Llama-7B and Llama-3-8B shapes on an H200; docs/benchmarks.md compares the
  prediction with every measured run);
* one module's per-sample gradient: 2·B·out·in·4 bytes, or ·2 where it is formed in bf16 (a bf16 model's on a GPU,
  in a sketch collection: ``grad_bytes=2``), and then one buffer per collected module of a layer, B·out·in·2 bytes
  each, that the pass writes every layer's gradient of that module into.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import pandas as pd
import torch

from ..compress import Codec, Sketch, check_codec
from ..compress.base import centres_b_from_a
from ..errors import InputError
from ..fisher.precision import kept_dtypes
from ..layout.registry import _default_group, mlp_spec_for
from ..metric import ScoreConfig
from .plan import PassPlan, pass_plan

PRESETS = {
    "gpt2": dict(num_layers=12, hidden=768, heads=12, kv_heads=12, head_dim=64, intermediate=3072, vocab=50257,
                 mlp_matrices=2),
    "minilm": dict(num_layers=6, hidden=384, heads=12, kv_heads=12, head_dim=32, intermediate=1536, vocab=30522,
                   mlp_matrices=2),
    "llama-7b": dict(num_layers=32, hidden=4096, heads=32, kv_heads=32, head_dim=128, intermediate=11008, vocab=32000),
    "llama3-8b": dict(num_layers=32, hidden=4096, heads=32, kv_heads=8, head_dim=128, intermediate=14336,
                      vocab=128256),
    "llama-13b": dict(num_layers=40, hidden=5120, heads=40, kv_heads=40, head_dim=128, intermediate=13824,
                      vocab=32000),
    "llama-70b": dict(num_layers=80, hidden=8192, heads=64, kv_heads=8, head_dim=128, intermediate=28672,
                      vocab=32000),
}
TB = 1e12
GiB = 2**30
STATS_DTYPES = {4: torch.float32, 8: torch.float64}
"""``stats_bytes`` of the planners: the statistics' dtype (fp32 a GPU's, fp64 a CPU's)."""

ACT_PER_HIDDEN, ACT_PER_INTERMEDIATE, LOGIT_BYTES = 26, 11, 10  # bytes per token and layer / per logit


def _mlp_matrices(config: Any) -> int:
    """3 for a gated MLP, 2 otherwise, from the model type's declared MLP units (3 when none is declared)."""
    spec = mlp_spec_for(getattr(config, "model_type", None))
    return 3 if spec is None or spec.gated else 2


@dataclass(frozen=True)
class Shape:
    num_layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    mlp_matrices: int = 3  # gated MLPs (gate, up, down); 2 for up/down

    @classmethod
    def of(cls, source: Any) -> "Shape":
        if isinstance(source, Shape):
            return source
        if isinstance(source, str):
            if source not in PRESETS:
                raise InputError(f"unknown preset {source!r}; presets: {', '.join(PRESETS)}")
            return cls(**PRESETS[source])
        config = getattr(source, "config", source)
        try:
            heads = int(config.num_attention_heads)
            hidden = int(config.hidden_size)
            return cls(num_layers=int(config.num_hidden_layers), hidden=hidden, heads=heads,
                       kv_heads=int(getattr(config, "num_key_value_heads", None) or heads),
                       head_dim=int(getattr(config, "head_dim", None) or hidden // heads),
                       intermediate=int(getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None)
                                        or 4 * hidden),
                       vocab=int(getattr(config, "vocab_size", 0)), mlp_matrices=_mlp_matrices(config))
        except (AttributeError, TypeError) as exc:
            raise InputError(f"cannot read a model shape from {type(source).__name__}: {exc}") from None

    @property
    def attn_params_per_layer(self) -> int:
        q = self.heads * self.head_dim * self.hidden
        kv = 2 * self.kv_heads * self.head_dim * self.hidden
        return 2 * q + kv  # Q and O, K and V

    @property
    def attn_in_out_per_layer(self) -> int:
        """Σ (in + out) over the Q, K, V, O projections of one layer (the per-token factor width)."""
        qd, kvd = self.heads * self.head_dim, self.kv_heads * self.head_dim
        return (self.hidden + qd) * 2 + (self.hidden + kvd) * 2

    @property
    def head_blocks_per_layer(self) -> int:
        return 2 * self.heads + 2 * self.kv_heads

    @property
    def mlp_block_sizes(self) -> list[int]:
        """The size of every MLP channel-group block at the default group size (each matrix of every layer)."""
        per_unit = self.intermediate // self.mlp_units_per_layer * self.hidden
        return [per_unit] * (self.num_layers * self.mlp_matrices * self.mlp_units_per_layer)

    @property
    def head_block_sizes(self) -> list[int]:
        """The size of every distinct attention head block of the model (Q, K, V, O of every layer)."""
        return [self.head_dim * self.hidden] * (self.num_layers * self.head_blocks_per_layer)

    def footprint(self, units: Any = "heads") -> tuple[list[int], int, int]:
        """``(unit block sizes, collected weight entries, (layer, block) groups)`` of the planned ``units``
        (``"heads"``, ``"mlp"``, ``"all"`` or a tuple): what a collection sketches and keeps statistics of."""
        families = _families(units)
        heads, mlp = "heads" in families, "mlp" in families
        sizes = (self.head_block_sizes if heads else []) + (self.mlp_block_sizes if mlp else [])
        entries = self.num_layers * (self.attn_params_per_layer * heads + self.mlp_params_per_layer * mlp)
        return sizes, entries, self.num_layers * (4 * heads + self.mlp_matrices * mlp)

    def gradient_buffer_entries(self, families: tuple[str, ...]) -> int:
        """Entries of one sample's gradient buffers: one per collected module of a layer (a layer's gradients are
        alive together while its work is recorded or replayed, :mod:`sketchfisher.collect.layers`)."""
        return self.attn_params_per_layer * ("heads" in families) + self.mlp_params_per_layer * ("mlp" in families)

    @property
    def mlp_params_per_layer(self) -> int:
        return self.mlp_matrices * self.hidden * self.intermediate

    @property
    def mlp_units_per_layer(self) -> int:
        """MLP channel units per layer at the default group size (:func:`~sketchfisher.mlp_layout_for`)."""
        return self.intermediate // _default_group(self.intermediate, self.heads)

    @property
    def params(self) -> int:
        mlp = self.mlp_params_per_layer
        return self.num_layers * (self.attn_params_per_layer + mlp) + self.vocab * self.hidden



def plan_phases(source: Any, *, samples: int = 512, tokens: int = 512, batch_size: int = 4, codec: Optional[Codec] = None,
                cfg: Any = None, stats_bytes: int = 4, model_bytes_per_param: int = 2, devices: int = 1,
                passes: Optional[float] = None, plan: Optional[PassPlan] = None, store: bool = False,
                conflicts: bool = True, units: Any = "heads", grad_bytes: int = 4) -> pd.DataFrame:
    """Predicted peak device memory of each step of a collection (busiest device), in bytes and GiB, then of
    scoring. The rows are the pass plan's steps, named as :class:`~sketchfisher.phases.PhaseLog` records them
    (:func:`sketchfisher.collect.plan.pass_plan` for ``codec``, ``cfg`` and ``passes``, or ``plan``; ``store``
    adds a store's final ``writes`` step), and a last row ``scoring``.

    ``samples`` counts both tasks (half each). Each step's peak is what it holds on the device while its
    batches run: the weights, the statistics and preparations still resident, the outputs of earlier steps
    and its own, and for a pass the running terms (capture, activations, one module's per-sample gradient).
    ``units`` (``"heads"``, ``"mlp"``, ``"all"`` or a tuple) are the unit families collected: MLP units add the
    MLP weights to every model-sized term (their statistics, preparations and factors) and their channel-group
    blocks to the per-sample outputs. ``grad_bytes``: the per-sample gradient's bytes per entry, 4 (fp32) or 2 (a
    bf16 model's on a GPU in a sketch collection, which forms it in bf16; fp16 models keep fp32, and bytes per
    parameter cannot tell the two apart, so 4 unless told)."""
    codec = check_codec(Sketch() if codec is None else codec)
    cfg = cfg or ScoreConfig()
    if min(samples, tokens, batch_size, devices) < 1 or stats_bytes not in (4, 8) or grad_bytes not in (2, 4):
        raise InputError(f"samples, tokens, batch_size and devices must be >= 1, stats_bytes 4 or 8 and grad_bytes 2 "
                         f"or 4; got {samples}, {tokens}, {batch_size}, {devices}, {stats_bytes}, {grad_bytes}")
    s = Shape.of(source)
    families = _families(units)
    plan = plan or pass_plan(codec, cfg, passes, means=families != ("heads",), conflicts=conflicts)
    if store and "writes" not in plan.names:
        plan = plan.with_writes()
    terms = _Terms.of(s, codec, plan, samples=samples, tokens=tokens, batch_size=batch_size, stats_bytes=stats_bytes,
                      model_bytes_per_param=model_bytes_per_param, devices=devices, families=families,
                      grad_bytes=grad_bytes)
    rows = terms.simulate(plan)
    df = pd.DataFrame(rows, columns=["phase", "peak_device_bytes"])
    df["peak_GiB"] = df["peak_device_bytes"] / GiB
    return df


@dataclass
class _Terms:
    """The byte counts of one collection that the steps hold (per device)."""

    weights: float
    running: float    # capture, activations and one module's per-sample gradient of a batch in flight
    grad: float       # one module's per-sample gradient in fp32 (scoring re-uses its size as a working set)
    stats: dict       # task -> the task's kept statistics
    rep: float        # a one-pass codec's representations, per task
    sketches: float   # a side codec's stored side vectors, per task
    raw: float        # a single pass's uncentred fp32 side vectors, per task
    prep_tensor: float  # one model-sized fp32 preparation tensor (w_a)
    side_tensor: float  # one model-sized balance or centre (one byte with fp32 statistics)
    variance_reduction: bool
    centre_b_from_a: bool  # task B's single pass is centred by a direction from task A (scaled centring)
    conflict_tensor: float = 0.0  # one model-sized one-byte conflict weight (u), where the conflict test is collected
    centring_copies: float = 0.0  # task A's statistics of two parameters on the device while B is centred

    @classmethod
    def of(cls, s: Shape, codec: Codec, plan: PassPlan, *, samples: int, tokens: int, batch_size: int, stats_bytes: int,
           model_bytes_per_param: int, devices: int, families: tuple[str, ...] = ("heads",), grad_bytes: int = 4
           ) -> "_Terms":
        mlp = "mlp" in families
        sizes, attn, _ = s.footprint(families)  # (attn: the collected weights' entries)
        per_layer = lambda x: x / devices  # noqa: E731  (layer-proportional terms split over the devices)
        tokens_b = batch_size * tokens
        in_out = s.attn_in_out_per_layer * ("heads" in families) + s.mlp_matrices * (s.hidden + s.intermediate) * mlp
        capture = per_layer(tokens_b * s.num_layers * in_out * (2 if model_bytes_per_param == 2 else 4))
        acts = per_layer(tokens_b * s.num_layers * (ACT_PER_HIDDEN * s.hidden + ACT_PER_INTERMEDIATE * s.intermediate))
        acts += tokens_b * s.vocab * LOGIT_BYTES
        largest = max(s.heads * s.head_dim, s.hidden, s.intermediate if mlp else 0) * s.hidden  # (a weight's entries)
        grad32 = 2 * batch_size * largest * 4
        grad = grad32 * grad_bytes / 4
        if grad_bytes == 2:  # (bf16 gradients are written into one buffer per module of a layer, kept through the pass)
            grad = max(grad, batch_size * 2 * s.gradient_buffer_entries(families))
        width = s.num_layers * in_out
        per_task = samples / 2
        rep = sketches = raw = 0.0
        if codec.two_pass:
            sketches = per_layer(codec.bytes_per_sample(sizes, width, tokens) * per_task)
            raw = per_layer(sum(codec.width(n) * 4 + 16 + 4 * getattr(codec, "stores_gamma", False) for n in sizes)
                            * per_task)  # fp32 vectors, ‖·‖² and cross in fp64, γ in fp32
        else:
            rep = per_layer(codec.device_bytes_per_sample(sizes, width, tokens) * per_task)
        return cls(weights=per_layer(s.params * model_bytes_per_param), running=capture + acts + grad, grad=grad32,
                   stats={t: per_layer(sum(attn * running.itemsize for running, _ in kept_dtypes(q, STATS_DTYPES[stats_bytes])))
                          for t, q in plan.statistics.items()},  # (as they accumulate: the plain sums in bf16 on a GPU)
                   rep=rep, sketches=sketches, raw=raw, prep_tensor=per_layer(attn * 4),
                   side_tensor=per_layer(attn * (1 if stats_bytes == 4 else 4)),
                   variance_reduction=bool(codec.variance_reduction),
                   centre_b_from_a=centres_b_from_a(codec, plan.passes),
                   conflict_tensor=per_layer(attn * 1) if "half" in plan.statistics["a"] else 0.0,
                   # (B's centring brings A's Fisher and, for the test, A's Σg back from host memory one parameter
                   # ahead: the current parameter's and the next one's, fisher.host.CopiesAhead)
                   centring_copies=2 * largest * sum(
                       running.itemsize for running, _ in kept_dtypes(
                           [q for q in ("fisher", "sum") if q in plan.statistics["a"]], STATS_DTYPES[stats_bytes])))

    def preparations(self, centre_b: bool) -> float:
        """Both tasks' centres known (two passes per task): w_a, and with variance reduction w_b, x̄' and ȳ'.
        Before task B's single pass: w_b, x̄' (which also centres B where it is centred during its pass), no w_a.
        With the conflict test task B's two weights (ḡ_A·W and A's half mean ·W) and, once B's mean is
        known, task A's (ḡ_B·W), in one byte."""
        if not self.variance_reduction:
            return self.prep_tensor + self.conflict_tensor * (2 + centre_b)
        if centre_b:
            return self.prep_tensor + 3 * self.side_tensor + self.conflict_tensor * 3
        return 2 * self.side_tensor + self.conflict_tensor * 2

    def after_centring(self) -> float:
        """Once task B's single pass is centred: w_a back, w_b and B's two conflict weights gone; x̄', ȳ' and task
        A's conflict weight."""
        return self.prep_tensor + 2 * self.side_tensor + self.conflict_tensor

    def simulate(self, plan: PassPlan) -> list[tuple[str, float]]:
        """``(step name, peak)`` of every step, then ``("scoring", peak)``, walking what each step leaves held."""
        held: dict[str, float] = {}
        rows = []
        for step in plan.steps:
            t, extra = step.task, 0.0
            if step.kind in ("fold", "fold_sketch"):
                held[f"stats {t}"] = self.stats[t]
                if step.kind == "fold" and self.rep:
                    held[f"rep {t}"] = self.rep
                if step.kind == "fold_sketch":  # uncentred until the centring, or kept as they come
                    held[f"raw {t}"] = self.sketches if self.centre_b_from_a else self.raw
                extra = self.running
            elif step.kind == "prepare":
                statistics = sum(v for k, v in held.items() if k.startswith("stats"))
                held = {k: v for k, v in held.items() if not k.startswith("stats")}
                preps = self.preparations(step.centre_b)
                extra = max(statistics, preps) - preps
                held["preps"] = preps
            elif step.kind == "centre":
                extra = (0.0 if self.centre_b_from_a else self.sketches) + self.centring_copies
            elif step.kind == "sketch":
                held[f"sketches {t}"] = self.sketches
                extra = self.running
            rows.append((step.name, self.weights + sum(held.values()) + extra))
            if step.kind == "centre":  # w_a back, w_b gone, ȳ' known; task A's conflict weight is added
                held.pop(f"raw {t}")
                held.pop(f"stats {t}")
                held[f"sketches {t}"] = self.sketches
                held["preps"] = self.after_centring()
        kept = sum(v for k, v in held.items() if k.startswith(("rep", "sketches")))
        rows.append(("scoring", self.weights + kept + self.grad))
        return rows


def layout_units(layout: Any) -> tuple[str, ...]:
    """The planned unit families of a layout (heads and/or MLP channel groups; heads when it has neither)."""
    names = tuple(n for n, _ in layout.families) or (layout.family_name,)
    return tuple(f for f in ("heads", "mlp") if f in names) or ("heads",)


def _families(units: Any) -> tuple[str, ...]:
    """The planned unit families: heads and/or MLP channel groups (other linear layers are not planned)."""
    wanted = ("heads", "mlp") if units == "all" else (units,) if isinstance(units, str) else tuple(units)
    planned = tuple(f for f in ("heads", "mlp") if f in wanted)
    if not planned:
        raise InputError(f"the planner plans units 'heads', 'mlp' or 'all'; got {units!r}")
    return planned


def format_bytes(n: float) -> str:
    """Human units: B, KiB, MiB, GiB, TiB (never scientific notation)."""
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:,.1f} {unit}"
    return f"{n:,.0f} B"
