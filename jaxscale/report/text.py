"""Plain-text merging statistics for the log, laid out as dials.scale 3.12 prints them."""
from __future__ import annotations

import math

from jaxscale.merge.statistics import MergingStatistics, ShellStatistics

_BIN_HEADER = (" d_max  d_min   #obs  #uniq   mult.  %comp       <I>  <I/sI>"
               "    r_mrg   r_meas    r_pim   r_anom   cc1/2   cc_ano")

# (label, format, source, field); source "main" = non-anomalous, "anom" = I+/I− separate
_SUMMARY_ROWS = [
    ("High resolution limit", " %7.2f", "main", "d_min"),
    ("Low resolution limit", " %7.2f", "main", "d_max"),
    ("Completeness", "%7.1f", "main", "completeness"),
    ("Multiplicity", "%7.1f", "main", "multiplicity"),
    ("I/sigma", "%7.1f", "main", "i_over_sigma_mean"),
    ("Rmerge(I)", "%7.3f", "main", "r_merge"),
    ("Rmerge(I+/-)", "%7.3f", "anom", "r_merge"),
    ("Rmeas(I)", "%7.3f", "main", "r_meas"),
    ("Rmeas(I+/-)", "%7.3f", "anom", "r_meas"),
    ("Rpim(I)", "%7.3f", "main", "r_pim"),
    ("Rpim(I+/-)", "%7.3f", "anom", "r_pim"),
    ("CC half", "%7.3f", "main", "cc_half"),
    ("Anomalous completeness", "%7.1f", "anom", "anom_completeness"),
    ("Anomalous multiplicity", "%7.1f", "anom", "multiplicity"),
    ("Anomalous correlation", "%7.3f", "anom", "cc_anom"),
    ("Anomalous slope", "%7.3f", "anom1", "anom_slope"),
    ("dF/F", "%7.3f", "anom1", "anom_signal"),
    ("dI/s(dI)", "%7.3f", "anom1", "delta_i_over_sigma"),
    ("Total observations", "%7d", "main", "n_obs"),
    ("Total unique", "%7d", "main", "n_uniq"),
]


def _shell_line(s: ShellStatistics, i: int) -> str:
    r = s.row(i)
    r_anom = "" if math.isnan(r["r_anom"]) else "% 7.3f" % r["r_anom"]
    return "%6.2f %6.2f %6d %6d   %5.2f %6.2f  %8.1f  %6.1f  %s  %s  %s  %s  % 5.3f%s  % 5.3f%s" % (
        r["d_max"], r["d_min"], r["n_obs"], r["n_uniq"], r["multiplicity"], r["completeness"] * 100,
        r["i_mean"], r["i_over_sigma_mean"], "% 7.3f" % r["r_merge"], "% 7.3f" % r["r_meas"],
        "% 7.3f" % r["r_pim"], r_anom, r["cc_half"], "*" if r["cc_half_significant"] else "",
        r["cc_anom"], "*" if r["cc_anom_significant"] else "")


def merging_statistics_table(stats: MergingStatistics) -> str:
    """The "Merging statistics by resolution bin" block (bins, then the overall row)."""
    text = "\n            ----------Merging statistics by resolution bin----------           \n\n"
    text += _BIN_HEADER + "\n"
    text += "".join(_shell_line(stats.bins, i) + "\n" for i in range(len(stats.bins)))
    text += _shell_line(stats.overall, 0) + "\n\n"
    return text


def summary_values(stats: MergingStatistics) -> dict[str, list]:
    """Summary rows {label: values}: [Overall, Low, High] or, with a CC½-fit cut,
    [Suggested, Low, High, Overall] (Low/High of the cut data); single-valued anomalous
    rows (slope, dF/F, dI/s(dI)) hold one value. Completeness in %."""
    sel = stats.suggested
    four = sel is not None
    values: dict[str, list] = {}
    for label, _, source, name in _SUMMARY_ROWS:
        if source == "main":
            full = (stats.overall, stats.bins)
            cut = (sel.overall, sel.bins) if four else None
        else:
            if stats.anomalous_overall is None:
                continue
            full = (stats.anomalous_overall, stats.anomalous_bins)
            cut = (sel.anomalous_overall, sel.anomalous_bins) if four and sel.anomalous_overall is not None else None
        if source == "anom1":   # overall only
            src = cut[0] if cut is not None else full[0]
            values[label] = [getattr(src, name)[0].item()]
            continue
        if four:
            vals = [getattr(cut[0], name)[0], getattr(cut[1], name)[0], getattr(cut[1], name)[-1],
                    getattr(full[0], name)[0]]
        else:
            vals = [getattr(full[0], name)[0], getattr(full[1], name)[0], getattr(full[1], name)[-1]]
        vals = [v.item() for v in vals]
        if "completeness" in name:
            vals = [v * 100 for v in vals]
        values[label] = vals
    return values


def summary_table(stats: MergingStatistics) -> str:
    """The "Summary of merging statistics" block (3 columns, or 4 with "Suggested")."""
    four = stats.suggested is not None
    values = summary_values(stats)
    head = "".ljust(44) + ("Suggested   Low    High  Overall" if four else " Overall    Low     High") + "\n"
    text = "\n            -------------Summary of merging statistics--------------           \n\n" + head
    for label, fmt, _, _ in _SUMMARY_ROWS:
        if label not in values:
            continue
        row = values[label]
        if four and len(row) == 1:
            row = row + [None] * 3
        fmts = [fmt] + [fmt.strip()] * (len(row) - 1)
        text += label.ljust(44) + " ".join(
            (f % v) if v is not None else " " * len(f % 0) for f, v in zip(fmts, row)) + "\n"
    return text


def suggested_resolution_line(stats: MergingStatistics) -> str:
    """"Resolution limit suggested from CC½ fit ..." or "" when dials.scale prints nothing."""
    if stats.suggested is None or stats.d_min_cc_half_fit is None:
        return ""
    return "Resolution limit suggested from CC\u00bd fit (limit CC\u00bd=0.3): %.2f\n" % stats.d_min_cc_half_fit


def merging_report(stats: MergingStatistics) -> str:
    """Per-bin table, the suggestion line and the summary, in dials.scale's order."""
    return merging_statistics_table(stats) + suggested_resolution_line(stats) + summary_table(stats)
