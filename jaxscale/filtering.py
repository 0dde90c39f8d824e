"""Scale-and-filter cycles by ΔCC½ (`filtering.method=deltacchalf`; overview.md §5.3,
merging_stats.md §8).

Each cycle scales without the full-matrix round, computes every data group's ΔCC½ (whole
data sets, or image groups of `group_size` images), and removes the groups below
mean − stdcutoff·σ: data sets are dropped; image groups at the edges of a sweep become
excluded images (the scan's valid image ranges shrink, the rows are flagged
user_excluded_in_scaling and the next cycle limits the model to the new range). The cycles
stop when nothing is removed, more than max_percent_removed % of the initial reflections is
gone, the completeness falls below min_completeness, or after max_cycles; a final scaling
run with the full matrix follows (DIALS skips it when nothing was removed and
full_matrix=False). Every later cycle continues from the models of the one before, as
DIALS does. The cycles are written to `filtering.output.scale_and_filter_results` (JSON).
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any, Callable

import numpy as np

from jaxscale.data import flags as F
from jaxscale.data.exclude import initial_valid_ranges, valid_image_mask
from jaxscale.exceptions import ParameterError
from jaxscale.merge import delta_cchalf as D
from jaxscale.merge.merging import scaled_observations


def _scan_ranges(experiments: list) -> list[tuple[str, list] | None]:
    """(identifier, valid image ranges) per experiment; None for scanless ones."""
    out = []
    for e in experiments:  # loop over data sets
        ranges = initial_valid_ranges(e)
        out.append(None if ranges is None or e.is_still else (e.identifier, ranges))
    return out


def _apply_removal(pass_: Any, removal: D.Removal) -> tuple[list, list, list, int]:
    """Experiments, tables and origins left after a removal (excluded images flagged
    user_excluded and unscaled), and how many scaled reflections were removed."""
    from jaxscale.scale import split_by_dataset

    exps, tables, origins = [], [], []
    n_scaled_before = int(F.has_any(np.asarray(pass_.table["flags"]), F.SCALED).sum())
    n_scaled_after = 0
    for k, (expt, table) in enumerate(zip(pass_.experiments, split_by_dataset(pass_.table, pass_.experiments))):
        if k in removal.datasets_removed:
            continue
        ranges = removal.valid_image_ranges.get(k)
        if ranges is not None and expt.scan:
            scan = dict(expt.scan)
            scan["valid_image_ranges"] = {**(scan.get("valid_image_ranges") or {}),
                                          expt.identifier: [[int(a), int(b)] for a, b in ranges]}
            expt = dataclasses.replace(expt, scan=scan)
            z = np.asarray(table["xyzobs.px.value"], dtype=np.float64)[:, 2]
            off = ~valid_image_mask(z, ranges)
            flags = F.set_bits(np.asarray(table["flags"]), off, F.USER_EXCLUDED_IN_SCALING)
            table["flags"] = np.where(off, F.clear_bits(flags, F.SCALED), flags)
        n_scaled_after += int(F.has_any(np.asarray(table["flags"]), F.SCALED).sum())
        exps.append(expt)
        tables.append(table)
        origins.append(pass_.origins[k])
    return exps, tables, origins, n_scaled_before - n_scaled_after


def _group_record(cycle: int, result: D.DeltaCCResult, groups: D.DataGroups) -> dict:
    """One cycle's ΔCC½ per group for the report: groups with data, in group order."""
    have = np.flatnonzero(np.isfinite(result.delta))
    if groups.mode == "dataset":
        labels = [f"data set {int(groups.dataset_id[g])}" for g in have]
    else:
        labels = [f"{int(groups.dataset_id[g])}: {int(groups.first_image[g])}-{int(groups.last_image[g])}"
                  for g in have]
    return {"cycle": cycle, "label": labels, "delta_cc_half": result.delta[have],
            "below_cutoff": result.below_cutoff[have], "cutoff": float(result.cutoff)}


def report_section(doc: dict, group_records: list[dict]) -> dict:
    """The HTML report's `filtering` entry (jaxscale.report.html) from the results document
    and the per-cycle group records."""
    cycles = doc["cycle_results"]
    keys = sorted(cycles, key=int)
    removed = []
    for k in keys:  # a few cycles
        c = cycles[k]
        items = [f"{r[0][0]}-{r[0][1]} (data set {r[1]})" for r in c.get("image_ranges_removed", [])]
        items += [f"data set {i}" for i in c["removed_ids"]]
        removed.append(items)
    return {"cycles": [int(k) for k in keys],
            "cc_half": [float(cycles[k]["mean_cc_half"]) for k in keys],
            "n_removed": [int(cycles[k]["n_removed"]) for k in keys],
            "cumul_percent_removed": [float(cycles[k]["cumul_percent_removed"]) for k in keys],
            "removed": removed, "termination_reason": doc["termination_reason"], "groups": group_records}


