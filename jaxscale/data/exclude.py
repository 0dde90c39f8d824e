"""`exclude_images=`: remove image ranges from scans and flag the reflections on them.

Spec overview.md §1.4 (DIALS `dials/util/exclude_images.py`): commands `exp:start:end`
(inclusive image numbers; `start:end` allowed when there is one experiment), several per
string separated by commas or spaces. `exp` is the dataset id used in the table's `id`
column. A reflection is on a valid image iff `start - 1 <= z_px <= end` for some valid
range of its experiment.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from jaxscale.exceptions import ParameterError

ImageRange = tuple[int, int]


def parse_exclude_images(
    commands: str | Sequence[str] | None, dataset_ids: Sequence[int]
) -> list[tuple[int, int, int]]:
    """Parse the option into (dataset_id, first_image, last_image) triples.

    `dataset_ids` are the ids of the experiments present (a two-field range is only
    allowed when there is exactly one, and then refers to it).
    """
    if commands is None:
        return []
    if isinstance(commands, str):
        commands = [commands]
    tokens = [t for c in commands if c for t in str(c).replace(",", " ").split()]
    out = []
    for token in tokens:
        fields = token.split(":")
        try:
            values = [int(f) for f in fields]
        except ValueError:
            raise ParameterError(f"exclude_images: cannot read {token!r} (expected exp:start:end)") from None
        if len(values) == 2:
            if len(dataset_ids) != 1:
                raise ParameterError(
                    "exclude_images must be exp:start:end when there are several experiments"
                )
            values = [int(dataset_ids[0]), *values]
        elif len(values) != 3:
            raise ParameterError(f"exclude_images: {token!r} is not exp:start:end or start:end")
        if values[0] not in set(int(i) for i in dataset_ids):
            raise ParameterError(f"exclude_images: no experiment with dataset id {values[0]}")
        out.append((values[0], values[1], values[2]))
    return out


def remove_ranges(valid: list[ImageRange], exclude: list[ImageRange]) -> list[ImageRange]:
    """Valid image ranges minus the excluded ones (inclusive ranges, image numbers)."""
    if not valid:
        return []
    lo = min(r[0] for r in valid)
    hi = max(r[1] for r in valid)
    images = np.arange(lo, hi + 1)
    keep = np.zeros(images.size, dtype=bool)
    for start, end in valid:
        keep |= (images >= start) & (images <= end)
    for start, end in exclude:
        keep &= ~((images >= start) & (images <= end))
    # runs of kept images -> ranges
    edges = np.diff(np.concatenate([[0], keep.astype(np.int8), [0]]))
    starts = images[np.flatnonzero(edges == 1)]
    ends = images[np.flatnonzero(edges == -1) - 1]
    return [(int(s), int(e)) for s, e in zip(starts, ends)]


def initial_valid_ranges(experiment) -> list[ImageRange] | None:
    """The scan's stored valid ranges for this identifier, else its image range; None if no scan."""
    scan = getattr(experiment, "scan", None)
    if not scan:
        return None
    stored = (scan.get("valid_image_ranges") or {}).get(experiment.identifier)
    if stored:
        return [(int(a), int(b)) for a, b in stored]
    first, last = scan["image_range"]
    return [(int(first), int(last))]


def valid_image_mask(z_px: np.ndarray, ranges: list[ImageRange] | None) -> np.ndarray:
    """True (n,) where z (pixel units, 0 at the start of the first image) lies in a valid range."""
    z = np.asarray(z_px, dtype=np.float64)
    if ranges is None:
        return np.ones(z.shape, dtype=bool)
    ok = np.zeros(z.shape, dtype=bool)
    for start, end in ranges:  # a handful of ranges
        ok |= (z >= start - 1.0) & (z <= end)
    return ok


def apply_exclude_images(
    dataset_id: np.ndarray,
    z_px: np.ndarray,
    experiments: Sequence,
    experiment_dataset_ids: Sequence[int],
    commands: str | Sequence[str] | None,
) -> tuple[np.ndarray, list[list[ImageRange] | None]]:
    """Mask of rows on excluded images and the new valid ranges per experiment.

    dataset_id (n,): each row's table id; z_px (n,): `xyzobs.px.value[:, 2]`;
    experiment_dataset_ids[i]: the table id of experiments[i].
    Returns (excluded (n,) bool, valid ranges per experiment; None for scanless ones).
    """
    ids = [int(i) for i in experiment_dataset_ids]
    requests = parse_exclude_images(commands, ids)
    excluded = np.zeros(np.shape(dataset_id), dtype=bool)
    new_ranges: list[list[ImageRange] | None] = []
    for expt, did in zip(experiments, ids):  # loop over experiments
        ranges = initial_valid_ranges(expt)
        mine = [(s, e) for d, s, e in requests if d == did]
        if mine:
            if ranges is None:
                raise ParameterError(f"exclude_images: experiment {did} has no scan")
            ranges = remove_ranges(ranges, mine)
        new_ranges.append(ranges)
        rows = np.asarray(dataset_id) == did
        excluded[rows] = ~valid_image_mask(np.asarray(z_px)[rows], ranges)
    return excluded, new_ranges
