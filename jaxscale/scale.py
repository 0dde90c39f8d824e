"""`jaxscale.scale.run`: the dials.scale algorithm end to end (spec overview.md §5).

read inputs -> prepare each data set -> build models -> initial outlier rejection ->
round 1 (L-BFGS) -> expand, outliers -> profile/summation combination -> outliers ->
round 2 -> expand, outliers, error model -> full-matrix LM (+ fix_initial iteration) ->
expand with covariance -> final outliers and error model -> output variances, flags ->
scaled.refl/.expt, merging statistics, log.

All observation arrays here are over the *suitable* rows of all data sets concatenated in
data-set order (the rows the model's bases describe); `_Obs` keeps the map back to tables.
"""
from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Sequence

import jax
import numpy as np

from jaxscale.data import flags as F
from jaxscale.data.prepare import prepare_dataset
from jaxscale.data.symmetry import best_unit_cell, d_star_sq, epsilon, group_ids, map_to_asu
from jaxscale.data.table import ReflectionTable, RowsByValue
from jaxscale.compilation import host_evaluation, precompile, warm_up
from jaxscale.errors.error_model import ErrorModelResult, refine_error_model
from jaxscale.errors.outliers import determine_outliers, normalised_intensity_outliers
from jaxscale.exceptions import InputError
from jaxscale.models.build import DatasetInput, ScalingModel, build_model
from jaxscale.merge.statistics import HOST_MAX_GROUPS, MIN_GROUPS_PAD, precompile_split_halves
from jaxscale.optimize.lbfgs import minimise_lbfgs, precompile_direction
from jaxscale.optimize.levmar import (
    inverse_scale_variance,
    minimise_full_matrix,
    parameter_covariance,
    precompile_full_matrix,
    precompile_variance,
    propagate_variance,
)
from jaxscale.target.robust import make_target
from jaxscale.target.objective import basis_rows, make_problem, select_rows

TEMPORARY_COLUMNS = ("intensity", "variance", "prescaling_correction", "s0c", "s1c", "Esq", "batch", "shoebox")


def set_scaled_columns(t: ReflectionTable, g: np.ndarray, var_g: np.ndarray, intensity: np.ndarray,
                       variance: np.ndarray, outlier: np.ndarray, small_scale_cutoff: float,
                       excluded: np.ndarray | None = None) -> None:
    """Write a data set's scaling result into its output table as dials.scale does: flags
    (outliers, excluded incl. g < small_scale_cutoff, scaled = not bad), inverse scale and
    its variance, unscaled intensity.scale.value/variance; temporary columns removed."""
    flags = F.clear_bits(np.asarray(t["flags"]), F.OUTLIER_IN_SCALING | F.SCALED)
    flags = F.set_bits(flags, outlier, F.OUTLIER_IN_SCALING)
    if excluded is not None:
        flags = F.set_bits(flags, excluded, F.EXCLUDED_FOR_SCALING)
    flags = F.set_bits(flags, g < small_scale_cutoff, F.EXCLUDED_FOR_SCALING)
    t["flags"] = F.set_bits(flags, ~F.has_any(flags, F.BAD_FOR_SCALING), F.SCALED)
    t["inverse_scale_factor"] = g
    t["inverse_scale_factor_variance"] = var_g
    t["intensity.scale.value"] = intensity
    t["intensity.scale.variance"] = variance
    for col in TEMPORARY_COLUMNS:
        if col in t:
            del t[col]


# ------------------------------------------------------------------------- progress/log
class _Log:
    """Collects log lines and forwards phases/messages to an optional progress object."""

    def __init__(self, progress: Any | None):
        self.progress = progress
        self.lines: list[str] = []

    def __call__(self, msg: str = "") -> None:
        self.lines.append(msg)
        if self.progress is not None and hasattr(self.progress, "log"):
            self.progress.log(msg)

    def phase(self, name: str, total: int | None = None) -> None:
        if self.progress is not None and hasattr(self.progress, "on_phase_start"):
            self.progress.on_phase_start(name, total)

    def stage(self, name: str) -> None:
        """Name the step of the current phase that starts now (shown beside the bar)."""
        if self.progress is not None and hasattr(self.progress, "on_phase_describe"):
            self.progress.on_phase_describe(name)

    def advance(self, n: int = 1) -> None:
        if self.progress is not None and hasattr(self.progress, "on_advance"):
            self.progress.on_advance(n)

    def end(self) -> None:
        if self.progress is not None and hasattr(self.progress, "on_phase_end"):
            self.progress.on_phase_end()


@dataclasses.dataclass
class ScaleResult:
    """What a run produced: tables/experiments written, model, error model, statistics."""

    table: ReflectionTable  # scaled table, all data sets (id = data-set index)
    experiments: list
    model: ScalingModel
    x: np.ndarray  # final flat parameters
    error_model: tuple[float, float] | None
    error_model_result: ErrorModelResult | None
    statistics: Any
    log: list[str]
    timings: dict[str, float]
    imid: float | None = None
    outputs: dict[str, str] = dataclasses.field(default_factory=dict)
    filtering: dict | None = None  # scale_and_filter_results document (filtering.method=deltacchalf)
    cross_validation: Any = None  # jaxscale.cross_validation.CrossValidationResult
    work_free: dict | None = None  # work/free Rmeas and CC1/2 (use_free_set)


# ------------------------------------------------------------------------- inputs
_REFL, _EXPT, _MTZ, _XDS = ".refl", (".expt", ".json"), ".mtz", (".hkl",)
_CONFIG = (".phil", ".yaml", ".yml")


def _sort_inputs(params: Any, inputs: Sequence[str]) -> tuple[list[tuple[str, str]], list[str], list[str]]:
    """(.refl/.expt pairs matched by order, unmerged MTZ files, XDS files); the pairs come
    from `inputs` or, when it names none, from params.input."""
    low = [(str(p), str(p).lower()) for p in inputs]
    refls = [p for p, q in low if q.endswith(_REFL)] or [str(p) for p in params.input.reflections or []]
    expts = [p for p, q in low if q.endswith(_EXPT)] or [str(p) for p in params.input.experiments or []]
    mtzs = [p for p, q in low if q.endswith(_MTZ)]
    xdss = [p for p, q in low if q.endswith(_XDS)]
    others = [p for p, q in low if not q.endswith((_REFL, *_EXPT, _MTZ, *_XDS, *_CONFIG))]
    if others:
        raise InputError(others[0], "not a DIALS .refl/.expt, unmerged .mtz or XDS .HKL file")
    if len(refls) != len(expts):
        raise InputError(None, f"need matching .refl/.expt pairs (got {len(refls)} .refl, {len(expts)} .expt)")
    if not refls and not mtzs and not xdss:
        raise InputError(None, "no input files: give .refl + .expt pairs, unmerged .mtz or XDS .HKL files")
    return list(zip(refls, expts)), mtzs, xdss


def _read_tables_ahead(params: Any, inputs: Sequence[str]) -> dict:
    """{.refl path: Future of its table, HDF5 path: Future of (table, None)}, read in one
    background thread started now, so the tables' bytes come off the disk while this thread
    decodes the experiment lists' JSON, which holds the GIL (10^5 stills, from the page cache:
    .refl + .expt 2.6-3.7 instead of 3.3-4.6 s; HDF5 1.9-2.2 instead of 6.5-7.1 s, as this VM
    reclaims idle page cache within seconds). Errors surface where a table is taken
    (`_read_sources`, `serial._read_hdf5_sources`), in the order they did before."""
    from jaxscale.serial import _split_hdf5

    hdf5, others = _split_hdf5(inputs)
    try:
        pairs = _sort_inputs(params, others)[0] if others or not hdf5 else []
    except InputError:  # reported by the reading itself
        pairs = []
    paths = list(dict.fromkeys(r for r, _ in pairs))
    if not paths and not hdf5:
        return {}
    from concurrent.futures import ThreadPoolExecutor

    from jaxscale.io.refl import read_refl

    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="jaxscale-read")
    ahead = {path: pool.submit(read_refl, path) for path in paths}
    if hdf5:
        from jaxscale.io.hdf5 import load_table

        ahead.update({path: pool.submit(load_table, path, False) for path in dict.fromkeys(hdf5)})
    pool.shutdown(wait=False)
    return ahead


def _validator():
    """jaxscale.data.validate when present (input checks), else None."""
    try:
        from jaxscale.data import validate
    except ImportError:  # pragma: no cover - optional stage
        return None
    return validate


