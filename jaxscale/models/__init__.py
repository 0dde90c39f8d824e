"""Scaling models: pure components over precomputed per-observation bases.

Public surface: `build_model(datasets, options) -> ScalingModel`, `DatasetInput`,
`DatasetModelState`, `state_from_dials_json`, and the component contract in `component`.
"""
from jaxscale.models.build import (  # noqa: F401
    DatasetInput,
    DatasetModelState,
    ScalingModel,
    build_model,
    choose_model_id,
    state_from_dials_json,
)
