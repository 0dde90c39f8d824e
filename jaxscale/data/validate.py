"""Checks on input tables, .refl/.expt pairs and options before any scaling work.

Each check raises :class:`jaxscale.exceptions.InputError` (file + field + problem) or
:class:`jaxscale.exceptions.ParameterError` (option + problem) so the command line can stop
with one line and exit status 2 before anything is written. Problems DIALS itself tolerates
(a few rows with variance <= 0, which it flags excluded; (0, 0, 0) indices) are returned as
warnings for the log instead. All checks are vectorised over rows.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from jaxscale.data import flags as F
from jaxscale.data.table import ReflectionTable
from jaxscale.exceptions import InputError, ParameterError

# columns every .refl input needs: grouping (miller_index), data set (id), row state
# (flags), resolution (d), image position for the scale/decay smoothers (xyzobs.px.value)
# and scattered-beam direction for the absorption basis (s1)
REQUIRED_COLUMNS = ("miller_index", "id", "flags", "d", "xyzobs.px.value", "s1")
INTENSITY_KINDS = {"sum": F.INTEGRATED_SUM, "prf": F.INTEGRATED_PRF}
FLAG_NAMES = {"sum": "integrated_sum", "prf": "integrated_prf"}


def _columns(kind: str) -> tuple[str, str]:
    return f"intensity.{kind}.value", f"intensity.{kind}.variance"


def _kinds_used(table: ReflectionTable, path: str, intensity_choice: str) -> list[str]:
    """Intensity kinds ("sum", "prf") the chosen intensity_choice reads from this table."""
    present = []
    for kind in INTENSITY_KINDS:
        value, variance = _columns(kind)
        if (value in table) != (variance in table):
            have, lack = (value, variance) if value in table else (variance, value)
            raise InputError(path, f"has column {have} but not {lack}", field=lack)
        if value in table:
            present.append(kind)
    wanted = {"combine": ["sum", "prf"], "profile": ["prf"], "sum": ["sum"]}.get(intensity_choice)
    if wanted is None:
        raise ParameterError(f"reflection_selection.intensity_choice={intensity_choice!r}: "
                             "expected one of combine, profile, sum")
    used = [k for k in wanted if k in present]
    if not used:
        need = " or ".join("/".join(_columns(k)) for k in wanted)
        raise InputError(path, f"no intensity columns for intensity_choice={intensity_choice} (needs {need})",
                         field=_columns(wanted[0])[0])
    return used


def validate_reflections(
    table: ReflectionTable,
    path: str,
    *,
    intensity_choice: str = "combine",
    required: Sequence[str] = REQUIRED_COLUMNS,
) -> list[str]:
    """Check one input table; raise InputError for unusable input, return warnings.

    Errors: no rows; missing required or intensity columns; no indexed (id >= 0) row; no
    indexed row flagged integrated by a used method; NaN/inf intensity, variance, d or
    position on a row that would be used; every such row with variance <= 0. Warnings
    (DIALS excludes these rows and carries on): some variances <= 0, (0, 0, 0) indices.
    """
    path = str(path)
    n = len(table)
    if n == 0 or not table.columns:
        raise InputError(path, "reflection table is empty (0 rows)")
    missing = [c for c in required if c not in table]
    if missing:
        raise InputError(path, f"missing required column{'s' * (len(missing) > 1)} {', '.join(missing)}",
                         field=missing[0])
    for name in ("miller_index", "xyzobs.px.value", "s1"):
        if name in table and np.shape(table[name])[1:] != (3,):
            raise InputError(path, f"column has shape {np.shape(table[name])}, expected ({n}, 3)", field=name)
    kinds = _kinds_used(table, path, intensity_choice)

    indexed = np.asarray(table["id"]) >= 0  # (n,)
    if not indexed.any():
        raise InputError(path, f"no indexed reflections (all {n} rows have id < 0)", field="id")
    flags = np.asarray(table["flags"])
    used_by = {k: indexed & F.has_all(flags, INTENSITY_KINDS[k]) for k in kinds}  # kind -> (n,) rows read
    candidate = np.logical_or.reduce(list(used_by.values()))  # (n,)
    n_candidate = int(candidate.sum())
    if n_candidate == 0:
        names = " or ".join(FLAG_NAMES[k] for k in kinds)
        raise InputError(path, f"none of the {int(indexed.sum())} indexed reflections is flagged {names}",
                         field="flags")

    for k, rows in used_by.items():  # NaN/inf where the value would be read
        for column in _columns(k):
            bad = int(np.count_nonzero(rows & ~np.isfinite(np.asarray(table[column], dtype=np.float64))))
            if bad:
                raise InputError(path, f"{bad} of {int(rows.sum())} {FLAG_NAMES[k]} reflections have a NaN or "
                                 "infinite value", field=column)
    for column in ("d", "xyzobs.px.value"):
        if column in table:
            values = np.asarray(table[column], dtype=np.float64).reshape(n, -1)
            bad = int(np.count_nonzero(candidate & ~np.isfinite(values).all(axis=1)))
            if bad:
                raise InputError(path, f"{bad} of {n_candidate} integrated reflections have a NaN or infinite value",
                                 field=column)

    warnings = []
    positive = np.zeros(n, dtype=bool)  # (n,) rows with a usable variance for some used kind
    for k, rows in used_by.items():
        variance = np.asarray(table[_columns(k)[1]], dtype=np.float64)
        positive |= rows & (variance > 0)
        n_bad = int(np.count_nonzero(rows & (variance <= 0)))
        if n_bad:
            warnings.append(f"{path}: {n_bad} of {int(rows.sum())} {FLAG_NAMES[k]} reflections have "
                            f"{_columns(k)[1]} <= 0 and are excluded")
    if not positive.any():
        columns = ", ".join(_columns(k)[1] for k in kinds)
        raise InputError(path, f"all {n_candidate} integrated reflections have variance <= 0", field=columns)
    zero_hkl = int(np.count_nonzero(candidate & ~np.asarray(table["miller_index"]).any(axis=1)))
    if zero_hkl:
        warnings.append(f"{path}: {zero_hkl} integrated reflections have Miller index (0, 0, 0)")
    return warnings


def validate_pair(table: ReflectionTable, experiments: Sequence[Any], refl_path: str, expt_path: str) -> list[str]:
    """Check that a .refl table and its .expt list describe the same experiments.

    As DIALS (assign_unique_identifiers): every experiment that has an identifier must find
    it among the table's identifiers, and a table's identifier must belong to one of the
    experiments (unless none of them has one; DIALS then assigns new ones). Indexed rows'
    ids must name an experiment, and each experiment needs at least one indexed row.
    Returns warnings for the log.
    """
    refl_path, expt_path = str(refl_path), str(expt_path)
    if not len(experiments):
        raise InputError(expt_path, "experiment list is empty", field="experiment")
    ids = np.asarray(table["id"]) if "id" in table else np.zeros(len(table), dtype=np.int32)
    present = np.unique(ids[ids >= 0])  # dataset ids with indexed rows
    expt_idents = [str(e.identifier) for e in experiments]
    table_idents = {int(k): str(v) for k, v in table.identifiers.items()}
    named = [i for i in expt_idents if i]
    warnings: list[str] = []
    table_ident_set = set(table_idents.values())  # once: a set per item made this O(n^2) (10^5 stills)
    unmatched = [i for i in named if i not in table_ident_set]
    stray = sorted(set(table_idents.values()) - set(expt_idents)) if named else []
    if unmatched or stray:
        detail = "; ".join(part for part in (
            f"{len(unmatched)} only in the .expt (e.g. {unmatched[0]!r})" if unmatched else "",
            f"{len(stray)} only in the .refl (e.g. {stray[0]!r})" if stray else "") if part)
        raise InputError(refl_path, f"experiment identifiers do not match those of {expt_path}: {detail}",
                         field="identifiers")
    if table_idents and not named:
        warnings.append(f"{expt_path}: experiments have no identifiers; the identifiers in {refl_path} are replaced")
    if table_idents and len(named) == len(expt_idents):
        id_of = {v: k for k, v in table_idents.items()}
        expected = np.array([id_of[i] for i in expt_idents if i], dtype=np.int64)
    else:
        expected = np.arange(len(experiments), dtype=np.int64)
    extra = np.setdiff1d(present, expected)
    if extra.size:
        raise InputError(refl_path, f"rows have dataset id {int(extra[0])}, which matches no experiment of "
                         f"{expt_path} ({len(experiments)} experiment(s))", field="id")
    if len(experiments) > 1:
        empty = np.setdiff1d(expected, present)
        if empty.size:
            k = int(np.flatnonzero(expected == empty[0])[0])
            raise InputError(refl_path, f"experiment {k} of {expt_path} has no indexed reflections "
                             f"(no rows with id {int(empty[0])})", field="id")
    return warnings


def validate_space_groups(experiments: Sequence[Any], sources: Sequence[str] | None = None) -> None:
    """All experiments to be scaled together must share one space group number (as DIALS).

    `sources[i]` names the .expt file of experiments[i] for the message.
    """
    numbers = np.array([e.space_group.number for e in experiments], dtype=np.int64)
    if numbers.size < 2 or np.all(numbers == numbers[0]):
        return
    first_other = int(np.flatnonzero(numbers != numbers[0])[0])
    where = None if sources is None else str(sources[first_other])
    found = ", ".join(str(int(x)) for x in np.unique(numbers))
    raise InputError(where, f"experiments have different space groups (numbers {found}): experiment "
                     f"{first_other} is {experiments[first_other].space_group.hm}, experiment 0 is "
                     f"{experiments[0].space_group.hm}; reindex them consistently or leave some out "
                     "with exclude_datasets=", field="space_group")


def validate_options(params: Any, experiments: Sequence[Any] | None = None) -> None:
    """Reject option values that cannot mean anything (ParameterError naming the option).

    d_min/d_max must be positive; output.merging.nbins at least 1; each exclude_images range
    must name an experiment with a scan and overlap its images (DIALS ignores such a range
    silently; here it is almost certainly a typo).
    """
    cut = params.cut_data
    for name in ("d_min", "d_max"):
        value = getattr(cut, name)
        if value is not None and not value > 0:
            raise ParameterError(f"cut_data.{name}={value:g}: a resolution limit must be a positive "
                                 "d-spacing in Å")
    nbins = params.output.merging.nbins
    if nbins is not None and nbins < 1:
        raise ParameterError(f"output.merging.nbins={nbins}: the number of resolution bins must be at least 1")
    if experiments is None or not params.exclude_images:
        return
    from jaxscale.data.exclude import parse_exclude_images

    requests = parse_exclude_images(params.exclude_images, list(range(len(experiments))))
    for did, start, end in requests:  # a handful of ranges
        expt = experiments[did]
        if not getattr(expt, "scan", None):
            raise ParameterError(f"exclude_images={did}:{start}:{end}: experiment {did} has no scan (still shots)")
        first, last = expt.image_range
        if end < first or start > last:
            raise ParameterError(f"exclude_images={did}:{start}:{end}: images {start}-{end} are outside the "
                                 f"scan of experiment {did} (images {first}-{last})")


__all__ = ["REQUIRED_COLUMNS", "validate_options", "validate_pair", "validate_reflections",
           "validate_space_groups"]