def _read_sources(params: Any, inputs: Sequence[str], log: "_Log", experiments_read: dict | None = None,
                  tables_ahead: dict | None = None) -> list[tuple[str, Any, ReflectionTable]]:
    """(source path, experiment list, table) per input file, validated and with identifiers.
    experiments_read: {.expt path: experiment list} read already; tables_ahead: {.refl path:
    Future of its table} (`_read_tables_ahead`); each is taken (popped) once."""
    from jaxscale.io.expt import assign_identifiers, read_expt
    from jaxscale.io.refl import read_refl

    validate = _validator()
    choice = params.reflection_selection.intensity_choice
    pairs, mtzs, xdss = _sort_inputs(params, inputs)
    sources = []

    def check(table, path):
        if validate is not None:  # s1 is needed only by absorption models (checked with the model)
            required = tuple(c for c in validate.REQUIRED_COLUMNS if c != "s1")
            for warning in validate.validate_reflections(table, path, intensity_choice=choice, required=required):
                log(f"Warning: {warning}")

    for refl_path, expt_path in pairs:
        expts = experiments_read.pop(expt_path, None) if experiments_read else None
        expts = read_expt(expt_path) if expts is None else expts
        ahead = tables_ahead.pop(refl_path, None) if tables_ahead else None
        table = read_refl(refl_path) if ahead is None else ahead.result()
        check(table, refl_path)
        if validate is not None:
            for warning in validate.validate_pair(table, expts, refl_path, expt_path):
                log(f"Warning: {warning}")
        assign_identifiers(table, expts, refl_path)
        sources.append((refl_path, expts, table))
    readers = []
    if mtzs:
        from jaxscale.io.mtz import read_unmerged_mtz

        readers += [(read_unmerged_mtz, path) for path in mtzs]
    if xdss:
        from jaxscale.io.xds import read_xds

        readers += [(read_xds, path) for path in xdss]
    for reader, path in readers:  # one table + experiments per file
        table, expts = reader(path)
        check(table, path)
        assign_identifiers(table, expts, path)
        sources.append((path, expts, table))
    return sources


def _read_datasets(params: Any, inputs: Sequence[str], log: "_Log | None" = None, experiments_read: dict | None = None,
                   tables_ahead: dict | None = None) -> tuple[Any, list, list[ReflectionTable], list[str]]:
    """(params, experiments, tables, source paths): one experiment and table per experiment
    over all inputs (tables split by `id`), those chosen by use_datasets / exclude_datasets;
    params with exclude_images renumbered to the chosen data sets' positions (read-ahead
    arguments as `_read_sources`)."""
    log = log if log is not None else _Log(None)
    experiments, tables, origin = [], [], []
    for path, expts, table in _read_sources(params, inputs, log, experiments_read, tables_ahead):
        ids = np.asarray(table["id"])
        by_ident = {v: k for k, v in table.identifiers.items()}
        rows_of_id = RowsByValue(ids) if len(expts) > 1 else None
        for expt in expts:  # loop over experiments
            k = by_ident.get(expt.identifier)
            if len(expts) == 1:  # DIALS keeps unindexed (id -1) rows with the one experiment
                # the whole table, its columns shared with the table just read (dropped after
                # this loop) instead of copied: a copy of every column less at peak
                sub = ReflectionTable(dict(table.columns), dict(table.identifiers), dict(table.dials_types))
            else:
                rows = rows_of_id(k) if k is not None else np.zeros(0, dtype=np.int64)
                sub = table.select(rows)
            sub.identifiers = {0: expt.identifier}
            sub["id"] = np.where(np.asarray(sub["id"]) < 0, -1, 0).astype(np.int32)
            experiments.append(expt)
            tables.append(sub)
            origin.append(path)
    use = params.dataset_selection.use_datasets
    exclude = params.dataset_selection.exclude_datasets
    keep = [i for i in range(len(experiments)) if (use is None or i in use) and not (exclude and i in exclude)]
    params = _exclude_images_by_position(params, keep, len(experiments), log)
    experiments = [experiments[i] for i in keep]
    tables = [tables[i] for i in keep]
    origin = [origin[i] for i in keep]
    validate = _validator()
    if validate is not None:
        validate.validate_space_groups(experiments, origin)
        validate.validate_options(params, experiments)
    else:
        sgs = {e.space_group.number for e in experiments}
        if len(sgs) > 1:
            raise InputError(None, f"experiments have different space groups {sorted(sgs)}")
    return params, experiments, tables, origin


def _exclude_images_by_position(params: Any, keep: list[int], n_input: int, log: "_Log") -> Any:
    """exclude_images names data sets by their id in the input (DIALS: the table's `id`,
    kept through use_datasets); the stages number the chosen ones 0..n-1, so renumber.
    A range on a data set left out is ignored (as DIALS); an id beyond the input is kept
    so that validation names it."""
    from jaxscale.params import image_ranges

    if not params.exclude_images or keep == list(range(n_input)):
        return params
    position = {int(k): pos for pos, k in enumerate(keep)}
    items = []
    for exp_id, start, end in image_ranges(params.exclude_images):  # a handful of ranges
        if exp_id is None:
            items.append(f"{start}:{end}")
        elif exp_id in position:
            items.append(f"{position[exp_id]}:{start}:{end}")
        elif exp_id < n_input:
            log(f"exclude_images={exp_id}:{start}:{end}: data set {exp_id} is not selected, range ignored")
        else:
            items.append(f"{exp_id}:{start}:{end}")
    return params.model_copy(update={"exclude_images": items})


# ------------------------------------------------------------------------- observations
@dataclasses.dataclass
class _Obs:
    """Suitable rows of all data sets, concatenated (the model's observation order)."""

    dataset: np.ndarray  # i[n] data-set position
    row: np.ndarray  # i[n] row in that data set's prepared table
    intensity: np.ndarray  # f[n]
    variance: np.ndarray  # f[n]
    group: np.ndarray  # i[n] group id (anomalous per the `anomalous` option)
    group_anom: np.ndarray  # i[n] group id with I+ and I- apart (error model)
    partiality: np.ndarray | None  # f[n]
    d_star_sq: np.ndarray  # f[n] with the first experiment's cell (E^2 test)
    epsilon: np.ndarray  # f[n]
    miller: np.ndarray  # i[n, 3] original indices
    group_asu: np.ndarray | None = None  # i[n_groups, 3] ASU index of each group
    # `of_dataset`'s index of `dataset`, made on first use (rebuilt if `dataset` is replaced)
    _by_dataset: "RowsByValue | None" = dataclasses.field(default=None, init=False, repr=False, compare=False)

    @property
    def n(self) -> int:
        return self.intensity.size

    def of_dataset(self, k: int) -> np.ndarray:
        """Indices of data set k's observations, in order (`RowsByValue`, made once)."""
        if self._by_dataset is None or self._by_dataset.values is not self.dataset:
            self._by_dataset = RowsByValue(self.dataset)
        return self._by_dataset(k)


def _bucket(n: int) -> int:
    """Padded size (next of 2^k, 1.25 2^k, 1.5 2^k, 1.75 2^k) so rounds reuse compilations."""
    if n <= 256:
        return 256
    k = 2 ** int(math.floor(math.log2(n)))
    for f in (1.0, 1.25, 1.5, 1.75, 2.0):
        if n <= f * k:
            return int(f * k)
    return 2 * k


