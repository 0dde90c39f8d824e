"""Reflection flag bits as DIALS 3.12 writes them in the `flags` column (spec formats.md §1.2)."""
from __future__ import annotations

import numpy as np

PREDICTED = 1
OBSERVED = 2
INDEXED = 4
USED_IN_REFINEMENT = 8
STRONG = 32
REFERENCE_SPOT = 64
DONT_INTEGRATE = 128
INTEGRATED_SUM = 256
INTEGRATED_PRF = 512
INTEGRATED = INTEGRATED_SUM | INTEGRATED_PRF
OVERLOADED = 1024
OVERLAPPED_BG = 2048
OVERLAPPED_FG = 4096
IN_POWDER_RING = 8192
FOREGROUND_INCLUDES_BAD_PIXELS = 16384
BACKGROUND_INCLUDES_BAD_PIXELS = 32768
INCLUDES_BAD_PIXELS = FOREGROUND_INCLUDES_BAD_PIXELS | BACKGROUND_INCLUDES_BAD_PIXELS
BAD_SPOT = 64512
USED_IN_MODELLING = 65536
CENTROID_OUTLIER = 131072
FAILED_DURING_BACKGROUND_MODELLING = 262144
FAILED_DURING_SUMMATION = 524288
FAILED_DURING_PROFILE_FITTING = 1048576
BAD_REFERENCE = 2097152
USER_EXCLUDED_IN_SCALING = 4194304
OUTLIER_IN_SCALING = 8388608
EXCLUDED_FOR_SCALING = 16777216
BAD_FOR_SCALING = USER_EXCLUDED_IN_SCALING | OUTLIER_IN_SCALING | EXCLUDED_FOR_SCALING
EXCLUDED_FOR_REFINEMENT = 33554432
BAD_FOR_REFINEMENT = 33685504
SCALED = 67108864


def has_any(flags: np.ndarray, mask: int) -> np.ndarray:
    """True where any bit of `mask` is set (DIALS get_flags(mask, all=False))."""
    return (flags & np.uint64(mask)) != 0


def has_all(flags: np.ndarray, mask: int) -> np.ndarray:
    """True where every bit of `mask` is set (DIALS get_flags(mask), the default)."""
    return (flags & np.uint64(mask)) == np.uint64(mask)


def set_bits(flags: np.ndarray, where: np.ndarray, mask: int) -> np.ndarray:
    """Return flags with `mask` set on rows where `where` is True."""
    out = flags.copy()
    out[where] |= np.uint64(mask)
    return out


def clear_bits(flags: np.ndarray, mask: int, where: np.ndarray | None = None) -> np.ndarray:
    """Return flags with `mask` cleared (on all rows, or on rows where `where`)."""
    out = flags.copy()
    if where is None:
        out &= ~np.uint64(mask)
    else:
        out[where] &= ~np.uint64(mask)
    return out
