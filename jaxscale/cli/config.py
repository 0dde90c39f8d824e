"""Parameter files: DIALS phil text (``--phil``) and YAML configs (``run``, ``--config``).

A YAML config is the parameter tree nested as in ``show-config`` plus an ``inputs:`` list
(paths relative to the config file). Phil files hold ``name = value`` lines inside
``scope { ... }`` blocks, as DIALS writes them; partial names work as on the command line.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from jaxscale.exceptions import InputError, ParameterError
from jaxscale.params import ScaleParams, apply_overrides, params_from_dict

_BRACES = re.compile(r'("[^"]*"|\'[^\']*\')|([{}])')


def _strip_comment(line: str) -> str:
    """Drop a ``#`` comment that is not inside quotes."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            if ch == quote:
                quote = None
        elif ch in "\"'":
            quote = ch
        elif ch == "#":
            return line[:i]
    return line


def parse_phil_text(text: str, source: str = "<phil>") -> list[tuple[str, str]]:
    """``[(dotted_key, value_text)]`` from phil text; raises InputError on bad syntax."""
    pairs: list[tuple[str, str]] = []
    stack: list[str] = []
    pending: str | None = None
    for number, raw in enumerate(text.splitlines(), start=1):
        line = _strip_comment(raw)
        # put braces outside quotes on their own
        pieces = _BRACES.sub(lambda m: m.group(1) or f"\n{m.group(2)}\n", line).split("\n")
        for piece in (p.strip() for p in pieces):
            if not piece or piece.startswith("."):  # blank, or an attribute line (.help, .type ...)
                continue
            if piece == "{":
                if pending is None:
                    raise InputError(source, f"line {number}: '{{' without a scope name")
                stack.append(pending)
                pending = None
            elif piece == "}":
                if not stack:
                    raise InputError(source, f"line {number}: unmatched '}}'")
                stack.pop()
            elif "=" in piece:
                if pending is not None:
                    raise InputError(source, f"line {number}: expected '{{' after '{pending}'")
                key, _, value = piece.partition("=")
                key = key.strip()
                if not re.fullmatch(r"[A-Za-z_][\w.]*", key):
                    raise InputError(source, f"line {number}: bad parameter name '{key}'")
                pairs.append((".".join(stack + [key]), value.strip()))
            elif re.fullmatch(r"[A-Za-z_][\w.]*", piece) and pending is None:
                pending = piece
            else:
                raise InputError(source, f"line {number}: cannot read '{piece}'")
    if stack or pending:
        raise InputError(source, f"scope '{'.'.join(stack) or pending}' is not closed")
    return pairs


def load_phil(path: str | Path, base: ScaleParams | None = None) -> ScaleParams:
    """Apply a phil file on top of ``base``; ParameterErrors name the file."""
    path = Path(path)
    text = _read_text(path)
    try:
        return apply_overrides(base or ScaleParams(), parse_phil_text(text, str(path)))
    except ParameterError as exc:
        raise ParameterError(f"{path}: {exc}") from None


def _read_text(path: Path) -> str:
    try:
        return path.read_text()
    except FileNotFoundError:
        raise InputError(str(path), "no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(str(path), f"cannot read: {exc}") from None


def read_yaml_config(path: str | Path) -> tuple[dict[str, Any], list[str]]:
    """The parameter mapping and the input paths (resolved against the file's folder)."""
    import yaml  # ~13 ms to import: only runs with a YAML config pay it

    path = Path(path)
    text = _read_text(path)
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise InputError(str(path), f"not valid YAML{where}") from None
    if doc is None:
        doc = {}
    if not isinstance(doc, dict):
        raise InputError(str(path), "expected a mapping of parameters (and an 'inputs:' list) at the top")
    doc = dict(doc)
    raw_inputs = doc.pop("inputs", None) or []
    if isinstance(raw_inputs, str):
        raw_inputs = [raw_inputs]
    if not isinstance(raw_inputs, list) or not all(isinstance(p, str) for p in raw_inputs):
        raise InputError(str(path), "'inputs' must be a list of file paths", field="inputs")
    inputs = [str(p if Path(p).is_absolute() else path.parent / p) for p in
              (Path(x).expanduser() for x in raw_inputs)]
    return doc, inputs


def load_config(path: str | Path, base: ScaleParams | None = None) -> tuple[ScaleParams, list[str]]:
    """Parameters and inputs of a YAML config (``.yaml``/``.yml``) or a phil file (anything else)."""
    path = Path(path)
    if path.suffix.lower() not in (".yaml", ".yml"):
        return load_phil(path, base), []
    tree, inputs = read_yaml_config(path)
    try:
        return params_from_dict(tree, base), inputs
    except ParameterError as exc:
        raise ParameterError(f"{path}: {exc}") from None