# ------------------------------------------------------------------------- the engine
class _Scaler:
    """State of one dials.scale run over the joint observations of all data sets."""

    def __init__(self, params: Any, experiments: list, prepared: list, model: ScalingModel, log: _Log):
        self.p = params
        self.experiments = experiments
        self.prepared = prepared
        self.model = model
        self.log = log
        self.multi = len(experiments) > 1
        sg = experiments[0].space_group
        w = params.weighting  # least squares (DIALS) or a robust loss with its IRLS I_h
        self.target = make_target(model.components, model.params, w.likelihood, w.student_t_dof, w.huber_delta)
        self.x = self.target.x0.copy()
        # g over all rows: numpy for small jobs whose components all have numpy twins (no
        # compilation), else a program compiled while the observations are assembled
        self._g_on_host = host_evaluation(basis_rows(None, model.bases)) and self.target.has_host_inverse_scale()
        if not self._g_on_host:
            precompile(self.target.inverse_scale, jax.ShapeDtypeStruct(self.x.shape, np.float64),
                       jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), a.dtype), model.bases))
        parts = []
        for k, prep in enumerate(prepared):
            t = prep.table
            rows = np.flatnonzero(_suitable(t))
            parts.append((k, rows, t))
        self.obs = self._observations(parts, sg)
        self.free = self.target.free_mask(model.fixed_mask)
        self.final_free = self.target.free_mask(model.final_fixed_mask)
        # error models: one (a, b) per error-model group (combined: one)
        self.error_model: tuple[float, float] | None = None
        self.error_model_result: ErrorModelResult | None = None
        if params.weighting.error_model.error_model == "basic":
            # each data set starts from its own stored model (DIALS: per single scaler)
            self.dataset_error_models = [self._initial_error_model(e) for e in experiments]
            self.error_model = self.dataset_error_models[0]
        self._loaded_error_model = self.error_model  # held by identity until one is refined
        self.global_error_model = self.error_model if not self.multi else None
        self.outlier = np.zeros(self.obs.n, dtype=bool)
        self.var_g = np.zeros(self.obs.n)
        self.imid: float | None = None
        self.imids: dict[int, float] = {}  # data-set position -> chosen Imid
        self._subset: np.ndarray | None = None
        self.free_set = np.zeros(self.obs.n, dtype=bool)  # rows of free-set groups (use_free_set)
        self.free_set_asu = np.zeros((0, 3), dtype=np.int32)
        # what the run will compile later (set by scale_datasets): queued for background
        # compilation once the minimisation shapes are known (`_precompile`)
        self.full_matrix_planned = False
        self.statistics_planned = False
        self._precompiled = False
        if params.scaling_refinery.engine == "SimpleLBFGS":
            precompile_direction(self.target.n_params)
        self._apply_stored_imids()
        self.g = self.inverse_scale(self.x)

    # -------------------------------------------------------------- setup helpers
    def _apply_stored_imids(self) -> None:
        """Data sets loaded with an Imid (scaled before) start from that intensity choice
        (overview.md §3.7: DIALS redoes the combination with the stored Imid)."""
        from jaxscale.data.combine import apply_imid

        if self.p.reflection_selection.intensity_choice != "combine" or self.p.overwrite_existing_models:
            return
        o = self.obs
        for k, (expt, prep) in enumerate(zip(self.experiments, self.prepared)):  # loop over data sets
            imid = ((expt.scaling_model or {}).get("configuration_parameters") or {}).get("Imid")
            if imid is None or "intensity.prf.value" not in prep.table or "intensity.sum.value" not in prep.table:
                continue
            sel = o.of_dataset(k)
            inten, var = apply_imid(prep.table, float(imid))
            o.intensity[sel] = inten[o.row[sel]]
            o.variance[sel] = var[o.row[sel]]
            self.imids[k] = float(imid)
            self.log(f"Data set {k}: using the previously determined intensity choice (Imid = {imid})")

    def _initial_error_model(self, experiment: Any) -> tuple[float, float]:
        em = self.p.weighting.error_model
        a, b = 1.0, 0.02
        saved = experiment.scaling_model
        if saved and not em.reset_error_model and not self.p.overwrite_existing_models:
            pars = saved.get("configuration_parameters", {}).get("error_model_parameters")
            if pars:
                a, b = float(pars[0]), float(pars[1])
        if em.basic.a is not None:
            a = em.basic.a
        if em.basic.b is not None:
            b = em.basic.b
        return a, b

    def _observations(self, parts, sg) -> _Obs:
        cell = self.experiments[0].unit_cell
        dataset, row, inten, var, miller, part = [], [], [], [], [], []
        has_p = all("partiality" in t for _, _, t in parts)
        for k, rows, t in parts:
            dataset.append(np.full(rows.size, k))
            row.append(rows)
            inten.append(np.asarray(t["intensity"])[rows])
            var.append(np.asarray(t["variance"])[rows])
            miller.append(np.asarray(t["miller_index"])[rows])
            if has_p:
                part.append(np.asarray(t["partiality"])[rows])
        miller = np.concatenate(miller)
        asu, _ = map_to_asu(miller, sg, anomalous=bool(self.p.anomalous))
        group, group_asu = group_ids(asu)
        asu_anom, _ = map_to_asu(miller, sg, anomalous=True)
        group_anom, _ = group_ids(asu_anom)
        return _Obs(
            dataset=np.concatenate(dataset),
            row=np.concatenate(row),
            intensity=np.concatenate(inten),
            variance=np.concatenate(var),
            group=group,
            group_anom=group_anom,
            partiality=np.concatenate(part) if has_p else None,
            d_star_sq=d_star_sq(miller, cell),
            epsilon=epsilon(miller, sg).astype(np.float64),
            miller=miller,
            group_asu=group_asu,
        )

    # -------------------------------------------------------------- weights, subsets
    def weights(self, error_model: tuple[float, float] | None) -> np.ndarray:
        v = self.obs.variance
        if error_model is not None:
            a, b = self._per_observation(error_model)
            v = a * a * (v + (b * self.obs.intensity) ** 2)
        return 1.0 / v

    def _per_observation(self, error_model: tuple[float, float]):
        """(a, b), per observation (f[n] each) while the data sets still carry different
        loaded models and none has been refined (the initial model is held by identity)."""
        models = getattr(self, "dataset_error_models", None)
        if models and error_model is self._loaded_error_model and len(set(models)) > 1:
            ab = np.asarray(models, dtype=np.float64)[self.obs.dataset]  # (n, 2)
            return ab[:, 0], ab[:, 1]
        return error_model

    def output_error_model(self, k: int) -> tuple[float, float] | None:
        """Data set k's error model for the output: the refined one, else its loaded one."""
        models = getattr(self, "dataset_error_models", None)
        if models and self.error_model is self._loaded_error_model:
            return models[k]
        return self.error_model

    def lead_error_model(self, k: int) -> None:
        """Start the joint error-model refinement from data set k's loaded model (DIALS
        refines from the multi-scaler's first data set; after a target cycle that is the
        first unscaled one, whose model is the default (1, 0.02))."""
        models = getattr(self, "dataset_error_models", None)
        if models and self.error_model is self._loaded_error_model:
            self.error_model = self._loaded_error_model = models[k]

    def choose_free_set(self, percentage: float, offset: int) -> None:
        """Leave every int(100/percentage)-th group (sorted ASU order, from `offset`) out of
        minimisation (target.md §6); they still count for outliers, error model, output."""
        n_groups = int(self.obs.group.max()) + 1 if self.obs.n else 0
        free_groups = np.arange(int(offset), n_groups, max(int(100.0 / percentage), 1))
        self.free_set = np.isin(self.obs.group, free_groups)
        self.free_set_asu = self.obs.group_asu[free_groups]
        self.log(f"Free set: {free_groups.size} of {n_groups} groups ({int(self.free_set.sum())} reflections) "
                 "left out of minimisation")

    def minimisation_rows(self) -> np.ndarray:
        """Rows the minimiser sees: the scaling subset less outliers and the free set."""
        return self.subset() & ~self.outlier & ~self.free_set

    def subset(self) -> np.ndarray:
        """Rows chosen for minimisation (chosen once, on the first call: DIALS' scaling subset)."""
        if self._subset is None:
            self._subset = self._select_subset()
        return self._subset

    def _select_subset(self) -> np.ndarray:
        """`reflection_selection.method` over the suitable rows (spec overview.md §4)."""
        from jaxscale.data import selection as S

        rs = self.p.reflection_selection
        o = self.obs
        d = 1.0 / np.sqrt(o.d_star_sq)
        min_p = 0.0 if rs.min_partiality is None else rs.min_partiality
        method = rs.method
        if method == "use_all":
            self.log(f"Using all {o.n} suitable reflections for minimisation")
            return np.ones(o.n, dtype=bool)
        if method == "intensity_ranges":
            esq = S.quasi_normalised_esq(o.intensity, o.miller, self.experiments[0].unit_cell,
                                         self.experiments[0].space_group)
            sel = S.select_intensity_ranges(esq, o.intensity, o.variance, o.partiality, d, tuple(rs.E2_range),
                                            tuple(rs.Isigma_range), min_p, rs.d_range)
            self.log(f"Selected {int(sel.sum())} reflections in the E^2 / I/sigma ranges for minimisation")
            return sel
        rng = np.random.default_rng(42)
        rand = rs.random
        min_groups = 2000 if rand.min_groups is None else rand.min_groups
        min_refl = 50000 if rand.min_reflections is None else rand.min_reflections
        pre = S.preselection(o.intensity, o.variance, o.partiality, d, tuple(rs.Isigma_range), min_p, rs.d_range)
        if not self.multi:
            res = S.select_single_dataset(o.group, pre, rng, min_groups, min_refl)
        else:
            cutoff = rand.multi_dataset.Isigma_cutoff
            cutoff = 1.0 if cutoff is None else cutoff
            try:
                if method == "random":
                    res = S.select_multi_dataset_random(o.group, o.intensity, o.variance, rng, min_groups,
                                                        min_refl, cutoff)
                else:
                    res = S.select_multi_dataset_quasi_random(o.group, o.dataset, o.intensity, o.variance,
                                                              o.d_star_sq, pre, rng, min_groups, min_refl, cutoff)
            except ValueError as exc:
                raise InputError(None, str(exc)) from None
        if res.details.get("fallback") == "use_all":
            self.log("No groups left with multiplicity > 1 after preselection: using all reflections")
        else:
            self.log(f"Selected {res.n_groups_selected}/{res.n_groups_available} groups (m>1) for "
                     f"minimisation ({int(res.selected.sum())} reflections)")
        return res.selected

    # -------------------------------------------------------------- minimisation
    def _subset_shape(self) -> tuple[int, int]:
        """(rows, groups) of the minimisation subset: rounds pad to at least its buckets so
        that all rounds share one compiled objective and L-BFGS step."""
        if getattr(self, "_sub_shape", None) is None:
            sub = self.subset()
            self._sub_shape = (int(sub.sum()), int(np.unique(self.obs.group[sub]).size))
        return self._sub_shape

    def _problem(self, rows: np.ndarray, ih_of_group: np.ndarray | None = None):
        """Padded ScalingProblem + bases over `rows` (weights with the current error model).

        ih_of_group (f[n_groups of obs], NaN = none): a fixed reference I_h (targeted
        scaling); rows of groups without one are left out."""
        o = self.obs
        if ih_of_group is not None:
            rows = rows & np.isfinite(ih_of_group)[o.group]
        idx = np.flatnonzero(rows)
        n = idx.size
        n_sub, g_sub = self._subset_shape()
        size = _bucket(max(n, n_sub))
        _, gid = np.unique(o.group[idx], return_inverse=True)
        n_groups = int(gid.max()) + 1 if n else 0
        g_size = _bucket(max(n_groups, g_sub) + 1)
        pad = size - n
        idx_p = np.r_[idx, np.full(pad, idx[0] if n else 0)]
        w = np.r_[self.weights(self.error_model)[idx], np.zeros(pad)]
        inten = np.r_[o.intensity[idx], np.zeros(pad)]
        gid_p = np.r_[gid, np.full(pad, n_groups)]
        ih_ref = None
        if ih_of_group is not None:
            ih_ref = np.zeros(g_size)
            ih_ref[gid] = ih_of_group[o.group[idx]]
        problem = make_problem(inten, w, gid_p, n_groups=g_size, ih_reference=ih_ref)
        bases = select_rows(self.model.bases, idx_p)
        if ih_of_group is None:
            self._precompile(problem, bases)
        return problem, bases

    def _precompile(self, problem, bases) -> None:
        """Once, on the first minimisation problem: compile in the background what the run
        needs later with these shapes (later rounds pad to the same sizes): the full-matrix
        normal equations, the variance propagation and the merging statistics' half split,
        so that they compile while the L-BFGS rounds run."""
        if self._precompiled:
            return
        self._precompiled = True
        if self.full_matrix_planned or self.p.scaling_refinery.engine != "SimpleLBFGS":
            precompile_full_matrix(self.target, self.target.data(problem, bases, anchor=self.x, free=self.free))
        if self.full_matrix_planned:
            precompile_variance(self.target, self.model.bases, self.obs.n)
        # the half split's draw chain: on the host up to HOST_MAX_GROUPS groups (no program)
        if self.statistics_planned and self.obs.n and (
                HOST_MAX_GROUPS < np.unique(self.obs.group_anom).size <= MIN_GROUPS_PAD):
            precompile_split_halves()

    def _cycles(self, free: np.ndarray) -> list[tuple[str, np.ndarray]]:
        """(label suffix, free mask) of each minimisation of a round: one for concurrent
        refinement, one per `consecutive_order` cycle (e.g. scale+decay, then absorption)."""
        if self.p.scaling_refinery.refinement_order != "consecutive" or len(self.model.consecutive_order) < 2:
            return [("", free)]
        out = []
        for keys in self.model.consecutive_order:  # a few component groups
            mask = free & self.target.free_mask({k: k not in keys for k in self.model.params})
            if mask.any():
                out.append((f" [{', '.join(keys)}]", mask))
        return out

    def lbfgs_round(self, label: str, rows: np.ndarray | None = None, free: np.ndarray | None = None,
                    ih_of_group: np.ndarray | None = None) -> None:
        """One minimisation round (the engine's L-BFGS or LM); rows/free default to the
        minimisation rows and all free parameters; ih_of_group: fixed I_h (targeted)."""
        free = self.free if free is None else free
        if not np.any(free):
            self.log(f"\n{label}: no free parameters")
            return
        rows = self.minimisation_rows() if rows is None else rows
        problem, bases = self._problem(rows, ih_of_group)
        ref = self.p.scaling_refinery
        for suffix, free in self._cycles(free):
            data = self.target.data(problem, bases, anchor=self.x, free=free)
            if ref.engine == "SimpleLBFGS":
                res = minimise_lbfgs(self.target, data, x0=self.x, rmsd_tolerance=ref.rmsd_tolerance,
                                     max_iterations=ref.max_iterations)
            else:
                res = minimise_full_matrix(self.target, data, x0=self.x, engine=ref.engine,
                                           rmsd_tolerance=ref.rmsd_tolerance, max_iterations=ref.max_iterations)
            self.x = res.x
            self._log_steps(label + suffix, res)

    def _full_matrix_pass(self, problem, bases, free: np.ndarray, label: str, tolerance: float,
                          max_iterations: int | None) -> np.ndarray:
        """LM over each cycle; the covariance (block diagonal over cycles, as DIALS)."""
        engine = self.p.scaling_refinery.full_matrix_engine
        covariance = np.zeros((self.x.size, self.x.size))
        for suffix, cycle_free in self._cycles(free):
            data = self.target.data(problem, bases, anchor=self.x, free=cycle_free)
            res = minimise_full_matrix(self.target, data, x0=self.x, engine=engine, rmsd_tolerance=tolerance,
                                       max_iterations=max_iterations)
            self.x = res.x
            self._log_steps(label + suffix, res)
            covariance += parameter_covariance(res, damped=True)
        return covariance

    def full_matrix_round(self, rows: np.ndarray | None = None, free: np.ndarray | None = None,
                          ih_of_group: np.ndarray | None = None) -> bool:
        """LM round (+ one with the first scale fixed) and the covariance; False (parameters
        unchanged, no covariance) when there is nothing to refine or the normal equations
        are singular. rows/free/ih_of_group as `lbfgs_round`."""
        ref = self.p.scaling_refinery
        free = self.free if free is None else free
        final_free = self.final_free & free
        if not np.any(free):
            self.log("\nFull-matrix round: no free parameters")
            return False
        rows = self.minimisation_rows() if rows is None else rows
        problem, bases = self._problem(rows, ih_of_group)
        x_before = self.x.copy()
        try:
            covariance = self._full_matrix_pass(problem, bases, free, "Full-matrix round",
                                                ref.rmsd_tolerance, ref.full_matrix_max_iterations)
            if np.any(final_free != free):
                covariance = self._full_matrix_pass(problem, bases, final_free,
                                                    "Full-matrix round (first scale parameter fixed)",
                                                    ref.rmsd_tolerance / 4.0, self.model.final_iterations)
        except ValueError as exc:  # a parameter without data: no full-matrix solution
            self.x = x_before
            self.log(f"Full-matrix round skipped: {exc}; keeping the L-BFGS parameters (no scale uncertainties)")
            return False
        self.covariance = covariance
        return True

    def _log_steps(self, label: str, res) -> None:
        self.log(f"\n{label}: {res.n_reflections} reflections")
        self.log("  Step   RMSD_I")
        for i, r in enumerate(res.rmsd_history):
            self.log(f"  {i:4d}  {r:.5g}")
        self.log(f"  {res.reason}")

    def normalise_gauge(self) -> None:
        """Array models: take out the overall scale the data do not determine (g geometric
        mean 1, `models.array.scale_gauge_factors`), which the full-matrix round drifts
        along (quartz: median g 3e-4, 1095 rows then cut by small_scale_cutoff). g changes
        by one factor, absorbed by I_h: outliers, error model and merged statistics do not."""
        from jaxscale.models.array import scale_gauge_factors

        t = self.target
        free = {k: np.asarray(v) > 0.5 for k, v in t.params_of(self.free.astype(np.float64)).items()}
        factors = scale_gauge_factors(self.model, t.params_of(self.x), free)
        if factors is None:
            return
        s = t.flatten(factors)
        g_old = self.inverse_scale(self.x)
        self.x = self.x * s
        if getattr(self, "covariance", None) is not None:
            self.covariance = self.covariance * np.outer(s, s)
        self.expand()
        ok = (g_old > 0) & (self.g > 0)
        factor = float(np.median(self.g[ok] / g_old[ok])) if ok.any() else 1.0
        self.log(f"Array model: overall scale not determined by the data; g multiplied by {factor:.4g} "
                 "(geometric mean 1, absorbed by the merged intensities)")

    # -------------------------------------------------------------- expansion, outliers
    def inverse_scale(self, x: np.ndarray) -> np.ndarray:
        """g of every observation for parameters x (numpy or the compiled program)."""
        if self._g_on_host:
            return self.target.inverse_scale_host(x, self.model.bases)
        return np.asarray(self.target.inverse_scale(jax.device_put(x), self.model.bases))

    def expand(self, with_covariance: bool = False) -> None:
        self.g = self.inverse_scale(self.x)
        if with_covariance and getattr(self, "covariance", None) is not None:
            self.var_g = inverse_scale_variance(self.target, self.x, self.covariance, self.model.bases, self.obs.n)

    def reject_outliers(self, label: str, per_dataset: bool = False) -> None:
        """Outliers on the global table; per_dataset: each data set's own table with its
        error-model weights (DIALS' initial rejection, done by each single scaler)."""
        p = self.p.scaling_options
        o = self.obs
        if per_dataset:
            # each data set on its own: the groups are independent, so the same test over
            # (data set, group) keys, and the E^2 test in each data set's own shells
            w = self.weights(self.error_model)
            group = o.dataset.astype(np.int64) * (int(o.group.max(initial=-1)) + 1) + o.group
            dataset = o.dataset
        else:
            w = self.weights(self.global_error_model)
            group, dataset = o.group, None
        out = determine_outliers(o.intensity, w, self.g, group, zmax=p.outlier_zmax, method=p.outlier_rejection)
        if p.emax and p.emax > 0:
            out |= normalised_intensity_outliers(o.intensity / self.g, o.d_star_sq, o.epsilon, p.emax, dataset=dataset)
        self.outlier = out
        self.log(f"{int(out.sum())} outliers found ({label})")
        n_sets = len(self.experiments)
        if per_dataset and n_sets > 1:  # DIALS: one line per data set (each single scaler)
            counts = np.bincount(o.dataset[out], minlength=n_sets)
            for k, n in enumerate(counts):  # loop over data sets
                self.log(f"  data set {k}: {int(n)} outliers")

    # -------------------------------------------------------------- error model
    def refine_error_model(self, label: str) -> None:
        if self.error_model is None:
            return
        em = self.p.weighting.error_model
        o = self.obs
        rows = ~self.outlier
        res = refine_error_model(
            o.intensity[rows], o.variance[rows], self.g[rows], o.group_anom[rows],
            partiality=None if o.partiality is None else o.partiality[rows],
            a=self.error_model[0], b=self.error_model[1],
            refine_a=em.basic.a is None, refine_b=em.basic.b is None,
            minimisation=em.basic.minimisation, min_Ih=em.basic.min_Ih, n_bins=em.basic.n_bins,
        )
        if res.refined:
            self.error_model = (res.a, res.b)
            self.error_model_result = res
            self.global_error_model = self.error_model
            self.log(f"Error model ({label}): a = {res.a:.5f}, b = {res.b:.5f} (ISa {res.isa:.3f}, "
                     f"{res.n_reflections} reflections)")
        else:
            self.log(f"Error model ({label}) not refined: {res.message}")

    # -------------------------------------------------------------- intensity combination
    def combine_intensities(self) -> None:
        """Choose profile / summation / blend by the lowest Rmeas (overview.md §6) and put the
        chosen intensities into the observations (data sets without profiles: summation)."""
        from jaxscale.data.combine import SUMMATION, apply_imid, choose_imid

        tables = [prep.table for prep in self.prepared]
        o = self.obs
        with_prf = [k for k, t in enumerate(tables) if "intensity.prf.value" in t and "intensity.sum.value" in t]
        if not with_prf:
            return
        g_k, out_k = [], []
        for k, t in enumerate(tables):  # loop over data sets
            sel = o.of_dataset(k)
            g = np.ones(len(t))
            g[o.row[sel]] = self.g[sel]
            out = np.zeros(len(t), dtype=bool)
            out[o.row[sel]] = self.outlier[sel]
            g_k.append(g)
            out_k.append(out)
        comb = self.p.reflection_selection.combine
        sg = self.experiments[0].space_group
        jobs = [with_prf] if comb.joint_analysis else [[k] for k in with_prf]
        imids = {k: SUMMATION for k in range(len(tables))}
        for ks in jobs:
            choice = choose_imid([tables[k] for k in ks], sg, [g_k[k] for k in ks], [out_k[k] for k in ks],
                                 imids=comb.Imid or None)
            who = "all data sets" if len(ks) > 1 or not self.multi else f"data set {ks[0]}"
            self.log(f"Intensity combination ({who}, {choice.n_test} test reflections):")
            self.log("  Imid              Rmeas    CC1/2")
            for c, r, cc in zip(choice.imids, choice.rmeas, choice.cc_half):
                self.log(f"  {choice.label(c):16s} {r:7.5f}  {cc:7.5f}")
            self.log(f"Combined intensities chosen: {choice.label(choice.imid)}")
            for k in ks:
                imids[k] = choice.imid
        for k, t in enumerate(tables):  # loop over data sets
            sel = o.of_dataset(k)
            inten, var = apply_imid(t, imids[k])
            o.intensity[sel] = inten[o.row[sel]]
            o.variance[sel] = var[o.row[sel]]
        self.imids = imids
        self.imid = imids[with_prf[0]]
        # updating the intensities also puts the error-model weights into the global table
        self.global_error_model = self.error_model


