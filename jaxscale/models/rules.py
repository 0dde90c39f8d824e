"""DIALS' parameter-count rules and option access shared by the model modules."""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from jaxscale.models.inputs import DatasetModelState

AUTO = "auto"
_MISSING = object()


def option(options: Any, dotted: str, default: Any = None) -> Any:
    """options.<dotted> for any object tree (pydantic params, SimpleNamespace); default if absent."""
    value = options
    for part in dotted.split("."):
        value = getattr(value, part, _MISSING) if value is not None else _MISSING
        if value is _MISSING:
            return default
    return value


def fixed_components(options: Any, model_id: str) -> list[str]:
    """Components the user fixed with `<model id>.correction.fix` (empty when unset)."""
    return list(option(options, f"{model_id}.correction.fix", None) or [])


def update_fixed_components(state: DatasetModelState, options: Any) -> None:
    """Replace a loaded model's fixed components when `<model id>.correction.fix` is given (DIALS update)."""
    fix = fixed_components(options, state.model_id)
    if fix:
        state.fixed_components = fix


def shared_components(state: DatasetModelState) -> set[str]:
    """Components with one set of parameters for all data sets: config "shared" less the fixed ones."""
    return set(state.config.get("shared", [])) - set(state.fixed_components)


def is_auto(value: Any) -> bool:
    """True for DIALS' auto (None, 'auto' in any case)."""
    return value is None or (isinstance(value, str) and value.lower() == AUTO)


def initialise_smooth_input(osc_range: tuple[float, float], osc_width: float,
                            interval: float) -> tuple[int, float, float]:
    """(n_params, norm_fac, rot_interval) of a rotation-smoothed component (models.md §3)."""
    interval = interval + 0.00001
    span = osc_range[1] - osc_range[0]
    if span < 2.0 * interval:
        if span <= interval:
            rot_int, n_params = span, 2
        else:
            rot_int, n_params = span / 2.0, 3
    else:
        n_bins = max(int(span / interval) + 1, 3)
        rot_int = span / float(n_bins)
        n_params = n_bins + 2
    return n_params, 0.999 * osc_width / rot_int, rot_int


def n_param_from_bins(value_min: float, value_max: float, n_bins: int) -> tuple[int, float]:
    """(n_params, bin_width) of a binned grid axis: 1 bin -> 2, 2 -> 3, else n_bins + 2."""
    if n_bins < 1:
        raise ValueError("number of bins must be positive")
    width = (value_max - value_min) / n_bins
    return {1: 2, 2: 3}.get(n_bins, n_bins + 2), width


def new_parameter_offset(current_first: int, new_first: int, new_norm_fac: float,
                         n_old: int, n_new: int) -> int:
    """Offset of the kept parameter slice when the image range shrinks (models.md §4.5)."""
    if n_old == 2:
        return 0
    shift = (new_first - current_first) * new_norm_fac
    n_shift = int(shift // 1)
    if shift % 1 > 0.5:
        n_shift += 1
    return min(n_old - n_new, n_shift)


def absorption_level_params(level: str) -> tuple[int, float]:
    """(lmax, surface_weight) for physical.absorption_level low/medium/high."""
    return {"high": (6, 5e3), "medium": (6, 5e4)}.get(level, (4, 5e5))


def auto_intervals(abs_osc_range: float) -> tuple[float, float]:
    """(scale_interval, decay_interval) of the physical model for a sweep width (models.md §4.1)."""
    for limit, pair in ((5.0, (1.0, 1.5)), (10.0, (2.0, 3.0)), (25.0, (4.0, 5.0)), (90.0, (8.0, 10.0))):
        if abs_osc_range < limit:
            return pair
    return 15.0, 20.0


def one_osc_width(config: dict) -> float:
    """Oscillation per image from a model's valid ranges (DIALS limit_image_range)."""
    (o0, o1), (i0, i1) = config["valid_osc_range"], config["valid_image_range"]
    return (o1 - o0) / (i1 - (i0 - 1))


def reduced_osc_range(config: dict, new_range: tuple[int, int]) -> tuple[float, tuple[float, float]]:
    """(oscillation per image, rotation range of new_range from the model's first valid image)."""
    first0 = config["valid_image_range"][0]
    osc = one_osc_width(config)
    return osc, ((new_range[0] - first0) * osc, (new_range[1] - first0 + 1) * osc)


def floor_div(a: float, b: float) -> int:
    return int(math.floor(a / b))
