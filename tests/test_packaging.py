"""What `pip install .` gives a user: the library `smsd_jax` and its `smsd-jax` command only,
and the command line's contract for errors.

The venv sees this machine's site-packages (`--system-site-packages`) for the dependencies,
so the test builds and installs the project itself (`--no-deps`) without downloading JAX;
what it checks is what the install puts in the venv, and that it imports from there.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import experiments
from smsd_jax import cli

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def venv(tmp_path_factory):
    # From a copy of what the build reads, so that no build/ folder of an earlier build in the
    # checkout can add stale files to the package.
    work = tmp_path_factory.mktemp("pip")
    source = work / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(ROOT / "smsd_jax", source / "smsd_jax",
                    ignore=shutil.ignore_patterns("__pycache__"))
    venv = work / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)],
                   check=True)
    subprocess.run([venv / "bin" / "python", "-m", "pip", "install", "-q", "--no-deps",
                    "--disable-pip-version-check", str(source)], check=True, cwd=work)
    return venv


def _installed_files(venv) -> list[Path]:
    shown = subprocess.run([venv / "bin" / "python", "-m", "pip", "show", "-f", "smsd-jax"],
                           check=True, capture_output=True, text=True).stdout
    listing = shown.split("Files:", 1)[1]
    return [Path(line.strip()) for line in listing.splitlines() if line.strip()]


@pytest.mark.slow
def test_pip_install_holds_only_smsd_jax(venv):
    files = _installed_files(venv)
    tops = {f.parts[0] for f in files if f.parts[0] != ".."}
    assert tops == {"smsd_jax", "smsd_jax-0.1.0.dist-info"}
    assert any(f.name == "smsd-jax" for f in files)  # the console script, in the venv's bin/
    for package in ("configs", "launch", "benchmarks", "notebooks", "tests"):
        assert not any(package in f.parts for f in files), package


@pytest.mark.slow
def test_installed_library_imports_from_the_venv_and_nothing_else(venv):
    code = ("import smsd_jax, smsd_jax.ops, smsd_jax.models, importlib.util; "
            "print(smsd_jax.__file__); "
            "print([m for m in ('configs', 'launch', 'experiments') "
            "if importlib.util.find_spec(m)])")
    out = subprocess.run([venv / "bin" / "python", "-c", code], check=True, capture_output=True,
                         text=True, cwd=venv.parent).stdout.splitlines()
    assert Path(out[0]).is_relative_to(venv)
    assert out[1] == "[]"  # no top-level configs, launch or experiments came with it


def test_console_script_lists_every_stage_and_the_checkout_every_experiment(venv):
    out = subprocess.run([venv / "bin" / "smsd-jax", "--help"], capture_output=True, text=True,
                         cwd=venv.parent)  # absl's --help exits with status 1
    for mode in cli.MODES:
        assert mode in out.stdout
    assert "--config" in out.stdout and "--workdir" in out.stdout
    assert "run from a checkout" in out.stdout
    checkout = _cli("--help").stdout
    for mode in [*cli.MODES, *experiments.MODES]:
        assert f"{mode}:" in checkout


def _cli(*args, cwd=ROOT):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "launch.main", *args], cwd=cwd, env=env,
                          capture_output=True, text=True)


def test_config_that_cannot_load_is_one_line_with_status_2(tmp_path):
    out = _cli("--config=configs/quickstart.py:nonsense", "--mode=init",
               f"--workdir={tmp_path / 'w'}")
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        "error: unknown config variant 'nonsense' of configs/quickstart.py; it accepts "
        "runlocal, tiny, demo_keys (comma-separated, e.g. configs/quickstart.py:runlocal)"]
    assert not (tmp_path / "w").exists()


def test_an_unexpected_error_keeps_its_traceback(tmp_path):
    # A bug (here a ValueError that is not an SMSDError, as one deep in JAX would be) is not
    # turned into one line: the traceback shows where it came from.
    code = ("import sys; from smsd_jax import cli\n"
            "def run(argv, experiments): raise ValueError('a bug deep inside')\n"
            "cli.run = run\n"
            "sys.argv = ['smsd-jax', '--config=configs/quickstart.py:tiny']\n"
            "cli.main()\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert out.returncode == 1
    assert "Traceback" in out.stderr and "ValueError: a bug deep inside" in out.stderr
