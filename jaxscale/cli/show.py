"""``jaxscale show``: a short text summary of reflection tables and experiment lists."""
from __future__ import annotations

from typing import Any

import numpy as np


def _resolution_range(table: Any, experiments: Any) -> tuple[float, float] | None:
    """(d_min, d_max) in Å from the ``d`` column, else from Miller indices and the first cell."""
    if "d" in table.columns:
        d = np.asarray(table["d"], dtype=float)
    elif "miller_index" in table.columns and experiments:
        hkl = np.asarray(table["miller_index"], dtype=float)  # (n, 3)
        cell = experiments[0].unit_cell
        d_star_sq = np.einsum("ni,ij,nj->n", hkl, np.asarray(cell.reciprocal_metric_tensor().as_mat33(),
                                                                   dtype=float), hkl)
        with np.errstate(divide="ignore"):
            d = 1.0 / np.sqrt(d_star_sq)
    else:
        return None
    d = d[np.isfinite(d) & (d > 0)]
    return (float(d.min()), float(d.max())) if d.size else None


def _table_lines(table: Any, experiments: Any) -> list[str]:
    n = len(table)
    lines = [f"  rows: {n}"]
    if "id" in table.columns and n:
        ids = np.asarray(table["id"])
        valid = ids[ids >= 0]
        counts = np.bincount(valid) if valid.size else np.zeros(0, int)
        per_id = ", ".join(f"{i}: {c}" for i, c in enumerate(counts) if c)
        lines.append(f"  datasets (id: rows): {per_id}" + (f"; unindexed (id -1): {int((ids < 0).sum())}"
                                                            if (ids < 0).any() else ""))
    res = _resolution_range(table, experiments)
    if res is not None:
        lines.append(f"  resolution: {res[0]:.2f} - {res[1]:.2f} Å")
    lines.append(f"  columns: {', '.join(sorted(table.columns))}")
    return lines


def _experiment_lines(experiments: Any) -> list[str]:
    lines = [f"  experiments: {len(experiments)}"]
    for i, expt in enumerate(experiments):
        parts = []
        try:
            parts.append(f"space group {expt.space_group.xhm()}")
        except Exception:  # noqa: BLE001 - a summary shows what it can
            pass
        try:
            c = expt.unit_cell
            parts.append(f"cell ({c.a:.3f}, {c.b:.3f}, {c.c:.3f}, {c.alpha:.2f}, {c.beta:.2f}, {c.gamma:.2f})")
        except Exception:  # noqa: BLE001
            pass
        if getattr(expt, "is_still", False):
            parts.append("still")
        else:
            try:
                first, last = expt.image_range
                start, end = expt.osc_range
                parts.append(f"images {first}-{last}, rotation {start:.1f}-{end:.1f}° ({end - start:.1f}°)")
            except Exception:  # noqa: BLE001
                pass
        try:
            parts.append(f"wavelength {expt.wavelength:.5f} Å")
        except Exception:  # noqa: BLE001
            pass
        if getattr(expt, "scaling_model", None):
            parts.append(f"scaling model {expt.scaling_model.get('__id__', '?')}")
        lines.append(f"  [{i}] " + ", ".join(parts))
    return lines


def summarise(path: str, kind: str, table: Any | None, experiments: Any | None) -> str:
    """Text block describing one input file (kind as from :func:`jaxscale.cli.inputs.classify_file`)."""
    lines = [f"{path} ({kind})"]
    if experiments is not None:
        lines += _experiment_lines(experiments)
    if table is not None:
        lines += _table_lines(table, experiments)
    return "\n".join(lines) + "\n"
