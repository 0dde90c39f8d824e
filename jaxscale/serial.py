"""Lean scaling of very large still sets: one KB model per still, everything as flat arrays.

`scale_stills` runs dials.scale's round structure for stills (initial outlier rejection,
two L-BFGS rounds each followed by outlier rejection, basic error model, a full-matrix
round, final outlier rejection and error model) with no per-still Python objects:
parameters are x f[n_experiments, 2] (k, B), observations are flat arrays, sharded over
all devices (`jaxscale.target.sharding`), and the full-matrix round is the block-structured
LM with PCG of `jaxscale.optimize.structured`.

Degeneracy: g_i I_h is unchanged by k_e -> c k_e, I_h -> I_h / c for all stills at once, and
(where d is constant within a symmetry group) by B_e -> B_e + beta,
I_h -> I_h exp(-beta/(2 d_h^2)). All stills are refined free (as DIALS does for KB stills): the
gradient has no component along these directions, so the optimisers never move along them.
Fixing one still instead would turn them into directions whose curvature is that of a single
still spread over all n_experiments parameters (condition number ~ n_experiments), along which
L-BFGS and PCG stop long before convergence (measured: every scale 20 % off relative to the
fixed still at 3,000 stills). After the last minimisation the solution is moved to the
reference gauge of the first still with data (k_ref = 1, B_ref = 0: exact for k; for B exact
where d is constant within a group, otherwise the overall B is only weakly determined by
unit-cell differences and is fixed by this convention), and the parameter esds are those of
that gauge.

`simulate_flat_stills` generates planted-truth KB stills directly as flat arrays (for
benchmarks and tests at sizes where building reflection tables would dominate).
"""
from __future__ import annotations

import dataclasses
import json
import time
import types
from typing import TYPE_CHECKING, Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxscale.compilation import Program
from jaxscale.errors import determine_outliers, refine_error_model
from jaxscale.errors.outliers import blocks_of_runs, group_order, normalised_intensity_outliers
from jaxscale.exceptions import InputError
from jaxscale.optimize.structured import StructuredSolver, minimise_structured, precompile_step, variance_diagonal
from jaxscale.target.sharding import (
    FAST_COMPILE_MAX_ROWS as TARGET_FAST_COMPILE_MAX_ROWS,
    KBStillsTarget,
    StillObservations,
    make_observations,
    observation_mesh,
    observation_rows,
    still_layout,
)

if TYPE_CHECKING:
    from jaxscale.data.combine import ImidChoice

RMSD_CONVERGED = "RMSD no longer decreasing"
GRADIENT_SMALL = "gradient norm below tolerance"
MAX_ITERATIONS = "Reached maximum number of iterations"
NOT_FINITE = "objective not finite"


@dataclasses.dataclass
class SerialResult:
    """Per-still parameters, per-observation scales/outliers, merged intensities, log."""

    scale: np.ndarray  # f[n_experiments] k_e
    b_factor: np.ndarray  # f[n_experiments] B_e
    scale_sigma: np.ndarray | None  # f[n_experiments] esd of k_e (0 for fixed), None without full matrix
    b_factor_sigma: np.ndarray | None  # f[n_experiments]
    bound_sigma: np.ndarray | None  # f[n_experiments, 2] esd of (k, B) of each still given I_h (its own
    # 2x2 block of J^T J only): the per-still bound an efficient estimator reaches; None without full matrix
    inverse_scale: np.ndarray  # f[n_obs] g_i
    outlier: np.ndarray  # bool[n_obs]
    ih: np.ndarray  # f[n_groups] merged intensity (0 for groups without data)
    ih_sigma: np.ndarray  # f[n_groups] sqrt(1 / sum w g^2) (inf without data)
    error_model: tuple[float, float]
    fixed_experiment: int
    rounds: list[dict]  # per minimisation round: name, reason, iterations, rmsd history
    log: list[str]
    timings: dict[str, float]
    intensity: np.ndarray | None = None  # f[n_obs] the intensities scaled (after the combination, if any)
    variance: np.ndarray | None = None  # f[n_obs] their variances (before the error model)
    imid: float | None = None  # chosen profile/summation combination (0 prf, 1 sum, else Imid); None: not run
    combination: "ImidChoice | None" = None  # the candidates' Rmeas / CC1/2 (None: not run)
    error_model_result: object | None = None  # the final refine_error_model result (report plots)


# ------------------------------------------------------------------ profile/summation combination
@dataclasses.dataclass
class IntensityCandidates:
    """Per observation (n_obs,), what the profile/summation combination needs (spec overview.md §6,
    as jaxscale.data.combine does it on tables): raw profile and summation values (the summation
    ones divided by p, p^2; 1/p = 1 where p <= 0), conv = lp/qe, which integrations each row has,
    rows eligible for the Imid test (integrated by both, both variances > 0, p > 0) and the
    non-anomalous group of each row (Rmeas is merged non-anomalously)."""

    i_prf: np.ndarray
    v_prf: np.ndarray
    i_sum: np.ndarray
    v_sum: np.ndarray
    conv: np.ndarray
    has_prf: np.ndarray  # bool: integrated_prf
    has_sum: np.ndarray  # bool: integrated_sum
    testable: np.ndarray  # bool
    group: np.ndarray  # int, 0..n_groups-1 (dense)

    @classmethod
    def from_table(cls, table, rows: np.ndarray, group: np.ndarray) -> "IntensityCandidates | None":
        """From a prepared table's `rows` (None without profile and summation columns)."""
        from jaxscale.data import flags as F
        from jaxscale.data.prepare import inverse_partiality

        if "intensity.prf.value" not in table or "intensity.sum.value" not in table:
            return None
        col = lambda name: np.asarray(table[name], dtype=np.float64)[rows]  # noqa: E731
        inv_p = inverse_partiality(table)[rows]
        flags = np.asarray(table["flags"])[rows]
        v_prf, v_sum = col("intensity.prf.variance"), col("intensity.sum.variance")
        testable = F.has_all(flags, F.INTEGRATED) & (v_prf > 0) & (v_sum > 0)
        if "partiality" in table:
            testable &= col("partiality") > 0
        return cls(col("intensity.prf.value"), v_prf, col("intensity.sum.value") * inv_p, v_sum * inv_p * inv_p,
                   col("prescaling_correction"), F.has_all(flags, F.INTEGRATED_PRF),
                   F.has_all(flags, F.INTEGRATED_SUM), testable, np.asarray(group, dtype=np.int64))

    @classmethod
    def concatenate(cls, parts: list) -> "IntensityCandidates":
        return cls(*(np.concatenate([getattr(p, f.name) for p in parts]) for f in dataclasses.fields(cls)))


def apply_imid_flat(c: IntensityCandidates, imid: float) -> tuple[np.ndarray, np.ndarray]:
    """Scaling (I, V) (n_obs,) for a chosen Imid: jaxscale.data.combine.apply_imid on flat arrays."""
    from jaxscale.data.combine import PROFILE, SUMMATION, blend

    if imid == SUMMATION:
        intensity = np.where(c.has_sum, c.i_sum, c.i_prf) * c.conv
        variance = np.where(c.has_sum, c.v_sum, c.v_prf) * c.conv * c.conv
        return intensity, variance
    intensity = np.where(c.has_prf, c.i_prf, c.i_sum)
    variance = np.where(c.has_prf, c.v_prf, c.v_sum)
    if imid != PROFILE:
        both = c.has_prf & c.has_sum
        i_c, v_c = blend(c.i_prf, c.i_sum, c.v_prf, c.v_sum, imid)
        intensity, variance = np.where(both, i_c, intensity), np.where(both, v_c, variance)
    return intensity * c.conv, variance * c.conv * c.conv


def rmeas_and_cc_half(intensity: np.ndarray, sigma: np.ndarray, group: np.ndarray, first: np.ndarray,
                      n_groups: int) -> tuple[float, float]:
    """(Rmeas, CC1/2) of observations with dense group ids, as jaxscale.data.combine.rmeas and
    cc_half_random compute them (sigma > 0 and I/sigma > 1 kept; inverse-variance weighted group
    means; CC1/2 of the half means with the fixed split `first`, display only), in one pass of
    eight bincounts without compacting the kept rows. Rmeas -1 when nothing is kept."""
    with np.errstate(divide="ignore", invalid="ignore"):
        keep = (sigma > 0) & (intensity / sigma > 1.0)
        w = np.where(keep, 1.0 / (sigma * sigma), 0.0)
    if not keep.any():
        return -1.0, 0.0
    i = np.where(keep, intensity, 0.0)
    count = lambda weights: np.bincount(group, weights, minlength=n_groups)  # noqa: E731
    n, sw, swi = count(keep.astype(np.float64)), count(w), count(w * i)
    with np.errstate(divide="ignore", invalid="ignore"):
        mean = swi / sw
    dev = count(np.where(keep, np.abs(i - mean[group]), 0.0))
    multi = n > 1
    den = count(i)[multi].sum()
    r = 0.0 if den == 0 else float((np.sqrt(n[multi] / (n[multi] - 1.0)) * dev[multi]).sum() / den)
    h = first & keep
    n1, sw1, swi1 = count(h.astype(np.float64)), count(w * h), count(w * i * h)
    use = (n1 > 0) & (n - n1 > 0)
    if use.sum() < 2:
        return r, 0.0
    m1 = swi1[use] / sw1[use]
    m2 = (swi[use] - swi1[use]) / (sw[use] - sw1[use])
    return r, float(np.corrcoef(m1, m2)[0, 1])


