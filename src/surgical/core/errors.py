"""Errors that users can act on.

Every error raised for bad input is a :class:`SurgicalError` whose message is one line naming the
problem and the fix. The CLI prints it without a traceback and exits non-zero.
"""

from __future__ import annotations


class SurgicalError(Exception):
    """A problem with the user's input or files, with a message that says how to fix it."""

    def __init__(self, problem: str, fix: str | None = None) -> None:
        self.problem = problem
        self.fix = fix
        # a problem quoting another library's message may already end in a full stop
        head = problem.rstrip().rstrip(".") if fix else problem
        super().__init__(f"{head}. {fix}" if fix else problem)
