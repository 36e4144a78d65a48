"""One self-contained, interactive HTML page of a result: the conflict map of every unit family, with each
cell's strongest sample pairs a click away.

``write_report(res, "report.html")`` (or ``res.report(path)``, CLI ``sketchfisher report STORE -o
report.html``; importable as ``sketchfisher.report``) draws, per unit family, the layer × unit map of every block's alignment (the cosine of the two
tasks' mean updates, :meth:`~sketchfisher.InterferenceResult.head_conflicts`) on a diverging scale centred at 0,
with flagged conflicts marked. Hovering a cell shows T, its standard error, the alignment with its interval and
q; clicking it lists the cell's strongest sample pairs (score ± standard error, and the samples' texts where
given). The figures are plotly's, which embeds its own JavaScript, so the page works offline; the only code
of ours on the page is the few lines that fill the pairs table on a click. In a notebook,
:func:`conflict_figure` returns the same figure to show inline.
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from ..errors import InputError


def _plotly():
    try:
        import plotly.graph_objects as go
        from plotly.subplots import make_subplots
    except ImportError:
        raise InputError("the report needs plotly: pip install 'sketchfisher[report]'") from None
    return go, make_subplots


def top_pairs_per_cell(res: Any, k: int = 10) -> dict[tuple[int, int, int], list[tuple[int, int, float, float]]]:
    """For every distinct unit block ``(layer, block position, first unit)``, its ``k`` strongest pairs by the
    variant's conflict sign: ``[(i, j, score, stderr)]``, strongest first (one streaming pass over the scores)."""
    best: dict[tuple[int, int, int], torch.Tensor] = {}  # cell -> rows (i, j, score, stderr), strongest first
    variant = res.cfg.spec
    for layer, b, lo, hi, s, se in res._chunks(expand=False):
        first = res._first_heads(b)
        key = variant.conflict_key(s.double()).nan_to_num(nan=-float("inf"))  # [rows, nB, H_b]
        rows, n_b, heads = key.shape
        flat = key.permute(2, 0, 1).reshape(heads, rows * n_b)
        top = torch.topk(flat, min(k, flat.shape[1]), dim=1)  # [heads, k] per head, in one call
        vals_all = s.permute(2, 0, 1).reshape(heads, -1).gather(1, top.indices).double().cpu()
        errs_all = (torch.zeros_like(vals_all) if se is None
                    else se.permute(2, 0, 1).reshape(heads, -1).gather(1, top.indices).double().cpu())
        for h in range(heads):
            idx = top.indices[h]
            i, j = (idx // n_b + lo).cpu(), (idx % n_b).cpu()
            vals, errs = vals_all[h], errs_all[h]
            cand = torch.stack([i.double(), j.double(), vals, errs], 1)[torch.isfinite(top.values[h]).cpu()]
            cell = (layer, b, first[h])
            if cell in best:
                cand = torch.cat([best[cell], cand])
            best[cell] = cand[torch.argsort(variant.conflict_key(cand[:, 2]), descending=True, stable=True)[:k]]
    return {cell: [(int(r[0]), int(r[1]), float(r[2]), float(r[3])) for r in rows.tolist()]
            for cell, rows in best.items()}


def conflict_figure(table: Any, title: str = ""):
    """The conflict map of one unit family as a plotly figure: per block, layers × units coloured by alignment
    (diverging, centred at 0, limits ±1; blue: the tasks pull apart), hover with T ± stderr, alignment [interval] and q, an ``x`` on
    every flagged conflict. ``table`` is :meth:`~sketchfisher.InterferenceResult.head_conflicts`' table."""
    go, make_subplots = _plotly()
    geometry = table.attrs.get("geometry")
    if geometry is None:
        raise InputError("this conflict table records no geometry (made by an older version?)")
    layers, units, unit, blocks = geometry["layers"], geometry["units"], geometry["unit"], geometry["blocks"]
    fig = make_subplots(rows=1, cols=len(blocks), subplot_titles=list(blocks), shared_yaxes=True,
                        horizontal_spacing=0.02)
    records = table.to_dict("records")
    for col, block in enumerate(blocks, start=1):
        z = [[None] * units for _ in range(layers)]
        text = [[""] * units for _ in range(layers)]
        data = [[None] * units for _ in range(layers)]
        flagged_x, flagged_y = [], []
        for r in records:
            if r["block"] != block:
                continue
            shared = int(r.get("shared_by", 1) or 1)
            for u in range(r[unit], min(units, r[unit] + shared)):
                ok = r["alignment"] == r["alignment"]  # (NaN: a frozen block)
                z[r["layer"]][u] = r["alignment"] if ok else None
                data[r["layer"]][u] = [r["layer"], r[unit], block]
                text[r["layer"]][u] = (
                    f"layer {r['layer']} {unit} {u} {block}" + (f" (K/V shared from {unit} {r[unit]})" if shared > 1 else "")
                    + (f"<br>alignment {r['alignment']:+.3f} [{r['alignment_low']:+.3f}, {r['alignment_high']:+.3f}]"
                       f"<br>T {r['T']:.4g} ± {r['stderr']:.2g}<br>q {r['q_value']:.3g}"
                       + ("<br><b>conflict</b>" if r["conflict"] else "") if ok else "<br>not collected (frozen)"))
                if r["conflict"]:
                    flagged_x.append(u)
                    flagged_y.append(r["layer"])
        fig.add_trace(go.Heatmap(z=z, text=text, customdata=data, hovertemplate="%{text}<extra></extra>",
                                 colorscale="RdBu_r", zmid=0, zmin=-1, zmax=1, showscale=col == len(blocks),
                                 colorbar=dict(title="alignment"), name=block, xgap=1, ygap=1), row=1, col=col)
        fig.add_trace(go.Scatter(x=flagged_x, y=flagged_y, mode="markers", hoverinfo="skip", showlegend=False,
                                 marker=dict(symbol="x", size=7, color="black")), row=1, col=col)
        fig.update_xaxes(title_text=unit, dtick=max(1, units // 16), row=1, col=col)
    fig.update_yaxes(autorange="reversed", dtick=max(1, layers // 16))
    fig.update_yaxes(title_text="layer", row=1, col=1)
    level = table.attrs.get("level", 0.05)
    fig.update_layout(title=(title + "<br>" if title else "") + f"<sub>alignment of the two tasks' mean updates "
                      f"(blue: they pull apart); x: conflict at q ≤ {level:g}; click a cell for its pairs</sub>",
                      height=220 + 16 * layers, margin=dict(l=60, r=20, t=90, b=50))
    return fig


_CLICK = """
(function() {
  var gd = document.getElementById('{plot_id}');
  gd.on('plotly_click', function(ev) {
    var pairs = JSON.parse(document.getElementById('pairs-%(family)s').textContent);
    var out = document.getElementById('cell-%(family)s');
    var p = ev.points[0];
    if (!p.customdata) { return; }
    var key = p.customdata.join('|');
    var rows = pairs[key] || [];
    out.replaceChildren();
    var caption = document.createElement('p');
    caption.textContent = 'layer ' + p.customdata[0] + ', %(unit)s ' + p.customdata[1] + ', block ' + p.customdata[2]
      + ': the ' + rows.length + ' strongest pairs';
    out.appendChild(caption);
    var table = document.createElement('table');
    var head = table.insertRow();
    ['task A sample', 'task B sample', 'score', '± stderr', 'task A text', 'task B text'].forEach(function(h) {
      var th = document.createElement('th'); th.textContent = h; head.appendChild(th); });
    rows.forEach(function(r) {
      var tr = table.insertRow();
      r.forEach(function(v) { tr.insertCell().textContent = v; });
    });
    out.appendChild(table);
  });
})();
"""

_STYLE = """body{font-family:system-ui,sans-serif;margin:24px;max-width:1400px}table{border-collapse:collapse;
font-size:13px}td,th{border:1px solid #ccc;padding:3px 8px;text-align:left;vertical-align:top}
th{background:#f3f3f3}td{max-width:420px;overflow-wrap:anywhere}h2{margin-top:32px}"""


def write_report(res: Any, path: str | Path, *, texts_a: Optional[Sequence[str]] = None,
                 texts_b: Optional[Sequence[str]] = None, title: Optional[str] = None,
                 summary: Optional[dict[str, Any]] = None, top: int = 10, level: float = 0.05) -> Path:
    """Write ``res``'s interactive report to ``path`` (one HTML file, works offline); returns the path.

    ``texts_a``/``texts_b``: the samples' texts, shown beside their pairs (optional). ``summary``: rows of
    ``name: value`` shown above the maps (the CLI passes the store's summary and plan). ``top`` pairs per cell.
    """
    go, _ = _plotly()
    path = Path(path)
    if not isinstance(top, int) or top < 1:
        raise InputError(f"top must be a positive int, got {top!r}")
    for name, texts, n in (("texts_a", texts_a, res.n_a), ("texts_b", texts_b, res.n_b)):
        if texts is not None and len(texts) != n:
            raise InputError(f"{name} has {len(texts)} texts, the result {n} samples")
    head = "<h1>" + html.escape(title or "sketchfisher: where do the two tasks conflict?") + "</h1>"
    rows = {"samples": f"task A {res.n_a}, task B {res.n_b}", "variant": f"{res.cfg.variant} ({res.cfg.spec.formula})",
            **(summary or {})}
    head += "<table>" + "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>"
                                for k, v in rows.items()) + "</table>"
    body, first = [], True
    for family in res.families:
        part = res.units(family)
        table = part.head_conflicts(level=level)
        unit = table.attrs["geometry"]["unit"]
        fig = conflict_figure(table, title=f"{family}: {int(table['conflict'].sum())} of {len(table)} blocks in "
                                           "conflict")
        names = part.layout.block_names
        text = lambda texts, i: "" if texts is None else texts[i]  # noqa: E731
        pairs = {f"{layer}|{u}|{names[b]}": [[i, j, f"{v:.4g}", f"{e:.2g}", text(texts_a, i), text(texts_b, j)]
                                             for i, j, v, e in cell]
                 for (layer, b, u), cell in top_pairs_per_cell(part, top).items()}
        safe = json.dumps(pairs).replace("</", "<\\/")  # (no text can close the script element)
        figure = fig.to_html(full_html=False, include_plotlyjs=first, div_id=f"map-{family}",
                             post_script=_CLICK % {"family": family, "unit": unit})
        first = False
        flagged = table[table["conflict"]].head(20)
        listing = "".join(f"<li>{html.escape(_describe(r, unit))}</li>" for r in flagged.to_dict("records"))
        body.append(f"<h2>{html.escape(family)}</h2>"
                    f"<script type='application/json' id='pairs-{family}'>{safe}</script>{figure}"
                    f"<div id='cell-{family}'><p>Click a cell to list its strongest pairs.</p></div>"
                    f"<h3>Flagged blocks (strongest first)</h3><ul>{listing or '<li>none</li>'}</ul>")
    page = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>sketchfisher report</title>"
            f"<style>{_STYLE}</style></head><body>{head}{''.join(body)}</body></html>")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page, encoding="utf-8")
    return path


def _describe(row: dict, unit: str) -> str:
    from .conflicts import describe

    return describe(row, unit)


__all__ = ["conflict_figure", "top_pairs_per_cell", "write_report"]
