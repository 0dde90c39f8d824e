"""Every merging-statistics number as JSON (schema in docs/report_json.md)."""
from __future__ import annotations

import json
import math
import os
from dataclasses import fields, is_dataclass

import numpy as np

from jaxscale.io.atomic import atomic_path
from jaxscale.merge.statistics import MergingStatistics, ShellStatistics

SCHEMA = "jaxscale.report/1"


def _clean(value):
    """JSON-ready copy: arrays -> lists, numpy scalars -> Python, NaN/inf -> None."""
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, np.ndarray):
        return _clean(value.tolist())
    if isinstance(value, (np.bool_, bool)):
        return bool(value)
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        v = float(value)
        return v if math.isfinite(v) else None
    if is_dataclass(value) and not isinstance(value, type):
        return {f.name: _clean(getattr(value, f.name)) for f in fields(value)}
    return value


def _shells(s: ShellStatistics | None, single: bool = False):
    if s is None:
        return None
    d = _clean(s.as_dict())
    return {k: v[0] for k, v in d.items()} if single else d


def statistics_dict(stats: MergingStatistics) -> dict:
    """The `merging_statistics` object of the schema (recursive for `suggested`)."""
    from jaxscale.report.text import summary_values

    return {
        "space_group": stats.space_group,
        "unit_cell": list(stats.unit_cell),
        "n_bins": len(stats.bins),
        "d_star_sq_limits": _clean(stats.d_star_sq_limits),
        "bins": _shells(stats.bins),
        "overall": _shells(stats.overall, single=True),
        "anomalous_bins": _shells(stats.anomalous_bins),
        "anomalous_overall": _shells(stats.anomalous_overall, single=True),
        "d_min_cc_half_fit": _clean(stats.d_min_cc_half_fit),
        "summary_table": _clean(summary_values(stats)),
        "suggested": statistics_dict(stats.suggested) if stats.suggested is not None else None,
    }


def report_dict(stats: MergingStatistics, extra: dict | None = None) -> dict:
    """Top-level report: schema tag, merging statistics and any JSON-able `extra` sections."""
    doc = {"schema": SCHEMA, "merging_statistics": statistics_dict(stats)}
    for key, value in (extra or {}).items():
        doc[key] = _clean(value)
    return doc


def write_json_report(path: str | os.PathLike, stats: MergingStatistics, extra: dict | None = None) -> None:
    """Write `report_dict(stats, extra)` atomically."""
    with atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            json.dump(report_dict(stats, extra), f, indent=1, allow_nan=False)
