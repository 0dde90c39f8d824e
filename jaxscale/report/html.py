"""One self-contained HTML report (plotly, its JS inlined; no network) from plain data.

Figures are plotly.js figure dicts written as JSON directly (no plotly.py objects: their
validation cost about a second per report); plotly.js and the plotly_white template are
read from the plotly package's data files.

`write_report(path, data)` takes a dict; only "statistics" is required, every other
section is optional and its plots are left out when absent. Shapes (n = observations,
m = unique reflections, B = batches; arrays may be numpy arrays or lists):

    title: str
    statistics: MergingStatistics                       (jaxscale.merge.statistics)
    batches: BatchStatistics | {"batch", "r_merge", "i_over_sigma", "scale"[, "dataset"]}: (B,)
    model: {"datasets": [{"name": str,
                          "scale":  {"rotation_deg": (k,), "value": (k,)},
                          "decay":  {"rotation_deg": (k,), "b": (k,)},
                          "absorption": {"theta_deg": (t,), "phi_deg": (p,), "correction": (t, p)}
                         }, ...]}                         each component optional
    stills: serial path, per-still KB parameters (jaxscale.outputs.serial_report_data), runs of
            consecutive stills aggregated to at most ~1000 points:
            {"n_stills": int, "index": (r,), "n": (r,), "k", "k_sd", "b", "b_sd"[, "k_esd", "b_esd", ...]: (r,),
             "k_histogram", "b_histogram": {"centre": (h,), "count": (h,)}}
            -> k and B vs still index (mean ± sd band), esds, histograms
    combination: {"imid": [str], "rmeas": [float], "cc_half": [float], "chosen": str, "n_test": int}
            -> table of the profile/summation Imid candidates
    error_model: {"a": float, "b": float,
                  "normal_plot": {"expected": (k,), "observed": (k,)},   sorted δ vs normal quantiles
                  "bins": {"i_mean": (k,), "variance_before": (k,), "variance_after": (k,)}}
    outliers: {"x_px": (o,), "y_px": (o,), "image": (o,)[, "dataset": (o,), "n_total": int (o shown of it),
               "image_label": str (x axis of the histogram, default "image")]}
    merged: {"intensity": (m,), "sigma": (m,), "d_star_sq": (m,), "centric": (m,) bool}
            -> Wilson plot, cumulative intensity distribution N(z), <I²>/<I>² vs resolution
    anomalous: {"delta_i_over_sigma": (k,)}  ΔI/σ(ΔI) of Bijvoet pairs -> normal probability
            plot (resolution plots of CCanom / anomalous completeness come from statistics)
    filtering: ΔCC½ scale-and-filter cycles (c cycles; jaxscale.filtering.report_section)
            {"cycles": (c,) int, "cc_half": (c,), "n_removed": (c,), "cumul_percent_removed": (c,),
             "removed": [[str, ...] per cycle], "termination_reason": str,
             "groups": [{"cycle": int, "label": [str] (G,), "delta_cc_half": (G,),
                         "below_cutoff": (G,) bool, "cutoff": float}, ...]}
            -> table per cycle, CC½ per cycle, ΔCC½ per group for each cycle
    cross_validation: work/free statistics (k configurations, the 6 columns of `columns`;
            jaxscale.cross_validation.report_section; a use_free_set run gives k = 1, no sd)
            {"configurations": [str] (k,), "columns": [str] (6,), "mean": (k, 6),
             "sd": (k, 6) | None, "best": (k, 6) bool | None}
            -> work/free table, work and free Rmeas / CC½ per configuration
"""
from __future__ import annotations

import functools
import html as _html
import json
import math
import os
from pathlib import Path

import numpy as np

from jaxscale.io.atomic import atomic_path
from jaxscale.merge.statistics import MergingStatistics

