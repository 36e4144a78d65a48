# %% [markdown]
# # Scaling: what 768 samples cost at GPT-2, Llama-7B, 13B and 70B shapes
#
# The planner (`sf.plan`, also `sketchfisher plan`) computes disk bytes and peak device memory for
# every codec from the model shape alone. The first row is the design note's arithmetic
# (≈50 weight matrices × 60 MB fp16 × 768 samples ≈ 2.3 TB); the Exact row is the same idea computed
# for the real attention shapes.

# %%
import os

import matplotlib.pyplot as plt
import pandas as pd

import sketchfisher as sf

SAMPLES, TOKENS, K = 768, 512, 1024  # the default sketch: k = 1024, int4
tables = []
for preset in ("gpt2", "llama-7b", "llama-13b", "llama-70b"):
    t = sf.plan(preset, samples=SAMPLES, tokens=TOKENS, k=K, rank=16)
    t.insert(0, "model", preset)
    tables.append(t)
plan = pd.concat(tables, ignore_index=True)
plan["disk_GB"] = plan["disk_bytes"] / 1e9
plan["peak_device_GB"] = plan["peak_device_bytes"] / 1e9
plan[["model", "codec", "disk_GB", "peak_device_GB", "x_smaller_than_exact"]].round(3)

# %%
bars = plan[~plan["codec"].str.startswith("design note")].assign(  # one colour per codec across models
    codec=lambda t: t["codec"].str.replace(r" \(\d+ channels each\)", "", regex=True)
    .str.replace(": + headers, statistics, pass-1 checkpoint", "", regex=False))  # (short legend labels)
pivot = bars.pivot(index="model", columns="codec", values="disk_GB")
ax = pivot.loc[["gpt2", "llama-7b", "llama-13b", "llama-70b"]].plot.bar(logy=True, figsize=(8, 4.6), rot=0)
ax.legend(title="codec", fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2)  # below the bars
ax.figure.tight_layout()
ax.set_ylabel("disk, GB (log)")
ax.set_title(f"{SAMPLES} samples, {TOKENS} tokens each, sketch k={K}")
plt.show()

# %% [markdown]
# ## Stage 6 time, projected from a measured rate
#
# `benchmarks/stage6.py` measured the sketch engine (k = 256) at 0.18 s for 100 × 100 samples over the
# GPT-2-small layout (576 head-block cells per pair) on the 2-core CPU, i.e. about
# 0.18 / (10⁴ · 576) seconds per (pair, head block). Scoring is one k-length dot product per
# (pair, head block), so the time scales with pairs × head blocks × k: the projection below is for the
# default k = 1024, four times the measured k. This is a CPU projection; the GPU measurements are in
# docs/benchmarks.md (768 × 768 over the 7B layout takes seconds on an H100).

# %%
rate = 0.18 / (100 * 100 * 12 * 48) * K / 256  # seconds per (pair, head block), measured on CPU at k = 256
rows = []
for preset, shape in ((p, sf.planner.Shape.of(p)) for p in ("gpt2", "llama-7b", "llama-13b", "llama-70b")):
    blocks = shape.num_layers * shape.head_blocks_per_layer
    pairs = (SAMPLES // 2) ** 2
    rows.append({"model": preset, "head_blocks": blocks, "pairs (384 x 384)": pairs,
                 "scores": pairs * blocks, "projected_cpu_seconds": pairs * blocks * rate})
pd.DataFrame(rows).round(1)

# %% [markdown]
# ## What the chosen k buys
#
# Accuracy on MiniLM (48 × 48, variance reduction on; fp16 rows centred by the task means, the last row the
# default), measured by `python benchmarks/accuracy_vs_memory.py --kinds sjlt --ks 64,256,1024 --dtypes fp16
# --vr on --centring mean` and, for the default, `... --ks 1024 --dtypes int4 --centring scaled --passes 1.5` (the numbers
# are recorded in docs/benchmarks.md). The last column is computed here by the planner: full fp16
# contributions of a Llama-7B sample over the sketch's bytes.

# %%
accuracy = pd.DataFrame([  # median relative error, Spearman, 95% coverage: the commands above
    (64, "fp16", 0.147, 0.976, 0.955), (256, "fp16", 0.074, 0.9945, 0.951), (1024, "fp16", 0.037, 0.9987, 0.951),
    (1024, "int4", 0.031, 0.999, 0.959)], columns=["k", "storage", "median_rel_error", "spearman", "coverage_95"])


def x_smaller(k: int, dtype: str) -> float:
    t = sf.plan("llama-7b", samples=SAMPLES, tokens=TOKENS, k=k, sketch_dtype=dtype)
    return float(t.loc[t["codec"] == f"Sketch(k={k}, {dtype})", "x_smaller_than_exact"].iloc[0])


accuracy["x_smaller_than_full_fp16_llama7b"] = [round(x_smaller(k, d)) for k, d in zip(accuracy.k, accuracy.storage)]
accuracy.loc[3, "storage"] = "int4, scaled centring (sf.Sketch())"
accuracy

# %% [markdown]
# With the default sketch the 768 samples' sketches of Llama-7B take about 1.7 GB (the table above) instead
# of the ≈2.3–3.3 TB of full contributions, and the top conflicts can be re-scored exactly with `verify_top`.
# A store also keeps the pass-1 statistics, for resumption and exact re-scoring: the "store" row.
