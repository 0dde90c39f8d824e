"""The observation table: one row per observation, named numpy columns.

Column names and dtypes follow DIALS' reflection tables so that .refl files round-trip:
`miller_index` int32 (n, 3), `id` int32, `flags` uint64, `d` float64, vec3 columns
float64 (n, 3), `bbox` int32 (n, 6), `std::string` columns object arrays. The DIALS type
of each column is kept in `dials_types` so a writer can reproduce it exactly.
`identifiers` maps the integer dataset id used in column `id` to the experiment
identifier string of the matching .expt entry.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

import numpy as np


@dataclass
class ReflectionTable:
    columns: dict[str, np.ndarray] = field(default_factory=dict)
    identifiers: dict[int, str] = field(default_factory=dict)
    # DIALS msgpack type name per column ("double", "vec3<double>", ...); optional
    dials_types: dict[str, str] = field(default_factory=dict)

    # --- basic container protocol -------------------------------------------------
    def __len__(self) -> int:
        for col in self.columns.values():
            return int(col.shape[0])
        return 0

    @property
    def nrows(self) -> int:
        return len(self)

    def __contains__(self, name: str) -> bool:
        return name in self.columns

    def __getitem__(self, name: str) -> np.ndarray:
        return self.columns[name]

    def __setitem__(self, name: str, values: np.ndarray) -> None:
        values = np.asarray(values)
        if self.columns and values.shape[0] != len(self):
            raise ValueError(f"column {name!r} has {values.shape[0]} rows, table has {len(self)}")
        self.columns[name] = values

    def __delitem__(self, name: str) -> None:
        del self.columns[name]
        self.dials_types.pop(name, None)

    def __iter__(self) -> Iterator[str]:
        return iter(self.columns)

    def keys(self) -> list[str]:
        return list(self.columns)

    def get(self, name: str, default=None):
        return self.columns.get(name, default)

    # --- row operations ---------------------------------------------------------
    def select(self, rows: np.ndarray) -> "ReflectionTable":
        """New table with the rows picked by a boolean mask or an index array."""
        return ReflectionTable(
            {k: v[rows] for k, v in self.columns.items()},
            dict(self.identifiers),
            dict(self.dials_types),
        )

    def copy(self) -> "ReflectionTable":
        return ReflectionTable(
            {k: v.copy() for k, v in self.columns.items()},
            dict(self.identifiers),
            dict(self.dials_types),
        )

    @staticmethod
    def concatenate(tables: list["ReflectionTable"]) -> "ReflectionTable":
        """Stack tables row-wise; only columns present in every table are kept."""
        if not tables:
            return ReflectionTable()
        names = [k for k in tables[0].columns if all(k in t.columns for t in tables[1:])]
        idents: dict[int, str] = {}
        for t in tables:
            for k, v in t.identifiers.items():
                if idents.get(k, v) != v:
                    raise ValueError(f"dataset id {k} maps to two identifiers: {idents[k]} and {v}")
                idents[k] = v
        types: dict[str, str] = {}
        for t in tables:
            types.update({k: v for k, v in t.dials_types.items() if k in names})
        return ReflectionTable(
            {k: np.concatenate([t.columns[k] for t in tables]) for k in names}, idents, types
        )

    def experiment_ids(self) -> np.ndarray:
        """The `id` column (dataset id of each row); zeros if the table has none."""
        if "id" in self.columns:
            return self.columns["id"]
        return np.zeros(len(self), dtype=np.int32)

    def __repr__(self) -> str:
        return f"ReflectionTable(nrows={len(self)}, columns={list(self.columns)}, identifiers={len(self.identifiers)})"


class RowsByValue:
    """rows(v): the indices, in order, of the entries of `values` equal to v, for many v: slices
    of one stable sort (a mask per value costs a pass over all entries each, which is
    quadratic in the number of stills when v runs over them)."""

    def __init__(self, values: np.ndarray):
        self.values = values
        self.order = np.argsort(values, kind="stable")
        self.sorted = values[self.order]

    def __call__(self, v: int) -> np.ndarray:
        lo, hi = np.searchsorted(self.sorted, v, side="left"), np.searchsorted(self.sorted, v, side="right")
        return self.order[lo:hi]
