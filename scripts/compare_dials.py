#!/usr/bin/env python
"""Run dials.scale and jaxscale with the same options on the same input and compare.

Usage: compare_dials.py [--keep DIR] FILE.refl FILE.expt [...] [key=value ...]

Prints per data set: relative RMS difference of per-observation inverse scale factors
after removing one overall factor, and after removing an overall factor and an overall B
(g -> g exp(c + B/(2 d^2)), fitted over all data sets together). Both are exactly degenerate
with I_h (the residual I - g I_h does not change if g gains such a factor and I_h loses it),
so only restraints determine them: differences along them rescale merged intensities by
the same smooth factor; an overall factor changes no merging statistic, an overall B
changes no per-shell statistic but re-weights the shells in overall sums (Rmerge, CC1/2). Then CC and relative RMS difference
of merged intensities (after the same two corrections), outlier-flag overlap, error-model a, b of both, CC1/2 / Rmerge / Rpim / I/sigma
of both (computed with the same jaxscale merging code on both outputs), wall time and
peak memory of both and their ratios. Both programs run in temporary directories under
/usr/bin/time -v.
"""
from __future__ import annotations

import argparse
import compileall
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import jaxscale  # noqa: E402,F401
from jaxscale.data import flags as F  # noqa: E402
from jaxscale.io.expt import read_expt  # noqa: E402
from jaxscale.io.refl import read_refl  # noqa: E402
from jaxscale.merge.merging import merge_scaled, scaled_observations  # noqa: E402
from jaxscale.merge.statistics import merging_statistics  # noqa: E402


def timed(cmd: list[str], cwd: Path, env: dict[str, str] | None = None) -> tuple[float, float, int, str, float]:
    """(wall s, peak RSS MB, exit status, output tail, CPU s = user + sys) of a command under
    /usr/bin/time -v."""
    proc = subprocess.run(["/usr/bin/time", "-v", *cmd], cwd=cwd, capture_output=True, text=True,
                          env=None if env is None else {**os.environ, **env})
    err = proc.stderr
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (\S+)", err)
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", err)
    cpu = sum(float(m.group(1)) for m in re.finditer(r"(?:User|System) time \(seconds\): (\S+)", err))
    seconds = 0.0
    if wall:
        for part in wall.group(1).split(":"):
            seconds = seconds * 60 + float(part)
    return seconds, (int(rss.group(1)) / 1024 if rss else float("nan")), proc.returncode, (proc.stdout + err)[-3000:], cpu


def jaxscale_command(files: list[str], opts: list[str]) -> list[str]:
    return [sys.executable, "-m", "jaxscale.cli.main", "scale", *files, *opts]


def cold_cache_env(base: Path, run: int) -> dict[str, str]:
    """A fresh, empty persistent compile cache: every compilation of the run is paid for."""
    cache = base / f"compile_cache_{run}"
    cache.mkdir(parents=True, exist_ok=True)
    return {"JAXSCALE_CACHE_DIR": str(cache)}


def repeated_timings(files: list[str], opts: list[str], base: Path, repeats: int,
                     first: dict[str, tuple[float, float]]) -> dict:
    """Both programs run `repeats` times in all, alternately (the machine's load affects both
    alike), jaxscale with an empty compile cache each time; wall and CPU seconds of every run."""
    runs = {"dials": [first["dials"]], "jax": [first["jax"]]}
    for k in range(1, repeats):
        for who in ("dials", "jax"):
            work = base / f"repeat_{k}_{who}"
            work.mkdir(parents=True, exist_ok=True)
            if who == "dials":
                t, _, rc, tail, cpu = timed(["dials.scale", *files, *opts], work)
            else:
                t, _, rc, tail, cpu = timed(jaxscale_command(files, opts), work, cold_cache_env(base, k))
            if rc != 0:
                raise SystemExit(f"{who} failed in repeat {k}:\n{tail}")
            runs[who].append((t, cpu))
    out = {}
    for who, values in runs.items():
        wall = np.array([v[0] for v in values])
        cpu = np.array([v[1] for v in values])
        out[who] = {"wall_s": wall.tolist(), "cpu_s": cpu.tolist(), "wall_min": float(wall.min()),
                    "wall_median": float(np.median(wall)), "cpu_min": float(cpu.min())}
    out["ratio_jax_over_dials"] = {
        "wall_min": out["jax"]["wall_min"] / out["dials"]["wall_min"],
        "wall_median": out["jax"]["wall_median"] / out["dials"]["wall_median"],
        "cpu_min": out["jax"]["cpu_min"] / out["dials"]["cpu_min"],
    }
    return out