_CSS = """
body{font-family:system-ui,-apple-system,sans-serif;margin:0;background:#f6f7f9;color:#222}
header{background:#24374f;color:#fff;padding:14px 24px}
header h1{margin:0;font-size:22px}
section{background:#fff;margin:16px 24px;padding:12px 18px;border-radius:6px;box-shadow:0 1px 3px #0002}
h2{font-size:18px;margin:6px 0 10px}
.grid{display:grid;grid-template-columns:repeat(auto-fit,minmax(480px,1fr));gap:10px}
.plot{min-height:360px;min-width:0;overflow:hidden}
table{border-collapse:collapse;font-size:13px}
td,th{padding:2px 8px;text-align:right;border-bottom:1px solid #eee}
th{background:#eef1f5}
td:first-child,th:first-child{text-align:left}
"""


Figure = dict  # plotly.js figure {"data": [trace dicts], "layout": dict}
_AXIS_PREFIXES = ("xaxis", "yaxis")


def _a(x) -> np.ndarray:
    return np.asarray(x, dtype=float)


def _titled(d: dict | None) -> dict | None:
    """A plotly property dict with a plain-string title given as {"text": title}."""
    if d is None or not isinstance(d.get("title"), str):
        return d
    return {**d, "title": {"text": d["title"]}}


def _trace(kind: str, **props) -> dict:
    """A plotly.js trace dict of type `kind` (None-valued properties left out)."""
    out = {"type": kind}
    for k, v in props.items():
        if v is not None:
            out[k] = _titled(v) if k == "colorbar" else v
    return out


def _fig(traces, title, xtitle, ytitle, **layout) -> Figure:
    """Figure with the report's common layout; `axis_prop=` keys set axis properties (as
    plotly.py's magic underscores), dict values with a string title get {"text": title}."""
    lay = {"title": {"text": title}, "xaxis": {"title": {"text": xtitle}}, "yaxis": {"title": {"text": ytitle}},
           "margin": {"l": 60, "r": 20, "t": 50, "b": 50}, "height": 360, "autosize": True,
           "legend": {"orientation": "h", "y": -0.2}}
    for key, value in layout.items():
        axis, _, prop = key.partition("_")
        if axis in _AXIS_PREFIXES and prop:
            lay[axis][prop] = value
        else:
            lay[key] = _titled(value) if isinstance(value, dict) else value
    return {"data": list(traces), "layout": lay}


def _resolution_axis(fig: Figure, d_star_sq: np.ndarray) -> Figure:
    """Ticks at d*² positions labelled with d (Å)."""
    ticks = np.linspace(d_star_sq.min(), d_star_sq.max(), 6)
    fig["layout"]["xaxis"].update(tickvals=ticks.tolist(),
                                  ticktext=["%.2f" % (1 / np.sqrt(t)) if t > 0 else "∞" for t in ticks],
                                  title={"text": "Resolution (Å)"})
    return fig


def _plain(obj):
    """JSON-ready copy: arrays to lists, non-finite floats to null (as plotly.py writes them)."""
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, np.ndarray):
        if obj.dtype.kind == "f":
            return [v if math.isfinite(v) else None for v in obj.ravel().tolist()] if obj.ndim <= 1 else \
                [_plain(row) for row in obj]
        return obj.tolist()
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def _script_json(obj) -> str:
    """JSON safe inside a <script> element."""
    return json.dumps(_plain(obj), separators=(",", ":")).replace("</", "<\\/")


def _plotly_data(name: str) -> Path:
    """A file of the plotly package data, found without importing plotly (~10 ms)."""
    import importlib.util

    return Path(importlib.util.find_spec("plotly").submodule_search_locations[0]) / "package_data" / name


@functools.lru_cache(maxsize=1)
def _plotly_template() -> str:
    """The plotly_white template as compact JSON, safe inside a <script> element."""
    template = _plotly_data("templates/plotly_white.json").read_text(encoding="utf-8")
    return json.dumps(json.loads(template), separators=(",", ":")).replace("</", "<\\/")


