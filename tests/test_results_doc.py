"""docs/results.md's generated blocks: filled from results/*.md, and up to date (no jax)."""

from pathlib import Path

import pytest

from experiments import results_doc
from smsd_jax.errors import SMSDError

ROOT = Path(__file__).resolve().parents[1]

TOY = """# Toy experiment: 3 images

`python3 -m launch.main --mode=toy` on a tiny machine.

| method | accuracy |
|---|---|
| SMSD | 51.0 |

## Per site

Accuracy % at each site:

| site | accuracy |
|---|---|
| 0 | 50.0 |

Notes after the last table are left out.

## Answers

- no table here, so this section is left out
"""

FILLED = """<!-- generated from results/toy.md: python -m experiments.results_doc -->

**Toy experiment: 3 images**

`python3 -m launch.main --mode=toy` on a tiny machine.

| method | accuracy |
|---|---|
| SMSD | 51.0 |

**Per site**

Accuracy % at each site:

| site | accuracy |
|---|---|
| 0 | 50.0 |

<!-- end of generated block -->"""


def _doc(block: str) -> str:
    return ("# Results\n\n## Toy\n\n```bash\npython3 -m launch.main --mode=toy   # resumes\n```\n\n"
            f"Prose before the block.\n\n{block}\n\nThe reading, by hand.\n")


def test_the_document_is_what_render_writes_from_the_committed_results():
    doc = (ROOT / "docs" / "results.md").read_text()
    assert len(results_doc.blocks(doc.split("\n"))) >= 1, "docs/results.md has no generated block"
    stale = results_doc.stale(doc, ROOT / "results")
    assert not stale, (f"docs/results.md is stale in the blocks of {', '.join(stale)}: run "
                       "python -m experiments.results_doc")
    assert doc == results_doc.render(doc, ROOT / "results")


def test_render_fills_a_block_replaces_stale_content_and_is_idempotent(tmp_path):
    (tmp_path / "toy.md").write_text(TOY)
    stale = _doc(results_doc.marker("toy") + "\n\n| old | table |\n|---|---|\n\n"
                 + results_doc.END)
    filled = results_doc.render(stale, tmp_path)
    assert filled == _doc(FILLED)
    assert results_doc.render(filled, tmp_path) == filled
    assert results_doc.stale(stale, tmp_path) == ["results/toy.md (line 11)"]
    assert results_doc.stale(filled, tmp_path) == []
    # An empty block is filled the same way, and a rewritten results file reaches the block.
    assert results_doc.render(_doc(results_doc.marker("toy") + "\n" + results_doc.END),
                              tmp_path) == filled
    (tmp_path / "toy.md").write_text(TOY.replace("51.0", "52.5"))
    assert results_doc.render(filled, tmp_path) == _doc(FILLED.replace("51.0", "52.5"))


def test_check_names_the_stale_block_and_the_rewrite_fixes_it(tmp_path, capsys):
    (tmp_path / "toy.md").write_text(TOY)
    doc = tmp_path / "results.md"
    doc.write_text(_doc(results_doc.marker("toy") + "\n" + results_doc.END))
    args = ["--doc", str(doc), "--results", str(tmp_path)]
    assert results_doc.main([*args, "--check"]) == 1
    assert "results/toy.md (line 11) is stale" in capsys.readouterr().out
    assert results_doc.main(args) == 0
    assert doc.read_text() == _doc(FILLED)
    assert results_doc.main([*args, "--check"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.md", "toy.md"], \
        "a temporary file was left behind"


def test_a_marker_naming_a_missing_results_file_says_which_and_what_to_run(tmp_path):
    doc = _doc(results_doc.marker("nothing") + "\n" + results_doc.END)
    with pytest.raises(SMSDError, match=r"nothing\.md does not exist") as e:
        results_doc.render(doc, tmp_path)
    assert "python3 -m launch.main --mode=toy" in str(e.value)
    assert "resumes" not in str(e.value)


def test_misplaced_markers_and_a_file_without_a_table_are_errors(tmp_path):
    (tmp_path / "toy.md").write_text("# Toy\n\nNo table.\n")
    with pytest.raises(SMSDError, match=r"toy\.md has no Markdown table"):
        results_doc.render(_doc(results_doc.marker("toy") + "\n" + results_doc.END), tmp_path)
    with pytest.raises(SMSDError, match="never closed"):
        results_doc.render(_doc(results_doc.marker("toy")), tmp_path)
    with pytest.raises(SMSDError, match="closes no generated block"):
        results_doc.render(_doc(results_doc.END), tmp_path)