def row_keys(table) -> np.ndarray:
    """Key per row for matching the two outputs: id, hkl, observed centroid (rounded)."""
    hkl = np.asarray(table["miller_index"], dtype=np.int64)
    xyz = np.round(np.asarray(table["xyzobs.px.value"]) * 100).astype(np.int64)
    ids = np.asarray(table["id"], dtype=np.int64)
    return np.stack([ids, hkl[:, 0], hkl[:, 1], hkl[:, 2], xyz[:, 0], xyz[:, 1], xyz[:, 2]], axis=1)


def match_rows(a, b) -> tuple[np.ndarray, np.ndarray]:
    """Indices (ia, ib) of rows present in both tables with the same key."""
    ka, kb = row_keys(a), row_keys(b)
    va = np.ascontiguousarray(ka).view([("", ka.dtype)] * ka.shape[1]).ravel()
    vb = np.ascontiguousarray(kb).view([("", kb.dtype)] * kb.shape[1]).ravel()
    common, ia, ib = np.intersect1d(va, vb, return_indices=True)
    return ia, ib


def error_model(expts) -> list:
    out = []
    for e in expts:
        sm = e.scaling_model or {}
        out.append(sm.get("configuration_parameters", {}).get("error_model_parameters"))
    return out


def summary(stats) -> dict:
    o = stats.overall
    pick = lambda name: float(np.asarray(getattr(o, name)).reshape(-1)[0])  # noqa: E731
    return {k: pick(k) for k in ("cc_half", "r_merge", "r_pim", "i_over_sigma_mean", "n_obs")}