def _suitable(table: ReflectionTable) -> np.ndarray:
    return ~F.has_any(table["flags"], F.USER_EXCLUDED_IN_SCALING | F.EXCLUDED_FOR_SCALING)


def anchor_degenerate_scale(model: ScalingModel, log: _Log) -> list[str]:
    """Fix the overall scale (and B) of the first data set when nothing else anchors them.

    When every data set has a KB model, g -> c g (and a B shared by all) is absorbed by I_h:
    the objective is flat along it, L-BFGS has a zero gradient, and the full-matrix round
    diverges or gives sigma(g)/g ~ 1e7 (DIALS 3.12 on one sweep; reference_numbers.md §1.2,
    §2.2). Fixing data set 0's scale and B removes exactly that direction. Returns the
    fixed component keys.

    With several data sets the relative scales are determined and DIALS converges; there the
    parameters follow DIALS (nothing fixed while refining) and only the covariance is taken
    with data set 0's scale and B fixed (no extra iteration): DIALS' covariance carries the
    undetermined overall B (sigma ~ 400 A^2 on the CuNiR stills), which inflates every sigma(I).
    """
    states = model.states
    if not states or any(s.model_id != "KB" for s in states.values()):
        return []
    first = model.dataset_indices[0] if model.dataset_indices else min(states)
    fixed = []
    for key in ("KB.scale", "KB.decay"):
        if key in model.param_slices and first in model.param_slices[key]:
            i = model.param_slices[key][first].start
            if len(states) == 1:
                model.fixed_mask[key][i] = True
            model.final_fixed_mask[key][i] = True
            fixed.append(key)
    if fixed and len(states) > 1:
        model.final_iterations = 0
        log("All data sets have a KB model: the overall scale and B are not determined by the data; "
            f"scale uncertainties are given relative to data set {first}.")
    elif fixed:
        what = " and ".join("scale" if k.endswith("scale") else "B" for k in fixed)
        verb = "is" if len(fixed) == 1 else "are"
        log(f"All data sets have a KB model: the overall {what} {verb} not determined by the data "
            f"(absorbed by the merged intensities), so the {what} of data set {first} {verb} fixed "
            "at the starting value.")
    return fixed


