"""dials.scale options of `jaxscale.scale.run` that the default runs do not touch:
exclude_images over several data sets (vs DIALS 3.12), unusable data sets, unmerged MTZ
input without orientation, FRACTIONCALC = 0, weighting.likelihood, consistent indexing."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from jaxscale.data import flags as F
from jaxscale.exceptions import InputError

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "lcys"
REFERENCE = json.loads((Path(__file__).parent / "reference" / "scale_options.json").read_text())


def _sweeps(*names: str) -> list[str]:
    return [str(EXAMPLE / f"lcys_{n}_integrated.{ext}") for n in names for ext in ("refl", "expt")]


def _params(out: Path, *overrides):
    from jaxscale.params import ScaleParams, apply_overrides

    return apply_overrides(ScaleParams(), [
        ("output.reflections", str(out / "scaled.refl")), ("output.experiments", str(out / "scaled.expt")),
        ("output.html", "None"), ("output.log", "None"), ("scaling_options.full_matrix", "False"), *overrides])


def test_exclude_images_two_sweeps_as_dials(tmp_path):
    """exclude_images=1:10:20 and 0:1700:1800 over two sweeps: flags, valid ranges, the
    models limited to the valid range, the error model and the observation count all equal
    DIALS 3.12's (the per-data-set call used to fail with 'no experiment with dataset id 1')."""
    from jaxscale.io.refl import read_refl
    from jaxscale.scale import run

    ref = REFERENCE["exclude_images_two_sweeps"]
    res = run(_params(tmp_path, ("exclude_images", "1:10:20"), ("exclude_images", "0:1700:1800")), _sweeps("20", "25"))
    table = read_refl(tmp_path / "scaled.refl")
    flags, ids = np.asarray(table["flags"]), np.asarray(table["id"])
    assert [int((F.has_any(flags, F.USER_EXCLUDED_IN_SCALING) & (ids == k)).sum()) for k in (0, 1)] == ref["user_excluded"]
    assert [int((F.has_any(flags, F.SCALED) & (ids == k)).sum()) for k in (0, 1)] == ref["scaled"]
    expt = json.loads((tmp_path / "scaled.expt").read_text())
    assert [list(s["valid_image_ranges"].values())[0] for s in expt["scan"]] == ref["valid_image_ranges"]
    models = expt["scaling_model"]
    assert [m["configuration_parameters"]["valid_image_range"] for m in models] == ref["model_valid_image_range"]
    np.testing.assert_allclose([m["configuration_parameters"]["valid_osc_range"] for m in models],
                               ref["model_valid_osc_range"], atol=1e-9)
    assert [len(m["scale"]["parameters"]) for m in models] == ref["n_scale_parameters"]
    np.testing.assert_allclose(res.error_model, ref["error_model"], rtol=1e-3)
    assert int(res.statistics.overall.n_obs[0]) == ref["n_obs_overall"]


def test_unusable_dataset_names_the_file(tmp_path):
    from jaxscale.scale import run

    with pytest.raises(InputError) as err:
        run(_params(tmp_path, ("cut_data.d_min", "100")), _sweeps("20"))
    assert "lcys_20_integrated.refl" in str(err.value)
    assert not (tmp_path / "scaled.refl").exists()


def test_unusable_dataset_dropped_in_multi_dataset_run(tmp_path):
    """Every image of data set 0 excluded: it is dropped with a log line, the rest is scaled."""
    from jaxscale.scale import run

    res = run(_params(tmp_path, ("exclude_images", "0:1:1800"), ("error_model", "None")), _sweeps("20", "25"))
    assert len(res.experiments) == 1
    assert any("removed: every image is excluded" in line for line in res.log)
    assert np.unique(np.asarray(res.table["id"])).tolist() == [0]


def test_fractioncalc_zero_means_full(shared_data):
    from jaxscale.io.mtz import read_unmerged_mtz

    table, _ = read_unmerged_mtz(shared_data / "smallmol_xia2_dials_unmerged_mtz" / "AUTOMATIC_DEFAULT_scaled_unmerged.mtz")
    assert np.all(np.asarray(table["partiality"]) == 1.0)


def test_mtz_without_orientation(shared_data, tmp_path, monkeypatch):
    """Unmerged MTZ without orientation (no s1): KB scaling works (Laue off.mtz); a
    physical model with absorption asks for s1 (one line, no output)."""
    import jaxscale.io.mtz as mtz_io
    from jaxscale.scale import run

    res = run(_params(tmp_path, ("model", "KB"), ("cut_data.d_min", "2.0")),
              [str(shared_data / "pyp_laue_unmerged_mtz" / "off.mtz")])
    assert res.statistics is not None and res.statistics.overall.cc_half[0] > 0.5
    assert (tmp_path / "scaled.refl").exists()

    reader = mtz_io.read_unmerged_mtz

    def without_s1(path):
        table, experiments = reader(path)
        del table["s1"]
        return table, experiments

    monkeypatch.setattr(mtz_io, "read_unmerged_mtz", without_s1)
    path = str(shared_data / "smallmol_xia2_dials_unmerged_mtz" / "AUTOMATIC_DEFAULT_scaled_unmerged.mtz")
    with pytest.raises(InputError) as err:
        run(_params(tmp_path / "phys", ("model", "physical")), [path])
    assert "s1" in str(err.value) and "AUTOMATIC_DEFAULT_scaled_unmerged.mtz" in str(err.value)
    assert not (tmp_path / "phys").exists()