def _plot_div(fig: Figure, div_id: str) -> str:
    """A div drawn by Plotly.newPlot with the shared template (as plotly.py's to_html)."""
    return (f'<div style="height:360px; width:100%;"><div id="{div_id}" class="plotly-graph-div" '
            'style="height:100%; width:100%;"></div><script>window.PLOTLYENV=window.PLOTLYENV || {};'
            f'if (document.getElementById("{div_id}")) {{Plotly.newPlot("{div_id}",{_script_json(fig["data"])},'
            f'Object.assign({{template:window.JAXSCALE_TEMPLATE}},{_script_json(fig["layout"])}),'
            '{"responsive":true})};</script></div>')


def _resolution_figures(st: MergingStatistics) -> list[Figure]:
    b = st.bins
    x = 0.5 * (st.d_star_sq_limits[:-1] + st.d_star_sq_limits[1:])
    figs = []
    cc = [_trace("scatter", x=x, y=b.cc_half, name="CC½", mode="lines+markers"),
          _trace("scatter", x=x, y=b.cc_half_critical, name="CC½ critical (p=0.01)", mode="lines",
                     line=dict(dash="dot"))]
    if np.any(np.isfinite(b.cc_anom)):
        cc.append(_trace("scatter", x=x, y=b.cc_anom, name="CCanom", mode="lines+markers"))
    figs.append(_fig(cc, "CC½ vs resolution", "", "CC"))
    figs.append(_fig([_trace("scatter", x=x, y=b.i_over_sigma_mean, name="⟨I/σ⟩", mode="lines+markers")],
                     "⟨I/σ(I)⟩ vs resolution", "", "⟨I/σ⟩"))
    figs.append(_fig([_trace("scatter", x=x, y=getattr(b, k), name=n, mode="lines+markers")
                      for k, n in (("r_merge", "Rmerge"), ("r_meas", "Rmeas"), ("r_pim", "Rpim"))],
                     "R-factors vs resolution", "", "R"))
    comp = [_trace("scatter", x=x, y=100 * b.completeness, name="completeness", mode="lines+markers")]
    if st.anomalous_bins is not None:
        comp.append(_trace("scatter", x=x, y=100 * st.anomalous_bins.anom_completeness,
                               name="anomalous completeness", mode="lines+markers"))
    figs.append(_fig(comp, "Completeness vs resolution", "", "%"))
    mult = [_trace("scatter", x=x, y=b.multiplicity, name="multiplicity", mode="lines+markers")]
    if st.anomalous_bins is not None:
        mult.append(_trace("scatter", x=x, y=st.anomalous_bins.multiplicity, name="anomalous multiplicity",
                               mode="lines+markers"))
    figs.append(_fig(mult, "Multiplicity vs resolution", "", "multiplicity"))
    figs.append(_fig([_trace("scatter", x=x, y=b.i_mean, name="⟨I⟩", mode="lines+markers")],
                     "Wilson plot (⟨I⟩ per bin)", "", "⟨I⟩", yaxis_type="log"))
    return [_resolution_axis(f, x) for f in figs]


def _batch_figures(bt) -> list[Figure]:
    get = (lambda k: getattr(bt, k)) if not isinstance(bt, dict) else bt.get
    batch = _a(get("batch"))
    runs = np.asarray(bt.get("n", [1]) if isinstance(bt, dict) else [1])  # serial: runs of batches averaged
    per = f" (mean of {int(runs.max())} batches per point)" if runs.size and runs.max() > 1 else ""
    figs = [
        _fig([_trace("scatter", x=batch, y=_a(get("scale")), name="⟨g⟩", mode="markers", marker=dict(size=3)),
              _trace("scatter", x=batch, y=_a(get("r_merge")), name="Rmerge", mode="markers", marker=dict(size=3),
                         yaxis="y2")],
             "Scale and Rmerge vs batch" + per, "batch", "mean inverse scale",
             yaxis2=dict(title="Rmerge", overlaying="y", side="right")),
        _fig([_trace("scatter", x=batch, y=_a(get("i_over_sigma")), name="⟨I/σ⟩", mode="markers", marker=dict(size=3))],
             "⟨I/σ⟩ vs batch" + per, "batch", "⟨I/σ⟩"),
    ]
    return figs