def _dataset_inputs(experiments: list, prepared: list) -> list[DatasetInput]:
    """Model inputs of each data set's suitable rows; s1 zero where the table has none
    (only the absorption components need it, see `_model_states`)."""
    out = []
    for k, (expt, prep) in enumerate(zip(experiments, prepared)):  # loop over data sets
        t = prep.table
        rows = _suitable(t)
        d_all = np.asarray(t["d"])
        xyz = np.asarray(t["xyzobs.px.value"])
        config = d_all > 0
        s1 = np.asarray(t["s1"])[rows] if "s1" in t else np.zeros((int(rows.sum()), 3))
        out.append(DatasetInput(
            experiment=expt, z_px=xyz[rows, 2], d=d_all[rows], s1=s1,
            xyz_px=xyz[rows], dataset_index=k, config_xyz_px=xyz[config], config_d=d_all[config]))
    return out


def model_choice_text(k: int, experiment: Any, state: Any, params: Any) -> str:
    """One log line: data set k's model, its components and why (the auto rules: KB for
    stills and sweeps under 1 degree, physical otherwise, absorption above 60 degrees)."""
    from jaxscale.models.rules import is_auto

    model = state.model_id
    parts = ", ".join(f"{name} {np.size(v)}" for name, v in state.params.items())
    if state.is_scaled:
        why = "loaded from the input's scaled model (overwrite_existing_models=True starts anew)"
    elif not is_auto(params.model):
        why = f"model={params.model}"
    elif experiment.is_still:
        why = "auto: still images"
    else:
        start, end = experiment.osc_range
        width = abs(end - start)
        why = f"auto: sweep of {width:.2f} deg {'< 1 deg' if model == 'KB' else '>= 1 deg'}"
    text = f"Data set {k}: {model} model ({why}); components {parts} parameters"
    if model == "physical" and not state.is_scaled:
        phys = params.physical
        on = "absorption" in state.params
        if phys.absorption_level:
            reason = f"physical.absorption_level={phys.absorption_level}"
        elif is_auto(phys.absorption_correction):
            reason = f"auto: sweep {'>' if on else '<='} 60 deg"
        else:
            reason = f"physical.absorption_correction={phys.absorption_correction}"
        text += f"; absorption {'on' if on else 'off'} ({reason})"
    return text


