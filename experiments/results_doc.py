"""The tables of docs/results.md, copied from the results files that the experiments write.

    python -m experiments.results_doc            # rewrites docs/results.md in place
    python -m experiments.results_doc --check    # exits 1, naming the stale blocks

docs/results.md holds the readings, written by hand; its tables come from results/<stem>.md,
which each experiment writes from its own results/<stem>.json. A generated block is every
line between the two marker lines

    <!-- generated from results/<stem>.md: python -m experiments.results_doc -->
    <!-- end of generated block -->

and `render` replaces all of it; the text outside the blocks is never touched. What a block
copies from results/<stem>.md (`tables`):

- the file is cut into sections at its headings (lines that start with '#');
- a section without a table (no line starting with '|') is left out, and so is whatever
  follows a section's last table (answers, notes, run times: those are the readings' to say);
- a kept section is copied from its first line to the end of its last table, as written, with
  its heading (whatever its level: the file's title too) turned into a bold line.

So each table arrives with the title or heading and the caption the experiment gave it. A
marker that names a missing file, or a file without a table, is an error that names the file
and says what to run. After an experiment rewrites a results file, rerun this module
(tests/test_results_doc.py checks that the document is what it would write).
"""

from __future__ import annotations

import argparse
import os
import re
import stat
import sys
import tempfile
from pathlib import Path

from smsd_jax.errors import SMSDError

ROOT = Path(__file__).resolve().parents[1]
DOC, RESULTS = ROOT / "docs" / "results.md", ROOT / "results"
COMMAND = "python -m experiments.results_doc"
START = re.compile(r"^<!-- generated from results/([\w.-]+)\.md: "
                   + re.escape(COMMAND) + r" -->$")
END = "<!-- end of generated block -->"
HEADING = re.compile(r"^#{1,6} +(.*?)\s*$")


def marker(stem: str) -> str:
    """The line that opens the generated block of results/<stem>.md."""
    return f"<!-- generated from results/{stem}.md: {COMMAND} -->"


# ---------------------------------------------------------------- what a block copies


def _sections(lines: list[str]) -> list[tuple[str | None, list[str]]]:
    """(heading text, or None before the first heading; its lines) of each section of a
    Markdown file, in order."""
    sections = [(None, [])]
    for line in lines:
        if m := HEADING.match(line):
            sections.append((m.group(1), []))
        else:
            sections[-1][1].append(line)
    return sections


def _trimmed(lines: list[str]) -> list[str]:
    """`lines` without the blank lines at either end."""
    start = next((i for i, line in enumerate(lines) if line.strip()), len(lines))
    end = len(lines)
    while end > start and not lines[end - 1].strip():
        end -= 1
    return lines[start:end]


def tables(text: str, name: str = "the results file") -> list[str]:
    """The lines a generated block holds for the results file `text` (the module docstring's
    rule), without blank lines at either end. Raises SMSDError naming `name` if it has no
    table."""
    out: list[str] = []
    for heading, lines in _sections(text.splitlines()):
        rows = [i for i, line in enumerate(lines) if line.startswith("|")]
        if not rows:
            continue
        if heading is not None:
            out += [f"**{heading}**", ""]
        out += _trimmed(lines[:rows[-1] + 1]) + [""]
    if not out:
        raise SMSDError(f"{name} has no Markdown table to copy into docs/results.md: rerun the "
                        "experiment that writes it, or remove its generated block")
    return out[:-1]


# ---------------------------------------------------------------- the document's blocks


