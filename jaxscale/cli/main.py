"""The ``jaxscale`` command: scale, run, show, show-config, export, version.

A thin shell over :func:`jaxscale.scale.run`: it reads parameters (defaults <- ``--phil`` /
``--config`` files in order <- ``key=value`` arguments), sorts the input files, and turns
every user error (:class:`jaxscale.exceptions.JaxscaleError`) into one line on stderr and
exit status 2, before anything is written.
"""
from __future__ import annotations

import argparse
import gc
import importlib
import inspect
import sys
from pathlib import Path
from typing import Any

from jaxscale.exceptions import InputError, JaxscaleError, ParameterError

PROG = "jaxscale"


class EngineMissing(JaxscaleError):
    """A stage this command needs is not part of this build."""


def _engine(module: str, attr: str, what: str) -> Any:
    """Import ``module.attr`` lazily (the engine is heavy and written by other stages); the
    heavy imports are done after it, so the collector comes back on."""
    try:
        found = getattr(importlib.import_module(module), attr)
        _resume_collector()
        return found
    except ModuleNotFoundError as exc:
        if exc.name and module.startswith(exc.name):
            raise EngineMissing(f"{what} is not available in this build ({module}.{attr} is missing)") from None
        raise
    except AttributeError:
        raise EngineMissing(f"{what} is not available in this build ({module}.{attr} is missing)") from None


# ---------------------------------------------------------------- argument parsing
def _add_param_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--phil", action="append", default=[], metavar="FILE",
                   help="DIALS-style parameter file (repeatable; later files win)")
    p.add_argument("--config", action="append", default=[], metavar="FILE",
                   help="YAML config (parameters and inputs); .phil files are accepted too")


def _add_verbosity(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("-v", "--verbose", action="count", default=0, help="more output (-vv: all parameters)")
    g.add_argument("-q", "--quiet", action="store_true", help="no output except errors")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description="JAX re-implementation of dials.scale: scale and merge diffraction data.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("scale", help="scale .refl/.expt pairs, unmerged MTZ or XDS files",
                       description="Scale data sets. Arguments are input files (.refl/.expt pairs in any "
                       "order, paired by order; unmerged .mtz; XDS .HKL) and key=value parameters, "
                       "where any unique trailing part of a name works (d_min=1.4, "
                       "physical.absorption_correction=False, exclude_images=0:101:200). "
                       "Values on the command line override --phil/--config files.")
    p.add_argument("args", nargs="*", metavar="FILE|key=value")
    _add_param_options(p)
    _add_verbosity(p)

    p = sub.add_parser("run", help="scale as described by a YAML config file",
                       description="Run a YAML config: the parameter tree nested as in show-config, plus "
                       "'inputs:' (paths relative to the config). key=value arguments override it.")
    p.add_argument("config", metavar="CONFIG.yaml")
    p.add_argument("args", nargs="*", metavar="key=value")
    _add_verbosity(p)

    p = sub.add_parser("show", help="summarise input files",
                       description="Summarise reflection and experiment files: experiments, rows, space "
                       "group, cell, rotation range, resolution range.")
    p.add_argument("files", nargs="+", metavar="FILE")

    p = sub.add_parser("show-config", help="print the parameters, their defaults and help",
                       description="Print the parameter tree (like dials.scale -c). key=value arguments and "
                       "--phil/--config files show the parameters in effect.")
    p.add_argument("args", nargs="*", metavar="key=value")
    p.add_argument("-e", "--expert-level", type=int, default=0, metavar="LEVEL",
                   help="show parameters up to this expert level (default 0)")
    p.add_argument("-a", "--attributes-level", type=int, default=0, metavar="ATTRS",
                   help="1: add help, 2: add type and expert level")
    p.add_argument("--diff", action="store_true", help="only parameters that differ from the defaults")
    p.add_argument("--markdown", action="store_true", help="the reference table of docs/parameters.md")
    _add_param_options(p)

    p = sub.add_parser("export", help="write MTZ files from scaled.refl + scaled.expt",
                       description="Export scaled data to unmerged and/or merged MTZ.")
    p.add_argument("args", nargs="*", metavar="FILE|key=value")
    p.add_argument("--unmerged-mtz", metavar="FILE", help="unmerged MTZ output (default scaled.mtz if no "
                   "other output is given)")
    p.add_argument("--merged-mtz", metavar="FILE", help="merged MTZ output")
    p.add_argument("--crystal-name", metavar="NAME", help="MTZ crystal name (output.crystal_name)")
    p.add_argument("--project-name", metavar="NAME", help="MTZ project name (output.project_name)")
    _add_param_options(p)
    _add_verbosity(p)

    sub.add_parser("version", help="print the version", description="Print jaxscale and jax versions.")
    return parser


