"""Errors a user can fix: the entry points print them as one message, never a traceback."""

from __future__ import annotations


class LmlabError(Exception):
    """A problem in the user's config, data or environment, with the fix in its message."""

    exit_code = 2  # the process's exit status when an entry point reports it (docs/reliability.md)


class ConfigError(LmlabError):
    """One or more config problems, all reported together."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        lines = "\n".join(f"  - {problem}" for problem in problems)
        super().__init__(f"the config has {len(problems)} problem(s):\n{lines}")


class DataError(LmlabError):
    """A missing or malformed data file; names the file and, where known, the line."""

    def __init__(self, path, message: str, line: int | None = None, fix: str = ""):
        where = f"{path}:{line}" if line is not None else f"{path}"
        super().__init__(f"{where}: {message}" + (f"; fix: {fix}" if fix else ""))


class NumericalFault(LmlabError):
    """A non-finite loss or gradient: the run stops before the optimizer step applies it."""

    exit_code = 3


class PeerLost(LmlabError):
    """A process of a multi-process run died, or a collective waited past its timeout."""

    exit_code = 4


class TrialPruned(Exception):
    """A sweep job stopped by its Optuna study's pruner: neither finished nor failed."""
