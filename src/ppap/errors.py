"""The one error type users see: the CLI prints its message as one line and exits with status 2.

Kept in a module of its own, importing nothing, so that the command line can parse and refuse
arguments without importing torch."""


class PPAPError(ValueError):
    """A user-facing error: the CLI prints its message as one line and exits with status 2."""
