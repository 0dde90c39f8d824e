"""Merging statistics in resolution shells, as dials.scale reports them (merging_stats.md).

Every quantity is computed for all shells at once: each unique reflection lies in exactly
one shell, so per-reflection sums are reduced per shell with `np.bincount`. The overall row
is the same computation with a single shell. The random half-dataset split that CC½ and
CCanom use is reproduced draw for draw (§9): one fresh MT19937(seed 1) stream per shell,
groups in (h, k, l) order, partial Fisher–Yates.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field, fields

import gemmi
import jax
import jax.numpy as jnp
import math

import numpy as np

from jaxscale.compilation import Program, precompile
from jaxscale.errors.error_model import normal_quantile

from jaxscale.merge.merging import ScaledObservations, group_by_index, group_rows, weighted_merge

D_MIN_TOLERANCE = 1e-6   # cctbx binner / complete_set tolerance
FP_EPS = np.finfo(float).eps


# --------------------------------------------------------------------------------------
# result types

@dataclass(frozen=True)
class ShellStatistics:
    """Per-shell statistics; every field is an array of shape (n_shells,).

    Anomalous-only fields (anom_*, delta_i_over_sigma) are NaN in non-anomalous statistics.
    Fractions (completeness) are 0..1; R-factors, CCs are plain ratios.
    """

    d_max: np.ndarray                 # low-resolution limit (Å); −1 where the limit is d*=0
    d_min: np.ndarray                 # high-resolution limit (Å)
    n_obs: np.ndarray                 # observations
    n_uniq: np.ndarray                # unique reflections (I+ and I− separate if anomalous)
    n_possible: np.ndarray            # reflections of the complete set in the shell
    multiplicity: np.ndarray          # n_obs / n_uniq
    completeness: np.ndarray          # min(1, n_uniq / n_possible)
    i_mean: np.ndarray                # mean merged <I>
    sigi_mean: np.ndarray             # mean merged σ
    i_over_sigma_mean: np.ndarray     # mean <I>/σ over unique reflections ("<I/sI>", "I/sigma")
    r_merge: np.ndarray
    r_meas: np.ndarray
    r_pim: np.ndarray
    r_anom: np.ndarray                # Σ|I+ − I−| / Σ|<I±>|, NaN without Bijvoet pairs
    cc_half: np.ndarray               # random half-dataset CC½ (shown by dials.scale)
    cc_half_n: np.ndarray             # reflections with n ≥ 2 used
    cc_half_critical: np.ndarray      # critical r at p = 0.01
    cc_half_significant: np.ndarray   # bool, cc_half > critical ("*")
    cc_half_sigma_tau: np.ndarray     # σ-τ CC½ (computed, not shown by dials.scale)
    cc_star: np.ndarray               # sqrt(2CC½/(1+CC½)), sign kept
    cc_anom: np.ndarray               # half-dataset anomalous correlation
    cc_anom_n: np.ndarray             # Bijvoet pairs used
    cc_anom_critical: np.ndarray
    cc_anom_significant: np.ndarray   # bool
    anom_completeness: np.ndarray     # acentric fraction with both I+ and I− (anomalous only)
    anom_signal: np.ndarray           # dF/F (anomalous only)
    delta_i_over_sigma: np.ndarray    # dI/s(dI) = mean|ΔI| / mean σ(ΔI) (anomalous only)
    anom_slope: np.ndarray            # normal probability plot slope, |x| < 0.9 (anomalous only)
    anom_intercept: np.ndarray
    anom_slope_n: np.ndarray          # points in that fit

    def __len__(self) -> int:
        return int(self.d_min.shape[0])

    def row(self, i: int) -> dict:
        """Shell `i` as a dict of Python scalars (NaN kept)."""
        return {f.name: getattr(self, f.name)[i].item() for f in fields(self)}

    def as_dict(self) -> dict[str, list]:
        """Field name -> list of Python scalars (JSON-ready apart from NaN)."""
        return {f.name: getattr(self, f.name).tolist() for f in fields(self)}


@dataclass(frozen=True)
class MergingStatistics:
    """dials.scale's two `dataset_statistics` calls plus the CC½-fit resolution.

    `bins`/`overall`: non-anomalous (I+ and I− merged; cc_anom and r_anom included).
    `anomalous_bins`/`anomalous_overall`: I+ and I− kept apart (the "(I+/-)" rows,
    anomalous completeness/multiplicity, slope, dF/F, dI/s(dI)); None for centrosymmetric
    space groups or when asked not to compute them.
    `d_min_cc_half_fit`: d (Å) where the tanh fit of CC½ vs d*² reaches 0.3 (or the data
    limit), None if the fit gave nothing. `suggested`: the statistics recomputed on data
    cut at that d_min when it is > 0.005 Å above the last bin's d_min, else None.
    """

    bins: ShellStatistics
    overall: ShellStatistics
    anomalous_bins: ShellStatistics | None
    anomalous_overall: ShellStatistics | None
    d_star_sq_limits: np.ndarray       # (n_bins + 1,) bin limits in 1/d² (tolerance included)
    d_min_cc_half_fit: float | None
    suggested: "MergingStatistics | None"
    space_group: str
    unit_cell: tuple


# --------------------------------------------------------------------------------------
# binning

def volume_bin_limits(d_star_sq: np.ndarray, n_bins: int) -> np.ndarray:
    """Bin limits in 1/d² with equal steps in d*³ (cctbx 'volume' binner), (n_bins + 1,).

    The d*² span of the data is widened by 1e-6 of itself at both ends, as cctbx does.
    """
    lo, hi = float(np.min(d_star_sq)), float(np.max(d_star_sq))
    span = hi - lo
    lo, hi = max(lo - span * D_MIN_TOLERANCE, 0.0), hi + span * D_MIN_TOLERANCE
    v = np.linspace(lo**1.5, hi**1.5, n_bins + 1)
    limits = v ** (2.0 / 3.0)
    limits[0], limits[-1] = lo, hi
    return limits


def _d_from_d_star_sq(x: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore"):
        return np.where(x > 0, 1.0 / np.sqrt(np.maximum(x, 1e-300)), -1.0)


# --------------------------------------------------------------------------------------
# half-dataset split (merging_stats.md §9)

def _draw_positions_scan(n: jnp.ndarray, reset: jnp.ndarray, u: jnp.ndarray):
    """Position in the uniform stream of each group's first draw, and its half size.

    The chain is sequential (an odd group draws one extra number to decide its half
    size), so it is a `lax.scan` over groups; `reset` restarts the stream (a new shell).
    """
    def step(pos, x):
        n_g, reset_g = x
        pos = jnp.where(reset_g, 0, pos)
        split = n_g >= 2
        odd = split & (n_g % 2 == 1)
        extra = jnp.where(odd & (u[jnp.minimum(pos, u.shape[0] - 1)] < 0.5), 1, 0)
        nsum = jnp.where(split, n_g // 2 + extra, 0)
        return pos + nsum + odd, (pos + odd, nsum)

    _, out = jax.lax.scan(step, jnp.asarray(0, n.dtype), (n, reset))
    return out


# jitted; up to FAST_COMPILE_MAX_ROWS groups compile with the fast options
_draw_positions = Program(_draw_positions_scan, rows=lambda n, reset, u: n.shape[0])

# up to this many groups the draw chain runs on the host (`_draw_positions_host`, ~1 ms per
# 10^3 groups with an odd count) instead of as a program (~0.1 s to trace and compile)
HOST_MAX_GROUPS = 1 << 13


def _draw_positions_host(n: np.ndarray, reset: np.ndarray, u: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`_draw_positions_scan` on the host, the same integers: (first draw position, half size)
    per group. Positions without the extra draws of odd groups are a cumulative sum (per
    stream, `reset` restarts it); only groups with an odd count >= 3 read the stream (one
    number: draw one more or not), so the sequential part is a loop over those alone."""
    n = np.asarray(n, dtype=np.int64)
    reset = np.asarray(reset, dtype=bool)
    split = n >= 2
    odd = split & (n % 2 == 1)
    half = np.where(split, n // 2, 0)
    base_inc = half + odd  # advance of the stream position without the extra draw
    before = np.cumsum(base_inc) - base_inc  # exclusive sum over all groups
    stream_start = np.maximum.accumulate(np.where(reset, np.arange(n.size), 0))
    base_pos = before - before[stream_start]  # position with no extra draws before it
    stream = np.cumsum(reset)
    extra = np.zeros(n.size, dtype=np.int64)
    last = u.shape[0] - 1
    n_extra, current = 0, -1
    odd_groups = np.flatnonzero(odd)
    # the chain: whether group j draws one more shifts every later group of its stream
    for j, p, s in zip(odd_groups.tolist(), base_pos[odd_groups].tolist(), stream[odd_groups].tolist()):
        if s != current:
            n_extra, current = 0, s
        if u[min(p + n_extra, last)] < 0.5:
            extra[j] = 1
            n_extra += 1
    extra_before = np.cumsum(extra) - extra
    pos = base_pos + extra_before - extra_before[stream_start]
    return pos + odd, np.where(split, half + extra, 0)


def _pow2(n: int) -> int:
    return 1 << max(int(n - 1).bit_length(), 4)


# the draw chain is padded to at least these sizes, so that every split of a small data set
# (non-anomalous and anomalous groups, each resolution cut) runs one compiled program,
# which `precompile_split_halves` can compile ahead of need (a scan this long takes < 1 ms)
MIN_GROUPS_PAD = 1 << 14
MIN_DRAWS_PAD = 1 << 15


def precompile_split_halves() -> None:
    """Compile the draw chain of `split_halves` for small data sets in the background."""
    precompile(_draw_positions, jax.ShapeDtypeStruct((MIN_GROUPS_PAD,), np.int64),
               jax.ShapeDtypeStruct((MIN_GROUPS_PAD,), np.bool_), jax.ShapeDtypeStruct((MIN_DRAWS_PAD,), np.float64))


def split_halves(group_start: np.ndarray, group_n: np.ndarray, group_reset: np.ndarray,
                 values: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Weighted means of the two random halves of every group, exactly as cctbx draws them.

    Observations (N,) are contiguous per group, groups (G,) in processing order; a group
    with `group_reset` starts a fresh MT19937(1) stream. Returns (half1, half2), NaN where
    n < 2.
    """
    G = group_n.shape[0]
    if G == 0:
        return np.zeros(0), np.zeros(0)
    n_draws = int(np.sum(np.where(group_n >= 2, group_n // 2 + 1, 0))) + 1
    # genrand_res53 doubles; a longer stream has the same first n_draws numbers
    u = np.random.RandomState(1).random_sample(max(_pow2(n_draws), MIN_DRAWS_PAD))
    if G <= HOST_MAX_GROUPS:
        first, nsum = _draw_positions_host(group_n, group_reset, u)
    else:
        pad = max(_pow2(G), MIN_GROUPS_PAD)
        n_pad = np.zeros(pad, dtype=np.int64)
        n_pad[:G] = group_n
        reset_pad = np.zeros(pad, dtype=bool)
        reset_pad[:G] = group_reset
        first, nsum = (np.asarray(a)[:G] for a in _draw_positions(n_pad, reset_pad, u))
    x = np.array(values, dtype=float)
    w = np.array(weights, dtype=float)
    # groups by decreasing number of draws: those still drawing at draw i are a prefix (a
    # few very multiple groups make ~10^3 draws, so no pass over all groups per draw)
    by_draws = np.argsort(-nsum, kind="stable")
    n_drawing = G - np.cumsum(np.bincount(nsum))                    # groups with nsum > i
    start_d, n_d, first_d = group_start[by_draws], group_n[by_draws], first[by_draws]
    s1_d = np.zeros(G)
    w1_d = np.zeros(G)
    for i in range(int(nsum.max(initial=0))):          # draw number within a group
        k = int(n_drawing[i])
        m = n_d[:k] - i
        j = i + np.minimum(m - 1, np.floor(u[first_d[:k] + i] * m).astype(np.int64))
        src = start_d[:k] + j
        dst = start_d[:k] + i
        s1_d[:k] += x[src] * w[src]
        w1_d[:k] += w[src]
        x[src] = x[dst]
        w[src] = w[dst]
    s1 = np.empty(G)
    w1 = np.empty(G)
    s1[by_draws] = s1_d
    w1[by_draws] = w1_d
    group_of_obs = np.repeat(np.arange(G), group_n)
    second = np.arange(x.shape[0]) >= np.repeat(group_start + nsum, group_n)   # not drawn
    s2 = np.bincount(group_of_obs[second], (x * w)[second], minlength=G)
    w2 = np.bincount(group_of_obs[second], w[second], minlength=G)
    ok = group_n >= 2
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(ok, s1 / w1, np.nan), np.where(ok, s2 / w2, np.nan)


def _pearson_by_shell(x: np.ndarray, y: np.ndarray, shell: np.ndarray, n_shells: int):
    """Pearson r of (x, y) pairs per shell, and the number of pairs; r = 0 with < 2 pairs."""
    n = np.bincount(shell, minlength=n_shells)
    with np.errstate(invalid="ignore", divide="ignore"):
        mx = np.bincount(shell, x, minlength=n_shells) / n
        my = np.bincount(shell, y, minlength=n_shells) / n
        dx, dy = x - mx[shell], y - my[shell]
        sxy = np.bincount(shell, dx * dy, minlength=n_shells)
        den = np.sqrt(np.bincount(shell, dx * dx, minlength=n_shells) * np.bincount(shell, dy * dy, minlength=n_shells))
        r = np.where((n >= 2) & (den > 0), sxy / den, 0.0)
    return r, n


def _beta_continued_fraction(a: float, b: float, x: float) -> float:
    """Continued fraction of the regularised incomplete beta function (modified Lentz)."""
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 100_000):  # converges in O(sqrt(max(a, b))) terms
        m2 = 2 * m
        for num in (m * (b - m) * x / ((a - 1.0 + m2) * (a + m2)),
                    -(a + m) * (a + b + m) * x / ((a + m2) * (a + 1.0 + m2))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-16:
            break
    return h


def _log_gamma_ratio_half(a: float) -> float:
    """ln Gamma(a + 1/2) - ln Gamma(a), by its asymptotic series for large a (the lgamma
    difference loses digits to cancellation there)."""
    if a < 50.0:
        return math.lgamma(a + 0.5) - math.lgamma(a)
    return 0.5 * math.log(a) - 1 / (8 * a) + 1 / (192 * a**3) - 1 / (640 * a**5) + 17 / (14336 * a**7)


def _t_upper_tail(t: float, dof: float) -> float:
    """P(T > t) of Student's t with `dof` degrees of freedom, t > 0:
    I_x(dof/2, 1/2) / 2 with x = dof / (dof + t^2)."""
    a, b = 0.5 * dof, 0.5
    u = t * t / dof
    x = 1.0 / (1.0 + u)
    # ln(Gamma(a+b) / (Gamma(a) Gamma(b)) x^a (1-x)^b), ln x = -ln(1+u), ln(1-x) = ln u - ln(1+u)
    log_front = (_log_gamma_ratio_half(a) - 0.5 * math.log(math.pi)
                 - a * math.log1p(u) + b * (math.log(u) - math.log1p(u)))
    if x < (a + 1.0) / (a + b + 2.0):
        return 0.5 * math.exp(log_front) * _beta_continued_fraction(a, b, x) / a
    return 0.5 * (1.0 - math.exp(log_front) * _beta_continued_fraction(b, a, 1.0 - x) / b)


@functools.lru_cache(maxsize=4096)  # the shells' dof recur in every pass of a run's statistics
def t_quantile(p: float, dof: float) -> float:
    """Student-t quantile t with P(T <= t) = p (p > 0.5, dof >= 1): Newton on the upper
    tail from the Cornish-Fisher start, kept inside a shrinking bracket (bisection
    fallback); ~1e-14 relative."""
    tail = 1.0 - p
    if dof == 1.0:
        return math.tan(math.pi * (p - 0.5))
    if dof == 2.0:
        return (2.0 * p - 1.0) / math.sqrt(2.0 * p * (1.0 - p))
    z = float(normal_quantile(np.array([p]))[0])
    t = (z + (z**3 + z) / (4 * dof) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * dof**2)
         + (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * dof**3))
    lo, hi = 0.0, 1e4
    log_norm = _log_gamma_ratio_half(0.5 * dof) - 0.5 * math.log(dof * math.pi)
    for _ in range(200):  # Newton steps (a handful) with bisection safeguard
        f = _t_upper_tail(t, dof) - tail
        if f > 0.0:
            lo = max(lo, t)
        else:
            hi = min(hi, t)
        density = math.exp(log_norm - 0.5 * (dof + 1.0) * math.log1p(t * t / dof))
        t_new = t + f / density if density > 0.0 else hi
        if not lo < t_new < hi:
            t_new = 0.5 * (lo + hi)
        if abs(t_new - t) <= 1e-15 * t:
            return t_new
        t = t_new
    return t


def critical_correlation(n: np.ndarray) -> np.ndarray:
    """Pearson r significant at p = 0.01 with n pairs: t/sqrt(n − 2 + t²); 0 where n ≤ 2."""
    n = np.asarray(n, dtype=float)
    dof = np.maximum(n - 2.0, 1.0)
    values = {d: t_quantile(0.99, d) for d in np.unique(dof).tolist()}   # a few shells' distinct dof
    t = np.array([values[d] for d in dof.ravel().tolist()]).reshape(dof.shape)
    return np.where(n > 2, t / np.sqrt(n - 2.0 + t * t), 0.0)


# --------------------------------------------------------------------------------------
# the statistics

@dataclass(frozen=True)
class _Groups:
    """Observations grouped by key, groups in (shell, h, k, l) processing order."""

    order: np.ndarray       # (n,) observation order: groups contiguous, original order within
    start: np.ndarray       # (G,) first position of each group in `order`
    n: np.ndarray           # (G,) observations per group
    shell: np.ndarray       # (G,)
    key: np.ndarray         # (G, 3)
    gid: np.ndarray         # (n,) group of each observation (original order)
    index_group: np.ndarray  # (G,) the group's number in group_by_index (hkl order)


def stable_order(ids: np.ndarray, n_ids: int) -> np.ndarray:
    """`np.argsort(ids, kind="stable")` for integer ids in [0, n_ids): LSD radix sort in
    16-bit digits (numpy sorts uint16 keys by radix), 3-10x faster than a merge sort."""
    ids = np.asarray(ids)
    if n_ids <= 1 << 16:
        return np.argsort(ids.astype(np.uint16), kind="stable")
    order = np.arange(ids.size)
    for shift in range(0, max(int(n_ids - 1).bit_length(), 1), 16):  # digits, least significant first
        digit = ((ids[order] >> shift) & 0xFFFF).astype(np.uint16)
        order = order[np.argsort(digit, kind="stable")]
    return order


def _group(keys: np.ndarray, shell_obs: np.ndarray,
           grouped: tuple[np.ndarray, np.ndarray] | None = None) -> _Groups:
    """`grouped`: `group_by_index(keys)` when already known (it does not depend on shells)."""
    unique, gid = group_by_index(keys) if grouped is None else grouped
    G = unique.shape[0]
    g_shell = np.zeros(G, dtype=np.int64)
    g_shell[gid] = shell_obs
    g_order = np.argsort(g_shell, kind="stable")            # (shell, hkl) order
    rank = np.empty(G, dtype=np.int64)
    rank[g_order] = np.arange(G)
    gid = rank[gid]
    order = stable_order(gid, G)
    n = np.bincount(gid, minlength=G)
    start = np.concatenate([[0], np.cumsum(n)[:-1]]).astype(np.int64)
    return _Groups(order, start, n, g_shell[g_order], unique[g_order], gid, g_order)


def _complete_set(obs: ScaledObservations, d_min: float) -> tuple[np.ndarray, np.ndarray]:
    """d*² and centric flags of the non-absent unique reflections down to d_min (Å)
    (read-only arrays, kept for the next call: a run asks for the same set several times)."""
    key = (tuple(obs.unit_cell.parameters), obs.space_group.hall, float(d_min))
    hit = _COMPLETE_SETS.get(key)
    if hit is None:
        hkl = gemmi.make_miller_array(obs.unit_cell, obs.space_group, d_min * (1 - 1e-5), 0.0, True)
        ds2 = np.asarray(obs.unit_cell.calculate_1_d2_array(hkl), dtype=float)
        centric = np.asarray(obs.space_group.operations().centric_flag_array(hkl), dtype=bool)
        ds2.setflags(write=False)
        centric.setflags(write=False)
        _COMPLETE_SETS.clear()  # one set kept (a run uses one cell and resolution at a time)
        hit = _COMPLETE_SETS[key] = (ds2, centric)
    return hit


_COMPLETE_SETS: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}


@dataclass(frozen=True)
class HklGroupings:
    """`group_by_index` of the statistics' two keys, shared by every shell_statistics call
    on the same observations (the grouping by index does not depend on the shells)."""

    base_key: np.ndarray                          # (n, 3) I+ and I− together
    anom_key: np.ndarray                          # (n, 3) I− keys negated
    base: tuple[np.ndarray, np.ndarray]           # (unique, gid) of base_key
    anom: tuple[np.ndarray, np.ndarray]           # (unique, gid) of anom_key
    merged: dict = field(default_factory=dict, compare=False)   # _merge_in_groups cache

    def merge(self, key: str, grp: "_Groups", intensity: np.ndarray, sigma: np.ndarray | None,
              use_internal_variance: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """`weighted_merge` in `grp`'s groups (of key "base" or "anom"; sigma None: unit σ).
        Merged once per key in hkl order and reordered: each group sums the same
        observations in the same order whatever the shells, so the values are the same."""
        cache_key = (key, sigma is None, use_internal_variance)
        if cache_key not in self.merged:
            unique, gid = getattr(self, key)
            self.merged[cache_key] = weighted_merge(gid, unique.shape[0], intensity,
                                                    np.ones_like(intensity) if sigma is None else sigma,
                                                    use_internal_variance)
        return tuple(a[grp.index_group] for a in self.merged[cache_key])


def hkl_groupings(obs: ScaledObservations) -> HklGroupings:
    base = np.where(obs.friedel_minus[:, None], -obs.miller_asu, obs.miller_asu) if obs.anomalous else obs.miller_asu
    anom_key = np.where(obs.friedel_minus[:, None], -base, base)
    return HklGroupings(base, anom_key, group_by_index(base), group_by_index(anom_key))


def shell_statistics(obs: ScaledObservations, shell: np.ndarray, n_shells: int,
                     d_max: np.ndarray, d_min: np.ndarray, anomalous: bool,
                     use_internal_variance: bool = False,
                     groupings: HklGroupings | None = None) -> ShellStatistics:
    """All statistics of `obs` in shells (`shell` (n,) in 0..n_shells−1), vectorised.

    `d_max`, `d_min` (n_shells,) are the shells' limits (Å) used for completeness, as
    cctbx's merging_stats receives them. anomalous: keep I+ and I− apart.
    groupings: `hkl_groupings(obs)`, when several calls share it.
    """
    S = n_shells
    I, sig = obs.intensity, obs.sigma
    hg = hkl_groupings(obs) if groupings is None else groupings
    anom_key = hg.anom_key

    # -- merging in the statistics' own grouping ----------------------------------------
    grp = _group(anom_key, shell, hg.anom) if anomalous else _group(hg.base_key, shell, hg.base)
    G = grp.n.shape[0]
    grp_key = "anom" if anomalous else "base"
    mean, msig, n = hg.merge(grp_key, grp, I, sig, use_internal_variance)
    n_obs = np.bincount(shell, minlength=S)
    n_uniq = np.bincount(grp.shell, minlength=S)
    with np.errstate(invalid="ignore", divide="ignore"):
        # means as scitbx flex.mean forms them, sum * (1/n), so printed digits agree
        multiplicity = n_obs * (1.0 / n_uniq)
        i_mean = np.bincount(grp.shell, mean, minlength=S) * (1.0 / n_uniq)
        sigi_mean = np.bincount(grp.shell, msig, minlength=S) * (1.0 / n_uniq)
        pos = msig > 0
        i_over_sigma_mean = (np.bincount(grp.shell[pos], mean[pos] / msig[pos], minlength=S)
                             * (1.0 / np.bincount(grp.shell[pos], minlength=S)))
        # R-factors over groups with n > 1; denominator is the signed sum of I
        multi = (n > 1)[grp.gid]
        absdev = np.abs(I - mean[grp.gid])
        nf = n.astype(float)
        g_abs = np.bincount(grp.gid[multi], absdev[multi], minlength=G)
        g_sum = np.bincount(grp.gid[multi], I[multi], minlength=G)
        den = np.bincount(grp.shell, g_sum, minlength=S)
        meas_f = np.where(n > 1, np.sqrt(nf / np.maximum(nf - 1, 1)), 0.0)
        pim_f = np.where(n > 1, np.sqrt(1.0 / np.maximum(nf - 1, 1)), 0.0)
        r_merge = np.where(den != 0, np.bincount(grp.shell, g_abs, minlength=S) / den, 0.0)
        r_meas = np.where(den != 0, np.bincount(grp.shell, g_abs * meas_f, minlength=S) / den, 0.0)
        r_pim = np.where(den != 0, np.bincount(grp.shell, g_abs * pim_f, minlength=S) / den, 0.0)

    # -- completeness against the complete set (cctbx complete_set + resolution_filter) --
    data_ds2_max = np.full(S, -np.inf)
    np.maximum.at(data_ds2_max, shell, obs.d_star_sq)
    cs_ds2, cs_centric = _complete_set(obs, float(1 / np.sqrt(data_ds2_max.max())))
    cs_dstar = np.sqrt(cs_ds2)[None, :]
    with np.errstate(divide="ignore"):
        lo_dstar = np.where(d_max > 0, 1.0 / d_max, 0.0)[:, None]
    hi_dstar = (1.0 / d_min)[:, None]
    with np.errstate(invalid="ignore"):  # a shell without data: NaN, so nothing counts as possible there
        d_data_min = 1.0 / np.sqrt(data_ds2_max)[:, None]
    in_shell = (cs_dstar >= lo_dstar) & (cs_dstar <= hi_dstar)
    in_data = in_shell & ((1.0 / cs_dstar) >= d_data_min * (1 - FP_EPS))      # (S, M)
    mult_anom = np.where(cs_centric, 1, 2) if anomalous else np.ones_like(cs_ds2, dtype=int)
    n_possible = (in_data * mult_anom[None, :]).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        completeness = np.minimum(n_uniq / n_possible, 1.0)

    # -- CC½: random half-dataset, σ-weighted ------------------------------------------
    reset = np.ones(G, dtype=bool)
    reset[1:] = grp.shell[1:] != grp.shell[:-1]
    h1, h2 = split_halves(grp.start, grp.n, reset, I[grp.order], 1.0 / sig[grp.order] ** 2)
    used = grp.n >= 2
    cc_half, cc_half_n = _pearson_by_shell(h1[used], h2[used], grp.shell[used], S)
    cc_half_critical = critical_correlation(cc_half_n)
    cc_half_significant = (cc_half > cc_half_critical) & (cc_half_n > 2) & (cc_half != -1)

    # -- CC½ σ-τ: unit σ, internal variance, groups with n > 1 ------------------------
    m1, s1, _ = hg.merge(grp_key, grp, I, None, use_internal_variance=True)
    sh = grp.shell[used]
    k = np.bincount(sh, minlength=S)
    with np.errstate(invalid="ignore", divide="ignore"):
        mu = np.bincount(sh, m1[used], minlength=S) / k
        var_y = np.bincount(sh, (m1[used] - mu[sh]) ** 2, minlength=S) / (k - 1)
        var_e = 2 * np.bincount(sh, s1[used] ** 2, minlength=S) / k
        cc_st = np.where(k > 1, (var_y - 0.5 * var_e) / (var_y + 0.5 * var_e), 0.0)
        cc_star = np.where(cc_half == 0, 0.0, np.where(cc_half < -0.999, -np.inf,
                           np.sign(cc_half) * np.sqrt(2 * np.abs(cc_half) / (1 + cc_half))))

    # -- anomalous groups: CCanom (unweighted split), r_anom ------------------------------
    agrp = grp if anomalous else _group(anom_key, shell, hg.anom)  # anomalous: the same grouping
    aG = agrp.n.shape[0]
    a_reset = np.ones(aG, dtype=bool)
    a_reset[1:] = agrp.shell[1:] != agrp.shell[:-1]
    ah1, ah2 = split_halves(agrp.start, agrp.n, a_reset, I[agrp.order], np.ones(len(I)))
    a_minus = np.zeros(aG, dtype=bool)
    a_minus[agrp.gid] = obs.friedel_minus
    a_centric = np.zeros(aG, dtype=bool)
    a_centric[agrp.gid] = obs.centric
    plus_g, minus_g = _pairs(agrp.key, agrp.shell, a_minus, a_centric)
    both2 = (agrp.n[plus_g] >= 2) & (agrp.n[minus_g] >= 2)
    pg, mg = plus_g[both2], minus_g[both2]
    cc_anom, cc_anom_n = _pearson_by_shell(ah1[pg] - ah1[mg], ah2[pg] - ah2[mg], agrp.shell[pg], S)
    cc_anom_critical = critical_correlation(cc_anom_n)
    cc_anom_significant = (cc_anom > cc_anom_critical) & (cc_anom_n > 2) & (cc_anom != -1)

    am_i, am_s, _ = hg.merge("anom", agrp, I, sig, use_internal_variance=True)
    wp, wm = 1 / am_s[plus_g] ** 2, 1 / am_s[minus_g] ** 2
    avg = (wp * am_i[plus_g] + wm * am_i[minus_g]) / (wp + wm)
    psh = agrp.shell[plus_g]
    with np.errstate(invalid="ignore", divide="ignore"):
        ra_den = np.bincount(psh, np.abs(avg), minlength=S)
        r_anom = np.where(ra_den > 0, np.bincount(psh, np.abs(am_i[plus_g] - am_i[minus_g]), minlength=S) / ra_den, np.nan)

    nan = np.full(S, np.nan)
    anom_completeness = anom_signal = delta_i_over_sigma = nan
    anom_slope = anom_intercept = nan
    anom_slope_n = np.zeros(S, dtype=np.int64)
    if anomalous:
        # merged anomalous data are `mean`, `msig` on the anomalous groups `grp`
        g_minus = np.zeros(G, dtype=bool)
        g_minus[grp.gid] = obs.friedel_minus
        g_centric = np.zeros(G, dtype=bool)
        g_centric[grp.gid] = obs.centric
        pp, mm = _pairs(grp.key, grp.shell, g_minus, g_centric)
        pair_shell = grp.shell[pp]
        n_pairs = np.bincount(pair_shell, minlength=S)
        # acentric reflections of the complete set within [d_min(1 − 1e-6), d_max]
        in_anom = (cs_dstar >= lo_dstar) & ((1.0 / cs_dstar) >= (d_min * (1 - D_MIN_TOLERANCE))[:, None])
        n_acentric = (in_anom & ~cs_centric[None, :]).sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            anom_completeness = np.where(n_acentric > 0, np.minimum(n_pairs / n_acentric, 1.0), 0.0)
        # dF/F on pairs with both I > 0
        posp = (mean[pp] > 0) & (mean[mm] > 0)
        fp, fm, fsh = np.sqrt(mean[pp][posp]), np.sqrt(mean[mm][posp]), pair_shell[posp]
        nf_ = np.bincount(fsh, minlength=S)
        with np.errstate(invalid="ignore", divide="ignore"):
            msd = np.bincount(fsh, (fp - fm) ** 2, minlength=S) / nf_
            mss = np.bincount(fsh, fp**2 + fm**2, minlength=S) / nf_
            anom_signal = np.where(nf_ > 0, np.sqrt(2 * msd / mss), 0.0)
        d_i = mean[pp] - mean[mm]
        s_di = np.sqrt(msig[pp] ** 2 + msig[mm] ** 2)
        nz = s_di > 0
        with np.errstate(invalid="ignore", divide="ignore"):
            delta_i_over_sigma = (np.bincount(pair_shell[nz], np.abs(d_i[nz]), minlength=S)
                                  / np.bincount(pair_shell[nz], s_di[nz], minlength=S))
            delta_i_over_sigma = np.where(np.bincount(pair_shell[nz], minlength=S) > 0, delta_i_over_sigma, np.nan)
        anom_slope, anom_intercept, anom_slope_n = _probability_plot_fit(d_i / s_di, pair_shell, S, 0.9)

    return ShellStatistics(
        d_max=np.asarray(d_max, float), d_min=np.asarray(d_min, float), n_obs=n_obs, n_uniq=n_uniq,
        n_possible=n_possible, multiplicity=multiplicity, completeness=completeness, i_mean=i_mean,
        sigi_mean=sigi_mean, i_over_sigma_mean=i_over_sigma_mean, r_merge=r_merge, r_meas=r_meas,
        r_pim=r_pim, r_anom=r_anom, cc_half=cc_half, cc_half_n=cc_half_n,
        cc_half_critical=cc_half_critical, cc_half_significant=cc_half_significant,
        cc_half_sigma_tau=cc_st, cc_star=cc_star, cc_anom=cc_anom, cc_anom_n=cc_anom_n,
        cc_anom_critical=cc_anom_critical, cc_anom_significant=cc_anom_significant,
        anom_completeness=anom_completeness, anom_signal=anom_signal,
        delta_i_over_sigma=delta_i_over_sigma, anom_slope=anom_slope,
        anom_intercept=anom_intercept, anom_slope_n=anom_slope_n)


def _pairs(key: np.ndarray, shell: np.ndarray, minus: np.ndarray, centric: np.ndarray):
    """(plus group, minus group) index pairs of acentric Bijvoet mates present in both."""
    base = np.where(minus[:, None], -key, key)
    if key.shape[0] == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    _, pid = group_rows(np.column_stack([shell, base]))
    pid = pid.reshape(-1)
    P = int(pid.max()) + 1
    plus_of = np.full(P, -1)
    minus_of = np.full(P, -1)
    acen = ~centric
    plus_of[pid[acen & ~minus]] = np.flatnonzero(acen & ~minus)
    minus_of[pid[acen & minus]] = np.flatnonzero(acen & minus)
    both = (plus_of >= 0) & (minus_of >= 0)
    return plus_of[both], minus_of[both]


def _probability_plot_fit(y: np.ndarray, shell: np.ndarray, S: int, expected_delta: float):
    """Per shell: sort y, x = Φ⁻¹((i + ½)/n), keep |x| < expected_delta, fit y = a x + b."""
    order = np.lexsort((y, shell))
    ys, sh = y[order], shell[order]
    n = np.bincount(sh, minlength=S)
    start = np.concatenate([[0], np.cumsum(n)[:-1]])
    rank = np.arange(len(ys)) - start[sh]
    x = normal_quantile((rank + 0.5) / np.maximum(n[sh], 1))
    keep = np.abs(x) < expected_delta
    x, ys, sh = x[keep], ys[keep], sh[keep]
    k = np.bincount(sh, minlength=S)
    with np.errstate(invalid="ignore", divide="ignore"):
        mx = np.bincount(sh, x, minlength=S) / k
        my = np.bincount(sh, ys, minlength=S) / k
        sxx = np.bincount(sh, (x - mx[sh]) ** 2, minlength=S)
        sxy = np.bincount(sh, (x - mx[sh]) * (ys - my[sh]), minlength=S)
        ok = (k >= 2) & (sxx > 0)
        slope = np.where(ok, sxy / sxx, np.nan)
        intercept = np.where(ok, my - slope * mx, np.nan)
    return slope, intercept, k


# --------------------------------------------------------------------------------------
# CC½ tanh fit (merging_stats.md §10)

def _tanh(p: np.ndarray, x: np.ndarray) -> np.ndarray:
    return 0.5 * (1 - np.tanh((x - p[1]) / p[0]))


def _fit_tanh(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Least-squares (r, s0) of ½(1 − tanh((x − s0)/r)) from (1, 1), Levenberg–Marquardt."""
    p = np.array([1.0, 1.0])
    lam = 1e-3

    def cost(q):
        return float(np.sum((y - _tanh(q, x)) ** 2))

    c = cost(p)
    for _ in range(500):
        z = (x - p[1]) / p[0]
        sech2 = 1 - np.tanh(z) ** 2
        J = np.column_stack([0.5 * sech2 * z / p[0], 0.5 * sech2 / p[0]])   # d f / d (r, s0)
        res = y - _tanh(p, x)
        A = J.T @ J
        g = J.T @ res
        step = np.linalg.solve(A + lam * np.diag(np.diag(A) + 1e-12), g)
        q = p + step
        if q[0] <= 0:
            lam *= 10
            continue
        cq = cost(q)
        if cq < c:
            converged = abs(c - cq) <= 1e-15 * max(c, 1e-30) or np.max(np.abs(step) / (np.abs(p) + 1e-12)) < 1e-12
            p, c, lam = q, cq, max(lam / 10, 1e-12)
            if converged:
                break
        else:
            lam *= 10
            if lam > 1e12:
                break
    return p


def _fivenum_hinges(v: np.ndarray) -> tuple[float, float]:
    """Tukey hinges (R fivenum): for odd n both halves include the median."""
    q = np.sort(v)
    n = q.shape[0]
    lower, upper = (q[: n // 2 + 1], q[n // 2:]) if n % 2 else (q[: n // 2], q[n // 2:])
    return float(np.median(lower)), float(np.median(upper))


def resolution_cc_half_fit(d_star_sq_hi: np.ndarray, cc_half: np.ndarray, significant: np.ndarray,
                           limit: float = 0.3) -> float | None:
    """d_min (Å) where the tanh fit of CC½ vs d*² crosses `limit` (dials resolution_cc_half).

    Inputs per bin in increasing d*² order; the bins are scanned from the highest d*² down.
    Returns the data limit if every kept CC½ exceeds `limit`, None if no crossing.
    """
    x, y, sig = d_star_sq_hi[::-1], cc_half[::-1], significant[::-1]
    keep = sig & (y > 0)
    x, y = x[keep], y[keep]
    if x.shape[0] < 2:
        return None
    p = _fit_tanh(x, y)
    dy = y - _tanh(p, x)
    q1, q3 = _fivenum_hinges(dy)
    cut = 6 * (q3 - q1)
    out = (dy > q3 + cut) | (dy < q1 - cut)
    if out.any():
        p = _fit_tanh(x[~out], y[~out])
    f = _tanh(p, x)
    if y.min() > limit:
        return float(1 / np.sqrt(x.max()))
    if not (f.min() <= limit <= f.max()):
        return None
    cross = np.flatnonzero((f[:-1] - limit) * (f[1:] - limit) < 0)
    if cross.size == 0:
        return None
    j = int(cross[0]) + 1
    xs = x[j - 1] + (limit - f[j - 1]) * (x[j] - x[j - 1]) / (f[j] - f[j - 1])
    return float(1 / np.sqrt(xs))


# --------------------------------------------------------------------------------------
# the public entry

def _dataset_statistics(obs: ScaledObservations, n_bins: int, anomalous: bool, use_internal_variance: bool,
                        groupings: HklGroupings) -> tuple[ShellStatistics, ShellStatistics, np.ndarray]:
    limits = volume_bin_limits(obs.d_star_sq, n_bins)
    ibin = np.clip(np.searchsorted(limits, obs.d_star_sq, side="right") - 1, 0, n_bins - 1)
    d_lim = _d_from_d_star_sq(limits)
    bins = shell_statistics(obs, ibin, n_bins, d_lim[:-1], d_lim[1:], anomalous, use_internal_variance,
                            groupings)
    d_range = _d_from_d_star_sq(np.array([obs.d_star_sq.min(), obs.d_star_sq.max()]))
    overall = shell_statistics(obs, np.zeros(len(obs), np.int64), 1, d_range[:1], d_range[1:],
                               anomalous, use_internal_variance, groupings)
    return bins, overall, limits


def merging_statistics(obs: ScaledObservations, n_bins: int = 20, use_internal_variance: bool = False,
                       anomalous: bool = True, d_min: float | None = None,
                       cc_half_limit: float = 0.3, _suggest: bool = True) -> MergingStatistics:
    """dials.scale's merging statistics of scaled observations (merging_stats.md §2-4, §10).

    anomalous: also compute the I+/I− separate statistics (skipped for centrosymmetric
    groups). d_min: the user's cut_data.d_min (replaces the CC½-fit suggestion).
    """
    groupings = hkl_groupings(obs)  # 2 sorts instead of 6
    bins, overall, limits = _dataset_statistics(obs, n_bins, False, use_internal_variance, groupings)
    do_anom = anomalous and not obs.space_group.is_centrosymmetric()
    a_bins = a_overall = None
    if do_anom:
        a_bins, a_overall, _ = _dataset_statistics(obs, n_bins, True, use_internal_variance, groupings)
    fit = None
    suggested = None
    if _suggest:
        fit = d_min if d_min is not None else resolution_cc_half_fit(
            limits[1:], bins.cc_half, bins.cc_half_significant, cc_half_limit)
        if fit is not None and fit - bins.d_min[-1] > 0.005:
            cut = obs.select(obs.d_star_sq <= 1.0 / fit**2)
            suggested = merging_statistics(cut, n_bins, use_internal_variance, anomalous, _suggest=False)
    return MergingStatistics(bins, overall, a_bins, a_overall, limits, fit, suggested,
                             obs.space_group.hm, tuple(obs.unit_cell.parameters))


# --------------------------------------------------------------------------------------
# per-batch statistics (merging_stats.md §6)

@dataclass(frozen=True)
class BatchStatistics:
    """Per batch (image number + batch offset), arrays of shape (n_batches,)."""

    batch: np.ndarray            # batch numbers present, increasing
    dataset: np.ndarray          # experiment index of the batch
    n_obs: np.ndarray
    r_merge: np.ndarray          # Σ|I − <I>_h| / Σ I over the batch (<I> from all data)
    i_over_sigma: np.ndarray     # mean I/σ of the batch's observations
    scale: np.ndarray            # mean inverse scale factor g


def batch_statistics(obs: ScaledObservations, batch: np.ndarray, inverse_scale: np.ndarray) -> BatchStatistics:
    """Rmerge, <I/σ> and <g> per batch; `batch`, `inverse_scale` (n,) aligned with `obs`."""
    gid, n_groups = _gid(obs.miller_asu)
    mean, _, n = weighted_merge(gid, n_groups, obs.intensity, obs.sigma)
    batches, b = np.unique(np.asarray(batch), return_inverse=True)
    b = b.reshape(-1)
    B = batches.shape[0]
    cnt = np.bincount(b, minlength=B)
    with np.errstate(invalid="ignore", divide="ignore"):
        r_merge = np.bincount(b, np.abs(obs.intensity - mean[gid]), minlength=B) / np.bincount(b, obs.intensity, minlength=B)
        i_over_sigma = np.bincount(b, obs.intensity / obs.sigma, minlength=B) / cnt
        scale = np.bincount(b, np.asarray(inverse_scale, float), minlength=B) / cnt
    dataset = np.zeros(B, dtype=np.int64)
    dataset[b] = obs.dataset
    return BatchStatistics(batches, dataset, cnt, r_merge, i_over_sigma, scale)


def _gid(keys: np.ndarray) -> tuple[np.ndarray, int]:
    unique, gid = group_by_index(keys)
    return gid, unique.shape[0]