def _band_traces(x, mean, sd, name: str) -> list[dict]:
    """Mean line with a ±1 sd band (the band only where sd > 0 somewhere)."""
    traces = []
    if np.any(sd > 0):
        traces += [_trace("scatter", x=x, y=mean + sd, mode="lines", line=dict(width=0), showlegend=False,
                          hoverinfo="skip"),
                   _trace("scatter", x=x, y=mean - sd, mode="lines", line=dict(width=0), fill="tonexty",
                          fillcolor="rgba(44,127,184,0.25)", name="±1 sd within the run", hoverinfo="skip")]
    traces.append(_trace("scatter", x=x, y=mean, mode="lines" if x.size > 200 else "lines+markers", name=name,
                         line=dict(color="#2c7fb8")))
    return traces


def _stills_figures(st: dict) -> list[Figure]:
    """Per-still KB parameters (serial path): k and B vs still index (runs of consecutive stills
    averaged when there are many) and their histograms."""
    x = _a(st["index"])
    n = np.asarray(st["n"])
    per = f" (mean of {int(n.max())} consecutive stills per point)" if n.size and n.max() > 1 else ""
    figs = [_fig(_band_traces(x, _a(st["k"]), _a(st["k_sd"]), "k"), "Scale k per still" + per, "still index",
                 "k"),
            _fig(_band_traces(x, _a(st["b"]), _a(st["b_sd"]), "B"), "B per still" + per, "still index", "B (Å²)")]
    if "k_esd" in st:
        figs.append(_fig([_trace("scatter", x=x, y=_a(st["k_esd"]) / np.where(_a(st["k"]) != 0, _a(st["k"]), np.nan),
                                 mode="lines", name="σ(k)/k"),
                          _trace("scatter", x=x, y=_a(st["b_esd"]), mode="lines", name="σ(B)", yaxis="y2")],
                         "Parameter esds per still" + per, "still index", "σ(k)/k",
                         yaxis2=dict(title="σ(B) (Å²)", overlaying="y", side="right")))
    for key, label in (("k_histogram", "k"), ("b_histogram", "B (Å²)")):
        h = st.get(key)
        if h is not None and len(h["centre"]):
            figs.append(_fig([_trace("bar", x=_a(h["centre"]), y=_a(h["count"]), name=label)],
                             f"Distribution of {label.split()[0]} over {int(st.get('n_stills', 0))} stills", label,
                             "stills"))
    return figs


def _combination_html(cb: dict) -> str:
    rows = "".join(f"<tr><td>{_html.escape(str(name))}</td><td>{float(r):.5f}</td><td>{float(c):.5f}</td></tr>"
                   for name, r, c in zip(cb["imid"], cb["rmeas"], cb["cc_half"]))
    return (f"<table><tr><th>Imid</th><th>Rmeas</th><th>CC½</th></tr>{rows}</table>"
            f"<p>{int(cb.get('n_test', 0))} test reflections; chosen: {_html.escape(str(cb['chosen']))}</p>")


def _model_figures(model: dict) -> list[Figure]:
    figs = []
    sets = model.get("datasets", [])
    scale = [_trace("scatter", x=_a(d["scale"]["rotation_deg"]), y=_a(d["scale"]["value"]), name=d.get("name", str(i)),
                        mode="lines") for i, d in enumerate(sets) if d.get("scale")]
    if scale:
        figs.append(_fig(scale, "Scale component vs rotation", "rotation (°)", "scale"))
    decay = [_trace("scatter", x=_a(d["decay"]["rotation_deg"]), y=_a(d["decay"]["b"]), name=d.get("name", str(i)),
                        mode="lines") for i, d in enumerate(sets) if d.get("decay")]
    if decay:
        figs.append(_fig(decay, "Relative B vs rotation", "rotation (°)", "B (Å²)"))
    for i, d in enumerate(sets):
        ab = d.get("absorption")
        if ab:
            fig = _fig([_trace("heatmap", x=_a(ab["phi_deg"]), y=_a(ab["theta_deg"]), z=_a(ab["correction"]),
                                   colorscale="Viridis", colorbar=dict(title="correction"))],
                       f"Absorption surface ({d.get('name', i)})", "φ (°)", "θ (°)")
            figs.append(fig)
    return figs


