"""Simulated integrated data with planted truth (rotation sweeps and serial stills).

`simulate_rotation_sweep` and `simulate_stills` return (ReflectionTable, ExperimentList,
truth dict); `write_simulation` writes integrated.refl / integrated.expt / truth.npz.
"""
from jaxscale.sim.io import load_truth, write_simulation
from jaxscale.sim.rotation import simulate_rotation_sweep
from jaxscale.sim.stills import simulate_stills

__all__ = ["simulate_rotation_sweep", "simulate_stills", "write_simulation", "load_truth"]