def compare(dials_dir: Path, jax_dir: Path) -> dict:
    td, tj = read_refl(dials_dir / "scaled.refl"), read_refl(jax_dir / "scaled.refl")
    ed, ej = read_expt(dials_dir / "scaled.expt"), read_expt(jax_dir / "scaled.expt")
    ia, ib = match_rows(td, tj)
    fd, fj = np.asarray(td["flags"])[ia], np.asarray(tj["flags"])[ib]
    gd, gj = np.asarray(td["inverse_scale_factor"])[ia], np.asarray(tj["inverse_scale_factor"])[ib]
    ids = np.asarray(td["id"])[ia]
    both_scaled = F.has_any(fd, F.SCALED) & F.has_any(fj, F.SCALED) & (gd > 0) & (gj > 0)
    out = {"n_rows_dials": len(td), "n_rows_jax": len(tj), "n_matched": int(ia.size), "datasets": []}
    log_ratio_all = np.log(gj[both_scaled] / gd[both_scaled])
    overall = float(np.mean(log_ratio_all)) if log_ratio_all.size else 0.0
    # overall scale + overall B: log(gj/gd) ~ c + B s, s = 1/(2 d^2)
    d_obs = np.asarray(td["d"], dtype=np.float64)[ia]
    s_obs = np.where(d_obs > 0, 0.5 / np.where(d_obs > 0, d_obs, 1.0) ** 2, 0.0)
    if log_ratio_all.size > 2:
        design = np.stack([np.ones(log_ratio_all.size), s_obs[both_scaled]], axis=1)
        (c_fit, b_fit), *_ = np.linalg.lstsq(design, log_ratio_all, rcond=None)
    else:
        c_fit, b_fit = overall, 0.0
    out["overall_scale_and_b"] = {"log_scale": float(c_fit), "B": float(b_fit)}

    def rel(lr):
        return (float(np.sqrt(np.mean((np.exp(lr) - 1) ** 2))) if lr.size else float("nan"),
                float(np.max(np.abs(np.exp(lr) - 1))) if lr.size else float("nan"))

    for k in np.unique(ids):
        sel = both_scaled & (ids == k)
        lr = np.log(gj[sel] / gd[sel])
        rms, mx = rel(lr - overall)
        rms_b, mx_b = rel(lr - c_fit - b_fit * s_obs[sel])
        od = F.has_any(fd[ids == k], F.OUTLIER_IN_SCALING)
        oj = F.has_any(fj[ids == k], F.OUTLIER_IN_SCALING)
        out["datasets"].append({
            "id": int(k),
            "g_rel_rms_diff": rms, "g_rel_max_diff": mx,
            "g_rel_rms_diff_scale_b": rms_b, "g_rel_max_diff_scale_b": mx_b,
            "n_compared": int(sel.sum()),
            "outliers_dials": int(od.sum()), "outliers_jax": int(oj.sum()), "outliers_both": int((od & oj).sum()),
        })
    # merged intensities (same merging code on both outputs)
    od_obs = scaled_observations(td, ed)
    oj_obs = scaled_observations(tj, ej)
    md, mj = merge_scaled(od_obs), merge_scaled(oj_obs)
    kd = [tuple(r) for r in md.miller]
    pos = {h: i for i, h in enumerate(kd)}
    pairs = np.array([(pos[tuple(h)], j) for j, h in enumerate(mj.miller) if tuple(h) in pos])
    s_h = 0.5 * np.bincount(md.group_id, od_obs.d_star_sq) / np.maximum(np.bincount(md.group_id), 1)
    i_d = md.intensity[pairs[:, 0]]
    i_j = mj.intensity[pairs[:, 1]] * np.exp(overall)
    i_jb = mj.intensity[pairs[:, 1]] * np.exp(c_fit + b_fit * s_h[pairs[:, 0]])
    norm = np.sqrt(np.mean(i_d**2))
    out["merged"] = {
        "n_common": int(len(pairs)), "n_dials": len(md), "n_jax": len(mj),
        "cc": float(np.corrcoef(i_d, i_j)[0, 1]),
        "rel_rms_diff": float(np.sqrt(np.mean((i_j - i_d) ** 2)) / norm),
        "cc_scale_b": float(np.corrcoef(i_d, i_jb)[0, 1]),
        "rel_rms_diff_scale_b": float(np.sqrt(np.mean((i_jb - i_d) ** 2)) / norm),
        "overall_factor_jax_over_dials": float(np.exp(overall)),
    }
    out["error_model"] = {"dials": error_model(ed), "jax": error_model(ej)}
    out["stats"] = {"dials": summary(merging_statistics(od_obs, anomalous=False)),
                    "jax": summary(merging_statistics(oj_obs, anomalous=False))}
    return out