def _model_states(inputs: list[DatasetInput], prepared: list, origins: list[str], params: Any, log: _Log) -> list:
    """Each data set's model state (new, or loaded from a scaled .expt), limited to its valid
    image range as DIALS' set_image_ranges_in_scaling_models does; a model with an
    absorption surface needs s1 (orientation), which unmerged MTZ files may lack."""
    from jaxscale.data.exclude import initial_valid_ranges
    from jaxscale.models.build import dataset_state
    from jaxscale.models.registry import MODEL_TYPES

    states = []
    for data, prep, path in zip(inputs, prepared, origins):  # loop over data sets
        expt = data.experiment
        state = dataset_state(data, params)
        ranges = initial_valid_ranges(expt)
        if ranges and not expt.is_still:
            state.config.setdefault("valid_image_range", list(expt.image_range))
            new = [int(ranges[0][0]), int(ranges[-1][1])]
            if [int(v) for v in state.config["valid_image_range"]] != new:
                MODEL_TYPES[state.model_id].limit_image_range(state, (new[0], new[1]))
                log(f"Data set {data.dataset_index}: model limited to images {new[0]}-{new[1]}")
        log(model_choice_text(data.dataset_index, expt, state, params))
        if "absorption" in state.params and "s1" not in prep.table:
            raise InputError(path, f"the {state.model_id} model's absorption correction needs s1 (crystal "
                             "orientation), which this file does not give; use model=KB or model=array, or "
                             "physical.absorption_correction=False", field="s1")
        states.append(state)
    return states


def _prepare(params: Any, experiments: list, tables: list[ReflectionTable], origins: list[str], log: _Log):
    """Exclude images (one call over all data sets; the valid ranges are recorded in each
    scan), then cuts and intensity choice per data set. A data set DIALS cannot use is
    dropped with a log line in multi-data-set runs (InputError naming the file otherwise).
    Returns (experiments, tables, origins, prepared) of the data sets kept."""
    from jaxscale.data.exclude import apply_exclude_images
    from jaxscale.data.prepare import UnusableDatasetError

    cell = best_unit_cell(experiments) if params.reflection_selection.best_unit_cell is None else None
    if cell is None:
        import gemmi

        cell = gemmi.UnitCell(*params.reflection_selection.best_unit_cell)
    sizes = [len(t) for t in tables]
    dataset = np.repeat(np.arange(len(tables)), sizes)
    z = np.concatenate([np.asarray(t["xyzobs.px.value"], dtype=np.float64).reshape(-1, 3)[:, 2] for t in tables])
    excluded, ranges = apply_exclude_images(dataset, z, experiments, list(range(len(experiments))),
                                            params.exclude_images)
    bounds = np.r_[0, np.cumsum(sizes)]
    kept: list[tuple[Any, ReflectionTable, str, Any]] = []
    for k, (expt, table, path) in enumerate(zip(experiments, tables, origins)):  # loop over data sets
        if ranges[k] is not None:
            scan = dict(expt.scan)
            scan["valid_image_ranges"] = {**(scan.get("valid_image_ranges") or {}),
                                          expt.identifier: [[int(a), int(b)] for a, b in ranges[k]]}
            expt = dataclasses.replace(expt, scan=scan)
        try:
            if ranges[k] == []:
                raise UnusableDatasetError("every image is excluded")
            prep = prepare_dataset(
                table, intensity_choice=params.reflection_selection.intensity_choice,
                partiality_cutoff=params.cut_data.partiality_cutoff, min_isigi=params.cut_data.min_isigi,
                best_cell=cell, d_min=params.cut_data.d_min, d_max=params.cut_data.d_max,
                image_excluded=excluded[bounds[k]:bounds[k + 1]])
        except UnusableDatasetError as exc:
            if len(experiments) == 1:
                raise InputError(path, str(exc)) from None
            log(f"Data set {k} ({path}, {expt.identifier}) removed: {exc}")
            continue
        log(f"Data set {len(kept)}: {prep.counts.n_input} rows, {prep.counts.n_partials_combined} partials "
            f"combined, {prep.counts.n_user_excluded_or_excluded} excluded, {prep.counts.n_suitable} suitable")
        kept.append((expt, table, path, prep))
    if not kept:
        raise InputError(origins[0] if len(set(origins)) == 1 else None,
                         "no data set is usable for scaling (see the log for each data set's reason)")
    return [e for e, *_ in kept], [t for _, t, *_ in kept], [o for _, _, o, _ in kept], [p for *_, p in kept]


@dataclasses.dataclass
class ScalePass:
    """One scaling run in memory: scaled table and experiments, the engine, statistics."""

    table: ReflectionTable  # all data sets, id = data-set position
    experiments: list
    origins: list[str]
    scaler: "_Scaler"
    stats: Any
    datasets: list[int] = dataclasses.field(default_factory=list)  # model data-set index of each output one
    work_free: dict | None = None  # free-set statistics (use_free_set)


def _scaling_algorithm(scaler: "_Scaler", params: Any, tables: list[ReflectionTable], full_matrix: bool,
                       log: _Log, initial_outliers: bool = True) -> None:
    """dials.scale's default algorithm (overview.md §5) on a prepared engine."""
    prepared = scaler.prepared
    already_scaled = all(s.is_scaled for s in scaler.model.states.values())
    if already_scaled:
        for k, prep in enumerate(prepared):  # loop over data sets
            sel = scaler.obs.of_dataset(k)
            scaler.outlier[sel] = F.has_any(np.asarray(tables[k]["flags"])[prep.kept_rows][scaler.obs.row[sel]],
                                            F.OUTLIER_IN_SCALING)
    elif initial_outliers:
        scaler.reject_outliers("initial", per_dataset=True)
    stages = 5 + (params.reflection_selection.intensity_choice == "combine")
    log.phase("scaling", stages)
    log.stage("round 1 (L-BFGS)")
    scaler.lbfgs_round("Round 1")
    scaler.expand()
    log.advance()
    log.stage("outlier rejection")
    scaler.reject_outliers("after round 1")
    log.advance()
    if params.reflection_selection.intensity_choice == "combine":
        log.stage("intensity combination")
        scaler.combine_intensities()
        scaler.reject_outliers("after intensity combination")
        log.advance()
    log.stage("round 2 (L-BFGS)")
    scaler.lbfgs_round("Round 2")
    scaler.expand()
    scaler.reject_outliers("after round 2")
    log.advance()
    log.stage("error model")
    scaler.refine_error_model("after round 2")
    log.advance()
    with_covariance = False
    if full_matrix:
        log.stage("full-matrix round (Levenberg-Marquardt)")
        with_covariance = scaler.full_matrix_round()
    else:
        log.stage("round 3 (L-BFGS)")
        scaler.lbfgs_round("Round 3")
    scaler.normalise_gauge()
    scaler.expand(with_covariance=with_covariance)
    log.stage("final outliers and error model")
    scaler.reject_outliers("final")
    scaler.refine_error_model("final")
    log.advance()
    log.end()


def _merging_stats(params: Any, table: ReflectionTable, experiments: list, log: _Log, *, anomalous: bool = True,
                   quiet: bool = False, observations: Any = None):
    """Merging statistics of the scaled rows (None, with a log line, when there are none).
    observations: scaled_observations(table, experiments, anomalous=False) when the caller
    has built them already (the serial path reuses them for its report)."""
    from jaxscale.merge.merging import scaled_observations
    from jaxscale.merge.statistics import merging_statistics

    try:
        obs = scaled_observations(table, experiments, anomalous=False) if observations is None else observations
        stats = merging_statistics(obs, n_bins=params.output.merging.nbins or 20,
                                   use_internal_variance=params.output.use_internal_variance,
                                   anomalous=anomalous, d_min=params.cut_data.d_min)
    except InputError as exc:
        log(f"No merging statistics: {exc}")
        return None
    if not quiet:
        from jaxscale.report.text import merging_report

        text = merging_report(stats)
        show = getattr(log.progress, "show_statistics", None)
        if show is None:
            log(text)
        else:  # the console draws its own table; the log keeps dials.scale's text
            log.lines.append(text)
            show(stats, text)
    return stats


