"""Robust likelihood vs scale-then-reject on simulated low-multiplicity data with outliers.

Simulates KB-scaled data sets (one k and one B per data set, g = k exp(B / (2 d^2))) over
Wilson-distributed true intensities, each unique reflection measured `multiplicity` times in
distinct data sets, Gaussian noise from a known (a, b) error model, and a fraction of
outliers placed at random rows: `gross` (half multiplicative I x U(3, 10), half additive
positive spikes of U(3, 10) x the shell's mean intensity, like zingers and ice) or
`moderate` (+U(3, 10) true sigma). Then compares, per seed:

  (a)  least squares + DIALS-style standard outlier rejection (zmax 6) + error model +
       weighted-mean merge (the dials.scale flow: initial rejection at g = 1, two L-BFGS
       rounds, error model, a Levenberg-Marquardt full-matrix round, final rejection and
       error model)
  (b)  weighted mean with the TRUE scales and TRUE sigma, no rejection
  (b2) the same with DIALS' V' = a^2 (V + (b I_obs)^2) (true a, b), no rejection
  (b') Student-t merge with the TRUE scales (isolates merging from scaling)
  (c)  Student-t, (d) Huber likelihood: robust scaling (IRLS I_h; L-BFGS round, error
       model on the robust inliers, full-matrix round, error model), robust merge; no
       rejection

and prints a markdown table of CC(I_merged, I_true), normalised RMS error
||I_merged - I_true|| / ||I_true|| and the RMS relative inverse-scale error over
observations (data set 0 is fixed at its true k = 1, B = 0 so the gauge is the truth's).

    .venv/bin/python scripts/robust_study.py --seeds 5 --multiplicities 3
"""
from __future__ import annotations

import argparse
import dataclasses
import time

import jax.numpy as jnp
import numpy as np

import jaxscale  # noqa: F401  (float64)
from jaxscale.errors.error_model import apply_error_model, refine_error_model
from jaxscale.errors.outliers import standard_outliers
from jaxscale.models.component import Component
from jaxscale.optimize.lbfgs import minimise_lbfgs
from jaxscale.optimize.levmar import minimise_full_matrix
from jaxscale.target.objective import ScalingTarget, make_problem
from jaxscale.target.robust import loss_for, make_target, refine_error_model_robust, robust_merge


# ------------------------------------------------------------------------------ data
@dataclasses.dataclass
class Simulated:
    intensity: np.ndarray  # f[n_obs] unscaled measured I (outliers included)
    variance: np.ndarray  # f[n_obs] reported (uncorrected) variance
    group_id: np.ndarray  # i[n_obs] unique reflection
    dataset: np.ndarray  # i[n_obs]
    inv_two_d_sq: np.ndarray  # f[n_obs] 1 / (2 d^2)
    g_true: np.ndarray  # f[n_obs]
    is_outlier: np.ndarray  # bool[n_obs] planted
    i_true: np.ndarray  # f[n_unique]
    k_true: np.ndarray  # f[n_datasets]
    b_true: np.ndarray  # f[n_datasets]
    error_model: tuple[float, float]  # true (a, b)