def _error_model_figures(em: dict) -> list[Figure]:
    figs = []
    npp = em.get("normal_plot")
    if npp:
        e, o = _a(npp["expected"]), _a(npp["observed"])
        lim = [float(np.nanmin(e)), float(np.nanmax(e))]
        figs.append(_fig([_trace("scattergl", x=e, y=o, mode="markers", marker=dict(size=3), name="δ"),
                          _trace("scatter", x=lim, y=lim, mode="lines", name="y = x", line=dict(dash="dot"))],
                         "Normal probability plot of normalised deviations "
                         f"(a = {em.get('a', float('nan')):.4g}, b = {em.get('b', float('nan')):.4g})",
                         "expected quantile", "observed δ"))
    bins = em.get("bins")
    if bins:
        x = _a(bins["i_mean"])
        figs.append(_fig([_trace("scatter", x=x, y=_a(bins["variance_before"]), name="uncorrected", mode="lines+markers"),
                          _trace("scatter", x=x, y=_a(bins["variance_after"]), name="corrected", mode="lines+markers")],
                         "Variance of normalised deviations vs intensity", "⟨I⟩", "variance",
                         xaxis_type="log"))
    return figs


def _outlier_figures(out: dict) -> list[Figure]:
    color = _a(out["dataset"]) if "dataset" in out else None
    marker = dict(size=4, color=color) if color is not None else dict(size=4)
    label = out.get("image_label", "image")
    shown = len(out["x_px"])
    note = f" ({shown} of {int(out['n_total'])} shown)" if int(out.get("n_total", shown)) > shown else ""
    return [
        _fig([_trace("scattergl", x=_a(out["x_px"]), y=_a(out["y_px"]), mode="markers", marker=marker, name="outliers")],
             "Outliers on the detector" + note, "x (px)", "y (px)", yaxis_autorange="reversed"),
        _fig([_trace("histogram", x=_a(out["image"]), nbinsx=100, name="outliers")],
             f"Outliers vs {label}" + note, label, "count"),
    ]


def _merged_figures(mg: dict, n_bins: int = 20) -> list[Figure]:
    I, ds2, centric = _a(mg["intensity"]), _a(mg["d_star_sq"]), np.asarray(mg["centric"], bool)
    edges = np.linspace(ds2.min(), ds2.max() * (1 + 1e-9), n_bins + 1)
    b = np.clip(np.searchsorted(edges, ds2, side="right") - 1, 0, n_bins - 1)
    cnt = np.maximum(np.bincount(b, minlength=n_bins), 1)
    mean = np.bincount(b, I, minlength=n_bins) / cnt
    second = np.bincount(b, I * I, minlength=n_bins) / cnt / np.where(mean != 0, mean**2, np.nan)
    x = 0.5 * (edges[:-1] + edges[1:])
    z = I / mean[b]
    zgrid = np.linspace(0, 1, 21)
    traces = []
    for name, sel in (("acentric", ~centric), ("centric", centric)):
        if sel.any():
            traces.append(_trace("scatter", x=zgrid, y=(z[sel][None, :] <= zgrid[:, None]).mean(axis=1),
                                     name=f"{name} observed", mode="lines+markers"))
    traces.append(_trace("scatter", x=zgrid, y=1 - np.exp(-zgrid), name="acentric theory", line=dict(dash="dot")))
    from math import erf, sqrt
    traces.append(_trace("scatter", x=zgrid, y=[erf(sqrt(v / 2)) for v in zgrid], name="centric theory",
                             line=dict(dash="dot")))
    return [
        _resolution_axis(_fig([_trace("scatter", x=x, y=np.log(np.where(mean > 0, mean, np.nan)), mode="lines+markers",
                                          name="ln ⟨I⟩")], "Wilson plot", "", "ln ⟨I⟩"), x),
        _fig(traces, "Cumulative intensity distribution N(z)", "z = I/⟨I⟩", "N(z)"),
        _resolution_axis(_fig([_trace("scatter", x=x, y=second, mode="lines+markers", name="⟨I²⟩/⟨I⟩²"),
                               _trace("scatter", x=[x[0], x[-1]], y=[2, 2], mode="lines", name="acentric untwinned",
                                          line=dict(dash="dot"))],
                              "Second moment of intensities", "", "⟨I²⟩/⟨I⟩²"), x),
    ]