def scale_datasets(params: Any, experiments: list, tables: list[ReflectionTable], origins: list[str], log: _Log,
                   *, full_matrix: bool | None = None, timings: dict[str, float] | None = None,
                   statistics: bool = True) -> ScalePass:
    """Prepare, model and scale the given data sets (one dials.scale run, no files written).

    Targeted scaling runs first when a reference is given or when scaled and unscaled data
    sets are mixed (`target_cycle`); full_matrix overrides scaling_options.full_matrix
    (ΔCC½ cycles scale without it).
    """
    timings = {} if timings is None else timings
    t0 = time.perf_counter()
    experiments, tables, origins, prepared = _prepare(params, experiments, tables, origins, log)
    timings["prepare"] = timings.get("prepare", 0.0) + time.perf_counter() - t0
    t0 = time.perf_counter()
    inputs = _dataset_inputs(experiments, prepared)
    model = build_model(inputs, params, states=_model_states(inputs, prepared, origins, params, log))
    from jaxscale import targeted

    plan = targeted.plan(params, model)
    if plan.reference_path is None:
        anchor_degenerate_scale(model, log)
    scaler = _Scaler(params, experiments, prepared, model, log)
    if params.scaling_options.use_free_set:
        scaler.choose_free_set(params.scaling_options.free_set_percentage or 10.0,
                               params.scaling_options.free_set_offset or 0)
    log(f"Model: {', '.join(f'{k} {np.size(v)}' for k, v in model.params.items())} parameters")
    timings["model"] = timings.get("model", 0.0) + time.perf_counter() - t0
    t0 = time.perf_counter()
    full = params.scaling_options.full_matrix if full_matrix is None else full_matrix
    scaler.full_matrix_planned, scaler.statistics_planned = bool(full), bool(statistics)
    out_datasets = list(range(len(experiments)))
    if plan.active:
        go_on, out_datasets = targeted.targeted_scaling(scaler, params, plan, tables, full, log)
        if go_on:
            _scaling_algorithm(scaler, params, tables, full, log, initial_outliers=False)
    else:
        _scaling_algorithm(scaler, params, tables, full, log)
    timings["scaling"] = timings.get("scaling", 0.0) + time.perf_counter() - t0
    t0 = time.perf_counter()
    out_table, out_experiments = _output_tables(scaler, experiments, prepared, params, log, datasets=out_datasets)
    stats = _merging_stats(params, out_table, out_experiments, log) if statistics else None
    work_free = free_set_statistics(scaler, params, out_table, out_experiments, log) \
        if params.scaling_options.use_free_set else None
    timings["statistics"] = timings.get("statistics", 0.0) + time.perf_counter() - t0
    return ScalePass(out_table, out_experiments, [origins[k] for k in out_datasets], scaler, stats,
                     out_datasets, work_free)


def free_set_statistics(scaler: "_Scaler", params: Any, table: ReflectionTable, experiments: list,
                        log: _Log) -> dict | None:
    """Work/free Rmeas and CC½ (DIALS' work_free_stats) of the scaled table: the free set is
    the groups left out of minimisation (target.md §6)."""
    from jaxscale.data.symmetry import pack_hkl

    free_keys = np.unique(pack_hkl(scaler.free_set_asu))
    asu, _ = map_to_asu(np.asarray(table["miller_index"]), experiments[0].space_group,
                        anomalous=bool(params.anomalous))
    in_free = np.isin(pack_hkl(asu), free_keys)
    out = {}
    for name, rows in (("work", ~in_free), ("free", in_free)):
        stats = _merging_stats(params, table.select(np.flatnonzero(rows)), experiments, log, anomalous=False,
                               quiet=True)
        if stats is None:
            return None
        out[name] = stats
    w, f = out["work"].overall, out["free"].overall
    result = {"work_rmeas": float(w.r_meas[0]), "free_rmeas": float(f.r_meas[0]),
              "rmeas_gap": float(f.r_meas[0] - w.r_meas[0]), "work_cc_half": float(w.cc_half[0]),
              "free_cc_half": float(f.cc_half[0]), "cc_half_gap": float(w.cc_half[0] - f.cc_half[0])}
    log(f"Free set ({int(in_free.sum())} reflections): Rmeas work {result['work_rmeas']:.5f} free "
        f"{result['free_rmeas']:.5f}; CC1/2 work {result['work_cc_half']:.5f} free {result['free_cc_half']:.5f}")
    return result


def split_by_dataset(table: ReflectionTable, experiments: list) -> list[ReflectionTable]:
    """A scaled table (id = data-set position) as one table per experiment (id 0), the form
    `scale_datasets` takes (so a later pass continues from the scaled models)."""
    rows_of_id = RowsByValue(np.asarray(table["id"]))
    out = []
    for k, expt in enumerate(experiments):  # loop over data sets
        sub = table.select(rows_of_id(k))
        sub["id"] = np.zeros(len(sub), dtype=np.int32)
        sub.identifiers = {0: expt.identifier}
        out.append(sub)
    return out


# ------------------------------------------------------------------------- public entry
def run(params: Any, inputs: Sequence[str], progress: Any | None = None) -> ScaleResult:
    """Scale the inputs with dials.scale's algorithm; write outputs named in params.output."""
    from jaxscale.serial import run_serial, serial_requested

    tables_ahead = _read_tables_ahead(params, inputs)  # .refl bytes off the disk meanwhile
    experiments_read: dict = {}  # .expt files read to decide, handed on (10^5 stills: seconds to parse)
    if serial_requested(params, inputs, experiments_read):  # many KB stills: flat-array serial path
        return run_serial(params, inputs, progress, experiments_read, tables_ahead)
    # JAX's one-time compilation set-up, in the background while the inputs are read
    warm_up()
    log = _Log(progress)
    timings: dict[str, float] = {}
    t_start = time.perf_counter()
    log.phase("reading input", None)
    params, experiments, tables, origins = _read_datasets(params, inputs, log, experiments_read, tables_ahead)
    del experiments_read, tables_ahead
    log.end()
    if not experiments:
        raise InputError(None, "no data sets to scale")
    if params.scaling_options.check_consistent_indexing:
        experiments, tables = _reindex_consistently(params, experiments, tables, log)
    extra_jobs: list = []
    filtering = cross_validation = None
    if params.cross_validation.cross_validation_mode:
        from jaxscale.cross_validation import cross_validate

        cross_validation, last = cross_validate(params, experiments, tables, origins, log)
        log("Cross validation analysis does not produce scaling output files, rather it gives insight into "
            "the dataset. Choose an appropriate parameterisation and rerun scaling without cross_validation_mode.")
        report = _cross_validation_report(params, last, cross_validation, log)
        timings["total"] = time.perf_counter() - t_start
        outputs = _write_log_only(params, log, report)
        return ScaleResult(last.table, last.experiments, last.scaler.model, last.scaler.x, last.scaler.error_model,
                           last.scaler.error_model_result, last.stats, log.lines, timings, last.scaler.imid, outputs,
                           cross_validation=cross_validation)
    filtering_report = None
    if params.filtering.method == "deltacchalf":
        from jaxscale.filtering import scale_and_filter, results_job

        result, filtering, filtering_report = scale_and_filter(params, experiments, tables, origins, log, timings)
        job = results_job(params, filtering)
        if job is not None:
            extra_jobs.append(job)
    else:
        result = scale_datasets(params, experiments, tables, origins, log, timings=timings)
    scaler, out_table, out_experiments, stats = result.scaler, result.table, result.experiments, result.stats

    t0 = time.perf_counter()
    params_tree = {k: np.asarray(v) for k, v in scaler.target.params_of(scaler.x).items()}
    report = None
    if stats is not None and (params.output.html or params.output.json):
        from jaxscale.cross_validation import work_free_section
        from jaxscale.outputs import report_data

        report = report_data(stats, out_table, out_experiments, scaler.model, params_tree,
                             scaler.error_model_result, params, datasets=result.datasets,
                             filtering=filtering_report,
                             cross_validation=work_free_section(result.work_free) if result.work_free else None)
    timings["report"] = time.perf_counter() - t0
    outputs = _write_outputs(params, out_table, out_experiments, stats, report, scaler, log, timings, t_start,
                             extra_jobs)
    return ScaleResult(out_table, out_experiments, scaler.model, scaler.x, scaler.error_model,
                       scaler.error_model_result, stats, log.lines, timings, scaler.imid, outputs,
                       filtering=filtering, work_free=result.work_free)


def reindex_crystal(crystal: dict, op: str) -> dict:
    """A .expt crystal dict in the setting of the reindexing op h' = h M (e.g. 'k,h,-l').

    A h is unchanged: A' = A M^-T (static and at every scan point), so the real-space
    rows become R' = M^T R; the recalculated cell follows the metric M^T G M. The B
    covariance and cell esds are dropped, as dxtbx's Crystal.change_basis does.
    """
    from jaxscale.data.consistent_indexing import op_hkl_matrix

    m = op_hkl_matrix(op).astype(np.float64)  # (3, 3)
    m_inv_t = np.linalg.inv(m).T
    out = {k: v for k, v in crystal.items()
           if k not in ("B_covariance", "recalculated_cell_parameter_sd", "recalculated_cell_volume_sd")}
    rows = np.array([crystal["real_space_a"], crystal["real_space_b"], crystal["real_space_c"]], dtype=np.float64)
    new_rows = m.T @ rows  # (3, 3) rows a', b', c'
    for name, v in zip(("real_space_a", "real_space_b", "real_space_c"), new_rows):
        out[name] = [float(x) for x in v]
    if crystal.get("A_at_scan_points"):
        a_sp = np.asarray(crystal["A_at_scan_points"], dtype=np.float64).reshape(-1, 3, 3) @ m_inv_t
        out["A_at_scan_points"] = a_sp.reshape(-1, 9).tolist()
    if crystal.get("recalculated_unit_cell"):
        import gemmi

        orth = np.array(gemmi.UnitCell(*crystal["recalculated_unit_cell"]).orth.mat.tolist())  # columns a, b, c
        basis = m.T @ orth.T  # rows a', b', c'
        length = np.linalg.norm(basis, axis=1)
        angle = lambda i, j: float(np.degrees(np.arccos(basis[i] @ basis[j] / (length[i] * length[j]))))  # noqa: E731
        out["recalculated_unit_cell"] = [*map(float, length), angle(1, 2), angle(0, 2), angle(0, 1)]
    return out