def scale_and_filter(params: Any, experiments: list, tables: list, origins: list[str], log: Any,
                     timings: dict[str, float] | None = None) -> tuple[Any, dict, dict]:
    """Run the scale-and-filter cycles; returns (final ScalePass, results document, the
    report's `filtering` section)."""
    from jaxscale.scale import scale_datasets

    dc = params.filtering.deltacchalf
    if dc.mode == "dataset" and len(experiments) < 2:
        raise ParameterError("filtering.deltacchalf.mode=dataset needs several data sets; use mode=image_group "
                             "for a single sweep")
    max_cycles = dc.max_cycles or 6
    cycles: list[dict] = []
    group_records: list[dict] = []
    initial_n = 0
    initial_ranges: list = []
    final = None
    reason = "max_cycles"
    for cycle in range(1, max_cycles + 1):  # a few scale-and-filter cycles
        log(f"\nScale and filter: cycle {cycle} (scaling without the full-matrix round)")
        pass_ = scale_datasets(params, experiments, tables, origins, log, full_matrix=False, timings=timings)
        if cycle == 1:
            initial_ranges = [None if r is None else (r[0], (int(e.image_range[0]), int(e.image_range[1])))
                              for r, e in zip(_scan_ranges(pass_.experiments), pass_.experiments)]
            initial_n = scaled_observations(pass_.table, pass_.experiments, anomalous=False).rows.size
        obs = D.delta_cchalf_observations(pass_.table, pass_.experiments)
        groups = (D.dataset_groups(obs.dataset_id) if dc.mode == "dataset"
                  else D.image_groups(obs.dataset_id, obs.image, dc.group_size or 10))
        result = D.delta_cchalf(obs, groups, stdcutoff=4.0 if dc.stdcutoff is None else dc.stdcutoff)
        valid = {k: (None if r is None else r[1]) for k, r in enumerate(_scan_ranges(pass_.experiments))}
        removal = D.choose_removals(result, groups, valid)
        group_records.append(_group_record(cycle, result, groups))
        _log_cycle(log, result, groups, removal)
        experiments, tables, origins, n_removed = _apply_removal(pass_, removal)
        if params.exclude_images:  # now in the scans' valid ranges; data sets may have been removed
            params = params.model_copy(update={"exclude_images": []})
        identifiers = {k: e.identifier for k, e in enumerate(pass_.experiments)}
        stats = pass_.stats
        cycles.append(D.cycle_results(stats, result, removal, groups, n_removed, identifiers, cycles, initial_n))
        completeness = None if stats is None else 100.0 * float(stats.overall.completeness[0])
        log(f"Cycle {cycle} of filtering, n_reflections removed this cycle: {n_removed}")
        stop = D.termination_reason(cycle, n_removed, cycles[-1]["cumul_percent_removed"], completeness,
                                    max_cycles=max_cycles, max_percent_removed=dc.max_percent_removed or 10.0,
                                    min_completeness=dc.min_completeness)
        if stop is None:
            continue
        reason = stop
        final = pass_
        if not experiments:
            raise ParameterError("ΔCC½ filtering removed every data set")
        if stop != "no_more_removed" or params.scaling_options.full_matrix:
            log(f"\nScale and filter finished ({stop}): final scaling run")
            final = scale_datasets(params, experiments, tables, origins, log, timings=timings)
        break
    doc = D.scale_and_filter_results(
        cycles, reason, initial_n, initial_ranges, _scan_ranges(experiments),
        final.stats if final is not pass_ else None)
    log(summary_text(doc))
    return final, doc, report_section(doc, group_records)


def _log_cycle(log: Any, result: D.DeltaCCResult, groups: D.DataGroups, removal: D.Removal) -> None:
    log(f"ΔCC½ analysis: CC½ {result.cc_half:.5f}, mean ΔCC½ {result.mean:.6f}, sigma {result.sigma:.6f}, "
        f"cutoff {result.cutoff:.6f}")
    order, values = result.sorted_values()
    for g, v in zip(order[:10], values[:10]):  # the ten lowest groups
        if groups.mode == "dataset":
            what = f"data set {int(groups.dataset_id[g])}"
        else:
            what = (f"data set {int(groups.dataset_id[g])} images {int(groups.first_image[g])}-"
                    f"{int(groups.last_image[g])}")
        log(f"  {what}: ΔCC½ {v:.6f}{' (below cutoff)' if result.below_cutoff[g] else ''}")
    for (a, b), d in removal.image_ranges_removed:
        log(f"Removing image range {a}-{b} from data set {d}")
    for d in removal.datasets_removed:
        log(f"Removing data set {d}")


def summary_text(doc: dict) -> str:
    """DIALS-like summary of the cycles: removed data, cumulative %, CC½ per cycle."""
    lines = ["", "Summary of data removed:"]
    for i, c in doc["cycle_results"].items():
        parts = [f"Cycle number: {i}"]
        if c.get("image_ranges_removed"):
            parts.append("  Removed image ranges: " + ", ".join(
                f"{r[0][0]}-{r[0][1]} (data set {r[1]})" for r in c["image_ranges_removed"]))
        if c["removed_ids"]:
            parts.append(f"  Removed data sets: {c['removed_ids']}")
        parts.append(f"  cumulative % of reflections removed: {c['cumul_percent_removed']:.3f}")
        lines += parts
    lines.append(f"Termination reason: {doc['termination_reason']}")
    return "\n".join(lines)


def results_job(params: Any, doc: dict) -> tuple[str, str, Callable] | None:
    """(name, path, writer) of the scale_and_filter_results JSON, or None when not asked for."""
    from jaxscale.io.atomic import atomic_write_text

    path = params.filtering.output.scale_and_filter_results
    if not path:
        return None
    text = json.dumps(doc, indent=2)
    return ("scale_and_filter_results", path, lambda p: atomic_write_text(p, text))


__all__ = ["scale_and_filter", "results_job", "summary_text", "report_section"]