def _anomalous_figures(st: MergingStatistics, an: dict | None) -> list[Figure]:
    figs = []
    if st.anomalous_bins is not None:
        x = 0.5 * (st.d_star_sq_limits[:-1] + st.d_star_sq_limits[1:])
        a = st.anomalous_bins
        figs.append(_resolution_axis(_fig(
            [_trace("scatter", x=x, y=st.bins.cc_anom, name="CCanom", mode="lines+markers"),
             _trace("scatter", x=x, y=st.bins.cc_anom_critical, name="critical (p=0.01)", mode="lines",
                        line=dict(dash="dot")),
             _trace("scatter", x=x, y=a.anom_signal, name="dF/F", mode="lines+markers"),
             _trace("scatter", x=x, y=a.delta_i_over_sigma, name="dI/σ(dI)", mode="lines+markers")],
            "Anomalous signal vs resolution", "", "value"), x))
    if an and "delta_i_over_sigma" in an:
        y = np.sort(_a(an["delta_i_over_sigma"]))
        n = y.shape[0]
        from statistics import NormalDist
        q = np.array([NormalDist().inv_cdf((i + 0.5) / n) for i in range(n)]) if n else np.zeros(0)
        figs.append(_fig([_trace("scattergl", x=q, y=y, mode="markers", marker=dict(size=3), name="ΔI/σ(ΔI)"),
                          _trace("scatter", x=[-3, 3], y=[-3, 3], mode="lines", name="y = x", line=dict(dash="dot"))],
                         "Anomalous normal probability plot", "expected quantile", "ΔI/σ(ΔI)"))
    return figs


def _filtering_section(fl: dict) -> tuple[list[Figure], str]:
    """ΔCC½ filtering: a table of the cycles, CC½ per cycle, ΔCC½ per group per cycle."""
    cycles = [int(c) for c in fl["cycles"]]
    rows = []
    for i, c in enumerate(cycles):  # a few cycles
        removed = ", ".join(fl["removed"][i]) if fl.get("removed") else ""
        rows.append(f"<tr><td>{c}</td><td>{float(fl['cc_half'][i]):.5f}</td><td>{int(fl['n_removed'][i])}</td>"
                    f"<td>{float(fl['cumul_percent_removed'][i]):.3f}</td><td>{_html.escape(removed)}</td></tr>")
    head = "".join(f"<th>{h}</th>" for h in ("cycle", "CC½", "reflections removed", "cumulative % removed",
                                              "removed"))
    text = (f"<table><tr>{head}</tr>{''.join(rows)}</table>"
            f"<p>Termination reason: {_html.escape(str(fl.get('termination_reason', '')))}</p>")
    figs = [_fig([_trace("scatter", x=cycles, y=_a(fl["cc_half"]), name="CC½", mode="lines+markers"),
                  _trace("scatter", x=cycles, y=_a(fl["cumul_percent_removed"]), name="cumulative % removed",
                             mode="lines+markers", yaxis="y2")],
                 "CC½ per cycle", "cycle", "CC½", yaxis2=dict(title="% removed", overlaying="y", side="right"))]
    for g in fl.get("groups", []):  # one plot per cycle
        labels = list(g["label"])
        if not labels:
            continue
        below = np.asarray(g["below_cutoff"], dtype=bool)
        figs.append(_fig([_trace("bar", x=labels, y=_a(g["delta_cc_half"]), name="ΔCC½",
                                 marker=dict(color=np.where(below, "#c0392b", "#2c7fb8").tolist())),
                          _trace("scatter", x=[labels[0], labels[-1]], y=[float(g["cutoff"])] * 2, mode="lines",
                                     name="cutoff", line=dict(dash="dot"))],
                         f"ΔCC½ per group (cycle {int(g['cycle'])})", "group", "ΔCC½"))
    return figs, text


