"""Cross-validation of scaling options with a free set (`cross_validation.*`, DIALS'
cross_validate + DialsScaleCrossValidator).

For each configuration (mode=single: the options as given; mode=multi: each value of
`parameter`, bools default to True and False) the full scaling runs `nfolds` times with
`use_free_set=True` and free_set_offset = 0, 1, ... (at most 100/free_set_percentage folds):
every fold leaves a different set of groups out of minimisation. Each run gives work and
free Rmeas and CC½ (merging statistics of the work / free groups); the table shows their
mean and sample standard deviation per configuration and marks the best free Rmeas
(lowest), Rmeas gap (lowest), free CC½ (highest) and CC½ gap (lowest) with '*'.
No scaled data are written (as DIALS).
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Any, Sequence

from jaxscale.exceptions import ParameterError

NAMES = ("work Rmeas", "free Rmeas", "Rmeas gap", "work CC1/2", "free CC1/2", "CC1/2 gap")
KEYS = ("work_rmeas", "free_rmeas", "rmeas_gap", "work_cc_half", "free_cc_half", "cc_half_gap")
MONITORED = (1, 2, 4, 5)  # indices into NAMES marked when best
BEST = ("min", "min", "max", "min")


@dataclass
class CrossValidationResult:
    """Per configuration: its label and the work/free values of every fold."""

    configurations: list[str]
    values: list[dict[str, list[float]]] = field(default_factory=list)  # KEYS -> per-fold values
    table: str = ""

    def summary(self) -> list[dict[str, tuple[float, float]]]:
        """Per configuration: KEYS -> (mean, sample standard deviation), rounded as DIALS (5 places)."""
        return [{k: _mean_sd(v[k]) for k in KEYS} for v in self.values]


def _mean_sd(values: Sequence[float]) -> tuple[float, float]:
    n = len(values)
    mean = sum(values) / n if n else float("nan")
    sd = math.sqrt(sum((x - mean) ** 2 for x in values) / (n - 1)) if n > 1 else 0.0
    return round(mean, 5), round(sd, 5)


def configurations(params: Any) -> list[tuple[str, list[tuple[str, str]]]]:
    """(label, parameter overrides) of every configuration to cross-validate."""
    from jaxscale.params import parameter_info, resolve_key

    cv = params.cross_validation
    if cv.cross_validation_mode == "single":
        return [("user", [])]
    if cv.cross_validation_mode != "multi":
        raise ParameterError(f"cross_validation.cross_validation_mode={cv.cross_validation_mode!r}: expected "
                             "single or multi")
    if not cv.parameter:
        raise ParameterError("cross_validation.parameter= must name the option to cross-validate "
                             "(e.g. physical.absorption_correction)")
    path = resolve_key(cv.parameter)
    kind = parameter_info(path).type.split("(")[0]
    values = list(cv.parameter_values or [])
    if kind == "bool":
        if not values:
            chosen = ["True", "False"]
        else:
            low = [v.lower() for v in values]
            chosen = [v for v in ("True", "False") if v.lower() in low]
    elif not values:
        raise ParameterError("cross_validation.parameter_values= must list the values to compare "
                             f"for {path}")
    else:
        chosen = values
    return [(f"{path}={v}", [(path, v)]) for v in chosen]


def _fold_offsets(params: Any) -> list[int]:
    percentage = params.scaling_options.free_set_percentage or 10.0
    nfolds = params.cross_validation.nfolds or 1
    return [n for n in range(nfolds) if n < 100.0 / percentage]


def format_table(result: CrossValidationResult) -> str:
    """The summary table as DIALS prints it (libtbx simple_table layout)."""
    rows: list[list[str]] = []
    means = []
    for label, summary in zip(result.configurations, result.summary()):  # a few configurations
        means.append([summary[k][0] for k in KEYS])
        rows.append([label, "mean"] + [str(summary[k][0]) for k in KEYS])
        rows.append(["", "std dev"] + [str(summary[k][1]) for k in KEYS])
    for index, criterion in zip(MONITORED, BEST):
        column = [m[index] for m in means]
        pick = column.index(min(column) if criterion == "min" else max(column))
        rows[2 * pick][index + 2] += "*"
    header = ["option", ""] + list(NAMES)
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"

    rule = "-" * (sum(widths) + 3 * (len(widths) - 1) + 4)
    return "\n".join([rule, line(header), rule, *(line(r) for r in rows), rule])


def report_section(result: CrossValidationResult) -> dict:
    """The HTML report's `cross_validation` entry (jaxscale.report.html): per configuration
    the mean and sd of each column of NAMES, and the best values (as marked in the table)."""
    summary = result.summary()
    mean = [[s[k][0] for k in KEYS] for s in summary]
    best = [[False] * len(KEYS) for _ in summary]
    for index, criterion in zip(MONITORED, BEST):  # four monitored columns
        column = [m[index] for m in mean]
        best[column.index(min(column) if criterion == "min" else max(column))][index] = True
    return {"configurations": list(result.configurations), "columns": list(NAMES), "mean": mean,
            "sd": [[s[k][1] for k in KEYS] for s in summary], "best": best}


def work_free_section(work_free: dict) -> dict:
    """The report's `cross_validation` entry for one run with a free set (use_free_set)."""
    return {"configurations": ["this run"], "columns": list(NAMES), "mean": [[work_free[k] for k in KEYS]],
            "sd": None, "best": None}


def cross_validate(params: Any, experiments: list, tables: list, origins: list[str], log: Any
                   ) -> tuple[CrossValidationResult, Any]:
    """Run every configuration over the folds; returns (result, the last fold's ScalePass)."""
    from jaxscale.params import apply_overrides
    from jaxscale.scale import scale_datasets

    configs = configurations(params)
    folds = _fold_offsets(params)
    result = CrossValidationResult([label for label, _ in configs])
    last = None
    for (label, overrides), fold in itertools.product(configs, folds):  # configurations x folds
        if fold == folds[0]:
            result.values.append({k: [] for k in KEYS})
        fold_params = apply_overrides(params, [*overrides, ("scaling_options.use_free_set", "True"),
                                               ("scaling_options.free_set_offset", str(fold))])
        log(f"\nCross-validation: {label}, fold {fold + 1} of {len(folds)}")
        last = scale_datasets(fold_params, experiments, tables, origins, log, statistics=False)
        if last.work_free is None:
            raise ParameterError(f"cross-validation {label}, fold {fold + 1}: no work/free merging statistics "
                                 "(too few reflections in the free set?)")
        for k in KEYS:
            result.values[-1][k].append(last.work_free[k])
    result.table = format_table(result)
    log("Summary of the cross validation analysis:\n" + result.table)
    return result, last


__all__ = ["CrossValidationResult", "configurations", "cross_validate", "format_table", "report_section",
           "work_free_section", "NAMES", "KEYS"]
