"""L-BFGS driver, Levenberg–Marquardt / Gauss–Newton on the exact Jacobian, covariance."""
from jaxscale.optimize.lbfgs import OptimisationResult, minimise_lbfgs
from jaxscale.optimize.levmar import (
    FullMatrixResult,
    inverse_scale_variance,
    minimise_full_matrix,
    parameter_covariance,
    propagate_variance,
)

__all__ = [
    "FullMatrixResult",
    "OptimisationResult",
    "inverse_scale_variance",
    "minimise_full_matrix",
    "minimise_lbfgs",
    "parameter_covariance",
    "propagate_variance",
]
