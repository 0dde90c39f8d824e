"""Sort command-line input files into DIALS .refl/.expt pairs, unmerged MTZ and XDS files.

The kind comes from the extension, checked against (or, for unknown extensions, taken from)
the first bytes of the file. As in dials.scale, the i-th reflection file goes with the i-th
experiment file whatever their order on the command line; the counts must match.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from jaxscale.exceptions import InputError

REFL_MAGIC = b"dials::af::reflection_table"
MTZ_MAGIC = b"MTZ "
XDS_MARKERS = (b"!FORMAT=XDS_ASCII", b"!OUTPUT_FILE=INTEGRATE.HKL", b"!OUTPUT_FILE=XDS_ASCII.HKL")

KINDS = ("reflections", "experiments", "mtz", "xds")


@dataclass
class InputFiles:
    """Classified inputs in command-line order within each kind."""

    reflections: list[str] = field(default_factory=list)
    experiments: list[str] = field(default_factory=list)
    mtz: list[str] = field(default_factory=list)
    xds: list[str] = field(default_factory=list)

    @property
    def pairs(self) -> list[tuple[str, str]]:
        """(reflection file, experiment file) pairs, matched by order."""
        return list(zip(self.reflections, self.experiments))

    def ordered(self) -> list[str]:
        """The canonical list handed to the engine: refl, expt, refl, expt, ..., then MTZ, then XDS."""
        out = [p for pair in self.pairs for p in pair]
        return out + self.mtz + self.xds

    def __len__(self) -> int:
        return len(self.reflections) + len(self.experiments) + len(self.mtz) + len(self.xds)


def sniff_kind(path: Path) -> str | None:
    """Kind from the first bytes of a file: one of KINDS, or None if unrecognised."""
    with open(path, "rb") as handle:
        head = handle.read(4096)
    if head.startswith(MTZ_MAGIC):
        return "mtz"
    if REFL_MAGIC in head[:64]:
        return "reflections"
    stripped = head.lstrip()
    if stripped.startswith(b"{") and b'"ExperimentList"' in head:
        return "experiments"
    if any(marker in head[:400] for marker in XDS_MARKERS):
        return "xds"
    return None


_BY_EXTENSION = {".refl": "reflections", ".expt": "experiments", ".mtz": "mtz", ".hkl": "xds"}


def classify_file(path: str | Path) -> str:
    """Kind of one input file; raises InputError for missing, unreadable or unknown files."""
    path = Path(path)
    if not path.exists():
        raise InputError(str(path), "no such file")
    if path.is_dir():
        raise InputError(str(path), "is a directory, expected a .refl, .expt, .mtz or XDS .HKL file")
    try:
        sniffed = sniff_kind(path)
    except OSError as exc:
        raise InputError(str(path), f"cannot read: {exc.strerror or exc}") from None
    by_extension = _BY_EXTENSION.get(path.suffix.lower())
    if sniffed is None and by_extension is None:
        hint = " (legacy pickle reflection files are not supported; convert with DIALS 3)" \
            if path.suffix.lower() == ".pickle" else ""
        raise InputError(str(path), "not a DIALS .refl/.expt, unmerged MTZ or XDS .HKL file" + hint)
    if sniffed is not None and by_extension is not None and sniffed != by_extension:
        raise InputError(str(path), f"file name says {by_extension} but the content is {sniffed}")
    if sniffed is None and by_extension in ("reflections", "mtz"):
        raise InputError(str(path), f"does not look like a {by_extension} file (unexpected first bytes)")
    return sniffed or by_extension  # type: ignore[return-value]


def classify_inputs(paths: list[str]) -> InputFiles:
    """Sort files by kind and check that reflection and experiment files pair up."""
    files = InputFiles()
    for path in paths:
        getattr(files, classify_file(path)).append(str(path))
    n_refl, n_expt = len(files.reflections), len(files.experiments)
    if n_refl != n_expt:
        raise InputError(None, f"{n_refl} reflection file(s) but {n_expt} experiment file(s): give one "
                         ".expt for each .refl (they are paired by order)")
    if not len(files):
        raise InputError(None, "no input files: give .refl + .expt pairs, unmerged .mtz or XDS .HKL files")
    return files
