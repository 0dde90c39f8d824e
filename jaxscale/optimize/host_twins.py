"""numpy twins of the objective's pieces for small problems (no trace, no compile).

A small job's programs cost more to trace and compile (0.1-0.15 s each) than all of their
calls in numpy. Where every component's link has a numpy twin and a closed-form slot slope
(`models.linear`: the formula `jax.grad` of the link gives), g and dg/dp are computed on the
host from the same bases; tests hold each twin to its compiled, autodiff counterpart.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Callable

import numpy as np

from jaxscale.compilation import host_evaluation
from jaxscale.models.linear import slot_slope
from jaxscale.target.losses import least_squares
from jaxscale.target.objective import ScalingTarget, TargetData

# largest minimisation problem (rows) whose L-BFGS evaluations run in numpy: below it the
# objective's trace, lowering and compile (~0.11 s at 1,280 rows) cost more than a round's
# ~100-200 evaluations in numpy
LBFGS_HOST_MAX_ROWS = 1 << 13


def has_slot_bases(target: ScalingTarget, bases: Any) -> bool:
    """True when every component reads its parameters through a 2-D `idx` basis (the
    linear-form contract of models/linear.py), so that dg/dp can be taken per row slot."""
    return all(isinstance(bases.get(k), Mapping) and "idx" in bases[k] and np.ndim(bases[k]["idx"]) == 2
               for k in target.components)


def host_links(target: ScalingTarget, bases: Any, n_rows: int) -> dict | None:
    """{component: (numpy twin of its apply, its closed-form slot slope)} when a job of n_rows
    rows may run in numpy instead of a compiled program (small job, slot bases, every link
    with both), else None."""
    if not host_evaluation(n_rows) or not has_slot_bases(target, bases):
        return None
    twins = target._host_twins()
    if twins is None:
        return None
    out = {k: (twins[k], slot_slope(comp.apply)) for k, comp in target.components.items()}
    return out if all(slope is not None for _, slope in out.values()) else None


def host_slot_derivatives(target: ScalingTarget, links: dict, x_eff: np.ndarray,
                           host_bases: dict) -> tuple[np.ndarray, dict]:
    """numpy twin of `slot_derivatives`: g f[n] and, per component, dg/d(its slot values)
    f[n, K_c] (the slot columns are the basis' idx + the component's offset)."""
    params = target.unravel(x_eff)
    factors = {k: twin(params[k], host_bases[k]) for k, (twin, _) in links.items()}
    g = None
    for f in factors.values():  # the product in the order of `inverse_scale`
        g = f if g is None else g * f
    slot_d = {}
    for k, (_, slope) in links.items():  # loop over model components (few)
        others = np.ones_like(g)
        for other, f in factors.items():
            if other != k:
                others = others * f
        slot_d[k] = others[:, None] * slope(factors[k], host_bases[k])
    return g, slot_d


@dataclasses.dataclass
class HostProblem:
    """A small problem's live rows (weight > 0: padding and excluded rows add nothing to any
    sum) on the host, with every component's slot columns, for the numpy twins."""

    links: dict
    bases: dict  # per component: its basis arrays (numpy)
    live: np.ndarray  # i[n_live] rows of the problem that count
    weight: np.ndarray
    intensity: np.ndarray
    group_id: np.ndarray  # i[n_live] int64
    n_groups: int
    cols: np.ndarray  # i[n_live, S]: every component's slot columns in the flat parameters
    anchor: np.ndarray
    restraint: np.ndarray  # f[n_params] restraint weights w_p

    @classmethod
    def of(cls, target: ScalingTarget, data: TargetData) -> "HostProblem | None":
        """None where a component has no twin or slot slope, or the problem is too large."""
        p = data.problem
        n_rows = int(np.shape(p.weight)[0])
        links = host_links(target, data.bases, n_rows)
        if links is None:
            return None
        bases = {k: {name: np.asarray(v) for name, v in data.bases[k].items()} for k in target.components}
        live = np.flatnonzero(np.asarray(p.weight) > 0)
        cols = np.concatenate([bases[k]["idx"].astype(np.int64) + target.slices[k].start
                               for k in target.components], axis=1)[live]
        return cls(links, bases, live, np.asarray(p.weight, np.float64)[live],
                   np.asarray(p.intensity, np.float64)[live], np.asarray(p.group_id).astype(np.int64)[live],
                   int(p.n_groups), cols, np.asarray(data.anchor, np.float64),
                   np.asarray(target.restraint_weights, np.float64))

    def scales(self, target: ScalingTarget, x_eff: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(g, dg/d(slot values) f[n_live, S], I_h f[n_groups], sum w g^2 f[n_groups]) at x_eff."""
        g, slot_d = host_slot_derivatives(target, self.links, x_eff, self.bases)
        g = g[self.live]
        d = np.concatenate(list(slot_d.values()), axis=1)[self.live]
        wg = self.weight * g
        num = np.bincount(self.group_id, wg * self.intensity, self.n_groups)
        den = np.bincount(self.group_id, wg * g, self.n_groups)
        ok = den > 0
        return g, d, np.where(ok, num / np.where(ok, den, 1.0), 0.0), den


def host_value_and_grad(target: ScalingTarget, data: TargetData, max_rows: int = LBFGS_HOST_MAX_ROWS
                        ) -> Callable[[np.ndarray], tuple[float, np.ndarray]] | None:
    """numpy twin of `target.value_and_grad(x, data)` (x -> (f, df/dx)) for problems of at most
    `max_rows` rows: f = sum w r^2 + sum w_p p_eff^2 with r = I - g I_h at the closed-form I_h,
    and its gradient -2 sum_i w_i r_i I_h dg_i/dp + 2 w_p p_eff on free parameters (0 on fixed
    ones) from the links' slot slopes. The I_h-dependence term, sum_h (df/dI_h) dI_h/dp, is
    dropped: df/dI_h = -2 sum_(i in h) w_i r_i g_i is zero at the closed-form I_h (autodiff
    carries only its rounding). None where it does not apply: a robust loss, a fixed reference
    I_h, a target with its own objective, or other bases or links."""
    p = data.problem
    n_rows, n = int(np.shape(p.weight)[0]), target.n_params
    if (n_rows > max_rows or p.ih_reference is not None or target.loss is not least_squares
            or type(target)._value is not ScalingTarget._value):
        return None
    hp = HostProblem.of(target, data)
    if hp is None:
        return None
    cols = hp.cols.ravel()
    free = np.asarray(data.free, bool)

    def value_and_grad(x: np.ndarray) -> tuple[float, np.ndarray]:
        x_eff = np.where(free, x, hp.anchor)
        g, d, ih, _ = hp.scales(target, x_eff)
        ih = ih[hp.group_id]
        r = hp.intensity - g * ih
        value = float(np.sum(hp.weight * r * r)) + float(np.sum(hp.restraint * x_eff**2))
        grad = np.bincount(cols, ((-2.0 * hp.weight * r * ih)[:, None] * d).ravel(), n) + 2.0 * hp.restraint * x_eff
        return value, np.where(free, grad, 0.0)

    return value_and_grad
