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


def require(module: str, extra: str):
    """Imports `module`, a dependency of an optional part of smsd_jax, or says which extra of
    the package installs it (`pip install 'smsd-jax[EXTRA]'`)."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise SMSDError(f"this needs {module.split('.')[0]}, which is not installed: pip install "
                        f"'smsd-jax[{extra}]' (or bash launch/setup.sh, which installs every "
                        "extra)") from e


def check_rank(name: str, x, ranks: int | set[int]) -> None:
    """Raises a ValueError naming `name` unless the array `x` has one of `ranks` axes."""
    allowed = {ranks} if isinstance(ranks, int) else set(ranks)
    if len(x.shape) not in allowed:
        raise ValueError(f"{name} must have {' or '.join(map(str, sorted(allowed)))} axes, "
                         f"got shape {tuple(x.shape)}")
