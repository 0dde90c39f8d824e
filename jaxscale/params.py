"""The one typed parameter tree of jaxscale: dials.scale 3.12's options, plus a few of our own.

Every DIALS option keeps its dotted name, nesting, default, type, choices, value range and
expert level, so ``p.cut_data.d_min`` here is ``params.cut_data.d_min`` in dials.scale.
jaxscale extras (marked ``[jaxscale]`` in their help) are ``weighting.likelihood``,
``weighting.student_t_dof``, ``weighting.huber_delta`` and the ``compute`` scope.

Conventions for the engine:

* ``auto`` is the string constant :data:`AUTO` (``"auto"``). Only the five options whose DIALS
  default is ``auto`` accept it (``physical.scale_interval``, ``physical.decay_interval``,
  ``physical.absorption_correction``, ``physical.lmax``, ``physical.surface_weight``); for these,
  ``None`` given by the user is stored as ``AUTO`` too (DIALS accepts None there but cannot use
  it), so the engine only tests ``value == AUTO`` (or :func:`is_auto`).
* Every other option that allows None stores a plain ``None`` meaning "not set".
* A choice without a starred default in DIALS (``model``, ``physical.absorption_level``,
  ``filtering.method``, ``cross_validation.cross_validation_mode``) defaults to ``None``;
  the choice ``None`` of ``weighting.error_model.error_model`` / ``...basic.minimisation``
  is Python ``None``.
* Options DIALS marks ``.multiple`` are lists that default to ``[]``: ``exclude_images``
  (flattened: one ``"exp:start:end"`` or ``"start:end"`` string per range),
  ``weighting.error_model.error_model_group`` (list of lists of dataset ids),
  ``input.experiments`` and ``input.reflections`` (paths, paired by order).
* DIALS ``floats(size=2)`` and ``unit_cell`` are tuples; ``ints``/``floats``/``strings`` lists.

Public functions: :func:`iter_parameters`, :func:`resolve_key`, :func:`apply_overrides`, :func:`image_ranges`,
:func:`params_from_dict`, :func:`diff_from_defaults`, :func:`check_conflicts`,
:func:`explain_conflicts`, :func:`format_phil`, :func:`markdown_docs`.
"""
from __future__ import annotations

import difflib
import math
import re
import types
import typing
import warnings
from collections.abc import Iterable, Iterator, Mapping
from typing import Annotated, Any, Final, Literal, NamedTuple, Union

from annotated_types import Ge, Gt, Le
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from jaxscale.exceptions import ParameterError

AUTO: Final = "auto"
Auto = Literal["auto"]

FloatGe0 = Annotated[float, Ge(0)]
FloatGe1 = Annotated[float, Ge(1)]
FloatGe3 = Annotated[float, Ge(3)]
FloatGe1em6 = Annotated[float, Ge(1e-6)]
FloatGt0 = Annotated[float, Gt(0)]
Percent = Annotated[float, Ge(0), Le(100)]
IntGe1 = Annotated[int, Ge(1)]
IntGe2 = Annotated[int, Ge(2)]


def is_auto(value: Any) -> bool:
    """True where an option is left to the automatic rule (``"auto"``, any case)."""
    return isinstance(value, str) and value.lower() == AUTO


def opt(default: Any = None, help: str = "", *, level: int | None = None, type: str,
        multiple: bool = False, factory: Any = None, jaxscale: bool = False) -> Any:
    """A parameter: default, short help, DIALS expert level (None = inherit) and DIALS type text."""
    extra = {"expert_level": level, "dials_type": type, "multiple": multiple, "jaxscale": jaxscale}
    if factory is not None:
        return Field(default_factory=factory, description=help, json_schema_extra=extra)
    return Field(default, description=help, json_schema_extra=extra)


def scope(cls: type[BaseModel], help: str = "", *, level: int | None = None, jaxscale: bool = False,
          inline: bool = False) -> Any:
    """A nested scope (``physical { ... }``) with its own help and expert level.

    ``inline`` scopes are DIALS' dotted names (``correction.fix``): shown as ``a.b = v``.
    """
    return Field(default_factory=cls, description=help, json_schema_extra={
        "expert_level": level, "scope": True, "jaxscale": jaxscale, "inline": inline})


