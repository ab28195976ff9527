"""Tests run on CPU with 8 simulated devices; the flags must be set before jax is imported.

Most of the suite's time is XLA compiling, and many tests compile the same programs (every
command-line test starts a new interpreter that compiles the server step again). One
persistent compilation cache for the session, shared with the tests' subprocesses through the
environment, compiles each program once. It lives in a fresh temporary folder, removed at the
end, so that every run of the suite compiles from nothing as a fresh machine does; set
JAX_COMPILATION_CACHE_DIR yourself to keep one between runs.
"""

import os
import shutil
import tempfile

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
_OWN_CACHE = None
if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    _OWN_CACHE = tempfile.mkdtemp(prefix="smsd-jax-tests-xla-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _OWN_CACHE
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")


def pytest_sessionfinish(session, exitstatus):
    if _OWN_CACHE and not hasattr(session.config, "workerinput"):  # not an xdist worker's
        shutil.rmtree(_OWN_CACHE, ignore_errors=True)
