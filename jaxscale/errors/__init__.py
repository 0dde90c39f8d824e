"""Basic (a, b) error model and normalised-deviation outlier rejection."""
from jaxscale.errors.error_model import (
    ErrorModelResult,
    InsufficientReflections,
    apply_error_model,
    filter_for_error_model,
    refine_error_model,
)
from jaxscale.errors.outliers import (
    cap_weights,
    determine_outliers,
    normalised_intensity_outliers,
    simple_outliers,
    standard_outliers,
    targeted_outliers,
)

__all__ = [
    "ErrorModelResult",
    "InsufficientReflections",
    "apply_error_model",
    "cap_weights",
    "determine_outliers",
    "filter_for_error_model",
    "normalised_intensity_outliers",
    "refine_error_model",
    "simple_outliers",
    "standard_outliers",
    "targeted_outliers",
]
