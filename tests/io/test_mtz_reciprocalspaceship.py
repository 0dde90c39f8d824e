"""Our MTZ files read by reciprocalspaceship (careless' reader) with standard column types."""
from __future__ import annotations

import numpy as np
import pytest

rs = pytest.importorskip("reciprocalspaceship")

from jaxscale.export import write_merged_mtz_from_scaled  # noqa: E402
from jaxscale.io.expt import read_expt  # noqa: E402
from jaxscale.io.mtz import write_unmerged_mtz  # noqa: E402
from jaxscale.io.refl import read_refl  # noqa: E402


@pytest.fixture(scope="module")
def reference(shared_data):
    ref = shared_data / "lcys_4sweep_dials" / "reference_dials3.12_scale"
    return read_refl(ref / "scaled.refl"), read_expt(ref / "scaled.expt")


def test_unmerged_mtz_types_and_values(tmp_path, reference):
    table, experiments = reference
    n = write_unmerged_mtz(tmp_path / "u.mtz", table, experiments)
    ds = rs.read_mtz(str(tmp_path / "u.mtz"))
    assert len(ds) == n == 11914  # dials.scale.log: 11914 observations
    types = {k: str(v) for k, v in ds.dtypes.items()}
    assert types["I"] == "Intensity" and types["SIGI"] == "Stddev" and types["BATCH"] == "Batch"
    # rs unmerges M/ISYM back to the observed (original) indices: they must be ours
    g = table["inverse_scale_factor"]
    keep = (g > 0) & ((table["flags"] & np.uint64(29360128)) == 0) & (table["partiality"] >= 0.4)
    original = {tuple(h) for h in table["miller_index"][keep]}
    observed = {tuple(h) for h in ds.reset_index()[["H", "K", "L"]].to_numpy().astype(int)}
    assert observed <= original
    i_ref = np.sort(table["intensity.scale.value"][keep] / g[keep])
    np.testing.assert_allclose(np.sort(ds["I"].to_numpy(float)), i_ref.astype(np.float32), rtol=1e-6)


def test_merged_mtz_types(tmp_path, reference):
    table, experiments = reference
    write_merged_mtz_from_scaled(tmp_path / "m.mtz", table, experiments)
    ds = rs.read_mtz(str(tmp_path / "m.mtz"))
    assert len(ds) == 1578  # dials.scale.log: 1578 unique
    types = {k: str(v) for k, v in ds.dtypes.items()}
    assert types["IMEAN"] == "Intensity" and types["SIGIMEAN"] == "Stddev"
    assert types["I(+)"] == "FriedelIntensity" and types["F"] == "SFAmplitude"
    assert types["DANO"] == "AnomalousDifference" and types["N(+)"] == "MTZInt"