def simulate(
    seed: int,
    multiplicity: int,
    n_unique: int = 2000,
    n_datasets: int = 20,
    outlier_fraction: float = 0.01,
    a: float = 1.3,
    b: float = 0.03,
    background: float = 20.0,
    d_min: float = 1.8,
    wilson_b: float = 20.0,
    outlier_kind: str = "gross",
) -> Simulated:
    rng = np.random.default_rng(seed)
    # d uniform in reciprocal volume (d*^3) between 20 A and d_min
    ds3 = rng.uniform(1.0 / 20.0**3, 1.0 / d_min**3, n_unique)
    d = ds3 ** (-1.0 / 3.0)
    mean_i = 2000.0 * np.exp(-wilson_b / (2.0 * d * d))  # <I>(d) = A exp(-B d*^2 / 2)
    i_true = rng.exponential(mean_i)  # acentric Wilson
    k_true = np.r_[1.0, np.exp(rng.normal(0.0, 0.4, n_datasets - 1))]
    b_true = np.r_[0.0, rng.uniform(-10.0, 5.0, n_datasets - 1)]
    # each unique reflection in `multiplicity` distinct data sets
    dataset = np.argsort(rng.random((n_unique, n_datasets)), axis=1)[:, :multiplicity].ravel()
    group_id = np.repeat(np.arange(n_unique), multiplicity)
    inv_two_d_sq = np.repeat(1.0 / (2.0 * d * d), multiplicity)
    g_true = k_true[dataset] * np.exp(b_true[dataset] * inv_two_d_sq)
    expected = g_true * i_true[group_id]
    variance = expected + background  # counting statistics + background, as reported
    sd = np.sqrt(apply_error_model(variance, expected, a, b))  # true scatter
    intensity = expected + sd * rng.standard_normal(expected.size)
    n_out = int(round(outlier_fraction * expected.size))
    rows = rng.choice(expected.size, n_out, replace=False)  # anywhere: some groups get two
    if outlier_kind == "gross":
        half = n_out // 2
        intensity[rows[:half]] *= rng.uniform(3.0, 10.0, half)
        spike = rng.uniform(3.0, 10.0, n_out - half) * g_true[rows[half:]] * mean_i[group_id[rows[half:]]]
        intensity[rows[half:]] += spike
    elif outlier_kind == "moderate":  # positive deviations of 3-10 true sigma: many pass zmax 6
        intensity[rows] += rng.uniform(3.0, 10.0, n_out) * sd[rows]
    else:
        raise ValueError(f"unknown outlier kind {outlier_kind!r}")
    is_outlier = np.zeros(expected.size, dtype=bool)
    is_outlier[rows] = True
    return Simulated(intensity, variance, group_id, dataset, inv_two_d_sq, g_true, is_outlier,
                     i_true, k_true, b_true, (a, b))


# ------------------------------------------------------------------------------ model
def kb_model(sim: Simulated):
    """KB components over per-observation data-set indices; data set 0 fixed at k=1, B=0."""
    n = sim.k_true.size
    components = {
        "scale": Component("scale", lambda p, basis: p[basis["dataset"]]),
        "decay": Component("decay", lambda p, basis: jnp.exp(p[basis["dataset"]] * basis["inv_two_d_sq"])),
    }
    params = {"scale": np.ones(n), "decay": np.zeros(n)}
    ds = jnp.asarray(sim.dataset)
    bases = {"scale": {"dataset": ds}, "decay": {"dataset": ds, "inv_two_d_sq": jnp.asarray(sim.inv_two_d_sq)}}
    fixed = {"scale": np.arange(n) == 0, "decay": np.arange(n) == 0}
    return components, params, bases, fixed


def _round(target: ScalingTarget, sim: Simulated, bases, free, x, weight, full_matrix: bool = False):
    """One scaling round: L-BFGS, or Levenberg-Marquardt (DIALS' final full-matrix round)."""
    problem = make_problem(sim.intensity, weight, sim.group_id, sim.i_true.size)
    data = target.data(problem, bases, anchor=target.x0, free=free)
    if full_matrix:
        x = minimise_full_matrix(target, data, x0=x).x
    else:
        x = minimise_lbfgs(target, data, x0=x).x
    return x, np.asarray(target.inverse_scale(jnp.asarray(x), bases))


def weighted_mean(sim: Simulated, g: np.ndarray, variance: np.ndarray, keep: np.ndarray) -> np.ndarray:
    w = np.where(keep, g * g / variance, 0.0)
    num = np.bincount(sim.group_id, w * sim.intensity / g, minlength=sim.i_true.size)
    den = np.bincount(sim.group_id, w, minlength=sim.i_true.size)
    return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