def _split_args(args: list[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """Separate files from ``key=value`` parameters (an existing file named a=b stays a file)."""
    files: list[str] = []
    overrides: list[tuple[str, str]] = []
    for arg in args:
        if "=" in arg and not Path(arg).exists():
            key, _, value = arg.partition("=")
            if not key.strip():
                raise ParameterError(f"'{arg}' has no parameter name before '='")
            overrides.append((key.strip(), value))
        else:
            files.append(arg)
    return files, overrides


def _parameters(ns: argparse.Namespace, overrides: list[tuple[str, str]], files: list[str],
                notes: list[str]) -> tuple[Any, list[str]]:
    """Defaults <- phil/config files (in order) <- command-line overrides; inputs from configs first."""
    from jaxscale.cli.config import load_config, load_phil
    from jaxscale.params import ScaleParams, apply_overrides

    params = ScaleParams()
    inputs: list[str] = []
    phil_files = [f for f in files if f.lower().endswith(".phil")]
    for path in list(getattr(ns, "phil", [])) + phil_files:
        params = load_phil(path, params)
    for path in getattr(ns, "config", []):
        params, more = load_config(path, params)
        inputs += more
    params = apply_overrides(params, overrides, notes=notes)
    return params, inputs + [f for f in files if f not in phil_files]


def _with_inputs(params: Any, inputs: list[str]) -> tuple[Any, list[str]]:
    """Classify inputs, record the .refl/.expt pairs in params.input, give the canonical order."""
    from jaxscale.cli.inputs import classify_inputs

    files = classify_inputs(inputs)
    params = params.model_copy(update={"input": params.input.model_copy(
        update={"reflections": files.reflections, "experiments": files.experiments})})
    return params, files.ordered()


def _progress(ns: argparse.Namespace) -> Any:
    from jaxscale.cli.console import RichProgress

    return RichProgress(quiet=getattr(ns, "quiet", False), verbose=getattr(ns, "verbose", 0))


def _run_engine(params: Any, inputs: list[str], ns: argparse.Namespace, command: str) -> int:
    from jaxscale.cli.console import print_header

    progress = _progress(ns)
    print_header(progress, inputs, params, command)
    _use_cpu_devices(getattr(getattr(params, "compute", None), "n_devices", 1))
    run = _engine("jaxscale.scale", "run", "the scaling engine")
    kwargs: dict[str, Any] = {}
    try:
        sig = inspect.signature(run)
        if "progress" in sig.parameters or any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values()):
            kwargs["progress"] = progress
    except (TypeError, ValueError):
        pass
    try:
        run(params, inputs, **kwargs)
    finally:
        progress.close()
    return 0


def _use_cpu_devices(n_devices: int | None) -> None:
    """compute.n_devices=N > 1 without an accelerator: N CPU devices (one thread each) for
    the sharded serial objective. Must happen before JAX starts its backend. Opt-in: on
    2 cores the evaluation gains 1.1-1.7x when a core is free, a whole job nothing
    (docs/serial.md)."""
    if n_devices is None or n_devices <= 1:
        return
    import jax

    try:
        jax.config.update("jax_num_cpu_devices", int(n_devices))
    except RuntimeError:  # backend already started (e.g. called in-process twice): keep its devices
        pass


# ---------------------------------------------------------------- commands
def cmd_scale(ns: argparse.Namespace) -> int:
    files, overrides = _split_args(ns.args)
    notes: list[str] = []
    params, inputs = _parameters(ns, overrides, files, notes)
    params, inputs = _with_inputs(params, inputs)
    for note in notes:
        if not ns.quiet:
            print(f"Note: {note}", file=sys.stderr)
    return _run_engine(params, inputs, ns, "scale")


def cmd_run(ns: argparse.Namespace) -> int:
    files, overrides = _split_args(ns.args)
    if files:
        raise ParameterError(f"run takes one config file and key=value arguments; unexpected: {' '.join(files)}")
    ns.config, ns.phil = [ns.config], []
    if not ns.config[0].lower().endswith((".yaml", ".yml")):
        raise InputError(ns.config[0], "run expects a YAML config (.yaml or .yml)")
    notes: list[str] = []
    params, inputs = _parameters(ns, overrides, [], notes)
    params, inputs = _with_inputs(params, inputs)
    return _run_engine(params, inputs, ns, "run")


def cmd_show_config(ns: argparse.Namespace) -> int:
    from jaxscale.params import format_phil, markdown_docs

    if ns.markdown:
        sys.stdout.write(markdown_docs())
        return 0
    files, overrides = _split_args(ns.args)
    if files:
        raise ParameterError(f"show-config takes key=value arguments only; unexpected: {' '.join(files)}")
    params, _ = _parameters(ns, overrides, [], [])
    sys.stdout.write(format_phil(params, expert_level=ns.expert_level, attributes_level=ns.attributes_level,
                                 diff_only=ns.diff))
    return 0


def _read_any(path: str, kind: str) -> tuple[Any, Any]:
    """(table or None, experiments or None) of one classified file."""
    if kind == "reflections":
        return _engine("jaxscale.io.refl", "read_refl", "the .refl reader")(path), None
    if kind == "experiments":
        return None, _engine("jaxscale.io.expt", "read_expt", "the .expt reader")(path)
    if kind == "mtz":
        return _engine("jaxscale.io.mtz", "read_unmerged_mtz", "the MTZ reader")(path)
    return _engine("jaxscale.io.xds", "read_xds", "the XDS reader")(path)


def cmd_show(ns: argparse.Namespace) -> int:
    from jaxscale.cli.inputs import classify_file
    from jaxscale.cli.show import summarise

    kinds = [(path, classify_file(path)) for path in ns.files]  # check all before reading any
    for path, kind in kinds:
        table, experiments = _read_any(path, kind)
        sys.stdout.write(summarise(path, kind, table, experiments))
    return 0


def cmd_export(ns: argparse.Namespace) -> int:
    from jaxscale.cli.inputs import classify_inputs

    files, overrides = _split_args(ns.args)
    notes: list[str] = []
    params, inputs = _parameters(ns, overrides, files, notes)
    output = {k: v for k, v in (("unmerged_mtz", ns.unmerged_mtz), ("merged_mtz", ns.merged_mtz),
                                ("crystal_name", ns.crystal_name), ("project_name", ns.project_name))
              if v is not None}
    if "unmerged_mtz" not in output and "merged_mtz" not in output and \
            params.output.unmerged_mtz is None and params.output.merged_mtz is None:
        output["unmerged_mtz"] = "scaled.mtz"
    params = params.model_copy(update={"output": params.output.model_copy(update=output)})
    classified = classify_inputs(inputs)
    if classified.mtz or classified.xds or not classified.pairs:
        raise InputError(None, "export needs scaled .refl and .expt files (e.g. scaled.refl scaled.expt)")
    export = _engine("jaxscale.export", "run", "MTZ export")
    read_refl = _engine("jaxscale.io.refl", "read_refl", "the .refl reader")
    read_expt = _engine("jaxscale.io.expt", "read_expt", "the .expt reader")
    tables = [read_refl(r) for r, _ in classified.pairs]
    experiments = [read_expt(e) for _, e in classified.pairs]
    export(params, tables, experiments)
    return 0


def cmd_version(ns: argparse.Namespace) -> int:
    import jax

    from jaxscale import __version__

    print(f"jaxscale {__version__} (jax {jax.__version__}, DIALS 3.12 parameter set)")
    return 0


COMMANDS = {"scale": cmd_scale, "run": cmd_run, "show": cmd_show, "show-config": cmd_show_config,
            "export": cmd_export, "version": cmd_version}


def main(argv: list[str] | None = None) -> int:
    """Console entry point; returns the exit status (0 ok, 2 user error).

    From the command line (argv None) the process ends as soon as the command has written
    everything (`_exit`), without the interpreter's teardown."""
    if argv is None:
        _tune_malloc()
        _pause_collector()
    status = _main(argv)
    if argv is None:
        _exit(status)
    return status


# The garbage collector's full passes rescan every live object; after the imports (JAX,
# numpy, gemmi, pydantic: ~250k objects, all kept to the end) they cost ~0.2 s of a small
# job's ~1.5 s. So the command starts with the collector off, then freezes what the imports
# made (never scanned again) and collects only every GC_YOUNG_THRESHOLD new containers.
GC_YOUNG_THRESHOLD = 100_000
_collector_paused = False


def _pause_collector() -> None:
    global _collector_paused
    _collector_paused = gc.isenabled()
    gc.disable()


def _resume_collector() -> None:
    """Freeze the objects made so far and turn the collector back on (if the command
    turned it off)."""
    global _collector_paused
    if not _collector_paused:
        return
    _collector_paused = False
    gc.freeze()
    gc.set_threshold(GC_YOUNG_THRESHOLD, 50, 100)
    gc.enable()


# Large numpy temporaries (80 MB per float64 column at 10^7 rows) lie above glibc's mmap
# threshold (32 MB at most when left dynamic), so every one gets fresh pages from the kernel
# and pays a page fault per page: ~1/3 of the CPU time of a 10^7-row job was system time.
# Above these bounds memory still goes straight back to the kernel, so the heap cannot grow
# without limit.
MMAP_THRESHOLD_BYTES = 256 << 20
TRIM_THRESHOLD_BYTES = 512 << 20


def _tune_malloc() -> bool:
    """Let glibc's heap serve (and keep, up to a bound) the large temporaries that numpy
    allocates and frees over and over. Returns whether it applied (glibc only; elsewhere a
    no-op)."""
    from jaxscale import set_malloc_thresholds

    return set_malloc_thresholds(MMAP_THRESHOLD_BYTES, TRIM_THRESHOLD_BYTES)


def _exit(status: int) -> None:
    """End the process now: every output file is closed by then, so only stdout/stderr
    and logging need flushing. Python's teardown would spend 0.2-0.4 s freeing JAX and XLA
    objects. A background compilation still running is waited for (its compile-cache
    entry must not be cut short); queued ones are dropped."""
    import logging
    import os

    compilation = sys.modules.get("jaxscale.compilation")  # not imported by e.g. --help
    if compilation is not None:
        compilation.finish_background_compilation()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # closed or broken pipe: nothing more to write
            pass
    os._exit(status)


def _main(argv: list[str] | None) -> int:
    parser = build_parser()
    ns, extra = parser.parse_known_args(argv)
    if extra:
        unknown = [a for a in extra if a.startswith("-")]
        if unknown or not hasattr(ns, "args"):
            parser.error(f"unrecognized arguments: {' '.join(unknown or extra)}")
        ns.args = list(ns.args) + extra  # positionals after an option
    try:
        return COMMANDS[ns.command](ns)
    except JaxscaleError as exc:
        message = " ".join(str(exc).split("\n")[0].split()) or type(exc).__name__
        print(f"{PROG}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