def markdown(result: dict) -> str:
    """The comparison as a markdown table (DIALS | jaxscale | agreement), for docs/dials_comparison.md."""
    pct = lambda v: f"{100 * v:.4f} %"  # noqa: E731
    rows = [("quantity", "DIALS 3.12", "jaxscale", "agreement")]
    for d in result["datasets"]:
        rows.append((f"g, data set {d['id']} (n={d['n_compared']})", "", "",
                     f"rel. RMS {pct(d['g_rel_rms_diff'])} (max {pct(d['g_rel_max_diff'])}); "
                     f"scale+B removed {pct(d['g_rel_rms_diff_scale_b'])} (max {pct(d['g_rel_max_diff_scale_b'])})"))
        rows.append((f"outliers, data set {d['id']}", str(d["outliers_dials"]), str(d["outliers_jax"]),
                     f"{d['outliers_both']} in both"))
    sb = result["overall_scale_and_b"]
    rows.append(("overall factor / B (jaxscale vs DIALS)", "", "",
                 f"{np.exp(sb['log_scale']):.4f} / {sb['B']:.4f} A^2"))
    m = result["merged"]
    rows.append((f"merged I ({m['n_common']} common)", str(m["n_dials"]), str(m["n_jax"]),
                 f"CC {m['cc']:.6f}, rel. RMS {pct(m['rel_rms_diff'])}; scale+B removed: CC {m['cc_scale_b']:.6f}, "
                 f"rel. RMS {pct(m['rel_rms_diff_scale_b'])}"))
    emd, emj = result["error_model"]["dials"][0], result["error_model"]["jax"][0]
    if emd and emj:
        rows.append(("error model a", f"{emd[0]:.5f}", f"{emj[0]:.5f}", f"{100 * (emj[0] / emd[0] - 1):+.3f} %"))
        rows.append(("error model b", f"{emd[1]:.5f}", f"{emj[1]:.5f}", ""))
    sd, sj = result["stats"]["dials"], result["stats"]["jax"]
    for key, label, fmt in (("cc_half", "CC1/2", "{:.4f}"), ("r_merge", "Rmerge", "{:.4f}"), ("r_pim", "Rpim", "{:.4f}"),
                            ("i_over_sigma_mean", "I/sigma", "{:.2f}"), ("n_obs", "n_obs", "{:.0f}")):
        rows.append((label, fmt.format(sd[key]), fmt.format(sj[key]), ""))
    t, r = result["time_s"], result["peak_rss_mb"]
    rows.append(("wall time", f"{t['dials']:.1f} s", f"{t['jax']:.1f} s", f"ratio {t['ratio_jax_over_dials']:.2f}"))
    rows.append(("peak RSS", f"{r['dials']:.0f} MB", f"{r['jax']:.0f} MB", f"ratio {r['ratio_jax_over_dials']:.2f}"))
    lines = ["| " + " | ".join(rows[0]) + " |", "|---|---|---|---|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows[1:]]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("args", nargs="*")
    ap.add_argument("--markdown", action="store_true", help="also print the comparison as a markdown table")
    ap.add_argument("--markdown-from", nargs="+", metavar="JSON",
                    help="only print the markdown tables of comparisons stored with --json")
    ap.add_argument("--keep", help="directory to keep both runs in (default: a temporary directory)")
    ap.add_argument("--json", help="write the comparison as JSON here")
    ap.add_argument("--dials-dir", help="reuse an existing dials.scale run (scaled.refl/.expt) instead of running it")
    ap.add_argument("--jax-dir", help="reuse an existing jaxscale run (scaled.refl/.expt) instead of running it")
    ap.add_argument("--repeats", type=int, default=1,
                    help="run both programs this many times, alternately, and report min/median wall and CPU "
                         "time (jaxscale always with an empty compile cache: compilation included)")
    ns = ap.parse_args()
    if ns.markdown_from:
        for path in ns.markdown_from:
            print(f"{path}:\n\n{markdown(json.loads(Path(path).read_text()))}\n")
        return 0
    if not ns.args:
        ap.error("input files are required")
    files = [str(Path(a).resolve()) for a in ns.args if "=" not in a]
    opts = [a for a in ns.args if "=" in a]
    # as an installed package is: byte-compiled once (under PYTHONDONTWRITEBYTECODE a source
    # checkout would otherwise recompile every edited module on every run, ~0.1 s)
    compileall.compile_dir(str(REPO / "jaxscale"), quiet=1)
    base = Path(ns.keep) if ns.keep else Path(tempfile.mkdtemp(prefix="compare_dials_"))
    dials_dir, jax_dir = base / "dials", base / "jaxscale"
    dials_dir.mkdir(parents=True, exist_ok=True)
    jax_dir.mkdir(parents=True, exist_ok=True)
    if ns.dials_dir:
        dials_dir = Path(ns.dials_dir)
        t_d, m_d, rc_d, tail_d, c_d = float("nan"), float("nan"), 0, "", float("nan")
    else:
        t_d, m_d, rc_d, tail_d, c_d = timed(["dials.scale", *files, *opts], dials_dir)
    if rc_d != 0:
        print(tail_d)
        print(f"dials.scale failed with status {rc_d}")
        return 1
    if ns.jax_dir:
        jax_dir = Path(ns.jax_dir)
        t_j, m_j, rc_j, tail_j, c_j = float("nan"), float("nan"), 0, "", float("nan")
    else:
        t_j, m_j, rc_j, tail_j, c_j = timed(jaxscale_command(files, opts), jax_dir, cold_cache_env(base, 0))
    if rc_j != 0:
        print(tail_j)
        print(f"jaxscale failed with status {rc_j}")
        return 1
    result = compare(dials_dir, jax_dir)
    result["time_s"] = {"dials": t_d, "jax": t_j, "ratio_jax_over_dials": t_j / t_d if t_d else float("nan")}
    if ns.repeats > 1 and not (ns.dials_dir or ns.jax_dir):
        result["repeated_time_s"] = repeated_timings(files, opts, base, ns.repeats,
                                                     {"dials": (t_d, c_d), "jax": (t_j, c_j)})
    result["peak_rss_mb"] = {"dials": m_d, "jax": m_j, "ratio_jax_over_dials": m_j / m_d if m_d else float("nan")}
    print(f"inputs: {' '.join(files)} {' '.join(opts)}  (runs in {base})")
    print(f"rows: DIALS {result['n_rows_dials']}, jaxscale {result['n_rows_jax']}, matched {result['n_matched']}")
    sb = result["overall_scale_and_b"]
    print("g = inverse scale factors; 'scale+B' removes an overall factor and an overall B as well "
          f"(fitted: factor {np.exp(sb['log_scale']):.4f}, B {sb['B']:.4f} A^2). Both are exactly degenerate "
          "with I_h: they change no residual (a B re-weights resolution shells in overall statistics).")
    for d in result["datasets"]:
        print(f"  data set {d['id']}: g rel. RMS diff {d['g_rel_rms_diff']:.4%} (max {d['g_rel_max_diff']:.4%}), "
              f"scale+B removed {d['g_rel_rms_diff_scale_b']:.4%} (max {d['g_rel_max_diff_scale_b']:.4%}), "
              f"n={d['n_compared']}; outliers DIALS {d['outliers_dials']}, jaxscale {d['outliers_jax']}, "
              f"both {d['outliers_both']}")
    m = result["merged"]
    print(f"merged I: CC {m['cc']:.6f}, rel. RMS diff {m['rel_rms_diff']:.4%}; scale+B removed: CC "
          f"{m['cc_scale_b']:.6f}, rel. RMS diff {m['rel_rms_diff_scale_b']:.4%} over {m['n_common']} "
          f"(DIALS {m['n_dials']}, jaxscale {m['n_jax']}), overall factor {m['overall_factor_jax_over_dials']:.4f}")
    print(f"error model a, b: DIALS {result['error_model']['dials']}, jaxscale {result['error_model']['jax']}")
    for who in ("dials", "jax"):
        s = result["stats"][who]
        print(f"  {who:6s}: CC1/2 {s['cc_half']:.4f}  Rmerge {s['r_merge']:.4f}  Rpim {s['r_pim']:.4f}  "
              f"I/sigma {s['i_over_sigma_mean']:.2f}  n_obs {int(s['n_obs'])}")
    print(f"wall: DIALS {t_d:.1f} s, jaxscale {t_j:.1f} s (ratio {result['time_s']['ratio_jax_over_dials']:.2f}); "
          f"peak RSS: DIALS {m_d:.0f} MB, jaxscale {m_j:.0f} MB (ratio {result['peak_rss_mb']['ratio_jax_over_dials']:.2f})")
    if "repeated_time_s" in result:
        rt = result["repeated_time_s"]
        r = rt["ratio_jax_over_dials"]
        print(f"{ns.repeats} alternating runs each (jaxscale with an empty compile cache): wall min/median "
              f"DIALS {rt['dials']['wall_min']:.2f}/{rt['dials']['wall_median']:.2f} s, jaxscale "
              f"{rt['jax']['wall_min']:.2f}/{rt['jax']['wall_median']:.2f} s (ratio {r['wall_min']:.3f}/"
              f"{r['wall_median']:.3f}); CPU min DIALS {rt['dials']['cpu_min']:.2f} s, jaxscale "
              f"{rt['jax']['cpu_min']:.2f} s (ratio {r['cpu_min']:.3f})")
    if ns.markdown:
        print(markdown(result))
    if ns.json:
        Path(ns.json).write_text(json.dumps(result, indent=2, default=float))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