def _reindex_consistently(params: Any, experiments: list, tables: list[ReflectionTable], log: _Log
                          ) -> tuple[list, list[ReflectionTable]]:
    """check_consistent_indexing: resolve the indexing ambiguity between data sets (as
    dials.cosym before scaling); reindex each table's miller indices and its experiment's
    crystal model by the same operation (so scaled.expt and scaled.refl agree)."""
    from jaxscale.data.consistent_indexing import IDENTITY, resolve_indexing_ambiguity

    if len(tables) < 2:
        log("check_consistent_indexing: one data set, nothing to reindex")
        return experiments, tables
    cols = ("intensity.prf.value", "intensity.prf.variance") if all(
        "intensity.prf.value" in t for t in tables) else ("intensity.sum.value", "intensity.sum.variance")
    sizes = [len(t) for t in tables]
    dataset = np.repeat(np.arange(len(tables)), sizes)
    miller = np.concatenate([np.asarray(t["miller_index"]) for t in tables])
    intensity = np.concatenate([np.asarray(t[cols[0]], dtype=np.float64) for t in tables])
    variance = np.concatenate([np.asarray(t[cols[1]], dtype=np.float64) for t in tables])
    indexed = np.concatenate([np.asarray(t["id"]) >= 0 for t in tables])
    variance = np.where(indexed, variance, -1.0)  # unindexed rows take no part in the decision
    res = resolve_indexing_ambiguity(miller, intensity, variance, dataset, len(tables),
                                     experiments[0].space_group, best_unit_cell(experiments),
                                     d_min=params.cut_data.d_min)
    for line in res.log_lines:
        log(line)
    log(f"Consistent indexing: candidate operations {', '.join(res.candidate_ops)}; "
        f"{res.n_flipped} data set(s) reindexed")
    bounds = np.r_[0, np.cumsum(sizes)]
    out, out_experiments = [], []
    for k, (t, expt, op) in enumerate(zip(tables, experiments, res.ops)):  # loop over data sets
        log(f"  data set {k}: {op} (confidence {res.confidence[k]:.3f})")
        if op != IDENTITY:
            t = t.copy()
            t["miller_index"] = res.reindexed_miller[bounds[k]:bounds[k + 1]].astype(np.int32)
            expt = dataclasses.replace(expt, crystal=reindex_crystal(expt.crystal, op))
        out.append(t)
        out_experiments.append(expt)
    return out_experiments, out


def _parameter_text(params: Any) -> str:
    """Every parameter in effect (phil), for the top of the log."""
    from jaxscale.params import format_phil

    return format_phil(params, expert_level=10)


def _output_tables(scaler: _Scaler, experiments: list, prepared: list, params: Any, log: _Log,
                   datasets: Sequence[int] | None = None):
    """Per data set (those in `datasets`, default all): scales, variances (§5.5), flags;
    concatenated with id = position in the output."""
    o = scaler.obs
    out_tables = []
    cutoff = params.cut_data.small_scale_cutoff or 0.0
    esd_flat = np.sqrt(np.maximum(np.diag(scaler.covariance), 0.0)) if getattr(scaler, "covariance", None) is not None else None
    params_tree = scaler.target.params_of(scaler.x)
    esd_tree = None if esd_flat is None else {k: np.asarray(v) for k, v in scaler.target.params_of(esd_flat).items()}
    out_experiments = []
    for pos, k in enumerate(range(len(experiments)) if datasets is None else datasets):  # loop over data sets
        expt, prep = experiments[k], prepared[k]
        # the columns are shared, not copied: every column the output changes is replaced by a
        # new array (set_scaled_columns), and a deep copy was the peak memory of a 10^6-row job
        t = ReflectionTable(dict(prep.table.columns), dict(prep.table.identifiers), dict(prep.table.dials_types))
        n = len(t)
        sel = o.of_dataset(k)
        rows = o.row[sel]
        g = np.ones(n) if "inverse_scale_factor" not in t else np.asarray(t["inverse_scale_factor"], dtype=np.float64).copy()
        g[rows] = scaler.g[sel]
        var_g = np.zeros(n)
        var_g[rows] = scaler.var_g[sel]
        intensity = np.asarray(t["intensity"], dtype=np.float64).copy()
        variance = np.asarray(t["variance"], dtype=np.float64).copy()
        intensity[rows] = o.intensity[sel]
        variance[rows] = o.variance[sel]
        has_cov = getattr(scaler, "covariance", None) is not None
        variance = propagate_variance(variance, intensity, g, var_g if has_cov else None, scaler.output_error_model(k))
        out_rows = np.zeros(n, dtype=bool)
        out_rows[rows] = scaler.outlier[sel]
        set_scaled_columns(t, g, var_g, intensity, variance, out_rows, cutoff)
        t["id"] = np.full(n, pos, dtype=np.int32)
        t.identifiers = {pos: expt.identifier}
        out_tables.append(t)
        new = dataclasses.replace(expt)
        new.scaling_model = scaler.model.to_dials_json(
            k, params=params_tree, esds=esd_tree, error_model=scaler.output_error_model(k),
            imid=scaler.imids.get(k, scaler.imid))
        out_experiments.append(new)
        n_small = int(np.count_nonzero(g < cutoff))
        if n_small:
            log(f"{n_small} reflections of data set {k} have inverse scale < {cutoff} and are excluded")
    # one data set: its table as it is (concatenating would copy every column once more: the
    # peak memory of a 10^6-row job)
    table = out_tables[0] if len(out_tables) == 1 else ReflectionTable.concatenate(out_tables)
    return table, out_experiments


def _cross_validation_report(params: Any, last: "ScalePass", result: Any, log: _Log) -> dict | None:
    """The HTML report of a cross-validation run: the work/free table of every configuration,
    with the merging statistics and model of the last fold (None without output.html)."""
    from jaxscale.cross_validation import report_section
    from jaxscale.outputs import report_data

    if not params.output.html:
        return None
    stats = _merging_stats(params, last.table, last.experiments, log, quiet=True)
    if stats is None:
        return None
    scaler = last.scaler
    params_tree = {k: np.asarray(v) for k, v in scaler.target.params_of(scaler.x).items()}
    return report_data(stats, last.table, last.experiments, scaler.model, params_tree, scaler.error_model_result,
                       params, title="jaxscale cross-validation (statistics and model of the last fold)",
                       datasets=last.datasets, cross_validation=report_section(result))


def _write_log_only(params: Any, log: _Log, report: dict | None = None) -> dict[str, str]:
    """Write just the log, and the HTML report when given (cross-validation writes no scaled data)."""
    from jaxscale.io.atomic import atomic_write_text
    from jaxscale.outputs import write_all

    jobs = []
    if report is not None:
        from jaxscale.report.html import write_report

        jobs.append(("html", params.output.html, lambda path: write_report(path, report)))
    if params.output.log:
        text = ("Parameters in effect:\n" + _parameter_text(params).rstrip("\n") + "\n\n" + "\n".join(log.lines)
                + "\n")
        jobs.append(("log", params.output.log, lambda path: atomic_write_text(path, text)))
    log.phase("writing outputs", len(jobs))
    try:
        return write_all(jobs, on_written=lambda name: log.advance())
    finally:
        log.end() if jobs else {}


def _write_outputs(params: Any, table: ReflectionTable, experiments: list, stats: Any, report: dict | None,
                   scaler: "_Scaler", log: _Log, timings: dict[str, float], t_start: float,
                   extra_jobs: Sequence = ()) -> dict[str, str]:
    """Write every output together (jaxscale.outputs.write_all): all or none."""
    from jaxscale.io.atomic import atomic_write_text
    from jaxscale.outputs import output_jobs, write_all

    run_info = {"imid": scaler.imid, "error_model": scaler.error_model,
                "n_outliers": int(scaler.outlier.sum()), "n_datasets": len(experiments),
                "models": [scaler.model.states[k].model_id for k in sorted(scaler.model.states)],
                "timings": timings}
    jobs = output_jobs(params, table, experiments, stats, report, run_info) + list(extra_jobs)
    for name, path, _ in jobs:
        log(f"Saving {name} to {path}")
    timings["total"] = time.perf_counter() - t_start
    log(f"Total time taken: {timings['total']:.2f}s")
    if params.output.log:
        text = ("Parameters in effect:\n" + _parameter_text(params).rstrip("\n") + "\n\n"
                + "\n".join(log.lines) + "\n")
        jobs.append(("log", params.output.log, lambda path: atomic_write_text(path, text)))
    log.phase("writing outputs", len(jobs))
    try:
        return write_all(jobs, on_written=lambda name: log.advance())
    finally:
        log.end()


__all__ = ["ScaleResult", "run"]
