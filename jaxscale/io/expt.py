"""DIALS experiment lists (`.expt` / `experiments.json`) without DIALS.

Each `Experiment` holds the JSON dicts of its models (shared models expanded), so a
read-modify-write keeps every field DIALS wrote; derived geometry is exposed as properties.
Writing re-shares identical model dicts so DIALS sees the same sharing it wrote.
"""
from __future__ import annotations

import functools
import json
import math
import os
import uuid
from dataclasses import dataclass, field

import gemmi
import numpy as np

from jaxscale.data.table import ReflectionTable
from jaxscale.exceptions import InputError
from jaxscale.io.atomic import atomic_path

MODEL_KINDS = ("beam", "detector", "goniometer", "scan", "crystal", "profile", "imageset", "scaling_model")

@functools.lru_cache(maxsize=1024)
def _space_group_of_hall(hall: str) -> gemmi.SpaceGroup:
    """gemmi's space group of a Hall symbol, looked up once per symbol (10^5 stills share one;
    the look-up costs ~15 us)."""
    return gemmi.find_spacegroup_by_ops(gemmi.symops_from_hall(hall))


@dataclass
class Experiment:
    identifier: str = ""
    beam: dict | None = None
    detector: dict | None = None
    goniometer: dict | None = None
    scan: dict | None = None
    crystal: dict | None = None
    profile: dict | None = None
    imageset: dict | None = None
    scaling_model: dict | None = None
    extra: dict = field(default_factory=dict)  # unknown per-experiment keys, kept for writing

    # --- crystal ------------------------------------------------------------------
    @property
    def space_group(self) -> gemmi.SpaceGroup:
        return _space_group_of_hall(self.crystal["space_group_hall_symbol"])

    @property
    def real_space_matrix(self) -> np.ndarray:
        """Rows a, b, c (Å) in the lab frame at φ = 0."""
        c = self.crystal
        return np.array([c["real_space_a"], c["real_space_b"], c["real_space_c"]], dtype=float)

    @property
    def A_matrix(self) -> np.ndarray:
        """Static UB (= A): reciprocal basis vectors as columns, lab frame at φ = 0."""
        return np.linalg.inv(self.real_space_matrix)

    @property
    def unit_cell(self) -> gemmi.UnitCell:
        if "recalculated_unit_cell" in (self.crystal or {}):
            return gemmi.UnitCell(*self.crystal["recalculated_unit_cell"])
        a, b, c = self.real_space_matrix
        la, lb, lc = (float(np.linalg.norm(v)) for v in (a, b, c))
        angle = lambda u, v: math.degrees(math.acos(float(np.dot(u, v)) / (np.linalg.norm(u) * np.linalg.norm(v))))
        return gemmi.UnitCell(la, lb, lc, angle(b, c), angle(a, c), angle(a, b))

    # --- beam ---------------------------------------------------------------------
    @property
    def wavelength(self) -> float:
        return float(self.beam["wavelength"])

    @property
    def s0_direction(self) -> np.ndarray:
        """Unit vector from sample to source (the JSON `direction`); s0 = −direction/λ."""
        d = np.asarray(self.beam["direction"], dtype=float)
        return d / np.linalg.norm(d)

    # --- goniometer and scan ---------------------------------------------------------
    @property
    def is_still(self) -> bool:
        return self.scan is None or self.goniometer is None or float(self.scan["oscillation"][1]) == 0.0

    @property
    def rotation_axis(self) -> np.ndarray:
        ax = np.asarray(self.goniometer["rotation_axis"], dtype=float)
        return ax / np.linalg.norm(ax)

    @property
    def fixed_rotation(self) -> np.ndarray:
        return np.asarray(self.goniometer.get("fixed_rotation", np.eye(3).ravel()), dtype=float).reshape(3, 3)

    @property
    def setting_rotation(self) -> np.ndarray:
        return np.asarray(self.goniometer.get("setting_rotation", np.eye(3).ravel()), dtype=float).reshape(3, 3)

    @property
    def oscillation(self) -> tuple[float, float]:
        """(start angle of the first image, width per image), degrees."""
        start, width = self.scan["oscillation"]
        return float(start), float(width)

    @property
    def image_range(self) -> tuple[int, int]:
        first, last = self.scan["image_range"]
        return int(first), int(last)

    @property
    def osc_range(self) -> tuple[float, float]:
        """Angular range covered by the scan (start, end), degrees."""
        start, width = self.oscillation
        first, last = self.image_range
        return start, start + (last - first + 1) * width

    @property
    def batch_offset(self) -> int:
        return int((self.scan or {}).get("batch_offset", 0))

class ExperimentList(list):
    """A list of Experiment; `identifiers()` in order."""

    def identifiers(self) -> list[str]:
        return [e.identifier for e in self]

