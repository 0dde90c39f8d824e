"""Text report lines equal dials.scale.log's; the JSON report is complete and strict JSON."""
from __future__ import annotations

import json

import pytest

from jaxscale.io.expt import read_expt
from jaxscale.io.refl import read_refl
from jaxscale.merge.merging import scaled_observations
from jaxscale.merge.statistics import merging_statistics
from jaxscale.report.json_report import write_json_report
from jaxscale.report.text import merging_report


@pytest.fixture(scope="module")
def lcys(shared_data):
    folder = shared_data / "lcys_4sweep_dials" / "reference_dials3.12_scale"
    obs = scaled_observations(read_refl(folder / "scaled.refl"), read_expt(folder / "scaled.expt"))
    return merging_statistics(obs), (folder / "dials.scale.log").read_text()


def test_text_blocks_reproduce_the_log(lcys):
    stats, log = lcys
    text = merging_report(stats)
    lines = [ln for ln in text.splitlines() if ln.strip()]
    assert len(lines) == 1 + 1 + 21 + 1 + 1 + 20   # title, header, 21 rows; title, head, 20 rows
    for line in lines:
        assert line in log, f"not in dials.scale.log: {line!r}"


def test_json_report(lcys, tmp_path):
    stats, _ = lcys
    write_json_report(tmp_path / "r.json", stats, extra={"run": {"n": 1}})
    doc = json.loads((tmp_path / "r.json").read_text())
    ms = doc["merging_statistics"]
    assert doc["schema"] == "jaxscale.report/1" and doc["run"] == {"n": 1}
    assert len(ms["bins"]["cc_half"]) == ms["n_bins"] == 20
    assert ms["overall"]["n_obs"] == 11914 and ms["overall"]["n_uniq"] == 1578
    assert ms["summary_table"]["Total unique"] == [1578, 107, 40]
    assert ms["anomalous_overall"]["anom_slope"] == pytest.approx(1.029, abs=5e-4)
    assert ms["bins"]["anom_completeness"][0] is None          # NaN -> null
