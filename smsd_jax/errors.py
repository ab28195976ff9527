"""The one class of expected errors: a bad config, bad input or a damaged artifact.

Every such error names the file or value at fault and says what to do. The command line
prints an `SMSDError` as one line and exits with status 2; any other exception is a bug
and keeps its traceback. The subclasses keep the built-in kind as well, so callers may
catch `ValueError`, `FileNotFoundError` or `FloatingPointError` as before.
"""


class SMSDError(ValueError):
    """Bad config, bad input or a damaged artifact (the message says which, and what to do)."""


class MissingInputError(SMSDError, FileNotFoundError):
    """A file or folder the run needs does not exist."""


class NotFiniteError(SMSDError, FloatingPointError):
    """Training produced a non-finite loss or metric (the message names the step)."""