def choose_imid_flat(c: IntensityCandidates, g: np.ndarray, outlier: np.ndarray, imids=None,
                     seed: int = 0) -> "ImidChoice":
    """The Imid of lowest Rmeas (jaxscale.data.combine.choose_imid, all stills jointly: DIALS'
    combine.joint_analysis) on flat arrays: test rows = testable, not outliers, g > 0; scaled
    I conv/g, sigma sqrt(V) conv/g merged by the non-anomalous group with dense bincounts.
    CC1/2 (display only) uses one random half split of the test rows (balanced within each
    group) for every candidate."""
    from jaxscale.data.combine import PROFILE, ImidChoice, blend, candidate_imids

    test = c.testable & ~outlier & (g > 0)
    rows = np.flatnonzero(test)
    if rows.size == 0 and not imids:
        return ImidChoice(PROFILE, [], [], [], 0)  # nothing to test: profile (as DIALS)
    dense = c.group[rows]
    n_groups = int(c.group.max()) + 1
    rng = np.random.default_rng(seed)
    # test rows by group, in random order within each group: the CC1/2 half split is the first
    # half of each group (one sort for all candidates)
    order = np.argsort(dense + rng.random(rows.size))
    rows, dense = rows[order], dense[order]
    counts = np.bincount(dense, minlength=n_groups)
    start = np.concatenate([[0], np.cumsum(counts)[:-1]])
    rank = np.arange(rows.size) - start[dense]
    first = rank < (counts // 2 + ((counts % 2 == 1) & (rng.random(n_groups) < 0.5)))[dense]
    i_prf, v_prf, i_sum, v_sum = c.i_prf[rows], c.v_prf[rows], c.i_sum[rows], c.v_sum[rows]
    scale = c.conv[rows] / g[rows]
    candidates = list(imids) if imids else candidate_imids(i_sum)
    r_list, cc_list = [], []
    for imid in candidates:  # a handful of candidates
        if imid == PROFILE:
            i, v = i_prf, v_prf
        elif imid == 1.0:
            i, v = i_sum, v_sum
        else:
            i, v = blend(i_prf, i_sum, v_prf, v_sum, imid)
        r, cc = rmeas_and_cc_half(i * scale, np.sqrt(v) * scale, dense, first, n_groups)
        r_list.append(r)
        cc_list.append(cc)
    valid = [k for k, r in enumerate(r_list) if r >= 0]
    best = PROFILE if not valid else candidates[min(valid, key=lambda k: r_list[k])]
    return ImidChoice(best, candidates, r_list, cc_list, int(rows.size))


# ------------------------------------------------------------------ L-BFGS on the sharded target
_LBFGS_CACHE: dict[tuple, tuple] = {}


def _lbfgs_step(target: KBStillsTarget, memory_size: int):
    """The round's two programs: `start(x, obs, free, anchor) -> state` (optax's initial state
    with the objective's value and gradient at x stored in it) and `step(x, state, obs, free,
    anchor) -> (x_new, state_new, value_new, |grad_new|)`.

    The step takes the value and gradient at x from the state (the zoom line search stores
    them at the accepted point), as `optax.value_and_grad_from_state` would; that function
    also traces a `cond` branch computing them when the state has none, a third copy of the
    objective in the step's program. Here `start` computes them once instead, so the step
    holds only the line search's two copies (on 100 stills: ~1/4 less to trace, lower and
    compile), and a round compiles two programs instead of three (init, value_and_grad, step)."""
    import optax  # noqa: PLC0415 (~0.05 s to import: only where a serial job runs)

    key = (id(target), memory_size)
    hit = _LBFGS_CACHE.get(key)
    if hit is not None and hit[0] is target:
        return hit[1], hit[2]
    opt = optax.lbfgs(
        memory_size=memory_size,
        linesearch=optax.scale_by_zoom_linesearch(max_linesearch_steps=20, curv_rtol=0.9),
    )

    # jitted inside the programs: its trace (and the AD transforms of it) is cached, so the
    # line search's second copy and start's copy are not traced again (step lowering ~0.03 s less)
    objective = jax.jit(target.objective)

    def start(x, obs, free, anchor):
        fun = lambda y: objective(y, obs, free, anchor)  # noqa: E731
        value, grad = jax.value_and_grad(fun)(x)
        state = optax.tree_utils.tree_set(opt.init(x), value=value, grad=grad)
        # strongly typed like the state `step` returns, so that step is traced once, not twice
        return jax.tree.map(lambda a: jnp.asarray(a, dtype=a.dtype), state)

    def step(x, state, obs, free, anchor):
        fun = lambda y: objective(y, obs, free, anchor)  # noqa: E731
        value, grad = optax.tree_utils.tree_get(state, "value"), optax.tree_utils.tree_get(state, "grad")
        updates, state = opt.update(grad, state, x, value=value, grad=grad, value_fn=fun)
        x_new = optax.apply_updates(x, updates)
        return x_new, state, optax.tree_utils.tree_get(state, "value"), jnp.linalg.norm(
            optax.tree_utils.tree_get(state, "grad") * free
        )

    # small problems compile with the fast options (the step: ~1.4 s with XLA's defaults)
    start = Program(start, rows=observation_rows, max_fast_rows=TARGET_FAST_COMPILE_MAX_ROWS)
    step = Program(step, rows=lambda x, state, obs, *rest: observation_rows(x, obs),
                   max_fast_rows=TARGET_FAST_COMPILE_MAX_ROWS)
    _LBFGS_CACHE[key] = (target, start, step)
    return start, step


def _on_device(a: np.ndarray, dtype=None) -> jax.Array:
    """numpy -> device array by a copy (`jnp.asarray` compiles a conversion program per
    shape and dtype: ~15 ms each on a cold start)."""
    return jax.device_put(np.asarray(a, dtype=dtype))


def lbfgs_round(
    target: KBStillsTarget,
    obs: StillObservations,
    x: jax.Array,
    free: jax.Array,
    n_reflections: int,
    rmsd_tolerance: float = 1e-4,
    max_iterations: int | None = None,
    memory_size: int = 5,
    gradient_tolerance: float = 1e-5,
    before_compile: Callable[[], None] | None = None,
) -> tuple[jax.Array, list[float], str, int]:
    """L-BFGS until DIALS' RMSD test (|dRMSD|/RMSD < tol) or the gradient test; returns
    (x, RMSD history with the start first, stop reason, iterations).

    before_compile: called once the round's programs are traced and lowered, before they are
    compiled: background work queued there (tracing, which holds the GIL) overlaps these
    compilations (which release it) instead of delaying this round's tracing."""
    anchor = x
    start, step = _lbfgs_step(target, memory_size)
    if before_compile is not None:
        start_lowered = start.lower(x, obs, free, anchor)
        step_lowered = step.lower(x, start_lowered.out_info, obs, free, anchor)
        before_compile()
        start_lowered.compile()
        step_lowered.compile()
    from optax.tree_utils import tree_get  # noqa: PLC0415 (optax is imported only where a serial job runs)

    state = start(x, obs, free, anchor)
    value, grad = tree_get(state, "value"), tree_get(state, "grad")
    n_f = float(max(n_reflections, 1))
    history = [float(np.sqrt(float(value) / n_f))]
    limit = np.inf if max_iterations is None else max_iterations
    reason, it = MAX_ITERATIONS, 0
    # norms and the final masking in numpy: no program compiled for them
    if np.linalg.norm(np.asarray(grad)) <= gradient_tolerance * max(1.0, np.linalg.norm(np.asarray(x))):
        return x, history, GRADIENT_SMALL, 0
    while it < limit:
        x_new, state_new, value, gnorm = step(x, state, obs, free, anchor)
        it += 1
        value = float(value)
        if not np.isfinite(value):
            reason = NOT_FINITE
            break
        x, state = x_new, state_new
        history.append(float(np.sqrt(max(value, 0.0) / n_f)))
        if history[-2] <= 0 or abs(history[-2] - history[-1]) / history[-2] < rmsd_tolerance:
            reason = RMSD_CONVERGED
            break
        if float(gnorm) <= gradient_tolerance * max(1.0, np.linalg.norm(np.asarray(x))):
            reason = GRADIENT_SMALL
            break
    return _on_device(np.where(np.asarray(free), np.asarray(x), np.asarray(anchor))), history, reason, it


# ------------------------------------------------------------------ the driver
def _validate(arrays: dict[str, np.ndarray], n_experiments: int, n_groups: int) -> int:
    n = arrays["intensity"].shape[0]
    for name, a in arrays.items():
        if a.ndim != 1 or a.shape[0] != n:
            raise InputError(None, f"{name} has shape {a.shape}, expected ({n},)", field=name)
    if n == 0:
        raise InputError(None, "no observations to scale", field="intensity")
    for name, bound in (("experiment_index", n_experiments), ("miller_asu_group_id", n_groups)):
        a = arrays[name]
        if a.min() < 0 or a.max() >= bound:
            raise InputError(None, f"{name} outside 0..{bound - 1}", field=name)
    if not np.all(arrays["variance"] > 0):
        raise InputError(None, "variances must be positive", field="variance")
    if not np.all(arrays["d"] > 0):
        raise InputError(None, "d-spacings must be positive", field="d")
    return n


def _kb_model_rows(log_k: np.ndarray, b: np.ndarray, i0_obs: np.ndarray, e: np.ndarray, s: np.ndarray,
                   rows: np.ndarray) -> np.ndarray:
    """k_e exp(B_e s) I0 at the given rows (f[rows.size]); elementwise the same numbers as on all rows."""
    e_r = e[rows]
    return np.exp(log_k[e_r] + b[e_r] * s[rows]) * i0_obs[rows]


def _still_chi2_rows(intensity: np.ndarray, m: np.ndarray, w: np.ndarray, e: np.ndarray, rows: np.ndarray,
                     n_experiments: int) -> np.ndarray:
    """sum w (I - m)^2 per still over ascending `rows` (f[n_experiments]): bincount adds in row
    order, so a still whose rows are all included gets the same sum as from every row."""
    return np.bincount(e[rows], w[rows] * (intensity[rows] - m[rows]) ** 2, minlength=n_experiments)


def _rows_of_stills(still_mask: np.ndarray, e: np.ndarray, rows: np.ndarray | None) -> np.ndarray:
    """The ascending rows (among `rows`, all when None) whose still is in still_mask."""
    if rows is None:
        return np.flatnonzero(still_mask[e])
    return rows[still_mask[e[rows]]]


_BLOCK_ROWS = 1 << 17  # rows per block of whole stills (cache-sized; errors.outliers uses the same)


def _gauss_newton_stills(
    intensity: np.ndarray, w: np.ndarray, s: np.ndarray, i0_obs: np.ndarray, e: np.ndarray,
    log_k: np.ndarray, b: np.ndarray, decay: bool, n_inner: int, max_b_step: float,
) -> tuple[np.ndarray, np.ndarray]:
    """n_inner Gauss-Newton steps on (log k, B) of stills 0..len(log_k)-1 (rows ascending within
    each still) against fixed I0 at each row; returns the new (log k, B)."""
    n_experiments = log_k.size

    def model(lk: np.ndarray, bb: np.ndarray, i0_obs: np.ndarray) -> np.ndarray:
        return np.exp(lk[e] + bb[e] * s) * i0_obs

    def still_chi2(m: np.ndarray) -> np.ndarray:
        return np.bincount(e, w * (intensity - m) ** 2, minlength=n_experiments)

    m = model(log_k, b, i0_obs)
    chi2 = still_chi2(m)
    for _ in range(n_inner):  # Gauss-Newton on (log k, B), all these stills at once, steps halved
        r = intensity - m  # where they would increase a still's chi2
        a_kk = np.bincount(e, w * m * m, minlength=n_experiments)
        g_k = np.bincount(e, w * r * m, minlength=n_experiments)
        if decay:
            m_s = m * s
            a_kb = np.bincount(e, w * m * m_s, minlength=n_experiments)
            a_bb = np.bincount(e, w * m_s * m_s, minlength=n_experiments)
            g_b = np.bincount(e, w * r * m_s, minlength=n_experiments)
            det = a_kk * a_bb - a_kb * a_kb
            ok = det > 1e-12 * np.maximum(a_kk * a_bb, 1e-300)
            det_safe = np.where(ok, det, 1.0)
            dk = np.where(ok, (a_bb * g_k - a_kb * g_b) / det_safe, 0.0)
            db = np.where(ok, (a_kk * g_b - a_kb * g_k) / det_safe, 0.0)
        else:
            dk = np.where(a_kk > 0, g_k / np.where(a_kk > 0, a_kk, 1.0), 0.0)
            db = np.zeros(n_experiments)
        # limit |d log k| <= 1 and |dB| <= max_b_step by shortening the step (keeps its direction)
        step = np.minimum(1.0, np.minimum(1.0 / np.maximum(np.abs(dk), 1e-300),
                                          max_b_step / np.maximum(np.abs(db), 1e-300)))
        m_try = model(log_k + step * dk, b + step * db, i0_obs)
        chi2_try = still_chi2(m_try)
        worse = ~(chi2_try <= chi2)
        rows = None  # rows of the stills still to evaluate (None: all)
        for _ in range(5):  # halve the step of stills whose chi2 would increase
            if not worse.any():
                break
            step = np.where(worse, 0.5 * step, step)
            # only the rows of those stills are evaluated again: the other stills' model values
            # and chi2 are final (at 10^7 rows, full re-evaluations were 45 % of this function)
            rows = _rows_of_stills(worse, e, rows)
            m_try[rows] = _kb_model_rows(log_k + step * dk, b + step * db, i0_obs, e, s, rows)
            chi2_try = np.where(worse, _still_chi2_rows(intensity, m_try, w, e, rows, n_experiments), chi2_try)
            worse = ~(chi2_try <= chi2)
        step = np.where(worse, 0.0, step)
        log_k, b = log_k + step * dk, b + step * db
        # stills that took a step keep m_try and chi2_try (the same numbers a full evaluation at
        # the new log k, B gives); the rest (step 0) are evaluated again
        chi2 = chi2_try
        if worse.any():
            rows = _rows_of_stills(worse, e, rows)
            m_try[rows] = _kb_model_rows(log_k, b, i0_obs, e, s, rows)
            chi2 = np.where(worse, _still_chi2_rows(intensity, m_try, w, e, rows, n_experiments), chi2_try)
        m = m_try
    return log_k, b


def _initial_scales(
    intensity: np.ndarray, variance: np.ndarray, group_id: np.ndarray, experiment_index: np.ndarray,
    d: np.ndarray, n_groups: int, n_experiments: int, ref: int, decay: bool = True,
    n_outer: int = 2, n_inner: int = 5, max_b_step: float = 10.0,
) -> np.ndarray:
    """Starting (k_e, B_e) f[n_experiments, 2]: per-still weighted least squares of
    I = k exp(B s) I0_h (s = 1/(2 d^2)) by a few Gauss-Newton steps (a 2x2 system per still,
    sums by bincount; in log k, each still's step halved where its chi^2 would rise), with I0_h
    the weighted group mean of the data scaled by the current
    estimate (unscaled at first); normalised to still `ref` (k = 1, B = 0); (1, 0) where a
    still's system is singular.

    Why B too: the first outlier rejection runs before any refinement. With B = 0 a still of
    true B ~ 15 A^2 (3 sigma of a 5 A^2 spread: dozens of stills in 10^4) has its high-resolution
    observations 3-8x off and loses most of them as outliers, after which its k, B cannot be
    recovered (measured at 3x10^4 stills: k RMS error 5.6 % against a 1.8 % bound).
    """
    w = 1.0 / variance
    s = 1.0 / (2.0 * d * d)
    e = experiment_index
    log_k = np.zeros(n_experiments)
    b = np.zeros(n_experiments)
    # With the group means fixed, each still's fit is independent: the Gauss-Newton steps run on
    # blocks of whole stills (~2^17 rows) whose temporaries stay in cache; at 10^7 rows, passes
    # over all rows streamed from memory and made this step 13x the 10^6 time.
    by_still = None if np.all(e[1:] >= e[:-1]) else np.argsort(e, kind="stable")

    def still_sorted(a: np.ndarray) -> np.ndarray:
        return a if by_still is None else np.take(a, by_still)

    e_b, intensity_b, w_b, s_b = still_sorted(e), still_sorted(intensity), still_sorted(w), still_sorted(s)
    group_b = still_sorted(group_id)
    blocks = blocks_of_runs(e_b, _BLOCK_ROWS)  # whole stills
    for _ in range(n_outer):  # few passes: group means from the current scales
        den, num = np.zeros(n_groups), np.zeros(n_groups)
        for lo in range(0, e.size, _BLOCK_ROWS):  # rows in order: np.add.at adds as one bincount would
            rows = slice(lo, lo + _BLOCK_ROWS)
            e_r = e[rows]
            g = np.exp(log_k[e_r] + b[e_r] * s[rows])
            wg = w[rows] * g
            np.add.at(den, group_id[rows], wg * g)
            np.add.at(num, group_id[rows], wg * intensity[rows])
        i0 = num / np.where(den > 0, den, 1.0)
        for lo, hi in blocks:
            first, last = int(e_b[lo]), int(e_b[hi - 1]) + 1
            log_k[first:last], b[first:last] = _gauss_newton_stills(
                intensity_b[lo:hi], w_b[lo:hi], s_b[lo:hi], i0[group_b[lo:hi]], e_b[lo:hi] - first,
                log_k[first:last], b[first:last], decay, n_inner, max_b_step)
        bad = ~np.isfinite(log_k) | ~np.isfinite(b)
        log_k[bad], b[bad] = 0.0, 0.0
    k = np.exp(log_k)
    return np.stack([k / k[ref], b - b[ref]], axis=1)


def kb_inverse_scale(x: np.ndarray, experiment_index: np.ndarray, d: np.ndarray) -> np.ndarray:
    """g_i = k_e exp(B_e / (2 d_i^2)) (f[n_obs]) from x f[n_experiments, 2]."""
    x = np.asarray(x, dtype=np.float64)
    return x[experiment_index, 0] * np.exp(x[experiment_index, 1] / (2.0 * d * d))


def to_reference_gauge(x: np.ndarray, ref: int, decay_correction: bool = True) -> np.ndarray:
    """x f[n_experiments, 2] moved along the gauge directions to k_ref = 1 (and B_ref = 0)."""
    x = np.array(x, dtype=np.float64)
    x[:, 0] /= x[ref, 0]
    if decay_correction:
        x[:, 1] -= x[ref, 1]
    return x


def kb_gauge(x: np.ndarray) -> np.ndarray:
    """Null-space directions of the KB normal matrix, f[n_experiments, 2, 2]:
    a common factor on every k (dk_e = k_e) and a common shift of every B (dB_e = 1)."""
    x = np.asarray(x, dtype=np.float64)
    zeros, ones = np.zeros(len(x)), np.ones(len(x))
    return np.stack([np.stack([x[:, 0], zeros], 1), np.stack([zeros, ones], 1)], -1)


def scale_stills(
    miller_asu_group_id: np.ndarray,
    intensity: np.ndarray,
    variance: np.ndarray,
    d: np.ndarray,
    experiment_index: np.ndarray,
    n_experiments: int,
    n_groups: int,
    *,
    decay_correction: bool = True,
    rmsd_tolerance: float = 1e-4,
    max_iterations: int | None = None,
    lbfgs_memory: int = 5,
    outlier_rejection: str | None = "standard",
    outlier_zmax: float = 6.0,
    error_model: bool = True,
    error_model_max_obs: int = 500_000,
    full_matrix: bool = True,
    full_matrix_engine: str = "LevMar",
    variance_method: str = "block_gauge",
    cg_tolerance: float | None = 1e-6,
    n_devices: int | None = None,
    dtype=None,
    seed: int = 0,
    initial_scales: str = "estimate",
    emax: float = 0.0,
    d_star_sq: np.ndarray | None = None,
    epsilon: np.ndarray | None = None,
    intensity_candidates: IntensityCandidates | None = None,
    imids: list[float] | None = None,
    precompile_later: Callable[[], None] | None = None,
) -> SerialResult:
    """Scale still shots with one KB model each (g = k_e exp(B_e / (2 d^2))).

    Inputs are flat per-observation arrays (n_obs,): the symmetry-group id of the ASU index,
    the unscaled intensity and its variance, d (A), and the still index 0..n_experiments-1.
    dtype: None = float64 if jax x64 is enabled (jaxscale's default) else float32.
    n_devices: shard the observations over this many devices (None = all).
    initial_scales: "estimate" (one least-squares pass, far fewer L-BFGS iterations) or "ones"
    (k = 1, as DIALS).
    error_model_max_obs: the (a, b) fit uses at most this many observations (whole groups,
    a seeded random subset) — its statistics need far fewer than 10^7.
    cg_tolerance: relative residual of the PCG solve of each LM step (an inexact step is
    re-linearised next iteration; 1e-6 gives the same solution as 1e-10 with ~30 % fewer
    CG iterations at 10^4 stills); None = the solver's default (1e-10 in float64).
    emax: also flag observations whose normalised intensity E^2 = (I/g)/<I/(g eps)>_shell exceeds
    emax^2 in every outlier rejection (DIALS' default 10 on `jaxscale scale`; 0 = off, the default
    here); d_star_sq (default 1/d^2) and epsilon (default 1) per observation.
    intensity_candidates: profile and summation values of every observation (IntensityCandidates):
    after the outlier rejection of round 1 the Imid of lowest Rmeas is chosen for all stills
    jointly (from `imids`, default DIALS' candidate list), the observations take the chosen
    intensities and outliers are rejected again (DIALS' order; overview.md §5, §6).
    precompile_later: queues the caller's background compilations (e.g. the merging
    statistics'), called with the full-matrix ones once the L-BFGS programs are compiled.
    """
    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    log: list[str] = []
    arrays = {
        "miller_asu_group_id": np.asarray(miller_asu_group_id).astype(np.int64, copy=False),
        "intensity": np.asarray(intensity, dtype=np.float64),
        "variance": np.asarray(variance, dtype=np.float64),
        "d": np.asarray(d, dtype=np.float64),
        "experiment_index": np.asarray(experiment_index).astype(np.int64, copy=False),
    }
    n_obs = _validate(arrays, n_experiments, n_groups)
    gid, e, i_obs, v_obs, d = (arrays[k] for k in ("miller_asu_group_id", "experiment_index", "intensity",
                                                   "variance", "d"))
    if dtype is None:
        dtype = jnp.float64 if jax.config.jax_enable_x64 else jnp.float32
    mesh = observation_mesh(n_devices) if (n_devices or len(jax.devices())) > 1 else None
    n_dev = 1 if mesh is None else mesh.devices.size
    log.append(f"{n_obs} observations, {n_experiments} stills, {n_groups} groups; "
               f"{jnp.dtype(dtype).name} on {n_dev} {jax.devices()[0].platform} device(s)")

    per_still = np.bincount(e, minlength=n_experiments)
    has_data = per_still > 0
    free = np.ones((n_experiments, 2), dtype=bool)
    free[~has_data] = False
    if not decay_correction:
        free[:, 1] = False
    ref = int(np.argmax(has_data))
    free_gauge = free.copy()  # the reference gauge: still ref's k and B fixed (for the esds)
    free_gauge[ref] = False
    log.append(f"Scales reported relative to still {ref} (k = 1): an overall scale factor is absorbed by I_h")
    if decay_correction:
        log.append(f"B reported relative to still {ref} (B = 0): a global B is absorbed by I_h "
                   "(d is constant within a group)")
    if np.any(~has_data):
        log.append(f"{int(np.count_nonzero(~has_data))} stills have no observations; their k, B stay at 1, 0")
    x = np.stack([np.ones(n_experiments), np.zeros(n_experiments)], axis=1)
    if initial_scales == "estimate":
        x = _initial_scales(i_obs, v_obs, gid, e, d, n_groups, n_experiments, ref, decay_correction)
        x[~has_data] = (1.0, 0.0)
        log.append("Initial k" + (", B" if decay_correction else "") + ": per-still least squares against "
                   "the group means (Gauss-Newton, two passes)")

    target = KBStillsTarget(mesh)
    by_group = group_order(gid) if outlier_rejection else None  # sorted once for every rejection
    ab = (1.0, 0.02)  # DIALS' initial basic error model
    outlier = np.zeros(n_obs, dtype=bool)

    def weights(ab_):
        return np.where(outlier, 0.0, 1.0 / (ab_[0] ** 2 * (v_obs + (ab_[1] * i_obs) ** 2)))

    layout = still_layout(e, n_experiments, mesh)  # rows by still in chunks, once for every weight update
    obs = make_observations(i_obs, weights(ab), d, gid, e, n_groups, n_experiments, mesh=mesh, dtype=dtype,
                            layout=layout)
    free_j = _on_device(free)
    solver = StructuredSolver(target.residual_fn, target.block_diagonal_fn)
    queued = False

    def queue_background():
        """The full-matrix programs (and the caller's) compile in the background while L-BFGS
        runs. Queued once the L-BFGS programs are lowered (`lbfgs_round(before_compile=)`):
        queued before, their tracing (which holds the GIL) would delay this thread's tracing
        of its own first programs (100 stills, cold: scaling phase median 1.22 vs 1.29 s, min
        0.95 vs 1.12 s over 17/11 interleaved runs, load 2-2.5)."""
        nonlocal queued
        if queued:
            return
        queued = True
        if full_matrix:
            precompile_step(solver, jax.ShapeDtypeStruct(x.shape, dtype), obs, free, sum_sq=False)
        if precompile_later is not None:
            precompile_later()

    timings["setup"] = time.perf_counter() - t_start

    def set_weights():
        nonlocal obs
        obs = make_observations(i_obs, weights(ab), d, gid, e, n_groups, n_experiments, mesh=mesh, dtype=dtype,
                                layout=layout)

    dss = 1.0 / (d * d) if d_star_sq is None else np.asarray(d_star_sq, dtype=np.float64)
    eps = np.ones(n_obs) if epsilon is None else np.asarray(epsilon, dtype=np.float64)

    def reject(label: str):
        nonlocal outlier
        if not outlier_rejection:
            return
        t0 = time.perf_counter()
        g = kb_inverse_scale(x, e, d)
        w_all = 1.0 / (ab[0] ** 2 * (v_obs + (ab[1] * i_obs) ** 2))
        outlier = determine_outliers(i_obs, w_all, g, gid, zmax=outlier_zmax, method=outlier_rejection,
                                     order=by_group)
        n_e2 = 0
        if emax and emax > 0:  # DIALS: the E^2 test after the deviation test in every rejection
            e2 = normalised_intensity_outliers(i_obs / g, dss, eps, emax)
            n_e2 = int(np.count_nonzero(e2 & ~outlier))
            outlier |= e2
        set_weights()
        log.append(f"Outlier rejection ({label}): {int(outlier.sum())} outliers"
                   + (f" ({n_e2} more by E^2 > {emax:g}^2)" if n_e2 else ""))
        timings["outliers"] = timings.get("outliers", 0.0) + time.perf_counter() - t0

    def n_refl() -> int:
        return int(np.count_nonzero(~outlier))

    rounds: list[dict] = []

    def lbfgs(label: str):
        nonlocal x
        t0 = time.perf_counter()
        xj = _on_device(x, dtype)
        xj, hist, reason, its = lbfgs_round(target, obs, xj, free_j, n_refl(), rmsd_tolerance, max_iterations,
                                            lbfgs_memory, before_compile=None if queued else queue_background)
        x = np.asarray(xj, dtype=np.float64)
        rounds.append({"name": label, "reason": reason, "iterations": its, "rmsd": hist})
        log.append(f"{label}: L-BFGS {its} iterations, RMSD {hist[0]:.5g} -> {hist[-1]:.5g} ({reason})")
        timings["lbfgs"] = timings.get("lbfgs", 0.0) + time.perf_counter() - t0

    em_result = None

    def refine_ab(label: str):
        nonlocal ab, em_result
        if not error_model:
            return
        t0 = time.perf_counter()
        keep = ~outlier
        if np.count_nonzero(keep) > error_model_max_obs:
            rng = np.random.default_rng(seed)
            frac = error_model_max_obs / np.count_nonzero(keep)
            keep &= (rng.random(n_groups) < frac)[gid]
        g = kb_inverse_scale(x, e, d)
        res = refine_error_model(i_obs[keep], v_obs[keep], g[keep], gid[keep])
        if res.refined:
            ab = (res.a, res.b)
            em_result = res
            set_weights()
            log.append(f"Error model ({label}): a = {res.a:.5f}, b = {res.b:.5f} from {res.n_reflections} reflections")
        else:
            log.append(f"Error model ({label}) not refined: {res.message}")
        timings["error_model"] = timings.get("error_model", 0.0) + time.perf_counter() - t0

    choice = None

    def combine():
        nonlocal i_obs, v_obs, choice
        t0 = time.perf_counter()
        choice = choose_imid_flat(intensity_candidates, kb_inverse_scale(x, e, d), outlier, imids, seed=seed)
        i_obs, v_obs = apply_imid_flat(intensity_candidates, choice.imid)
        set_weights()
        log.append(f"Intensity combination (all stills, {choice.n_test} test reflections):")
        log.append("  Imid              Rmeas    CC1/2")
        for c, r, cc in zip(choice.imids, choice.rmeas, choice.cc_half):
            log.append(f"  {choice.label(c):16s} {r:7.5f}  {cc:7.5f}")
        log.append(f"Combined intensities chosen: {choice.label(choice.imid)}")
        timings["combination"] = time.perf_counter() - t0

    reject("initial")
    lbfgs("Round 1")
    reject("after round 1")
    if intensity_candidates is not None:
        combine()
        reject("after intensity combination")
    lbfgs("Round 2")
    reject("after round 2")
    refine_ab("after round 2")
    scale_sigma = b_sigma = bound_sigma = None
    if full_matrix:
        t0 = time.perf_counter()
        start, _ = _lbfgs_step(target, lbfgs_memory)

        from optax.tree_utils import tree_get  # noqa: PLC0415

        def sum_sq(x_try, obs_):  # sum w r^2 (= the sum of squared residuals sqrt(w) r) by the compiled L-BFGS
            return tree_get(start(x_try, obs_, free_j, x_try), "value")  # start: no program more

        res = minimise_structured(target.residual_fn, target.block_diagonal_fn, _on_device(x, dtype), obs, free,
                                  n_refl(), engine=full_matrix_engine, rmsd_tolerance=rmsd_tolerance, solver=solver,
                                  cg_tolerance=cg_tolerance, sum_sq=sum_sq)
        x = np.asarray(res.x, dtype=np.float64)
        rounds.append({"name": "Full matrix", "reason": res.reason, "iterations": res.n_iterations,
                       "rmsd": res.rmsd_history, "cg_iterations": res.cg_iterations})
        log.append(f"Full matrix ({full_matrix_engine}, PCG): {res.n_iterations} iterations "
                   f"(CG {sum(res.cg_iterations)}), RMSD {res.rmsd_history[0]:.5g} -> {res.rmsd_history[-1]:.5g} "
                   f"({res.reason})")
        x = to_reference_gauge(x, ref, decay_correction)
        gauge = kb_gauge(x) if decay_correction else kb_gauge(x)[:, :, :1]
        x_dev = _on_device(x, dtype)
        blocks = np.asarray(solver.diagonal_blocks(x_dev, obs, free_j), dtype=np.float64)  # variances and bounds
        var = variance_diagonal(target.residual_fn, target.block_diagonal_fn, x_dev, obs, free_gauge,
                                method=variance_method, gauge=gauge, solver=solver, blocks=blocks)
        var = np.maximum(var * res.chi2_reduced, 0.0)
        scale_sigma, b_sigma = np.sqrt(var[:, 0]), np.sqrt(var[:, 1])
        own = np.diagonal(np.linalg.pinv(blocks, hermitian=True), axis1=1, axis2=2)  # f[n_exp, 2]
        bound_sigma = np.sqrt(np.maximum(own * res.chi2_reduced, 0.0))
        log.append(f"Parameter esds by the '{variance_method}' approximation of diag((J^T J)^-1), "
                   f"chi2_red = {res.chi2_reduced:.4g}")
        timings["full_matrix"] = time.perf_counter() - t0
    else:
        lbfgs("Round 3")
    x = to_reference_gauge(x, ref, decay_correction)
    reject("final")
    refine_ab("final")

    g = kb_inverse_scale(x, e, d)
    w = weights(ab)
    num = np.bincount(gid, w * g * i_obs, minlength=n_groups)
    den = np.bincount(gid, w * g * g, minlength=n_groups)
    ih = np.where(den > 0, num / np.where(den > 0, den, 1.0), 0.0)
    ih_sigma = np.where(den > 0, 1.0 / np.sqrt(np.where(den > 0, den, 1.0)), np.inf)
    timings["total"] = time.perf_counter() - t_start
    log.append(f"Total time {timings['total']:.2f} s")
    return SerialResult(
        scale=x[:, 0].copy(), b_factor=x[:, 1].copy(), scale_sigma=scale_sigma, b_factor_sigma=b_sigma,
        bound_sigma=bound_sigma,
        inverse_scale=g, outlier=outlier, ih=ih, ih_sigma=ih_sigma, error_model=ab, fixed_experiment=ref,
        rounds=rounds, log=log, timings=timings, intensity=i_obs, variance=v_obs,
        imid=None if choice is None else choice.imid, combination=choice, error_model_result=em_result,
    )


# ------------------------------------------------------------------ planted-truth generator
def simulate_flat_stills(
    n_experiments: int,
    obs_per_still: int = 100,
    n_groups: int = 14_000,
    *,
    d_min: float = 2.0,
    d_max: float = 30.0,
    scale_sigma: float = 0.3,
    b_sigma: float = 5.0,
    wilson_b: float = 20.0,
    mean_intensity: float = 1000.0,
    background_variance: float = 50.0,
    error_b: float = 0.03,
    outlier_fraction: float = 0.002,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Planted-truth KB stills as flat arrays (no Miller indices, no reflection table).

    Unique reflections: d drawn uniformly in reciprocal volume between d_max and d_min,
    Wilson intensities (exponential, fall-off wilson_b). Each still sees obs_per_still distinct
    groups; g = k exp(B / (2 d^2)) with k ~ exp(N(0, scale_sigma)), B ~ N(0, b_sigma);
    I = g I_true + noise with counting variance V = g I_true + background_variance and
    true noise sqrt(V + (error_b g I_true)^2); a fraction of gross outliers (+10..30 sigma).
    Returns arrays: group_id, experiment_index, intensity, variance, d, and truth k, B,
    i_true (per group), n_groups, n_experiments.
    """
    rng = np.random.default_rng(seed)
    s3 = rng.uniform(d_max ** -3.0, d_min ** -3.0, n_groups)
    d_group = s3 ** (-1.0 / 3.0)
    i_true = mean_intensity * np.exp(-wilson_b / (2.0 * d_group**2)) * rng.exponential(1.0, n_groups)
    m = min(obs_per_still, n_groups)
    # distinct groups per still: random offset + stride walk over a random permutation
    perm = rng.permutation(n_groups)
    start = rng.integers(0, n_groups, n_experiments)[:, None]
    stride = rng.integers(1, max(2, n_groups // m), n_experiments)[:, None]
    pos = (start + stride * np.arange(m)[None, :]) % n_groups
    group_id = perm[pos].reshape(-1).astype(np.int64)
    experiment_index = np.repeat(np.arange(n_experiments, dtype=np.int64), m)
    k = np.exp(rng.normal(0.0, scale_sigma, n_experiments))
    b = rng.normal(0.0, b_sigma, n_experiments)
    d = d_group[group_id]
    g = k[experiment_index] * np.exp(b[experiment_index] / (2.0 * d * d))
    expected = g * i_true[group_id]
    var_counting = np.maximum(expected, 0.0) + background_variance
    noise = np.sqrt(var_counting + (error_b * expected) ** 2) * rng.standard_normal(expected.size)
    intensity = expected + noise
    out = rng.random(expected.size) < outlier_fraction
    intensity[out] += rng.uniform(10.0, 30.0, int(out.sum())) * np.sqrt(var_counting[out])
    variance = np.maximum(intensity, 0.0) + background_variance
    return {
        "group_id": group_id, "experiment_index": experiment_index, "intensity": intensity, "variance": variance,
        "d": d, "k": k, "B": b, "i_true": i_true, "d_group": d_group, "outlier": out,
        "n_groups": np.asarray(n_groups), "n_experiments": np.asarray(n_experiments),
    }


def scale_errors(
    result: SerialResult, k_true: np.ndarray, b_true: np.ndarray, i_true: np.ndarray, d_group: np.ndarray
) -> dict[str, float]:
    """Accuracy against planted truth after removing the gauge (an overall factor c and B shift
    beta, estimated as the mean log-k and B differences): RMS relative error of k, RMS error of
    B, CC of merged I with c exp(beta / (2 d^2)) I_true; with the full matrix also the RMS of
    the per-still bound esds (k_rms_bound, B_rms_bound) to compare the errors with."""
    has = result.ih > 0
    log_ratio = np.log(result.scale) - np.log(k_true)
    shift = result.b_factor - b_true
    k_rel = np.exp(log_ratio - np.mean(log_ratio)) - 1.0
    b_err = shift - np.mean(shift)
    expected = i_true * np.exp(-np.mean(log_ratio) - np.mean(shift) / (2.0 * d_group**2))
    cc = float(np.corrcoef(result.ih[has], expected[has])[0, 1])
    out = {"k_rms_rel": float(np.sqrt(np.mean(k_rel**2))), "B_rms": float(np.sqrt(np.mean(b_err**2))), "cc_ih": cc}
    if result.bound_sigma is not None:  # what an efficient estimator reaches (each still given I_h)
        data = result.bound_sigma[:, 0] > 0
        out["k_rms_bound"] = float(np.sqrt(np.mean((result.bound_sigma[data, 0] / result.scale[data]) ** 2)))
        out["B_rms_bound"] = float(np.sqrt(np.mean(result.bound_sigma[data, 1] ** 2)))
    return out


# ------------------------------------------------------------------ command line (jaxscale scale)
SERIAL_AUTO_MIN_STILLS = 1000


def use_serial(params, experiments: list) -> bool:
    """Whether `jaxscale scale` takes the serial path: compute.serial=true, or auto with more
    than SERIAL_AUTO_MIN_STILLS experiments that are all stills scaled with the KB model."""
    mode = str(getattr(params.compute, "serial", "auto")).lower()
    if mode == "false" or not experiments:
        return False
    kb_stills = all(e.is_still for e in experiments) and params.model in (None, "KB") and (
        params.overwrite_existing_models or all((e.scaling_model or {}).get("__id__", "KB") == "KB"
                                                for e in experiments))
    if mode == "true":
        if not kb_stills:
            raise InputError(None, "compute.serial=true needs stills scaled with the KB model", field="compute.serial")
        return True
    return kb_stills and len(experiments) > SERIAL_AUTO_MIN_STILLS


def _kb_json(k: float, b: float, k_esd: float | None, b_esd: float | None, decay: bool,
             error_model: tuple[float, float], imid: float | None = None) -> dict:
    """One experiment's `scaling_model` (dials.algorithms.scaling.model KBScalingModel JSON)."""
    from jaxscale.models import kb

    out: dict = {"__id__": kb.MODEL_ID}
    values = {"scale": (k, k_esd), "decay": (b, b_esd)}
    corrections = [name for name in kb.COMPONENT_ORDER if name == "scale" or decay]
    for name in corrections:
        value, esd = values[name]
        entry = {"n_parameters": 1, "parameters": [float(value)], "null_parameter_value": kb.NULL_VALUES[name]}
        if esd is not None:
            entry["est_standard_devs"] = [float(esd)]
        out[name] = entry
    out["configuration_parameters"] = {"corrections": corrections, "error_model_type": "BasicErrorModel",
                                       "error_model_parameters": [float(error_model[0]), float(error_model[1])]}
    if imid is not None:
        out["configuration_parameters"]["Imid"] = float(imid) if imid not in (0, 1) else int(imid)
    return out


def run_serial(params, inputs, progress=None, experiments_read: dict | None = None, tables_ahead: dict | None = None):
    """`jaxscale scale` on many KB stills: read, prepare (DIALS' cuts and intensity choice,
    one call per input file), scale_stills, scaled tables / experiments / statistics /
    outputs as the rotation path writes them (ΔCC½ cycles first with filtering.method=deltacchalf).
    experiments_read: {.expt path: experiment list} already read (serial_requested), used once each;
    tables_ahead: {.refl path: Future of its table} being read (`scale._read_tables_ahead`).
    Returns a jaxscale.scale.ScaleResult."""
    from jaxscale import scale as S

    log = S._Log(progress)
    timings: dict[str, float] = {}
    t_start = time.perf_counter()
    log.phase("reading input", None)
    hdf5, others = _split_hdf5(inputs)
    sources = _read_hdf5_sources(hdf5, experiments_read, tables_ahead) + (S._read_sources(params, others, log, experiments_read, tables_ahead)
                                          if others or not hdf5 else [])
    log.end()
    experiments = [e for _, expts, _ in sources for e in expts]
    if not experiments:
        raise InputError(None, "no data sets to scale")
    keep, lines = still_selection(params, experiments)
    for line in lines:
        log(line)
    if not keep.all():
        sources = _select_stills(sources, keep)
        experiments = [e for _, expts, _ in sources for e in expts]
        if not experiments:
            raise InputError(None, "every still is excluded (dataset_selection / exclude_images)")
    sgs = {e.space_group.number for e in experiments}
    if len(sgs) > 1:
        raise InputError(None, f"experiments have different space groups {sorted(sgs)}")
    timings["read"] = time.perf_counter() - t_start
    filtering_report = extra_jobs = None
    if params.filtering.method == "deltacchalf":
        table, out_experiments, res, x, x_sigma, stats, obs, doc, filtering_report = _scale_and_filter_stills(
            params, sources, log, timings)
        from jaxscale.filtering import results_job

        extra_jobs = [job for job in [results_job(params, doc)] if job is not None]
    else:
        table, out_experiments, res, x, x_sigma, stats, obs = _serial_pass(params, sources, log, timings,
                                                                     bool(params.scaling_options.full_matrix))
    t0 = time.perf_counter()
    report = None
    if stats is not None and (params.output.html or params.output.json):
        from jaxscale.outputs import serial_report_data

        report = serial_report_data(stats, table, out_experiments, x, x_sigma, res.error_model_result, params,
                                    combination=res.combination, observations=obs)
        if filtering_report:
            report["filtering"] = filtering_report
    timings["report"] = time.perf_counter() - t0
    del obs  # ~100 bytes a row: released before the outputs are written
    run_info_scaler = _SerialRunInfo(error_model=res.error_model, outlier=res.outlier, imid=res.imid)
    outputs = S._write_outputs(params, table, out_experiments, stats, report, run_info_scaler, log, timings,
                               t_start, extra_jobs or ())
    return S.ScaleResult(table, out_experiments, None, x, res.error_model, res.error_model_result, stats, log.lines,
                         timings, res.imid, outputs, filtering=None if filtering_report is None else doc)


def _serial_pass(params, sources: list, log, timings: dict[str, float], full_matrix: bool):
    """One serial scaling run of the given input files (read, stills selected): prepare, scale_stills,
    scaled table and experiments, merging statistics. Returns (table, experiments, SerialResult,
    x f[n, 2], esds f[n, 2] or None, statistics, the statistics' ScaledObservations or None)."""
    import dataclasses as _dc

    from jaxscale import scale as S
    from jaxscale.data.prepare import UnusableDatasetError, prepare_dataset
    from jaxscale.data.symmetry import best_unit_cell, d_star_sq, epsilon, group_ids, map_to_asu
    from jaxscale.data.table import ReflectionTable
    from jaxscale.optimize.levmar import propagate_variance

    t_pass = time.perf_counter()
    experiments = [e for _, expts, _ in sources for e in expts]
    log(f"Serial scaling: {len(experiments)} stills, one KB model each (jaxscale.serial)")
    cut = params.cut_data
    cell = best_unit_cell(experiments)
    prepared, offsets, offset = [], [], 0
    for path, expts, table in sources:  # loop over input files (few)
        try:
            prep = prepare_dataset(table, intensity_choice=params.reflection_selection.intensity_choice,
                                   partiality_cutoff=cut.partiality_cutoff, min_isigi=cut.min_isigi,
                                   best_cell=cell, d_min=cut.d_min, d_max=cut.d_max)
        except UnusableDatasetError as exc:
            raise InputError(path, str(exc)) from None
        position = {e.identifier: offset + i for i, e in enumerate(expts)}
        ids = np.asarray(prep.table["id"])
        lookup = np.full(max(prep.table.identifiers or {0: ""}) + 2, -1, dtype=np.int64)
        for k, ident in prep.table.identifiers.items():  # loop over the identifiers map (vectorised rows below)
            if k >= 0:
                lookup[k] = position.get(ident, -1)
        exp_index = np.where(ids >= 0, lookup[np.clip(ids, 0, lookup.size - 1)], -1)
        prepared.append((prep.table, exp_index))
        offsets.append(offset)
        offset += len(expts)
    suitable = [S._suitable(t) & (e >= 0) & (np.asarray(t["d"]) > 0) for t, e in prepared]
    miller = np.concatenate([np.asarray(t["miller_index"])[m] for (t, _), m in zip(prepared, suitable)])
    asu, isym = map_to_asu(miller, experiments[0].space_group, anomalous=bool(params.anomalous))
    gid, uniq = group_ids(asu)
    precompile_statistics = _statistics_precompile(sum(len(t) for t, _ in prepared), gid,
                                                   None if params.anomalous else isym)
    del asu, isym
    def cat(col: str) -> np.ndarray:  # suitable rows of every input file, concatenated (used before the del below)
        return np.concatenate([np.asarray(t[col], dtype=np.float64)[m]
                               for (t, _), m in zip(prepared, suitable)])  # noqa: F821

    e_all = np.concatenate([e[m] for (_, e), m in zip(prepared, suitable)])
    decay = bool(params.KB.decay_correction)
    opts = params.scaling_options
    dtype = jnp.float32 if params.compute.precision == "float32" else None
    sg = experiments[0].space_group
    # E^2 test inputs as the rotation path: d*^2 with the first experiment's cell, symmetry epsilon
    emax = float(opts.emax or 0.0)
    dss = d_star_sq(miller, experiments[0].unit_cell) if emax > 0 else None
    eps = epsilon(miller, sg).astype(np.float64) if emax > 0 else None
    candidates = None
    if params.reflection_selection.intensity_choice == "combine":
        candidates = _intensity_candidates(prepared, suitable, miller, gid, sg, bool(params.anomalous))
        if candidates is None:
            log("No profile intensities found, skipping profile/summation intensity combination.")
        elif not params.reflection_selection.combine.joint_analysis:
            log("reflection_selection.combine.joint_analysis=False: the serial path chooses one Imid for "
                "all stills jointly")
    del miller
    timings["prepare"] = timings.get("prepare", 0.0) + time.perf_counter() - t_pass
    t0 = time.perf_counter()
    res = scale_stills(gid, cat("intensity"), cat("variance"), cat("d"), e_all, len(experiments), len(uniq),
                       decay_correction=decay, outlier_rejection=opts.outlier_rejection,
                       outlier_zmax=opts.outlier_zmax or 6.0, full_matrix=full_matrix,
                       n_devices=params.compute.n_devices, dtype=dtype, emax=emax, d_star_sq=dss, epsilon=eps,
                       intensity_candidates=candidates,
                       imids=params.reflection_selection.combine.Imid or None,
                       precompile_later=precompile_statistics)
    del candidates, dss, eps
    for line in res.log:
        log(line)
    timings["scaling"] = timings.get("scaling", 0.0) + time.perf_counter() - t0

    # scaled tables: g for every indexed row with d > 0 (the KB model applies to all of them)
    t0 = time.perf_counter()
    x = np.stack([res.scale, res.b_factor], 1)
    sk = np.zeros(len(experiments)) if res.scale_sigma is None else res.scale_sigma
    sb = np.zeros(len(experiments)) if res.b_factor_sigma is None else res.b_factor_sigma
    out_tables, start = [], 0
    for i, m in enumerate(suitable):  # loop over input files
        t, e = prepared[i]
        prepared[i] = None  # each prepared table is released once its output table is built
        # shallow copy: every column changed below is replaced by a new array, never edited, so the
        # output shares the unchanged columns (most of the table) with the input table
        t = ReflectionTable(dict(t.columns), dict(t.identifiers), dict(t.dials_types))
        n = len(t)
        d = np.asarray(t["d"], dtype=np.float64)
        ok = (e >= 0) & (d > 0)
        g = np.ones(n)
        g[ok] = kb_inverse_scale(x, e[ok], d[ok])
        var_g = np.zeros(n)
        s = np.where(ok, 1.0 / (2.0 * np.where(ok, d, 1.0) ** 2), 0.0)
        var_g[ok] = g[ok] ** 2 * ((sk[e[ok]] / x[e[ok], 0]) ** 2 + (s[ok] * sb[e[ok]]) ** 2)
        rows = np.flatnonzero(m)
        outlier = np.zeros(n, dtype=bool)
        outlier[rows] = res.outlier[start:start + rows.size]
        intensity = np.asarray(t["intensity"], dtype=np.float64).copy()
        variance = np.asarray(t["variance"], dtype=np.float64).copy()
        intensity[rows] = res.intensity[start:start + rows.size]  # the combined intensities, if chosen
        variance[rows] = res.variance[start:start + rows.size]
        start += rows.size
        variance = propagate_variance(variance, intensity, g,
                                      var_g if res.scale_sigma is not None else None, res.error_model)
        S.set_scaled_columns(t, g, var_g, intensity, variance, outlier, cut.small_scale_cutoff or 0.0, excluded=~ok)
        t["id"] = np.where(e >= 0, e, -1).astype(np.int32)
        out_tables.append(t)
        del t, e, d, ok, g, var_g, s, rows, outlier, intensity, variance
    del prepared, suitable, e_all, gid
    table = out_tables[0] if len(out_tables) == 1 else ReflectionTable.concatenate(out_tables)
    del out_tables
    table.identifiers = {i: ex.identifier for i, ex in enumerate(experiments)}
    out_experiments = []
    # DIALS stores Imid whenever intensity_choice=combine (1, summation, when there are no profiles)
    imid = (res.imid if res.imid is not None else 1.0) \
        if params.reflection_selection.intensity_choice == "combine" else None
    for i, ex in enumerate(experiments):  # loop over experiments: the .expt is one JSON object per still
        new = _dc.replace(ex)
        new.scaling_model = _kb_json(x[i, 0], x[i, 1], None if res.scale_sigma is None else sk[i],
                                     None if res.b_factor_sigma is None else sb[i], decay, res.error_model, imid)
        out_experiments.append(new)
    from jaxscale.merge.merging import scaled_observations

    try:  # built once here, reused by the statistics and the report (10^7 rows: seconds each)
        obs = scaled_observations(table, out_experiments, anomalous=False, unit_cell=cell)
    except InputError:
        obs = None  # _merging_stats logs why there are no statistics
    stats = S._merging_stats(params, table, out_experiments, log, observations=obs)
    timings["statistics"] = timings.get("statistics", 0.0) + time.perf_counter() - t0
    return table, out_experiments, res, x, None if res.scale_sigma is None else np.stack([sk, sb], 1), stats, obs


def _statistics_precompile(n_rows: int, group_id: np.ndarray, isym: np.ndarray | None) -> Callable[[], None] | None:
    """What compiles the merging statistics' program (the half-split draw chain) in the
    background when they will need it in its smallest padded size: more anomalous groups than
    the host version takes (HOST_MAX_GROUPS), at most MIN_GROUPS_PAD of them, and fewer draws
    than MIN_DRAWS_PAD (at most n_rows + 1, n_rows: the tables' rows); None otherwise.
    group_id: the scaled rows' groups; isym: their ISYM codes when the groups are not anomalous
    (a Friedel-inverted row, even ISYM, may be its group's I(-): counted as its own group,
    centric or not, so the count is an upper bound)."""
    from jaxscale.merge.statistics import HOST_MAX_GROUPS, MIN_DRAWS_PAD, MIN_GROUPS_PAD, precompile_split_halves

    if n_rows >= MIN_DRAWS_PAD:
        return None
    key = group_id if isym is None else 2 * np.asarray(group_id, dtype=np.int64) + (isym % 2 == 0)
    n_groups = np.unique(key).size
    return precompile_split_halves if HOST_MAX_GROUPS < n_groups <= MIN_GROUPS_PAD else None


def _scale_and_filter_stills(params, sources: list, log, timings: dict[str, float]):
    """ΔCC½ scale-and-filter cycles on stills (overview.md §5.3, merging_stats.md §8; the rotation
    path's jaxscale.filtering with the serial scaler): each cycle scales without the full matrix,
    computes ΔCC½ of every still (mode=dataset, as dials.scale: one data set per still) or of
    groups of group_size consecutive stills (mode=image_group: one image per still), and removes
    those below mean - stdcutoff sd; the stop rules are DIALS' (jaxscale.merge.delta_cchalf); a
    final run with the full matrix follows. Returns the final pass, the results document and
    the report's filtering section (the 100 lowest groups of each cycle)."""
    from jaxscale.data import flags as F
    from jaxscale.merge import delta_cchalf as D
    from jaxscale.merge.merging import scaled_observations

    dc = params.filtering.deltacchalf
    max_cycles = dc.max_cycles or 6
    group_size = max(int(dc.group_size or 10), 1) if dc.mode == "image_group" else 1
    cycles, records, initial_n, initial_ranges = [], [], 0, []
    reason, final, pass_ = "max_cycles", None, None
    for cycle in range(1, max_cycles + 1):  # a few scale-and-filter cycles
        log(f"\nScale and filter: cycle {cycle} (scaling without the full-matrix round)")
        pass_ = _serial_pass(params, sources, log, timings, full_matrix=False)
        table, experiments, stats = pass_[0], pass_[1], pass_[5]
        n_exp = len(experiments)
        if cycle == 1:
            initial_ranges = [None] * n_exp
            initial_n = (pass_[6].rows.size if pass_[6] is not None
                         else scaled_observations(table, experiments, anomalous=False).rows.size)
        pass_ = (*pass_[:6], None)  # the observations are not kept through the ΔCC½ analysis (memory)
        obs = D.delta_cchalf_observations(table, experiments)
        n_groups = max(n_exp // group_size, 1)  # a last short run of stills joins the group before
        group_of_still = np.minimum(np.arange(n_exp) // group_size, n_groups - 1)
        groups = D.dataset_groups(group_of_still[obs.dataset_id])
        result = D.delta_cchalf(obs, groups, stdcutoff=4.0 if dc.stdcutoff is None else dc.stdcutoff)
        removed_groups = groups.dataset_id[result.below_cutoff]
        drop = np.isin(group_of_still, removed_groups)
        removal = D.Removal(result.below_cutoff, np.flatnonzero(result.below_cutoff), [], [], {},
                            [int(i) for i in np.flatnonzero(drop)])
        scaled = F.has_any(np.asarray(table["flags"]), F.SCALED)
        ids = np.asarray(table["id"])
        n_removed = int(np.count_nonzero(scaled & (ids >= 0) & drop[np.clip(ids, 0, None)]))
        what = "still" if group_size == 1 else f"group of {group_size} stills"
        log(f"ΔCC½ analysis: CC½ {result.cc_half:.5f}, mean ΔCC½ {result.mean:.6f}, sigma {result.sigma:.6f}, "
            f"cutoff {result.cutoff:.6f}; {int(result.below_cutoff.sum())} {what}(s) below the cutoff, "
            f"{int(drop.sum())} stills removed")
        order, values = result.sorted_values()
        lowest = order[:100]
        label = (lambda g: f"still {int(g)}") if group_size == 1 else \
            (lambda g: f"stills {int(g) * group_size}-{min((int(g) + 1) * group_size, n_exp) - 1}")  # noqa: E731
        records.append({"cycle": cycle, "label": [label(groups.dataset_id[g]) for g in lowest],
                        "delta_cc_half": result.delta[lowest], "below_cutoff": result.below_cutoff[lowest],
                        "cutoff": float(result.cutoff)})
        identifiers = _LazyIdentifiers(experiments)
        cycles.append(D.cycle_results(stats, result, removal, groups, n_removed, identifiers, cycles, initial_n))
        completeness = None if stats is None else 100.0 * float(stats.overall.completeness[0])
        log(f"Cycle {cycle} of filtering, n_reflections removed this cycle: {n_removed}")
        stop = D.termination_reason(cycle, n_removed, cycles[-1]["cumul_percent_removed"], completeness,
                                    max_cycles=max_cycles, max_percent_removed=dc.max_percent_removed or 10.0,
                                    min_completeness=dc.min_completeness)
        if drop.any():
            sources = _select_stills(sources, ~drop)  # each cycle prepares and scales the kept input anew
        if not any(expts for _, expts, _ in sources):
            raise InputError(None, "ΔCC½ filtering removed every still")
        if stop is None:
            continue
        reason, final = stop, pass_
        if stop != "no_more_removed" or params.scaling_options.full_matrix:
            log(f"\nScale and filter finished ({stop}): final scaling run")
            final = _serial_pass(params, sources, log, timings, bool(params.scaling_options.full_matrix))
        break
    experiments = final[1]
    doc = D.scale_and_filter_results(cycles, reason, initial_n, initial_ranges, [None] * len(experiments),
                                     final[5] if final is not pass_ else None)
    from jaxscale.filtering import report_section, summary_text

    log(summary_text(doc))
    return (*final, doc, report_section(doc, records))


class _LazyIdentifiers:
    """table id -> identifier, for the few removed stills (no dict of 10^5 entries)."""

    def __init__(self, experiments: list):
        self.experiments = experiments

    def __getitem__(self, k: int) -> str:
        return self.experiments[k].identifier


def _intensity_candidates(prepared: list, suitable: list, miller: np.ndarray, gid: np.ndarray, space_group,
                          anomalous: bool) -> IntensityCandidates | None:
    """IntensityCandidates of the suitable rows of every input file (None when no file has profile
    and summation values; files without profiles take part as summation-only rows)."""
    if not any("intensity.prf.value" in t and "intensity.sum.value" in t for t, _ in prepared):
        return None
    from jaxscale.data.symmetry import group_ids, map_to_asu

    if anomalous:  # Rmeas of the combination test merges non-anomalously
        group, _ = group_ids(map_to_asu(miller, space_group, anomalous=False)[0])
    else:
        group = gid
    parts, start = [], 0
    for (t, _), m in zip(prepared, suitable):  # loop over input files
        rows = np.flatnonzero(m)
        grp = group[start:start + rows.size]
        start += rows.size
        part = IntensityCandidates.from_table(t, rows, grp)
        if part is None:  # summation only: never tested, summation whatever the Imid
            i_sum = np.asarray(t["intensity"], dtype=np.float64)[rows]
            v_sum = np.asarray(t["variance"], dtype=np.float64)[rows]
            no = np.zeros(rows.size, dtype=bool)
            part = IntensityCandidates(i_sum, v_sum, i_sum, v_sum, np.ones(rows.size), no, ~no, no,
                                       np.asarray(grp, dtype=np.int64))
        parts.append(part)
    return IntensityCandidates.concatenate(parts)


def still_selection(params, experiments: list) -> tuple[np.ndarray, list[str]]:
    """Stills kept (bool[n_experiments], positions in the input) by dataset_selection.use_datasets /
    exclude_datasets and exclude_images, with log lines.

    exclude_images on stills: each still is one image (its scan's image range, image 1 without a
    scan); `exp:start:end` leaves out still `exp` when its image lies in start..end, and a still
    without images left is removed as the rotation path removes a data set whose images are all
    excluded. (dials.scale 3.12 refuses exclude_images on scanless stills: "Trying to exclude a
    scanless experiment".)"""
    from jaxscale.exceptions import ParameterError
    from jaxscale.params import image_ranges

    n = len(experiments)
    keep = np.ones(n, dtype=bool)
    lines = []
    ds = params.dataset_selection
    for name, ids, inside in (("use_datasets", ds.use_datasets, True), ("exclude_datasets", ds.exclude_datasets,
                                                                         False)):
        if ids is None:
            continue
        ids = np.asarray(ids, dtype=np.int64)
        listed = np.zeros(n, dtype=bool)
        listed[ids[(ids >= 0) & (ids < n)]] = True
        keep &= listed if inside else ~listed
        lines.append(f"dataset_selection.{name}: {int(np.count_nonzero(~keep))} of {n} stills left out")
    if params.exclude_images:
        ranges = image_ranges(params.exclude_images)  # one tuple per range given
        exp = np.array([0 if r[0] is None else r[0] for r in ranges], dtype=np.int64)
        if any(r[0] is None for r in ranges) and n != 1:
            raise ParameterError("exclude_images must be exp:start:end when there are several experiments")
        bad = (exp < 0) | (exp >= n)
        if bad.any():
            raise ParameterError(f"exclude_images: no experiment with dataset id {int(exp[bad][0])}")
        start = np.array([r[1] for r in ranges], dtype=np.int64)
        end = np.array([r[2] for r in ranges], dtype=np.int64)
        image = np.array([e.image_range if e.scan else (1, 1) for e in experiments], dtype=np.int64)  # (n, 2)
        hit = (image[exp, 0] <= end) & (image[exp, 1] >= start)
        excluded = np.zeros(n, dtype=bool)
        excluded[exp[hit]] = True
        lines.append(f"exclude_images: {int(np.count_nonzero(excluded & keep))} stills excluded (one image each)")
        keep &= ~excluded
    return keep, lines


def _select_stills(sources: list, keep: np.ndarray) -> list:
    """The input files' (path, experiments, table) with only the kept stills and their rows."""
    out, start = [], 0
    for path, expts, table in sources:  # loop over input files
        mine = keep[start:start + len(expts)]
        start += len(expts)
        kept_ids = {e.identifier for e, k in zip(expts, mine) if k}
        ids = np.asarray(table["id"])
        lookup = np.zeros(max(table.identifiers or {0: ""}) + 2, dtype=bool)
        for k, ident in table.identifiers.items():  # loop over the identifiers map (rows vectorised below)
            if k >= 0:
                lookup[k] = ident in kept_ids
        rows = np.flatnonzero((ids < 0) | lookup[np.clip(ids, 0, lookup.size - 1)])  # unindexed rows stay
        sub = table.select(rows)
        sub.identifiers = {k: v for k, v in table.identifiers.items() if v in kept_ids}
        out.append((path, [e for e, k in zip(expts, mine) if k], sub))
    return out


@dataclasses.dataclass
class _SerialRunInfo:
    """What the output writer reads from a scaler (run summary): every experiment is KB."""

    error_model: tuple[float, float]
    outlier: np.ndarray
    imid: float | None = None
    model: object = dataclasses.field(
        default_factory=lambda: types.SimpleNamespace(states={0: types.SimpleNamespace(model_id="KB")}))


_HDF5 = (".h5", ".hdf5")


def _split_hdf5(inputs) -> tuple[list[str], list[str]]:
    """(jaxscale HDF5 tables, other inputs)."""
    hdf5 = [str(p) for p in inputs if str(p).lower().endswith(_HDF5)]
    return hdf5, [str(p) for p in inputs if not str(p).lower().endswith(_HDF5)]


def _hdf5_experiments(path: str) -> list:
    """The experiment list stored in a jaxscale HDF5 table (`jaxscale.io.hdf5`), columns unread."""
    import h5py

    from jaxscale.io.expt import decode_expt

    try:
        with h5py.File(path, "r") as fh:
            doc = json.loads(fh["experiments"].asstr()[()]) if "experiments" in fh else None
    except OSError as exc:
        raise InputError(path, f"cannot read the HDF5 table ({exc})") from None
    if doc is None:
        raise InputError(path, "the HDF5 table stores no experiments (save_table(..., experiments=...))",
                         field="experiments")
    return decode_expt(doc, path)


def _read_hdf5_sources(paths: list[str], experiments_read: dict | None = None, tables_ahead: dict | None = None
                       ) -> list[tuple[str, list, object]]:
    """(path, experiments, table) per jaxscale HDF5 table, identifiers made consistent;
    experiments_read: {path: experiment list} decoded already (`serial_requested`), tables_ahead:
    {path: Future of (table, None)} (`scale._read_tables_ahead`), each taken once."""
    if not paths:  # h5py costs ~0.13 s to import: only when there are HDF5 inputs
        return []
    from jaxscale.io.expt import assign_identifiers
    from jaxscale.io.hdf5 import load_table

    out = []
    for path in paths:  # loop over input files
        known = experiments_read.pop(path, None) if experiments_read else None
        ahead = tables_ahead.pop(path, None) if tables_ahead else None
        if ahead is not None:
            table = ahead.result()[0]
            expts = known if known is not None else _hdf5_experiments(path)
        else:
            table, expts = load_table(path, experiments=known is None)
            expts = known if known is not None else expts
        if expts is None:
            raise InputError(path, "the HDF5 table stores no experiments", field="experiments")
        assign_identifiers(table, expts, path)
        out.append((path, expts, table))
    return out


def serial_requested(params, inputs, experiments_read: dict | None = None) -> bool:
    """use_serial decided from the experiments alone (before any reflection data is read);
    jaxscale HDF5 tables (`jaxscale.io.hdf5`) are read only by the serial path. experiments_read:
    filled with {.expt path: experiment list read here}, for run_serial to reuse (not read twice)."""
    mode = str(getattr(params.compute, "serial", "auto")).lower()
    hdf5, others = _split_hdf5(inputs)
    if mode == "false":
        if hdf5:
            raise InputError(hdf5[0], "HDF5 tables are read by the serial path only (compute.serial=auto|true)",
                             field="compute.serial")
        return False
    from jaxscale import scale as S
    from jaxscale.io.expt import read_expt

    experiments = []
    for path in hdf5:  # loop over input files (few)
        expts = _hdf5_experiments(path)
        if experiments_read is not None:
            experiments_read[path] = expts
        experiments += list(expts)
    if others or not hdf5:
        pairs, mtzs, xdss = S._sort_inputs(params, others)
        if mtzs or xdss:
            if mode == "true" or hdf5:
                raise InputError(None, "the serial path reads DIALS .refl/.expt or jaxscale HDF5 input",
                                 field="compute.serial")
            return False
        for _, expt_path in pairs:  # loop over input files (few)
            expts = read_expt(expt_path)
            if experiments_read is not None:
                experiments_read[expt_path] = expts
            experiments += list(expts)
    if hdf5 and not use_serial(params, experiments) and mode != "true":
        if all(e.is_still for e in experiments) and params.model in (None, "KB"):
            return True  # HDF5 KB stills: the serial path whatever their number
        raise InputError(hdf5[0], "HDF5 tables are read by the serial path only (KB stills)", field="compute.serial")
    return use_serial(params, experiments)