def decode_expt(doc: dict, path: str = "<json>") -> ExperimentList:
    """Experiments of a decoded .expt JSON document (shared models expanded)."""
    out = ExperimentList()
    for k, entry in enumerate(doc.get("experiment", [])):
        exp = Experiment(identifier=str(entry.get("identifier", "") or ""))
        for kind in MODEL_KINDS:
            ref = entry.get(kind)
            if ref is None:
                continue
            pool = doc.get(kind) or []
            if isinstance(ref, int):
                if not 0 <= ref < len(pool):
                    raise InputError(path, f"experiment {k} refers to {kind} {ref}, but the file has {len(pool)}", field=kind)
                setattr(exp, kind, pool[ref])
            elif isinstance(ref, dict):
                setattr(exp, kind, ref)
        exp.extra = {key: v for key, v in entry.items() if key not in MODEL_KINDS and key not in ("__id__", "identifier")}
        if exp.crystal is None:
            raise InputError(path, f"experiment {k} has no crystal model", field="crystal")
        if exp.beam is None:
            raise InputError(path, f"experiment {k} has no beam model", field="beam")
        out.append(exp)
    return out

def read_expt(path: str | os.PathLike) -> ExperimentList:
    """Read a DIALS experiment list (JSON)."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as fh:
            doc = json.loads(fh.read())
    except OSError as exc:
        raise InputError(path, f"cannot read file ({exc.strerror})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(path, f"not a valid JSON experiment list ({exc})") from None
    if not isinstance(doc, dict) or doc.get("__id__") != "ExperimentList":
        raise InputError(path, "not a DIALS experiment list (missing '__id__: ExperimentList')")
    experiments = decode_expt(doc, path)
    if not experiments:
        raise InputError(path, "experiment list is empty", field="experiment")
    for exp in experiments:
        try:
            exp.space_group
        except (KeyError, RuntimeError, ValueError) as exc:
            raise InputError(path, f"cannot read the crystal's space group ({exc})", field="space_group_hall_symbol") from None
    return experiments

def encode_expt(experiments: list[Experiment]) -> dict:
    """The JSON document of an experiment list, identical model dicts shared."""
    doc: dict = {"__id__": "ExperimentList", "experiment": []}
    pools: dict[str, list] = {kind: [] for kind in MODEL_KINDS}
    keys: dict[str, dict[str, int]] = {kind: {} for kind in MODEL_KINDS}
    # a model object shared in memory (read from one shared entry, or kept by a copied
    # experiment) is serialised once, not once per experiment: 10^5 stills share one beam
    by_object: dict[str, dict[int, int]] = {kind: {} for kind in MODEL_KINDS}
    for exp in experiments:
        entry = {"__id__": "Experiment", "identifier": exp.identifier}
        for kind in MODEL_KINDS:
            model = getattr(exp, kind)
            if model is None:
                continue
            index = by_object[kind].get(id(model))
            if index is None:
                key = json.dumps(model, sort_keys=True)
                if key not in keys[kind]:
                    keys[kind][key] = len(pools[kind])
                    pools[kind].append(model)
                index = by_object[kind][id(model)] = keys[kind][key]
            entry[kind] = index
        entry.update(exp.extra)
        doc["experiment"].append(entry)
    for kind in MODEL_KINDS:
        doc[kind] = pools[kind]
    return doc


# Above this many experiments the file is written without indentation: Python's indenting
# JSON encoder is pure Python (~25 us per still); DIALS reads either layout.
INDENT_MAX_EXPERIMENTS = 1000


def write_expt(experiments: list[Experiment], path: str | os.PathLike) -> None:
    """Write an experiment list as DIALS JSON, atomically."""
    doc = encode_expt(experiments)
    if len(experiments) <= INDENT_MAX_EXPERIMENTS:
        text = json.dumps(doc, indent=2)
    else:
        text = json.dumps(doc, separators=(",", ":"))
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def assign_identifiers(table: ReflectionTable, experiments: ExperimentList, path: str = "") -> None:
    """Make table and experiments agree on identifiers, creating UUIDs where both lack them.

    DIALS integration output often has empty identifiers; dials.scale assigns new ones.
    Raises InputError if the table's identifiers disagree with the experiments'.
    """
    ids = np.unique(table.experiment_ids()) if len(table) else np.array([], dtype=int)
    ids = ids[ids >= 0]
    if table.identifiers:
        known = {v: k for k, v in table.identifiers.items()}
        missing = [e.identifier for e in experiments if e.identifier and e.identifier not in known]
        expt_idents = set(experiments.identifiers())  # once: a set per item made this O(n^2)
        stray = [v for v in table.identifiers.values() if v not in expt_idents]
        if missing or stray:
            raise InputError(path, "reflection table identifiers do not match the experiment identifiers "
                                   f"(in .expt only: {missing[:3]}, in .refl only: {stray[:3]})", field="identifiers")
        return
    if len(ids) and (ids.max() >= len(experiments)):
        raise InputError(path, f"reflection table has dataset id {int(ids.max())} but only {len(experiments)} experiment(s)", field="id")
    for k, exp in enumerate(experiments):
        if not exp.identifier:
            exp.identifier = str(uuid.uuid4())
        table.identifiers[k] = exp.identifier