def dials_flow(target: ScalingTarget, sim: Simulated, bases, free, zmax: float = 6.0):
    """(a) LS scaling with standard outlier rejection and error model, weighted-mean merge."""
    em = (1.0, 0.02)
    n_groups = sim.i_true.size

    def vprime(em):
        return apply_error_model(sim.variance, sim.intensity, *em)

    def reject(g, em):
        return standard_outliers(sim.intensity, 1.0 / vprime(em), g, sim.group_id, zmax)

    def refine(g, out, em):
        keep = ~out
        r = refine_error_model(sim.intensity[keep], sim.variance[keep], g[keep], sim.group_id[keep], a=em[0], b=em[1])
        return (r.a, r.b)

    x = target.x0
    out = reject(np.ones_like(sim.intensity), em)  # initial rejection at g = 1, as DIALS
    x, g = _round(target, sim, bases, free, x, np.where(out, 0.0, 1.0 / vprime(em)))
    out = reject(g, em)
    x, g = _round(target, sim, bases, free, x, np.where(out, 0.0, 1.0 / vprime(em)))
    out = reject(g, em)
    em = refine(g, out, em)
    x, g = _round(target, sim, bases, free, x, np.where(out, 0.0, 1.0 / vprime(em)), full_matrix=True)
    out = reject(g, em)
    em = refine(g, out, em)
    merged = weighted_mean(sim, g, vprime(em), ~out)
    assert merged.size == n_groups
    return merged, g, em, out


def robust_flow(target: ScalingTarget, sim: Simulated, bases, free):
    """(c)/(d) robust scaling, error model on robust inliers, robust merge; no rejection."""
    em = (1.0, 0.02)

    def vprime(em):
        return apply_error_model(sim.variance, sim.intensity, *em)

    x = target.x0
    x, g = _round(target, sim, bases, free, x, 1.0 / vprime(em))
    r, _ = refine_error_model_robust(sim.intensity, sim.variance, g, sim.group_id, target.loss, a=em[0], b=em[1])
    em = (r.a, r.b)
    x, g = _round(target, sim, bases, free, x, 1.0 / vprime(em), full_matrix=True)
    r, inl = refine_error_model_robust(sim.intensity, sim.variance, g, sim.group_id, target.loss, a=em[0], b=em[1])
    em = (r.a, r.b)
    merged, _, _ = robust_merge(sim.intensity, vprime(em), g, sim.group_id, target.loss, n_groups=sim.i_true.size)
    return merged, g, em, ~inl


# ---------------------------------------------------------------------------- metrics
def metrics(sim: Simulated, merged: np.ndarray, g: np.ndarray) -> dict[str, float]:
    ok = np.isfinite(merged)
    it, im = sim.i_true[ok], merged[ok]
    hit = np.zeros(sim.i_true.size, dtype=bool)
    hit[sim.group_id[sim.is_outlier]] = True
    hit = hit[ok]
    return {
        "cc": float(np.corrcoef(im, it)[0, 1]),
        "cc_hit": float(np.corrcoef(im[hit], it[hit])[0, 1]),
        "nrmse": float(np.sqrt(np.mean((im - it) ** 2) / np.mean(it**2))),
        "g_err": float(np.sqrt(np.mean((g / sim.g_true - 1.0) ** 2))),
    }


METHODS = {
    "a": "least squares + standard rejection (zmax 6) + weighted mean",
    "b": "weighted mean, TRUE scales, TRUE sigma (of the expected I), no rejection",
    "b2": "weighted mean, TRUE scales, TRUE (a, b) on the observed I (DIALS' V'), no rejection",
    "b'": "Student-t merge, TRUE scales, TRUE sigma",
    "c": "Student-t likelihood (dof {dof:g}), robust merge",
    "d": "Huber likelihood (delta {delta:g}), robust merge",
}