def blocks(lines: list[str]) -> list[tuple[str, int, int]]:
    """(stem, index of the opening marker, index of the closing one) of every generated block
    in the document's `lines`. Raises SMSDError (naming the line) on a marker out of place."""
    found, open_at = [], None
    for i, line in enumerate(lines):
        if m := START.match(line):
            if open_at is not None:
                raise SMSDError(f"line {i + 1}: a generated block opens inside the one opened at "
                                f"line {open_at[1] + 1}; add `{END}` before it")
            open_at = (m.group(1), i)
        elif line == END:
            if open_at is None:
                raise SMSDError(f"line {i + 1}: `{END}` closes no generated block")
            found.append((*open_at, i))
            open_at = None
        elif line.startswith("<!-- generated from"):
            raise SMSDError(f"line {i + 1}: a malformed marker; write it as `{marker('STEM')}`")
    if open_at is not None:
        raise SMSDError(f"line {open_at[1] + 1}: the generated block of results/{open_at[0]}.md "
                        f"is never closed; add `{END}` after it")
    return found


def _command_above(lines: list[str], at: int) -> str | None:
    """The experiment's command: the `python` lines of the last code block above line `at`
    within its '## ' section, or None."""
    command, fenced = None, False
    for line in lines[:at]:
        if line.startswith("## ") and not fenced:
            command = None
        elif line.startswith("```"):
            fenced = not fenced
            if fenced:
                command = []
        elif fenced and line.lstrip().startswith("python"):
            command.append(line.split("  #")[0].strip())
    return "; ".join(command) if command else None


def _missing(path: Path, lines: list[str], at: int) -> SMSDError:
    """The error for a marker at index `at` whose results file `path` does not exist."""
    command = _command_above(lines, at)
    how = (f"run `{command}` (the command above the marker)" if command else
           "run the experiment that writes it (its command is in the section above the marker)")
    return SMSDError(f"{path} does not exist (named by the generated block at line {at + 1} of "
                     f"docs/results.md): {how}, then `{COMMAND}`; or remove the block")


def render(doc_text: str, results_dir: Path) -> str:
    """`doc_text` with every generated block filled from results_dir/<stem>.md (the module
    docstring's rule); everything outside the blocks is kept as it is."""
    lines = doc_text.split("\n")
    out, done = [], 0
    for stem, start, end in blocks(lines):
        path = Path(results_dir) / f"{stem}.md"
        if not path.is_file():
            raise _missing(path, lines, start)
        out += lines[done:start + 1] + ["", *tables(path.read_text(), str(path)), ""]
        done = end
    return "\n".join(out + lines[done:])


def stale(doc_text: str, results_dir: Path) -> list[str]:
    """The blocks of `doc_text` that `render` would change, as 'results/<stem>.md (line N)'."""
    old, new = doc_text.split("\n"), render(doc_text, results_dir).split("\n")
    return [f"results/{a[0]}.md (line {a[1] + 1})"
            for a, b in zip(blocks(old), blocks(new)) if old[a[1]:a[2]] != new[b[1]:b[2]]]


# ---------------------------------------------------------------- command line


def write_atomically(path: Path, text: str) -> None:
    """Writes `text` to `path` through a temporary file in the same folder (os.replace), so a
    reader sees the old file or the new one, never a part; the file keeps its mode."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        if path.exists():
            os.chmod(tmp, stat.S_IMODE(path.stat().st_mode))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def main(argv: list[str] | None = None) -> int:
    """Rewrites the document (or, with --check, says which blocks are stale); 0 when done or
    up to date, 1 when --check finds stale blocks, 2 on an SMSDError."""
    parser = argparse.ArgumentParser(prog=COMMAND, description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help="write nothing; exit 1, naming the stale blocks, if out of date")
    parser.add_argument("--doc", type=Path, default=DOC, help="the document (%(default)s)")
    parser.add_argument("--results", type=Path, default=RESULTS,
                        help="the folder of the results files (%(default)s)")
    args = parser.parse_args(argv)
    try:
        text = args.doc.read_text()
        new = render(text, args.results)
        changed = stale(text, args.results)
    except (SMSDError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.check:
        for block in changed:
            print(f"{args.doc}: the block of {block} is stale; run `{COMMAND}`")
        return 1 if new != text else 0
    if new != text:
        write_atomically(args.doc, new)
    n = len(blocks(new.split("\n")))
    print(f"{args.doc}: {n} generated blocks, {len(changed)} rewritten")
    return 0


if __name__ == "__main__":
    sys.exit(main())