class _Scope(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


class _AutoNone(_Scope):
    """Scopes whose ``auto``-default options read None as auto."""

    _auto_fields: typing.ClassVar[tuple[str, ...]] = ()

    @model_validator(mode="before")
    @classmethod
    def _none_is_auto(cls, data: Any) -> Any:
        if isinstance(data, dict):
            data = dict(data)
            for name in cls._auto_fields:
                if name in data and (data[name] is None or is_auto(data[name])):
                    data[name] = AUTO
        return data


# ---------------------------------------------------------------- models
class Correction(_Scope):
    fix: list[str] | None = opt(None, "Model components kept fixed (not refined) in this run.", type="strings")


class KBScope(_Scope):
    decay_correction: bool = opt(True, "Refine a global relative B (decay) factor.", level=1, type="bool")
    correction: Correction = scope(Correction, inline=True)


class ArrayScope(_Scope):
    decay_correction: bool = opt(True, "Refine the decay grid (rotation x resolution).", level=1, type="bool")
    decay_interval: FloatGe1 | None = opt(20.0, "Rotation spacing (degrees) of decay/absorption parameters.",
                                          level=1, type="float(value_min=1, allow_none=True)")
    n_resolution_bins: IntGe1 | None = opt(10, "Number of resolution bins of the decay grid.", level=1,
                                           type="int(value_min=1, allow_none=True)")
    absorption_correction: bool = opt(True, "Refine the absorption grid (rotation x detector x, y).", level=1,
                                      type="bool")
    n_absorption_bins: IntGe1 | None = opt(3, "Detector bins per axis for the absorption grid.", level=1,
                                           type="int(value_min=1, allow_none=True)")
    modulation_correction: bool = opt(False, "Refine a detector-position (modulation) correction.", level=2,
                                      type="bool")
    n_modulation_bins: IntGe1 | None = opt(20, "Detector bins per axis for the modulation correction.", level=2,
                                           type="int(value_min=1, allow_none=True)")
    correction: Correction = scope(Correction, inline=True)


class DoseDecayShare(_Scope):
    decay: bool = opt(True, "One dose-decay parameter shared by all sweeps.", level=1, type="bool")


class DoseDecayScope(_Scope):
    scale_interval: FloatGe1 | None = opt(2.0, "Rotation spacing (degrees) of scale parameters.", level=1,
                                          type="float(value_min=1, allow_none=True)")
    relative_B_correction: bool = opt(True, "Refine a relative B per sweep.", level=1, type="bool")
    decay_correction: bool = opt(True, "Refine the dose-dependent decay.", level=1, type="bool")
    share: DoseDecayShare = scope(DoseDecayShare, inline=True)
    resolution_dependence: Literal["quadratic", "linear"] = opt(
        "quadratic", "Decay grows with 1/d squared (quadratic) or 1/d (linear).", level=1, type="choice")
    absorption_correction: bool = opt(False, "Refine a spherical-harmonic absorption surface.", level=1,
                                      type="bool")
    lmax: IntGe2 | None = opt(4, "Highest spherical-harmonic order for absorption (6 or less advised).",
                              level=2, type="int(value_min=2, allow_none=True)")
    surface_weight: FloatGe0 | None = opt(1e6, "Restraint weight on the spherical-harmonic terms.", level=2,
                                          type="float(value_min=0, allow_none=True)")
    fix_initial: bool = opt(True, "Fix the first scale parameter in the final full-matrix round.", level=2,
                            type="bool")
    correction: Correction = scope(Correction, inline=True)


class PhysicalShare(_Scope):
    absorption: bool = opt(False, "One absorption surface shared by all sweeps.", type="bool")


class PhysicalScope(_AutoNone):
    _auto_fields = ("scale_interval", "decay_interval", "absorption_correction", "lmax", "surface_weight")

    scale_interval: FloatGe1 | Auto = opt(
        AUTO, "Rotation spacing (degrees) of scale parameters; auto picks it from the sweep width.",
        level=1, type="float(value_min=1, allow_none=True)")
    decay_correction: bool = opt(True, "Refine a smoothly varying relative B (decay).", level=1, type="bool")
    decay_interval: FloatGe1 | Auto = opt(
        AUTO, "Rotation spacing (degrees) of decay parameters; auto picks it from the sweep width.",
        level=1, type="float(value_min=1, allow_none=True)")
    decay_restraint: FloatGe0 | None = opt(1e-1, "Weight of the weak restraint of B values towards 0.",
                                           level=2, type="float(value_min=0, allow_none=True)")
    absorption_correction: bool | Auto = opt(
        AUTO, "Refine the spherical-harmonic absorption surface; auto = on for sweeps wider than 60 degrees.",
        level=1, type="bool")
    absorption_level: Literal["low", "medium", "high"] | None = opt(
        None, "Expected relative absorption (low ~1%, medium ~5%, high >25%); sets lmax and surface_weight.",
        level=1, type="choice")
    lmax: IntGe2 | Auto = opt(AUTO, "Highest spherical-harmonic order; auto = 4 unless absorption_level says.",
                              level=1, type="int(value_min=2, allow_none=True)")
    surface_weight: FloatGe0 | Auto = opt(
        AUTO, "Restraint weight on the harmonics (lower = more absorption); auto = 5e5 unless absorption_level.",
        level=1, type="float(value_min=0, allow_none=True)")
    share: PhysicalShare = scope(PhysicalShare, inline=True)
    fix_initial: bool = opt(True, "Fix the first scale parameter in the final full-matrix round.", level=2,
                            type="bool")
    correction: Correction = scope(Correction, inline=True)


# ---------------------------------------------------------------- output
class Merging(_Scope):
    nbins: int | None = opt(20, "Resolution bins for merging statistics and plots.", level=1,
                            type="int(allow_none=True)")


with warnings.catch_warnings():  # the DIALS name output.json shadows BaseModel.json (deprecated)
    warnings.simplefilter("ignore")

    class OutputScope(_Scope):
        log: str | None = opt("jaxscale.log", "Log file name (dials.scale: dials.scale.log).", type="str")
        experiments: str | None = opt("scaled.expt", "Output experiment list.", type="str")
        reflections: str | None = opt("scaled.refl", "Output reflection table.", type="str")
        html: str | None = opt("jaxscale.html", "HTML report file name (dials.scale: dials.scale.html).", type="str")
        json: str | None = opt(None, "Write the report data as JSON to this file.", type="str")
        unmerged_mtz: str | None = opt(None, "Also write an unmerged MTZ file.", type="str")
        merged_mtz: str | None = opt(None, "Also write a merged MTZ file.", type="str")
        crystal_name: str | None = opt("XTAL", "Crystal name stored in MTZ files.", level=1, type="str")
        project_name: str | None = opt("DIALS", "Project name stored in MTZ files.", type="str")
        use_internal_variance: bool = opt(
            False, "Merged sigmas from the spread of equivalents instead of their sigmas.", level=1, type="bool")
        merging: Merging = scope(Merging, inline=True)
        delete_integration_shoeboxes: bool = opt(True, "Drop shoebox data from the output to save memory.",
                                                 level=2, type="bool")


# ---------------------------------------------------------------- reflection selection
class MultiDatasetRandom(_Scope):
    Isigma_cutoff: float | None = opt(1.0, "Minimum mean I/sigma of a group used for connected selection.",
                                      type="float(allow_none=True)")


class RandomSelection(_Scope):
    multi_dataset: MultiDatasetRandom = scope(MultiDatasetRandom)
    min_groups: int | None = opt(2000, "At least this many symmetry groups in the minimisation subset.",
                                 level=1, type="int(allow_none=True)")
    min_reflections: int | None = opt(50000, "At least this many reflections in the minimisation subset.",
                                      level=1, type="int(allow_none=True)")


class Combine(_Scope):
    Imid: list[float] | None = opt(
        None, "Profile/summation crossover intensities to try (lowest Rmeas wins; 0 = profile, 1 = sum).",
        level=2, type="floats")
    joint_analysis: bool = opt(True, "One crossover intensity for all datasets (else one each).", level=2,
                               type="bool")


class ReflectionSelection(_Scope):
    method: Literal["quasi_random", "intensity_ranges", "use_all", "random"] = opt(
        "quasi_random", "How the minimisation subset is chosen: random groups (plus well connected groups "
        "across datasets for quasi_random), E2/I-sigma/d ranges, or everything.", type="choice")
    random: RandomSelection = scope(RandomSelection)
    best_unit_cell: tuple[float, float, float, float, float, float] | None = opt(
        None, "Cell for resolution cuts and statistics (default: median of the inputs).", type="unit_cell")
    E2_range: tuple[float, float] = opt((0.8, 5.0), "Normalised E^2 limits for intensity_ranges selection.",
                                        level=1, type="floats(size=2)")
    Isigma_range: tuple[float, float] = opt(
        (-5.0, 0.0), "I/sigma limits of the subset; an upper limit of 0 means none.", level=1,
        type="floats(size=2)")
    d_range: tuple[float, float] | None = opt(None, "d limits (min, max) of the subset.", level=1,
                                              type="floats(size=2)")
    min_partiality: float | None = opt(0.95, "Minimum partiality of reflections in the subset.", level=2,
                                       type="float(allow_none=True)")
    intensity_choice: Literal["profile", "sum", "combine"] = opt(
        "combine", "Profile-fitted, summation, or an optimised combination of both (alias: intensity).",
        level=1, type="choice")
    combine: Combine = scope(Combine, inline=True)

    @field_validator("d_range", "E2_range", "Isigma_range")
    @classmethod
    def _two_ordered(cls, value: tuple[float, float] | None, info: Any) -> tuple[float, float] | None:
        if value is None:
            return value
        low, high = value
        if info.field_name == "Isigma_range" and high == 0.0:
            return value
        if not low < high:
            raise ValueError(f"needs min < max, got {low:g}, {high:g}")
        return value


# ---------------------------------------------------------------- weighting / error model
class BasicErrorModel(_Scope):
    a: float | None = opt(None, "Fix the error-model parameter a to this value.", level=2,
                          type="float(allow_none=True)")
    b: float | None = opt(None, "Fix the error-model parameter b to this value.", level=2,
                          type="float(allow_none=True)")
    minimisation: Literal["individual", "regression", None] = opt(
        "individual", "Refine a then b in turn (individual), both by linear regression, or neither (None).",
        level=3, type="choice")
    min_Ih: float | None = opt(25.0, "Only groups with expected intensity above this refine the error model.",
                               level=2, type="float(allow_none=True)")
    n_bins: int | None = opt(10, "Intensity bins for error-model refinement.", level=2,
                             type="int(allow_none=True)")


class ErrorModelScope(_Scope):
    error_model: Literal["basic", None] = opt("basic", "Error model: basic (a, b) or None.", level=1,
                                               type="choice")
    basic: BasicErrorModel = scope(BasicErrorModel)
    reset_error_model: bool = opt(False, "Start from the default error model instead of the stored one.",
                                  type="bool")
    grouping: Literal["individual", "grouped", "combined"] = opt(
        "combined", "One error model for all sweeps, one per sweep, or groups given by error_model_group.",
        level=2, type="choice")
    error_model_group: list[list[int]] = opt(
        None, "Dataset ids sharing one error model (repeat for each group).", type="ints", multiple=True,
        factory=list)


class WeightingScope(_Scope):
    weighting_scheme: Literal["invvar"] = opt("invvar", "Weights in the I_h average (inverse variance).",
                                              level=2, type="choice")
    error_model: ErrorModelScope = scope(ErrorModelScope)
    likelihood: Literal["least_squares", "student_t", "huber"] = opt(
        "least_squares", "[jaxscale] Loss on the weighted residuals: DIALS' least squares, or a robust "
        "Student-t / Huber loss.", level=1, type="choice", jaxscale=True)
    student_t_dof: FloatGt0 = opt(4.0, "[jaxscale] Degrees of freedom of the Student-t loss.", level=2,
                                  type="float(value_min=0)", jaxscale=True)
    huber_delta: FloatGt0 = opt(1.345, "[jaxscale] Huber threshold on the normalised residual.", level=2,
                                type="float(value_min=0)", jaxscale=True)


# ---------------------------------------------------------------- cuts and options
class CutData(_Scope):
    d_min: float | None = opt(None, "High-resolution cut: keep reflections with d > d_min.", level=1,
                              type="float(allow_none=True)")
    d_max: float | None = opt(None, "Low-resolution cut: keep reflections with d < d_max.", level=1,
                              type="float(allow_none=True)")
    partiality_cutoff: float | None = opt(0.4, "Drop reflections with partiality below this.", level=1,
                                          type="float(allow_none=True)")
    min_isigi: float | None = opt(-5, "Drop reflections with profile or summation I/sigma below this.",
                                  level=1, type="float(allow_none=True)")
    small_scale_cutoff: float | None = opt(1e-3, "After scaling, drop reflections with scale below this.",
                                           level=3, type="float(allow_none=True)")


class ScalingOptions(_Scope):
    check_consistent_indexing: bool = opt(False, "Reindex datasets consistently (dials.cosym) first.",
                                          type="bool")
    target_cycle: bool = opt(True, "Do a first targeted round when some datasets are already scaled.",
                             level=2, type="bool")
    only_target: bool = opt(False, "Only do targeted scaling against already scaled datasets.", level=2,
                            type="bool")
    only_save_targeted: bool = opt(True, "With only_target, save just the newly scaled dataset.", level=2,
                                   type="bool")
    target_model: str | None = opt(None, "Deprecated: use reference= (cif/pdb model target).", level=2,
                                   type="path")
    target_mtz: str | None = opt(None, "Deprecated: use reference= (merged MTZ target).", level=2,
                                 type="path")
    reference: str | None = opt(None, "Reference intensities (.mtz/.cif) or model (.cif/.pdb) to scale to.",
                                level=2, type="path")
    nproc: IntGe1 | None = opt(1, "Number of blocks (and processes) for minimisation.", level=2,
                               type="int(value_min=1, allow_none=True)")
    use_free_set: bool = opt(False, "Keep a free set of groups out of refinement and report its RMSD.",
                             level=2, type="bool")
    free_set_percentage: float | None = opt(10.0, "Percentage of groups in the free set.", level=2,
                                            type="float(allow_none=True)")
    free_set_offset: int | None = opt(0, "Offset of the free-set groups within all groups.", level=2,
                                      type="int(allow_none=True)")
    full_matrix: bool = opt(True, "Finish with a full-matrix round that gives scale uncertainties.", level=2,
                            type="bool")
    outlier_rejection: Literal["standard", "simple"] = opt(
        "standard", "Outlier algorithm: standard (thorough) or simple (fast).", level=1, type="choice")
    outlier_zmax: FloatGe3 | None = opt(6.0, "Normalised-deviation cutoff for outliers.", level=1,
                                        type="float(value_min=3, allow_none=True)")
    emax: FloatGe0 | None = opt(10, "Reject reflections with E^2 > emax^2.", level=2,
                                type="float(value_min=0, allow_none=True)")


class CrossValidation(_Scope):
    cross_validation_mode: Literal["multi", "single"] | None = opt(
        None, "Cross-validate one configuration (single) or several values of a parameter (multi).", level=2,
        type="choice")
    parameter: str | None = opt(None, "Full dotted name of the parameter to cross-validate.", level=2,
                                type="str")
    parameter_values: list[str] | None = opt(None, "Values of that parameter to compare.", level=2,
                                             type="strings")
    nfolds: IntGe1 | None = opt(1, "Number of cross-validation folds (at most 1/free_set_percentage).",
                                level=2, type="int(value_min=1, allow_none=True)")


class ScalingRefinery(_Scope):
    engine: Literal["SimpleLBFGS", "GaussNewton", "LevMar"] = opt(
        "SimpleLBFGS", "Minimiser for the main scaling rounds.", type="choice")
    refinement_order: Literal["concurrent", "consecutive"] = opt(
        "concurrent", "Refine all components together or one after another.", level=2, type="choice")
    max_iterations: IntGe1 | None = opt(None, "Iteration limit per round (None: the engine's default).",
                                        type="int(value_min=1, allow_none=True)")
    rmsd_tolerance: FloatGe1em6 | None = opt(
        1e-4, "Stop when the relative RMSD change between iterations is below this.",
        type="float(value_min=1e-06, allow_none=True)")
    full_matrix_engine: Literal["GaussNewton", "LevMar"] = opt(
        "LevMar", "Minimiser for the final full-matrix round.", type="choice")
    full_matrix_max_iterations: IntGe1 | None = opt(
        None, "Iteration limit of the full-matrix round (None: the engine's default).",
        type="int(value_min=1, allow_none=True)")


class DeltaCCHalf(_Scope):
    max_cycles: IntGe1 | None = opt(6, "Maximum scale-and-filter cycles.", type="int(value_min=1, allow_none=True)")
    max_percent_removed: float | None = opt(10, "Stop once this percentage of reflections is removed.",
                                            type="float(allow_none=True)")
    min_completeness: Percent | None = opt(None, "Stop before completeness falls below this percentage.",
                                           type="float(value_min=0, value_max=100, allow_none=True)")
    mode: Literal["dataset", "image_group"] = opt("dataset", "Filter whole datasets or groups of images.",
                                                  type="choice")
    group_size: IntGe1 | None = opt(10, "Images per group in image_group mode.",
                                    type="int(value_min=1, allow_none=True)")
    stdcutoff: float | None = opt(4.0, "Remove groups with delta CC1/2 below mean - stdcutoff * sd.",
                                  type="float(allow_none=True)")


class FilteringOutput(_Scope):
    scale_and_filter_results: str | None = opt("scale_and_filter_results.json",
                                               "JSON file of the scale-and-filter cycles.", type="str")


class Filtering(_Scope):
    method: Literal[None, "deltacchalf"] = opt(None, "Scale-and-filter cycles by delta CC1/2 (default: none).",
                                                type="choice")
    deltacchalf: DeltaCCHalf = scope(DeltaCCHalf)
    output: FilteringOutput = scope(FilteringOutput)


class DatasetSelection(_Scope):
    use_datasets: list[int] | None = opt(None, "Only these dataset ids of a multi-dataset input.", level=2,
                                         type="ints")
    exclude_datasets: list[int] | None = opt(None, "Leave out these dataset ids.", level=2, type="ints")


class InputScope(_Scope):
    experiments: list[str] = opt(None, "Experiment list files (.expt), paired with reflections by order.",
                                 type="experiment_list", multiple=True, factory=list)
    reflections: list[str] = opt(None, "Reflection table files (.refl).", type="reflection_table",
                                 multiple=True, factory=list)


class ComputeScope(_Scope):
    precision: Literal["float64", "float32"] = opt(
        "float64", "[jaxscale] Floating-point precision; float32 is faster on GPUs, float64 matches DIALS.",
        level=1, type="choice", jaxscale=True)
    n_devices: IntGe1 | None = opt(1, "[jaxscale] Devices to shard the serial objective over (None: all; "
                                   "without an accelerator, N > 1 makes N CPU devices).",
                                   level=2, type="int(value_min=1, allow_none=True)", jaxscale=True)
    serial: Literal["auto", "true", "false"] = opt(
        "auto", "[jaxscale] Serial path for many stills (one KB model each, flat arrays): auto = when more than "
        "1000 experiments are all stills with the KB model.", level=1, type="choice", jaxscale=True)


_EXCLUDE_RANGE = re.compile(r"^(\d+:)?\d+:\d+$")


class ScaleParams(_Scope):
    """Root of the tree: ``ScaleParams()`` holds dials.scale's defaults."""

    model: Literal["KB", "array", "dose_decay", "physical"] | None = opt(
        None, "Scaling model for the datasets (default: physical for sweeps, KB for stills).", level=0,
        type="choice")
    KB: KBScope = scope(KBScope, level=1)
    array: ArrayScope = scope(ArrayScope, level=1)
    dose_decay: DoseDecayScope = scope(DoseDecayScope, level=1)
    physical: PhysicalScope = scope(PhysicalScope, level=1)
    output: OutputScope = scope(OutputScope)
    anomalous: bool = opt(False, "Keep Friedel mates apart in scaling and error-model refinement.", level=0,
                          type="bool")
    overwrite_existing_models: bool = opt(False, "Create new models even where datasets were scaled before.",
                                          level=0, type="bool")
    reflection_selection: ReflectionSelection = scope(ReflectionSelection)
    weighting: WeightingScope = scope(WeightingScope)
    cut_data: CutData = scope(CutData)
    scaling_options: ScalingOptions = scope(ScalingOptions)
    cross_validation: CrossValidation = scope(CrossValidation)
    scaling_refinery: ScalingRefinery = scope(ScalingRefinery, "Settings of the minimisers.", level=1)
    filtering: Filtering = scope(Filtering)
    exclude_images: list[str] = opt(
        None, "Image ranges to leave out, exp:start:end (inclusive), e.g. 0:150:200,1:200:250.", level=1,
        type="strings", multiple=True, factory=list)
    dataset_selection: DatasetSelection = scope(DatasetSelection)
    input: InputScope = scope(InputScope)
    compute: ComputeScope = scope(ComputeScope, "[jaxscale] Precision and devices.", jaxscale=True)

    @field_validator("exclude_images", mode="before")
    @classmethod
    def _flatten_ranges(cls, value: Any) -> Any:
        return split_image_ranges(value)

    @model_validator(mode="after")
    def _no_conflicts(self) -> ScaleParams:
        problems = check_conflicts(self)
        if problems:
            raise ValueError(problems[0])
        return self


def split_image_ranges(value: Any) -> list[str]:
    """exclude_images values -> one ``"exp:start:end"``/``"start:end"`` string per range (checked)."""
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    items: list[str] = []
    for entry in value:
        if isinstance(entry, (list, tuple)):
            entry = " ".join(map(str, entry))
        items.extend(t for t in re.split(r"[,\s]+", str(entry)) if t)
    for item in items:
        if not _EXCLUDE_RANGE.match(item):
            raise ValueError(f"'{item}' is not exp:start:end or start:end")
        start, end = (int(x) for x in item.split(":")[-2:])
        if start > end:
            raise ValueError(f"'{item}' has start > end")
    return items


def image_ranges(items: list[str]) -> list[tuple[int | None, int, int]]:
    """``exclude_images`` items -> (experiment index or None for "start:end", first, last), inclusive."""
    out: list[tuple[int | None, int, int]] = []
    for item in split_image_ranges(items):
        parts = [int(x) for x in item.split(":")]
        out.append((parts[0], parts[1], parts[2]) if len(parts) == 3 else (None, parts[0], parts[1]))
    return out


# ================================================================ conflicts
def check_conflicts(p: ScaleParams) -> list[str]:
    """Combinations of options that cannot work together (each message names the options)."""
    problems = []
    ds = p.dataset_selection
    if ds.use_datasets is not None and ds.exclude_datasets is not None:
        problems.append("dataset_selection.use_datasets and dataset_selection.exclude_datasets are both set; "
                        "give only one of them")
    cut = p.cut_data
    if cut.d_min is not None and cut.d_max is not None and cut.d_min >= cut.d_max:
        problems.append(f"cut_data.d_min={cut.d_min:g} must be smaller than cut_data.d_max={cut.d_max:g} "
                        "(d_min is the high-resolution limit)")
    em = p.weighting.error_model
    if em.grouping == "grouped" and not em.error_model_group:
        problems.append("weighting.error_model.grouping=grouped needs at least one "
                        "weighting.error_model.error_model_group")
    cv = p.cross_validation
    if cv.parameter_values is not None and cv.parameter is None:
        problems.append("cross_validation.parameter_values is set but cross_validation.parameter is not")
    return problems


def explain_conflicts(p: ScaleParams) -> list[str]:
    """Harmless but possibly surprising combinations: notes for the log, not errors."""
    notes = []
    defaults = ScaleParams()
    if not p.scaling_options.full_matrix and (
            p.scaling_refinery.full_matrix_engine != defaults.scaling_refinery.full_matrix_engine
            or p.scaling_refinery.full_matrix_max_iterations is not None):
        notes.append("scaling_refinery.full_matrix_* options have no effect with scaling_options.full_matrix=False")
    for name in ("KB", "array", "dose_decay", "physical"):
        if p.model is not None and p.model != name and getattr(p, name) != getattr(defaults, name):
            notes.append(f"{name}.* options are set but model={p.model}; they apply only to {name} models")
    if p.reflection_selection.method != "intensity_ranges" and (
            p.reflection_selection.E2_range != defaults.reflection_selection.E2_range):
        notes.append("reflection_selection.E2_range is only used with reflection_selection.method=intensity_ranges")
    lik = p.weighting.likelihood
    if lik != "student_t" and p.weighting.student_t_dof != defaults.weighting.student_t_dof:
        notes.append("weighting.student_t_dof is only used with weighting.likelihood=student_t")
    if lik != "huber" and p.weighting.huber_delta != defaults.weighting.huber_delta:
        notes.append("weighting.huber_delta is only used with weighting.likelihood=huber")
    if p.physical.absorption_level is not None and (
            not is_auto(p.physical.lmax) or not is_auto(p.physical.surface_weight)):
        notes.append("physical.absorption_level overrides physical.lmax and physical.surface_weight")
    return notes


# ================================================================ schema walking
class ParameterInfo(NamedTuple):
    """One leaf of the tree as :func:`iter_parameters` reports it."""

    path: str                 # dotted name, e.g. "cut_data.d_min"
    type: str                 # DIALS type text, e.g. "float(value_min=1, allow_none=True)"
    default: Any              # Python default (AUTO, None, list, tuple ...)
    choices: tuple[Any, ...] | None  # values of a choice, as DIALS lists them (None where listed)
    expert_level: int         # level at which `show-config -e` shows it (max over its scopes)
    help: str


class _Leaf(NamedTuple):
    info: ParameterInfo
    own_level: int | None     # DIALS' own .expert_level (None: not given)
    inherited_level: int      # own level, else the nearest scope's (DIALS' tie-break rule)
    multiple: bool
    jaxscale: bool
    annotation: Any


class _ScopeInfo(NamedTuple):
    path: str
    help: str
    own_level: int | None


def _extra(field: Any) -> dict[str, Any]:
    return dict(field.json_schema_extra or {})


def _walk(model: type[BaseModel], prefix: str, levels: tuple[int | None, ...]) -> Iterator[_Leaf | _ScopeInfo]:
    for name, field in model.model_fields.items():
        extra = _extra(field)
        path = f"{prefix}{name}"
        level = extra.get("expert_level")
        chain = levels + (level,)
        if extra.get("scope"):
            yield _ScopeInfo(path, field.description or "", level)
            yield from _walk(field.default_factory, path + ".", chain)  # type: ignore[arg-type]
            continue
        default = field.get_default(call_default_factory=True)
        shown = max([lv for lv in chain if lv is not None] or [0])
        inherited = next((lv for lv in reversed(chain) if lv is not None), 0)
        info = ParameterInfo(path, extra["dials_type"], default, _choices(field.annotation), shown,
                             field.description or "")
        yield _Leaf(info, level, inherited, bool(extra.get("multiple")), bool(extra.get("jaxscale")),
                    field.annotation)


def _leaves() -> dict[str, _Leaf]:
    global _LEAVES
    if _LEAVES is None:
        _LEAVES = {x.info.path: x for x in _walk(ScaleParams, "", ()) if isinstance(x, _Leaf)}
    return _LEAVES


_LEAVES: dict[str, _Leaf] | None = None


def iter_parameters() -> Iterator[ParameterInfo]:
    """Every parameter, in DIALS order: (dotted_path, type, default, choices, expert_level, help)."""
    for leaf in _leaves().values():
        yield leaf.info


def parameter_info(path: str) -> ParameterInfo:
    """The :class:`ParameterInfo` of one full dotted path."""
    return _leaves()[path].info


# ================================================================ types of a leaf
def _union_args(annotation: Any) -> list[Any]:
    origin = typing.get_origin(annotation)
    if origin in (Union, types.UnionType):
        out: list[Any] = []
        for arg in typing.get_args(annotation):
            out.extend(_union_args(arg))
        return out
    return [annotation]


def _choices(annotation: Any) -> tuple[Any, ...] | None:
    args = _union_args(annotation)
    literals = [a for a in args if typing.get_origin(a) is Literal and typing.get_args(a) != (AUTO,)]
    if not literals:
        return None
    return tuple(v for lit in literals for v in typing.get_args(lit))


class _Kind(NamedTuple):
    base: str                 # bool int float str choice list tuple
    item: str | None          # element kind of list/tuple (int, float, str, list-of-int)
    size: int | None          # tuple length
    allows_none: bool
    allows_auto: bool
    bounds: tuple[float | None, float | None, bool]  # min, max, min is strict
    choices: tuple[Any, ...] | None


def _kind(annotation: Any) -> _Kind:
    args = _union_args(annotation)
    allows_none = type(None) in args or any(
        typing.get_origin(a) is Literal and None in typing.get_args(a) for a in args)
    allows_auto = any(typing.get_origin(a) is Literal and typing.get_args(a) == (AUTO,) for a in args)
    core = [a for a in args if a is not type(None) and not (
        typing.get_origin(a) is Literal and typing.get_args(a) == (AUTO,))]
    choices = _choices(annotation)
    if choices is not None:
        return _Kind("choice", None, None, allows_none, allows_auto, (None, None, False), choices)
    (t,) = core
    low = high = None
    strict = False
    if typing.get_origin(t) is Annotated:
        t, *meta = typing.get_args(t)
        for m in meta:
            if isinstance(m, Ge):
                low = m.ge
            elif isinstance(m, Gt):
                low, strict = m.gt, True
            elif isinstance(m, Le):
                high = m.le
    origin = typing.get_origin(t)
    if origin is list:
        (item,) = typing.get_args(t)
        item_name = "ints" if typing.get_origin(item) is list else item.__name__
        return _Kind("list", item_name, None, allows_none, allows_auto, (None, None, False), None)
    if origin is tuple:
        items = typing.get_args(t)
        return _Kind("tuple", items[0].__name__, len(items), allows_none, allows_auto, (None, None, False), None)
    return _Kind(t.__name__, None, None, allows_none, allows_auto, (low, high, strict), None)


def _describe(k: _Kind) -> str:
    """What a leaf accepts, for error messages."""
    if k.base == "choice":
        text = "one of " + ", ".join("None" if c is None else str(c) for c in k.choices or ())
    elif k.base in ("list", "tuple"):
        item = {"int": "integers", "float": "numbers", "str": "words", "ints": "integers"}[k.item or "str"]
        text = f"{k.size} {item}" if k.size else f"a list of {item}"
        text += " (space or comma separated)"
    else:
        text = {"bool": "True or False", "int": "an integer", "float": "a number", "str": "a string"}[k.base]
        low, high, strict = k.bounds
        if low is not None:
            text += f" {'>' if strict else '>='} {low:g}"
        if high is not None:
            text += f" <= {high:g}"
    if k.allows_auto:
        text += ", or auto"
    elif k.allows_none and k.base != "choice":
        text += ", or None"
    return text


_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


def _split(text: str) -> list[str]:
    return [t for t in re.split(r"[,\s]+", text.strip()) if t]


def _to_number(token: str, kind: str) -> int | float:
    if kind == "int":
        value = float(token)  # accepts "1e3"; a fractional value is an error
        if not value.is_integer():
            raise ValueError(token)
        return int(value)
    value = float(token)
    if not math.isfinite(value):
        raise ValueError(token)
    return value


def _from_string(text: str, k: _Kind) -> Any:
    """Convert one command-line string to the leaf's Python value (raises ValueError)."""
    stripped = text.strip()
    if len(stripped) >= 2 and stripped[0] == stripped[-1] and stripped[0] in "\"'":
        stripped = stripped[1:-1].strip()
    low = stripped.lower()
    if k.allows_auto and low in ("auto", "none"):
        return AUTO
    if low == "none" and (k.allows_none or k.base == "list"):
        return None
    if k.base == "bool":
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
        raise ValueError(text)
    if k.base in ("int", "float"):
        return _to_number(stripped, k.base)
    if k.base == "str":
        return stripped
    if k.base == "choice":
        words = stripped.split()
        if len(words) > 1 or (words and words[0].startswith("*")):  # phil form "*a b c"
            starred = [w[1:] for w in words if w.startswith("*")]
            if len(starred) > 1 or (not starred and not k.allows_none):
                raise ValueError(text)
            if not starred or starred[0] == "None":
                return None
            stripped = starred[0]
        for c in k.choices or ():
            if c is not None and c == stripped.lstrip("*"):
                return c
        raise ValueError(text)
    tokens = _split(stripped)
    if k.item == "str":
        return tokens
    if k.item == "ints":  # one group of a multiple ints option
        return [[_to_number(t, "int") for t in tokens]]
    values = [_to_number(t, k.item or "float") for t in tokens]
    if k.base == "tuple":
        if len(values) != k.size:
            raise ValueError(text)
        return tuple(values)
    return values


def _coerce(path: str, value: Any) -> Any:
    """A user value (string from the command line / phil, or a typed YAML value) for one leaf."""
    leaf = _leaves()[path]
    k = _kind(leaf.annotation)
    try:
        if isinstance(value, str) and path == "exclude_images":
            return None if value.strip().lower() == "none" else value.strip().strip("\"'")
        if isinstance(value, str):
            return _from_string(value, k)
        if k.base == "list" and k.item == "ints" and isinstance(value, (list, tuple)) and value and not any(
                isinstance(v, (list, tuple)) for v in value):
            return [list(value)]  # one group given flat
        if isinstance(value, (list, tuple)) and k.base in ("list", "tuple") and any(isinstance(v, str) for v in value):
            if k.item not in ("str", "ints"):
                return _from_string(" ".join(map(str, value)), k)
        if k.base in ("float", "int") and isinstance(value, bool):
            raise ValueError(value)
        if k.base == "int" and isinstance(value, float) and value.is_integer():
            return int(value)
    except ValueError:
        raise ParameterError(_bad_value(path, value, k)) from None
    return value


def _bad_value(path: str, value: Any, k: _Kind, reason: str | None = None) -> str:
    shown = value if isinstance(value, str) else _format_value(value)
    allowed = "exp:start:end or start:end image ranges (inclusive), comma or space separated" \
        if path == "exclude_images" else _describe(k)
    message = f"invalid value '{shown}' for {path}: expected {allowed}"
    if reason:
        message += f" ({reason})"
    return message


# ================================================================ key resolution (DIALS rule)
def _path_score(key: str, path: str) -> int:
    """libtbx.phil's command-line match score of a (partial) key against a full path."""
    i = path.find(key)
    if i < 0:
        return 0
    if i == 0 and len(key) == len(path):
        return 8
    if path.endswith("." + key):
        return 4
    if path.endswith(key):
        return 3
    return 1


def resolve_key_verbose(key: str) -> tuple[str, str | None]:
    """Full dotted path of a partial key, and a note where DIALS' expert-level tie-break chose it.

    DIALS scores every full path: exact 8, ends with ``.key`` 4, ends with ``key`` 3, contains
    ``key`` 1; the best score wins; a tie goes to the lowest expert level, else it is an error.
    """
    key = key.strip()
    leaves = _leaves()
    scores = {path: _path_score(key, path) for path in leaves}
    best = max(scores.values(), default=0)
    if best == 0:
        suggestions = difflib.get_close_matches(key, list(leaves), n=3, cutoff=0.6)
        tails = {p.rsplit(".", 1)[-1]: p for p in leaves}
        suggestions += [tails[t] for t in difflib.get_close_matches(key.rsplit(".", 1)[-1], list(tails), n=3,
                                                                      cutoff=0.6) if tails[t] not in suggestions]
        hint = f"; did you mean {' or '.join(suggestions[:3])}?" if suggestions else ""
        raise ParameterError(f"unknown parameter '{key}'{hint} (see: jaxscale show-config)")
    tied = [p for p, s in scores.items() if s == best]
    if len(tied) == 1:
        return tied[0], None
    lowest = min(leaves[p].inherited_level for p in tied)
    chosen = [p for p in tied if leaves[p].inherited_level == lowest]
    if len(chosen) > 1:
        raise ParameterError(f"ambiguous parameter '{key}': could be {', '.join(tied)}; give more of the name")
    return chosen[0], f"'{key}' could be {', '.join(tied)}; assuming {chosen[0]} (lowest expert level)"


def resolve_key(key: str) -> str:
    """Full dotted path of a partial key (e.g. ``d_min`` -> ``cut_data.d_min``), DIALS' rule."""
    return resolve_key_verbose(key)[0]


# ================================================================ building parameters
def _set_nested(tree: dict[str, Any], path: str, value: Any) -> None:
    *scopes, name = path.split(".")
    node = tree
    for s in scopes:
        node = node.setdefault(s, {})
    node[name] = value


def _validate(tree: dict[str, Any]) -> ScaleParams:
    """Build a ScaleParams from a nested dict, turning pydantic errors into one-line ParameterErrors."""
    try:
        return ScaleParams.model_validate(tree)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = [str(x) for x in err["loc"] if not isinstance(x, int)]
        # drop pydantic's union-branch labels (e.g. "float", "literal['auto']")
        parts: list[str] = []
        node: Any = ScaleParams
        for item in loc:
            fields = getattr(node, "model_fields", {})
            if item in fields:
                parts.append(item)
                extra = _extra(fields[item])
                node = fields[item].default_factory if extra.get("scope") else None
        path = ".".join(parts)
        leaves = _leaves()
        if err["type"] == "extra_forbidden":
            raise ParameterError(_unknown_nested(".".join(loc))) from None
        if path in leaves:
            value = _get_nested(tree, path)
            k = _kind(leaves[path].annotation)
            reason = str(err["msg"]).removeprefix("Value error, ")
            generic = err["type"] not in ("value_error", "assertion_error")
            raise ParameterError(_bad_value(path, value, k, None if generic else reason)) from None
        raise ParameterError(str(err["msg"]).removeprefix("Value error, ")) from None


def _get_nested(tree: Mapping[str, Any], path: str) -> Any:
    node: Any = tree
    for part in path.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


def _unknown_nested(path: str) -> str:
    paths = list(_leaves()) + [s.path for s in _walk(ScaleParams, "", ()) if isinstance(s, _ScopeInfo)]
    close = difflib.get_close_matches(path, paths, n=3, cutoff=0.6)
    hint = f"; did you mean {' or '.join(close)}?" if close else ""
    return f"unknown parameter '{path}'{hint} (see: jaxscale show-config)"


def _flatten_tree(tree: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """Nested mapping -> [(dotted_key, value)], keeping leaf values (also lists) intact."""
    items: list[tuple[str, Any]] = []
    scopes = {s.path for s in _walk(ScaleParams, "", ()) if isinstance(s, _ScopeInfo)}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping) and (path in scopes or path not in _leaves()):
            if not value and path not in scopes:
                raise ParameterError(_unknown_nested(path))
            items.extend(_flatten_tree(value, path + "."))
        else:
            items.append((path, value))
    return items


def apply_overrides(params: ScaleParams, overrides: Mapping[str, Any] | Iterable[tuple[str, Any]], *,
                    notes: list[str] | None = None) -> ScaleParams:
    """A new ScaleParams with ``{key: value}`` applied; keys may be partial (DIALS' rule).

    Values may be command-line strings ("True", "None", "1.4", "0:101:200", "0 2", "0.8,5.0")
    or typed values (from YAML). For ``.multiple`` options every occurrence adds to the list
    (as in DIALS). Raises :class:`ParameterError` with a one-line message.
    """
    pairs = list(overrides.items()) if isinstance(overrides, Mapping) else list(overrides)
    tree = params.model_dump()
    leaves = _leaves()
    for key, value in pairs:
        path, note = resolve_key_verbose(key)
        if note and notes is not None:
            notes.append(note)
        converted = _coerce(path, value)
        if leaves[path].multiple:
            current = _get_nested(tree, path) or []
            if path == "exclude_images":
                try:
                    converted = split_image_ranges(converted)
                except ValueError as exc:
                    raise ParameterError(_bad_value(path, value, _kind(leaves[path].annotation), str(exc))) from None
            add = converted if isinstance(converted, list) else ([] if converted is None else [converted])
            converted = current + [v for v in add if v not in current]
        _set_nested(tree, path, converted)
    return _validate(tree)


def params_from_dict(tree: Mapping[str, Any], base: ScaleParams | None = None, *,
                     notes: list[str] | None = None) -> ScaleParams:
    """Apply a nested (YAML-like) mapping on top of ``base`` (default: DIALS' defaults).

    Keys are full scope names; dotted keys (``physical.lmax: 6``) and partial leaf names are
    accepted too, resolved as on the command line.
    """
    return apply_overrides(base or ScaleParams(), _flatten_tree(tree), notes=notes)


# ================================================================ text forms
def _format_value(value: Any) -> str:
    if value is None:
        return "None"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        if not value:
            return "None"
        return (", " if isinstance(value, tuple) else " ").join(_format_value(v) for v in value)
    text = str(value)
    return f'"{text}"' if (not text or any(c.isspace() for c in text)) else text


def _get_attr_path(params: ScaleParams, path: str) -> Any:
    node: Any = params
    for part in path.split("."):
        node = getattr(node, part)
    return node


def diff_from_defaults(params: ScaleParams) -> dict[str, Any]:
    """``{dotted_path: value}`` of every option that differs from the default."""
    defaults = ScaleParams()
    return {p: _get_attr_path(params, p) for p in _leaves()
            if _get_attr_path(params, p) != _get_attr_path(defaults, p)}


def format_phil(params: ScaleParams | None = None, *, expert_level: int = 10, attributes_level: int = 0,
                diff_only: bool = False) -> str:
    """The tree as DIALS-style phil text (``scope {`` ... ``}``), like ``dials.scale -c``.

    ``attributes_level`` 1 adds help, 2 adds type and expert level; ``diff_only`` keeps only
    options that differ from the defaults (and their scopes).
    """
    params = params or ScaleParams()
    changed = set(diff_from_defaults(params)) if diff_only else None
    lines: list[str] = []

    def show_leaf(leaf: _Leaf, indent: str, name: str) -> None:
        value = _get_attr_path(params, leaf.info.path)
        if leaf.multiple and isinstance(value, list) and value:
            values = value
        else:
            values = [value]
        for v in values:
            text = _format_value(v)
            if leaf.info.choices is not None:
                text = " ".join(("*" if c == v else "") + ("None" if c is None else str(c))
                                for c in leaf.info.choices)
            lines.append(f"{indent}{name} = {text}")
        if attributes_level >= 1 and leaf.info.help:
            lines.append(f"{indent}  .help = \"{leaf.info.help}\"")
        if attributes_level >= 2:
            lines.append(f"{indent}  .type = {leaf.info.type}")
            if leaf.own_level is not None:
                lines.append(f"{indent}  .expert_level = {leaf.own_level}")

    def show(model: type[BaseModel], prefix: str, indent: str, level_cap: int, name_prefix: str = "") -> bool:
        shown_any = False
        for name, field in model.model_fields.items():
            path = prefix + name
            extra = _extra(field)
            level = extra.get("expert_level") or 0
            if max(level_cap, level) > expert_level and changed is None:
                continue
            if extra.get("inline"):
                shown_any |= show(field.default_factory, path + ".", indent, max(level_cap, level),  # type: ignore
                                  name_prefix + name + ".")
            elif extra.get("scope"):
                start = len(lines)
                lines.append(f"{indent}{name} {{")
                attrs = [f"{indent}  .help = \"{field.description}\""] if attributes_level >= 1 and \
                    field.description else []
                if attributes_level >= 2 and extra.get("expert_level") is not None:
                    attrs.append(f"{indent}  .expert_level = {extra['expert_level']}")
                if attrs:
                    lines[-1:] = [f"{indent}{name}", *attrs, f"{indent}{{"]
                inner = show(field.default_factory, path + ".", indent + "  ", max(level_cap, level))  # type: ignore
                if changed is not None and not inner:
                    del lines[start:]
                    continue
                lines.append(f"{indent}}}")
                shown_any = True
            else:
                if changed is not None and path not in changed:
                    continue
                show_leaf(_leaves()[path], indent, name_prefix + name)
                shown_any = True
        return shown_any

    show(ScaleParams, "", "", 0)
    return "\n".join(lines) + ("\n" if lines else "")


def markdown_docs() -> str:
    """docs/parameters.md: every option with type, default, choices, expert level and help."""
    out = [
        "# jaxscale parameters",
        "",
        "Generated from `jaxscale/params.py` by `jaxscale show-config --markdown > docs/parameters.md`;",
        "do not edit by hand. Names, defaults, types and expert levels are those of dials.scale 3.12;",
        "options marked [jaxscale] are our additions. On the command line any unique trailing part of",
        "a name works (`d_min=1.4`), as in DIALS; `auto` and `None` are written as such.",
        "",
    ]
    current_scope = None
    for leaf in _leaves().values():
        info = leaf.info
        scope_name = info.path.split(".", 1)[0] if "." in info.path else "(top level)"
        if scope_name != current_scope:
            out += ["", f"## {scope_name}", "", "| parameter | type | default | expert level | description |",
                    "|---|---|---|---|---|"]
            current_scope = scope_name
        default = _format_value(info.default)
        type_text = info.type
        if info.choices is not None:
            type_text = "choice: " + " ".join("None" if c is None else str(c) for c in info.choices)
        if leaf.multiple:
            type_text += " (multiple)"
        cell = lambda s: str(s).replace("|", "\\|")  # noqa: E731
        out.append(f"| `{info.path}` | {cell(type_text)} | `{cell(default)}` | {info.expert_level} | "
                   f"{cell(info.help)} |")
    return "\n".join(out).replace("\n\n\n", "\n\n") + "\n"
