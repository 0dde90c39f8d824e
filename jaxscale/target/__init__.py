"""Residuals, pluggable per-residual losses, restraints and the jitted scaling objective."""
from jaxscale.target.losses import get_loss, huber, least_squares, student_t
from jaxscale.target.objective import (
    ChunkData,
    ScalingProblem,
    ScalingTarget,
    TargetData,
    chunk_by_groups,
    group_mean,
    make_problem,
    n_reflections,
    residuals,
    select_rows,
)

__all__ = [
    "ChunkData",
    "ScalingProblem",
    "ScalingTarget",
    "TargetData",
    "chunk_by_groups",
    "get_loss",
    "group_mean",
    "huber",
    "least_squares",
    "make_problem",
    "n_reflections",
    "residuals",
    "select_rows",
    "student_t",
]
