"""The notebooks run top to bottom at their small size and show what they claim.

Each is executed with nbclient in a fresh `python3` kernel (cwd the repository root,
`SMSD_NOTEBOOK_SMALL=1`, its temporary files under pytest's tmp_path). The committed files
must carry no outputs: the tests, not the file, show that they run.
"""

import os
import re
from pathlib import Path

import nbformat
import pytest
from jupyter_client.kernelspec import find_kernel_specs
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
KERNEL = "python3"
NAMES = ("01_quickstart.ipynb", "02_encryption.ipynb", "03_attention.ipynb")


def _number(pattern: str, text: str) -> float:
    match = re.search(pattern + r"\s*(\S+)", text)
    assert match, f"no output line matching {pattern!r}"
    return float(match.group(1))


def _outputs(nb) -> tuple[str, int]:
    """(all text the code cells printed or displayed, number of PNG images shown)."""
    texts, pngs = [], 0
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            texts.append(out.get("text", ""))
            data = out.get("data", {})
            texts += [data.get("text/plain", ""), data.get("text/markdown", "")]
            pngs += "image/png" in data
    return "\n".join(texts), pngs


def _execute(name: str, tmp_path: Path):
    if KERNEL not in find_kernel_specs():
        pytest.fail(f"no Jupyter kernel named {KERNEL!r} (found {sorted(find_kernel_specs())}); "
                    "install the test extras with `pip install -e .[test]` (ipykernel), then "
                    "`python -m ipykernel install --user` if the kernel is still missing")
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    env = dict(os.environ, SMSD_NOTEBOOK_SMALL="1", PYTHONPATH=str(ROOT), TMPDIR=str(tmp_path))
    # A notebook user has one CPU device, not the 8 simulated ones of conftest.py.
    env["XLA_FLAGS"] = env.get("XLA_FLAGS", "").replace(
        "--xla_force_host_platform_device_count=8", "").strip()
    client = NotebookClient(nb, kernel_name=KERNEL, timeout=300,
                            resources={"metadata": {"path": str(ROOT)}})
    client.execute(env=env)  # raises CellExecutionError, with the cell and traceback
    return nb


def _check_quickstart(text: str, pngs: int) -> None:
    assert "| SMSD body |" in text and "| random body |" in text  # the results table
    assert "training_curves.png" in text and "downstream_accuracy.png" in text
    assert pngs >= 2
    assert '"global_pool": "token"' in text  # the timm export's sidecar


def _check_encryption(text: str, pngs: int) -> None:
    assert _number("class feature, shuffled vs grid order: max abs difference", text) < 1e-4
    assert _number("token features, shuffled vs grid order permuted: max abs difference",
                   text) < 1e-4
    assert _number("control, another masked subset: max abs difference", text) > 1e-2
    assert "tokens received: (128, 2, 24, 16)" in text  # the default head_dim 16
    assert '"head_fingerprint"' in text  # the manifest is shown
    assert pngs >= 4


def _check_attention(text: str, pngs: int) -> None:
    assert _number("view attention, shuffled vs grid order, on the grid: max abs difference",
                   text) < 1e-5
    assert "attention maps (6, 2, 7, 7)" in text  # tiny body: 2 heads, 7 x 7 grid
    assert pngs >= 2


CHECKS = dict(zip(NAMES, (_check_quickstart, _check_encryption, _check_attention)))


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_notebook_runs_and_shows_its_results(name, tmp_path):
    before = sorted(NOTEBOOKS.iterdir())
    nb = _execute(name, tmp_path)
    CHECKS[name](*_outputs(nb))
    assert list(tmp_path.glob("smsd_*")), "the notebook wrote nowhere under its temp folder"
    assert sorted(NOTEBOOKS.iterdir()) == before  # nothing written into the repository


@pytest.mark.parametrize("name", NAMES)
def test_committed_notebook_is_clean_and_colab_ready(name):
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    nbformat.validate(nb)
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    for cell in code:
        assert cell.outputs == [] and cell.execution_count is None, (
            f"{name} holds outputs: clear them (Jupyter: Edit > Clear outputs of all cells; or "
            f"`jupyter nbconvert --clear-output --inplace notebooks/{name}`) before committing")
    assert code[0].source.startswith("import sys") and '"google.colab" in sys.modules' in (
        code[0].source)
    assert 'SMALL = os.environ.get("SMSD_NOTEBOOK_SMALL", "0") == "1"' in code[1].source
    assert nb.metadata.kernelspec.name == KERNEL
    too_long = [line for cell in nb.cells for line in cell.source.splitlines()
                if len(line) > 100]
    assert not too_long, too_long
