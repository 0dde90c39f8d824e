"""Write dials_defaults.json: every dials.scale 3.12 option with default, type, choices, expert level.

Runs ``dials.scale -c -a 2 -e 10`` and parses its phil text (independently of jaxscale), so
tests/cli/test_params.py can compare our schema with DIALS'. Also records how DIALS' own
command-line interpreter (libtbx.phil.command_line, run with /usr/bin/python3) resolves a
set of partial keys. Re-run after a DIALS upgrade:

    python tests/cli/reference/make_dials_defaults.py            # needs dials.scale on PATH
    python tests/cli/reference/make_dials_defaults.py dump.txt   # or parse a saved dump
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFINITION = re.compile(r"^(\s*)([A-Za-z_][\w.]*)\s*=\s*(.*)$")
SCOPE_OPEN = re.compile(r"^(\s*)([A-Za-z_][\w.]*)\s*\{\s*$")
SCOPE_NAME = re.compile(r"^(\s*)([A-Za-z_][\w.]*)\s*$")


def _convert_scalar(token: str, base: str):
    if token == "None":
        return None
    if token.lower() == "auto":
        return "auto"
    if base == "bool":
        return {"True": True, "False": False}[token]
    if base == "int":
        return int(token)
    if base == "float":
        return float(token)
    return token.strip('"')


def convert_default(raw: str, type_text: str):
    """Phil default text -> JSON value (list for ints/floats/strings, [choices...] handled apart)."""
    base = type_text.split("(", 1)[0]
    raw = raw.strip()
    if base == "choice":
        starred = [w[1:] for w in raw.split() if w.startswith("*")]
        return None if not starred or starred[0] == "None" else starred[0]
    if raw == "None":
        return None
    if base in ("ints", "floats", "unit_cell"):
        kind = "int" if base == "ints" else "float"
        return [_convert_scalar(t, kind) for t in re.split(r"[,\s]+", raw) if t]
    if base == "strings":
        return [t.strip('"') for t in raw.split()]
    if base in ("bool", "int", "float"):
        return _convert_scalar(raw, base)
    return raw.strip('"')


def parse(text: str) -> dict[str, dict]:
    """Parse ``dials.scale -c -a 2`` output into {dotted_path: {...}}."""
    lines = text.splitlines()
    out: dict[str, dict] = {}
    stack: list[tuple[str, int | None]] = []   # (scope name, its own expert level)
    pending_scope: list | None = None           # [name, level] of "name" lines awaiting "{"
    current: dict | None = None
    i = 0
    while i < len(lines):
        line = lines[i]
        stripped = line.strip()
        i += 1
        if not stripped or stripped.startswith("Showing") or stripped.endswith("_level = 10") \
                or stripped.endswith("_level = 2") and stripped.startswith("attributes"):
            continue
        if stripped.startswith("."):
            attr, _, value = stripped[1:].partition("=")
            attr, value = attr.strip(), value.strip()
            if attr == "help":  # skip continuation lines of a (possibly multi-line) quoted help
                quotes = value.count('"')
                while i < len(lines) and (quotes % 2 == 1 or lines[i].strip().startswith('"')):
                    quotes += lines[i].count('"')
                    i += 1
                continue
            target = current if current is not None else pending_scope
            if target is None:
                continue
            if attr == "expert_level":
                if current is not None:
                    current["own_expert_level"] = int(value)
                else:
                    pending_scope[1] = int(value)
            elif current is not None and attr == "type":
                current["type"] = value
            elif current is not None and attr == "multiple":
                current["multiple"] = value == "True"
            elif current is not None and attr == "alias":
                current["alias"] = value
            continue
        if stripped == "{":
            stack.append((pending_scope[0], pending_scope[1]))
            pending_scope, current = None, None
            continue
        if stripped == "}":
            stack.pop()
            current = None
            continue
        m = SCOPE_OPEN.match(line)
        if m:
            stack.append((m.group(2), None))
            current, pending_scope = None, None
            continue
        m = DEFINITION.match(line)
        if m:
            name, raw = m.group(2), m.group(3)
            path = ".".join([s for s, _ in stack] + [name])
            current = {"raw": raw, "scope_levels": [lv for _, lv in stack], "own_expert_level": None,
                       "multiple": False}
            out[path] = current
            pending_scope = None
            continue
        m = SCOPE_NAME.match(line)
        if m:
            pending_scope, current = [m.group(2), None], None
            continue
        raise ValueError(f"cannot parse line {i}: {line!r}")
    for path, d in out.items():
        levels = [lv for lv in d.pop("scope_levels") + [d["own_expert_level"]] if lv is not None]
        d["expert_level"] = max(levels or [0])          # what `-e LEVEL` filtering uses
        type_text = d.setdefault("type", "str")
        d["default"] = convert_default(d["raw"], type_text)
        if type_text == "choice":
            d["choices"] = [w.lstrip("*") for w in d["raw"].split()]
            d["choices"] = [None if c == "None" else c for c in d["choices"]]
    return out


KEYS = ["d_min", "min", "intensity", "lmax", "surface_weight", "json", "a", "b", "error_model", "nbins",
        "model", "scale_interval", "absorption_correction", "decay_correction", "fix", "correction.fix",
        "interval", "method", "cutoff", "share.absorption", "Imid", "exclude_images", "exclude_datasets",
        "engine", "full_matrix", "full_matrix_engine", "physical.scale_interval", "dmin", "d_mi", "nproc",
        "reference", "log", "reflections", "input.experiments", "mode", "n_bins", "max_iterations", "use_datasets", "experiments", "html",
        "absorption_level", "anomalous", "E2_range", "grouping", "minimisation", "partiality_cutoff"]

RESOLVE = r"""
import json, sys
from dials.command_line.scale import phil_scope
from dials.util.options import ArgumentParser
from libtbx.phil.command_line import argument_interpreter
from libtbx.utils import Sorry
# the tree dials.scale's own parser uses (with the input scope), as in `dials.scale -c`
master = ArgumentParser(phil=phil_scope, read_experiments=True, read_reflections=True, check_format=False).phil
ai = argument_interpreter(master_phil=master)
out = {}
for key in json.loads(sys.argv[1]):
    try:
        params = ai.process_arg(key + "=1")
        out[key] = {"path": params.all_definitions()[0].path}
    except Sorry as exc:
        text = str(exc)
        kind = "ambiguous" if text.startswith("Ambiguous") else "unknown"
        out[key] = {"error": kind, "candidates": [l.strip() for l in text.splitlines()[2:]]}
print(json.dumps(out))
"""


def resolve_keys(python: str = "/usr/bin/python3") -> dict:
    """How dials.scale's command line resolves each key of KEYS."""
    done = subprocess.run([python, "-c", RESOLVE, json.dumps(KEYS)], check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    if len(sys.argv) > 1:
        text = Path(sys.argv[1]).read_text()
    else:
        text = subprocess.run(["dials.scale", "-c", "-a", "2", "-e", "10"], check=True,
                              capture_output=True, text=True).stdout
    result = {"source": "dials.scale -c -a 2 -e 10 (DIALS 3.12)", "parameters": parse(text),
              "key_resolution": resolve_keys()}
    (HERE / "dials_defaults.json").write_text(json.dumps(result, indent=1, sort_keys=False) + "\n")
    print(f"{len(result['parameters'])} parameters -> {HERE / 'dials_defaults.json'}")


if __name__ == "__main__":
    main()
