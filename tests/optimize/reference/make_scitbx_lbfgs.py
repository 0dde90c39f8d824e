#!/usr/bin/python3
"""Reference L-BFGS trajectories from scitbx (the minimiser dials.scale uses).

Run with DIALS' python: /usr/bin/python3 tests/optimize/reference/make_scitbx_lbfgs.py
Writes scitbx_lbfgs.json beside this file: per problem, the start point and, after each
accepted step, f, x and the cumulative number of function evaluations.
"""
import json
import math
from pathlib import Path

from scitbx import lbfgs
from scitbx.array_family import flex


def rosenbrock(x):
    f, g = 0.0, [0.0] * len(x)
    for i in range(len(x) - 1):
        a, b = x[i + 1] - x[i] ** 2, 1.0 - x[i]
        f += 100.0 * a * a + b * b
        g[i] += -400.0 * a * x[i] - 2.0 * b
        g[i + 1] += 200.0 * a
    return f, g


def scaled_quartic(x):
    """sum c_i (x_i - 1)^2 + 0.1 (sum x_i)^4, c_i spanning four decades (many line-search evaluations)."""
    n = len(x)
    c = [10.0 ** (4.0 * i / (n - 1)) for i in range(n)]
    s = sum(x)
    f = sum(ci * (xi - 1.0) ** 2 for ci, xi in zip(c, x)) + 0.1 * s**4
    g = [2.0 * ci * (xi - 1.0) + 0.4 * s**3 for ci, xi in zip(c, x)]
    return f, g


def log_cosh(x):
    """sum log cosh(3 (x_i - i/n)) + 0.5 |x|^2 / 100: gradient small at the start (|g| < 1)."""
    n = len(x)
    f = sum(math.log(math.cosh(3.0 * (xi - i / n))) for i, xi in enumerate(x)) + 0.005 * sum(xi * xi for xi in x)
    g = [3.0 * math.tanh(3.0 * (xi - i / n)) + 0.01 * xi for i, xi in enumerate(x)]
    return f, g


PROBLEMS = {
    "rosenbrock": (rosenbrock, [-1.2, 1.0] * 5),
    "scaled_quartic": (scaled_quartic, [0.0] * 8),
    "log_cosh": (log_cosh, [0.05 * ((-1) ** i) for i in range(6)]),
}


class Evaluator:
    def __init__(self, fn, x0, n_steps):
        self.fn = fn
        self.x = flex.double(x0)
        self.n_calls = 0
        self.steps = []
        self.n_steps = n_steps

    def compute_functional_and_gradients(self):
        self.n_calls += 1
        f, g = self.fn(list(self.x))
        self._f = f
        return f, flex.double(g)

    def callback_after_step(self, minimizer):
        self.steps.append({"f": self._f, "x": list(self.x), "n_calls": self.n_calls})
        return len(self.steps) >= self.n_steps


def main():
    out = {}
    for name, (fn, x0) in PROBLEMS.items():
        ev = Evaluator(fn, x0, 40)
        m = lbfgs.run(target_evaluator=ev, termination_params=lbfgs.termination_parameters(
            traditional_convergence_test_eps=1e-10))
        out[name] = {"x0": x0, "steps": ev.steps, "error": m.error}
    path = Path(__file__).with_name("scitbx_lbfgs.json")
    path.write_text(json.dumps(out, indent=1))
    for k, v in out.items():
        print(k, len(v["steps"]), v["steps"][-1]["f"], v["steps"][-1]["n_calls"], v["error"])


if __name__ == "__main__":
    main()
