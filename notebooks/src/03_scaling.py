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

SAMPLES, TOKENS, K = 768, 512, 256
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
pivot = plan[~plan["codec"].str.startswith("design note")].pivot(index="model", columns="codec", values="disk_GB")
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
# (pair, head block), so the time scales with pairs × head blocks × k. This is a CPU projection;
# the GPU measurements are in docs/benchmarks.md.

# %%
rate = 0.18 / (100 * 100 * 12 * 48)  # seconds per (pair, head block) at k = 256, measured on CPU
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
# From notebook 01 and `docs/benchmarks.md` (MiniLM, 48 × 48, variance reduction on, fp16):
#
# | k | median relative error | Spearman | 95% coverage | x smaller than full fp16 at Llama-7B |
# | --- | --- | --- | --- | --- |
# | 64 | 0.147 | 0.976 | 0.955 | 7282 |
# | 256 | 0.074 | 0.9945 | 0.951 | 1986 |
# | 1024 | 0.037 | 0.9987 | 0.951 | 508 |
#
# At k = 256 the 768-sample store of Llama-7B needs about 1.7 GB instead of the ≈2.3–3.3 TB of full
# contributions, and its top conflicts can be re-scored exactly with `verify_top`.