def _cross_validation_section(cv: dict) -> tuple[list[Figure], str]:
    """Work/free table (mean, sd, best marked *) and work vs free Rmeas and CC½ per configuration."""
    names = list(cv["configurations"])
    columns = list(cv["columns"])
    mean = np.atleast_2d(_a(cv["mean"]))
    sd = None if cv.get("sd") is None else np.atleast_2d(_a(cv["sd"]))
    best = None if cv.get("best") is None else np.atleast_2d(np.asarray(cv["best"], dtype=bool))
    rows = []
    for i, name in enumerate(names):  # a few configurations
        cells = "".join(f"<td>{mean[i, j]:.5f}{'*' if best is not None and best[i, j] else ''}</td>"
                        for j in range(len(columns)))
        rows.append(f"<tr><td>{_html.escape(name)}</td><td>mean</td>{cells}</tr>")
        if sd is not None:
            rows.append("<tr><td></td><td>std dev</td>"
                        + "".join(f"<td>{sd[i, j]:.5f}</td>" for j in range(len(columns))) + "</tr>")
    head = "".join(f"<th>{_html.escape(h)}</th>" for h in ["option", ""] + columns)
    text = f"<table><tr>{head}</tr>{''.join(rows)}</table>"
    col = {c: j for j, c in enumerate(columns)}
    figs = []
    for what in ("Rmeas", "CC1/2"):
        pair = [c for c in (f"work {what}", f"free {what}") if c in col]
        if not pair:
            continue
        traces = []
        for c in pair:
            err = None if sd is None else dict(type="data", array=sd[:, col[c]].tolist())
            traces.append(_trace("bar", x=names, y=mean[:, col[c]], name=c, error_y=err))
        label = what.replace("CC1/2", "CC½")
        figs.append(_fig(traces, f"Work and free {label} per configuration", "configuration", label,
                         barmode="group"))
    return figs, text


def _summary_html(st: MergingStatistics) -> str:
    from jaxscale.report.text import _SUMMARY_ROWS, summary_values

    vals = summary_values(st)
    cols = ["Suggested", "Low", "High", "Overall"] if st.suggested is not None else ["Overall", "Low", "High"]
    rows = []
    for label, fmt, _, _ in _SUMMARY_ROWS:
        if label in vals:
            cells = "".join(f"<td>{(fmt.strip() % v) if v is not None else ''}</td>" for v in vals[label])
            rows.append(f"<tr><td>{_html.escape(label)}</td>{cells}</tr>")
    head = "".join(f"<th>{c}</th>" for c in [""] + cols)
    note = ""
    if st.d_min_cc_half_fit is not None:
        note = f"<p>Resolution where the CC½ tanh fit reaches 0.3: {st.d_min_cc_half_fit:.2f} Å</p>"
    return f"<table><tr>{head}</tr>{''.join(rows)}</table>{note}"


