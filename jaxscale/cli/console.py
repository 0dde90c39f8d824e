"""Console output of the command line: header, progress with ETA, log lines, parameter text.

The engine reports progress through any object with the four methods of
:class:`ProgressCallback`; :class:`RichProgress` draws bars on a terminal and writes plain
lines otherwise (logs, CI), and stays silent with ``quiet``.
"""
from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import IO, TYPE_CHECKING, Protocol, runtime_checkable

from rich.console import Console

from jaxscale.params import ScaleParams, diff_from_defaults, explain_conflicts, format_phil

if TYPE_CHECKING:  # rich.progress is imported only to draw bars on a terminal
    from rich.progress import Progress


@runtime_checkable
class ProgressCallback(Protocol):
    """What the engine calls to report progress (duck-typed: any object with these methods)."""

    def on_phase_start(self, name: str, total: int | None) -> None: ...
    def on_advance(self, n: int = 1) -> None: ...
    def on_phase_end(self) -> None: ...
    def log(self, msg: str) -> None: ...


class NullProgress:
    """Progress sink that does nothing (library use, tests)."""

    def on_phase_start(self, name: str, total: int | None) -> None:
        pass

    def on_advance(self, n: int = 1) -> None:
        pass

    def on_phase_end(self) -> None:
        pass

    def log(self, msg: str) -> None:
        pass


class RichProgress:
    """Progress bars with ETA on a terminal; plain ``phase ... done (t s)`` lines elsewhere.

    ``verbose`` >= 1 also prints per-phase timings on a terminal; ``quiet`` prints nothing.
    Phases do not nest: starting a phase ends the current one.
    """

    def __init__(self, console: Console | None = None, *, quiet: bool = False, verbose: int = 0,
                 file: IO[str] | None = None):
        self.console = console or Console(file=file or sys.stdout, highlight=False)
        self.quiet = quiet
        self.verbose = verbose
        self.interactive = self.console.is_terminal
        self._progress: Progress | None = None
        self._task: int | None = None
        self._name: str | None = None
        self._total: int | None = None
        self._done = 0
        self._t0 = 0.0

    # -- protocol
    def on_phase_start(self, name: str, total: int | None) -> None:
        if self._name is not None:
            self.on_phase_end()
        self._name, self._total, self._done, self._t0 = name, total, 0, time.perf_counter()
        if self.quiet:
            return
        if self.interactive:
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn,
                                       TimeElapsedColumn, TimeRemainingColumn)

            columns = [SpinnerColumn(), TextColumn("{task.description}")]
            if total is not None:
                columns += [BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TextColumn("ETA"),
                            TimeRemainingColumn()]
            else:
                columns += [TimeElapsedColumn()]
            self._progress = Progress(*columns, console=self.console, transient=True)
            self._progress.start()
            self._task = self._progress.add_task(name, total=total)
        else:
            self._plain(f"{name} ..." + (f" ({total} steps)" if total else ""))

    def on_phase_describe(self, step: str) -> None:
        """Show which step of the current phase is running (terminal only)."""
        if self._progress is not None and self._task is not None:
            self._progress.update(self._task, description=f"{self._name}: {step}")

    def on_advance(self, n: int = 1) -> None:
        self._done += n
        if self._progress is not None and self._task is not None:
            self._progress.advance(self._task, n)

    def on_phase_end(self) -> None:
        if self._name is None:
            return
        elapsed = time.perf_counter() - self._t0
        if self._progress is not None:
            self._progress.stop()
            self._progress, self._task = None, None
        if not self.quiet and not self.interactive:
            self._plain(f"{self._name}: done in {elapsed:.1f} s")
        elif not self.quiet and self.verbose:
            self.console.print(f"{self._name}: done in {elapsed:.1f} s")
        elif not self.quiet:
            self.console.print(f"[green]\u2713[/green] {self._name} ({elapsed:.1f} s)")
        self._name = None

    def log(self, msg: str) -> None:
        if self.quiet:
            return
        if not self.interactive:
            self._plain(msg)
        else:  # soft_wrap: never re-wrap wide log tables to the console width
            self.console.print(msg, markup=False, highlight=False, soft_wrap=True)

    def _plain(self, text: str) -> None:
        """One line as is, off a terminal: what rich would write there (no markup, no
        wrapping), without its per-call rendering and terminal checks (~1 ms a line)."""
        file = self.console.file
        file.write(text + "\n")
        file.flush()

    def show_statistics(self, stats, text: str) -> None:
        """The merging statistics: a rich table on a terminal, dials.scale's text elsewhere."""
        if self.quiet:
            return
        if not self.interactive:
            self.log(text)
            return
        from rich.table import Table

        from jaxscale.report.text import _SUMMARY_ROWS, summary_values

        four = stats.suggested is not None
        columns = ["Suggested", "Low", "High", "Overall"] if four else ["Overall", "Low", "High"]
        table = Table(title="Summary of merging statistics", title_style="bold")
        table.add_column("")
        for name in columns:
            table.add_column(name, justify="right")
        values = summary_values(stats)
        for label, fmt, _, _ in _SUMMARY_ROWS:
            if label not in values:
                continue
            cells = ["" if v is None else fmt.strip() % v for v in values[label]]
            table.add_row(label, *(cells + [""] * (len(columns) - len(cells))))
        self.console.print(table)

    # -- convenience
    @contextmanager
    def phase(self, name: str, total: int | None = None) -> Iterator[RichProgress]:
        """``with progress.phase("scaling", total=n): ... progress.on_advance()``."""
        self.on_phase_start(name, total)
        try:
            yield self
        finally:
            self.on_phase_end()

    def close(self) -> None:
        """End a phase left open (e.g. by an exception)."""
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
        self._name = None


def format_parameters(params: ScaleParams, diff_only: bool) -> str:
    """Parameters in effect as phil text for the log: only the changed ones, or the full tree."""
    if diff_only:
        if not diff_from_defaults(params):
            return "# all parameters at their defaults\n"
        return format_phil(params, diff_only=True)
    return format_phil(params, expert_level=10)


def print_header(out: RichProgress, inputs: list[str], params: ScaleParams, command: str = "scale") -> None:
    """Version, inputs and changed parameters, so a log says what was run."""
    from jaxscale import __version__

    if out.quiet:
        return
    out.console.rule(f"jaxscale {__version__}: {command}", style="bold") if out.interactive else \
        out.log(f"jaxscale {__version__}: {command}")
    out.log("Inputs:")
    for path in inputs:
        out.log(f"  {path}")
    out.log("Parameters changed from the defaults:")
    out.log(format_parameters(params, diff_only=True).rstrip("\n"))
    for note in explain_conflicts(params):
        out.log(f"Note: {note}")
    if out.verbose >= 2:
        out.log("All parameters:")
        out.log(format_parameters(params, diff_only=False).rstrip("\n"))
