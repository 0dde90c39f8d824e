"""Errors that the command line turns into one-line messages with exit status 2."""
from __future__ import annotations


class JaxscaleError(Exception):
    """Base of all errors that are the user's input, not a bug."""


class InputError(JaxscaleError):
    """Bad input file or field: names the file and the field so the user can fix it."""

    def __init__(self, path: str | None, problem: str, field: str | None = None):
        self.path = None if path is None else str(path)
        self.field = field
        self.problem = problem
        where = self.path or "<input>"
        if field:
            where += f" [{field}]"
        super().__init__(f"{where}: {problem}")


class ParameterError(JaxscaleError):
    """An option with an unknown name, wrong type, out-of-range value or conflict."""