def _bins_html(st: MergingStatistics) -> str:
    names = [("d_max", "%.2f"), ("d_min", "%.2f"), ("n_obs", "%d"), ("n_uniq", "%d"), ("multiplicity", "%.2f"),
             ("completeness", "%.2f"), ("i_mean", "%.1f"), ("i_over_sigma_mean", "%.1f"), ("r_merge", "%.3f"),
             ("r_meas", "%.3f"), ("r_pim", "%.3f"), ("cc_half", "%.3f"), ("cc_anom", "%.3f")]
    head = "".join(f"<th>{n}</th>" for n, _ in names)
    body = []
    for s, idx in [(st.bins, i) for i in range(len(st.bins))] + [(st.overall, 0)]:
        r = s.row(idx)
        r["completeness"] *= 100
        body.append("<tr>" + "".join(f"<td>{f % r[n]}</td>" for n, f in names) + "</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def _page_around_script(data: dict) -> tuple[str, str]:
    """The report page before and after the plotly.js source (module docstring: `data`)."""
    st: MergingStatistics = data["statistics"]
    sections: list[tuple[str, list[Figure], str]] = [
        ("Merging statistics", [], _summary_html(st) + "<h2>By resolution bin</h2>" + _bins_html(st)),
        ("Statistics vs resolution", _resolution_figures(st), ""),
    ]
    if data.get("batches") is not None:
        sections.append(("Statistics vs batch", _batch_figures(data["batches"]), ""))
    if data.get("model"):
        sections.append(("Scaling model", _model_figures(data["model"]), ""))
    if data.get("stills"):
        sections.append(("Scaling model (one KB model per still)", _stills_figures(data["stills"]), ""))
    if data.get("combination"):
        sections.append(("Profile/summation intensity combination", [], _combination_html(data["combination"])))
    if data.get("error_model"):
        sections.append(("Error model", _error_model_figures(data["error_model"]), ""))
    if data.get("outliers"):
        sections.append(("Outliers", _outlier_figures(data["outliers"]), ""))
    if data.get("merged"):
        sections.append(("Intensity distribution", _merged_figures(data["merged"]), ""))
    if st.anomalous_bins is not None or data.get("anomalous"):
        sections.append(("Anomalous signal", _anomalous_figures(st, data.get("anomalous")), ""))
    if data.get("filtering"):
        figs, text = _filtering_section(data["filtering"])
        sections.append(("ΔCC½ filtering", figs, text))
    if data.get("cross_validation"):
        figs, text = _cross_validation_section(data["cross_validation"])
        sections.append(("Cross-validation (work/free)", figs, text))
    parts = []
    n = 0
    for title, figs, extra in sections:
        divs = []
        for fig in figs:
            divs.append(f'<div class="plot">{_plot_div(fig, f"plot{n}")}</div>')
            n += 1
        grid = f'<div class="grid">{"".join(divs)}</div>' if divs else ""
        parts.append(f"<section><h2>{_html.escape(title)}</h2>{extra}{grid}</section>")
    title = _html.escape(data.get("title", "jaxscale report"))
    template = _plotly_template()
    head = ("<!DOCTYPE html><html><head><meta charset='utf-8'>"
            f"<title>{title}</title><style>{_CSS}</style>"
            "<script type='text/javascript'>")
    tail = (f"</script><script>window.JAXSCALE_TEMPLATE={template};</script></head>"
            f"<body><header><h1>{title}</h1></header>{''.join(parts)}"
            f"<script>window.JAXSCALE_N_PLOTS={json.dumps(n)};"
            # plots drawn before the grid settled keep a stale width; refit them once laid out
            "window.addEventListener('load',()=>document.querySelectorAll('.js-plotly-plot')"
            ".forEach(p=>Plotly.Plots.resize(p)));</script></body></html>")
    return head, tail


def build_html(data: dict) -> str:
    """The report page as a string (see the module docstring for `data`)."""
    head, tail = _page_around_script(data)
    return head + _plotly_data("plotly.min.js").read_text(encoding="utf-8") + tail


def write_report(path: str | os.PathLike, data: dict) -> None:
    """Write the self-contained HTML report for `data` (module docstring) atomically: the
    bytes of `build_html(data)` in UTF-8, with the 4.6 MB plotly.js copied file to file
    (neither decoded nor re-encoded: ~20 ms less per report)."""
    head, tail = _page_around_script(data)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f, open(_plotly_data("plotly.min.js"), "rb") as js:
            f.write(head.encode("utf-8"))
            f.flush()
            _copy_file(js, f)
            f.write(tail.encode("utf-8"))


def _copy_file(src, dst) -> None:
    """All of the open file `src` appended to the open file `dst` (in the kernel where it can)."""
    size = os.fstat(src.fileno()).st_size
    offset = 0
    try:
        while offset < size:
            sent = os.sendfile(dst.fileno(), src.fileno(), offset, size - offset)
            if sent == 0:
                break
            offset += sent
    except OSError:  # no sendfile for these files: the rest through Python
        pass
    if offset == size:
        return
    src.seek(offset)
    dst.write(src.read())
