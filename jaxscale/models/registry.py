"""Model types and their components, by name.

A model type is a module with MODEL_ID, COMPONENT_ORDER, NULL_VALUES, CONSECUTIVE_ORDER,
from_data, update, entries and limit_image_range (which components are shared across data
sets is rules.shared_components, the same for every type). A component is a
`configure(name, entries, n_obs, shared)` function returning a ConfiguredComponent.
Adding a component: a module with `entry(...)` + `configure(...)`, one line in COMPONENTS,
and the model type's `entries()` producing it.
"""
from __future__ import annotations

from types import ModuleType
from typing import Callable

from jaxscale.models import absorption, array, decay, dose_decay, kb, physical, scale

MODEL_TYPES: dict[str, ModuleType] = {
    "physical": physical,
    "KB": kb,
    "array": array,
    "dose_decay": dose_decay,
}

COMPONENTS: dict[tuple[str, str], Callable] = {
    ("physical", "scale"): scale.configure,
    ("physical", "decay"): decay.configure,
    ("physical", "absorption"): absorption.configure,
    ("KB", "scale"): kb.configure_scale,
    ("KB", "decay"): kb.configure_b,
    ("array", "decay"): array.configure_grid,
    ("array", "absorption"): array.configure_grid,
    ("array", "modulation"): array.configure_grid,
    ("dose_decay", "scale"): scale.configure,
    ("dose_decay", "decay"): dose_decay.configure_dose,
    ("dose_decay", "relative_B"): kb.configure_b,
    ("dose_decay", "absorption"): absorption.configure,
}


def component_key(model_id: str, name: str) -> str:
    """Key of a component in ScalingModel dicts: '<model id>.<DIALS component name>'."""
    return f"{model_id}.{name}"