def run(args) -> list[dict]:
    rows = []
    for m in args.multiplicities:
        template = simulate(0, m, args.n_unique, args.n_datasets)
        comps, params, bases_t, fixed = kb_model(template)
        targets = {
            "a": make_target(comps, params, "least_squares"),
            "c": make_target(comps, params, "student_t", student_t_dof=args.dof, n_irls=args.irls),
            "d": make_target(comps, params, "huber", huber_delta=args.delta, n_irls=args.irls),
        }
        t_loss = loss_for("student_t", student_t_dof=args.dof)
        for seed in range(args.seeds):
            sim = simulate(1000 + seed, m, args.n_unique, args.n_datasets, args.outlier_fraction,
                           outlier_kind=args.outlier_kind)
            _, _, bases, _ = kb_model(sim)
            v_true = apply_error_model(sim.variance, sim.g_true * sim.i_true[sim.group_id], *sim.error_model)
            v_dials = apply_error_model(sim.variance, sim.intensity, *sim.error_model)
            everything = np.ones(sim.g_true.size, bool)
            results = {
                "b": (weighted_mean(sim, sim.g_true, v_true, everything), sim.g_true),
                "b2": (weighted_mean(sim, sim.g_true, v_dials, everything), sim.g_true),
                "b'": (robust_merge(sim.intensity, v_true, sim.g_true, sim.group_id, t_loss, sim.i_true.size)[0], sim.g_true),
            }
            for key, target in targets.items():
                t0 = time.perf_counter()
                free = target.free_mask(fixed)
                flow = dials_flow if key == "a" else robust_flow
                merged, g, em, _ = flow(target, sim, bases, free)
                results[key] = (merged, g)
                if args.verbose:
                    print(f"  m={m} seed={seed} {key}: a={em[0]:.3f} b={em[1]:.4f} ({time.perf_counter() - t0:.1f} s)")
            for key, (merged, g) in results.items():
                rows.append({"m": m, "seed": seed, "method": key, **metrics(sim, merged, g)})
    return rows


def table(rows: list[dict], args) -> str:
    lines = [
        "| mult | method | CC(I, I_true) | CC on groups with an outlier | NRMSE | scale error (RMS g/g_true - 1) |",
        "|---:|---|---:|---:|---:|---:|",
    ]
    for m in args.multiplicities:
        for key, desc in METHODS.items():
            sel = [r for r in rows if r["m"] == m and r["method"] == key]
            if not sel:
                continue

            def stat(name, fmt):
                v = np.array([r[name] for r in sel])
                return f"{fmt.format(v.mean())} ± {fmt.format(v.std())}"

            g = "—" if key.startswith("b") else stat("g_err", "{:.4f}")
            lines.append(
                f"| {m} | ({key}) {desc.format(dof=args.dof, delta=args.delta)} | {stat('cc', '{:.4f}')} | "
                f"{stat('cc_hit', '{:.3f}')} | {stat('nrmse', '{:.4f}')} | {g} |"
            )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--multiplicities", type=int, nargs="+", default=[3, 8])
    ap.add_argument("--n-unique", type=int, default=2000)
    ap.add_argument("--n-datasets", type=int, default=20)
    ap.add_argument("--outlier-fraction", type=float, default=0.01)
    ap.add_argument("--outlier-kind", choices=["gross", "moderate"], default="gross")
    ap.add_argument("--dof", type=float, default=4.0)
    ap.add_argument("--delta", type=float, default=1.345)
    ap.add_argument("--irls", type=int, default=10, help="IRLS steps unrolled in the robust target")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args()
    t0 = time.perf_counter()
    rows = run(args)
    print(table(rows, args))
    print(f"\n{args.seeds} seeds x multiplicities {args.multiplicities}, {args.n_unique} unique reflections, "
          f"{args.n_datasets} data sets, {args.outlier_fraction:.0%} {args.outlier_kind} outliers; mean ± sd over seeds "
          f"({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
