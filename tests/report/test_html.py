"""HTML report: self-contained, loads in headless Chromium without JS errors, every plot drawn."""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from jaxscale.io.expt import read_expt
from jaxscale.io.refl import read_refl
from jaxscale.merge.merging import merge_scaled, scaled_observations
from jaxscale.merge.statistics import batch_statistics, merging_statistics
from jaxscale.report.html import build_html, write_report

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--no-first-run"]


def _report_data(folder: Path) -> dict:
    table, experiments = read_refl(folder / "scaled.refl"), read_expt(folder / "scaled.expt")
    obs = scaled_observations(table, experiments)
    stats = merging_statistics(obs)
    image = np.floor(table["xyzobs.px.value"][obs.rows, 2]).astype(int) + 1
    batches = batch_statistics(obs, image + 1000 * obs.dataset, table["inverse_scale_factor"][obs.rows])
    merged = merge_scaled(obs)
    centric = np.zeros(len(merged), bool)
    centric[merged.group_id] = obs.centric
    ds2 = np.zeros(len(merged))
    ds2[merged.group_id] = obs.d_star_sq
    rot = np.linspace(0, 180, 19)
    theta, phi = np.linspace(0, 180, 10), np.linspace(0, 360, 19)
    rng = np.random.default_rng(0)
    delta = np.sort(rng.normal(size=500))
    from statistics import NormalDist
    expected = np.array([NormalDist().inv_cdf((i + 0.5) / 500) for i in range(500)])
    bad = table["flags"] & np.uint64(1 << 23) != 0
    return {
        "title": "lcys 4 sweeps (DIALS 3.12 reference scaling)",
        "statistics": stats,
        "batches": batches,
        "model": {"datasets": [{"name": f"sweep {i}",
                                "scale": {"rotation_deg": rot, "value": 1 + 0.1 * np.sin(rot / 30 + i)},
                                "decay": {"rotation_deg": rot, "b": -0.5 * rot / 180},
                                "absorption": {"theta_deg": theta, "phi_deg": phi,
                                               "correction": 1 + 0.05 * np.outer(np.sin(np.radians(theta)), np.cos(np.radians(phi)))}}
                               for i in range(2)]},
        "error_model": {"a": 1.3209, "b": 0.02249, "normal_plot": {"expected": expected, "observed": delta},
                        "bins": {"i_mean": [50, 200, 800, 3000, 10000], "variance_before": [3, 3.4, 7.5, 22, 105],
                                 "variance_after": [1.45, 1.5, 1.3, 1.0, 0.8]}},
        "outliers": {"x_px": table["xyzobs.px.value"][bad, 0], "y_px": table["xyzobs.px.value"][bad, 1],
                     "image": table["xyzobs.px.value"][bad, 2], "dataset": table["id"][bad]},
        "merged": {"intensity": merged.intensity, "sigma": merged.sigma, "d_star_sq": ds2, "centric": centric},
        "anomalous": {"delta_i_over_sigma": rng.normal(size=300)},
    }


@pytest.fixture(scope="module")
def report(shared_data, tmp_path_factory) -> tuple[Path, int]:
    data = _report_data(shared_data / "lcys_4sweep_dials" / "reference_dials3.12_scale")
    path = tmp_path_factory.mktemp("html") / "report.html"
    write_report(path, data)
    # the file (plotly.js copied file to file) is the page string, byte for byte
    assert path.read_bytes() == build_html(data).encode("utf-8")
    n_plots = int(re.search(r"JAXSCALE_N_PLOTS=(\d+)", path.read_text()).group(1))
    return path, n_plots


def test_self_contained(report):
    path, n_plots = report
    text = path.read_text()
    assert n_plots >= 18
    assert not re.search(r"<script[^>]+src=", text)      # plotly.js inlined, nothing fetched
    assert text.count('class="plot"') == n_plots
    assert "0.033" in text and "Rmerge(I+/-)" in text      # the summary table is on the page


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (apt-get install chromium)")
def test_chromium_renders_every_plot_without_errors(report, tmp_path):
    path, n_plots = report
    run = subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={tmp_path / 'profile'}", "--enable-logging=stderr",
                          "--v=0", "--virtual-time-budget=20000", "--dump-dom", path.as_uri()],
                         capture_output=True, text=True, timeout=120)
    dom = run.stdout
    errors = [ln for ln in run.stderr.splitlines() if "CONSOLE" in ln and ("Error" in ln or "Uncaught" in ln)]
    assert not errors, errors
    # plotly replaces each empty div by a rendered graph with an SVG per trace layer
    drawn = re.findall(r'<div id="plot(\d+)" class="plotly-graph-div[^"]*js-plotly-plot', dom)
    assert sorted(map(int, drawn)) == list(range(n_plots))
    assert dom.count('class="main-svg"') >= n_plots
    shot = tmp_path / "report.png"
    subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={tmp_path / 'profile2'}", "--virtual-time-budget=20000",
                    "--window-size=1400,2400", f"--screenshot={shot}", path.as_uri()],
                   capture_output=True, timeout=120)
    assert shot.exists() and shot.stat().st_size > 50_000


def test_report_without_optional_sections(shared_data):
    folder = shared_data / "quartz_3ded_dials"
    obs = scaled_observations(read_refl(folder / "scaled.refl"), read_expt(folder / "scaled.expt"))
    page = build_html({"statistics": merging_statistics(obs)})
    assert "Statistics vs resolution" in page and "Scaling model" not in page
